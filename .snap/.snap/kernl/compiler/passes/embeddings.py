"""BERT-style embeddings: three table lookups summed, then layernorm, become one
kernl.bert_embeddings (one kernel instead of five). Runs after replace_layer_norm, which has
already folded the last add into the norm's residual."""

from __future__ import annotations

from kernl.artifacts.program import Instruction, Program

from .graph import ref
from .matcher import Node, Pat, Rewriter, Rule, rewrite_with


def _lookups(ctx: Rewriter, vid: int | None) -> list[tuple[dict, dict]] | None:
    """The (table, ids) gathers whose sum is `vid`, or None if it is anything else. Every
    gather and add on the way is read once (by the sum), so fusing drops nothing still needed."""
    node = ctx.node(vid)
    if vid is None or node.ins is None or ctx.uses[vid] != 1:
        return None
    ins = node.ins
    if ins.op == "aten.embedding.default" and ctx.is_weight(ref(ins.args[0])):
        if len(ins.args) > 3 or ins.kwargs:  # scale_grad_by_freq / sparse: training only
            return None
        return [(ins.args[0], ins.args[1])] if ctx.consume(node) else None
    if ins.op == "aten.add.Tensor" and not ins.kwargs and len(ins.args) == 2:
        a, b = _lookups(ctx, ref(ins.args[0])), _lookups(ctx, ref(ins.args[1]))
        if a is None or b is None or not ctx.consume(node):
            return None
        return a + b
    return None


def _bert_embeddings(ctx: Rewriter, ln: Node) -> list[Instruction] | None:
    ins = ln.ins
    if ins.args[2] is None or set(ins.kwargs) - {"residual"}:
        return None
    terms = _lookups(ctx, ref(ins.args[0]))
    if "residual" in ins.kwargs and terms is not None:
        more = _lookups(ctx, ref(ins.kwargs["residual"]))
        terms = None if more is None else terms + more
    if terms is None or len(terms) != 3:
        return None
    # the kernel sums three gathers; which table plays which role does not matter
    (w_tab, w_ids), (p_tab, p_ids), (t_tab, t_ids) = terms
    return [
        Instruction(
            "kernl.bert_embeddings",
            [w_ids, w_tab, p_ids, p_tab, t_ids, t_tab, ins.args[1], ins.args[2], ins.args[3]],
            {},
            ins.outputs,
        )
    ]


RULES: list[Rule] = [(Pat("kernl.layer_norm", name="ln"), _bert_embeddings)]


def fuse_bert_embeddings(program: Program) -> Program:
    return rewrite_with(program, RULES)
