"""fuse_linear alone, on hand-built programs: before -> after, and the same function."""

import pytest
from program_builder import Builder, assert_same_function

from kernl.compiler.passes import fuse_linear


def linear(b, x, n_in=8, n_out=16, bias=True, name="y"):
    w = b.weight(f"w_{name}", [n_out, n_in])
    args = [x, w] + ([b.weight(f"b_{name}", [n_out])] if bias else [])
    return b.op("aten.linear.default", *args, shape=[3, n_out], name=name)


def test_linear_activation_and_residual_become_one_kernl_linear():
    b = Builder()
    x, r = b.input("x", [3, 8]), b.input("r", [3, 16])
    g = b.op("aten.gelu.default", linear(b, x), shape=[3, 16], name="g")
    out = b.op("aten.add.Tensor", g, r, shape=[3, 16], name="out")
    before = b.program(out)
    after = fuse_linear(b.program(out))
    assert b.show(after) == [
        "kernl.linear(x, w_y, b_y; activation='gelu', residual=r) -> out",
    ]
    assert_same_function(before, after, b)


@pytest.mark.parametrize(
    "op, extra, act",
    [
        ("aten.relu.default", {}, "relu"),
        ("aten.silu.default", {}, "silu"),
        ("aten.tanh.default", {}, "tanh"),  # BERT's pooler
        ("aten.gelu.default", {"approximate": "tanh"}, "gelu_tanh"),
        ("aten.gelu.default", {"approximate": "none"}, "gelu"),
        ("aten.gelu.default", {}, "gelu"),
    ],
)
def test_each_activation(op, extra, act):
    b = Builder()
    x = b.input("x", [3, 8])
    out = b.op(op, linear(b, x, bias=False), shape=[3, 16], name="out", **extra)
    before = b.program(out)
    after = fuse_linear(b.program(out))
    assert b.show(after) == [f"kernl.linear(x, w_y, None; activation='{act}') -> out"]
    assert_same_function(before, after, b)


def test_residual_on_the_left_of_the_add():
    b = Builder()
    x, r = b.input("x", [3, 8]), b.input("r", [3, 16])
    out = b.op("aten.add.Tensor", r, linear(b, x), shape=[3, 16], name="out")
    after = fuse_linear(b.program(out))
    assert b.show(after) == ["kernl.linear(x, w_y, b_y; activation='none', residual=r) -> out"]


def test_result_read_twice_keeps_its_activation_and_add_separate():
    b = Builder()
    x = b.input("x", [3, 8])
    y = linear(b, x)
    g = b.op("aten.gelu.default", y, shape=[3, 16], name="g")
    out = b.op("aten.add.Tensor", g, y, shape=[3, 16], name="out")
    before = b.program(out)
    after = fuse_linear(b.program(out))
    assert b.show(after) == [
        "kernl.linear(x, w_y, b_y; activation='none') -> y",
        "aten.gelu.default(y) -> g",
        "aten.add.Tensor(g, y) -> out",
    ]
    assert_same_function(before, after, b)


def test_unsafe_adds_stay_but_the_activation_still_fuses():
    b = Builder()
    x, row = b.input("x", [3, 8]), b.input("row", [16])
    half = b.input("half", [3, 16], dtype="float16")
    r = b.input("r", [3, 16])
    outs = []
    for name, other, kw in [("bcast", row, {}), ("dt", half, {}), ("alpha", r, {"alpha": 2})]:
        y = b.op(
            "aten.relu.default", linear(b, x, name=f"y_{name}"), shape=[3, 16], name=f"a_{name}"
        )
        outs.append(b.op("aten.add.Tensor", y, other, shape=[3, 16], name=name, **kw))
    after = fuse_linear(b.program(*outs))
    assert b.show(after) == [
        "kernl.linear(x, w_y_bcast, b_y_bcast; activation='relu') -> a_bcast",
        "aten.add.Tensor(a_bcast, row) -> bcast",
        "kernl.linear(x, w_y_dt, b_y_dt; activation='relu') -> a_dt",
        "aten.add.Tensor(a_dt, half) -> dt",
        "kernl.linear(x, w_y_alpha, b_y_alpha; activation='relu') -> a_alpha",
        "aten.add.Tensor(a_alpha, r; alpha=2) -> alpha",
    ]


def test_activation_after_residual_is_not_an_epilogue_order_the_kernel_has():
    b = Builder()
    x, r = b.input("x", [3, 8]), b.input("r", [3, 16])
    s = b.op("aten.add.Tensor", linear(b, x), r, shape=[3, 16], name="s")
    out = b.op("aten.relu.default", s, shape=[3, 16], name="out")
    before = b.program(out)
    after = fuse_linear(b.program(out))
    assert b.show(after) == [
        "kernl.linear(x, w_y, b_y; activation='none', residual=r) -> s",
        "aten.relu.default(s) -> out",
    ]
    assert_same_function(before, after, b)


def test_linear_with_keyword_arguments_stays_aten():
    b = Builder()
    x, w = b.input("x", [3, 8]), b.weight("w", [16, 8])
    out = b.op("aten.linear.default", x, w, bias=None, shape=[3, 16], name="out")
    after = fuse_linear(b.program(out))
    assert b.show(after) == ["aten.linear.default(x, w; bias=None) -> out"]
