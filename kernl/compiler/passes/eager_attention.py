"""Attention written out in aten ops becomes kernl.attention.

Models without an SDPA path (MPNet, MegatronBERT) trace their attention as it is written:

    scores = matmul(q, k.transpose(-1, -2)) / c      (or * c, or neither)
    scores = scores + bias_1 [+ bias_2]              (MPNet: relative positions, then the mask)
    out = matmul(softmax(scores, -1), v)

Four to six launches and a [B, H, Lq, Lk] score tensor written and read twice; kernl.attention
computes the same in one kernel, the biases summed into the one additive bias it takes (made
once per distinct pair: every layer of MPNet adds the same two).

Matched only where the result is the same function: 4-D q, k, v of one batch and head count,
the transpose over the last two axes, a positive scale given as a number, biases of the
scores' dtype that broadcast to the scores without growing them, softmax over the last axis in
the scores' dtype, and every intermediate read by the next step alone."""

from __future__ import annotations

import torch

from kernl.artifacts.program import Instruction, Program

from .graph import arg, ref
from .matcher import Node, Pat, Rewriter, Rule, rewrite_with

_SOFTMAX = ("aten.softmax.int", "aten._softmax.default")
_SCALE = {"aten.div.Tensor": "div", "aten.div.Scalar": "div"}
_SCALE |= {"aten.mul.Tensor": "mul", "aten.mul.Scalar": "mul"}
_LAST_TWO = {(-1, -2), (-2, -1), (2, 3), (3, 2)}
_FLOAT32 = {"dtype": "float32"}


def _chain(ctx: Rewriter, vid: int | None, consumed: list[Node]) -> Node | None:
    """The value's producer, if it may fold into the attention (read by the next step only)."""
    node = ctx.node(vid)
    if node.ins is None or ctx.uses[vid] != 1:
        return None
    consumed.append(node)
    return node


def _biases(ctx: Rewriter, node: Node, scores_shape: list[int], consumed: list[Node]):
    """Walk up the adds from the softmax's input: (the node below them, the biases)."""
    biases: list[int] = []
    while node.ins.op == "aten.add.Tensor" and len(biases) < 2:
        ins = node.ins
        if ins.kwargs or len(ins.args) != 2:
            return None
        a, b = (ref(x) for x in ins.args)
        below = next(
            (v for v in (a, b) if v is not None and ctx.uses[v] == 1 and ctx.node(v).ins), None
        )
        bias = b if below == a else a
        if below is None or bias is None or not _broadcasts(ctx.shape(bias), scores_shape):
            return None
        if ctx.dtype(bias) != ctx.dtype(node.vid):
            return None
        biases.append(bias)
        node = _chain(ctx, below, consumed)
    return node, biases[::-1]


def _broadcasts(shape: list[int] | None, to: list[int]) -> bool:
    if shape is None or len(shape) > len(to):
        return False
    return all(s in (1, t) for s, t in zip(shape[::-1], to[::-1]))


def _scale(ctx: Rewriter, node: Node, consumed: list[Node]) -> tuple[Node | None, float] | None:
    """(the node below the scaling, the factor it applies); no scaling: factor 1."""
    kind = _SCALE.get(node.ins.op)
    if kind is None:
        return node, 1.0
    c = node.ins.args[1] if len(node.ins.args) > 1 else None
    if node.ins.kwargs or isinstance(c, bool) or not isinstance(c, (int, float)) or c <= 0:
        return None
    factor = 1.0 / c if kind == "div" else float(c)
    return _chain(ctx, ref(node.ins.args[0]), consumed), factor


def _cast_back(ctx: Rewriter, pv: Node, cast: Node, softmax: Node) -> list[Instruction] | None:
    """transformers' `eager_attention_forward`: softmax(..., dtype=float32).to(q.dtype), the
    probabilities in float32 then cast to the scores' dtype, as kernl.attention computes."""
    ins = cast.ins
    to = arg(ins, 1, "dtype") if ins.op == "aten.to.dtype" else ins.kwargs.get("dtype")
    extra = set(ins.kwargs) - {"dtype"} if ins.op == "aten._to_copy.default" else ins.kwargs
    if extra or len(ins.args) > (2 if ins.op == "aten.to.dtype" else 1):
        return None
    if to != {"dtype": ctx.dtype(ref(arg(softmax.ins, 0, "self")))}:
        return None
    return _attention(ctx, pv, softmax, float32_softmax=True)


def _attention(
    ctx: Rewriter, pv: Node, softmax: Node, float32_softmax: bool = False
) -> list[Instruction] | None:
    consumed: list[Node] = []
    sm = softmax.ins
    softmax_dtype = arg(sm, 2, "dtype") if sm.op == "aten.softmax.int" else None
    float32_scores = ctx.dtype(ref(arg(sm, 0, "self"))) == "float32"
    if softmax_dtype is not None and not (
        softmax_dtype == _FLOAT32 and (float32_softmax or float32_scores)
    ):
        return None
    if sm.op == "aten._softmax.default" and arg(sm, 2, "half_to_float"):
        return None
    if ctx.dtype(ref(arg(sm, 0, "self"))) != ctx.dtype(ref(pv.ins.args[0])):
        return None
    p = ref(pv.ins.args[0])
    v = ref(pv.ins.args[1]) if len(pv.ins.args) > 1 else None
    scores_shape = ctx.shape(p)
    if v is None or pv.ins.kwargs or scores_shape is None or len(scores_shape) != 4:
        return None
    if arg(sm, 1, "dim") not in (-1, 3):
        return None
    below = _chain(ctx, ref(arg(sm, 0, "self")), consumed)
    found = None if below is None else _biases(ctx, below, scores_shape, consumed)
    if found is None or found[0] is None:
        return None
    below, biases = found
    scaled = _scale(ctx, below, consumed)
    if scaled is None or scaled[0] is None:
        return None
    qk, scale = scaled
    if qk.ins.op != "aten.matmul.default" or qk.ins.kwargs:
        return None
    q, kt = (ref(x) for x in qk.ins.args)
    kt_node = ctx.node(kt)
    if q is None or kt_node.ins is None or kt_node.ins.op != "aten.transpose.int":
        return None
    if tuple(kt_node.ins.args[1:3]) not in _LAST_TWO:
        return None
    k = ref(kt_node.ins.args[0])
    shapes = [ctx.shape(t) for t in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes) or not (
        shapes[0][:2] == shapes[1][:2] == shapes[2][:2] and shapes[0][3] == shapes[1][3]
    ):
        return None
    if shapes[1][2] != shapes[2][2] or scores_shape != [*shapes[0][:3], shapes[1][2]]:
        return None
    if shapes[2][3] != shapes[0][3]:
        return None  # kernl's attention kernels take one head dim for q, k and v
    dtypes = {ctx.dtype(t) for t in (q, k, v, p)}
    if len(dtypes) != 1 or not all(ctx.consume(n) for n in consumed):
        return None
    made: list[Instruction] = []
    mask = None
    if len(biases) == 1:
        mask = {"v": biases[0]}
    elif len(biases) == 2:
        summed = ctx.memo.get(("bias sum", biases[0], biases[1]))
        if summed is None:  # the first attention adds them, the others read the sum
            shape = list(torch.broadcast_shapes(*(ctx.shape(b) for b in biases)))
            summed = ctx.new_value(shape, ctx.dtype(p))
            ctx.memo["bias sum", biases[0], biases[1]] = summed
            made.append(Instruction("aten.add.Tensor", [{"v": b} for b in biases], {}, [summed]))
        mask = {"v": summed}
    args = [{"v": q}, {"v": k}, {"v": v}, mask, scale, False]
    return [*made, Instruction("kernl.attention", args, {}, pv.ins.outputs)]


EAGER_ATTENTION_RULES: list[Rule] = [
    (
        Pat("aten.matmul.default", name="pv", src=(Pat(_SOFTMAX, name="softmax", one_use=True),)),
        _attention,
    ),
    (
        Pat(
            "aten.matmul.default",
            name="pv",
            src=(
                Pat(
                    ("aten.to.dtype", "aten._to_copy.default"),
                    name="cast",
                    one_use=True,
                    src=(Pat(_SOFTMAX, name="softmax", one_use=True),),
                ),
            ),
        ),
        _cast_back,
    ),
]


def replace_eager_attention(program: Program) -> Program:
    return rewrite_with(program, EAGER_ATTENTION_RULES)
