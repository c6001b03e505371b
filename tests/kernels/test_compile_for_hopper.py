"""The few-rows decode kernels (norm_linear_rope too) and decode attention compile for Hopper
(sm_90) in every variant a decoder launches, and so do the encoder attention's configs (the
short-key kernel's tile loop pipelined, the TMA kernel's copies) and
the warp-specialised linear ones and the persistent TMA linear's, checked on the CPU: Triton's front end and ptxas
run without a GPU, while the interpreter the other kernel tests use never compiles and so
accepts Python that Triton rejects (it missed a LayerNorm variable that the split-K
epilogue's loop redefined: every LayerNorm model with split-K failed to compile on the GPU,
Whisper-large-v3's decode step first)."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

from kernel_check import assert_checks_pass_in_a_compiling_process, run_checks

from kernl.kernels.fused_linear import _SPLIT_K


def _compile(kernel, signature: dict[str, str], constants: dict, options=None, aligned=()):
    """`aligned`: the arguments Triton's JIT would see 16-aligned (pointers from torch, sizes
    that are multiples of 16): its loads vectorise and its loops pipeline only then."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernl.kernels.jit import made

    sig = {**signature, **{name: "constexpr" for name in constants}}
    names = kernel.arg_names
    # a parameter left out would compile as None: a constexpr flag's branch never compiled
    # (o_waits_group's was not, until 2026-12-01)
    missing = [p.name for p in kernel.params if p.name not in sig and not p.has_default]
    assert not missing, f"{kernel.__name__}: no value for {missing}"
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(made(kernel), sig, constants, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


NORM_LINEAR = [
    (s, r, b, g, False)
    for s, r, b, g in itertools.product((1, 3), (True, False), (False, True), (False, True))
    if not (r and b)
]
NORM_LINEAR += [(3, True, False, True, 2), (1, False, True, False, True)]  # PDL, both triggers
SKINNY = [(*v, False) for v in itertools.product((1, 3), (False, True), (False, True))]
SKINNY += [(3, False, True, 2), (1, True, True, True)]
# an encoder's split-K linears (fused_linear.split_k_configs): rows, tiles, epilogue, stages
SKINNY += [
    (4, True, False, False, (64, bn, bk), act, st)
    for bn, bk, _split, _warps, st in _SPLIT_K
    for act in ("none", "gelu")
]
# decode attention as the decoder launches it (lengths and mask) over Llama-1B's head dim: the
# default, the smallest key block with the most chunks, and the widest block
# BLOCK_N, num_warps, num_stages, num_splits, softcap (Gemma2), window (Mistral)
DECODE_ATTENTION = [(64, 4, 3, 0, False, False), (16, 2, 2, 64, False, True)]
DECODE_ATTENTION += [(128, 8, 3, 64, True, False), (64, 4, 3, 0, True, True)]


def norm_linear_compiles(split, rms, norm_bias, gated, use_pdl):
    from kernl.kernels.norm_linear import _norm_linear_kernel

    signature = dict.fromkeys(("X", "NormW", "NormB", "W", "Bias", "Out"), "*bf16")
    signature |= {"Partial": "*fp32", "SumSq": "*fp32", "Counters": "*i32"}
    signature |= dict.fromkeys(("M", "N", "K", "k_chunk"), "i32") | {"eps": "fp32"}
    signature |= dict.fromkeys(("stride_xm", "stride_wn", "stride_om"), "i32")
    constants = dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=split, IS_RMS=rms)
    constants |= dict(HAS_NORM_BIAS=norm_bias, HAS_BIAS=True, GATED=gated)
    constants |= dict(PRECISION="tf32", USE_PDL=use_pdl, PREFETCH=8 if use_pdl else 0)
    _compile(_norm_linear_kernel, signature, constants)


# norm -> QKV -> rotary -> cache write: split or not, RMSNorm or LayerNorm, bias, rotary or
# none (learned positions), with PDL
NORM_LINEAR_ROPE = [(1, True, False, True, False), (3, True, True, True, 2)]
NORM_LINEAR_ROPE += [(3, False, True, False, False), (1, False, False, True, True)]


def norm_linear_rope_compiles(split, rms, bias, rope, use_pdl):
    from kernl.kernels.norm_linear_rope import _norm_linear_rope_kernel

    signature = dict.fromkeys(("X", "NormW", "NormB", "W", "Bias"), "*bf16")
    signature |= {"Partial": "*fp32", "SumSq": "*fp32", "Counters": "*i32", "Pos": "*i64"}
    signature |= dict.fromkeys(("Cos", "Sin", "QOut", "KCache", "VCache"), "*bf16")
    signature |= {"Slot": "*i64"}
    names = ["num_heads", "num_kv_heads", "slots", "stride_pb", "stride_cos", "stride_sin"]
    names += ["stride_qb", "stride_qh", "stride_qd"]
    names += [f"stride_{t}{x}" for t in "kv" for x in "bhnd"]
    names += ["M", "N", "K", "k_chunk"]
    signature |= dict.fromkeys(names, "i32") | {"eps": "fp32"}
    signature |= dict.fromkeys(("stride_xm", "stride_wn"), "i32")
    constants = dict(HALF=32, BLOCK_N=64, BLOCK_K=64, SPLIT_K=split, IS_RMS=rms)
    constants |= dict(HAS_NORM_BIAS=not rms, HAS_BIAS=bias, HAS_ROPE=rope)
    constants |= dict(PRECISION="tf32", USE_PDL=use_pdl, PREFETCH=8 if use_pdl else 0)
    _compile(_norm_linear_rope_kernel, signature, constants)


def skinny_linear_fused_compiles(
    split, bias, residual, use_pdl, block=(16, 32, 128), activation="none", stages=3
):
    from kernl.kernels.skinny_linear_fused import _skinny_fused_kernel

    dtype = "*bf16" if block[0] == 16 else "*fp16"  # a decode step's, an encoder's
    signature = dict.fromkeys(("X", "W", "Bias", "Residual", "Out"), dtype)
    signature |= {"Partial": "*fp32", "Counters": "*i32"}
    signature |= dict.fromkeys(("M", "N", "K", "k_chunk"), "i32")
    signature |= dict.fromkeys(("stride_xm", "stride_wn", "stride_rm", "stride_om"), "i32")
    block_m, block_n, block_k = block
    constants = dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, HAS_BIAS=bias)
    constants |= dict(HAS_RESIDUAL=residual, PRECISION="tf32", USE_PDL=use_pdl)
    constants |= dict(PREFETCH=8 if use_pdl else 0, BLOCK_M=block_m, ACTIVATION=activation)
    compiled = _compile(_skinny_fused_kernel, signature, constants, dict(num_stages=stages))
    assert compiled.metadata.shared <= 232448, compiled.metadata.shared


def decode_attention_compiles(block_n, num_warps, num_stages, num_splits, softcap, window):
    from kernl.kernels.decode_attention import _decode_merge_kernel, _decode_split_kernel

    options = dict(num_warps=num_warps, num_stages=num_stages)
    signature = dict.fromkeys(("Q", "K", "V"), "*bf16")
    signature |= dict.fromkeys(("MidO", "MidM", "MidL"), "*fp32")
    signature |= {"KVLens": "*i64", "KVMask": "*i1", "sm_scale": "fp32", "softcap": "fp32"}
    signature |= {"window": "i32"}
    signature |= dict.fromkeys(("Lk", "group_size", "chunk", "stride_lensb", "stride_maskb"), "i32")
    for t in ("q", "k", "v"):
        dims = ("b", "h", "d") if t == "q" else ("b", "h", "n", "d")
        signature |= dict.fromkeys((f"stride_{t}{x}" for x in dims), "i32")
    signature |= dict.fromkeys(("stride_ob", "stride_oh", "stride_os", "stride_mb"), "i32")
    signature |= {"stride_mh": "i32"}
    constants = dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_G=16, BLOCK_N=block_n)
    constants |= dict(HAS_KV_LENS=True, HAS_KV_MASK=True, USE_PDL=False)
    constants |= dict(HAS_SOFTCAP=softcap, HAS_WINDOW=window)
    _compile(_decode_split_kernel, signature, constants, options)
    signature = dict.fromkeys(("MidO", "MidM", "MidL"), "*fp32") | {"Out": "*bf16"}
    signature |= dict.fromkeys(("num_heads", "num_splits"), "i32")
    names = ("stride_ob", "stride_oh", "stride_os", "stride_mb", "stride_mh")
    signature |= dict.fromkeys(names + ("stride_outb", "stride_outh", "stride_outd"), "i32")
    block_s = max(2, num_splits)  # the merge's tile of chunks: up to 64
    constants = dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_S=block_s, USE_PDL=False)
    _compile(_decode_merge_kernel, signature, constants, dict(num_warps=4))


# the persistent decode step at Llama-1B's shapes, every config the compiler and the bench try
def _decode_step_configs():
    from kernl.kernels.decode_step import decode_step_configs

    return [(c, False) for c in decode_step_configs()] + [(decode_step_configs()[0], True)]


def decode_step_compiles(config, trace):
    from kernl.kernels.decode_step import _decode_step_kernel

    ptr = lambda *names, t="*bf16": dict.fromkeys(names, t)  # noqa: E731
    signature = ptr("Tokens", "Pos", "Slot", t="*i64") | ptr("KVMask", t="*i1")
    signature |= ptr("Embed", "Cos", "Sin", "AttnNormW", "Wqkv", "Bqkv", "Wo", "MlpNormW")
    signature |= ptr("Wgu", "Wd", "FinalNormW", "LmHead", "KCache", "VCache", "X", "Xn", "Q", "Att")
    signature |= ptr("Hmid", "Logits") | ptr("MidO", "MidM", "MidL", "Partial", "SumSq", t="*fp32")
    signature |= ptr("AttCounters", "Counters", "Sync", "GroupReady", "QkvReady", t="*i32")
    signature |= ptr("Ids", "Best", "LmCounter", "Trace", t="*i64")
    signature |= dict.fromkeys(("M", "num_layers", "slots", "kv_len", "vocab"), "i32")
    signature |= {"eps": "fp32", "sm_scale": "fp32", "stride_maskb": "i32", "stride_cos": "i32"}
    signature |= dict.fromkeys(("stride_kl", "stride_kb", "stride_kh", "stride_kn"), "i32")
    c = config
    constants = dict(H=2048, NH=32, KVH=8, D=64, I=8192, BLOCK_K=c.BLOCK_K, QKV_N=c.QKV_N)
    constants["QKV_P"] = c.QKV_PAIRS or c.QKV_N
    constants |= dict(O_N=c.O_N, UP_N=c.UP_N, DOWN_N=c.DOWN_N, LM_N=c.LM_N)
    constants |= dict(SPLIT_QKV=c.SPLIT_QKV, SPLIT_O=c.SPLIT_O, SPLIT_UP=c.SPLIT_UP)
    constants |= dict(SPLIT_DOWN=c.SPLIT_DOWN, ATT_SPLITS=c.ATT_SPLITS, ATT_BLOCK=c.ATT_BLOCK)
    constants |= dict(HAS_QKV_BIAS=False, PRECISION="tf32", PF_QKV=32, PF_O=8, PF_UP=32)
    constants |= dict(PF_DOWN=16, PF_LM=32, FLATTEN=c.flatten, TRACE=trace, ATT_FILL=c.att_fill)
    constants |= dict(O_WAITS_GROUP=c.o_waits_group, DOWN_BLOCK_K=c.DOWN_BLOCK_K or c.BLOCK_K)
    constants |= dict(UP_AHEAD=c.up_ahead_k * 2 // 128, ATT_WAITS_QKV=c.att_waits_qkv)
    options = dict(num_warps=c.num_warps, num_stages=c.num_stages, launch_cooperative_grid=True)
    aligned = [n for n, t in signature.items() if t.startswith("*")] + ["slots", "kv_len"]
    compiled = _compile(_decode_step_kernel, signature, constants, options, aligned)
    # the weight streams are asynchronous copies, pipelined: without them the kernel would
    # wait on every load and stream a fraction of the bandwidth
    assert compiled.asm["ptx"].count("cp.async.cg.shared.global") >= 10
    # the waits end with an acquire (Triton drops an atomic add of 0 whose value is unused:
    # the step's barriers had none, decode_step_tasks.wait_until): at least the four grid
    # barriers of a layer that every config waits at, in the code
    assert compiled.asm["ptx"].count("ld.global.gpu.acquire") >= 4


def attention_compiles(config, head_dim, causal, bias, window=False):
    """The prefill / encoder attention: `bias` a padding mask read one row per key block;
    `window` ModernBERT's local layers (a sliding window)."""
    from kernl.kernels.attention import _attention_fwd_kernel

    signature = dict.fromkeys(("Q", "K", "V", "Out", "Bias"), "*fp16") | {"KVLens": "*i32"}
    signature |= dict.fromkeys(("Lq", "Lk", "num_heads", "group_size"), "i32")
    signature |= {"sm_scale": "fp32", "window": "i32"}
    for t, dims in (("q", "bhmd"), ("k", "bhnd"), ("v", "bhnd"), ("o", "bhmd"), ("bias", "bhmn")):
        signature |= {f"stride_{t}{d}": "i32" for d in dims}
    constants = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=config.BLOCK_M)
    constants |= dict(BLOCK_N=config.BLOCK_N, IS_CAUSAL=causal, HAS_WINDOW=window, HAS_BIAS=bias)
    constants |= dict(BIAS_PER_KEY=bias, HAS_KV_LENS=False)
    constants |= dict(WARP_SPECIALIZE=config.warp_specialize)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    _compile(_attention_fwd_kernel, signature, constants, options, ("Q", "K", "V", "Out", "Bias"))


def short_attention_compiles(config, bias_per_key, even_n):
    """The short-key attention (attention_short.py) as BERT launches it: strides of 1 along
    the head dim (Triton's JIT specialises them), the others 16-aligned. Its tile loop must be
    software-pipelined: the next tiles' q, k and v in flight (cp.async) while one computes."""
    from kernl.kernels.attention_short import _short_attention_kernel

    signature = dict.fromkeys(("Q", "K", "V", "Out", "Bias"), "*fp16") | {"KVLens": "*i32"}
    signature |= dict.fromkeys(("Lq", "Lk", "num_heads", "group_size"), "i32")
    signature |= {"sm_scale": "fp32", "num_m_blocks": "i32", "num_tiles": "i32"}
    aligned = ["Q", "K", "V", "Out", "Bias"]
    for t, dims in (("q", "bhm"), ("k", "bhn"), ("v", "bhn"), ("o", "bhm"), ("bias", "bhmn")):
        signature |= {f"stride_{t}{d}": "i32" for d in dims}
        aligned += [f"stride_{t}{d}" for d in dims if t != "bias"]
    constants = dict(stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)
    constants |= dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N)
    constants |= dict(HAS_BIAS=True, BIAS_PER_KEY=bias_per_key, HAS_KV_LENS=False)
    constants |= dict(EVEN_N=even_n, NUM_STAGES=config.num_stages)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    compiled = _compile(_short_attention_kernel, signature, constants, options, aligned)
    # q, k and v each copied asynchronously at least once (none: the loop is not pipelined)
    assert compiled.asm["ptx"].count("cp.async.cg.shared.global") >= 3, "tile loop not pipelined"


def _short_attention_variants():
    """Every short-key config at BERT's key lengths (16, 128) and MiniLM's 256, its padding
    mask one row per key; a full bias and a ragged key block at 128."""
    import torch

    from kernl.kernels.attention import attention_configs

    found = []
    for keys in (16, 128, 256):
        k = torch.empty(1, 1, keys, 64, device="meta")
        found += [(c, True, True) for c in attention_configs(k) if c.programs_per_sm]
    k = torch.empty(1, 1, 100, 64, device="meta")
    return found + [(c, False, False) for c in attention_configs(k) if c.programs_per_sm][:2]


def linear_compiles(config, activation, residual):
    from kernl.kernels.fused_linear import _fused_linear_kernel

    signature = dict.fromkeys(("X", "W", "Bias", "Residual", "Out"), "*fp16")
    signature |= dict.fromkeys(("M", "N", "K"), "i32")
    for t, dims in (("x", "mk"), ("w", "nk"), ("r", "mn"), ("o", "mn")):
        signature |= {f"stride_{t}{d}": "i32" for d in dims}
    constants = dict(BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K)
    constants |= dict(GROUP_M=config.GROUP_M, ACTIVATION=activation, HAS_BIAS=True)
    constants |= dict(HAS_RESIDUAL=residual, EVEN_K=True)
    constants |= dict(WARP_SPECIALIZE=config.warp_specialize)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    aligned = ("X", "W", "Bias", "Residual", "Out", "N", "K")
    aligned += ("stride_xm", "stride_wn", "stride_rm", "stride_om")
    _compile(_fused_linear_kernel, signature, constants, options, aligned)


def linear_tma_compiles(config, activation, residual):
    """The persistent TMA linear, and what kernl stores of it: each descriptor becomes a
    CUtensorMap parameter (with the compiled kernel's TMA box) and its shape and strides."""
    from kernl.kernels.linear_tma import _linear_tma_kernel
    from kernl.runtime.binaries import spec_from_compiled

    bm, bn, bk = config.BLOCK_M, config.BLOCK_N, config.BLOCK_K
    out_n = bn // 2 if config.split_epilogue else bn
    signature = {
        "x_desc": f"tensordesc<fp16[{bm}, {bk}]>",
        "w_desc": f"tensordesc<fp16[{bn}, {bk}]>",
        "out_desc": f"tensordesc<fp16[{bm}, {out_n}]>",
        "Bias": "*fp16",
        "Residual": "*fp16",
    }
    signature |= dict.fromkeys(("M", "N", "K", "stride_rm", "num_programs"), "i32")
    constants = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=config.GROUP_M)
    constants |= dict(ACTIVATION=activation, HAS_BIAS=True, HAS_RESIDUAL=residual)
    constants |= dict(SPLIT_EPILOGUE=config.split_epilogue, FLATTEN=config.flatten)
    constants |= dict(WARP_SPECIALIZE=config.warp_specialize)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    aligned = ("Bias", "Residual", "N", "K", "stride_rm")
    compiled = _compile(_linear_tma_kernel, signature, constants, options, aligned)
    # Hopper's 227 KiB per block: Triton says so only at launch (a 128x256 tile with flatten,
    # no split and a residual asked for 240 KiB)
    assert compiled.metadata.shared <= 232448, compiled.metadata.shared
    spec, _ = spec_from_compiled("key", compiled)
    types = dict(spec.arg_types)
    for name in ("x_desc", "w_desc", "out_desc"):
        assert types[name].startswith("nvTmaDesc:"), spec.arg_types
        assert types[f"{name}.shape.1"] == "i32" and types[f"{name}.strides.0"] == "i64"
    names = [n for n, _ in spec.arg_types]
    assert names.index("x_desc.strides.1") + 1 == names.index("w_desc"), names


def _linear_tma_variants():
    from kernl.kernels.fused_linear import tma_linear_configs

    return [(c, a, r) for c in tma_linear_configs() for a, r in (("gelu", True), ("none", True))]


def tma_attention_compiles(config, keys, bias_per_key):
    """The TMA attention (attention_tma.py) as BERT launches it: q, k, v and out through 3-d
    descriptors, heads side by side in a row; kernl stores each as a CUtensorMap parameter."""
    from kernl.kernels.attention_tma import _tma_attention_kernel
    from kernl.runtime.binaries import spec_from_compiled

    bm, bn = config.BLOCK_M, config.BLOCK_N
    signature = {f"{t}_desc": f"tensordesc<fp16[1, {bm}, 64]>" for t in ("q", "o")}
    signature |= {f"{t}_desc": f"tensordesc<fp16[1, {bn}, 64]>" for t in ("k", "v")}
    signature |= {"Bias": "*fp32", "KVLens": "*i32", "sm_scale": "fp32"}
    names = ("Lq", "Lk", "num_heads", "group_size", "num_m_blocks", "num_tiles")
    signature |= dict.fromkeys(names, "i32")
    signature |= {f"stride_bias{d}": "i32" for d in "bhmn"}
    constants = dict(HEAD_DIM=64, BLOCK_M=bm, BLOCK_N=bn, Q_IN_ROW=True, KV_IN_ROW=True)
    constants |= dict(O_IN_ROW=True, ONE_BLOCK=keys <= bn, HAS_BIAS=True)
    constants |= dict(BIAS_PER_KEY=bias_per_key, HAS_KV_LENS=False, MASKED=keys % bn != 0)
    constants |= dict(NUM_STAGES=config.num_stages)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    compiled = _compile(_tma_attention_kernel, signature, constants, options, ("Bias",))
    assert compiled.metadata.shared <= 232448, compiled.metadata.shared
    spec, _ = spec_from_compiled("key", compiled)
    types = dict(spec.arg_types)
    for name in ("q_desc", "k_desc", "v_desc", "o_desc"):
        assert types[name].startswith("nvTmaDesc:"), spec.arg_types
    # the tiles come in by TMA: one bulk tensor copy per operand at least
    assert compiled.asm["ptx"].count("cp.async.bulk.tensor") >= 4, "no TMA copies"


def qkv_attention_compiles(config, seq):
    """The fused QKV projection + attention (qkv_attention.py) at BERT-base's head: x, the
    weight and the output through descriptors, the K loop on TMA copies and wgmmas."""
    from kernl.kernels.qkv_attention import _qkv_attention_kernel

    bk = config.block_k
    signature = {
        "x_desc": f"tensordesc<fp16[1, {seq}, {bk}]>",
        "w_desc": f"tensordesc<fp16[64, {bk}]>",
        "out_desc": f"tensordesc<fp16[1, {seq}, 64]>",
        "QKVBias": "*fp16",
        "PadBias": "*fp32",
        "sm_scale": "fp32",
    }
    signature |= dict.fromkeys(("L", "num_heads", "hidden", "stride_pad_b"), "i32")
    constants = dict(HEAD_DIM=64, BLOCK_L=seq, BLOCK_K=bk, HAS_QKV_BIAS=True, HAS_PAD_BIAS=True)
    constants |= dict(NUM_STAGES=config.num_stages, PRECISION="tf32")
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    aligned = ("QKVBias", "PadBias", "hidden", "stride_pad_b")
    compiled = _compile(_qkv_attention_kernel, signature, constants, options, aligned)
    assert compiled.metadata.shared <= 232448, compiled.metadata.shared
    ptx = compiled.asm["ptx"]
    assert ptx.count("cp.async.bulk.tensor") >= 4, "no TMA copies"
    assert "ld.local" not in ptx, "registers spilled"
    if seq >= 64:  # a warp group's wgmma takes 64 rows; 16 go through mma.sync
        assert "wgmma.mma_async" in ptx, "no wgmma"


def _qkv_attention_variants():
    from kernl.kernels.qkv_attention import qkv_attention_sweep

    return [(c, 128) for c in qkv_attention_sweep()] + [(qkv_attention_sweep()[0], 16)]


def _tma_attention_variants():
    """Every TMA config at BERT's key lengths (128: one block, 512: streamed) with its padding
    mask, and a full bias at 100 keys (a ragged block)."""
    import torch

    from kernl.kernels.attention import attention_configs

    found = []
    for keys in (128, 512, 100):
        qkv = torch.empty(1, keys, 3, 12, 64, dtype=torch.float16, device="meta")
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        configs = [c for c in attention_configs(k, False, q, v) if c.tma]
        found += [(c, keys, keys != 100) for c in (configs if keys != 100 else configs[:2])]
    return found


def _attention_variants():
    """Every config in BERT's variant (fp16, head dim 64, a padding bias), and the
    warp-specialised ones (Triton's warp specialiser failed on every 4-warp config until they
    left the tuning space) in a causal one at head dim 128 too."""
    from kernl.kernels.attention import attention_configs

    found = [(c, 64, False, True) for c in attention_configs()]
    found += [(c, 64, False, True, True) for c in attention_configs(window=64)]
    return found + [(c, 128, True, False) for c in attention_configs() if c.warp_specialize]


def _linear_warp_specialized_variants():
    from kernl.kernels.fused_linear import linear_configs

    ws = [c for c in linear_configs() if c.warp_specialize]
    return [(c, act, res) for c in ws for act, res in (("none", True), ("gelu", False))]


def weight_ring_bench_compiles(bn, bk, stages, barrier, split, warps, consumer="fma"):
    """benchmarks/bench_weight_ring.py's kernels (issue 15's diagnostic of one weight stream
    through a decode layer's barriers): the Gluon ring in a consumer warp group and a producer
    warp whose barriers stay apart (the consumer's CTA barrier counts its 128 threads only,
    or it would wait for the producer), and the Triton loop it is measured against."""
    import importlib.util
    import pathlib
    import re

    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "bench_weight_ring.py"
    spec = importlib.util.spec_from_file_location("bench_weight_ring", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    layout = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.bfloat16)
    desc = f"tensordesc<bf16[{bn},{bk}],{layout!r}>"
    sig = {f"d{i}": desc for i in range(4)} | {f"X{i}": "*bf16" for i in range(4)}
    sig |= {f"Y{i}": "*fp32" for i in range(4)} | {"Sync": "*i32", "L": "i32", "Trace": "*i64"}
    constants = dict(
        STAGES=stages,
        BARRIER=barrier,
        SPLIT=split,
        TRACE=barrier == "drain",
        CONSUMER=consumer,
        num_warps=warps,
    )
    # every constexpr of the kernel given: one left out compiles as None, its branch unseen
    missing = [
        p.name for p in bench._ring_kernel.params if p.name not in sig and p.name not in constants
    ]
    assert not missing, missing
    sig |= dict.fromkeys(constants, "constexpr")
    import triton
    from triton.backends.compiler import GPUTarget

    src = GluonASTSource(bench._ring_kernel, sig, constants)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.metadata.shared <= 232448, compiled.metadata.shared
    ptx = compiled.asm["ptx"]
    assert "cp.async.bulk.tensor" in ptx and "setmaxnreg" in ptx
    assert ("wgmma.mma_async" in ptx) == (consumer == "mma")
    assert set(re.findall(r"bar\.sync\s+(\d+, \d+)", ptx)) <= {f"0, {32 * warps}"}
    constants = dict(BN=bn, BK=bk, STAGES=4, BARRIER=barrier != "free")
    sig = {f"W{i}": "*bf16" for i in range(4)} | {f"X{i}": "*bf16" for i in range(4)}
    sig |= {f"Y{i}": "*fp32" for i in range(4)} | {"Sync": "*i32", "L": "i32"}
    sig |= dict.fromkeys(constants, "constexpr")
    _compile(bench._triton_kernel, sig, constants, dict(num_stages=4), [f"W{i}" for i in range(4)])


def rotary_compiles(config, dtype):
    """kernl.rotary (ModernBERT's q and k): every tuning config, fp16 and bf16."""
    from kernl.kernels.rotary import _rotary_kernel

    signature = dict.fromkeys(("X", "Cos", "Sin", "Out"), f"*{dtype}")
    signature |= dict.fromkeys(("H", "L", "half"), "i32")
    signature |= {f"stride_{t}{d}": "i32" for t in "xcs" for d in "bhld"}
    constants = dict(BLOCK_L=config.BLOCK_L, BLOCK_D=32)
    _compile(_rotary_kernel, signature, constants, dict(num_warps=config.num_warps), ("X", "Out"))


def gated_mlp_compiles(config, activation, bias):
    """kernl.gated_linear's kernel (ModernBERT's GEGLU: GELU, biases) and the decoder's SiLU."""
    from kernl.kernels.gated_mlp import _gated_mlp_kernel

    signature = dict.fromkeys(("X", "Wg", "Wu", "Bg", "Bu", "Out"), "*fp16")
    signature |= dict.fromkeys(("M", "N", "K"), "i32")
    signature |= {f"stride_{t}": "i32" for t in ("xm", "xk", "gn", "gk", "un", "uk", "om", "on")}
    constants = dict(BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K)
    constants |= dict(GROUP_M=config.GROUP_M, EVEN_K=True, ACTIVATION=activation, HAS_BIAS=bias)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    _compile(_gated_mlp_kernel, signature, constants, options, ("X", "Wg", "Wu", "Out"))


def _gated_mlp_variants():
    from kernl.kernels.gated_mlp import gated_mlp_configs

    first, *_ = gated_mlp_configs()
    return [(c, "gelu", True) for c in gated_mlp_configs()] + [(first, "silu", False)]


def _rotary_variants():
    from kernl.kernels.rotary import rotary_configs

    return [(c, d) for c in rotary_configs() for d in ("fp16", "bf16")]


def main() -> int:
    """Compile every variant (in a process where Triton compiles: no TRITON_INTERPRET)."""
    return run_checks(
        (check, v)
        for check, variants in (
            (norm_linear_compiles, NORM_LINEAR),
            (norm_linear_rope_compiles, NORM_LINEAR_ROPE),
            (skinny_linear_fused_compiles, SKINNY),
            (decode_attention_compiles, DECODE_ATTENTION),
            (decode_step_compiles, _decode_step_configs()),
            (attention_compiles, _attention_variants()),
            (short_attention_compiles, _short_attention_variants()),
            (linear_compiles, _linear_warp_specialized_variants()),
            (linear_tma_compiles, _linear_tma_variants()),
            (tma_attention_compiles, _tma_attention_variants()),
            (qkv_attention_compiles, _qkv_attention_variants()),
            (rotary_compiles, _rotary_variants()),
            (gated_mlp_compiles, _gated_mlp_variants()),
            (
                weight_ring_bench_compiles,
                [
                    (128, 128, 6, "cross", "even", 4),
                    (64, 256, 6, "drain", "even", 8),
                    (16, 256, 24, "cross", "owned", 4),
                    (64, 256, 6, "drain", "dynamic", 4),
                    (64, 256, 6, "free", "dynamic", 4),
                    (64, 256, 6, "flags", "even", 4),
                    (64, 256, 6, "cross", "even", 4, "mma"),
                    (128, 64, 12, "drain", "even", 4, "mma"),
                ],
            ),
        )
        for v in variants
    )


def test_kernels_compile_for_sm90():
    assert_checks_pass_in_a_compiling_process(__file__)


if __name__ == "__main__":
    sys.exit(main())


def test_benchmark_kernels_call_tritons_own_functions():
    """A benchmark's plain `@triton.jit` kernel that calls one of kernl's `@jit` functions must
    hold Triton's own (`made(...)`): kernl's are lazy, and Triton cannot call a lazy one. The
    compile check above cannot see it, since it makes kernl's kernels before it loads the
    benchmarks; a fresh process can (bench_weight_ring failed so on the GPU, 2026-12-04)."""
    import subprocess

    root = Path(__file__).parents[2]
    code = (
        "import importlib.util, sys\n"
        "from kernl.kernels.jit import LazyJIT\n"
        f"sys.path.insert(0, {str(root / 'benchmarks')!r})\n"
        "for name in ('bench_weight_ring', 'bench_stream_linear'):\n"
        f"    path = {str(root / 'benchmarks')!r} + '/' + name + '.py'\n"
        "    spec = importlib.util.spec_from_file_location(name, path)\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        "    lazy = [k for k, v in vars(module).items() if isinstance(v, LazyJIT)]\n"
        "    assert not lazy, (name, lazy)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
