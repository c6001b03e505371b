"""kernl's own ops, callable from programs as "kernl.<name>".

Each op has two implementations chosen per instruction at compile time by the tuner:
"aten" (plain PyTorch, also the reference) and "triton" (a kernel from kernl.kernels with the
tuned `config`). On CUDA in production the Triton kernels run from precompiled binaries
(see binaries.py); on the CPU they run through Triton's interpreter."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

_usable: dict[str, bool] = {}


def triton_usable(device: torch.device, kernel_module: ModuleType) -> bool:
    """Whether a kernel module of kernl.kernels can run on `device`: always on CUDA; on the
    CPU only if Triton was imported in interpreter mode (TRITON_INTERPRET set before its first
    import). Otherwise a kernl op takes its aten path, which computes the same function."""
    if device.type != "cpu":
        return True
    name = kernel_module.__name__
    if name not in _usable:
        import triton.language.standard as tl_standard
        from triton.runtime.interpreter import InterpretedFunction

        from kernl.kernels.jit import made

        # Gluon kernels have no interpreter; they are offered on Hopper GPUs only
        # (JIT_FUNCTIONS hold the lazy kernels, which say which they are; a kernel another
        # module defines and made before this one was imported is there as Triton's own)
        kernels = [
            f for f in getattr(kernel_module, "JIT_FUNCTIONS", ()) if not getattr(f, "gluon", False)
        ]
        fns = [tl_standard.sum, *kernels]
        _usable[name] = all(isinstance(made(f), InterpretedFunction) for f in fns)
    return _usable[name]


def _check_impl(impl: str) -> None:
    if impl not in ("aten", "triton"):
        raise ValueError(f"unknown implementation {impl!r}")


def _config(config) -> dict[str, Any] | None:
    """Programs store a config as [[name, value], ...]; the tuner passes dicts."""
    if not config:
        return None
    return dict(config) if not isinstance(config, dict) else config


def _typed(kernel_module: ModuleType, config):
    """A program's config as the kernel module's config dataclass (None: its default)."""
    config = _config(config)
    return kernel_module.CONFIG_TYPE(**config) if config else None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str = "none",
    impl: str = "aten",
    config: dict[str, Any] | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """activation(x @ weight.T + bias) + residual. `counters`: the split-K kernel's arrival
    counters, one buffer a program's linears share (compiler/passes/split_k_counters.py)."""
    from kernl.kernels import fused_linear

    _check_impl(impl)
    # the kernel loads K in 16-byte steps (K % 8): other widths (BERT with hidden 60, an
    # intermediate of 100) run on aten, as gated_linear's do
    if impl == "triton" and x.shape[-1] % 8 == 0 and triton_usable(x.device, fused_linear):
        cfg = _typed(fused_linear, config)
        return fused_linear.fused_linear(
            x, weight, bias, activation, residual, config=cfg, counters=counters
        )
    if (
        activation in _LT_EPILOGUE
        and bias is not None
        and x.device.type != "cpu"
        and (activation == "relu" or x.dtype in (torch.float16, torch.bfloat16))
    ):
        # cuBLASLt applies bias + relu / tanh-GELU in the GEMM's epilogue: one launch instead
        # of two. Not on the CPU, where _addmm_activation's "gelu" is the erf one; no GELU in
        # fp32, where its GELU was 13x stock PyTorch's error (H200, 2026-11-30: 5.3e-6 vs
        # 4.1e-7 at 1x768x3072).
        y = torch._addmm_activation(
            bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=_LT_EPILOGUE[activation]
        )
        y = y.view(*x.shape[:-1], weight.shape[0])
        return y if residual is None else y + residual
    return fused_linear.fused_linear_reference(x, weight, bias, activation, residual)


# activation -> use_gelu of torch._addmm_activation (cuBLASLt's GELU epilogue is tanh-GELU)
_LT_EPILOGUE = {"relu": False, "gelu_tanh": True}


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    impl: str = "aten",
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """layer_norm(x + residual) over the last axis."""
    from kernl.kernels import norm

    _check_impl(impl)
    if impl == "triton" and triton_usable(x.device, norm):
        return norm.layer_norm(x, weight, bias, eps, residual, config=_typed(norm, config))
    if residual is not None:
        x = x + residual
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    impl: str = "aten",
    config: dict[str, Any] | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over [B, H, L, D] tensors; `mask` is a boolean tensor
    broadcastable to [B, H, Lq, Lk] (True = attend), an additive one, or None; `window`:
    query i sees only keys j with |i - j| <= window (a sliding window, passes/attention_window.py)."""
    _check_impl(impl)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    from kernl.kernels import attention as attention_kernel

    if impl == "triton" and triton_usable(q.device, attention_kernel):
        bias = mask
        if mask is not None and mask.dtype == torch.bool:
            bias = mask_to_bias(mask, torch.float32)
        while bias is not None and bias.dim() < 4:
            bias = bias.unsqueeze(0)
        # Written as [B, Lq, H, D] and seen as [B, H, Lq, D]: the heads merge that follows
        # every attention (transpose(1, 2).reshape(B, Lq, H * D)) is then a view, not a copy
        # kernel per layer. The kernel takes any output strides.
        B, H, Lq, D = q.shape
        out = torch.empty((B, Lq, H, v.shape[-1]), dtype=q.dtype, device=q.device).transpose(1, 2)
        return attention_kernel.attention(
            q,
            k,
            v,
            sm_scale=scale,
            causal=causal,
            bias=bias,
            out=out,
            config=_typed(attention_kernel, config),
            window=window,
        )
    if window is None and not causal:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    lq, lk = q.shape[-2], k.shape[-2]
    rows = torch.arange(lq, device=q.device)[:, None]
    cols = torch.arange(lk, device=q.device)[None, :]
    if window is not None:
        window = min(int(window), max(lq, lk))  # past the longer side: every key
        mask = _only_where(mask, (cols - rows).abs() <= window)
    if causal:
        # bottom-right aligned, like the kernel: query i sees key j <= i + (Lk - Lq)
        mask = _only_where(mask, cols <= rows + (lk - lq))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _only_where(mask: torch.Tensor | None, visible: torch.Tensor) -> torch.Tensor:
    """An attention mask (boolean, additive or None) that also hides what `visible` does not
    show."""
    if mask is None:
        return visible
    if mask.dtype == torch.bool:
        return mask & visible
    return mask.masked_fill(~visible, float("-inf"))


def qkv_attention(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float | None,
    num_heads: int,
    impl: str = "aten",
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """attention(q, k, v) of the heads of x [B, L, C] @ weight.T + bias (q, k, v side by side,
    `num_heads` each), non-causal, `mask` an additive [B, 1, 1, L] bias or None: what a
    kernl.linear, its split into heads and a kernl.attention compute, as [B, H, L, D] (written
    as [B, L, H, D], the layout kernl.attention gives, so the heads merge after it is a view)."""
    _check_impl(impl)
    B, L, C = x.shape
    D = C // num_heads
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    from kernl.kernels import qkv_attention as kernel

    if impl == "triton" and triton_usable(x.device, kernel):
        pad = None if mask is None else mask.reshape(B, L)
        if pad is not None and pad.stride(-1) != 1:  # the kernel reads each row's keys in one run
            pad = pad.contiguous()
        out = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
        kernel.qkv_attention(
            x, weight, bias, pad, out, num_heads=num_heads, sm_scale=scale,
            config=_typed(kernel, config) or kernel.QKVAttentionConfig(),
        )  # fmt: skip
        return out.view(B, L, num_heads, D).transpose(1, 2)
    qkv = F.linear(x, weight, bias).view(B, L, 3, num_heads, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True = attend) as an additive 0 / -inf bias, computed once
    per forward instead of once per attention layer. log(True) = 0 and log(False) = -inf
    exactly: one launch (a fill and a masked_fill were two)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask_to_bias takes a boolean mask, not {mask.dtype}")
    return torch.log(mask, out=torch.empty(mask.shape, dtype=dtype, device=mask.device))


def bert_embeddings(
    word_ids: torch.Tensor,
    word: torch.Tensor,
    pos_ids: torch.Tensor,
    pos: torch.Tensor,
    type_ids: torch.Tensor,
    types: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    impl: str = "aten",
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """layer_norm(word[word_ids] + pos[pos_ids] + types[type_ids]) in one pass."""
    _check_impl(impl)
    B, L = word_ids.shape
    # any of the three index tensors may be a [1, L] row (positions): broadcast all of them
    word_ids, pos_ids, type_ids = (t.expand(B, L) for t in (word_ids, pos_ids, type_ids))
    from kernl.kernels import bert_embeddings as kernel

    if impl == "triton" and bias is not None and triton_usable(word.device, kernel):
        cfg = _config(config)
        return kernel.bert_embeddings(
            word_ids,
            word,
            pos,
            types,
            weight,
            bias,
            eps,
            token_type_ids=type_ids,
            position_ids=pos_ids,
            config=_typed(kernel, cfg),
        )
    x = F.embedding(word_ids, word) + F.embedding(pos_ids, pos) + F.embedding(type_ids, types)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def gated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "gelu",
    impl: str = "aten",
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """act(a) * b where a, b = (x @ weight.T + bias).chunk(2, -1): a gated MLP's projection
    (ModernBERT's GEGLU), [..., N] of a [2N, K] weight, without its [..., 2N] output."""
    from kernl.kernels import gated_mlp as kernel
    from kernl.kernels.activation import apply_activation

    _check_impl(impl)
    n = weight.shape[0] // 2
    if impl == "triton" and x.shape[-1] % 8 == 0 and triton_usable(x.device, kernel):
        b = (None, None) if bias is None else (bias[:n].contiguous(), bias[n:].contiguous())
        return kernel.gated_mlp(
            x, weight[:n], weight[n:], bias_gate=b[0], bias_up=b[1], activation=activation,
            config=_typed(kernel, config),
        )  # fmt: skip
    gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)
    return apply_activation(gate, activation) * up


def rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dtype: torch.dtype | None = None,
    impl: str = "aten",
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1) of x's halves on the
    last axis: computed in float32 (float64 if an operand is) and returned, contiguous, as
    `dtype` (default: x's). cos and sin broadcast to x."""
    from kernl.kernels import rotary as kernel

    _check_impl(impl)
    if (
        impl == "triton"
        and torch.float64 not in (x.dtype, cos.dtype, sin.dtype)
        and kernel.rotary_refusal(x, cos, sin) is None
        and triton_usable(x.device, kernel)
    ):
        return kernel.rotary(x, cos, sin, dtype, config=_typed(kernel, config))
    return kernel.rotary_reference(x, cos, sin, dtype).contiguous()


# "kernl.<name>" -> its function: the one table vocabulary.resolve_op reads (no registration
# by import side effect).
OPS = {
    "kernl.linear": linear,
    "kernl.layer_norm": layer_norm,
    "kernl.attention": attention,
    "kernl.qkv_attention": qkv_attention,
    "kernl.mask_to_bias": mask_to_bias,
    "kernl.bert_embeddings": bert_embeddings,
    "kernl.rotary": rotary,
    "kernl.gated_linear": gated_linear,
}
