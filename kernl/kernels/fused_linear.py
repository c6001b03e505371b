"""Fused linear: activation(x @ W^T + bias) (+ residual), one kernel, fp32 accumulation.

W is stored [N, K] as in nn.Linear and read through its strides (no transpose copy). The
epilogue (bias, activation, residual) runs on the fp32 accumulator in registers, so the
output makes one trip to memory instead of three and is rounded once. Programs are ordered in
groups of GROUP_M row-blocks so that consecutive programs reuse the same W columns from L2.
Any M and N; K must be a multiple of 8 (16-byte rows for fp16). A config with `tma` set runs
linear_tma.py's persistent TMA kernel instead (Hopper; not in the tuning space, see there),
one with `wgmma` linear_wgmma.py's Gluon kernel and one with `pingpong` linear_pingpong.py's
(Hopper; neither in the tuning space). One with `split_k` runs skinny_linear_fused.py's
kernel, K split and reduced in the same launch: the tuning space offers it where a call has
few rows (a batch-1 query), whose GEMMs cuBLAS runs at a few µs each."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .activation import ACTIVATIONS, _activation, apply_activation
from .jit import cdiv, jit, tl
from .launch import launch_kernel
from .linear_pingpong import _pingpong_linear_kernel, pingpong_linear
from .linear_tma import _linear_tma_kernel, linear_tma
from .linear_wgmma import _wgmma_linear_kernel, wgmma_linear
from .skinny_linear_fused import (
    SkinnyLinearFusedConfig,
    _skinny_fused_kernel,
    skinny_linear_fused,
)


@jit
def _fused_linear_kernel(
    X,
    W,
    Bias,
    Residual,
    Out,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_rm,
    stride_rn,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    EVEN_K: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrap out-of-range rows/cols onto valid ones: loads need no mask, the store has one
    offs_xm = (offs_m % M).to(tl.int64)
    offs_wn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + offs_xm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + offs_wn[None, :] * stride_wn + offs_k[:, None] * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=WARP_SPECIALIZE):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(Bias + offs_wn).to(tl.float32)[None, :]
    acc = _activation(acc, ACTIVATION)
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offs_om = offs_m.to(tl.int64)
    if HAS_RESIDUAL:
        r_ptrs = Residual + offs_om[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(r_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    o_ptrs = Out + offs_om[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=out_mask)


def fused_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    y = apply_activation(F.linear(x, weight, bias), activation)
    return y if residual is None else y + residual


@dataclass(frozen=True)
class LinearConfig:
    BLOCK_M: int = 128
    BLOCK_N: int = 128
    BLOCK_K: int = 64
    GROUP_M: int = 8
    num_warps: int = 8
    num_stages: int = 3
    warp_specialize: bool = False  # Triton's warp-specialised pipelining of the K loop
    # the persistent TMA kernel (linear_tma.py, Hopper): one program per SM walks the tiles
    tma: bool = False
    flatten: bool = False  # tma: the tile and K loops pipelined as one
    split_epilogue: bool = False  # tma: the output stored in two half-width tiles
    # linear_wgmma.py's Gluon kernel (Hopper): a TMA ring into asynchronous wgmma
    wgmma: bool = False
    # linear_pingpong.py's (Hopper): warp-specialised, two consumers taking tiles in turn
    pingpong: bool = False
    # > 0: skinny_linear_fused.py's kernel, BLOCK_M rows a program, K split in about this
    # many chunks (1: none) that the last to finish sums in the same launch
    split_k: int = 0


# Rows up to which the split-K kernel is offered: a batch-1 call's tokens
SPLIT_K_ROWS = 128
# (BLOCK_N, BLOCK_K, split_k, num_warps, num_stages) of the split-K kernel
_SPLIT_K = [(32, 128, 4, 4, 4), (32, 128, 8, 4, 4), (64, 128, 4, 4, 4), (64, 64, 8, 4, 4)]
_SPLIT_K += [(32, 256, 2, 4, 3), (64, 128, 2, 4, 4)]


def split_k_configs(M: int) -> list[LinearConfig]:
    """The split-K kernel's configs for a call of M rows (none past SPLIT_K_ROWS): one row
    block of up to 64 rows a program, or two of 64."""
    if M > SPLIT_K_ROWS:
        return []
    rows = max(16, min(64, 1 << max(0, M - 1).bit_length()))
    return [LinearConfig(rows, bn, bk, 8, w, s, split_k=sk) for bn, bk, sk, w, s in _SPLIT_K]


def linear_configs(x: torch.Tensor | None = None) -> list[LinearConfig]:
    """Tuning space (Hopper-leaning; the small tiles cover small M). The persistent TMA
    kernel's configs (tma_linear_configs) are not in it: they lost to cuBLAS at every
    BERT-base GEMM (H200, 2026-12-03, benchmarks/bench_linear_tma.py: 1.10-1.27x cuBLAS's
    time at M = 4096, 1.10-1.53x at 1024), so offering them only lengthened compiles. Nor
    are the Gluon kernel's (linear_wgmma.WGMMA_LINEAR_CONFIGS): 0.99-1.27x cuBLAS's time at
    M = 4096 and 1.00-1.20x at 1024, the erf GELU costing most (H200, 2026-12-04,
    benchmarks/bench_linear_wgmma.py; the tuner then kept cuBLAS at every GEMM), nor the
    ping-pong kernel's (linear_pingpong.py: 1.07-1.4x cuBLASLt's kernel time at FFN1)."""
    shapes = [
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 256, 64, 8, 4),
        (64, 256, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 32, 64, 4, 5),
        (32, 64, 64, 4, 5),
    ]
    out = [LinearConfig(bm, bn, bk, 8, w, s) for bm, bn, bk, w, s in shapes]
    out += [
        LinearConfig(256, 128, 64, 8, 8, 4),
        LinearConfig(128, 128, 128, 8, 8, 3),
        # warp-specialised with 8 warps only: with 4, Triton 3.6's warp specialiser fails on
        # this kernel (tests/kernels/test_compile_for_hopper.py)
        LinearConfig(128, 256, 64, 8, 8, 3, True),
    ]
    if x is not None:
        out += split_k_configs(x.numel() // max(1, x.shape[-1]))
    return out


# The persistent TMA kernel's fastest config at each of BERT-base's GEMMs at M = 4096 in the
# sweep of bench_linear_tma.py (H200, 2026-12-03): QKV, O, FFN1 (erf GELU), FFN2, as
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, warp_specialize, flatten, split_epilogue).
# A 128x256 tile with flatten, no split and a residual needs 240 KiB of shared memory at 3
# stages, more than an SM has: such a config fails to compile, and a tuner would skip it.
_TMA = [
    (64, 256, 64, 4, 4, False, True, False),
    (256, 128, 64, 8, 3, False, True, True),
    (256, 128, 64, 8, 3, True, False, True),
    (128, 256, 64, 8, 3, False, False, False),
]


def tma_linear_configs() -> list[LinearConfig]:
    """Configs of the persistent TMA kernel (linear_tma.py), for its tests and benchmark."""
    return [
        LinearConfig(bm, bn, bk, 8, w, s, ws, True, fl, sp) for bm, bn, bk, w, s, ws, fl, sp in _TMA
    ]


def default_linear_config(M: int, N: int) -> LinearConfig:
    # big tiles when they still give every SM of an H100 work, smaller ones otherwise
    if cdiv(M, 256) * cdiv(N, 128) >= 132:
        return LinearConfig(256, 128, 64, 8, 8, 3)
    if cdiv(M, 128) * cdiv(N, 128) >= 132:
        return LinearConfig(128, 128, 64, 8, 8, 3)
    return LinearConfig(64, 64, 64, 8, 4, 4)


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: LinearConfig | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K], weight [N, K], bias [N], residual [..., N] -> [..., N]. `counters`: the
    split-K kernel's arrival counters (skinny_linear_fused.new_counters; None: zeros made
    by the call), left zeroed."""
    assert activation in ACTIVATIONS, activation
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != K or K % 8:
        raise ValueError(
            f"fused_linear takes x [..., K] and weight [N, K] with K a multiple of 8 (its "
            f"16-byte loads), got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    config = config or default_linear_config(M, N)
    if out is None:
        out = torch.empty((*lead, N), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, N)
    if config.split_k:
        skinny = SkinnyLinearFusedConfig(
            config.BLOCK_N, config.BLOCK_K, config.split_k, config.num_warps,
            config.num_stages, config.BLOCK_M,
        )  # fmt: skip
        res = residual.reshape(-1, N) if residual is not None else None
        skinny_linear_fused(
            x2, weight, bias, res, out=out2, counters=counters, config=skinny,
            activation=activation,
        )  # fmt: skip
        return out
    if config.pingpong:
        if residual is not None:
            raise ValueError("the ping-pong linear takes no residual")
        pingpong_linear(
            x2, weight, bias, activation, out2,
            block=(config.BLOCK_M, config.BLOCK_N, config.BLOCK_K), group_m=config.GROUP_M,
            num_stages=config.num_stages,
        )  # fmt: skip
        return out
    if config.wgmma or config.tma:  # the kernels that take descriptors (Hopper)
        res = residual.reshape(-1, N) if residual is not None else None
        modes = {} if config.wgmma else dict(
            warp_specialize=config.warp_specialize, flatten=config.flatten,
            split_epilogue=config.split_epilogue,
        )  # fmt: skip
        (wgmma_linear if config.wgmma else linear_tma)(
            x2, weight, bias, activation, res, out2,
            block=(config.BLOCK_M, config.BLOCK_N, config.BLOCK_K), group_m=config.GROUP_M,
            num_warps=config.num_warps, num_stages=config.num_stages, **modes,
        )  # fmt: skip
        return out
    res2 = residual.reshape(-1, N) if residual is not None else out2
    grid = (cdiv(M, config.BLOCK_M) * cdiv(N, config.BLOCK_N),)
    launch_kernel(
        _fused_linear_kernel,
        grid,
        x2,
        weight,
        bias if bias is not None else weight,
        res2,
        out2,
        M,
        N,
        K,
        *x2.stride(),
        *weight.stride(),
        *res2.stride(),
        *out2.stride(),
        BLOCK_M=config.BLOCK_M,
        BLOCK_N=config.BLOCK_N,
        BLOCK_K=config.BLOCK_K,
        GROUP_M=config.GROUP_M,
        ACTIVATION=activation,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        EVEN_K=K % config.BLOCK_K == 0,
        WARP_SPECIALIZE=config.warp_specialize,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


JIT_FUNCTIONS = (
    _fused_linear_kernel,
    _linear_tma_kernel,
    _wgmma_linear_kernel,
    _pingpong_linear_kernel,
    _skinny_fused_kernel,
)
CONFIG_TYPE = LinearConfig
