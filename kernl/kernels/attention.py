"""Fused attention forward, FlashAttention-2 style: softmax(q k^T * scale + bias) v.

Scores are never materialised: each program owns BLOCK_M query rows of one (batch, head) and
streams the keys in BLOCK_N blocks with an online softmax in base 2 (scale * log2(e) folded
into one multiply). Features: key padding through per-row valid lengths (`kv_lens`) or a
boolean mask, causal masking aligned bottom-right (query i sees key j <= i + kv_len - Lq, as
in prefill / decode over a KV cache), an additive bias broadcastable to [B, H, Lq, Lk]
(stride 0 on broadcast dims; a bias shared by every query row, as a padding mask, is read
once per key block), GQA/MQA (kv heads divide q heads), head dims up to 128 with
non-power-of-two dims padded and masked. Tensors are [B, H, L, D] with any strides, so the
q/k/v views of a fused QKV projection go in without copies. Rows with no visible key output
zeros. Blocks entirely past `kv_len` or the causal diagonal are never loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention_bias import log2_bias
from .attention_short import _short_attention_kernel, short_attention
from .attention_tma import _tma_attention_kernel, attention_tma_refusal, tma_attention
from .attention_wgmma import _wgmma_attention_kernel, wgmma_attention, wgmma_attention_refusal
from .jit import cdiv, jit, next_power_of_2, tl
from .launch import launch_kernel

_LOG2E = 1.4426950408889634


@jit
def _attention_inner(
    acc,
    l_i,
    m_i,
    q,
    K_block,
    V_block,
    Bias_block,
    start_n_lo,
    end_n,
    offs_m,
    offs_n,
    offs_d,
    kv_len,
    causal_offset,
    window,
    qk_scale,
    stride_kn,
    stride_vn,
    stride_biasn,
    row_mask,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_PER_KEY: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    d_mask = offs_d < HEAD_DIM
    for start_n in tl.range(start_n_lo, end_n, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        cols = start_n + offs_n
        # only the tail / diagonal blocks pay for bounds and causal masks
        if MASKED:
            kv_mask = d_mask[:, None] & (cols[None, :] < kv_len)
            k = tl.load(K_block + cols[None, :] * stride_kn, mask=kv_mask, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(K_block + cols[None, :] * stride_kn, mask=d_mask[:, None], other=0.0)
        else:
            k = tl.load(K_block + cols[None, :] * stride_kn)
        qk = tl.dot(q, k)
        if BIAS_PER_KEY:
            # one bias row for every query row (a padding mask [B, 1, 1, Lk]): a [BLOCK_N]
            # load, where the 2-D tile below costs BLOCK_M times the loads of the same values
            if MASKED:
                bias = tl.load(Bias_block + cols * stride_biasn, mask=cols < kv_len, other=0.0)
            else:
                bias = tl.load(Bias_block + cols * stride_biasn)
            qk = qk * qk_scale + log2_bias(bias)[None, :]
        elif HAS_BIAS:
            b_mask = row_mask[:, None]
            if MASKED:
                b_mask = b_mask & (cols[None, :] < kv_len)
            bias = tl.load(Bias_block + cols[None, :] * stride_biasn, mask=b_mask, other=0.0)
            qk = qk * qk_scale + log2_bias(bias)
        if MASKED:
            visible = cols[None, :] < kv_len
            if IS_CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + causal_offset)
            if HAS_WINDOW:  # a sliding window: query i sees key j where |i - j| <= window
                distance = cols[None, :] - offs_m[:, None]
                visible = visible & (distance <= window) & (distance >= -window)
            qk = tl.where(visible, qk, float("-inf"))
        # without bias the scale stays folded into one FMA per score (qk_scale > 0)
        if HAS_BIAS:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        # a row that has seen only -inf keeps m = -inf; subtract 0 instead to avoid NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if HAS_BIAS:
            p = tl.math.exp2(qk - m_safe[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(
                V_block + cols[:, None] * stride_vn,
                mask=(cols[:, None] < kv_len) & d_mask[None, :],
                other=0.0,
            )
        elif BLOCK_D != HEAD_DIM:
            v = tl.load(V_block + cols[:, None] * stride_vn, mask=d_mask[None, :], other=0.0)
        else:
            v = tl.load(V_block + cols[:, None] * stride_vn)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@jit
def _attention_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Bias,
    KVLens,
    Lq,
    Lk,
    num_heads,
    group_size,
    sm_scale,
    window,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_biasb,
    stride_biash,
    stride_biasm,
    stride_biasn,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_PER_KEY: tl.constexpr,
    HAS_KV_LENS: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    h_kv = h // group_size
    kv_len = Lk
    if HAS_KV_LENS:
        kv_len = tl.minimum(tl.load(KVLens + b).to(tl.int32), Lk)
    causal_offset = kv_len - Lq

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < Lq
    q_ptrs = (
        Q
        + b * stride_qb
        + h * stride_qh
        + offs_m[:, None] * stride_qm
        + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    K_block = K + b * stride_kb + h_kv * stride_kh + offs_d[:, None] * stride_kd
    V_block = V + b * stride_vb + h_kv * stride_vh + offs_d[None, :] * stride_vd
    Bias_block = Bias + b * stride_biasb + h * stride_biash
    if not BIAS_PER_KEY:
        Bias_block = Bias_block + offs_m[:, None] * stride_biasm

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    # keys every row of this block sees without any mask, then the masked tail / diagonal
    hi = kv_len
    full_hi = kv_len
    if IS_CAUSAL:
        hi = tl.minimum(kv_len, start_m * BLOCK_M + BLOCK_M + causal_offset)
        full_hi = tl.minimum(full_hi, start_m * BLOCK_M + causal_offset + 1)
    full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    lo = 0
    if HAS_WINDOW:
        # only the key blocks within `window` of this query block are loaded, all of them
        # through the masked path (a window is a few blocks wide)
        lo = tl.maximum(start_m * BLOCK_M - window, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(hi, start_m * BLOCK_M + BLOCK_M + window)
        full_hi = lo
    acc, l_i, m_i = _attention_inner(
        acc,
        l_i,
        m_i,
        q,
        K_block,
        V_block,
        Bias_block,
        lo,
        full_hi,
        offs_m,
        offs_n,
        offs_d,
        kv_len,
        causal_offset,
        window,
        qk_scale,
        stride_kn,
        stride_vn,
        stride_biasn,
        row_mask,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        False,
        IS_CAUSAL,
        HAS_WINDOW,
        HAS_BIAS,
        BIAS_PER_KEY,
        WARP_SPECIALIZE,
    )
    acc, l_i, m_i = _attention_inner(
        acc,
        l_i,
        m_i,
        q,
        K_block,
        V_block,
        Bias_block,
        full_hi,
        hi,
        offs_m,
        offs_n,
        offs_d,
        kv_len,
        causal_offset,
        window,
        qk_scale,
        stride_kn,
        stride_vn,
        stride_biasn,
        row_mask,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        True,
        IS_CAUSAL,
        HAS_WINDOW,
        HAS_BIAS,
        BIAS_PER_KEY,
        False,
    )
    # fully masked rows have l = 0 and acc = 0: output zeros, not 0/0
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = (
        Out
        + b * stride_ob
        + h * stride_oh
        + offs_m[:, None] * stride_om
        + offs_d[None, :] * stride_od
    )
    tl.store(
        o_ptrs, acc.to(Out.dtype.element_ty), mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    )


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sm_scale: float | None = None,
    causal: bool = False,
    bias: torch.Tensor | None = None,
    kv_lens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Plain PyTorch, same semantics; compute in float64 for a reference."""
    B, H, Lq, D = q.shape
    Lk, H_kv = k.shape[2], k.shape[1]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    k = k.repeat_interleave(H // H_kv, dim=1)
    v = v.repeat_interleave(H // H_kv, dim=1)
    s = (q @ k.transpose(-1, -2)) * sm_scale
    if bias is not None:
        s = s + bias
    lens = torch.full((B,), Lk, device=q.device) if kv_lens is None else kv_lens.clamp(max=Lk)
    cols = torch.arange(Lk, device=q.device)
    visible = cols[None, None, :] < lens[:, None, None]  # [B, 1, Lk]
    if causal:
        rows = torch.arange(Lq, device=q.device)
        visible = visible & (
            cols[None, None, :] <= rows[None, :, None] + (lens - Lq)[:, None, None]
        )
    if window is not None:
        rows = torch.arange(Lq, device=q.device)
        visible = visible & ((cols[None, :] - rows[:, None]).abs() <= window)[None]
    visible = visible[:, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.bool()[:, None, None, :]
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows -> zeros
    return (p @ v).to(q.dtype)


@dataclass(frozen=True)
class AttentionConfig:
    BLOCK_M: int = 128
    BLOCK_N: int = 64
    num_warps: int = 8
    num_stages: int = 3
    warp_specialize: bool = False  # Triton's warp-specialised pipelining of the unmasked loop
    # > 0: attention_short.py's persistent kernel, this many programs per SM (every key in one
    # BLOCK_N block, non-causal); 0: this file's kernel, one program per query block
    programs_per_sm: int = 0
    # attention_tma.py's persistent kernel (Hopper; non-causal), programs_per_sm programs per SM
    tma: bool = False
    # attention_wgmma.py's Gluon kernel (Hopper; non-causal; a padding bias or none), one
    # program per query block; `overlap`: a block's p v runs while the next block's softmax does
    wgmma: bool = False
    overlap: bool = True
    # the Gluon kernel's accumulator rescaled only when a row's max moved (FlashAttention-4)
    lazy_rescale: bool = False


# (BLOCK_M, num_warps, num_stages, programs_per_sm) of the short-key kernel, for keys of up to
# 128 (BLOCK_N 16-128) and of up to 256, where a [BLOCK_M, 256] score tile wants 8 warps
_SHORT = [(16, 4, 2, 4), (16, 4, 2, 8), (32, 4, 2, 4), (64, 4, 2, 2), (64, 4, 3, 2)]
_SHORT += [(64, 4, 2, 4), (128, 8, 2, 1), (128, 8, 2, 2)]
_SHORT_256 = [(32, 4, 2, 4), (64, 8, 2, 2), (128, 8, 2, 1)]
# (BLOCK_M, num_warps, num_stages, programs_per_sm) of the TMA kernel where every key fits one
# block (the tile loop pipelined), and (BLOCK_M, BLOCK_N, ...) where the keys stream in blocks
_TMA_ONE_BLOCK = [(64, 4, 2, 2), (64, 4, 3, 2), (64, 4, 2, 4), (128, 8, 2, 1), (128, 8, 3, 1)]
_TMA_ONE_BLOCK += [(128, 8, 2, 2), (128, 4, 2, 1)]
_TMA_STREAM = [(128, 64, 8, 3, 1), (128, 128, 8, 2, 1), (128, 64, 8, 3, 2), (128, 64, 4, 3, 1)]
_TMA_STREAM += [(64, 64, 4, 3, 2), (128, 128, 8, 3, 1)]
# (BLOCK_M, BLOCK_N, num_warps, num_stages, overlap, lazy_rescale) of the Gluon kernel, for
# keys past 128: the fastest at 8x512 and 4x256 (H200, benchmarks/bench_attention_wgmma.py,
# 2026-12-03), and the lazy rescale where it won: 64x128, serial at 4x256 (5.64 µs against
# 5.84 for the best of the others), overlapped at 1x512 (the tuner's choice); at 8x512 every
# lazy config was 7-16% slower (2026-12-04)
_WGMMA = [(64, 64, 4, 2, False, False), (64, 64, 4, 2, True, False)]
_WGMMA += [(64, 128, 4, 2, True, False), (64, 128, 4, 2, True, True), (64, 128, 4, 2, False, True)]


def attention_configs(
    k: torch.Tensor | None = None,
    causal: bool = False,
    q: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    window: int | None = None,
) -> list[AttentionConfig]:
    """Tuning space; the compiler benchmarks these per shape and stores the winner. Given the
    call's keys `k` ([B, H_kv, Lk, D]) and `causal`, the short-key kernel's configs join where
    every key fits one block (Lk <= 256, non-causal: an encoder's attention); given q and v
    too, the TMA kernel's where its descriptors can see them (non-causal, on a GPU with TMA)."""
    out = []
    for bm, bn, w, s in [
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 64, 4, 3),
        (128, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 32, 4, 4),
        (64, 128, 4, 2),
        (128, 128, 8, 2),
        (32, 32, 4, 2),
        (16, 32, 4, 2),
    ]:
        out.append(AttentionConfig(bm, bn, w, s))
    # Warp-specialised with 8 warps only: Triton 3.6's warp specialiser fails on this kernel
    # with 4 (tests/kernels/test_compile_for_hopper.py), a candidate every bucket paid for.
    if window is not None:  # only this file's kernel skips the key blocks outside a window
        return out  # (its warp-specialised loop is the unmasked one, which a window skips)
    out.append(AttentionConfig(128, 128, 8, 3, True))
    kv_len = k.shape[-2] if k is not None else None
    if kv_len is not None and kv_len <= 256 and not causal:
        block_n = max(16, next_power_of_2(kv_len))
        for bm, w, s, per_sm in _SHORT if block_n <= 128 else _SHORT_256:
            if bm <= max(16, block_n):  # query blocks no wider than the keys (Lq ~ Lk here)
                out.append(AttentionConfig(bm, block_n, w, s, False, per_sm))
    if kv_len is not None and q is not None and v is not None and _tma_fits(q, k, v, causal):
        block_n = max(16, next_power_of_2(kv_len))
        if block_n <= 128:
            tma = [(bm, block_n, w, s, per_sm) for bm, w, s, per_sm in _TMA_ONE_BLOCK]
        else:
            tma = _TMA_STREAM
        for bm, bn, w, s, per_sm in tma:
            if bm <= max(64, next_power_of_2(q.shape[2])):
                out.append(AttentionConfig(bm, bn, w, s, False, per_sm, tma=True))
    if kv_len is not None and kv_len > 128 and q is not None and v is not None:
        if wgmma_attention_refusal(q, k, v, None, causal) is None:
            for bm, bn, w, s, overlap, lazy in _WGMMA:
                extra = {"overlap": overlap, "lazy_rescale": lazy}
                out.append(AttentionConfig(bm, bn, w, s, wgmma=True, **extra))
    return out


def _tma_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """Whether the TMA kernel takes these tensors (the output as kernl_ops writes it), on a
    GPU that has TMA (Hopper or later)."""
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False  # tf32 dots with a transposed shared operand: not worth offering
    return attention_tma_refusal(q, k, v, None, causal, 64, 64) is None


def default_attention_config(head_dim: int = 64, kv_len: int = 4096) -> AttentionConfig:
    # the best of attention_configs() on an H100 (benchmarks/kernels_report.py, 2026-11-24)
    if head_dim <= 64:
        return AttentionConfig(128, 64, 8, 3) if kv_len >= 4096 else AttentionConfig(64, 64, 4, 3)
    return AttentionConfig(128, 128, 8, 3) if kv_len >= 2048 else AttentionConfig(64, 64, 4, 3)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sm_scale: float | None = None,
    causal: bool = False,
    bias: torch.Tensor | None = None,
    kv_lens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: AttentionConfig | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, H_kv, Lk, D] (any strides); bias broadcastable to
    [B, H, Lq, Lk]; kv_lens [B] valid keys per row; key_padding_mask [B, Lk] (True = keep);
    window: query i sees only keys j with |i - j| <= window (ModernBERT's local layers)."""
    B, H, Lq, D = q.shape
    H_kv, Lk = k.shape[1], k.shape[2]
    assert k.shape == (B, H_kv, Lk, D) and v.shape == k.shape and H % H_kv == 0
    assert D <= 256, "head dim above 256 does not fit one block"
    assert window is None or window >= 0, "a window is a distance: 0 or more"
    if window is not None:  # past the longer side it sees every key (and fits int32)
        window = min(int(window), max(Lq, Lk))
    config = config or default_attention_config(D, Lk)
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    assert sm_scale > 0, "the folded exp2 scaling assumes a positive softmax scale"
    if key_padding_mask is not None:
        # arbitrary padding patterns ride the bias path: 0 / -inf, broadcast over heads, rows
        pad = torch.zeros(key_padding_mask.shape, dtype=torch.float32, device=q.device)
        pad = pad.masked_fill(~key_padding_mask.bool(), float("-inf"))[:, None, None, :]
        bias = pad if bias is None else bias + pad
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    has_bias = bias is not None
    if has_bias:
        bias = bias.expand(B, H, Lq, Lk)  # broadcast dims get stride 0, nothing copied
        bias_strides = list(bias.stride())
    else:
        bias, bias_strides = q, [0, 0, 0, 0]  # never read: HAS_BIAS is False
    if config.wgmma or config.tma or config.programs_per_sm:
        # an encoder's kernel: attention_wgmma.py's (Gluon), or a persistent grid,
        # attention_tma.py's or attention_short.py's
        if config.wgmma:
            which, kernel = "wgmma (wgmma=True)", wgmma_attention
            extra = {"overlap": config.overlap, "lazy_rescale": config.lazy_rescale}
        else:
            which = "TMA (tma=True)" if config.tma else "short-key (programs_per_sm > 0)"
            kernel = tma_attention if config.tma else short_attention
            extra = {"programs_per_sm": config.programs_per_sm or 1}
        if causal:
            raise ValueError(f"the {which} attention kernel is not causal")
        if window is not None:
            raise ValueError(f"the {which} attention kernel has no sliding window")
        return kernel(
            q,
            k,
            v,
            out,
            sm_scale=sm_scale,
            bias=bias if has_bias else None,
            kv_lens=kv_lens,
            block_m=config.BLOCK_M,
            block_n=config.BLOCK_N,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
            **extra,
        )
    has_lens = kv_lens is not None
    lens = kv_lens.to(device=q.device, dtype=torch.int32) if has_lens else q
    grid = (cdiv(Lq, config.BLOCK_M), B * H)
    launch_kernel(
        _attention_fwd_kernel,
        grid,
        q,
        k,
        v,
        out,
        bias,
        lens,
        Lq,
        Lk,
        H,
        H // H_kv,
        sm_scale,
        0 if window is None else int(window),
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *bias_strides,
        HEAD_DIM=D,
        BLOCK_D=max(16, next_power_of_2(D)),
        BLOCK_M=config.BLOCK_M,
        BLOCK_N=config.BLOCK_N,
        IS_CAUSAL=causal,
        HAS_WINDOW=window is not None,
        HAS_BIAS=has_bias,
        BIAS_PER_KEY=has_bias and (bias_strides[2] == 0 or Lq == 1),
        HAS_KV_LENS=has_lens,
        WARP_SPECIALIZE=config.warp_specialize,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


JIT_FUNCTIONS = (
    _attention_fwd_kernel,
    _short_attention_kernel,
    _tma_attention_kernel,
    _wgmma_attention_kernel,
)
CONFIG_TYPE = AttentionConfig
