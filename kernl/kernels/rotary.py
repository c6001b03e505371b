"""Rotary position embeddings (rotate-half convention, as in Hugging Face LLaMA/GPT-NeoX),
applied to q and k in one launch.

x * cos + rotate_half(x) * sin over the first `rot_dim` channels of every head; channels past
`rot_dim` (partial rotary, e.g. GPT-NeoX / Phi) pass through. cos/sin are caches
[max_pos, rot_dim] indexed by per-token position ids [B, L], so left padding and decode
offsets need nothing special. One program per token does all q heads and all k heads, so each
cos/sin row is read once per token. q/k are [B, H, L, D] with any strides; passing out_q=q,
out_k=k rotates in place."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import launch_kernel

KERNEL_NAME = "rotary"


@triton.jit
def _rotate_heads(X, O, b, l, num_heads, cos1, cos2, sin1, sin2,
                  stride_xb, stride_xh, stride_xl, stride_xd,
                  stride_ob, stride_oh, stride_ol, stride_od,
                  HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):  # fmt: skip
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (d[None, :] < HALF)
    x_row = X + b * stride_xb + l * stride_xl + heads[:, None] * stride_xh
    o_row = O + b * stride_ob + l * stride_ol + heads[:, None] * stride_oh
    x1 = tl.load(x_row + d[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + (d[None, :] + HALF) * stride_xd, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos1[None, :] - x2 * sin1[None, :]
    o2 = x2 * cos2[None, :] + x1 * sin2[None, :]
    tl.store(o_row + d[None, :] * stride_od, o1.to(O.dtype.element_ty), mask=mask)
    tl.store(o_row + (d[None, :] + HALF) * stride_od, o2.to(O.dtype.element_ty), mask=mask)
    if BLOCK_PASS > 0:
        # channels past rot_dim are copied (a no-op in place, but cheap)
        p = 2 * HALF + tl.arange(0, BLOCK_PASS)
        pmask = (heads[:, None] < num_heads) & (p[None, :] < HEAD_DIM)
        xp = tl.load(x_row + p[None, :] * stride_xd, mask=pmask, other=0.0)
        tl.store(o_row + p[None, :] * stride_od, xp, mask=pmask)


@triton.jit
def _rotary_kernel(Q, K, OutQ, OutK, Cos, Sin, PosIds,
                   seq_len, num_q_heads, num_k_heads,
                   stride_qb, stride_qh, stride_ql, stride_qd,
                   stride_kb, stride_kh, stride_kl, stride_kd,
                   stride_oqb, stride_oqh, stride_oql, stride_oqd,
                   stride_okb, stride_okh, stride_okl, stride_okd,
                   stride_cos, stride_sin, stride_pb, stride_pl,
                   HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                   BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):  # fmt: skip
    tok = tl.program_id(0)
    b = (tok // seq_len).to(tl.int64)
    l = (tok % seq_len).to(tl.int64)
    pos = tl.load(PosIds + b * stride_pb + l * stride_pl).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    dm = d < HALF
    # cos/sin rows are read in full (both halves), so caches need not repeat their halves
    cos1 = tl.load(Cos + pos * stride_cos + d, mask=dm, other=0.0).to(tl.float32)
    cos2 = tl.load(Cos + pos * stride_cos + HALF + d, mask=dm, other=0.0).to(tl.float32)
    sin1 = tl.load(Sin + pos * stride_sin + d, mask=dm, other=0.0).to(tl.float32)
    sin2 = tl.load(Sin + pos * stride_sin + HALF + d, mask=dm, other=0.0).to(tl.float32)
    _rotate_heads(Q, OutQ, b, l, num_q_heads, cos1, cos2, sin1, sin2,
                  stride_qb, stride_qh, stride_ql, stride_qd,
                  stride_oqb, stride_oqh, stride_oql, stride_oqd,
                  HEAD_DIM, HALF, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS)  # fmt: skip
    _rotate_heads(K, OutK, b, l, num_k_heads, cos1, cos2, sin1, sin2,
                  stride_kb, stride_kh, stride_kl, stride_kd,
                  stride_okb, stride_okh, stride_okl, stride_okd,
                  HEAD_DIM, HALF, BLOCK_HK, BLOCK_HALF, BLOCK_PASS)  # fmt: skip


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Hugging Face's apply_rotary_pos_emb with partial rotary: cos/sin [max_pos, rot_dim]."""
    rot = cos.shape[-1]
    c = cos[position_ids][:, None]  # [B, 1, L, rot]
    s = sin[position_ids][:, None]

    def apply(x: torch.Tensor) -> torch.Tensor:
        xr, xp = x[..., :rot], x[..., rot:]
        return torch.cat((xr * c + rotate_half(xr) * s, xp), dim=-1)

    return apply(q), apply(k)


@dataclass(frozen=True)
class RotaryConfig:
    num_warps: int = 4


def rotary_configs() -> list[RotaryConfig]:
    return [RotaryConfig(w) for w in (1, 2, 4, 8)]


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           position_ids: torch.Tensor, *, out_q: torch.Tensor | None = None,
           out_k: torch.Tensor | None = None,
           config: RotaryConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """q [B, H, L, D], k [B, H_kv, L, D], cos/sin [max_pos, rot_dim] (rot_dim even, <= D),
    position_ids [B, L] or [1, L] -> rotated (q, k)."""
    B, H, L, D = q.shape
    H_kv = k.shape[1]
    rot = cos.shape[-1]
    assert k.shape == (B, H_kv, L, D) and rot % 2 == 0 and rot <= D and sin.shape == cos.shape
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1
    config = config or RotaryConfig()
    out_q = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out_q is None else out_q
    out_k = torch.empty(k.shape, dtype=k.dtype, device=k.device) if out_k is None else out_k
    pos = position_ids.expand(B, L)
    launch_kernel(_rotary_kernel, (B * L,),
        q, k, out_q, out_k, cos, sin, pos,
        L, H, H_kv,
        *q.stride(), *k.stride(), *out_q.stride(), *out_k.stride(),
        cos.stride(0), sin.stride(0), *pos.stride(),
        HEAD_DIM=D, HALF=rot // 2, BLOCK_HQ=triton.next_power_of_2(H),
        BLOCK_HK=triton.next_power_of_2(H_kv), BLOCK_HALF=triton.next_power_of_2(rot // 2),
        BLOCK_PASS=triton.next_power_of_2(D - rot) if D > rot else 0,
        num_warps=config.num_warps,
    )  # fmt: skip
    return out_q, out_k


JIT_FUNCTIONS = (_rotary_kernel,)
DEFAULT_CONFIG = RotaryConfig()
CONFIG_TYPE = RotaryConfig
configs = rotary_configs
launch = rotary
reference = rotary_reference
