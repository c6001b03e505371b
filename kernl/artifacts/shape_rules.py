"""Output shape and dtype of the elementwise aten ops that encoders use, written out for the
artifact walk (analysis.py) instead of run on the meta device.

torch runs these ops' meta functions in Python (torch._refs), and the first such call in a
process imports torch._dynamo, and with it sympy, inductor and triton: 1.4 s of a load() on a
2-core CPU with warm bytecode caches, 4-5 s on an H200 host without them (2026-12-02), for
two elementwise ops of BERT's program (`ne` on the attention mask, `tanh` in the pooler).
The rules are TensorIterator's: the tensors' shapes broadcast, comparisons give bool, the
unary float functions promote integers and bool to the default float dtype, and the dtype
of a binary op is `torch.result_type` (its C++ type promotion). An op or overload not listed
here, or a call with arguments these rules do not cover, goes to the meta device as before;
tests/artifacts/test_shape_rules.py checks each rule against the meta device."""

from __future__ import annotations

from typing import Any

COMPARISONS = frozenset({"eq", "ne", "lt", "le", "gt", "ge"})
FLOAT_FUNCTIONS = frozenset(
    {"tanh", "erf", "exp", "log", "sigmoid", "rsqrt", "sqrt", "sin", "cos", "reciprocal"}
)
ARITHMETIC = frozenset({"add", "sub", "mul", "maximum", "minimum"})
_OVERLOADS = frozenset({"default", "Tensor", "Scalar"})


def elementwise_result(torch, name: str, overload: str, args: list, kwargs: dict) -> Any:
    """A meta tensor of what `aten.<name>.<overload>(*args, **kwargs)` returns, or None when
    the rules here do not cover the call (the caller then runs it on the meta device)."""
    if overload not in _OVERLOADS:
        return None
    if name in FLOAT_FUNCTIONS:
        if kwargs or len(args) != 1 or not _is_meta(torch, args[0]):
            return None
        (x,) = args
        if x.dtype.is_complex:
            return None
        dtype = x.dtype if x.dtype.is_floating_point else torch.get_default_dtype()
        return torch.empty(x.shape, dtype=dtype, device="meta")
    if name in COMPARISONS or name in ARITHMETIC:
        if len(args) != 2 or (kwargs and set(kwargs) != {"alpha"}):
            return None
        if name not in ("add", "sub") and kwargs:
            return None
        a, b = args
        if not _is_meta(torch, a) or not (_is_meta(torch, b) or _is_number(b)):
            return None
        if a.dtype.is_complex or (_is_meta(torch, b) and b.dtype.is_complex):
            return None
        if name not in COMPARISONS and torch.bool in (a.dtype, getattr(b, "dtype", None)):
            return None  # bool arithmetic has its own rules (sub refuses it)
        if name not in COMPARISONS and kwargs.get("alpha", 1) != 1:
            return None
        shape = torch.broadcast_shapes(a.shape, b.shape) if _is_meta(torch, b) else a.shape
        dtype = torch.bool if name in COMPARISONS else torch.result_type(a, b)
        return torch.empty(shape, dtype=dtype, device="meta")
    return None


def _is_meta(torch, x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
