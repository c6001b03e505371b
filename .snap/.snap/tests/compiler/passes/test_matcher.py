"""The pattern matcher the passes are written in: one walk, replacements re-matched on the spot,
matched producers deleted only when nothing reads them, unsafe moves refused."""

import pytest
from program_builder import Builder

from kernl.artifacts.program import Instruction
from kernl.compiler.passes.matcher import Pat, Rewriter, rewrite_with


def _neg_of_neg(ctx, outer, inner):
    return [Instruction("aten.clone.default", list(inner.ins.args), {}, outer.ins.outputs)]


NEG_NEG = [
    (
        Pat(
            "aten.neg.default",
            name="outer",
            src=(Pat("aten.neg.default", name="inner", one_use=True),),
        ),
        _neg_of_neg,
    )
]


def chain(n_neg: int, read_twice: bool = False):
    b = Builder()
    x = b.input("x", [4])
    y = x
    for i in range(n_neg):
        y = b.op("aten.neg.default", y, shape=[4], name=f"n{i}")
    outs = [y, b.op("aten.exp.default", {"v": 1}, shape=[4], name="e")] if read_twice else [y]
    return b, b.program(*outs)


def test_rule_replaces_and_deletes_the_producer_it_folded():
    b, p = chain(2)
    assert b.show(p) == ["aten.neg.default(x) -> n0", "aten.neg.default(n0) -> n1"]
    after = rewrite_with(p, NEG_NEG)
    assert b.show(after) == ["aten.clone.default(x) -> n1"]


def test_a_producer_read_elsewhere_is_not_folded():
    b, p = chain(2, read_twice=True)  # n0 is also read by exp
    after = rewrite_with(p, NEG_NEG)
    assert b.show(after) == b.show(p)


def test_replacements_are_matched_again_without_rescanning():
    calls = []

    def fold(ctx, outer, inner):
        calls.append(outer.ins.op)
        return _neg_of_neg(ctx, outer, inner)

    # clone(neg(x)) -> neg(x) lets a chain of 4 negs fold pairwise in one walk
    def clone_neg(ctx, c, n):
        return [Instruction("aten.neg.default", list(n.ins.args), {}, c.ins.outputs)]

    rules = [
        NEG_NEG[0][:1] + (fold,),
        (
            Pat(
                "aten.neg.default",
                name="c",
                src=(Pat("aten.clone.default", name="n", one_use=True),),
            ),
            clone_neg,
        ),
    ]
    b, p = chain(4)
    after = rewrite_with(p, rules)
    assert b.show(after) == ["aten.clone.default(x) -> n3"]
    assert len(calls) == 2  # neg(neg) at n1; at n2 neg(clone(x)) became neg(x); neg(neg) at n3


def test_in_place_write_between_producer_and_consumer_blocks_the_move():
    b = Builder()
    x = b.input("x", [4])
    n0 = b.op("aten.neg.default", x, shape=[4], name="n0")
    b.op("aten.fill_.Scalar", x, 0.0, shape=[4], name="filled")  # overwrites x after n0 read it
    n1 = b.op("aten.neg.default", n0, shape=[4], name="n1")
    p = b.program(n1)
    after = rewrite_with(p, NEG_NEG)
    assert b.show(after) == b.show(p)


def test_a_rule_that_keeps_matching_its_own_output_is_an_error():
    b, p = chain(1)
    loop = [
        (
            Pat("aten.neg.default", name="n"),
            lambda ctx, n: [Instruction(n.ins.op, n.ins.args, {}, n.ins.outputs)],
        )
    ]
    with pytest.raises(RuntimeError, match="loop"):
        rewrite_with(p, loop)


def test_declining_rule_falls_through_to_the_next():
    b, p = chain(2)
    seen = []
    rules = [(NEG_NEG[0][0], lambda ctx, outer, inner: seen.append(1)), NEG_NEG[0]]
    after = rewrite_with(p, rules)
    assert seen == [1] and b.show(after) == ["aten.clone.default(x) -> n1"]


def test_where_and_weight_conditions():
    b = Builder()
    x, w = b.input("x", [4]), b.weight("w", [4])
    y = b.op("aten.mul.Tensor", x, w, shape=[4], name="y")
    z = b.op("aten.mul.Tensor", w, x, shape=[4], name="z")
    p = b.program(y, z)
    hits = []
    pat = Pat(
        "aten.mul.Tensor",
        name="m",
        src=(None, Pat(weight=True)),
        where=lambda ctx, n: ctx.shape(n.vid) == [4],
    )
    Rewriter(p, [(pat, lambda ctx, m: hits.append(m.vid))]).run()
    assert hits == [y["v"]]
