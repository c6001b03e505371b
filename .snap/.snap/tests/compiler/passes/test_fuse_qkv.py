"""fuse_qkv alone: 2-4 linears reading one input become one GEMM over concatenated weights
and a split; other linears stay."""

import torch
from program_builder import Builder, assert_same_function

from kernl.compiler.passes import drop_unused_weights, fuse_qkv


def lin(b, x, name, n_out=8, bias=True):
    args = [x, b.weight(f"{name}.w", [n_out, 8])] + (
        [b.weight(f"{name}.b", [n_out])] if bias else []
    )
    return b.op("aten.linear.default", *args, shape=[3, n_out], name=name)


def test_q_k_v_become_one_linear_and_a_split():
    b = Builder()
    x, other = b.input("x", [3, 8]), b.input("other", [3, 8])
    q, k = lin(b, x, "q"), lin(b, x, "k", n_out=4)
    s = b.op("aten.mul.Tensor", q, q, shape=[3, 8], name="s")  # a reader between siblings
    v = lin(b, x, "v")
    nb = lin(b, x, "nobias", bias=False)  # bias is not a weight: not in the group
    o = lin(b, other, "o")  # another input: not in the group
    before = b.program(s, k, v, nb, o)
    weights = dict(b.tensors)
    after = drop_unused_weights(fuse_qkv(b.program(s, k, v, nb, o), weights))
    lines = b.show(after)
    y = lines[0].split(" -> ")[1]
    assert lines == [
        f"aten.linear.default(x, fused.q.w+k.w+v.w, fused.q.b+k.b+v.b) -> {y}",
        f"aten.split_with_sizes.default({y}, [8, 4, 8], -1) -> q, k, v",
        "aten.mul.Tensor(q, q) -> s",
        "aten.linear.default(x, nobias.w) -> nobias",
        "aten.linear.default(other, o.w, o.b) -> o",
    ]
    assert weights["fused.q.w+k.w+v.w"].shape == (20, 8)
    assert torch.equal(weights["fused.q.b+k.b+v.b"][8:12], weights["k.b"])
    assert set(after.weights.values()) == {
        "fused.q.w+k.w+v.w",
        "fused.q.b+k.b+v.b",
        "nobias.w",
        "o.w",
        "o.b",
    }
    assert_same_function(before, after, b, tensors=weights)


def test_a_bias_free_linear_read_first_stays_out_of_the_group():
    b = Builder()
    x = b.input("x", [3, 8])
    kw = b.op(
        "aten.linear.default", x, b.weight("kw.w", [8, 8]), bias=None, shape=[3, 8], name="kw"
    )
    q, k = lin(b, x, "q"), lin(b, x, "k")
    after = fuse_qkv(b.program(kw, q, k), dict(b.tensors))
    lines = b.show(after)
    assert lines[0] == "aten.linear.default(x, kw.w; bias=None) -> kw"
    assert lines[2].endswith("-> q, k") and len(lines) == 3


def test_five_siblings_are_left_alone():
    b = Builder()
    x = b.input("x", [3, 8])
    outs = [lin(b, x, f"l{i}") for i in range(5)]
    p = b.program(*outs)
    assert b.show(fuse_qkv(b.program(*outs), dict(b.tensors))) == b.show(p)


def test_a_single_linear_is_left_alone():
    b = Builder()
    out = lin(b, b.input("x", [3, 8]), "only")
    assert b.show(fuse_qkv(b.program(out), dict(b.tensors))) == [
        "aten.linear.default(x, only.w, only.b) -> only"
    ]
