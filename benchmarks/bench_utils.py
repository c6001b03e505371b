"""Shared pieces of the kernel benchmarks: the shapes of the issue, the implementations
compared (kernl vs stock PyTorch / cuBLAS / SDPA), their work (flops, bytes) and a timer.

Times are medians of CUDA-event timings of CUDA-graph replays (triton.testing.
do_bench_cudagraph): kernl's runtime replays CUDA graphs, so per-launch Python cost is not
what production pays, and stock PyTorch gets the same treatment. L2 is not flushed between
replays: the small-M linear shapes run with weights hot in L2 for both sides. Inputs are random
normals, never zeros."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernl.kernels import attention as attn_mod  # noqa: E402
from kernl.kernels import decode_attention as dec_mod  # noqa: E402
from kernl.kernels import fused_linear as lin_mod  # noqa: E402
from kernl.kernels import gated_mlp as mlp_mod  # noqa: E402
from kernl.kernels import norm as norm_mod  # noqa: E402
from kernl.kernels import skinny_linear as skinny_mod  # noqa: E402


def median_ms(fn: Callable[[], object], rep: int = 100) -> float:
    import triton

    fn()  # compile outside the graph capture
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))


def device_info() -> dict[str, str]:
    import triton

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
    }


@dataclass
class Case:
    """One benchmark point: `make(impl, config)` returns a zero-argument callable."""

    op: str
    label: str
    flops: float  # 0 for memory-bound ops
    bytes: float  # fewest bytes the op must move
    make: Callable[..., Callable[[], object]]
    impls: tuple[str, ...]
    configs: Callable[[], list] | None = None


def _randn(*shape, dtype=torch.float16):
    return torch.randn(*shape, dtype=dtype, device="cuda")


def attention_case(D: int, L: int, causal: bool, dtype=torch.float16) -> Case:
    B, H = max(1, 16384 // L), 2048 // D  # 16k tokens, hidden 2048, like FlashAttention's plots
    q, k, v = (_randn(B, H, L, D, dtype=dtype) for _ in range(3))

    def make(impl, config=None):
        if impl == "kernl":
            return lambda: attn_mod.attention(q, k, v, causal=causal, config=config)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    flops = 4 * B * H * L * L * D / (2 if causal else 1)
    return Case(
        "attention",
        f"hd{D} L{L} B{B} H{H} {'causal' if causal else 'full'}",
        flops,
        4 * q.numel() * q.element_size(),
        make,
        ("kernl", "sdpa"),
        attn_mod.attention_configs,
    )


def encoder_attention_case(B: int, L: int, dtype=torch.float16) -> Case:
    """BERT-base's attention as a compiled model runs it: q, k, v views of one QKV projection,
    a [B, 1, 1, L] padding bias, the output written as [B, L, H, D]. "kernl_flash" is the
    flash kernel at its default config, "kernl_short" the short-key kernel at the config the
    tuner chose at 8x128 and 32x128 (H200, 2026-12-03)."""
    H, D = 12, 64
    qkv = _randn(B, L, 3, H, D, dtype=dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    bias = torch.zeros(B, 1, 1, L, device="cuda")
    out = torch.empty(B, L, H, D, dtype=dtype, device="cuda").transpose(1, 2)
    short = attn_mod.AttentionConfig(min(64, max(16, L)), max(16, L), 4, 2, False, 2)

    def make(impl, config=None):
        if impl == "kernl_flash":
            return lambda: attn_mod.attention(q, k, v, bias=bias, out=out, config=config)
        if impl == "kernl_short":
            return lambda: attn_mod.attention(q, k, v, bias=bias, out=out, config=short)
        mask = bias.to(dtype)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return Case(
        "encoder_attention",
        f"BERT-base B{B} L{L}",
        4 * B * H * L * L * D,
        4 * q.numel() * q.element_size(),
        make,
        ("kernl_flash", "kernl_short", "sdpa"),
    )


def decode_case(Lk: int, dtype=torch.float16) -> Case:
    B, H, H_kv, D = max(1, 65536 // Lk), 32, 8, 128  # 64k cached tokens: 268 MB of K+V, past L2
    q = _randn(B, H, 1, D, dtype=dtype)
    k, v = (_randn(B, H_kv, Lk, D, dtype=dtype) for _ in range(2))
    lens = torch.full((B,), Lk, device="cuda", dtype=torch.int32)

    def make(impl, config=None):
        if impl == "kernl":
            return lambda: dec_mod.decode_attention(q, k, v, kv_lens=lens, config=config)
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    nbytes = (k.numel() + v.numel() + 2 * q.numel()) * k.element_size()
    return Case(
        "decode_attention",
        f"Lk{Lk} B{B} H{H}/{H_kv} hd{D}",
        0,
        nbytes,
        make,
        ("kernl", "sdpa"),
        dec_mod.decode_attention_configs,
    )


def linear_case(M: int, K: int, N: int, activation: str, dtype=torch.float16) -> Case:
    x = _randn(M, K, dtype=dtype)
    w = _randn(N, K, dtype=dtype) / math.sqrt(K)
    b = _randn(N, dtype=dtype)

    def make(impl, config=None):
        if impl == "kernl":
            return lambda: lin_mod.fused_linear(x, w, b, activation, config=config)
        return lambda: lin_mod.apply_activation(F.linear(x, w, b), activation)

    return Case(
        "linear",
        f"M{M} K{K} N{N} {activation}",
        2 * M * N * K,
        (M * K + N * K + M * N) * 2,
        make,
        ("kernl", "cublas"),
        lin_mod.linear_configs,
    )


def gated_mlp_case(M: int, K: int, N: int, dtype=torch.float16) -> Case:
    x = _randn(M, K, dtype=dtype)
    wg, wu = (_randn(N, K, dtype=dtype) / math.sqrt(K) for _ in range(2))

    def make(impl, config=None):
        if impl == "kernl":
            return lambda: mlp_mod.gated_mlp(x, wg, wu, config=config)
        return lambda: F.silu(F.linear(x, wg)) * F.linear(x, wu)

    return Case(
        "gated_mlp",
        f"M{M} K{K} N{N}",
        4 * M * N * K,
        (M * K + 2 * N * K + M * N) * 2,
        make,
        ("kernl", "cublas"),
        mlp_mod.gated_mlp_configs,
    )


def skinny_linear_case(M: int, K: int, N: int, dtype=torch.float16) -> Case:
    """A decode step's linear layer (M = batch rows): a read of the weight, timed as bytes."""
    x, r = _randn(M, K, dtype=dtype), _randn(M, N, dtype=dtype)
    w = _randn(N, K, dtype=dtype) / math.sqrt(K)

    def make(impl, config=None):
        if impl == "kernl":
            return lambda: skinny_mod.skinny_linear(x, w, None, r, config=config)
        return lambda: torch.addmm(r, x, w.t())

    return Case(
        "skinny_linear",
        f"M{M} K{K} N{N}",
        0,
        (N * K + 2 * M * N + M * K) * 2,
        make,
        ("kernl", "cublas"),
        skinny_mod.skinny_linear_configs,
    )


def norm_case(kind: str, M: int, N: int, dtype=torch.float16) -> Case:
    x, r = _randn(M, N, dtype=dtype), _randn(M, N, dtype=dtype)
    w, b = _randn(N, dtype=dtype), _randn(N, dtype=dtype)

    def make(impl, config=None):
        if impl == "kernl":
            fn = norm_mod.layer_norm if kind == "layer_norm" else norm_mod.rms_norm
            bias = b if kind == "layer_norm" else None
            return lambda: fn(x, w, bias, 1e-5, r, return_sum=True, config=config)
        if kind == "layer_norm":
            return lambda: F.layer_norm(x + r, (N,), w, b, 1e-5)
        return lambda: F.rms_norm(x + r, (N,), w, 1e-5)

    # read x and r, write the sum and the normalised value
    return Case(
        f"add_{kind}",
        f"M{M} N{N}",
        0,
        4 * M * N * x.element_size(),
        make,
        ("kernl", "torch"),
        norm_mod.norm_configs,
    )


ATTENTION_SHAPES = [
    (D, L, c) for D in (64, 128) for L in (128, 512, 1024, 2048, 4096, 8192) for c in (False, True)
]
LINEAR_SHAPES = [
    (M, K, N, a)
    for M in (128, 512, 2048, 4096, 16384)
    for K, N in ((768, 3072), (3072, 768))
    for a in ("none", "gelu")
]
NORM_SHAPES = [
    (kind, 16384, N) for kind in ("layer_norm", "rms_norm") for N in (768, 1024, 2048, 4096, 8192)
]
DECODE_SHAPES = [1024, 4096, 16384, 32768]


def run_case(benchmark, case: Case, implementation: str) -> None:
    """pytest-benchmark entry: the reported figure is do_bench's CUDA-event median (in
    extra_info); pytest-benchmark's own rounds time a synchronised call for its table."""
    fn = case.make(implementation)
    ms = median_ms(fn)
    info = device_info() | {"op": case.op, "shape": case.label, "median_ms": ms}
    if case.flops:
        info["TFLOPs"] = case.flops / ms / 1e9
    else:
        info["GBps"] = case.bytes / ms / 1e6
    benchmark.extra_info.update(info)

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, warmup_rounds=3)
