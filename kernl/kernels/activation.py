"""The activations kernl's linear kernels apply in their epilogue, on the fp32 accumulator
(`_activation`, inside a kernel), and the same functions in plain PyTorch (the references)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .jit import jit, tl

# "tanh": BERT's pooler, whose dense layer + tanh were two launches at the end of a call
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "tanh")


@jit
def _activation(y, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == "gelu":
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # tanh(u) = 2 sigmoid(2u) - 1; saturates correctly at both ends
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0))
    elif ACTIVATION == "silu":
        y = y / (1.0 + tl.exp(-y))
    elif ACTIVATION == "tanh":
        y = 2.0 / (1.0 + tl.exp(-2.0 * y)) - 1.0  # saturates to -1 and 1 without inf / inf
    return y


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "silu":
        return F.silu(y)
    if activation == "tanh":
        return torch.tanh(y)
    raise ValueError(f"unknown activation {activation!r}")
