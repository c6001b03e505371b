"""RMSNorm or LayerNorm folded into a linear layer for a few rows (a decode step's batch):
norm(x)[M <= 16, K] @ W[N, K]^T (+ bias), optionally with the gated MLP's silu(gate) * up in
the epilogue (W = [gate; up], the decoder's `gate_up` weight, rows [0, I) gate and [I, 2I) up).

One launch replaces norm -> linear (-> SiLU -> multiply): the normalised rows never reach
memory, and there is no separate reduce kernel.

RMSNorm is a per-row scale, so it commutes with the matmul: each program multiplies its chunk
of x by the norm weight g, accumulates (x * g) @ W^T and, from the x it already loaded, the
chunk's sum of squares; rsqrt(mean(x^2) + eps) scales the finished row in the epilogue.
(x * g is rounded to the weight dtype for the tensor cores, one rounding where the unfused
norm rounds twice. In fp16 it can pass 65504 where x does not, a large activation times a gain
above 1, so the decoders fold no RMSNorm in fp16: decoder.rms_fold_overflows.) No
program reads x beyond the K chunk its matmul needs, and no statistics pass delays the weight
stream. LayerNorm's centring does not commute without cancellation (mean * sum(g W) against
sum(x g W)), so for it every program first takes exact two-pass statistics of its <= 16 rows
(x is a few KB and sits in L2; LayerNorm models are the small ones).

The grid is (N blocks, K splits). With several splits each program writes an fp32 partial
tile, then bumps its N block's counter; the program that arrives last sums the partials in
a fixed order (deterministic, unlike fp32 atomics), runs the epilogue and resets the counter
to zero, so a `counters` buffer allocated once stays ready for the next launch without a
memset kernel."""

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
def _norm_linear_scale(
    acc, acc_u, ss, Bias, cols1, cols2, n_mask, K, eps, IS_RMS, HAS_BIAS, PAIRED
):
    """The finished rows: RMSNorm's deferred 1 / rms, then the bias (at both column sets of a
    paired tile)."""
    if IS_RMS:
        rstd = 1.0 / tl.sqrt(ss / K + eps)
        acc = acc * rstd[:, None]
        if PAIRED:
            acc_u = acc_u * rstd[:, None]
    if HAS_BIAS:
        acc += tl.load(Bias + cols1, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if PAIRED:
            acc_u += tl.load(Bias + cols2, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return acc, acc_u


@jit
def _norm_linear_finish(
    acc,
    acc_u,
    ss,
    Bias,
    Out,
    offs_m,
    offs_n,
    m_mask,
    n_mask,
    N,
    K,
    eps,
    stride_om,
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
):
    acc, acc_u = _norm_linear_scale(
        acc, acc_u, ss, Bias, offs_n, offs_n + N, n_mask, K, eps, IS_RMS, HAS_BIAS, GATED
    )
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_u
    tl.store(
        Out + offs_m[:, None] * stride_om + offs_n[None, :],
        acc.to(Out.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@jit
def _norm_linear_loop(
    X,
    NormW,
    NormB,
    w_rows,
    u_rows,
    offs_m,
    m_mask,
    n_mask,
    k_lo,
    k_hi,
    K,
    eps,
    stride_xm,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    PAIRED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc = norm(x)[:, k_lo:k_hi] @ W[w_rows]^T (and acc_u over u_rows for a paired tile);
    ss, x's sum of squares over the same K chunk (RMSNorm's scale comes later)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = X + offs_m[:, None] * stride_xm
    mean = tl.zeros([16], dtype=tl.float32)
    rstd = tl.zeros([16], dtype=tl.float32)
    if not IS_RMS:
        # exact two-pass statistics over the whole row: x is tiny and L2-resident
        row_sum = tl.zeros([16], dtype=tl.float32)  # (not `s`: the split loop below uses it)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            x = tl.load(x_rows + ks[None, :], mask=m_mask[:, None] & (ks < K)[None, :], other=0.0)
            row_sum += tl.sum(x.to(tl.float32), 1)
        mean = row_sum / K
        v = tl.zeros([16], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            mask = m_mask[:, None] & (ks < K)[None, :]
            x = tl.load(x_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean[:, None], 0.0)
            v += tl.sum(xc * xc, 1)
        rstd = 1.0 / tl.sqrt(v / K + eps)

    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    ss = tl.zeros([16], dtype=tl.float32)
    # The norm weight is a [BLOCK_K] vector too narrow per thread for an async copy, so the
    # pipeliner leaves its load synchronous: it is loaded one iteration ahead instead, its
    # latency hidden behind the iteration that does not need it yet.
    g_next = tl.load(NormW + k_lo + offs_k, mask=k_lo + offs_k < k_hi, other=0.0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < k_hi
        g = g_next.to(tl.float32)
        g_next = tl.load(NormW + BLOCK_K + ks, mask=BLOCK_K + ks < k_hi, other=0.0)
        x = tl.load(x_rows + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        x = x.to(tl.float32)
        if IS_RMS:
            ss += tl.sum(x * x, 1)
            h = x * g[None, :]
        else:
            h = (x - mean[:, None]) * rstd[:, None] * g[None, :]
            if HAS_NORM_BIAS:
                h += tl.load(NormB + ks, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        h = h.to(w_rows.dtype.element_ty)
        w_mask = n_mask[:, None] & k_mask[None, :]
        w = tl.load(w_rows + ks[None, :], mask=w_mask, other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
        if PAIRED:
            wu = tl.load(u_rows + ks[None, :], mask=w_mask, other=0.0)
            acc_u = tl.dot(h, tl.trans(wu), acc_u, input_precision=PRECISION)
    return acc, acc_u, ss


@jit
def _split_k_gather(
    acc,
    acc_u,
    ss,
    Partial,
    SumSq,
    Counters,
    pid_n,
    split,
    offs_m,
    cols1,
    cols2,
    m_mask,
    n_mask,
    n_w,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    IS_RMS: tl.constexpr,
    PAIRED: tl.constexpr,
):
    """Store this split's partial tiles (only the M live rows: a batch-1 step moves 1/16 of
    the bytes) and count its arrival; the program that arrives last gets the tiles summed over
    every split, in a fixed order, and resets the counter. Returns (last, acc, acc_u, ss).
    Partial [SPLIT_K, 16, n_w] holds a tile at cols1 (and cols2), SumSq [blocks, SPLIT_K, 16]."""
    p_mask = m_mask[:, None] & n_mask[None, :]
    p_rows = (split * 16 + offs_m[:, None]).to(tl.int64) * n_w
    tl.store(Partial + p_rows + cols1[None, :], acc, mask=p_mask)
    if PAIRED:
        tl.store(Partial + p_rows + cols2[None, :], acc_u, mask=p_mask)
    if IS_RMS:
        tl.store(SumSq + (pid_n * SPLIT_K + split) * 16 + offs_m, ss)
    # every thread's stores precede the (release) bump of this block's counter
    tl.debug_barrier()
    arrived = tl.atomic_add(Counters + pid_n, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    if last:
        acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        ss = tl.zeros([16], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            rows = (s * 16 + offs_m[:, None]).to(tl.int64) * n_w
            acc += tl.load(
                Partial + rows + cols1[None, :], mask=p_mask, other=0.0, cache_modifier=".cg"
            )
            if PAIRED:
                acc_u += tl.load(
                    Partial + rows + cols2[None, :], mask=p_mask, other=0.0, cache_modifier=".cg"
                )
            if IS_RMS:
                ss += tl.load(SumSq + (pid_n * SPLIT_K + s) * 16 + offs_m, cache_modifier=".cg")
        tl.store(Counters + pid_n, 0)  # ready for the next launch
    return last, acc, acc_u, ss


@jit
def _norm_linear_kernel(
    X,
    NormW,
    NormB,
    W,
    Bias,
    Out,
    Partial,
    SumSq,
    Counters,
    M,
    N,
    K,
    k_chunk,
    eps,
    stride_xm,
    stride_wn,
    stride_om,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, 16)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_lo = split * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    u_rows = W + (offs_n + N).to(tl.int64)[:, None] * stride_wn  # up half (GATED only)
    if PREFETCH > 0:  # weights never depend on the previous kernel: stream them while it drains
        prefetch_rows_l2(w_rows, n_mask, k_lo, k_hi, PREFETCH, W.dtype.element_ty)
        if GATED:
            prefetch_rows_l2(u_rows, n_mask, k_lo, k_hi, PREFETCH, W.dtype.element_ty)
    pdl_start(USE_PDL)  # every read below may depend on the previous kernel
    acc, acc_u, ss = _norm_linear_loop(
        X,
        NormW,
        NormB,
        w_rows,
        u_rows,
        offs_m,
        m_mask,
        n_mask,
        k_lo,
        k_hi,
        K,
        eps,
        stride_xm,
        BLOCK_N,
        BLOCK_K,
        IS_RMS,
        HAS_NORM_BIAS,
        GATED,
        PRECISION,
    )
    pdl_release(USE_PDL)
    if SPLIT_K == 1:
        last = True
    else:
        n_w = 2 * N if GATED else N  # gate then up
        last, acc, acc_u, ss = _split_k_gather(
            acc,
            acc_u,
            ss,
            Partial,
            SumSq,
            Counters,
            pid_n,
            split,
            offs_m,
            offs_n,
            offs_n + N,
            m_mask,
            n_mask,
            n_w,
            BLOCK_N,
            SPLIT_K,
            IS_RMS,
            GATED,
        )
    if last:
        _norm_linear_finish(
            acc,
            acc_u,
            ss,
            Bias,
            Out,
            offs_m,
            offs_n,
            m_mask,
            n_mask,
            N,
            K,
            eps,
            stride_om,
            IS_RMS,
            HAS_BIAS,
            GATED,
        )


def norm_linear_reference(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    norm: str = "rms",
    gated: bool = False,
) -> torch.Tensor:
    """The unfused sequence: norm (as kernl's decoder runs it), linear, and for `gated`
    silu(gate) * up over the two halves of the output."""
    K = x.shape[-1]
    if norm == "rms":
        h = F.rms_norm(x, (K,), norm_weight, eps)
    else:
        h = F.layer_norm(x, (K,), norm_weight, norm_bias, eps)
    y = F.linear(h, weight, bias)
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y


@dataclass(frozen=True)
class NormLinearConfig:
    BLOCK_N: int = 32
    BLOCK_K: int = 128
    split_k: int = 0  # 0: enough splits for about two programs per SM
    num_warps: int = 4
    num_stages: int = 4


def norm_linear_configs() -> list[NormLinearConfig]:
    return [
        NormLinearConfig(bn, bk, sk, w, s)
        for bn, bk, w, s in [
            (32, 128, 4, 4),
            (16, 256, 4, 3),
            (64, 128, 4, 4),
            (32, 256, 4, 3),
            (64, 64, 4, 5),
        ]
        for sk in (0, 1, 2, 4)
    ]


def norm_linear_decode_configs() -> list[NormLinearConfig]:
    """The few the compiler times per decode batch and call site (QKV, MLP up) on the model's
    own weights (compiler/tasks/causal_lm/decode_tiles.py): today's default first, then wider
    or narrower weight tiles, fewer warps, no split; last, the best of the wide sweep at the
    Llama-1B shapes on an H200 (benchmarks/sweep_decode_configs.py: QKV, then gate/up)."""
    return [
        NormLinearConfig(32, 128, 0, 4, 4),
        NormLinearConfig(16, 256, 0, 4, 3),
        NormLinearConfig(64, 128, 0, 4, 4),
        NormLinearConfig(32, 256, 0, 2, 3),
        NormLinearConfig(16, 128, 0, 2, 4),
        NormLinearConfig(64, 128, 1, 4, 4),
        NormLinearConfig(64, 64, 0, 4, 5),
        NormLinearConfig(64, 64, 2, 4, 5),
    ]


def new_counters(device: torch.device | str) -> torch.Tensor:
    """The split-K arrival counters: allocate once per stream (zeros), pass to every call; each
    launch leaves them zeroed. Shared with skinny_linear_fused (same contract)."""
    return torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)


def _auto_split(n_blocks: int, K: int, block_k: int) -> int:
    most = max(1, K // (2 * block_k))  # at least two K blocks per split
    return max(1, min(most, cdiv(2 * _SMS, n_blocks)))


def split_k_plan(
    x: torch.Tensor,
    n_w: int,
    n_blocks: int,
    config: NormLinearConfig,
    counters: torch.Tensor | None,
    unused: torch.Tensor,
) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(split, k_chunk, Partial, SumSq, Counters) of a launch over n_blocks tiles of x's K: the
    split the config asks for (0: automatic), each chunk whole K blocks; with one split the
    buffers are `unused` (never read)."""
    K = x.shape[1]
    split = config.split_k or _auto_split(n_blocks, K, config.BLOCK_K)
    k_chunk = cdiv(cdiv(K, split), config.BLOCK_K) * config.BLOCK_K
    split = cdiv(K, k_chunk)
    if split == 1:
        return split, k_chunk, unused, unused, unused
    partial = torch.empty((split, MAX_ROWS, n_w), dtype=torch.float32, device=x.device)
    sumsq = torch.empty((n_blocks, split, MAX_ROWS), dtype=torch.float32, device=x.device)
    if counters is None:
        counters = torch.zeros(n_blocks, dtype=torch.int32, device=x.device)
    assert counters.dtype == torch.int32 and counters.numel() >= n_blocks
    return split, k_chunk, partial, sumsq, counters


def norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    eps: float,
    norm: str = "rms",
    gated: bool = False,
    out: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    config: NormLinearConfig | None = None,
    pdl: bool = False,
    prefetch: bool = False,
) -> torch.Tensor:
    """norm(x) @ weight^T + bias for x [M <= 16, K] (unit stride along K), weight [N_w, K]
    (unit stride along K), norm "rms" or "layer" with weight (and bias) [K].
    gated: weight is [gate; up] (N_w = 2I) and the result is silu(gate) * up, [M, I].
    counters: int32 zeros (`new_counters`), left zeroed; None allocates zeros (one more
    kernel). Returns [M, N_w] or [M, I] in x's dtype. pdl: launch with
    programmatic dependent launch (kernels/launch.py; off under the interpreter); prefetch
    (with pdl): first pull this program's first weight lines toward L2, before waiting."""
    M, K = x.shape
    n_w = weight.shape[0]
    assert M <= MAX_ROWS and weight.shape == (n_w, K) and weight.stride(1) == 1
    assert x.stride(1) == 1 and norm_weight.shape == (K,) and norm in ("rms", "layer")
    assert not gated or n_w % 2 == 0
    # RMSNorm's scale is deferred to the epilogue, which a norm bias would not survive
    assert norm == "layer" or norm_bias is None, "RMSNorm with a bias: use norm + skinny_linear"
    N = n_w // 2 if gated else n_w
    config = config or NormLinearConfig()
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    assert out.shape == (M, N) and out.stride(1) == 1
    n_blocks = cdiv(N, config.BLOCK_N)
    split, k_chunk, partial, sumsq, counters = split_k_plan(x, n_w, n_blocks, config, counters, out)
    launch_kernel(
        _norm_linear_kernel,
        (n_blocks, split),
        x,
        norm_weight,
        norm_bias if norm_bias is not None else norm_weight,
        weight,
        bias if bias is not None else weight,
        out,
        partial,
        sumsq,
        counters,
        M,
        N,
        K,
        k_chunk,
        eps,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        BLOCK_N=config.BLOCK_N,
        BLOCK_K=config.BLOCK_K,
        SPLIT_K=split,
        IS_RMS=norm == "rms",
        HAS_NORM_BIAS=norm_bias is not None,
        HAS_BIAS=bias is not None,
        GATED=gated,
        PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_kwargs(pdl, is_interpreted(_norm_linear_kernel), streaming=True),
        PREFETCH=prefetch_lines(pdl and prefetch, k_chunk, weight, _norm_linear_kernel),
    )
    return out


JIT_FUNCTIONS = (_norm_linear_kernel,)
CONFIG_TYPE = NormLinearConfig
