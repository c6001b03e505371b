"""hoist_attention_mask alone: attentions sharing a boolean mask read one bias made once."""

from program_builder import Builder, assert_same_function

from kernl.compiler.passes import hoist_attention_mask

QS = [2, 4, 5, 8]


def att(b, q, mask, name):
    return b.op("kernl.attention", q, q, q, mask, None, False, shape=QS, name=name)


def test_layers_sharing_a_mask_read_one_bias():
    b = Builder()
    q = b.input("q", QS)
    m1 = b.input("m1", [2, 1, 1, 5], dtype="bool")
    m2 = b.input("m2", [2, 1, 5, 5], dtype="bool")
    x = att(b, q, m1, "x")
    y = att(b, x, m1, "y")
    z = att(b, y, m2, "z")
    w = att(b, z, None, "w")
    before = b.program(w)
    after = hoist_attention_mask(b.program(w))
    lines = b.show(after)
    b1, b2 = lines[0].split(" -> ")[1], lines[3].split(" -> ")[1]  # the new bias values
    assert lines == [
        f"kernl.mask_to_bias(m1, dtype:float32) -> {b1}",
        f"kernl.attention(q, q, q, {b1}, None, False) -> x",
        f"kernl.attention(x, x, x, {b1}, None, False) -> y",
        f"kernl.mask_to_bias(m2, dtype:float32) -> {b2}",
        f"kernl.attention(y, y, y, {b2}, None, False) -> z",
        "kernl.attention(z, z, z, None, None, False) -> w",
    ]
    bias = after.instructions[0].outputs[0]
    assert after.meta["values"][bias] == [[2, 1, 1, 5], "float32"]
    assert_same_function(before, after, b)


def test_float_mask_is_left_alone():
    b = Builder()
    q, m = b.input("q", QS), b.input("m", [2, 1, 5, 5])
    out = att(b, q, m, "out")
    after = hoist_attention_mask(b.program(out))
    assert b.show(after) == ["kernl.attention(q, q, q, m, None, False) -> out"]
