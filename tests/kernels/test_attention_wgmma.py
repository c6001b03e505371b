"""The Gluon attention kernel (attention_wgmma.py): FlashAttention-3's in-warpgroup overlap.
No interpreter runs Gluon, so on the CPU it is compiled for sm_90 and its schedule read from
the PTX; on a GPU every config runs BERT's shapes and the ragged, GQA and bf16 cases against
a float64 reference, into NaN-filled outputs."""

import math
import re
import sys

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
    WGMMA_CONFIGS,
    _wgmma_attention_kernel,
    wgmma_attention,
    wgmma_attention_refusal,
)


def _compile(block_m, block_n, warps, stages, overlap=True, head_dim=64, masked=False, lazy=False):
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
    constants |= dict(LAZY=lazy)
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


def _ptxas_log(ptx: str) -> str:
    """ptxas -v's messages for `ptx` (Triton's own ptxas; Triton drops them after a build)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/kernel.ptx"
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(90).path, "-v", "--gpu-name=sm_90a", src, "-o", f"{tmp}/kernel.cubin"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def softmax_between_issue_and_wait(config):
    from kernl.runtime.binaries import spec_from_compiled

    compiled = _compile(*config)
    assert compiled.metadata.shared <= 232448
    schedule = _loop_schedule(compiled.asm["ptx"])
    # FlashAttention-3's order: q k_{j+1}^T and p_j v_j issued, the first waited for, the
    # next block's softmax (its exp2) while p v runs, then the wait for p v
    run = ["mma", "wait1", "exp2", "wait0"]
    assert any(schedule[i : i + 4] == run for i in range(len(schedule))), schedule
    # and ptxas keeps the wgmmas asynchronous (it serialised them all, warning C7514, while
    # the rescale read the accumulator with a q k^T in flight)
    assert "C7514" not in _ptxas_log(compiled.asm["ptx"])
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


def _guarded_multiplies(ptx: str) -> list[int]:
    """Per predicated branch, how many `mul.f32` follow it before anything else (comments
    and debug lines aside): the multiplies the branch skips."""
    lines = [ln.strip() for ln in ptx.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("//", ".loc", "$L__tmp"))]
    runs = []
    for i, line in enumerate(lines):
        if re.match(r"@%p\d+ bra\s", line):
            n = 0
            while i + 1 + n < len(lines) and lines[i + 1 + n].startswith("mul.f32"):
                n += 1
            runs.append(n)
    return runs


def full_key_blocks_load_the_bias_unpredicated(overlap):
    # where every key block is full the bias's loads need no predicate: with one per column
    # they were ~80 of the 64x64 loop's ~500 instructions a thread (sm_90 SASS, 2026-12-04)
    import re

    predicated = re.compile(r"@%p\d+ ld\.global")
    full = _compile(64, 64, 4, 2, overlap=overlap, masked=False).asm["ptx"]
    masked = _compile(64, 64, 4, 2, overlap=overlap, masked=True).asm["ptx"]
    assert full.count("ld.global") >= 16 and not predicated.search(full)
    assert predicated.search(masked)  # a ragged tail keeps its mask


def lazy_rescale_branches_around_the_accumulators_multiply(config, overlap):
    bm, bn, warps, stages = config
    plain = _compile(bm, bn, warps, stages, overlap=overlap, masked=True).asm["ptx"]
    lazy = _compile(bm, bn, warps, stages, overlap=overlap, masked=True, lazy=True).asm["ptx"]
    # the accumulator is bm x 64 fp32 over the CTA's threads: its rescale is one multiply
    # each, in the loop (and after it, serial: the last block's softmax comes after the loop);
    # the lazy kernel skips each run when no row's max moved
    per_thread = bm * 64 // (warps * 32)
    runs = 1 if overlap else 2
    assert _guarded_multiplies(lazy).count(per_thread) == runs, _guarded_multiplies(lazy)
    assert per_thread not in _guarded_multiplies(plain), _guarded_multiplies(plain)


def main() -> int:
    """The sm_90 compile checks (see kernel_check.assert_checks_pass_in_a_compiling_process)."""
    checks = [(softmax_between_issue_and_wait, (c,)) for c in WGMMA_CONFIGS]
    checks += [(without_overlap_every_dot_is_waited_for_at_once, ())]
    checks += [
        (lazy_rescale_branches_around_the_accumulators_multiply, (c, o))
        for c in ((64, 64, 4, 2), (128, 64, 8, 2))
        for o in (True, False)
    ]
    checks += [(full_key_blocks_load_the_bias_unpredicated, (o,)) for o in (True, False)]
    return run_checks(checks + [(head_dim_128_compiles_within_shared_memory, ())])


def test_compiles_for_sm90_with_the_overlap_in_its_ptx():
    assert_checks_pass_in_a_compiling_process(__file__)


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
@pytest.mark.parametrize("config", [(64, 64, 4, 2), (128, 64, 8, 2)], ids=str)
def test_gpu_bert_8x512_lazy_rescale(config, overlap):
    _bert_8x512_right_padded(config, overlap, True)


def _bert_8x512_right_padded(config, overlap, lazy):
    B, L, H, D = 8, 512, 12, 64
    q, k, v = _qkv_views(B, L, H, D, torch.float16)
    lens = torch.randint(1, L + 1, (B,), device="cuda")
    keep = torch.arange(L, device="cuda")[None, :] < lens[:, None]
    bias = torch.zeros(B, 1, 1, L, device="cuda").masked_fill(~keep[:, None, None], float("-inf"))
    out = poisoned((B, L, H, D), torch.float16, "cuda").transpose(1, 2)
    bm, bn, warps, stages = config
    wgmma_attention(q, k, v, out, sm_scale=1 / math.sqrt(D), bias=bias.expand(B, H, L, L),
                    kv_lens=None, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                    overlap=overlap, lazy_rescale=lazy)  # fmt: skip
    ref = attention_reference(q.double(), k.double(), v.double(), bias=bias.double())
    stock = attention_reference(q, k, v, bias=bias.half())
    name = f"wgmma attention {config} {overlap} {lazy}"
    assert_close(out, ref, torch.float16, stock, name=name)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="Hopper only")
@pytest.mark.parametrize("ramp", ["rising", "falling"])
@pytest.mark.parametrize("config", [(64, 64, 4, 2), (128, 64, 8, 2)], ids=str)
def test_gpu_lazy_rescale_where_the_maxima_move_block_after_block(config, ramp):
    # keys scaled from 0.05 to 20 along the sequence: each key block's scores pass the
    # last block's maxima by far more than the lazy threshold (rising), or never (falling)
    B, L, H, D = 2, 512, 4, 64
    q, k, v = _qkv_views(B, L, H, D, torch.float16)
    scale = torch.linspace(0.05, 20, L, device="cuda")
    scale = scale if ramp == "rising" else scale.flip(0)
    k = (k.float() * scale[:, None]).half()
    bias = torch.zeros(B, 1, 1, L, device="cuda")
    bias[1, ..., 400:] = float("-inf")
    out = poisoned((B, H, L, D), torch.float16, "cuda")
    bm, bn, warps, stages = config
    wgmma_attention(q, k, v, out, sm_scale=1 / math.sqrt(D), bias=bias, kv_lens=None,
                    block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                    lazy_rescale=True)  # fmt: skip
    ref = attention_reference(q.double(), k.double(), v.double(), bias=bias.double())
    stock = attention_reference(q, k, v, bias=bias.half())
    assert_close(out, ref, torch.float16, stock, name=f"lazy rescale {config} {ramp}")


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="Hopper only")
@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("config", [WGMMA_CONFIGS[0], WGMMA_CONFIGS[3]], ids=str)
def test_gpu_ragged_gqa_bf16_heads_in_their_own_rows(config, lazy):
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
                    block_n=bn, num_warps=warps, num_stages=2, lazy_rescale=lazy)  # fmt: skip
    ref = attention_reference(q.double(), k.double(), v.double(), sm_scale=0.1, kv_lens=lens)
    assert_close(out, ref, torch.bfloat16, name=f"wgmma attention ragged {config} {lazy}")


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="Hopper only")
@pytest.mark.parametrize("lazy", [False, True])
def test_gpu_binaries_in_a_graph_equal_the_jit(lazy):
    """Through attention() with a tuned config: recorded at build time, launched from the
    cubin with kernl's own CUtensorMaps (Gluon's descriptors), inside a CUDA graph: bit for bit
    what Gluon's JIT computed."""
    from kernl.kernels.attention import AttentionConfig, attention

    B, L, H, D = 2, 300, 12, 64
    q, k, v = _qkv_views(B, L, H, D, torch.float16)
    bias = torch.zeros(B, 1, 1, L, device="cuda")
    bias[1, ..., 200:] = float("-inf")
    config = AttentionConfig(64, 64, 4, 2, wgmma=True, overlap=True, lazy_rescale=lazy)
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
    assert {c.lazy_rescale for c in offered} == {True, False}
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
