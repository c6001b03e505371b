"""Linear layer for a few rows (a decode step's batch): x [M, K] @ W[N, K]^T + bias + residual,
M <= 16, split over K.

With M this small the layer is a read of W and nothing else: the time is bytes / bandwidth,
provided enough programs stream W at once. A grid over N alone gives a 2048-wide layer 64
programs of 32 columns, half an H100; so K is split too (`SPLIT_K` programs per column
block), each writing an fp32 partial sum, and a second small kernel adds the partials, the
bias and the residual. With one split the first kernel finishes the job itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .jit import cdiv, jit, tl
from .launch import launch_kernel

MAX_ROWS = 16
_SMS = 132  # H100 SXM; only sizes the automatic split


@jit
def _skinny_partial_kernel(
    X,
    W,
    Bias,
    Residual,
    Out,
    Partial,
    M,
    N,
    K,
    k_chunk,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_om,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, 16)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_lo = split * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < k_hi
        x = tl.load(
            X + offs_m[:, None] * stride_xm + ks[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            W + offs_n.to(tl.int64)[:, None] * stride_wn + ks[None, :],
            mask=n_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(x, tl.trans(w), acc)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_RESIDUAL:
            acc += tl.load(
                Residual + offs_m[:, None] * stride_rm + offs_n[None, :], mask=out_mask, other=0.0
            ).to(tl.float32)
        tl.store(
            Out + offs_m[:, None] * stride_om + offs_n[None, :],
            acc.to(Out.dtype.element_ty),
            mask=out_mask,
        )
    else:
        tl.store(Partial + (split * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=out_mask)


@jit
def _skinny_reduce_kernel(
    Partial,
    Bias,
    Residual,
    Out,
    M,
    N,
    stride_rm,
    stride_om,
    BLOCK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    m = offs // N
    n = offs % N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(Partial + s * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(Bias + n, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        acc += tl.load(Residual + m * stride_rm + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + m * stride_om + n, acc.to(Out.dtype.element_ty), mask=mask)


def skinny_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


@dataclass(frozen=True)
class SkinnyLinearConfig:
    BLOCK_N: int = 32
    BLOCK_K: int = 128
    split_k: int = 0  # 0: enough splits for about two programs per SM
    num_warps: int = 4
    num_stages: int = 4


def skinny_linear_configs() -> list[SkinnyLinearConfig]:
    return [
        SkinnyLinearConfig(bn, bk, sk, w, s)
        for bn, bk, w, s in [
            (32, 128, 4, 4),
            (64, 128, 4, 4),
            (32, 256, 4, 3),
            (64, 64, 4, 5),
            (128, 64, 8, 4),
        ]
        for sk in (0, 1, 4)
    ]


def _auto_split(n_blocks: int, K: int, block_k: int) -> int:
    most = max(1, K // (2 * block_k))  # at least two K blocks per split
    return max(1, min(most, cdiv(2 * _SMS, n_blocks)))


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: SkinnyLinearConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= 16, unit stride along K), weight [N, K] contiguous, bias [N],
    residual [M, N] -> [M, N]."""
    M, K = x.shape
    N = weight.shape[0]
    assert M <= MAX_ROWS and weight.shape == (N, K) and weight.stride(1) == 1
    assert x.stride(1) == 1 and K % 8 == 0
    config = config or SkinnyLinearConfig()
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    n_blocks = cdiv(N, config.BLOCK_N)
    split = config.split_k or _auto_split(n_blocks, K, config.BLOCK_K)
    k_chunk = cdiv(cdiv(K, split), config.BLOCK_K) * config.BLOCK_K
    split = cdiv(K, k_chunk)
    partial = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else out
    if residual is not None:
        assert residual.shape == (M, N) and residual.stride(1) == 1
    res = residual if residual is not None else out
    b = bias if bias is not None else weight
    launch_kernel(
        _skinny_partial_kernel,
        (n_blocks, split),
        x,
        weight,
        b,
        res,
        out,
        partial,
        M,
        N,
        K,
        k_chunk,
        x.stride(0),
        weight.stride(0),
        res.stride(0),
        out.stride(0),
        BLOCK_N=config.BLOCK_N,
        BLOCK_K=config.BLOCK_K,
        SPLIT_K=split,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if split > 1:
        block = 256
        launch_kernel(
            _skinny_reduce_kernel,
            (cdiv(M * N, block),),
            partial,
            b,
            res,
            out,
            M,
            N,
            res.stride(0),
            out.stride(0),
            BLOCK=block,
            SPLIT_K=split,
            HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None,
            num_warps=4,
        )
    return out


JIT_FUNCTIONS = (_skinny_partial_kernel, _skinny_reduce_kernel)
CONFIG_TYPE = SkinnyLinearConfig
