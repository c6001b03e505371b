"""Linears that read the same input (attention's q, k and v projections) become one linear
over their concatenated weights, followed by a split: one GEMM instead of three."""

from __future__ import annotations

import torch

from kernl.artifacts.program import Instruction, Program

from .graph import ref
from .matcher import Node, Pat, Rewriter, Rule, rewrite_with

_LINEAR = "aten.linear.default"


def _weighted_linear(ctx: Rewriter, ins: Instruction, x: int) -> bool:
    """linear(x, W, b) with W and b weights of the program (their concatenation is a weight)."""
    if ins.op != _LINEAR or ins.kwargs or len(ins.args) != 3 or ref(ins.args[0]) != x:
        return False
    return ctx.is_weight(ref(ins.args[1])) and ctx.is_weight(ref(ins.args[2]))


def _fuse_siblings(ctx: Rewriter, lin: Node, x: Node) -> list[Instruction] | None:
    if ctx.memo.get(("done", x.vid)) or not _weighted_linear(ctx, lin.ins, x.vid):
        return None  # the group of this input was settled at its first linear
    ctx.memo["done", x.vid] = True
    members = [i for i in ctx.readers(x.vid) if _weighted_linear(ctx, i, x.vid)]
    if not 2 <= len(members) <= 4 or members[0] is not lin.ins:
        return None
    program, weights = ctx.program, ctx.weights
    w_names = [program.weights[ref(i.args[1])] for i in members]
    b_names = [program.weights[ref(i.args[2])] for i in members]
    ws = [weights[n] for n in w_names]
    if len({(w.shape[1], w.dtype) for w in ws}) != 1:
        return None
    fused_w = "fused." + "+".join(w_names)
    fused_b = "fused." + "+".join(b_names)
    weights.setdefault(fused_w, torch.cat(ws, 0))
    weights.setdefault(fused_b, torch.cat([weights[n] for n in b_names], 0))
    w_id = ctx.new_value(list(weights[fused_w].shape), ctx.dtype(ref(members[0].args[1])))
    b_id = ctx.new_value(list(weights[fused_b].shape), ctx.dtype(ref(members[0].args[2])))
    program.weights[w_id] = fused_w
    program.weights[b_id] = fused_b
    sizes = [w.shape[0] for w in ws]
    out_shape = list(ctx.shape(members[0].outputs[0]))
    out_shape[-1] = sum(sizes)
    y = ctx.new_value(out_shape, ctx.dtype(members[0].outputs[0]))
    # The split sits where the first linear was: every reader of a member comes after it.
    for sibling in members[1:]:
        ctx.remove(sibling)
    return [
        Instruction(_LINEAR, [{"v": x.vid}, {"v": w_id}, {"v": b_id}], {}, [y]),
        Instruction(
            "aten.split_with_sizes.default",
            [{"v": y}, sizes, -1],
            {},
            [i.outputs[0] for i in members],
        ),
    ]


RULES: list[Rule] = [
    (
        Pat(_LINEAR, name="lin", src=(Pat(name="x"), Pat(weight=True), Pat(weight=True))),
        _fuse_siblings,
    ),
]


def fuse_qkv(program: Program, weights: dict[str, torch.Tensor]) -> Program:
    """`weights` gains the concatenated weights the fused linears read."""
    return rewrite_with(program, RULES, weights)
