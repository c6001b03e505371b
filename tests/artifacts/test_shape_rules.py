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
    aten_result,
    elementwise_result,
)
from kernl.runtime import kernl_ops

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
        got = analysis._kernl_linear(x, w, bias, counters=meta((4096,), torch.int32))
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
    x, w, b = meta((2, 7, 8), torch.float16), meta((24, 8), torch.float16), meta((24,), F16)
    for bias in (meta((2, 1, 1, 7), torch.float32), None):
        got = analysis._kernl_qkv_attention(x, w, b, bias, None, 2)
        ref = kernl_ops.qkv_attention(x, w, b, bias, None, 2)
        assert (got.shape, got.dtype) == (ref.shape, ref.dtype)
    mask = meta((2, 1, 1, 7), torch.bool)
    got = analysis._kernl_mask_to_bias(mask, torch.float16)
    ref = kernl_ops.mask_to_bias(mask, torch.float16)
    assert (got.shape, got.dtype) == (ref.shape, ref.dtype)
    x, w = meta((2, 5, 8), F16), meta((12, 8), F16)
    for bias in (meta((12,), F16), None):
        got = analysis._kernl_gated_linear(x, w, bias, "gelu")
        ref = kernl_ops.gated_linear(x, w, bias, "gelu")
        assert (got.shape, got.dtype) == (ref.shape, ref.dtype)
    x, cos = meta((2, 3, 7, 8), F16), meta((1, 1, 7, 8), F32)
    for dtype in (None, F32):
        got = analysis._kernl_rotary(x, cos, cos, dtype)
        ref = kernl_ops.rotary(x, cos, cos, dtype)
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
        lambda: analysis._kernl_mask_to_bias(meta((2, 1, 1, 4), torch.int64), torch.float32),
        # the fused QKV + attention: a [3C, C] weight, heads dividing C, a per-key float bias
        lambda: analysis._kernl_qkv_attention(
            meta((2, 7, 8), F16), meta((16, 8), F16), None, None, None, 2
        ),
        lambda: analysis._kernl_qkv_attention(
            meta((2, 7, 8), F16), meta((24, 8), F16), None, None, None, 3
        ),
        lambda: analysis._kernl_qkv_attention(
            meta((2, 7, 8), F16), meta((24, 8), F16), None, meta((2, 1, 7, 7), F32), None, 2
        ),
        lambda: analysis._kernl_qkv_attention(
            meta((2, 7, 8), F16), meta((24, 8), F16), None, meta((2, 1, 1, 7), BOOL), None, 2
        ),
        lambda: analysis._kernl_qkv_attention(
            meta((2, 7, 8), F16), meta((24, 8), F32), None, None, None, 2
        ),
        # what the fused kernel cannot take, as its launcher refuses it at load
        lambda: analysis._kernl_qkv_attention(
            meta((2, 7, 96), F16), meta((288, 96), F16), None, None, None, 2, impl="triton"
        ),
        lambda: analysis._kernl_qkv_attention(
            meta((2, 129, 64), F16), meta((192, 64), F16), None, None, None, 2, impl="triton"
        ),
        # gated_linear: an even number of weight rows, a known activation, one dtype
        lambda: analysis._kernl_gated_linear(meta((2, 8), F16), meta((7, 8), F16)),
        lambda: analysis._kernl_gated_linear(meta((2, 8), F16), meta((6, 8), F16), None, "swish"),
        lambda: analysis._kernl_gated_linear(meta((2, 8), F16), meta((6, 8), F32)),
        lambda: analysis._kernl_gated_linear(meta((2, 8), F16), meta((6, 8), F16), meta((3,), F16)),
        # a bias the kernels would read past: one element expanded to the row (review, 2026-12-06)
        lambda: analysis._kernl_gated_linear(
            meta((2, 8), F16), meta((6, 8), F16), meta((1,), F16).expand(6)
        ),
        lambda: analysis._kernl_linear(
            meta((2, 8), F16), meta((6, 8), F16), meta((1,), F16).expand(6)
        ),
        # rotary: an even last axis, tables that broadcast to x (and no further), floats
        lambda: analysis._kernl_rotary(meta((2, 7), F16), meta((7,), F16), meta((7,), F16)),
        lambda: analysis._kernl_rotary(meta((1, 7, 8), F16), meta((2, 7, 8), F16), meta((8,), F16)),
        lambda: analysis._kernl_rotary(meta((2, 7, 8), F16), meta((6, 8), F16), meta((8,), F16)),
        lambda: analysis._kernl_rotary(
            meta((1, 2, 2, 7, 8), F16), meta((8,), F16), meta((8,), F16)
        ),
        lambda: analysis._kernl_rotary(meta((2, 7, 8), I64), meta((8,), F16), meta((8,), F16)),
        lambda: analysis._kernl_rotary(meta((2, 7, 8), F16), meta((8,), F16), meta((8,), F16), I64),
        # the split-K kernel's arrival counters: a 1-d int32 buffer, nothing else
        lambda: analysis._kernl_linear(
            meta((2, 8), torch.float16),
            meta((6, 8), torch.float16),
            counters=meta((4096,), torch.float32),
        ),
        lambda: analysis._kernl_linear(
            meta((2, 8), torch.float16),
            meta((6, 8), torch.float16),
            counters=meta((64, 64), torch.int32),
        ),
    ],
)
def test_kernl_op_rules_refuse_what_torch_refuses(call):
    with pytest.raises(analysis._Fail):
        call()


F16, F32, I64, BOOL = torch.float16, torch.float32, torch.int64, torch.bool

# (op, overload, args as (shape, dtype) for a meta tensor or a plain value, kwargs): the
# layers of a --no-kernels artifact, well-formed and not
LAYER_CALLS = [
    ("linear", [((2, 5, 8), F16), ((6, 8), F16), ((6,), F16)], {}),
    ("linear", [((2, 5, 8), F32), ((6, 8), F32)], {}),
    ("linear", [((8,), F32), ((6, 8), F32)], {}),
    ("linear", [((2, 8), F16), ((6, 7), F16)], {}),
    ("linear", [((2, 8), F32), ((6, 8), F16)], {}),
    ("linear", [((2, 8), F16), ((6, 8), F16), ((5,), F16)], {}),
    ("linear", [((2, 8), F16), ((6, 8), F16), ((2, 6), F16)], {}),
    ("linear", [((2, 8), I64), ((6, 8), I64)], {}),
    ("layer_norm", [((2, 5, 8), F16), [8], ((8,), F16), ((8,), F16), 1e-12, False], {}),
    ("layer_norm", [((2, 5, 8), F32), [5, 8], None, None, 1e-5], {}),
    ("layer_norm", [((2, 5, 8), F32), [8]], {}),
    ("layer_norm", [((2, 5, 8), F32), [7], ((7,), F32), None, 1e-5], {}),
    ("layer_norm", [((2, 5, 8), F32), [8], ((7,), F32), None, 1e-5], {}),
    ("layer_norm", [((2, 5, 8), F16), [8], ((8,), F32), ((8,), F32), 1e-5], {}),
    ("layer_norm", [((8,), F32), [2, 8]], {}),
    ("scaled_dot_product_attention", [((2, 3, 4, 8), F16)] * 3, {}),
    ("scaled_dot_product_attention", [((2, 3, 4, 8), F32)] * 3 + [((2, 1, 1, 4), BOOL)], {}),
    ("scaled_dot_product_attention", [((2, 3, 4, 8), F32)] * 3 + [((2, 1, 4, 4), F32)], {}),
    (
        "scaled_dot_product_attention",
        [((2, 3, 4, 8), F16), ((2, 3, 7, 8), F16), ((2, 3, 7, 5), F16), ((2, 1, 4, 7), BOOL)],
        {"scale": 0.125},
    ),
    ("scaled_dot_product_attention", [((2, 3, 4, 8), F32)] * 3 + [((2, 1, 1, 5), BOOL)], {}),
    ("scaled_dot_product_attention", [((2, 3, 4, 8), F32)] * 3 + [((2, 1, 4, 4), F16)], {}),
    (
        "scaled_dot_product_attention",
        [((2, 3, 4, 8), F32), ((2, 3, 4, 8), F16), ((2, 3, 4, 8), F32)],
        {},
    ),
    (
        "scaled_dot_product_attention",
        [((2, 3, 4, 8), F32), ((2, 3, 5, 8), F32), ((2, 3, 4, 8), F32)],
        {},
    ),
    ("scaled_dot_product_attention", [((2, 3, 4, 8), F32)] * 3 + [None, 0.0, True], {}),
    ("gelu", [((2, 8), F16)], {}),
    ("gelu", [((2, 8), F32)], {"approximate": "tanh"}),
    ("gelu", [((2, 8), F32)], {"approximate": "erf"}),
    ("gelu", [((2, 8), I64)], {}),
    ("__and__", [((2, 1, 4), BOOL), ((3, 4), BOOL)], {}),
    ("__and__", [((2, 4), I64), ((4,), BOOL)], {}),
    ("__and__", [((2, 4), BOOL), ((3,), BOOL)], {}),
    ("__and__", [((2, 4), F32), ((4,), F32)], {}),
    ("bitwise_and", [((2, 4), BOOL), ((2, 4), BOOL)], {}),
    ("arange", [5], {"device": "meta", "pin_memory": False}),
    ("arange", [0], {"device": "meta", "dtype": F32}),
    ("arange", [5], {"device": "meta", "dtype": BOOL}),
    ("index", [((4, 6, 3), F32), [((2, 1), I64), ((5,), I64)]], {}),
    ("index", [((4, 6), BOOL), [((2, 5), torch.int32)]], {}),
    ("index", [((4, 6), F32), [((2,), I64), ((3,), I64)]], {}),
    ("index", [((4,), F32), [((2,), I64), ((2,), I64)]], {}),
    ("index", [((4, 6), F32), [((4, 6), BOOL)]], {}),
]


def _value(spec):
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], torch.dtype):
        return meta(*spec)
    return spec


@pytest.mark.parametrize(("name", "args", "kwargs"), LAYER_CALLS, ids=lambda x: None)
def test_layer_rules_match_meta(name, args, kwargs):
    args = [_value(a) for a in args]
    kwargs = {k: torch.device("meta") if k == "device" else v for k, v in kwargs.items()}
    overload = "Tensor" if name in ("__and__", "bitwise_and", "index") else "default"
    same_or_both_refuse(
        lambda: aten_result(torch, name, overload, args, kwargs),
        lambda: on_meta(name, overload, *args, **kwargs),
    )


@pytest.mark.parametrize(
    ("args", "dtype"), [([2, 7], None), ([0, 0], F32), ([3, 3], I64), ([5, 2], None)]
)
def test_arange_from_a_start_matches_meta(args, dtype):
    kwargs = {"device": torch.device("meta"), "pin_memory": False}
    if dtype is not None:
        kwargs["dtype"] = dtype
    same_or_both_refuse(
        lambda: aten_result(torch, "arange", "start", args, kwargs),
        lambda: on_meta("arange", "start", *args, **kwargs),
    )


def test_the_layer_rules_answer_the_plain_calls():
    """What a --no-kernels BERT program calls is answered by a rule, not declined."""
    x, w, b = meta((2, 5, 8), F16), meta((6, 8), F16), meta((6,), F16)
    n, q = meta((8,), F16), meta((2, 3, 4, 8), F16)
    mask, ids = meta((2, 1, 4, 4), BOOL), meta((2, 1), I64)
    calls = [
        ("linear", "default", [x, w, b], {}),
        ("layer_norm", "default", [x, [8], n, n, 1e-12, False], {}),
        ("scaled_dot_product_attention", "default", [q, q, q, mask], {"scale": 0.125}),
        ("gelu", "default", [x], {}),
        ("__and__", "Tensor", [mask, mask], {}),
        ("arange", "default", [4], {"device": torch.device("meta"), "pin_memory": False}),
        # transformers 5.0's BERT family: cache_position = arange(past, past + seq)
        ("arange", "start", [0, 4], {"device": torch.device("meta"), "pin_memory": False}),
        ("index", "Tensor", [meta((2, 4), BOOL), [ids, meta((4,), I64)]], {}),
    ]
    for name, overload, args, kwargs in calls:
        assert aten_result(torch, name, overload, args, kwargs) is not None, name


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
        "from kernl.artifacts.shape_rules import aten_result as l\n"
        "w, n, q = m((6, 3), torch.float16), m((3,), torch.float16), m((1, 2, 4, 8), torch.float16)\n"
        "assert l(torch, 'linear', 'default', [a, w, m((6,), torch.float16)], {}) is not None\n"
        "assert l(torch, 'layer_norm', 'default', [a, [3], n, n, 1e-5], {}) is not None\n"
        "assert l(torch, 'scaled_dot_product_attention', 'default', [q, q, q], {}) is not None\n"
        "assert l(torch, 'gelu', 'default', [a], {}) is not None\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy', 'triton') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.fixture(scope="module")
def small_artifact_without_kernels(tmp_path_factory):
    from artifact_edit import compile_small

    out = tmp_path_factory.mktemp("no-kernels") / "bert.kernl"
    compile_small(out, buckets="batch=1,2 seq=8", kernels=False)
    return out


@pytest.mark.parametrize("kernels", [True, False])
def test_checking_an_encoder_artifact_imports_no_compiler_stack(kernels, small_artifact, request):
    """With kernl's ops, and without them (--no-kernels: aten's layers in the program). Nor
    the causal-LM description's module: source a process without bytecode caches compiles."""
    if not kernels:
        small_artifact = request.getfixturevalue("small_artifact_without_kernels")
    heavy = ("torch._dynamo", "sympy", "triton", "kernl.artifacts.generation")
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from kernl.artifacts.reader import check_artifact\n"
        f"check_artifact(Path({str(small_artifact)!r}), hash_files=False)\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
