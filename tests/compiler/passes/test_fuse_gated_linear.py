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


def swiglu(b, x, wg, wu, bg=None, bu=None, act="aten.silu.default", name="out"):
    """NomicBERT's MLP input: act(gate(x)) * up(x)."""
    gate = b.op(act, b.op("aten.linear.default", x, wg, bg, shape=HALF), shape=HALF)
    up = b.op("aten.linear.default", x, wu, bu, shape=HALF)
    return b.op("aten.mul.Tensor", gate, up, shape=HALF, name=name)


def test_two_linears_of_one_input_become_one_op_over_their_stacked_weights():
    b = Builder()
    x = b.input("x", X)
    wg, wu, bg, bu = (
        b.weight("wg", [6, 8]),
        b.weight("wu", [6, 8]),
        b.weight("bg", [6]),
        b.weight("bu", [6]),
    )
    outs = [swiglu(b, x, wg, wu, name="plain"), swiglu(b, x, wg, wu, bg, bu, name="biased")]
    before = b.program(*outs)
    weights = dict(b.tensors)
    after = fuse_gated_linear(fuse_linear(b.program(*outs)), weights)
    assert b.show(after) == [
        "kernl.gated_linear(x, fused.wg+wu, None; activation='silu') -> plain",
        "kernl.gated_linear(x, fused.wg+wu, fused.bg+bu; activation='silu') -> biased",
    ]
    assert_same_function(before, after, b, tensors=weights)


def test_two_linears_that_are_another_function_stay():
    b = Builder()
    x, y = b.input("x", X), b.input("y", X)
    wg, wu = b.weight("wg", [6, 8]), b.weight("wu", [6, 8])
    outs = [swiglu(b, x, wg, wu, name="o1")]
    gate = b.op("aten.silu.default", b.op("aten.linear.default", x, wg, shape=HALF), shape=HALF)
    up = b.op("aten.linear.default", y, wu, shape=HALF)  # another input
    outs.append(b.op("aten.mul.Tensor", gate, up, shape=HALF, name="o2"))
    both = [b.op("aten.linear.default", x, w, shape=HALF) for w in (wg, wu)]  # no activation
    outs.append(b.op("aten.mul.Tensor", *both, shape=HALF, name="o3"))
    before = b.program(*outs)
    weights = dict(b.tensors)
    after = fuse_gated_linear(fuse_linear(b.program(*outs)), weights)
    assert sum(line.startswith("kernl.gated_linear") for line in b.show(after)) == 1  # o1 only
    assert_same_function(before, after, b, tensors=weights)


def test_halves_split_into_equal_sizes_are_one_op_too():
    """What fuse_qkv makes of two biased linears of one input: one linear and a split."""
    b = Builder()
    x, w, bias = b.input("x", X), b.weight("w", W), b.weight("b", [12])
    lin = b.op("aten.linear.default", x, w, bias, shape=H)
    a, g = b.op("aten.split_with_sizes.default", lin, [6, 6], -1, shape=[HALF, HALF])
    out = b.op("aten.mul.Tensor", b.op("aten.gelu.default", a, shape=HALF), g, shape=HALF,
               name="out")  # fmt: skip
    before = b.program(out)
    after = fuse_gated_linear(fuse_linear(b.program(out)))
    assert b.show(after) == ["kernl.gated_linear(x, w, b; activation='gelu') -> out"]
    assert_same_function(before, after, b)
