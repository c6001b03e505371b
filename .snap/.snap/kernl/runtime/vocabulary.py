"""The closed vocabulary of op names a program may use, and their resolution to callables.

A name is either "aten.<op>.<overload>" for an op in ATEN_OPS, or "kernl.<op>" for an op
registered by kernl itself. Nothing else resolves: the runtime never evaluates or imports a
name read from an artifact."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from kernl.artifacts.vocabulary import ATEN_OPS, KERNL_OPS

# The names are the format's (kernl/artifacts/vocabulary.py): the reader checks them without
# importing the runtime; here they only resolve to callables.
_NAME = re.compile(r"(aten)\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")

DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "int8",
        "uint8",
        "int16",
        "int32",
        "int64",
        "bool",
    )
}
LAYOUTS = {"strided": torch.strided}
MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "preserve_format": torch.preserve_format,
}


class UnknownOpError(KeyError):
    """An op name outside the vocabulary."""

    def __str__(self) -> str:
        return str(self.args[0])


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
        if name.removeprefix("kernl.") not in KERNL_OPS:
            raise UnknownOpError(f"op {name!r} is not a kernl op this runtime knows")
        from .kernl_ops import OPS  # imported on first use: torch.ops only otherwise

        if name in OPS:
            return OPS[name]
        raise UnknownOpError(f"op {name!r} is not a kernl op this runtime knows")
    m = _NAME.fullmatch(name)
    if not m or m.group(2) not in ATEN_OPS:
        raise UnknownOpError(f"op {name!r} is outside kernl's vocabulary")
    packet = getattr(torch.ops.aten, m.group(2))
    overload = m.group(3)
    if overload not in packet.overloads():
        raise UnknownOpError(f"op {name!r}: aten.{m.group(2)} has no overload {overload!r}")
    return getattr(packet, overload)
