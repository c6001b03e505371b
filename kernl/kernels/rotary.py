"""Rotary position embedding, `x * cos + rotate_half(x) * sin`, one kernel per tensor.

The form is transformers' `apply_rotary_pos_emb` (ModernBERT, NomicBERT, ESM: rotate_half
splits the head dim into halves, `cat(-x2, x1)`). Eager runs it as about seven launches per
tensor (a cast to float32, two multiplies, a negation, a concatenation, an add, a cast back),
each writing a [B, H, L, D] intermediate; here each element of x, cos and sin is read once,
the arithmetic is float32, and the result is stored once in the output dtype. x may be any
strided [B, H, L, D] view (the heads of a fused QKV projection); cos and sin broadcast to it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .jit import cdiv, jit, next_power_of_2, tl
from .launch import launch_kernel


@jit
def _rotary_kernel(
    X,
    Cos,
    Sin,
    Out,
    H,
    L,
    half,
    stride_xb,
    stride_xh,
    stride_xl,
    stride_xd,
    stride_cb,
    stride_ch,
    stride_cl,
    stride_cd,
    stride_sb,
    stride_sh,
    stride_sl,
    stride_sd,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # one grid axis (the second is capped at 65535 programs), 64-bit offsets throughout
    pid = tl.program_id(0).to(tl.int64)
    blocks = tl.cdiv(L, BLOCK_L)
    bh = pid // blocks
    b = bh // H
    h = bh % H
    rows = (pid % blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < L)[:, None] & (cols < half)[None, :]
    r = rows[:, None]
    lo = cols.to(tl.int64)[None, :]
    hi = lo + half

    x_at = X + b * stride_xb + h * stride_xh + r * stride_xl
    c_at = Cos + b * stride_cb + h * stride_ch + r * stride_cl
    s_at = Sin + b * stride_sb + h * stride_sh + r * stride_sl
    x1 = tl.load(x_at + lo * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + hi * stride_xd, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(c_at + lo * stride_cd, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_at + hi * stride_cd, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_at + lo * stride_sd, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_at + hi * stride_sd, mask=mask, other=0.0).to(tl.float32)
    # rotate_half(x) = cat(-x2, x1): eager's products and sum, in its order
    y1 = x1 * c1 + (-x2) * s1
    y2 = x2 * c2 + x1 * s2

    o_at = Out + ((b * H + h) * L + r) * (2 * half)  # contiguous [B, H, L, D]
    tl.store(o_at + lo, y1.to(Out.dtype.element_ty), mask=mask)
    tl.store(o_at + hi, y2.to(Out.dtype.element_ty), mask=mask)


def rotary_reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """transformers' form in float32 (float64 stays float64): x * cos + rotate_half(x) * sin."""
    dtype = dtype or x.dtype
    wide = torch.float64 if torch.float64 in (x.dtype, cos.dtype, sin.dtype) else torch.float32
    x, cos, sin = x.to(wide), cos.to(wide), sin.to(wide)
    x1, x2 = x.chunk(2, dim=-1)
    y = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return y.to(dtype)


@dataclass(frozen=True)
class RotaryConfig:
    BLOCK_L: int = 16  # positions per program
    num_warps: int = 4


def rotary_configs() -> list[RotaryConfig]:
    return [RotaryConfig(m, w) for m in (4, 16, 64) for w in (1, 4)]


def rotary_refusal(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """Why the kernel cannot take these operands (None: it can)."""
    if x.dim() > 4 or x.dim() < 1:
        return f"x of {x.dim()} dims (1 to 4)"
    if x.shape[-1] % 2:
        return f"an odd head dim {x.shape[-1]}"
    try:
        torch.broadcast_shapes(cos.shape, sin.shape, x.shape)
    except RuntimeError:
        return f"cos {list(cos.shape)} and sin {list(sin.shape)} do not broadcast to x"
    if torch.broadcast_shapes(cos.shape, sin.shape, x.shape) != x.shape:
        return "cos and sin broadcast beyond x"
    return None


def rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    config: RotaryConfig | None = None,
) -> torch.Tensor:
    """x [..., D] (at most 4 dims, D even, any strides); cos, sin broadcastable to x ->
    contiguous x * cos + rotate_half(x) * sin in `dtype` (default x's), computed in float32."""
    why = rotary_refusal(x, cos, sin)
    if why is not None:
        raise ValueError(f"rotary: {why}")
    config = config or RotaryConfig()
    shape = x.shape
    x4 = x.reshape((1,) * (4 - x.dim()) + tuple(shape)) if x.dim() < 4 else x
    c4, s4 = (t.expand(shape).reshape(x4.shape) for t in (cos, sin))
    B, H, L, D = x4.shape
    out = torch.empty(x4.shape, dtype=dtype or x.dtype, device=x.device)
    if out.numel():
        launch_kernel(
            _rotary_kernel,
            (B * H * cdiv(L, config.BLOCK_L),),
            x4, c4, s4, out, H, L, D // 2,
            *x4.stride(), *c4.stride(), *s4.stride(),
            BLOCK_L=config.BLOCK_L,
            BLOCK_D=next_power_of_2(max(D // 2, 1)),
            num_warps=config.num_warps,
        )  # fmt: skip
    return out.view(shape)


CONFIG_TYPE = RotaryConfig
JIT_FUNCTIONS = (_rotary_kernel,)
