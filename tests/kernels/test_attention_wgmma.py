"""The Gluon attention kernel (attention_wgmma.py): FlashAttention-3's in-warpgroup overlap.
No interpreter runs Gluon, so on the CPU it is compiled for sm_90 and its schedule read from
the PTX; on a GPU every config runs BERT's shapes and the ragged, GQA and bf16 cases against
a float64 reference, into NaN-filled outputs."""

import math
import re
import sys

import numpy as np
import pytest
import torch
from kernel_check import (
    assert_binaries_in_a_graph_equal_the_jit,
    assert_checks_pass_in_a_compiling_process,
    assert_close,
    poisoned,
    run_checks,
)

from kernl.kernels.attention import attention_reference
from kernl.kernels.attention_wgmma import (
    _EXP2_PAIR,
    WGMMA_CONFIGS,
    _wgmma_attention_kernel,
    wgmma_attention,
    wgmma_attention_refusal,
)


def _compile(
    block_m, block_n, warps, stages, overlap=True, head_dim=64, masked=False, exp_on_fma=False
):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernl.kernels.jit import made

    def desc(rows):
        block = [1, rows, head_dim]
        layout = gl.NVMMASharedLayout.get_default_for(block, gl.float16)
        return f"tensordesc<fp16[1,{rows},{head_dim}],{layout!r}>"

    signature = {"q_desc": desc(block_m), "k_desc": desc(block_n), "v_desc": desc(block_n)}
    signature |= {"o_desc": desc(block_m), "Bias": "*fp32", "KVLens": "*i32", "qk_scale": "fp32"}
    names = ("Lk", "num_heads", "group_size", "stride_biasb", "stride_biash", "stride_biasn")
    signature |= dict.fromkeys(names, "i32")
    constants = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages)
    constants |= dict(Q_IN_ROW=True, KV_IN_ROW=True, O_IN_ROW=True, HAS_BIAS=True)
    constants |= dict(HAS_KV_LENS=masked, MASKED=masked, OVERLAP=overlap, num_warps=warps)
    constants |= dict(EXP_FMA=exp_on_fma)
    signature |= dict.fromkeys(constants, "constexpr")
    src = GluonASTSource(made(_wgmma_attention_kernel), signature, constants)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def _loop_schedule(ptx: str) -> list[str]:
    """The key loop's wgmma issues, waits and exp2s, in order (the loop is the block that
    branches back to its own label)."""
    events = []
    for line in ptx.splitlines():
        t = line.strip()
        if t.startswith("wgmma.mma_async"):
            event = "mma"
        elif t.startswith("wgmma.wait_group"):
            event = "wait" + t.split()[-1].rstrip(";")
        elif t.startswith("ex2.approx"):
            event = "exp2"
        else:
            continue
        if not events or events[-1] != event:
            events.append(event)
    return events


def softmax_between_issue_and_wait(config):
    from kernl.runtime.binaries import spec_from_compiled

    compiled = _compile(*config)
    assert compiled.metadata.shared <= 232448
    schedule = _loop_schedule(compiled.asm["ptx"])
    # somewhere the next q k^T is issued and the softmax's exp2 runs before any wait
    assert any(schedule[i : i + 2] == ["mma", "exp2"] for i in range(len(schedule))), schedule
    # and a wait leaves one group in flight (p v, or the next q k^T)
    assert "wait1" in schedule, schedule
    # a loaded artifact can store and launch it: every descriptor a CUtensorMap
    spec, _ = spec_from_compiled("key", compiled)
    types = dict(spec.arg_types)
    assert all(types[f"{t}_desc"].startswith("nvTmaDesc:") for t in "qkvo"), spec.arg_types


def without_overlap_every_dot_is_waited_for_at_once():
    schedule = _loop_schedule(_compile(128, 64, 8, 2, overlap=False, masked=True).asm["ptx"])
    assert all(schedule[i + 1] == "wait0" for i, e in enumerate(schedule[:-1]) if e == "mma"), (
        schedule
    )


def head_dim_128_compiles_within_shared_memory():
    compiled = _compile(128, 64, 8, 2, head_dim=128, masked=True)
    assert compiled.metadata.shared <= 232448
    assert re.search(r"cp\.async\.bulk\.tensor", compiled.asm["ptx"])


def half_the_exponentials_on_the_fma_units():
    plain = _compile(64, 64, 4, 2, overlap=False, masked=True).asm["ptx"]
    split = _compile(64, 64, 4, 2, overlap=False, masked=True, exp_on_fma=True).asm["ptx"]
    # a 64x64 block is 32 scores a thread: 16 of them leave the SFU, each for three FMAs
    assert plain.count("ex2.approx") - split.count("ex2.approx") == 32, (plain, split)
    assert split.count("fma.rn.ftz.f32") - plain.count("fma.rn.ftz.f32") == 96


def main() -> int:
    """The sm_90 compile checks (see kernel_check.assert_checks_pass_in_a_compiling_process)."""
    checks = [(softmax_between_issue_and_wait, (c,)) for c in WGMMA_CONFIGS]
    checks += [(without_overlap_every_dot_is_waited_for_at_once, ())]
    checks += [(half_the_exponentials_on_the_fma_units, ())]
    return run_checks(checks + [(head_dim_128_compiles_within_shared_memory, ())])


def test_compiles_for_sm90_with_the_overlap_in_its_ptx():
    assert_checks_pass_in_a_compiling_process(__file__)


def _run_exp2_pair(x: np.ndarray) -> np.ndarray:
    """_EXP2_PAIR's FMA half ($3 -> $1), each PTX line run in float32 / int32 as written."""
    f32 = lambda h: np.uint32(int(h[2:], 16)).view(np.float32)  # noqa: E731 0fXXXXXXXX
    arg = lambda a, r: r[a] if a in r else f32(a) if a.startswith("0f") else np.int32(int(a, 0))  # noqa: E731
    regs = {"$3": x.astype(np.float32)}
    ftz = lambda v: np.where(np.abs(v) < np.float32(2.0**-126), np.float32(0), v)  # noqa: E731
    for line in _EXP2_PAIR.value.splitlines():
        op, _, rest = line.strip().rstrip(";").partition(" ")
        if op in ("{", "}", ".reg", "") or op.startswith("ex2"):
            continue
        d, *a = [t.strip() for t in rest.split(",")]
        a = [arg(t, regs) for t in a]
        if op == "max.ftz.f32":
            regs[d] = np.maximum(a[0], a[1]).astype(np.float32)
        elif op in ("add.rn.ftz.f32", "sub.rn.ftz.f32"):
            regs[d] = ftz((a[0] + a[1] if op.startswith("add") else a[0] - a[1]).astype(np.float32))
        elif op == "fma.rn.ftz.f32":  # exact product, one rounding
            regs[d] = ftz((a[0].astype(np.float64) * a[1] + a[2]).astype(np.float32))
        elif op == "mov.b32":
            regs[d] = a[0].view(np.float32 if d == "$1" or d == "p" else np.int32)
        elif op == "sub.s32":
            regs[d] = (a[0].view(np.int32) - a[1]).astype(np.int32)
        elif op == "shl.b32":
            regs[d] = (a[0].view(np.uint32) << np.uint32(a[1])).view(np.int32)
        elif op == "add.s32":
            regs[d] = (a[0].view(np.int32) + a[1].view(np.int32)).astype(np.int32)
        else:
            raise AssertionError(f"no emulation of {line!r}")
    return regs["$1"].view(np.float32)


def test_the_fma_half_of_exp2_is_within_fp16s_half_ulp():
    # softmax's exponents: 0 down to past -126, and the -inf of a masked key
    x = np.concatenate([-np.geomspace(1e-6, 140, 200001), np.linspace(-1, 0, 1001), [-np.inf]])
    got = _run_exp2_pair(x)
    want = np.exp2(x.astype(np.float64))
    normal = want >= 2.0**-120
    assert np.abs(got[normal] / want[normal] - 1).max() < 1.1e-4
    assert (got[~normal] >= 0).all() and (got[~normal] <= 2.0**-119).all()
    assert got[-1] == 0.0  # a masked key weighs nothing


def test_refusals_say_why():
    q = torch.empty(1, 2, 16, 64, dtype=torch.float16)
    assert "causal" in wgmma_attention_refusal(q, q, q, None, True)
    assert "Hopper" in wgmma_attention_refusal(q, q, q, None, False)  # a CPU tensor
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        small = torch.empty(1, 2, 16, 32, dtype=torch.float16, device="cuda")
        assert "head dim" in wgmma_attention_refusal(small, small, small, None, False)
        full = q.float().cuda()
        assert "float32" in wgmma_attention_refusal(full, full, full, None, False)


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _qkv_views(B, L, H, D, dtype):
    qkv = torch.randn(B, L, 3, H, D, dtype=dtype, device="cuda")
    return (qkv[:, :, i].transpose(1, 2) for i in range(3))


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="Hopper only")
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("config", WGMMA_CONFIGS, ids=str)
def test_gpu_bert_8x512_right_padded(config, overlap):
    _bert_8x512_right_padded(config, overlap, False)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="Hopper only")
@pytest.mark.parametrize("overlap", [True, False])
def test_gpu_bert_8x512_half_the_exponentials_on_the_fma_units(overlap):
    _bert_8x512_right_padded((64, 64, 4, 2), overlap, True)


def _bert_8x512_right_padded(config, overlap, exp_on_fma):
    B, L, H, D = 8, 512, 12, 64
    q, k, v = _qkv_views(B, L, H, D, torch.float16)
    lens = torch.randint(1, L + 1, (B,), device="cuda")
    keep = torch.arange(L, device="cuda")[None, :] < lens[:, None]
    bias = torch.zeros(B, 1, 1, L, device="cuda").masked_fill(~keep[:, None, None], float("-inf"))
    out = poisoned((B, L, H, D), torch.float16, "cuda").transpose(1, 2)
    bm, bn, warps, stages = config
    wgmma_attention(q, k, v, out, sm_scale=1 / math.sqrt(D), bias=bias.expand(B, H, L, L),
                    kv_lens=None, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                    overlap=overlap, exp_on_fma=exp_on_fma)  # fmt: skip
    ref = attention_reference(q.double(), k.double(), v.double(), bias=bias.double())
    stock = attention_reference(q, k, v, bias=bias.half())
    name = f"wgmma attention {config} {overlap} {exp_on_fma}"
    assert_close(out, ref, torch.float16, stock, name=name)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="Hopper only")
@pytest.mark.parametrize("config", [WGMMA_CONFIGS[0], WGMMA_CONFIGS[3]], ids=str)
def test_gpu_ragged_gqa_bf16_heads_in_their_own_rows(config):
    # 300 keys (a masked tail), 77 queries (a partial query block), a row with no key at all,
    # 12 query heads over 4 kv heads, head dim 128, contiguous [B, H, L, D]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(3, 12, 77, 128, dtype=torch.bfloat16, device="cuda", generator=g)
    k, v = (
        torch.randn(3, 4, 300, 128, dtype=torch.bfloat16, device="cuda", generator=g) for _ in "kv"
    )
    lens = torch.tensor([300, 17, 0], device="cuda")
    out = poisoned(q.shape, torch.bfloat16, "cuda")
    bm, bn, warps, _ = config
    wgmma_attention(q, k, v, out, sm_scale=0.1, bias=None, kv_lens=lens, block_m=bm,
                    block_n=bn, num_warps=warps, num_stages=2)  # fmt: skip
    ref = attention_reference(q.double(), k.double(), v.double(), sm_scale=0.1, kv_lens=lens)
    assert_close(out, ref, torch.bfloat16, name=f"wgmma attention ragged {config}")


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="Hopper only")
def test_gpu_binaries_in_a_graph_equal_the_jit():
    """Through attention() with a tuned config: recorded at build time, launched from the
    cubin with kernl's own CUtensorMaps (Gluon's descriptors), inside a CUDA graph: bit for bit
    what Gluon's JIT computed."""
    from kernl.kernels.attention import AttentionConfig, attention

    B, L, H, D = 2, 300, 12, 64
    q, k, v = _qkv_views(B, L, H, D, torch.float16)
    bias = torch.zeros(B, 1, 1, L, device="cuda")
    bias[1, ..., 200:] = float("-inf")
    config = AttentionConfig(64, 64, 4, 2, wgmma=True, overlap=True)
    assert_binaries_in_a_graph_equal_the_jit(
        lambda out=None: attention(q, k, v, bias=bias, config=config, out=out), 4
    )


def test_the_tuner_offers_it_on_hopper_for_long_keys_only(monkeypatch):
    from kernl.kernels import attention as attention_module

    monkeypatch.setattr(attention_module, "wgmma_attention_refusal", lambda *a: None)
    qkv = torch.empty(1, 512, 3, 12, 64, dtype=torch.float16, device="meta")
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    offered = [c for c in attention_module.attention_configs(k, False, q, v) if c.wgmma]
    assert offered and all(c.BLOCK_M == 64 for c in offered)
    assert {c.overlap for c in offered} == {True, False}
    short = qkv[:, :128]
    q, k, v = (short[:, :, i].transpose(1, 2) for i in range(3))
    assert not [c for c in attention_module.attention_configs(k, False, q, v) if c.wgmma]
    # without the stub: never on the CPU (nor on meta tensors), which has no Gluon
    monkeypatch.undo()
    assert not [c for c in attention_module.attention_configs(k, False, q, v) if c.wgmma]


def test_a_wgmma_config_refuses_causal_attention():
    from kernl.kernels.attention import AttentionConfig, attention

    q = torch.zeros(1, 2, 16, 64)
    with pytest.raises(ValueError, match="not causal"):
        attention(q, q, q, causal=True, config=AttentionConfig(64, 64, 4, 2, wgmma=True))


if __name__ == "__main__":
    sys.exit(main())
