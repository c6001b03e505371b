"""replace_spelled_gelu alone: GELU written out in elementwise ops (transformers' gelu_new,
FastGELU, ESM's erf form) becomes aten.gelu; trees that are another function stay."""

import math

from program_builder import Builder, assert_same_function

from kernl.compiler.passes import fuse_linear, replace_spelled_gelu

X = [2, 5, 8]
MUL, ADD, DIV = "aten.mul.Tensor", "aten.add.Tensor", "aten.div.Tensor"
TANH, POW, ERF = "aten.tanh.default", "aten.pow.Tensor_Scalar", "aten.erf.default"


def gelu_new(b, x, c=0.044715, name="out"):
    """NewGELUActivation: 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + c * x^3)))."""
    half = b.op(MUL, x, 0.5, shape=X)
    cube = b.op(POW, x, 3.0, shape=X)
    inner = b.op(ADD, x, b.op(MUL, cube, c, shape=X), shape=X)
    t = b.op(TANH, b.op(MUL, inner, math.sqrt(2.0 / math.pi), shape=X), shape=X)
    return b.op(MUL, half, b.op(ADD, t, 1.0, shape=X), shape=X, name=name)


def erf_gelu(b, x, name="out"):
    """ESM's gelu: x * 0.5 * (1 + erf(x / sqrt(2)))."""
    half = b.op(MUL, x, 0.5, shape=X)
    e = b.op(ERF, b.op(DIV, x, math.sqrt(2.0), shape=X), shape=X)
    return b.op(MUL, half, b.op(ADD, e, 1.0, shape=X), shape=X, name=name)


def fast_gelu(b, x, name="out"):
    """FastGELUActivation: 0.5 * x * (1 + tanh(x * 0.7978845608 * (1 + 0.044715 * x * x)))."""
    sq = b.op(MUL, x, x, shape=X)
    poly = b.op(ADD, b.op(MUL, sq, 0.044715, shape=X), 1.0, shape=X)
    arg = b.op(MUL, b.op(MUL, x, 0.7978845608, shape=X), poly, shape=X)
    t = b.op(ADD, b.op(TANH, arg, shape=X), 1.0, shape=X)
    return b.op(MUL, b.op(MUL, x, 0.5, shape=X), t, shape=X, name=name)


def test_each_spelling_becomes_aten_gelu():
    b = Builder()
    x = b.input("x", X)
    outs = [gelu_new(b, x, name="new"), erf_gelu(b, x, name="erf")]
    before = b.program(*outs)
    after = replace_spelled_gelu(b.program(*outs))
    assert b.show(after) == [
        "aten.gelu.default(x; approximate='tanh') -> new",
        "aten.gelu.default(x) -> erf",
    ]
    assert_same_function(before, after, b)


def test_fast_gelu_matches_the_tanh_form_to_its_constant_s_digits_only():
    """0.7978845608 is sqrt(2 / pi) to 1e-11: close enough to be GELU's tanh form."""
    b = Builder()
    out = fast_gelu(b, b.input("x", X))
    before = b.program(out)
    after = replace_spelled_gelu(b.program(out))
    assert b.show(after) == ["aten.gelu.default(x; approximate='tanh') -> out"]
    assert_same_function(before, after, b)


def test_after_a_linear_it_goes_into_the_epilogue():
    b = Builder()
    x, w = b.input("x", [2, 5, 4]), b.weight("w", [8, 4])
    h = b.op("aten.linear.default", x, w, shape=X, name="h")
    out = gelu_new(b, h)
    before = b.program(out)
    after = fuse_linear(replace_spelled_gelu(b.program(out)))
    assert b.show(after) == ["kernl.linear(x, w, None; activation='gelu_tanh') -> out"]
    assert_same_function(before, after, b)


def test_trees_that_are_another_function_stay():
    b = Builder()
    x, y = b.input("x", X), b.input("y", X)
    outs = [gelu_new(b, x, c=0.045, name="o1")]  # another constant
    half = b.op(MUL, y, 0.5, shape=X)  # erf of y, times x: two tensors
    e = b.op(ERF, b.op(DIV, x, math.sqrt(2.0), shape=X), shape=X)
    outs.append(b.op(MUL, half, b.op(ADD, e, 1.0, shape=X), shape=X, name="o2"))
    three = b.op(MUL, b.op(MUL, b.op(MUL, x, 0.5, shape=X), 2.0, shape=X), 3.0, shape=X, name="o3")
    outs.append(three)  # a scaling: no GELU
    before = b.program(*outs)
    after = replace_spelled_gelu(b.program(*outs))
    assert not any(line.startswith("aten.gelu") for line in b.show(after))
    assert_same_function(before, after, b)
