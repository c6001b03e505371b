"""replace_eager_attention alone: attention written in aten ops (MPNet, MegatronBERT) becomes
kernl.attention with its biases summed once; forms that are not the same function stay."""

import pytest
from program_builder import Builder, assert_same_function

from kernl.artifacts.program import Instruction
from kernl.compiler.passes import replace_eager_attention

QS = [2, 4, 5, 8]
SCORES = [2, 4, 5, 5]
MATMUL, SOFTMAX, ADD = "aten.matmul.default", "aten.softmax.int", "aten.add.Tensor"


def attention_block(b, q, k, v, biases, scale_op="aten.div.Tensor", factor=4.0, name="out"):
    kt = b.op("aten.transpose.int", k, -1, -2, shape=[2, 4, 8, 5])
    s = b.op(MATMUL, q, kt, shape=SCORES)
    if scale_op is not None:
        s = b.op(scale_op, s, factor, shape=SCORES)
    for bias in biases:
        s = b.op(ADD, s, bias, shape=SCORES)
    p = b.op(SOFTMAX, s, -1, shape=SCORES)
    return b.op(MATMUL, p, v, shape=QS, name=name)


@pytest.mark.parametrize(
    "scale_op, factor, scale",
    [("aten.div.Tensor", 4.0, 0.25), ("aten.mul.Tensor", 0.5, 0.5), (None, None, 1.0)],
)
def test_one_bias_and_each_scaling_become_kernl_attention(scale_op, factor, scale):
    b = Builder()
    q, k, v = (b.input(n, QS) for n in "qkv")
    mask = b.input("mask", [2, 1, 1, 5])
    out = attention_block(b, q, k, v, [mask], scale_op, factor)
    before = b.program(out)
    after = replace_eager_attention(b.program(out))
    ops = [i.op for i in after.instructions if i.op != "aten.transpose.int"]
    assert ops == ["kernl.attention"]
    assert b.show(after)[-1] == f"kernl.attention(q, k, v, mask, {scale}, False) -> out"
    assert_same_function(before, after, b)


def test_two_biases_are_summed_once_for_every_layer():
    b = Builder()
    q, k, v = (b.input(n, QS) for n in "qkv")
    position = b.input("position", [1, 4, 5, 5])  # MPNet's relative position bias
    mask = b.input("mask", [2, 1, 5, 5])
    first = attention_block(b, q, k, v, [position, mask], name="first")
    second = attention_block(b, first, k, v, [position, mask], name="second")
    before = b.program(second)
    after = replace_eager_attention(b.program(second))
    lines = [line for line in b.show(after) if not line.startswith("aten.transpose")]
    assert len(lines) == 3 and lines[0].startswith(f"{ADD}(position, mask) -> %")
    summed = lines[0].split(" -> ")[1]
    assert lines[1] == f"kernl.attention(q, k, v, {summed}, 0.25, False) -> first"
    assert lines[2] == f"kernl.attention(first, k, v, {summed}, 0.25, False) -> second"
    assert after.meta["values"][int(summed[1:])][0] == [2, 4, 5, 5]
    assert_same_function(before, after, b)


def test_forms_that_are_another_function_stay():
    b = Builder()
    q, k, v = (b.input(n, QS) for n in "qkv")
    mask = b.input("mask", [2, 1, 1, 5])
    kt = b.op("aten.transpose.int", k, -1, -2, shape=[2, 4, 8, 5])
    # softmax over the queries, not the keys
    s1 = b.op(MATMUL, q, kt, shape=SCORES)
    p1 = b.op(SOFTMAX, s1, 2, shape=SCORES)
    o1 = b.op(MATMUL, p1, v, shape=QS, name="o1")
    # the probabilities are an output too (output_attentions)
    s2 = b.op(MATMUL, q, kt, shape=SCORES)
    p2 = b.op(SOFTMAX, s2, -1, shape=SCORES, name="p2")
    o2 = b.op(MATMUL, p2, v, shape=QS, name="o2")
    # a negative scale (the kernel folds a positive one into its exponent)
    s3 = b.op(MATMUL, q, kt, shape=SCORES)
    s3 = b.op("aten.mul.Tensor", s3, -0.5, shape=SCORES)
    o3 = b.op(MATMUL, b.op(SOFTMAX, s3, -1, shape=SCORES), v, shape=QS, name="o3")
    # a scaling by a tensor, not a number
    s4 = b.op(MATMUL, q, kt, shape=SCORES)
    s4 = b.op("aten.mul.Tensor", s4, mask, shape=SCORES)
    o4 = b.op(MATMUL, b.op(SOFTMAX, s4, -1, shape=SCORES), v, shape=QS, name="o4")
    # k not transposed over its last two axes
    kt5 = b.op("aten.transpose.int", k, 0, 1, shape=[4, 2, 5, 8])
    s5 = b.op(MATMUL, q, kt5, shape=SCORES)
    o5 = b.op(MATMUL, b.op(SOFTMAX, s5, -1, shape=SCORES), v, shape=QS, name="o5")
    # scores read twice before the softmax
    s6 = b.op(MATMUL, q, kt, shape=SCORES, name="s6")
    o6 = b.op(MATMUL, b.op(SOFTMAX, s6, -1, shape=SCORES), v, shape=QS, name="o6")
    # a bias of another dtype than the scores
    half = b.input("half", [2, 1, 1, 5], dtype="float16")
    s7 = b.op(ADD, b.op(MATMUL, q, kt, shape=SCORES), half, shape=SCORES)
    o7 = b.op(MATMUL, b.op(SOFTMAX, s7, -1, shape=SCORES), v, shape=QS, name="o7")
    outputs = (o1, p2, o2, o3, o4, o5, s6, o6, o7)
    p = b.program(*outputs)
    assert b.show(replace_eager_attention(p)) == b.show(b.program(*outputs))


def test_a_bias_that_would_grow_the_scores_stays():
    b = Builder()
    q = b.input("q", [2, 4, 1, 8])
    k, v = b.input("k", QS), b.input("v", QS)
    kt = b.op("aten.transpose.int", k, -1, -2, shape=[2, 4, 8, 5])
    s = b.op(MATMUL, q, kt, shape=[2, 4, 1, 5])
    rows = b.input("rows", [2, 4, 3, 5])  # broadcasts the one query row to three
    s = b.op(ADD, s, rows, shape=[2, 4, 3, 5])
    out = b.op(MATMUL, b.op(SOFTMAX, s, -1, shape=[2, 4, 3, 5]), v, shape=[2, 4, 3, 8])
    p = b.program(out)
    assert "kernl.attention" not in {i.op for i in replace_eager_attention(p).instructions}


@pytest.mark.parametrize("cast", ["aten.to.dtype", "aten._to_copy.default"])
def test_transformers_eager_attention_forward_softmax_in_float32_then_cast_back(cast):
    """transformers' eager_attention_forward (MarkupLM, models without SDPA): softmax(...,
    dtype=float32).to(query.dtype) between the scores and the values."""
    b = Builder(dtype="float16")
    q, k, v = (b.input(n, QS) for n in "qkv")
    mask = b.input("mask", [2, 1, 1, 5])
    kt = b.op("aten.transpose.int", k, 2, 3, shape=[2, 4, 8, 5])
    s = b.op("aten.mul.Tensor", b.op(MATMUL, q, kt, shape=SCORES), 0.25, shape=SCORES)
    s = b.op(ADD, s, mask, shape=SCORES)
    p = b.op(SOFTMAX, s, -1, {"dtype": "float32"}, shape=SCORES, dtype="float32")
    if cast == "aten.to.dtype":
        p = b.op(cast, p, {"dtype": "float16"}, shape=SCORES)
    else:  # its dtype is a keyword, which Builder.op keeps for the value's own dtype
        cast_out = b._value(SCORES, "float16", None)
        b.instructions.append(
            Instruction(cast, [p], {"dtype": {"dtype": "float16"}}, [cast_out["v"]])
        )
        p = cast_out
    out = b.op(MATMUL, p, v, shape=QS, name="out")
    before = b.program(out)
    after = replace_eager_attention(b.program(out))
    assert b.show(after)[-1] == "kernl.attention(q, k, v, mask, 0.25, False) -> out"
    assert_same_function(before, after, b, atol=2e-3)


def test_a_float32_softmax_kept_in_float32_stays():
    # the probabilities stay float32 into the value matmul: not what kernl.attention computes
    b = Builder(dtype="float16")
    q, k, v = (b.input(n, QS) for n in "qkv")
    kt = b.op("aten.transpose.int", k, 2, 3, shape=[2, 4, 8, 5])
    s = b.op(MATMUL, q, kt, shape=SCORES)
    p = b.op(SOFTMAX, s, -1, {"dtype": "float32"}, shape=SCORES, dtype="float32")
    vf = b.op("aten.to.dtype", v, {"dtype": "float32"}, shape=QS, dtype="float32")
    out = b.op(MATMUL, p, vf, shape=QS, dtype="float32", name="out")
    p = b.program(out)
    assert "kernl.attention" not in {i.op for i in replace_eager_attention(p).instructions}


def test_values_of_another_head_dim_stay():
    # kernl's attention kernels take one head dim for q, k and v (a bare AssertionError at
    # compile before)
    b = Builder()
    q, k = b.input("q", QS), b.input("k", QS)
    v = b.input("v", [2, 4, 5, 6])
    out = attention_block(b, q, k, v, [])
    b.values[out["v"]][0] = [2, 4, 5, 6]  # the value matmul's output
    p = b.program(out)
    assert "kernl.attention" not in {i.op for i in replace_eager_attention(p).instructions}
