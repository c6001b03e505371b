"""Decode attention (one query token per sequence against a KV cache), flash-decoding style.

With one query row the work is reading K and V once: a grid over (batch, head) alone leaves
most of the GPU idle, so the keys are split into chunks processed in parallel (split-K), each
chunk writing an unnormalised partial output with its running max and sum; a second small
kernel merges the chunks. Every program handles all q heads that share one kv head (GQA/MQA),
so K/V are read once per group rather than once per q head. `kv_lens` gives the valid cache
length of each batch row (a chunk past it reads no K/V: a generation cache's bucket is longer
than its valid length); `kv_mask` [B, Lk] (bool) marks the slots each row may attend to, e.g.
a left-padded prompt's real tokens; rows with no valid key output zeros. The compiler tunes
the launch config per decode batch and cache length (compiler/tasks/causal_lm/decode_tiles.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .jit import cdiv, jit, next_power_of_2, tl, triton
from .launch import is_interpreted, launch_kernel
from .pdl import pdl_kwargs, pdl_start


@jit
def decode_attention_chunk(
    Q,
    K,
    V,
    KVMask,
    b,
    h_kv,
    lo,
    hi,
    first,
    group_size,
    sm_scale,
    softcap,
    stride_maskb,
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
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KV_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """The q heads of kv head h_kv (batch row b) against cache slots [lo, hi), none before
    `first` (a sliding window's): the unnormalised output [BLOCK_G, BLOCK_D], running max and
    sum (m = -inf, l = 0 when no slot is attended), and the heads' indices and masks. With
    HAS_SOFTCAP the scaled scores s become softcap * tanh(s / softcap) (Gemma2's)."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = h_kv * group_size + offs_g
    g_mask = offs_g < group_size
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    K_block = K + b * stride_kb + h_kv * stride_kh + offs_d[:, None] * stride_kd
    V_block = V + b * stride_vb + h_kv * stride_vh + offs_d[None, :] * stride_vd
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_mask = (cols < hi) & (cols >= first)  # a window's slots before `first` are not read
        k = tl.load(
            K_block + cols[None, :] * stride_kn, mask=d_mask[:, None] & n_mask[None, :], other=0.0
        )
        if HAS_SOFTCAP:  # tanh(x) = 2 sigmoid(2x) - 1, in float32, then to base 2
            capped = tl.dot(q, k) * (sm_scale / softcap)
            qk = (2.0 * tl.sigmoid(2.0 * capped) - 1.0) * (softcap * 1.4426950408889634)
        else:
            qk = tl.dot(q, k) * qk_scale
        attend = n_mask
        if HAS_KV_MASK:
            attend = attend & (tl.load(KVMask + b * stride_maskb + cols, mask=n_mask, other=0) != 0)
        qk = tl.where(attend[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # masked slots' values are not read: p is 0 there, but 0 x NaN (a value an earlier
        # request left in the cache) is NaN
        v = tl.load(
            V_block + cols[:, None] * stride_vn, mask=attend[:, None] & d_mask[None, :], other=0.0
        )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i, heads, g_mask, offs_d, d_mask


@jit
def _decode_split_kernel(
    Q,
    K,
    V,
    MidO,
    MidM,
    MidL,
    KVLens,
    KVMask,
    Lk,
    group_size,
    chunk,
    sm_scale,
    softcap,
    window,
    stride_lensb,
    stride_maskb,
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
    stride_ob,
    stride_oh,
    stride_os,
    stride_mb,
    stride_mh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KV_LENS: tl.constexpr,
    HAS_KV_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)  # every read below may depend on the previous kernel
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h_kv = tl.program_id(2).to(tl.int64)
    kv_len = Lk
    if HAS_KV_LENS:
        kv_len = tl.minimum(tl.load(KVLens + b * stride_lensb).to(tl.int32), Lk)
    first = 0
    lo = split * chunk
    if HAS_WINDOW:
        # the query (slot kv_len - 1) sees the window's slots only, none read before: the
        # chunks split the window (from its first key block), not the whole cache, so every
        # program has slots to read however long the cache is
        first = tl.maximum(kv_len - window, 0)
        lo += first // BLOCK_N * BLOCK_N
    hi = tl.minimum(lo + chunk, kv_len)  # <= lo for a chunk past kv_len: the loop never runs
    acc, m_i, l_i, heads, g_mask, offs_d, d_mask = decode_attention_chunk(
        Q,
        K,
        V,
        KVMask,
        b,
        h_kv,
        lo,
        hi,
        first,
        group_size,
        sm_scale,
        softcap,
        stride_maskb,
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
        HEAD_DIM,
        BLOCK_D,
        BLOCK_G,
        BLOCK_N,
        HAS_KV_MASK,
        HAS_SOFTCAP,
    )
    # empty chunks (past kv_len, or all masked) write m = -inf, l = 0: the merge ignores them
    o_ptrs = MidO + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_ptrs, acc, mask=g_mask[:, None] & d_mask[None, :])
    ml_off = b * stride_mb + heads * stride_mh + split
    tl.store(MidM + ml_off, m_i, mask=g_mask)
    tl.store(MidL + ml_off, l_i, mask=g_mask)


@jit
def decode_attention_merge(
    MidO,
    MidM,
    MidL,
    Out,
    b,
    h,
    num_splits,
    stride_ob,
    stride_oh,
    stride_os,
    stride_mb,
    stride_mh,
    stride_outb,
    stride_outh,
    stride_outd,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEADS: tl.constexpr = 1,
):
    """Heads h .. h + HEADS - 1 of batch row b: their chunks' partial outputs, weighted by
    their maxima and sums, as normalised rows of Out (zeros where no slot was attended). The
    heads at once, so that their loads are in flight together (the persistent step merges a
    kv group's heads: one after another, they made its merging program the slowest)."""
    offs_g = tl.arange(0, triton.next_power_of_2(HEADS))
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < HEADS
    gs_mask = g_mask[:, None] & (offs_s < num_splits)[None, :]
    d_mask = offs_d < HEAD_DIM
    heads = h + offs_g
    ms = b * stride_mb + heads[:, None] * stride_mh + offs_s[None, :]  # [G, S]
    m = tl.load(MidM + ms, mask=gs_mask, other=float("-inf"))
    l = tl.load(MidL + ms, mask=gs_mask, other=0.0)
    o = tl.load(
        MidO
        + b * stride_ob
        + heads[:, None, None] * stride_oh
        + offs_s[None, :, None] * stride_os
        + offs_d[None, None, :],
        mask=gs_mask[:, :, None] & d_mask[None, None, :],
        other=0.0,
    )
    m_max = tl.max(m, 1)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max)[:, None])
    denom = tl.sum(w * l, 1)
    out = tl.sum(o * w[:, :, None], 1) / tl.where(denom == 0.0, 1.0, denom)[:, None]
    tl.store(
        Out + b * stride_outb + heads[:, None] * stride_outh + offs_d[None, :] * stride_outd,
        out.to(Out.dtype.element_ty),
        mask=g_mask[:, None] & d_mask[None, :],
    )


@jit
def _decode_merge_kernel(
    MidO,
    MidM,
    MidL,
    Out,
    num_heads,
    num_splits,
    stride_ob,
    stride_oh,
    stride_os,
    stride_mb,
    stride_mh,
    stride_outb,
    stride_outh,
    stride_outd,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)  # every read below may depend on the previous kernel
    bh = tl.program_id(0)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    decode_attention_merge(
        MidO,
        MidM,
        MidL,
        Out,
        b,
        h,
        num_splits,
        stride_ob,
        stride_oh,
        stride_os,
        stride_mb,
        stride_mh,
        stride_outb,
        stride_outh,
        stride_outd,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_S,
    )


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sm_scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Plain PyTorch: q [B, H, 1, D], k/v [B, H_kv, Lk, D], kv_lens [B], kv_mask [B, Lk]; the
    query sits at slot kv_len - 1 and, with a window, sees the slots j > kv_len - 1 - window."""
    B, H, _, D = q.shape
    H_kv, Lk = k.shape[1], k.shape[2]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    k = k.repeat_interleave(H // H_kv, dim=1)
    v = v.repeat_interleave(H // H_kv, dim=1)
    s = (q @ k.transpose(-1, -2)) * sm_scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    cols = torch.arange(Lk, device=q.device)
    lens = torch.full((B,), Lk, device=q.device) if kv_lens is None else kv_lens.to(q.device)
    if kv_lens is not None:
        s = s.masked_fill(~(cols[None, :] < kv_lens[:, None])[:, None, None, :], float("-inf"))
    if window is not None:
        seen = cols[None, :] > lens[:, None] - 1 - window
        s = s.masked_fill(~seen[:, None, None, :], float("-inf"))
    if kv_mask is not None:
        s = s.masked_fill(~kv_mask.bool()[:, None, None, :], float("-inf"))
    return (torch.softmax(s, dim=-1).nan_to_num(0.0) @ v).to(q.dtype)


@dataclass(frozen=True)
class DecodeAttentionConfig:
    BLOCK_N: int = 64
    num_warps: int = 4
    num_stages: int = 3
    num_splits: int = 0  # 0: enough chunks for ~4 programs per SM of an H100


def decode_attention_configs() -> list[DecodeAttentionConfig]:
    """The default, then 16 to 64 chunks of one or two small key blocks: 128 to 512 programs
    for batch 1 with 8 kv heads over 512..2048 slots (a chunk is at least one key block)."""
    table = [  # BLOCK_N, num_warps, num_stages, num_splits
        (64, 4, 3, 0), (128, 8, 3, 0), (16, 2, 2, 32), (16, 2, 2, 64),
        (32, 2, 2, 16), (32, 4, 2, 32), (32, 4, 3, 64), (64, 4, 3, 16),
        (64, 4, 3, 32), (64, 4, 3, 64), (128, 8, 3, 16), (128, 8, 3, 64),
    ]  # fmt: skip
    return [DecodeAttentionConfig(*row) for row in table]


def _auto_splits(batch_kv_heads: int, Lk: int, block_n: int) -> int:
    target_programs = 4 * 132
    most = max(1, cdiv(Lk, 4 * block_n))  # at least 4 blocks of keys per chunk
    return max(1, min(most, cdiv(target_programs, batch_kv_heads)))


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sm_scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: DecodeAttentionConfig | None = None,
    pdl: bool = False,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """q [B, H, 1, D], k/v [B, H_kv, Lk, D] (any strides), kv_lens [B] (int32 or int64 are read
    as they are, any stride: an expanded scalar serves every row), kv_mask [B, Lk] (bool, unit
    stride along Lk) -> [B, H, 1, D]. The query sits at each row's slot kv_len - 1; `window`
    (a sliding window's length, >= 1): it sees the slots j > kv_len - 1 - window only, and the
    chunks split those slots (from the window's first key block) rather than the whole cache. `softcap`: the scaled scores s become softcap *
    tanh(s / softcap) (Gemma2's). pdl: launch with programmatic dependent launch
    (kernels/launch.py; off under the interpreter)."""
    B, H, Lq, D = q.shape
    H_kv, Lk = k.shape[1], k.shape[2]
    assert Lq == 1 and k.shape == (B, H_kv, Lk, D) and v.shape == k.shape and H % H_kv == 0
    has_mask = kv_mask is not None
    if has_mask:
        assert kv_mask.dtype == torch.bool and kv_mask.shape == (B, Lk) and kv_mask.stride(1) == 1
    if window is not None and not (isinstance(window, int) and window >= 1):
        raise ValueError(f"decode_attention: window must be an int >= 1, not {window!r}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"decode_attention: softcap must be finite and > 0, not {softcap!r}")
    window = None if window is None else min(window, Lk)  # longer masks nothing: int32-safe
    config = config or DecodeAttentionConfig()
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    group = H // H_kv
    # the slots the chunks cover: the whole cache, or a window's from its first key block
    span = Lk if window is None else min(Lk, window + config.BLOCK_N - 1)
    splits = config.num_splits or _auto_splits(B * H_kv, span, config.BLOCK_N)
    chunk = cdiv(cdiv(span, splits), config.BLOCK_N) * config.BLOCK_N
    splits = cdiv(span, chunk)
    mid_o = torch.empty((B, H, splits, D), dtype=torch.float32, device=q.device)
    mid_m = torch.empty((B, H, splits), dtype=torch.float32, device=q.device)
    mid_l = torch.empty_like(mid_m)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    has_lens = kv_lens is not None
    if has_lens and kv_lens.dtype not in (torch.int32, torch.int64):
        kv_lens = kv_lens.to(torch.int32)
    lens = kv_lens.to(q.device) if has_lens else q
    BLOCK_D = max(16, next_power_of_2(D))
    launch_kernel(
        _decode_split_kernel,
        (splits, B, H_kv),
        q,
        k,
        v,
        mid_o,
        mid_m,
        mid_l,
        lens,
        kv_mask if has_mask else q,
        Lk,
        group,
        chunk,
        sm_scale,
        1.0 if softcap is None else float(softcap),
        0 if window is None else window,
        lens.stride(0) if has_lens else 0,
        kv_mask.stride(0) if has_mask else 0,
        q.stride(0),
        q.stride(1),
        q.stride(3),
        *k.stride(),
        *v.stride(),
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_m.stride(0),
        mid_m.stride(1),
        HEAD_DIM=D,
        BLOCK_D=BLOCK_D,
        BLOCK_G=max(16, next_power_of_2(group)),
        BLOCK_N=config.BLOCK_N,
        HAS_KV_LENS=has_lens,
        HAS_KV_MASK=has_mask,
        HAS_SOFTCAP=softcap is not None,
        HAS_WINDOW=window is not None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_kwargs(pdl, is_interpreted(_decode_split_kernel)),
    )
    launch_kernel(
        _decode_merge_kernel,
        (B * H,),
        mid_o,
        mid_m,
        mid_l,
        out,
        H,
        splits,
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_m.stride(0),
        mid_m.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(3),
        HEAD_DIM=D,
        BLOCK_D=BLOCK_D,
        BLOCK_S=max(2, next_power_of_2(splits)),
        num_warps=4,
        **pdl_kwargs(pdl, is_interpreted(_decode_merge_kernel)),
    )
    return out


JIT_FUNCTIONS = (_decode_split_kernel, _decode_merge_kernel)
CONFIG_TYPE = DecodeAttentionConfig
