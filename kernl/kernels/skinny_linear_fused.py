"""Linear layer for a few rows, split over K and reduced inside the same launch:
out = activation(x[M, K] @ W[N, K]^T + bias) + residual — a decode step's O projection and MLP
down projection with the residual add, in one kernel; and an encoder's linears where a call
has few tokens (BLOCK_M rows a program, M up to a few row blocks: a batch-1 query), where
cuBLAS's small-M GEMMs take a few µs each and its split-K ones a second launch to reduce.

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

from .activation import ACTIVATIONS, _activation, apply_activation
from .jit import cdiv, jit, tl
from .launch import is_interpreted, launch_kernel
from .pdl import pdl_kwargs, pdl_release, pdl_start, prefetch_lines, prefetch_rows_l2

MAX_ROWS = 16  # a decode step's rows; an encoder's call may have more (BLOCK_M a program)
MAX_COUNTERS = 4096  # output blocks one `counters` buffer serves (M / BLOCK_M x N / BLOCK_N)
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
    ACTIVATION: tl.constexpr,
):
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, ACTIVATION)
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
    BLOCK_M: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
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
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
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
            ACTIVATION,
        )
    else:
        # only the M live rows of a partial tile move (a batch-1 step: 1/16 of the bytes)
        p_mask = m_mask[:, None] & n_mask[None, :]
        # Partial [SPLIT_K, row blocks x BLOCK_M, N] fp32: rows past M are neither written
        # nor read
        rows = tl.num_programs(2) * BLOCK_M
        p_tile = Partial + (split * rows + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(p_tile, acc, mask=p_mask)
        # every thread's stores precede the (release) bump of this block's counter
        tl.debug_barrier()
        counter = Counters + pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                tile = Partial + (s * rows + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
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
                ACTIVATION,
            )
            tl.store(counter, 0)  # ready for the next launch


def skinny_linear_fused_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str = "none",
) -> torch.Tensor:
    y = apply_activation(F.linear(x, weight, bias), activation)
    return y if residual is None else y + residual


@dataclass(frozen=True)
class SkinnyLinearFusedConfig:
    BLOCK_N: int = 32
    BLOCK_K: int = 128
    split_k: int = 0  # 0: enough splits for about two programs per SM
    num_warps: int = 4
    num_stages: int = 4
    BLOCK_M: int = 16  # rows a program (a decode step's few rows: one block)


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
    activation: str = "none",
) -> torch.Tensor:
    """x [M, K] (unit stride along K; a decode step's <= 16 rows are one block of the default
    BLOCK_M), weight [N, K] (unit stride along K), bias [N], residual [M, N] -> activation(x @
    weight^T + bias) + residual, [M, N] in x's dtype, one launch. counters: int32 zeros
    (`new_counters`), one per output block (M / BLOCK_M x N / BLOCK_N), left zeroed; None
    allocates zeros (one more kernel). `out` may be `residual`. pdl: launch with
    programmatic dependent launch (kernels/launch.py; off under the interpreter); prefetch
    (with pdl): first pull this program's first weight lines toward L2, before waiting."""
    M, K = x.shape
    N = weight.shape[0]
    config = config or SkinnyLinearFusedConfig()
    if weight.shape != (N, K) or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"x {list(x.shape)} and weight {list(weight.shape)}: unit K strides")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}")
    if config.BLOCK_M < 16 or config.BLOCK_M & (config.BLOCK_M - 1):
        raise ValueError(f"BLOCK_M {config.BLOCK_M}: a power of two from 16")
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if out.shape != (M, N) or out.stride(1) != 1:
        raise ValueError(f"out {list(out.shape)} for a [{M}, {N}] result")
    if residual is not None and (residual.shape != (M, N) or residual.stride(1) != 1):
        raise ValueError(f"residual {list(residual.shape)} for a [{M}, {N}] result")
    n_blocks = cdiv(N, config.BLOCK_N)
    m_blocks = cdiv(M, config.BLOCK_M)
    split = config.split_k or _auto_split(n_blocks * m_blocks, K, config.BLOCK_K)
    k_chunk = cdiv(cdiv(K, split), config.BLOCK_K) * config.BLOCK_K
    split = cdiv(K, k_chunk)
    if split > 1:
        rows = m_blocks * config.BLOCK_M
        partial = torch.empty((split, rows, N), dtype=torch.float32, device=x.device)
        if counters is None:
            counters = torch.zeros(n_blocks * m_blocks, dtype=torch.int32, device=x.device)
        # the kernel bumps counters[m block x n_blocks + n block]: never past the buffer
        if counters.dtype != torch.int32 or counters.numel() < n_blocks * m_blocks:
            raise ValueError(
                f"counters: {counters.numel()} {counters.dtype} for {n_blocks * m_blocks} "
                "output blocks (int32 zeros, new_counters)"
            )
    else:
        partial = counters = out  # unused
    res = residual if residual is not None else out
    launch_kernel(
        _skinny_fused_kernel,
        (n_blocks, split, m_blocks),
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
        BLOCK_M=config.BLOCK_M,
        ACTIVATION=activation,
    )
    return out


JIT_FUNCTIONS = (_skinny_fused_kernel,)
CONFIG_TYPE = SkinnyLinearFusedConfig
