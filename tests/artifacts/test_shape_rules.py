"""The artifact walk's written-out shape rules (shape_rules.py, and kernl's ops in analysis.py)
give what torch's meta device gives, and a cold check of an encoder artifact no longer imports
torch._dynamo (the seconds a load() spent on it)."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kernl.artifacts import analysis
from kernl.artifacts.shape_rules import (
    ARITHMETIC,
    COMPARISONS,
    FLOAT_FUNCTIONS,
    elementwise_result,
)

SHAPE_PAIRS = [((2, 1, 3), (4, 3)), ((5,), (3, 1)), ((2, 3), ()), ((4,), (3,))]
DTYPES = [torch.int64, torch.float16, torch.float32, torch.bool]


def meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def on_meta(name, overload, *args, **kwargs):
    with torch.device("meta"):
        return getattr(getattr(torch.ops.aten, name), overload)(*args, **kwargs)


def same_or_both_refuse(rule, reference) -> None:
    try:
        expected = reference()
    except (RuntimeError, IndexError, AssertionError):  # torch's meta functions raise all three
        try:
            got = rule()
        except (RuntimeError, IndexError):
            return
        assert got is None, "torch refuses what the rule accepts"  # declined: torch refuses
        return
    got = rule()
    if got is None:
        return  # declined: the walk runs it on the meta device
    assert (tuple(got.shape), got.dtype, got.device.type) == (
        tuple(expected.shape),
        expected.dtype,
        "meta",
    )


@pytest.mark.parametrize("name", sorted(FLOAT_FUNCTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_float_functions_match_meta(name, dtype):
    x = meta((2, 3), dtype)
    same_or_both_refuse(
        lambda: elementwise_result(torch, name, "default", [x], {}),
        lambda: on_meta(name, "default", x),
    )


@pytest.mark.parametrize("name", sorted(COMPARISONS | ARITHMETIC))
@pytest.mark.parametrize("shapes", SHAPE_PAIRS)
@pytest.mark.parametrize(
    "dtypes",
    [(a, a) for a in DTYPES]
    + [(torch.int64, torch.float16), (torch.float16, torch.float32), (torch.bool, torch.int64)],
)
def test_binary_ops_on_tensors_match_meta(name, shapes, dtypes):
    a, b = meta(shapes[0], dtypes[0]), meta(shapes[1], dtypes[1])
    if name in ("maximum", "minimum"):
        overload = "default"
    else:
        overload = "Tensor"
    same_or_both_refuse(
        lambda: elementwise_result(torch, name, overload, [a, b], {}),
        lambda: on_meta(name, overload, a, b),
    )


@pytest.mark.parametrize("name", sorted(COMPARISONS | ARITHMETIC))
@pytest.mark.parametrize("overload", ["Scalar", "Tensor", "default"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scalar", [0, 2.5])
def test_binary_ops_with_a_number_match_meta(name, overload, dtype, scalar):
    op = getattr(torch.ops.aten, name)
    if overload not in op.overloads():
        pytest.skip(f"aten.{name} has no .{overload}")
    a = meta((3, 4), dtype)
    same_or_both_refuse(
        lambda: elementwise_result(torch, name, overload, [a, scalar], {}),
        lambda: on_meta(name, overload, a, scalar),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1, -1, -2, 2, -3])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.int32])
def test_cumsum_matches_meta(dtype, dim, out_dtype):
    x = meta((3, 4), dtype)
    kwargs = {} if out_dtype is None else {"dtype": out_dtype}
    same_or_both_refuse(
        lambda: elementwise_result(torch, "cumsum", "default", [x, dim], kwargs),
        lambda: on_meta("cumsum", "default", x, dim, **kwargs),
    )


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32, torch.float32, torch.bool])
@pytest.mark.parametrize("weight_shape", [(10, 4), (10,), (2, 10, 4)])
@pytest.mark.parametrize("ids_shape", [(2, 5), (7,), ()])
def test_embedding_matches_meta(ids_dtype, weight_shape, ids_shape):
    w, ids = meta(weight_shape, torch.float16), meta(ids_shape, ids_dtype)
    same_or_both_refuse(
        lambda: elementwise_result(torch, "embedding", "default", [w, ids], {}),
        lambda: on_meta("embedding", "default", w, ids),
    )


def test_calls_the_rules_do_not_cover_are_declined():
    x = meta((2, 3), torch.float32)
    assert elementwise_result(torch, "add", "Tensor", [x, x], {"alpha": 2}) is None
    assert elementwise_result(torch, "add", "out", [x, x], {}) is None
    assert elementwise_result(torch, "tanh", "default", [torch.zeros(2)], {}) is None
    assert elementwise_result(torch, "gelu", "default", [x], {}) is None
    assert elementwise_result(torch, "ne", "Scalar", [x, x], {}) is None
    assert elementwise_result(torch, "ne", "Tensor", [x, 2], {}) is None
    c = meta((2,), torch.complex64)
    assert elementwise_result(torch, "exp", "default", [c], {}) is None


def test_kernl_op_rules_match_torch_on_meta():
    x, w, b = meta((2, 5, 8), torch.float16), meta((6, 8), torch.float16), meta((6,), torch.float16)
    for bias in (b, None):
        got = analysis._kernl_linear(x, w, bias)
        with torch.device("meta"):
            ref = F.linear(x, w, bias)
        assert (got.shape, got.dtype) == (ref.shape, ref.dtype)
    n = meta((8,), torch.float16)
    got = analysis._kernl_layer_norm(x, n, n, 1e-5)
    with torch.device("meta"):
        ref = F.layer_norm(x, (8,), n, n, 1e-5)
    assert (got.shape, got.dtype) == (ref.shape, ref.dtype)
    q, k = meta((2, 3, 4, 8), torch.float16), meta((2, 3, 7, 8), torch.float16)
    v = meta((2, 3, 7, 5), torch.float16)
    got = analysis._kernl_attention(q, k, v, mask=meta((2, 1, 1, 7), torch.float16))
    with torch.device("meta"):
        ref = F.scaled_dot_product_attention(q, k, v)
    assert (got.shape, got.dtype) == (ref.shape, ref.dtype)


@pytest.mark.parametrize(
    "call",
    [
        lambda: analysis._kernl_linear(meta((2, 8), torch.float16), meta((6, 7), torch.float16)),
        lambda: analysis._kernl_linear(
            meta((2, 8), torch.float16), meta((6, 8), torch.float16), meta((5,), torch.float16)
        ),
        lambda: analysis._kernl_linear(meta((2, 8), torch.float32), meta((6, 8), torch.float16)),
        lambda: analysis._kernl_layer_norm(
            meta((2, 8), torch.float16), meta((7,), torch.float16), None, 1e-5
        ),
        lambda: analysis._kernl_attention(
            meta((1, 2, 4, 8), torch.float16),
            meta((1, 2, 4, 8), torch.float32),
            meta((1, 2, 4, 8), torch.float16),
        ),
    ],
)
def test_kernl_op_rules_refuse_what_torch_refuses(call):
    with pytest.raises(analysis._Fail):
        call()


def test_the_rules_import_no_compiler_stack():
    """torch.broadcast_shapes, for one, imports sympy: no rule may call such a helper."""
    code = (
        "import sys, torch\n"
        "from kernl.artifacts.shape_rules import elementwise_result as r\n"
        "m = lambda s, d: torch.empty(s, dtype=d, device='meta')\n"
        "a, i = m((2, 1, 3), torch.float16), m((4, 3), torch.int64)\n"
        "for name in ('add', 'mul', 'ne', 'maximum'):\n"
        "    assert r(torch, name, 'Tensor', [a, i], {}) is not None or name == 'maximum'\n"
        "    assert r(torch, name, 'Scalar', [a, 2], {}) is not None or name == 'maximum'\n"
        "assert r(torch, 'tanh', 'default', [i], {}) is not None\n"
        "assert r(torch, 'cumsum', 'default', [i, 1], {}) is not None\n"
        "assert r(torch, 'embedding', 'default', [m((9, 4), torch.float16), i], {}) is not None\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy', 'triton') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_checking_an_encoder_artifact_imports_no_compiler_stack(small_artifact):
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from kernl.artifacts.reader import check_artifact\n"
        f"check_artifact(Path({str(small_artifact)!r}), hash_files=False)\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy', 'triton') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
