"""Rotary embedding of q and k plus the KV-cache write, one launch: from the QKV projection's
output, rotate q into the attention's query buffer, rotate k into the static key cache and
copy v into the value cache, at cache slots slot, slot + 1, ... (one decode position, or a
prefill block).

Replaces a decode step's per-layer rope matmul and its two `index_copy_`s (and the q/k
reshapes around them). Convention: Hugging Face's rotate-half, x * cos + rotate_half(x) * sin
over the whole head, with cos/sin tables [positions, head_dim] built as HF builds them (float32
angles, times the attention scaling, cast to the model dtype: `rope_tables`). Models without
rotary (GPT-2: learned positions) pass no tables and get the split + cache write alone.

The grid is (tokens, blocks of heads), where the heads are q's H, then k's KV, then v's KV,
exactly as they sit in a qkv row: a program loads its heads' two halves once, rotates them in
fp32 (one rounding, where HF's bf16 expression rounds three times) and stores each head to
its destination. The slot is read from a device tensor, so the launch is the same for every
step of a CUDA graph; writes past the cache's last slot are dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .jit import cdiv, jit, next_power_of_2, tl
from .launch import is_interpreted, launch_kernel
from .pdl import pdl_kwargs, pdl_start


@jit
def _rope_cache_write_kernel(
    QKV,
    Pos,
    Cos,
    Sin,
    Slot,
    QOut,
    KCache,
    VCache,
    seq_len,
    num_heads,
    num_kv_heads,
    slots,
    stride_xb,
    stride_xs,
    stride_pb,
    stride_ps,
    stride_cos,
    stride_sin,
    stride_qb,
    stride_qh,
    stride_qs,
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
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)  # every read below may depend on the previous kernel
    tok = tl.program_id(0)
    b = (tok // seq_len).to(tl.int64)
    s = (tok % seq_len).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    n_qk = num_heads + num_kv_heads
    mask = (heads < n_qk + num_kv_heads)[:, None] & d_mask[None, :]
    row = QKV + b * stride_xb + s * stride_xs + heads.to(tl.int64)[:, None] * HEAD_DIM
    x1 = tl.load(row + d[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + HALF + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ROPE:
        pos = tl.load(Pos + b * stride_pb + s * stride_ps).to(tl.int64)
        cos1 = tl.load(Cos + pos * stride_cos + d, mask=d_mask, other=0.0).to(tl.float32)
        cos2 = tl.load(Cos + pos * stride_cos + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
        sin1 = tl.load(Sin + pos * stride_sin + d, mask=d_mask, other=0.0).to(tl.float32)
        sin2 = tl.load(Sin + pos * stride_sin + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
        rotate = (heads < n_qk)[:, None]  # q and k heads; v passes through
        o1 = tl.where(rotate, x1 * cos1[None, :] - x2 * sin1[None, :], x1)
        o2 = tl.where(rotate, x2 * cos2[None, :] + x1 * sin2[None, :], x2)
    else:
        o1 = x1
        o2 = x2

    # q heads -> the query buffer
    is_q = (heads < num_heads)[:, None] & mask
    q_ptr = QOut + b * stride_qb + s * stride_qs + heads.to(tl.int64)[:, None] * stride_qh
    tl.store(q_ptr + d[None, :] * stride_qd, o1.to(QOut.dtype.element_ty), mask=is_q)
    tl.store(q_ptr + (HALF + d[None, :]) * stride_qd, o2.to(QOut.dtype.element_ty), mask=is_q)
    # k and v heads -> cache slot `slot + s`
    slot = tl.load(Slot).to(tl.int64) + s
    in_cache = slot < slots
    kh = (heads - num_heads).to(tl.int64)[:, None]
    is_k = (heads >= num_heads)[:, None] & (heads < n_qk)[:, None] & mask & in_cache
    k_ptr = KCache + b * stride_kb + kh * stride_kh + slot * stride_kn
    tl.store(k_ptr + d[None, :] * stride_kd, o1.to(KCache.dtype.element_ty), mask=is_k)
    tl.store(k_ptr + (HALF + d[None, :]) * stride_kd, o2.to(KCache.dtype.element_ty), mask=is_k)
    vh = (heads - n_qk).to(tl.int64)[:, None]
    is_v = (heads >= n_qk)[:, None] & mask & in_cache
    v_ptr = VCache + b * stride_vb + vh * stride_vh + slot * stride_vn
    tl.store(v_ptr + d[None, :] * stride_vd, o1.to(VCache.dtype.element_ty), mask=is_v)
    tl.store(v_ptr + (HALF + d[None, :]) * stride_vd, o2.to(VCache.dtype.element_ty), mask=is_v)


@jit
def rope_cache_store(
    a1,
    a2,
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
    HALF: tl.constexpr,
    HAS_ROPE: tl.constexpr,
):
    """A decode step's QKV rows, still in fp32, rotated and stored where they go: the epilogue
    of a QKV projection whose program holds both halves of its heads (norm_linear_rope; this
    kernel's own tile is per token and head instead, so it keeps its inline copy). Row m is batch row m (one token each, its rotary position Pos[m]); column c is
    half-column c of the qkv row: head c // HALF, element c % HALF, with a1 that element and
    a2 its partner HALF further. q heads go to QOut [B, H, 1, D], k and v heads to cache slot
    Slot (dropped past the last one)."""
    head = offs_c // HALF
    d = offs_c % HALF
    mask = m_mask[:, None] & c_mask[None, :]
    n_qk = num_heads + num_kv_heads
    if HAS_ROPE:
        pos = tl.load(Pos + offs_m * stride_pb, mask=m_mask, other=0).to(tl.int64)
        cos_row = Cos + pos[:, None] * stride_cos + d[None, :]
        sin_row = Sin + pos[:, None] * stride_sin + d[None, :]
        cos1 = tl.load(cos_row, mask=mask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_row + HALF, mask=mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_row, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_row + HALF, mask=mask, other=0.0).to(tl.float32)
        rotate = (head < n_qk)[None, :]  # q and k heads; v passes through
        o1 = tl.where(rotate, a1 * cos1 - a2 * sin1, a1)
        o2 = tl.where(rotate, a2 * cos2 + a1 * sin2, a2)
    else:
        o1 = a1
        o2 = a2
    rows = offs_m.to(tl.int64)[:, None]
    is_q = mask & (head < num_heads)[None, :]
    q_ptr = QOut + rows * stride_qb + head.to(tl.int64)[None, :] * stride_qh
    tl.store(q_ptr + d[None, :] * stride_qd, o1.to(QOut.dtype.element_ty), mask=is_q)
    tl.store(q_ptr + (HALF + d[None, :]) * stride_qd, o2.to(QOut.dtype.element_ty), mask=is_q)
    slot = tl.load(Slot).to(tl.int64)
    in_cache = mask & (slot < slots)
    kh = (head - num_heads).to(tl.int64)[None, :]
    is_k = in_cache & ((head >= num_heads) & (head < n_qk))[None, :]
    k_ptr = KCache + rows * stride_kb + kh * stride_kh + slot * stride_kn
    tl.store(k_ptr + d[None, :] * stride_kd, o1.to(KCache.dtype.element_ty), mask=is_k)
    tl.store(k_ptr + (HALF + d[None, :]) * stride_kd, o2.to(KCache.dtype.element_ty), mask=is_k)
    vh = (head - n_qk).to(tl.int64)[None, :]
    is_v = in_cache & (head >= n_qk)[None, :]
    v_ptr = VCache + rows * stride_vb + vh * stride_vh + slot * stride_vn
    tl.store(v_ptr + d[None, :] * stride_vd, o1.to(VCache.dtype.element_ty), mask=is_v)
    tl.store(v_ptr + (HALF + d[None, :]) * stride_vd, o2.to(VCache.dtype.element_ty), mask=is_v)


@dataclass
class RopeCacheTarget:
    """Where a decode step's QKV projection sends its rows when rotary and the cache write ride
    in its epilogue (norm_linear_rope), as rope_cache_write takes them: positions [B] (one
    token per row), cos / sin [positions, D] (`rope_tables`; None: no rotary), the layer's
    k_cache / v_cache [B, KV, slots, D], slot (1-element int tensor), the head counts, and
    q_out [B, H, 1, D] (None: a view of a new [B, 1, H, D] buffer, so q is contiguous)."""

    positions: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot: torch.Tensor
    num_heads: int
    num_kv_heads: int
    q_out: torch.Tensor | None = None

    def checked(self, rows: int, qkv_rows: int, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
        """(head_dim, q_out) for a QKV weight of `qkv_rows` rows and `rows` batch rows;
        AssertionError when the shapes do not fit."""
        H, KV = self.num_heads, self.num_kv_heads
        D = qkv_rows // (H + 2 * KV)
        assert qkv_rows == (H + 2 * KV) * D and D % 2 == 0
        assert self.k_cache.shape[:2] == (rows, KV) and self.k_cache.shape[3] == D
        assert self.v_cache.shape == self.k_cache.shape and self.slot.numel() == 1
        assert self.positions.shape == (rows,)
        if self.cos is not None:
            assert self.cos.shape[-1] == D and self.sin.shape == self.cos.shape
            assert self.cos.stride(-1) == 1 and self.sin.stride(-1) == 1
        q_out = self.q_out
        if q_out is None:
            q_out = torch.empty((rows, 1, H, D), dtype=dtype, device=self.k_cache.device)
            q_out = q_out.transpose(1, 2)
        assert q_out.shape == (rows, H, 1, D)
        return D, q_out

    def launch_args(self, q_out: torch.Tensor) -> tuple:
        """The arguments rope_cache_store takes from Pos to stride_vd, in order."""
        has_rope = self.cos is not None
        return (
            self.positions,
            self.cos if has_rope else self.positions,
            self.sin if has_rope else self.positions,
            self.slot,
            q_out,
            self.k_cache,
            self.v_cache,
            self.num_heads,
            self.num_kv_heads,
            self.k_cache.shape[2],
            self.positions.stride(0),
            self.cos.stride(0) if has_rope else 0,
            self.sin.stride(0) if has_rope else 0,
            q_out.stride(0),
            q_out.stride(1),
            q_out.stride(3),
            *self.k_cache.stride(),
            *self.v_cache.stride(),
        )


def rope_tables(
    inv_freq: torch.Tensor,
    positions: int,
    scaling: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [positions, 2 * len(inv_freq)] as Hugging Face computes them: float32 angles,
    cat(freqs, freqs), times the attention scaling, then cast to the model dtype."""
    inv_freq = inv_freq.to(device=device or inv_freq.device, dtype=torch.float32)
    pos = torch.arange(positions, device=inv_freq.device, dtype=torch.float32)
    emb = torch.cat([pos[:, None] * inv_freq[None]] * 2, dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cache_write_reference(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """The unfused sequence (HF's apply_rotary_pos_emb, then index_copy_ into the caches, which
    it mutates; host-synchronising, for tests). qkv [B, S, (H + 2 KV) D] or [B, (H + 2 KV) D]; returns q [B, H, S, D]."""
    if qkv.dim() == 2:
        qkv, positions = qkv[:, None], positions.reshape(-1, 1)
    B, S, F = qkv.shape
    H, KV = num_heads, num_kv_heads
    D = F // (H + 2 * KV)
    q = qkv[..., : H * D].reshape(B, S, H, D).transpose(1, 2)
    k = qkv[..., H * D : (H + KV) * D].reshape(B, S, KV, D).transpose(1, 2)
    v = qkv[..., (H + KV) * D :].reshape(B, S, KV, D).transpose(1, 2)
    if cos is not None:
        c, s = cos[positions][:, None], sin[positions][:, None]  # [B, 1, S, D]
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
    idx = slot.reshape(1).to(k_cache.device) + torch.arange(S, device=k_cache.device)
    keep = idx < k_cache.shape[2]  # as the kernel: tokens past the last slot are dropped
    k_cache.index_copy_(2, idx[keep], k[:, :, keep].to(k_cache.dtype))
    v_cache.index_copy_(2, idx[keep], v[:, :, keep].to(v_cache.dtype))
    return q


@dataclass(frozen=True)
class RopeCacheWriteConfig:
    BLOCK_H: int = 16  # heads per program (of H + 2 KV)
    num_warps: int = 2


def rope_cache_write_configs() -> list[RopeCacheWriteConfig]:
    return [RopeCacheWriteConfig(h, w) for h, w in [(4, 1), (8, 1), (16, 2), (16, 4), (64, 4)]]


def rope_cache_write(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    q_out: torch.Tensor | None = None,
    config: RopeCacheWriteConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """qkv [B, S, (H + 2 KV) D] or [B, (H + 2 KV) D] (decode, S = 1), unit stride along the
    last axis; positions [B, S] or [B] (the rotary position of each token); cos, sin
    [positions, D] (`rope_tables`) or None for no rotary; k_cache, v_cache [B, KV, slots, D]
    (one layer of the static cache, any strides); slot: a 1-element int tensor, the cache slot
    of the first token (token s goes to slot + s). Writes the caches and returns q
    [B, H, S, D] (into `q_out` if given, any strides; by default a view of a [B, S, H, D]
    buffer, so a decode step's q is contiguous). pdl: launch with
    programmatic dependent launch (kernels/launch.py; off under the interpreter)."""
    squeeze = qkv.dim() == 2
    if squeeze:
        qkv, positions = qkv[:, None], positions.reshape(-1, 1)
    B, S, F = qkv.shape
    H, KV = num_heads, num_kv_heads
    D = F // (H + 2 * KV)
    assert F == (H + 2 * KV) * D and D % 2 == 0 and qkv.stride(2) == 1
    assert k_cache.shape[:2] == (B, KV) and k_cache.shape[3] == D and v_cache.shape == k_cache.shape
    assert positions.shape == (B, S) and slot.numel() == 1
    has_rope = cos is not None
    if has_rope:
        assert cos.shape[-1] == D and sin.shape == cos.shape
        assert cos.stride(-1) == 1 and sin.stride(-1) == 1
    if q_out is None:
        q_out = torch.empty((B, S, H, D), dtype=qkv.dtype, device=qkv.device).transpose(1, 2)
    assert q_out.shape == (B, H, S, D)
    config = config or RopeCacheWriteConfig()
    half = D // 2
    grid = (B * S, cdiv(H + 2 * KV, config.BLOCK_H))
    launch_kernel(
        _rope_cache_write_kernel,
        grid,
        qkv,
        positions,
        cos if has_rope else qkv,
        sin if has_rope else qkv,
        slot,
        q_out,
        k_cache,
        v_cache,
        S,
        H,
        KV,
        k_cache.shape[2],
        qkv.stride(0),
        qkv.stride(1),
        positions.stride(0),
        positions.stride(1),
        cos.stride(0) if has_rope else 0,
        sin.stride(0) if has_rope else 0,
        *q_out.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        HEAD_DIM=D,
        HALF=half,
        BLOCK_H=config.BLOCK_H,
        BLOCK_HALF=next_power_of_2(half),
        HAS_ROPE=has_rope,
        num_warps=config.num_warps,
        **pdl_kwargs(pdl, is_interpreted(_rope_cache_write_kernel)),
    )
    return q_out


JIT_FUNCTIONS = (_rope_cache_write_kernel,)
CONFIG_TYPE = RopeCacheWriteConfig
