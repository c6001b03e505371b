"""Linear layer for a few rows, split over K and reduced inside the same launch:
out = x[M <= 16, K] @ W[N, K]^T + bias + residual — a decode step's O projection and MLP down
projection with the residual add, in one kernel.

kernl's skinny_linear splits K so that enough programs stream W, then pays a second launch to
add the fp32 partials. Here each program writes its fp32 partial tile, then bumps its N
block's arrival counter (after a barrier, with release semantics); the program that arrives
last (acquire) sums the SPLIT_K partials in a fixed order — bitwise reproducible, unlike fp32
atomics — adds bias and residual, stores the row block and resets the counter to zero. A
`counters` buffer allocated once therefore needs no memset before the next launch.

`out` may be `residual` itself (x += linear(h)): each element is read and written by the one
program that finishes its block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .jit import cdiv, jit, tl
from .launch import is_interpreted, launch_kernel
from .pdl import pdl_kwargs, pdl_release, pdl_start, prefetch_lines, prefetch_rows_l2

MAX_ROWS = 16
MAX_COUNTERS = 4096  # N blocks one `counters` buffer serves (N / BLOCK_N)
_SMS = 132  # H100/H200 SXM; only sizes the automatic split


@jit
def _skinny_fused_finish(
    acc,
    Bias,
    Residual,
    Out,
    offs_m,
    offs_n,
    m_mask,
    n_mask,
    stride_rm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    out_mask = m_mask[:, None] & n_mask[None, :]
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


@jit
def _skinny_fused_kernel(
    X,
    W,
    Bias,
    Residual,
    Out,
    Partial,
    Counters,
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
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
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
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    if PREFETCH > 0:  # weights never depend on the previous kernel: stream them while it drains
        prefetch_rows_l2(w_rows, n_mask, k_lo, k_hi, PREFETCH, W.dtype.element_ty)
    pdl_start(USE_PDL)  # every read below may depend on the previous kernel
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < k_hi
        x = tl.load(
            X + offs_m[:, None] * stride_xm + ks[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(w_rows + ks[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    pdl_release(USE_PDL)

    if SPLIT_K == 1:
        _skinny_fused_finish(
            acc,
            Bias,
            Residual,
            Out,
            offs_m,
            offs_n,
            m_mask,
            n_mask,
            stride_rm,
            stride_om,
            HAS_BIAS,
            HAS_RESIDUAL,
        )
    else:
        # only the M live rows of a partial tile move (a batch-1 step: 1/16 of the bytes)
        p_mask = m_mask[:, None] & n_mask[None, :]
        # Partial [SPLIT_K, 16, N] fp32: rows past M are neither written nor read
        p_tile = Partial + (split * 16 + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(p_tile, acc, mask=p_mask)
        # every thread's stores precede the (release) bump of this block's counter
        tl.debug_barrier()
        arrived = tl.atomic_add(Counters + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                tile = Partial + (s * 16 + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
                acc += tl.load(tile, mask=p_mask, other=0.0, cache_modifier=".cg")
            _skinny_fused_finish(
                acc,
                Bias,
                Residual,
                Out,
                offs_m,
                offs_n,
                m_mask,
                n_mask,
                stride_rm,
                stride_om,
                HAS_BIAS,
                HAS_RESIDUAL,
            )
            tl.store(Counters + pid_n, 0)  # ready for the next launch


def skinny_linear_fused_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


@dataclass(frozen=True)
class SkinnyLinearFusedConfig:
    BLOCK_N: int = 32
    BLOCK_K: int = 128
    split_k: int = 0  # 0: enough splits for about two programs per SM
    num_warps: int = 4
    num_stages: int = 4


def skinny_linear_fused_configs() -> list[SkinnyLinearFusedConfig]:
    return [
        SkinnyLinearFusedConfig(bn, bk, sk, w, s)
        for bn, bk, w, s in [
            (32, 128, 4, 4),
            (16, 256, 4, 3),
            (64, 128, 4, 4),
            (32, 256, 4, 3),
            (64, 64, 4, 5),
        ]
        for sk in (0, 1, 2, 4, 8)
    ]


def skinny_linear_fused_decode_configs() -> list[SkinnyLinearFusedConfig]:
    """The few the compiler times per decode batch and call site (QKV, up, O, down) on the
    model's own weights (compiler/tasks/causal_lm/decode_tiles.py); the last two, the best of
    the wide sweep at the Llama-1B shapes on an H200 (benchmarks/sweep_decode_configs.py: O,
    then down)."""
    return [
        SkinnyLinearFusedConfig(32, 128, 0, 4, 4),
        SkinnyLinearFusedConfig(16, 256, 0, 4, 3),
        SkinnyLinearFusedConfig(64, 128, 0, 4, 4),
        SkinnyLinearFusedConfig(32, 256, 4, 4, 3),
        SkinnyLinearFusedConfig(32, 128, 8, 4, 4),
        SkinnyLinearFusedConfig(64, 64, 4, 4, 5),
        SkinnyLinearFusedConfig(64, 64, 8, 2, 4),
        SkinnyLinearFusedConfig(64, 64, 0, 4, 5),
    ]


def new_counters(device: torch.device | str) -> torch.Tensor:
    """The split-K arrival counters: allocate once per stream (zeros), pass to every call; each
    launch leaves them zeroed. Shared with norm_linear (same contract)."""
    return torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)


def _auto_split(n_blocks: int, K: int, block_k: int) -> int:
    most = max(1, K // (2 * block_k))  # at least two K blocks per split
    return max(1, min(most, cdiv(2 * _SMS, n_blocks)))


def skinny_linear_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    config: SkinnyLinearFusedConfig | None = None,
    pdl: bool = False,
    prefetch: bool = False,
) -> torch.Tensor:
    """x [M <= 16, K] (unit stride along K), weight [N, K] (unit stride along K), bias [N],
    residual [M, N] -> [M, N] in x's dtype, one launch. counters: int32 zeros
    (`new_counters`), left zeroed; None allocates zeros (one more kernel). `out` may be
    `residual`. pdl: launch with
    programmatic dependent launch (kernels/launch.py; off under the interpreter); prefetch
    (with pdl): first pull this program's first weight lines toward L2, before waiting."""
    M, K = x.shape
    N = weight.shape[0]
    assert M <= MAX_ROWS and weight.shape == (N, K) and weight.stride(1) == 1
    assert x.stride(1) == 1
    config = config or SkinnyLinearFusedConfig()
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    assert out.shape == (M, N) and out.stride(1) == 1
    if residual is not None:
        assert residual.shape == (M, N) and residual.stride(1) == 1
    n_blocks = cdiv(N, config.BLOCK_N)
    split = config.split_k or _auto_split(n_blocks, K, config.BLOCK_K)
    k_chunk = cdiv(cdiv(K, split), config.BLOCK_K) * config.BLOCK_K
    split = cdiv(K, k_chunk)
    if split > 1:
        partial = torch.empty((split, MAX_ROWS, N), dtype=torch.float32, device=x.device)
        if counters is None:
            counters = torch.zeros(n_blocks, dtype=torch.int32, device=x.device)
        assert counters.dtype == torch.int32 and counters.numel() >= n_blocks
    else:
        partial = counters = out  # unused
    res = residual if residual is not None else out
    launch_kernel(
        _skinny_fused_kernel,
        (n_blocks, split),
        x,
        weight,
        bias if bias is not None else weight,
        res,
        out,
        partial,
        counters,
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
        PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_kwargs(pdl, is_interpreted(_skinny_fused_kernel), streaming=True),
        PREFETCH=prefetch_lines(pdl and prefetch, k_chunk, weight, _skinny_fused_kernel),
    )
    return out


JIT_FUNCTIONS = (_skinny_fused_kernel,)
CONFIG_TYPE = SkinnyLinearFusedConfig
