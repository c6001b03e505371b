"""Output shape and dtype of the elementwise aten ops that encoders use, written out for the
artifact walk (analysis.py) instead of run on the meta device.

torch runs these ops' meta functions in Python (torch._refs), and the first such call in a
process imports torch._dynamo, and with it sympy, inductor and triton: 1.4 s of a load() on a
2-core CPU with warm bytecode caches, 4-5 s on an H200 host without them (2026-12-02), for
two elementwise ops of BERT's program (`ne` on the attention mask, `tanh` in the pooler).
RoBERTa's position ids (`cumsum`) and DistilBERT's tables (`embedding`) have the same Python
meta functions. The elementwise rules are TensorIterator's: the tensors' shapes broadcast,
comparisons give bool, the unary float functions promote integers and bool to the default
float dtype, and the dtype of a binary op is `torch.result_type` (its C++ type promotion). An op or overload not listed
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
    if name == "cumsum" and overload == "default":
        return _cumsum(torch, args, kwargs)
    if name == "embedding" and overload == "default":
        return _embedding(torch, args, kwargs)
    if name in COMPARISONS or name in ARITHMETIC:
        allowed = {"alpha"} if name in ("add", "sub") else set()
        if len(args) != 2 or set(kwargs) - allowed or kwargs.get("alpha", 1) != 1:
            return None
        if (overload == "default") != (name in ("maximum", "minimum")):
            return None  # add.default and the like are arithmetic on Python numbers
        a, b = args
        if not _is_meta(torch, a) or not (_is_meta(torch, b) or _is_number(b)):
            return None
        # a .Scalar overload takes a number; add, sub and mul's .Tensor a number too (a
        # wrapped scalar), the others a tensor alone: anything else is torch's to refuse
        takes_number = overload == "Scalar" or name in ("add", "sub", "mul")
        if (overload == "Scalar" and not _is_number(b)) or (_is_number(b) and not takes_number):
            return None
        if a.dtype.is_complex or (_is_meta(torch, b) and b.dtype.is_complex):
            return None
        if name not in COMPARISONS and torch.bool in (a.dtype, getattr(b, "dtype", None)):
            return None  # bool arithmetic has its own rules (sub refuses it)
        shape = _broadcast(a.shape, b.shape) if _is_meta(torch, b) else a.shape
        dtype = torch.bool if name in COMPARISONS else torch.result_type(a, b)
        return torch.empty(shape, dtype=dtype, device="meta")
    return None


def _cumsum(torch, args: list, kwargs: dict):
    """RoBERTa's position ids: integers and bool sum in int64 unless a dtype is given."""
    if len(args) != 2 or set(kwargs) - {"dtype"} or not _is_meta(torch, args[0]):
        return None
    x, dim = args
    if not isinstance(dim, int) or isinstance(dim, bool):
        return None
    ndim = max(x.dim(), 1)
    if not -ndim <= dim < ndim:
        raise RuntimeError(f"cumsum: dim {dim} out of range for a {x.dim()}-d tensor")
    dtype = kwargs.get("dtype")
    if dtype is None:
        floating = x.dtype.is_floating_point or x.dtype.is_complex
        dtype = x.dtype if floating else torch.int64
    if not isinstance(dtype, torch.dtype):
        return None
    return torch.empty(x.shape, dtype=dtype, device="meta")


def _embedding(torch, args: list, kwargs: dict):
    """DistilBERT's tables: rows of a 2-D weight gathered by integer ids (their bounds are
    the walk's gather check)."""
    if not 2 <= len(args) <= 5 or kwargs:
        return None
    weight, ids = args[0], args[1]
    if not (_is_meta(torch, weight) and _is_meta(torch, ids)):
        return None
    if weight.dim() != 2:
        raise RuntimeError("embedding: the weight must be 2-D")
    if ids.dtype not in (torch.int64, torch.int32):
        raise RuntimeError(f"embedding: indices must be int64 or int32, not {ids.dtype}")
    return torch.empty((*ids.shape, weight.shape[1]), dtype=weight.dtype, device="meta")


def _broadcast(a, b) -> tuple[int, ...]:
    """torch's broadcasting of two shapes (`torch.broadcast_shapes` imports sympy)."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x != y and 1 not in (x, y):
            raise RuntimeError(f"shapes {list(a)} and {list(b)} do not broadcast")
        out.append(y if x == 1 else x)
    return tuple(reversed(out))


def _is_meta(torch, x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
