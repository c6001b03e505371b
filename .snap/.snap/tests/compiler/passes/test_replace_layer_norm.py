"""replace_layer_norm alone, and with fuse_linear after it (the order `rewrite` uses): the
residual add goes into the norm, so the GEMM before it stays plain even on cuBLAS."""

from program_builder import Builder, assert_same_function

from kernl.compiler.passes import fuse_linear, replace_layer_norm


def norm_args(b, name="ln"):
    return b.weight(f"{name}.w", [16]), b.weight(f"{name}.b", [16])


def test_residual_add_goes_into_the_norm():
    b = Builder()
    x, r = b.input("x", [2, 3, 16]), b.input("r", [2, 3, 16])
    s = b.op("aten.add.Tensor", x, r, shape=[2, 3, 16], name="s")
    out = b.op(
        "aten.layer_norm.default", s, [16], *norm_args(b), 1e-5, shape=[2, 3, 16], name="out"
    )
    before = b.program(out)
    after = replace_layer_norm(b.program(out))
    assert b.show(after) == ["kernl.layer_norm(x, ln.w, ln.b, 1e-05; residual=r) -> out"]
    assert_same_function(before, after, b)


def test_linear_then_add_then_norm_leaves_the_gemm_plain():
    b = Builder()
    x, h = b.input("x", [2, 3, 8]), b.input("h", [2, 3, 16])
    y = b.op(
        "aten.linear.default",
        x,
        b.weight("w", [16, 8]),
        b.weight("bias", [16]),
        shape=[2, 3, 16],
        name="y",
    )
    s = b.op("aten.add.Tensor", y, h, shape=[2, 3, 16], name="s")
    out = b.op(
        "aten.layer_norm.default", s, [16], *norm_args(b), 1e-12, shape=[2, 3, 16], name="out"
    )
    before = b.program(out)
    after = fuse_linear(replace_layer_norm(b.program(out)))
    assert b.show(after) == [
        "kernl.linear(x, w, bias; activation='none') -> y",
        "kernl.layer_norm(y, ln.w, ln.b, 1e-12; residual=h) -> out",
    ]
    assert_same_function(before, after, b)


def test_sum_read_again_stays_and_then_feeds_the_linear_epilogue():
    """Pre-norm blocks read the residual sum twice (norm and the next residual): the add
    cannot vanish into the norm, so fuse_linear puts it into the GEMM's epilogue instead."""
    b = Builder()
    x, h = b.input("x", [2, 3, 8]), b.input("h", [2, 3, 16])
    y = b.op("aten.linear.default", x, b.weight("w", [16, 8]), shape=[2, 3, 16], name="y")
    s = b.op("aten.add.Tensor", y, h, shape=[2, 3, 16], name="s")
    n = b.op("aten.layer_norm.default", s, [16], *norm_args(b), 1e-5, shape=[2, 3, 16], name="n")
    out = b.op("aten.add.Tensor", n, s, shape=[2, 3, 16], name="out")
    before = b.program(out)
    after = fuse_linear(replace_layer_norm(b.program(out)))
    assert b.show(after) == [
        "kernl.linear(x, w, None; activation='none', residual=h) -> s",
        "kernl.layer_norm(s, ln.w, ln.b, 1e-05) -> n",
        "aten.add.Tensor(n, s) -> out",
    ]
    assert_same_function(before, after, b)


def test_unsafe_forms_stay_aten_or_keep_their_add():
    b = Builder()
    x, row = b.input("x", [2, 3, 16]), b.input("row", [16])
    w, bias = norm_args(b)
    bc = b.op("aten.add.Tensor", x, row, shape=[2, 3, 16], name="bc")  # broadcasting add
    n1 = b.op("aten.layer_norm.default", bc, [16], w, bias, 1e-5, shape=[2, 3, 16], name="n1")
    scaled = b.op("aten.add.Tensor", x, x, shape=[2, 3, 16], name="sc", alpha=2)
    n2 = b.op("aten.layer_norm.default", scaled, [16], w, bias, 1e-5, shape=[2, 3, 16], name="n2")
    n3 = b.op("aten.layer_norm.default", x, [3, 16], shape=[2, 3, 16], name="n3")  # two axes
    before = b.program(n1, n2, n3)
    after = replace_layer_norm(b.program(n1, n2, n3))
    assert b.show(after) == [
        "aten.add.Tensor(x, row) -> bc",
        "kernl.layer_norm(bc, ln.w, ln.b, 1e-05) -> n1",
        "aten.add.Tensor(x, x; alpha=2) -> sc",
        "kernl.layer_norm(sc, ln.w, ln.b, 1e-05) -> n2",
        "aten.layer_norm.default(x, [3, 16]) -> n3",
    ]
    assert_same_function(before, after, b)
