"""GELU written out in elementwise ops becomes aten.gelu, which fuse_linear then puts in the
epilogue of the linear before it.

transformers' `gelu_new` (ALBERT, GPT-2's NewGELUActivation: 0.5 x (1 + tanh(sqrt(2/pi)
(x + 0.044715 x^3)))) traces as eight launches, ESM's `x * 0.5 * (1 + erf(x / sqrt(2)))` as
five; each writes a full intermediate. Rather than one pattern per spelling, a candidate is any
small tree of elementwise ops with number operands over one tensor x: it is evaluated in
float64 on points across GELU's whole shape (both tails and the bend) and replaced only where it
is GELU (erf) or its tanh approximation there to 1e-9. The replacement computes in float32
where the written form rounded after each op in fp16: it differs from eager by rounding only."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernl.artifacts.program import Instruction, Program

from .graph import ref
from .matcher import Node, Pat, Rewriter, Rule, rewrite_with

# op -> its function on float64 tensors (numbers stay numbers)
_ELEMENTWISE: dict[str, Callable] = {
    "aten.mul.Tensor": torch.mul,
    "aten.div.Tensor": torch.div,
    "aten.add.Tensor": torch.add,
    "aten.sub.Tensor": torch.sub,
    "aten.rsub.Scalar": lambda a, b: b - a,
    "aten.pow.Tensor_Scalar": torch.pow,
    "aten.erf.default": torch.erf,
    "aten.tanh.default": torch.tanh,
    "aten.neg.default": torch.neg,
}
_MAX_OPS = 12
_FLOATS = ("float16", "bfloat16", "float32")
_POINTS = torch.cat([torch.linspace(-8.0, 8.0, 321, dtype=torch.float64),
                     torch.tensor([-30.0, -12.5, 12.5, 30.0], dtype=torch.float64)])  # fmt: skip
_GELUS = {
    "none": F.gelu(_POINTS),
    "tanh": F.gelu(_POINTS, approximate="tanh"),
}


def _tree(ctx: Rewriter, root: Node) -> tuple[list[Node], int] | None:
    """The elementwise ops below `root` (root first) and the one tensor x they read, or None."""
    nodes, leaves, todo, seen = [], set(), [root], set()
    shape, dtype = ctx.shape(root.vid), ctx.dtype(root.vid)
    while todo:
        node = todo.pop()
        if node.vid in seen:
            continue
        seen.add(node.vid)
        ins = node.ins
        if node is not root and (ins is None or ins.op not in _ELEMENTWISE):
            leaves.add(node.vid)
            continue
        if ins.kwargs or ctx.shape(node.vid) != shape or ctx.dtype(node.vid) != dtype:
            return None
        nodes.append(node)
        if len(nodes) > _MAX_OPS:
            return None
        for a in ins.args:
            vid = ref(a)
            if vid is not None:
                todo.append(ctx.node(vid))
            elif isinstance(a, bool) or not isinstance(a, (int, float)):
                return None  # a number operand, or nothing
    if len(leaves) != 1:
        return None
    (x,) = leaves
    if ctx.shape(x) != shape or ctx.dtype(x) != dtype:
        return None
    return nodes, x


def _evaluate(nodes: list[Node], x: int) -> torch.Tensor | None:
    """The tree's value at _POINTS (float64), None where an op does not take its operands."""
    by_vid = {n.vid: n for n in nodes}
    memo = {x: _POINTS}

    def value(vid: int) -> torch.Tensor:
        if vid not in memo:
            ins = by_vid[vid].ins
            args = [value(ref(a)) if ref(a) is not None else a for a in ins.args]
            memo[vid] = _ELEMENTWISE[ins.op](*args)
        return memo[vid]

    try:
        return value(nodes[0].vid)
    except (RuntimeError, TypeError):
        return None


def _to_gelu(ctx: Rewriter, root: Node) -> list[Instruction] | None:
    if ctx.dtype(root.vid) not in _FLOATS:
        return None
    found = _tree(ctx, root)
    if found is None or len(found[0]) < 3:  # a GELU takes more than two ops to write out
        return None
    nodes, x = found
    y = _evaluate(nodes, x)
    if y is None or not bool(torch.isfinite(y).all()):
        return None
    for approximate, want in _GELUS.items():
        if bool(((y - want).abs() <= 1e-9 * (1.0 + want.abs())).all()):
            if not all(ctx.consume(n) for n in nodes[1:]):
                return None
            kwargs = {} if approximate == "none" else {"approximate": approximate}
            return [Instruction("aten.gelu.default", [{"v": x}], kwargs, root.ins.outputs)]
    return None


RULES: list[Rule] = [(Pat("aten.mul.Tensor", name="root"), _to_gelu)]


def replace_spelled_gelu(program: Program) -> Program:
    """Every GELU written out in elementwise ops (gelu_new, ESM's erf form) becomes aten.gelu."""
    return rewrite_with(program, RULES)
