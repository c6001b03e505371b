"""The closed vocabulary of op names a program may use, and their resolution to callables.

A name is either "aten.<op>.<overload>" for an op in ATEN_OPS, or "kernl.<op>" for an op
registered by kernl itself. Nothing else resolves: the runtime never evaluates or imports a
name read from an artifact."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

# Pure tensor computations that exported transformer graphs use. Extending this set is a
# deliberate act (a reviewed change), never something an artifact can ask for.
ATEN_OPS = frozenset(
    """
    abs add addmm alias all any arange argmax argmin as_strided baddbmm bitwise_and
    bitwise_not bitwise_or bitwise_xor bmm cat chunk clamp clamp_max clamp_min clone
    contiguous copy cos cumsum detach div embedding empty empty_like eq erf exp expand
    expand_as fill fill_ flatten floor full full_like gather ge gelu gt index index_select
    isinf isnan layer_norm le leaky_relu lift_fresh_copy linear log log_softmax logical_and
    logical_not logical_or lt masked_fill matmul max maximum mean min minimum mm mul
    native_layer_norm ne neg new_ones new_zeros new_full new_empty ones ones_like permute pow
    reciprocal relu remainder repeat reshape rsqrt scalar_tensor scaled_dot_product_attention
    select sigmoid silu sin slice softmax split split_with_sizes sqrt squeeze stack sub sum
    t tanh to transpose tril triu type_as unbind unflatten unsqueeze unsafe_split view where
    zeros zeros_like __and__ __or__ __xor__ __invert__ _to_copy _softmax _log_softmax
    _unsafe_view rsub bitwise_left_shift bitwise_right_shift sort topk hardtanh mish
    """.split()
)

_NAME = re.compile(r"^(aten)\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")
_KERNL_OPS: dict[str, Callable] = {}

DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32",
        "int64", "bool",
    )
}  # fmt: skip
LAYOUTS = {"strided": torch.strided}
MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "preserve_format": torch.preserve_format,
}


class UnknownOpError(KeyError):
    """An op name outside the vocabulary."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_kernl_op(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make `fn` available to programs as "kernl.<name>"."""

    def wrap(fn: Callable) -> Callable:
        _KERNL_OPS[f"kernl.{name}"] = fn
        return fn

    return wrap


def is_known_op(name: str) -> bool:
    try:
        resolve_op(name)
    except UnknownOpError:
        return False
    return True


def resolve_op(name: str) -> Callable:
    if not isinstance(name, str):
        raise UnknownOpError(f"op name {name!r} is not a string")
    if name.startswith("kernl."):
        if name not in _KERNL_OPS:
            _load_kernl_ops()
        if name in _KERNL_OPS:
            return _KERNL_OPS[name]
        raise UnknownOpError(f"op {name!r} is not a kernl op this runtime knows")
    m = _NAME.match(name)
    if not m or m.group(2) not in ATEN_OPS:
        raise UnknownOpError(f"op {name!r} is outside kernl's vocabulary")
    packet = getattr(torch.ops.aten, m.group(2))
    overload = m.group(3)
    if overload not in packet.overloads():
        raise UnknownOpError(f"op {name!r}: aten.{m.group(2)} has no overload {overload!r}")
    return getattr(packet, overload)


def _load_kernl_ops() -> None:
    # kernl's own ops live with the runtime; importing them registers them.
    from . import kernl_ops  # noqa: F401
