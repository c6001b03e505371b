"""fuse_rotary alone: transformers' `x * cos + rotate_half(x) * sin` becomes kernl.rotary, a
cast of its result the op's dtype; forms that compute another function stay."""

from program_builder import Builder, assert_same_function

from kernl.compiler.passes import fuse_rotary

X = [2, 3, 5, 8]  # [B, H, L, D]
TABLE = [1, 1, 5, 8]
HALF = [2, 3, 5, 4]
END = 2**63 - 1


def rotary_block(b, x, cos, sin, *, dtype=None, hi=(4, END), lo=(0, 4), order="neg-first",
                 name="out"):  # fmt: skip
    """ModernBERT's apply_rotary_pos_emb: x cast to `dtype` (if given) for each use."""
    xa = b.op("aten.to.dtype", x, {"dtype": dtype}, shape=X, dtype=dtype) if dtype else x
    xb = b.op("aten.to.dtype", x, {"dtype": dtype}, shape=X, dtype=dtype) if dtype else x
    first = b.op("aten.mul.Tensor", xa, cos, shape=X, dtype=dtype)
    x2 = b.op("aten.slice.Tensor", xb, 3, *hi, shape=HALF, dtype=dtype)
    x1 = b.op("aten.slice.Tensor", xb, 3, *lo, shape=HALF, dtype=dtype)
    neg = b.op("aten.neg.default", x2, shape=HALF, dtype=dtype)
    parts = [neg, x1] if order == "neg-first" else [x1, neg]
    turned = b.op("aten.cat.default", parts, -1, shape=X, dtype=dtype)
    second = b.op("aten.mul.Tensor", turned, sin, shape=X, dtype=dtype)
    return b.op("aten.add.Tensor", first, second, shape=X, dtype=dtype, name=name)


def test_rotate_half_in_float32_becomes_kernl_rotary():
    b = Builder()
    x, cos, sin = b.input("x", X), b.input("cos", TABLE), b.input("sin", TABLE)
    out = rotary_block(b, x, cos, sin)
    before = b.program(out)
    after = fuse_rotary(b.program(out))
    assert b.show(after) == ["kernl.rotary(x, cos, sin, dtype:float32) -> out"]
    assert_same_function(before, after, b)


def test_fp16_x_cast_up_and_back_is_one_op_in_the_model_s_dtype():
    b = Builder("float16")
    x = b.input("x", X)
    cos, sin = b.input("cos", TABLE, "float32"), b.input("sin", TABLE, "float32")
    wide = rotary_block(b, x, cos, sin, dtype="float32", name="wide")
    out = b.op("aten.to.dtype", wide, {"dtype": "float16"}, shape=X, name="out")
    before = b.program(out)
    after = fuse_rotary(b.program(out))
    assert b.show(after) == ["kernl.rotary(x, cos, sin, dtype:float16) -> out"]
    assert_same_function(before, after, b, atol=1e-3)


def test_a_narrowing_cast_is_rotated_after_it_not_skipped():
    """x float32 cast to fp16 and rotated in fp16: the rotated value is the fp16 one."""
    b = Builder("float16")
    x, cos, sin = b.input("x", X, "float32"), b.input("cos", TABLE), b.input("sin", TABLE)
    narrow = b.op("aten.to.dtype", x, {"dtype": "float16"}, shape=X, name="h")
    out = rotary_block(b, narrow, cos, sin)
    before = b.program(out)
    after = fuse_rotary(b.program(out))
    assert b.show(after)[-1] == "kernl.rotary(h, cos, sin, dtype:float16) -> out"
    assert_same_function(before, after, b, atol=2e-3)


def test_forms_that_are_another_function_stay():
    b = Builder()
    x, cos, sin = b.input("x", X), b.input("cos", TABLE), b.input("sin", TABLE)
    outs = [
        rotary_block(b, x, cos, sin, order="lo-first", name="o1"),  # cat(x1, -x2)
        rotary_block(b, x, cos, sin, hi=(3, END), lo=(0, 3), name="o2"),  # not the halves
        rotary_block(b, x, cos, sin, hi=(4, 8), lo=(0, 4), name="o3"),  # halves, end explicit
    ]
    y = b.input("y", X)  # x * cos + rotate_half(y) * sin
    first = b.op("aten.mul.Tensor", x, cos, shape=X)
    y2 = b.op("aten.slice.Tensor", y, 3, 4, END, shape=HALF)
    y1 = b.op("aten.slice.Tensor", y, 3, 0, 4, shape=HALF)
    turned = b.op("aten.cat.default", [b.op("aten.neg.default", y2, shape=HALF), y1], -1, shape=X)
    second = b.op("aten.mul.Tensor", turned, sin, shape=X)
    outs.append(b.op("aten.add.Tensor", first, second, shape=X, name="o4"))
    before = b.program(*outs)
    after = fuse_rotary(b.program(*outs))
    rotaries = [line for line in b.show(after) if line.startswith("kernl.rotary")]
    assert rotaries == ["kernl.rotary(x, cos, sin, dtype:float32) -> o3"]
    assert_same_function(before, after, b)


def test_a_table_that_would_widen_x_stays():
    """cos of [2, 3, 5, 8] with x of [1, 3, 5, 8]: the result is wider than x."""
    b = Builder()
    x, cos, sin = b.input("x", [1, 3, 5, 8]), b.input("cos", X), b.input("sin", TABLE)
    out = rotary_block(b, x, cos, sin)
    after = fuse_rotary(b.program(out))
    assert not any(line.startswith("kernl.rotary") for line in b.show(after))


def test_an_in_place_write_to_an_intermediate_keeps_the_traced_ops():
    """`fill_` on the rotated half after it is made: a fused op would not see the write."""
    b = Builder()
    x, cos, sin = b.input("x", X), b.input("cos", TABLE), b.input("sin", TABLE)
    first = b.op("aten.mul.Tensor", x, cos, shape=X)
    x2 = b.op("aten.slice.Tensor", x, 3, 4, END, shape=HALF)
    x1 = b.op("aten.slice.Tensor", x, 3, 0, 4, shape=HALF)
    turned = b.op("aten.cat.default", [b.op("aten.neg.default", x2, shape=HALF), x1], -1, shape=X)
    b.op("aten.fill_.Scalar", turned, 0.0, shape=X)
    second = b.op("aten.mul.Tensor", turned, sin, shape=X)
    out = b.op("aten.add.Tensor", first, second, shape=X, name="out")
    before = b.program(out)
    after = fuse_rotary(b.program(out))
    assert not any(line.startswith("kernl.rotary") for line in b.show(after))
    assert_same_function(before, after, b)
