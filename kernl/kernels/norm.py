"""(Residual add +) LayerNorm or RMSNorm over the last axis, one pass over memory.

Each program holds BLOCK_M whole rows in registers (hidden up to 8192), so the input is read
once, statistics are taken in fp32 from registers, and the normalised row (and, when a
residual is fused, the sum x + residual that the next block needs) is written once. Small
hidden sizes pack several rows per program so every program still moves enough bytes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .jit import cdiv, jit, next_power_of_2, tl
from .launch import launch_kernel

MAX_HIDDEN = 8192


@jit
def _norm_kernel(
    X,
    Residual,
    Weight,
    Bias,
    Out,
    SumOut,
    M,
    N,
    eps,
    stride_xm,
    stride_rm,
    stride_om,
    stride_sm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_SUM: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows[:, None] < M) & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(Residual + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
        x += r.to(tl.float32)
        if STORE_SUM:
            tl.store(
                SumOut + rows[:, None] * stride_sm + cols[None, :],
                x.to(SumOut.dtype.element_ty),
                mask=mask,
            )
    if IS_RMS:
        var = tl.sum(x * x, 1) / N
        xc = x
    else:
        mean = tl.sum(x, 1) / N
        # centre before squaring (two-pass in registers): no cancellation for large means
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, 1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(Weight + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + rows[:, None] * stride_om + cols[None, :], y.to(Out.dtype.element_ty), mask=mask)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    if residual is not None:
        x = x + residual
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    if residual is not None:
        x = x + residual
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype)


@dataclass(frozen=True)
class NormConfig:
    BLOCK_M: int = 0  # rows per program; 0 picks from the hidden size
    num_warps: int = 0  # 0 picks from the tile size


def norm_configs() -> list[NormConfig]:
    """Tuning space. The launcher caps rows per program at 16k elements per tile."""
    return [NormConfig(0, 0)] + [NormConfig(m, w) for m in (1, 2, 4, 8, 16) for w in (4, 8, 16)]


def _resolve(config: NormConfig, N: int) -> tuple[int, int, int]:
    BLOCK_N = next_power_of_2(N)
    BLOCK_M = config.BLOCK_M or max(1, 4096 // BLOCK_N)
    BLOCK_M = max(1, min(BLOCK_M, 16384 // BLOCK_N))
    warps = config.num_warps or min(16, max(4, BLOCK_M * BLOCK_N // 512))
    return BLOCK_M, BLOCK_N, warps


def _norm(x, weight, bias, eps, residual, return_sum, out, sum_out, config, is_rms):
    N = x.shape[-1]
    assert N <= MAX_HIDDEN and weight.shape == (N,)
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    out2 = out.view(-1, N)
    r2 = residual.reshape(-1, N).contiguous() if residual is not None else x2
    store_sum = return_sum and residual is not None
    if store_sum and sum_out is None:
        sum_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s2 = sum_out.view(-1, N) if store_sum else out2
    BLOCK_M, BLOCK_N, warps = _resolve(config or NormConfig(), N)
    launch_kernel(
        _norm_kernel,
        (cdiv(M, BLOCK_M),),
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
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        IS_RMS=is_rms,
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        STORE_SUM=store_sum,
        num_warps=warps,
    )
    if return_sum:
        return out, (sum_out if store_sum else x)
    return out


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    *,
    return_sum: bool = False,
    out: torch.Tensor | None = None,
    sum_out: torch.Tensor | None = None,
    config: NormConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """layer_norm(x + residual); with return_sum also returns x + residual (for the next
    block's residual stream) as (normalised, sum)."""
    return _norm(x, weight, bias, eps, residual, return_sum, out, sum_out, config, False)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    *,
    return_sum: bool = False,
    out: torch.Tensor | None = None,
    sum_out: torch.Tensor | None = None,
    config: NormConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(x + residual) * rsqrt(mean((x + residual)^2) + eps) * weight (+ bias)."""
    return _norm(x, weight, bias, eps, residual, return_sum, out, sum_out, config, True)


JIT_FUNCTIONS = (_norm_kernel,)
CONFIG_TYPE = NormConfig
