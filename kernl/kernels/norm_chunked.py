"""(Residual add +) LayerNorm or RMSNorm over rows whose width is not a power of two, the row
held in two to four column chunks of a power-of-two width.

Why: norm.py's kernel holds a row in one power-of-two block, so BERT-base's 768-wide rows sit
in 1024-wide tiles and a quarter of its threads load nothing. At 32x128 its 24 norms took
5.4 µs each (H200, 2026-12-03), ~3.5 TB/s for rows the GEMM before had just left in L2. Here
a 768-wide row is three 256-wide chunks (384: three of 128), every thread loads real data,
and the statistics are summed over the chunks in fp32, as one pass in registers: the input is
still read once and the output written once. Same semantics as norm.py (`_norm` calls this
for a config with `chunk` set); the references are norm.py's."""

from __future__ import annotations

import torch

from .jit import cdiv, jit, tl
from .launch import launch_kernel

MAX_CHUNKS = 4


@jit
def _load(X, Residual, rows, cols, N, stride_xm, stride_rm, row_mask, HAS_RESIDUAL: tl.constexpr):
    mask = row_mask[:, None] & (cols[None, :] < N)
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(Residual + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
        x += r.to(tl.float32)
    return x


@jit
def _centred_sq(x, mean, cols, N, IS_RMS: tl.constexpr):
    # the chunk centred (LayerNorm; padding columns zero) and its squares' row sums
    if IS_RMS:
        return x, tl.sum(x * x, 1)
    xc = tl.where(cols[None, :] < N, x - mean[:, None], 0.0)
    return xc, tl.sum(xc * xc, 1)


@jit
def _store(xc, rstd, Weight, Bias, Out, SumOut, x, rows, cols, N, stride_om, stride_sm, row_mask,
           HAS_BIAS: tl.constexpr, STORE_SUM: tl.constexpr):  # fmt: skip
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    w = tl.load(Weight + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + rows[:, None] * stride_om + cols[None, :], y.to(Out.dtype.element_ty), mask=mask)
    if STORE_SUM:
        s_ptrs = SumOut + rows[:, None] * stride_sm + cols[None, :]
        tl.store(s_ptrs, x.to(SumOut.dtype.element_ty), mask=mask)


@jit
def _norm_chunked_kernel(X, Residual, Weight, Bias, Out, SumOut, M, N, eps, stride_xm,
                         stride_rm, stride_om, stride_sm, BLOCK_M: tl.constexpr,
                         CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, IS_RMS: tl.constexpr,
                         HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                         STORE_SUM: tl.constexpr):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < M
    c0 = tl.arange(0, CHUNK)
    c1 = c0 + CHUNK
    c2 = c1 + CHUNK
    c3 = c2 + CHUNK
    # every chunk's loads are issued before the first reduction waits on them
    x0 = _load(X, Residual, rows, c0, N, stride_xm, stride_rm, row_mask, HAS_RESIDUAL)
    x1 = _load(X, Residual, rows, c1, N, stride_xm, stride_rm, row_mask, HAS_RESIDUAL)
    total = tl.sum(x0, 1) + tl.sum(x1, 1)
    if NUM_CHUNKS > 2:
        x2 = _load(X, Residual, rows, c2, N, stride_xm, stride_rm, row_mask, HAS_RESIDUAL)
        total += tl.sum(x2, 1)
    if NUM_CHUNKS > 3:
        x3 = _load(X, Residual, rows, c3, N, stride_xm, stride_rm, row_mask, HAS_RESIDUAL)
        total += tl.sum(x3, 1)
    mean = total / N
    # centre before squaring (two-pass in registers): no cancellation for large means
    xc0, sq = _centred_sq(x0, mean, c0, N, IS_RMS)
    xc1, sq1 = _centred_sq(x1, mean, c1, N, IS_RMS)
    sq += sq1
    if NUM_CHUNKS > 2:
        xc2, sq2 = _centred_sq(x2, mean, c2, N, IS_RMS)
        sq += sq2
    if NUM_CHUNKS > 3:
        xc3, sq3 = _centred_sq(x3, mean, c3, N, IS_RMS)
        sq += sq3
    rstd = 1.0 / tl.sqrt(sq / N + eps)
    _store(xc0, rstd, Weight, Bias, Out, SumOut, x0, rows, c0, N, stride_om, stride_sm, row_mask,
           HAS_BIAS, STORE_SUM)  # fmt: skip
    _store(xc1, rstd, Weight, Bias, Out, SumOut, x1, rows, c1, N, stride_om, stride_sm, row_mask,
           HAS_BIAS, STORE_SUM)  # fmt: skip
    if NUM_CHUNKS > 2:
        _store(xc2, rstd, Weight, Bias, Out, SumOut, x2, rows, c2, N, stride_om, stride_sm,
               row_mask, HAS_BIAS, STORE_SUM)  # fmt: skip
    if NUM_CHUNKS > 3:
        _store(xc3, rstd, Weight, Bias, Out, SumOut, x3, rows, c3, N, stride_om, stride_sm,
               row_mask, HAS_BIAS, STORE_SUM)  # fmt: skip


def chunk_width(N: int) -> int:
    """The power-of-two chunk that holds a row of N in two to four chunks, or 0 where N is a
    power of two (norm.py's one block wastes nothing) or too small to split."""
    if N & (N - 1) == 0 or N < 64:
        return 0
    return 1 << (cdiv(N, MAX_CHUNKS) - 1).bit_length()


def norm_chunked(
    x2: torch.Tensor,
    r2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out2: torch.Tensor,
    s2: torch.Tensor,
    eps: float,
    *,
    chunk: int,
    block_m: int,
    num_warps: int,
    is_rms: bool,
    has_residual: bool,
    store_sum: bool,
) -> None:
    """Launches over [M, N] rows (norm.py's `_norm` prepared them); `chunk` a power of two
    with N in 2 to 4 chunks of it."""
    M, N = x2.shape
    chunks = cdiv(N, chunk)
    if chunk & (chunk - 1) or not 2 <= chunks <= MAX_CHUNKS:
        raise ValueError(f"a row of {N} is not 2 to {MAX_CHUNKS} chunks of {chunk}")
    launch_kernel(
        _norm_chunked_kernel,
        (cdiv(M, block_m),),
        x2,
        r2,
        weight,
        bias if bias is not None else weight,
        out2,
        s2,
        M,
        N,
        eps,
        x2.stride(0),
        r2.stride(0),
        out2.stride(0),
        s2.stride(0),
        BLOCK_M=block_m,
        CHUNK=chunk,
        NUM_CHUNKS=chunks,
        IS_RMS=is_rms,
        HAS_RESIDUAL=has_residual,
        HAS_BIAS=bias is not None,
        STORE_SUM=store_sum,
        num_warps=num_warps,
    )


JIT_FUNCTIONS = (_norm_chunked_kernel,)
