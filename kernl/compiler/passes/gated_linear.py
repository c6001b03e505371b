"""A gated MLP's projection, `a, b = linear(x).chunk(2, -1); act(a) * b` (ModernBERT's GEGLU),
becomes kernl.gated_linear: the tuner then times one kernel that applies the gate to both
halves' accumulators in registers (kernels/gated_mlp.py) against the traced GEMM, activation
and product, and the [..., 2N] projection is never written where the kernel wins.

Run after fuse_linear: the projection is a plain kernl.linear by then, read by the chunk alone."""

from __future__ import annotations

from kernl.artifacts.program import Instruction, Program

from .fuse_linear import _ACTIVATION
from .graph import ref
from .matcher import Node, Pat, Rewriter, Rule, rewrite_with


def _halves(ctx: Rewriter, chunk: Node) -> Node | None:
    """The plain kernl.linear `chunk` splits into two halves of its last axis, else None."""
    ins = chunk.ins
    if ins is None or ins.op != "aten.chunk.default" or ins.kwargs or len(ins.outputs) != 2:
        return None
    shape = ctx.shape(ref(ins.args[0]))
    if (
        len(ins.args) != 3
        or ins.args[1] != 2
        or not shape
        or ins.args[2] not in (-1, len(shape) - 1)
    ):
        return None
    lin = ctx.node(ref(ins.args[0]))
    k = lin.ins.kwargs if lin.ins is not None else {}
    if lin.ins is None or lin.ins.op != "kernl.linear" or shape[-1] % 2:
        return None
    if k.get("activation") != "none" or "residual" in k or ctx.uses[lin.vid] != 1:
        return None
    return lin


def _to_gated(ctx: Rewriter, mul: Node) -> list[Instruction] | None:
    if mul.ins.kwargs or len(mul.ins.args) != 2:
        return None
    for act_arg, other in (mul.ins.args, reversed(mul.ins.args)):
        act = ctx.node(ref(act_arg))
        if act.ins is None or act.ins.op not in _ACTIVATION or len(act.ins.args) > 2:
            continue
        name = _ACTIVATION[act.ins.op](act.ins)
        chunk = ctx.node(ref(act.ins.args[0]))
        if name is None or chunk.ins is None or ctx.uses[act.vid] != 1:
            continue
        if chunk.ins.outputs != [chunk.vid, ref(other)] or ctx.uses[chunk.vid] != 1:
            continue  # act on the first half, times the second (not the other way round)
        if ctx.uses[ref(other)] != 1:
            continue
        lin = _halves(ctx, chunk)
        if lin is None or not all(ctx.consume(n) for n in (act, chunk, lin)):
            return None
        x, w, b = (lin.ins.args + [None])[:3]
        return [Instruction("kernl.gated_linear", [x, w, b], {"activation": name}, mul.ins.outputs)]
    return None


RULES: list[Rule] = [(Pat("aten.mul.Tensor", name="mul"), _to_gated)]


def fuse_gated_linear(program: Program) -> Program:
    """Every `act(a) * b` of a plain linear's two halves becomes kernl.gated_linear."""
    return rewrite_with(program, RULES)
