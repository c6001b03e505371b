"""A gated MLP's projection becomes kernl.gated_linear: `a, b = linear(x).chunk(2, -1);
act(a) * b` (ModernBERT's GEGLU; a `split_with_sizes` into two equal halves too, what fuse_qkv
makes of two biased linears of one input), and `act(gate(x)) * up(x)` of two linears of one
input (NomicBERT's SwiGLU; their weights concatenated). The tuner then times one kernel that
applies the gate to both halves' accumulators in registers (kernels/gated_mlp.py) against the
traced GEMMs, activation and product, and the [..., 2N] projection is never written where the
kernel wins.

Run after fuse_linear: the projections are kernl.linear by then (a gate's activation in its
epilogue), each read by the split or the product alone."""

from __future__ import annotations

import torch

from kernl.artifacts.program import Instruction, Program

from .fuse_linear import _ACTIVATION
from .graph import ref
from .matcher import Node, Pat, Rewriter, Rule, rewrite_with


def _halves(ctx: Rewriter, split: Node) -> Node | None:
    """The plain kernl.linear `split` cuts into two halves of its last axis, else None."""
    ins = split.ins
    if ins is None or ins.kwargs or len(ins.outputs) != 2 or len(ins.args) != 3:
        return None
    shape = ctx.shape(ref(ins.args[0]))
    if not shape or shape[-1] % 2 or ins.args[2] not in (-1, len(shape) - 1):
        return None
    if ins.op == "aten.chunk.default":
        if ins.args[1] != 2:
            return None
    elif ins.op != "aten.split_with_sizes.default" or ins.args[1] != [shape[-1] // 2] * 2:
        return None
    lin = ctx.node(ref(ins.args[0]))
    k = lin.ins.kwargs if lin.ins is not None else {}
    if lin.ins is None or lin.ins.op != "kernl.linear":
        return None
    if k.get("activation") != "none" or "residual" in k or ctx.uses[lin.vid] != 1:
        return None
    return lin


def _to_gated(ctx: Rewriter, mul: Node) -> list[Instruction] | None:
    """act(a) * b of one linear's halves a, b."""
    if mul.ins.kwargs or len(mul.ins.args) != 2:
        return None
    for act_arg, other in (mul.ins.args, reversed(mul.ins.args)):
        act = ctx.node(ref(act_arg))
        if act.ins is None or act.ins.op not in _ACTIVATION or len(act.ins.args) > 2:
            continue
        name = _ACTIVATION[act.ins.op](act.ins)
        split = ctx.node(ref(act.ins.args[0]))
        if name is None or split.ins is None or ctx.uses[act.vid] != 1:
            continue
        if split.ins.outputs != [split.vid, ref(other)] or ctx.uses[split.vid] != 1:
            continue  # act on the first half, times the second (not the other way round)
        if ctx.uses[ref(other)] != 1:
            continue
        lin = _halves(ctx, split)
        if lin is None or not all(ctx.consume(n) for n in (act, split, lin)):
            return None
        x, w, b = (lin.ins.args + [None])[:3]
        return [Instruction("kernl.gated_linear", [x, w, b], {"activation": name}, mul.ins.outputs)]
    return None


def _linear_read_once(ctx: Rewriter, vid: int | None) -> Node | None:
    """The kernl.linear producing `vid` (weights of the program, no residual), else None."""
    node = ctx.node(vid)
    ins = node.ins
    if ins is None or ins.op != "kernl.linear" or "residual" in ins.kwargs or len(ins.args) != 3:
        return None
    _, w, b = ins.args
    if not ctx.is_weight(ref(w)) or (b is not None and not ctx.is_weight(ref(b))):
        return None
    return node if ctx.uses[vid] == 1 else None


def _two_linears(ctx: Rewriter, mul: Node) -> list[Instruction] | None:
    """act(x Wg^T + bg) * (x Wu^T + bu), the gate's activation in its linear's epilogue."""
    if mul.ins.kwargs or len(mul.ins.args) != 2 or ctx.weights is None:
        return None
    lins = [_linear_read_once(ctx, ref(a)) for a in mul.ins.args]
    if None in lins:
        return None
    for gate, up in (lins, lins[::-1]):
        name = gate.ins.kwargs.get("activation")
        if name in (None, "none") or up.ins.kwargs.get("activation") != "none":
            continue
        (x, wg, bg), (x2, wu, bu) = gate.ins.args, up.ins.args
        if ref(x) is None or ref(x) != ref(x2) or (bg is None) != (bu is None):
            continue
        pairs = [[wg, wu]] + ([] if bg is None else [[bg, bu]])
        if not all(_stackable(ctx, p) for p in pairs) or not all(
            ctx.consume(n) for n in (gate, up)
        ):
            return None
        fused = [_stacked(ctx, p) for p in pairs]  # new weights only for a rewrite that happens
        args = [x, {"v": fused[0]}, None if bg is None else {"v": fused[1]}]
        return [Instruction("kernl.gated_linear", args, {"activation": name}, mul.ins.outputs)]
    return None


def _stackable(ctx: Rewriter, parts: list) -> bool:
    a, b = (ctx.weights[ctx.program.weights[ref(p)]] for p in parts)
    return a.shape == b.shape and a.dtype == b.dtype


def _stacked(ctx: Rewriter, parts: list) -> int:
    """A new weight of the program: two weights of one shape stacked along their first axis."""
    names = [ctx.program.weights[ref(p)] for p in parts]
    tensors = [ctx.weights[n] for n in names]
    fused = "fused." + "+".join(names)
    ctx.weights.setdefault(fused, torch.cat(tensors, 0))
    vid = ctx.new_value(list(ctx.weights[fused].shape), ctx.dtype(ref(parts[0])))
    ctx.program.weights[vid] = fused
    return vid


RULES: list[Rule] = [
    (Pat("aten.mul.Tensor", name="mul"), _to_gated),
    (Pat("aten.mul.Tensor", name="mul"), _two_linears),
]


def fuse_gated_linear(program: Program, weights: dict[str, torch.Tensor] | None = None) -> Program:
    """Every `act(a) * b` of a plain linear's two halves becomes kernl.gated_linear, and with
    `weights` (which gains the stacked weights) every `act(gate(x)) * up(x)` of two linears."""
    return rewrite_with(program, RULES, weights)
