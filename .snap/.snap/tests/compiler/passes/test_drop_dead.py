"""drop_dead: instructions whose results nothing reads go, chains of them too; in-place
writes, what they read, and what the outputs need stay."""

from program_builder import Builder, assert_same_function

from kernl.compiler.passes import drop_dead


def test_unread_chains_go_and_in_place_writes_stay():
    b = Builder()
    x = b.input("x", [2, 3])
    idx = b.op("aten.arange.default", 2, shape=[2], dtype="int64", name="idx")
    b.op("aten.unsqueeze.default", idx, 0, shape=[1, 2], dtype="int64", name="unread")
    scratch = b.op("aten.zeros_like.default", x, shape=[2, 3], name="scratch")
    b.op("aten.fill_.Scalar", scratch, 1.0, shape=[2, 3], name="filled")
    y = b.op("aten.mul.Tensor", x, 2.0, shape=[2, 3], name="y")
    before = b.program(y)
    after = drop_dead(b.program(y))
    assert b.show(after) == [
        "aten.zeros_like.default(x) -> scratch",
        "aten.fill_.Scalar(scratch, 1.0) -> filled",
        "aten.mul.Tensor(x, 2.0) -> y",
    ]
    assert_same_function(before, after, b)
