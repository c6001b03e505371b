"""fuse_gated_linear alone: `a, b = linear(x).chunk(2, -1); act(a) * b` becomes
kernl.gated_linear; forms that compute another function, or need the halves, stay."""

from program_builder import Builder, assert_same_function

from kernl.compiler.passes import fuse_gated_linear, fuse_linear

X, W, H, HALF = [2, 5, 8], [12, 8], [2, 5, 12], [2, 5, 6]


def geglu(b, x, w, bias=None, act="aten.gelu.default", swap=False, name="out"):
    lin = b.op("aten.linear.default", x, w, bias, shape=H)
    a, g = b.op("aten.chunk.default", lin, 2, -1, shape=[HALF, HALF])
    first, second = (g, a) if swap else (a, g)
    return b.op("aten.mul.Tensor", b.op(act, first, shape=HALF), second, shape=HALF, name=name)


def test_modernbert_s_geglu_becomes_one_op():
    b = Builder()
    x, w, bias = b.input("x", X), b.weight("w", W), b.weight("b", [12])
    out = geglu(b, x, w, bias)
    before = b.program(out)
    after = fuse_gated_linear(fuse_linear(b.program(out)))
    assert b.show(after) == ["kernl.gated_linear(x, w, b; activation='gelu') -> out"]
    assert_same_function(before, after, b)


def test_silu_without_bias_and_either_operand_order_of_the_product():
    b = Builder()
    x, w = b.input("x", X), b.weight("w", W)
    lin = b.op("aten.linear.default", x, w, shape=H)
    a, g = b.op("aten.chunk.default", lin, 2, -1, shape=[HALF, HALF])
    out = b.op("aten.mul.Tensor", g, b.op("aten.silu.default", a, shape=HALF), shape=HALF,
               name="out")  # fmt: skip
    before = b.program(out)
    after = fuse_gated_linear(fuse_linear(b.program(out)))
    assert b.show(after) == ["kernl.gated_linear(x, w, None; activation='silu') -> out"]
    assert_same_function(before, after, b)


def test_forms_that_are_another_function_stay():
    b = Builder()
    x, w = b.input("x", X), b.weight("w", W)
    outs = [geglu(b, x, w, swap=True, name="o1")]  # the activation on the second half
    lin = b.op("aten.linear.default", x, w, shape=H, name="h")  # the projection is read again
    a, g = b.op("aten.chunk.default", lin, 2, -1, shape=[HALF, HALF])
    outs.append(b.op("aten.mul.Tensor", b.op("aten.gelu.default", a, shape=HALF), g, shape=HALF))
    outs.append(lin)
    before = b.program(*outs)
    after = fuse_gated_linear(fuse_linear(b.program(*outs)))
    assert not any(line.startswith("kernl.gated_linear") for line in b.show(after))
    assert_same_function(before, after, b)
