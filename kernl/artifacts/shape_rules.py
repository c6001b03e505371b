"""Output shape and dtype of the aten ops that encoders use, written out for the artifact
walk (analysis.py) instead of run on the meta device: elementwise ops, and the layers of an
artifact compiled without kernl's kernels (`--no-kernels`: linear, layer_norm,
scaled_dot_product_attention, gelu, and the padding mask's arange, index and `&`, whose meta
functions made the check of a BERT-base artifact 2.6 s on a 2-core CPU, 2026-12-02).

torch runs these ops' meta functions in Python (torch._refs), and the first such call in a
process imports torch._dynamo, and with it sympy, inductor and triton: 1.4 s of a load() on a
2-core CPU with warm bytecode caches, 4-5 s on an H200 host without them (2026-12-02), for
two elementwise ops of BERT's program (`ne` on the attention mask, `tanh` in the pooler).
RoBERTa's position ids (`cumsum`) and DistilBERT's tables (`embedding`) have the same Python
meta functions. The elementwise rules are TensorIterator's: the tensors' shapes broadcast,
comparisons give bool, the unary float functions promote integers and bool to the default
float dtype, and the dtype of a binary op is `torch.result_type` (its C++ type promotion).
An op or overload not listed here, or a call with arguments these rules do not cover, goes
to the meta device as before; tests/artifacts/test_shape_rules.py checks each rule against
the meta device."""

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


def aten_result(torch, name: str, overload: str, args: list, kwargs: dict) -> Any:
    """A meta tensor of what `aten.<name>.<overload>(*args, **kwargs)` returns, by the rules
    written out here, or None (the caller then runs the op on the meta device)."""
    rule = _LAYER_RULES.get((name, overload))
    if rule is not None:
        return rule(torch, args, kwargs)
    return elementwise_result(torch, name, overload, args, kwargs)


# -- the layers of an artifact compiled without kernl's kernels (--no-kernels): torch's meta
# functions of these are Python references too. Each rule takes the plain, well-formed call
# only and declines anything else (None): the meta device then decides, refusals included.


def _linear(torch, args: list, kwargs: dict):
    if kwargs or len(args) not in (2, 3):
        return None
    x, weight, bias = (*args, None)[:3]
    if not (_is_float(torch, x) and _is_float(torch, weight)) or x.dim() < 1:
        return None
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or weight.dtype != x.dtype:
        return None
    if bias is not None and not (
        _is_float(torch, bias) and bias.dtype == x.dtype and tuple(bias.shape) == (weight.shape[0],)
    ):
        return None
    return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device="meta")


def _layer_norm(torch, args: list, kwargs: dict):
    if kwargs or not 2 <= len(args) <= 6:
        return None
    x, shape, weight, bias = (*args, None, None)[:4]
    if not _is_float(torch, x) or not isinstance(shape, (list, tuple)) or not shape:
        return None
    if not all(_is_int(n) for n in shape) or tuple(x.shape[-len(shape) :]) != tuple(shape):
        return None
    if not all(_is_number(a) for a in args[4:5]):  # eps
        return None
    if args[5:6] not in ([], [True], [False]):  # cudnn_enable
        return None
    for t in (weight, bias):
        if t is not None and not (
            _is_float(torch, t) and t.dtype == x.dtype and tuple(t.shape) == tuple(shape)
        ):
            return None
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


def _attention(torch, args: list, kwargs: dict):
    """scaled_dot_product_attention of one head count for q, k and v, no dropout."""
    if set(kwargs) - {"scale"} or not 3 <= len(args) <= 6 or args[4:5] not in ([], [0.0]):
        return None
    q, k, v, mask = (*args, None)[:4]
    if not all(_is_float(torch, t) and t.dtype == q.dtype and t.dim() == 4 for t in (q, k, v)):
        return None
    if not q.shape[:2] == k.shape[:2] == v.shape[:2] or q.shape[3] != k.shape[3]:
        return None
    if k.shape[2] != v.shape[2] or args[5:6] not in ([], [False]):
        return None
    if mask is not None:
        if not _is_meta(torch, mask) or mask.dtype not in (torch.bool, q.dtype):
            return None
        try:
            if _broadcast(mask.shape, (*q.shape[:3], k.shape[2])) != (*q.shape[:3], k.shape[2]):
                return None
        except RuntimeError:
            return None
    if not (kwargs.get("scale") is None or _is_number(kwargs["scale"])):
        return None
    return torch.empty((*q.shape[:3], v.shape[3]), dtype=q.dtype, device="meta")


def _gelu(torch, args: list, kwargs: dict):
    if len(args) != 1 or set(kwargs) - {"approximate"} or not _is_float(torch, args[0]):
        return None
    if kwargs.get("approximate", "none") not in ("none", "tanh"):
        return None
    return torch.empty(args[0].shape, dtype=args[0].dtype, device="meta")


def _bitwise_and(torch, args: list, kwargs: dict):
    """The padding mask's `&` of two bool (or integer) tensors."""
    if kwargs or len(args) != 2 or not all(_is_meta(torch, t) for t in args):
        return None
    a, b = args
    if any(t.dtype.is_floating_point or t.dtype.is_complex for t in (a, b)):
        return None
    try:
        shape = _broadcast(a.shape, b.shape)
    except RuntimeError:
        return None
    return torch.empty(shape, dtype=torch.result_type(a, b), device="meta")


def _arange(torch, args: list, kwargs: dict):
    """arange(end) of a whole number, on the meta device the walk gives every factory."""
    if len(args) != 1 or not _is_int(args[0]) or args[0] < 0:
        return None
    return _arange_of(torch, args[0], kwargs)


def _arange_start(torch, args: list, kwargs: dict):
    """arange(start, end) of whole numbers: transformers 5.0's BERT family made its
    cache_position so (torch's own meta rule imports sympy: +0.23 s on every load)."""
    if len(args) != 2 or not all(_is_int(a) for a in args) or not 0 <= args[0] <= args[1]:
        return None
    return _arange_of(torch, args[1] - args[0], kwargs)


def _arange_of(torch, length: int, kwargs: dict):
    if set(kwargs) - {"dtype", "layout", "device", "pin_memory"}:
        return None
    device = kwargs.get("device")
    if not isinstance(device, torch.device) or device.type != "meta":
        return None
    if kwargs.get("layout") not in (None, torch.strided):
        return None
    if kwargs.get("pin_memory") not in (None, False):
        return None
    dtype = kwargs.get("dtype")
    if dtype not in (None, torch.int64, torch.int32, torch.float32, torch.float16, torch.float64):
        return None
    return torch.empty((length,), dtype=dtype or torch.int64, device="meta")


def _index(torch, args: list, kwargs: dict):
    """x[i, j, ...] by integer index tensors on the leading axes (the padding mask's gather;
    the walk checks the indices' bounds): their broadcast shape, then x's remaining axes."""
    if kwargs or len(args) != 2 or not _is_meta(torch, args[0]):
        return None
    x, indices = args
    if not isinstance(indices, (list, tuple)) or not 0 < len(indices) <= x.dim():
        return None
    shape: tuple[int, ...] = ()
    for i in indices:
        if not _is_meta(torch, i) or i.dtype not in (torch.int64, torch.int32):
            return None
        try:
            shape = _broadcast(shape, i.shape)
        except RuntimeError:
            return None
    return torch.empty((*shape, *x.shape[len(indices) :]), dtype=x.dtype, device="meta")


_LAYER_RULES = {
    ("linear", "default"): _linear,
    ("layer_norm", "default"): _layer_norm,
    ("scaled_dot_product_attention", "default"): _attention,
    ("gelu", "default"): _gelu,
    ("__and__", "Tensor"): _bitwise_and,
    ("bitwise_and", "Tensor"): _bitwise_and,
    ("arange", "default"): _arange,
    ("arange", "start"): _arange_start,
    ("index", "Tensor"): _index,
}


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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_float(torch, x) -> bool:
    return _is_meta(torch, x) and x.dtype.is_floating_point
