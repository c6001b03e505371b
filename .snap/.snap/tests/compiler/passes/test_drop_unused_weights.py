"""drop_unused_weights alone: only weights nothing reads leave the program."""

from program_builder import Builder

from kernl.compiler.passes import drop_unused_weights


def test_only_unread_weights_are_dropped():
    b = Builder()
    x = b.input("x", [4])
    used, _unused = b.weight("used", [4]), b.weight("unused", [4])
    as_output = b.weight("as_output", [4])
    in_list = b.weight("in_list", [4])
    y = b.op("aten.mul.Tensor", x, used, shape=[4], name="y")
    z = b.op("aten.cat.default", [y, in_list], shape=[8], name="z")
    after = drop_unused_weights(b.program(z, as_output))
    assert sorted(after.weights.values()) == ["as_output", "in_list", "used"]
    assert len(after.instructions) == 2
