"""norm -> QKV projection -> rotary -> KV-cache write, one launch for a decode step's few rows:
`norm_linear` whose epilogue is `rope_cache_write`'s, so a layer's attention input costs one
kernel where it cost two (issue 15: each kernel of a decode step costs a few µs of launch,
ramp and tail beyond its bytes).

Rotary pairs element j of a head with element j + D/2, so a tile here covers half-columns of
the qkv row: BLOCK_N of the (H + 2 KV) * D / 2 pairs, the rows of both halves streamed side by
side as norm_linear streams a gated MLP's gate and up halves. The epilogue rotates q and k in
fp32 before their one rounding (the unfused pair rounds the projection first), writes q to
the attention's query buffer and k, v to the caches at the step's slot. The main loop, the
deferred RMSNorm scale and the split-K reduce are norm_linear's own (its jit helpers)."""

from __future__ import annotations

import torch

from .jit import cdiv, jit, tl
from .launch import is_interpreted, launch_kernel
from .norm_linear import (
    MAX_ROWS,
    NormLinearConfig,
    _norm_linear_loop,
    _norm_linear_scale,
    _split_k_gather,
    norm_linear_reference,
    split_k_plan,
)
from .pdl import pdl_kwargs, pdl_release, pdl_start, prefetch_lines, prefetch_rows_l2
from .rope_cache_write import RopeCacheTarget, rope_cache_store, rope_cache_write_reference


@jit
def _norm_linear_rope_kernel(
    X,
    NormW,
    NormB,
    W,
    Bias,
    Partial,
    SumSq,
    Counters,
    Pos,
    Cos,
    Sin,
    Slot,
    QOut,
    KCache,
    VCache,
    num_heads,
    num_kv_heads,
    slots,
    stride_pb,
    stride_cos,
    stride_sin,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    M,
    N,
    K,
    k_chunk,
    eps,
    stride_xm,
    stride_wn,
    HALF: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """norm -> QKV -> rotary -> cache write: a tile covers BLOCK_N half-columns of the qkv row
    (N of them: head c // HALF, element c % HALF), so a program holds both halves that rotate
    together: rows cols1 of W in acc, their partners HALF further in acc_u."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, 16)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    c_mask = offs_c < N
    cols1 = (offs_c // HALF) * (2 * HALF) + offs_c % HALF
    cols2 = cols1 + HALF
    k_lo = split * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    w_rows = W + cols1.to(tl.int64)[:, None] * stride_wn
    u_rows = W + cols2.to(tl.int64)[:, None] * stride_wn
    if PREFETCH > 0:
        prefetch_rows_l2(w_rows, c_mask, k_lo, k_hi, PREFETCH, W.dtype.element_ty)
        prefetch_rows_l2(u_rows, c_mask, k_lo, k_hi, PREFETCH, W.dtype.element_ty)
    pdl_start(USE_PDL)  # every read below may depend on the previous kernel
    acc, acc_u, ss = _norm_linear_loop(
        X,
        NormW,
        NormB,
        w_rows,
        u_rows,
        offs_m,
        m_mask,
        c_mask,
        k_lo,
        k_hi,
        K,
        eps,
        stride_xm,
        BLOCK_N,
        BLOCK_K,
        IS_RMS,
        HAS_NORM_BIAS,
        True,
        PRECISION,
    )
    pdl_release(USE_PDL)
    if SPLIT_K == 1:
        last = True
    else:
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
            cols1,
            cols2,
            m_mask,
            c_mask,
            2 * N,
            BLOCK_N,
            SPLIT_K,
            IS_RMS,
            True,
        )
    if last:
        acc, acc_u = _norm_linear_scale(
            acc, acc_u, ss, Bias, cols1, cols2, c_mask, K, eps, IS_RMS, HAS_BIAS, True
        )
        rope_cache_store(
            acc,
            acc_u,
            offs_m,
            offs_c,
            m_mask,
            c_mask,
            Pos,
            Cos,
            Sin,
            Slot,
            QOut,
            KCache,
            VCache,
            num_heads,
            num_kv_heads,
            slots,
            stride_pb,
            stride_cos,
            stride_sin,
            stride_qb,
            stride_qh,
            stride_qd,
            stride_kb,
            stride_kh,
            stride_kn,
            stride_kd,
            stride_vb,
            stride_vh,
            stride_vn,
            stride_vd,
            HALF,
            HAS_ROPE,
        )


def norm_linear_rope_reference(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: RopeCacheTarget,
    *,
    eps: float = 1e-6,
    norm: str = "rms",
) -> torch.Tensor:
    """The unfused sequence: norm_linear's reference, then rope_cache_write's (which writes the
    target's caches). Returns q [B, H, 1, D]."""
    qkv = norm_linear_reference(x, norm_weight, norm_bias, weight, bias, eps=eps, norm=norm)
    t = target
    return rope_cache_write_reference(
        qkv,
        t.positions,
        t.cos,
        t.sin,
        t.k_cache,
        t.v_cache,
        t.slot,
        num_heads=t.num_heads,
        num_kv_heads=t.num_kv_heads,
    )


def norm_linear_rope(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: RopeCacheTarget,
    *,
    eps: float,
    norm: str = "rms",
    counters: torch.Tensor | None = None,
    config: NormLinearConfig | None = None,
    pdl: bool = False,
    prefetch: bool = False,
) -> torch.Tensor:
    """norm(x) @ weight^T + bias, rotated and written as `target` says: x [M <= 16, K] (unit
    stride along K, one token per row), weight [(H + 2 KV) * D, K] the QKV projection (unit
    stride along K), norm "rms" or "layer". Writes target's caches at its slot and returns q
    [M, H, 1, D] (target.q_out when given). counters, config, pdl, prefetch: as norm_linear
    (config.BLOCK_N counts half-columns)."""
    M, K = x.shape
    F = weight.shape[0]
    assert M <= MAX_ROWS and weight.shape == (F, K) and weight.stride(1) == 1
    assert x.stride(1) == 1 and norm_weight.shape == (K,) and norm in ("rms", "layer")
    assert norm == "layer" or norm_bias is None, "RMSNorm with a bias: use norm + skinny_linear"
    D, q_out = target.checked(M, F, x.dtype)
    N = F // 2  # half-columns: a head's element j with its partner j + D / 2
    config = config or NormLinearConfig()
    n_blocks = cdiv(N, config.BLOCK_N)
    split, k_chunk, partial, sumsq, counters = split_k_plan(x, F, n_blocks, config, counters, x)
    launch_kernel(
        _norm_linear_rope_kernel,
        (n_blocks, split),
        x,
        norm_weight,
        norm_bias if norm_bias is not None else norm_weight,
        weight,
        bias if bias is not None else weight,
        partial,
        sumsq,
        counters,
        *target.launch_args(q_out),
        M,
        N,
        K,
        k_chunk,
        eps,
        x.stride(0),
        weight.stride(0),
        HALF=D // 2,
        BLOCK_N=config.BLOCK_N,
        BLOCK_K=config.BLOCK_K,
        SPLIT_K=split,
        IS_RMS=norm == "rms",
        HAS_NORM_BIAS=norm_bias is not None,
        HAS_BIAS=bias is not None,
        HAS_ROPE=target.cos is not None,
        PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_kwargs(pdl, is_interpreted(_norm_linear_rope_kernel), streaming=True),
        PREFETCH=prefetch_lines(pdl and prefetch, k_chunk, weight, _norm_linear_rope_kernel),
    )
    return q_out


JIT_FUNCTIONS = (_norm_linear_rope_kernel,)
CONFIG_TYPE = NormLinearConfig
