"""replace_attention alone: SDPA with a boolean mask, an additive one or none becomes
kernl.attention; dropout and grouped heads stay with aten."""

from program_builder import Builder, assert_same_function

from kernl.compiler.passes import replace_attention

SDPA = "aten.scaled_dot_product_attention.default"
QS = [2, 4, 5, 8]


def test_safe_forms_become_kernl_attention_and_unsafe_ones_stay():
    b = Builder()
    q, k, v = (b.input(n, QS) for n in "qkv")
    mask = b.input("mask", [2, 1, 5, 5], dtype="bool")
    fmask = b.input("fmask", [5, 5])
    a = b.op(SDPA, q, k, v, mask, shape=QS, name="a", scale=0.5)
    c = b.op(SDPA, q, k, v, shape=QS, name="c", is_causal=True)
    d = b.op(SDPA, q, k, v, fmask, shape=QS, name="d")  # additive float mask
    e = b.op(SDPA, q, k, v, None, 0.1, shape=QS, name="e")  # dropout
    before = b.program(a, c, d)
    p = b.program(a, c, d, e)
    after = replace_attention(p)
    assert b.show(after) == [
        "kernl.attention(q, k, v, mask, 0.5, False) -> a",
        "kernl.attention(q, k, v, None, None, True) -> c",
        "kernl.attention(q, k, v, fmask, None, False) -> d",
        f"{SDPA}(q, k, v, None, 0.1) -> e",
    ]
    after.outputs = after.outputs[:3]  # dropout is random: compare the rest
    assert_same_function(before, after, b, atol=1e-5)


def test_grouped_query_heads_stay_aten():
    b = Builder()
    q = b.input("q", [1, 4, 5, 8])
    k, v = b.input("k", [1, 2, 5, 8]), b.input("v", [1, 2, 5, 8])
    out = b.op(SDPA, q, k, v, shape=[1, 4, 5, 8], name="out", enable_gqa=True)
    after = replace_attention(b.program(out))
    assert b.show(after) == [f"{SDPA}(q, k, v; enable_gqa=True) -> out"]


def test_values_of_another_head_dim_stay_aten():
    b = Builder()
    q, k = b.input("q", QS), b.input("k", QS)
    v = b.input("v", [2, 4, 5, 6])
    out = b.op(SDPA, q, k, v, shape=[2, 4, 5, 6], name="out")
    after = replace_attention(b.program(out))
    assert b.show(after) == [f"{SDPA}(q, k, v) -> out"]
