"""aten.linear becomes kernl.linear; a single-use result feeding an activation or a same-shape
add absorbs it, so the kernel applies both in its epilogue (and so does cuBLASLt's epilogue
for relu and tanh-GELU when the tuner keeps the GEMM on aten, see kernl_ops.linear).

Run after replace_layer_norm: an add that feeds a layer norm is absorbed by the norm (whose
kernel reads the residual anyway), which leaves the GEMM plain even when it stays on cuBLAS."""

from __future__ import annotations

from kernl.artifacts.program import Instruction, Program

from .graph import arg
from .matcher import Node, Pat, Rewriter, Rule, rewrite_with

_ACTIVATION = {
    "aten.relu.default": lambda ins: "relu",
    "aten.silu.default": lambda ins: "silu",
    "aten.tanh.default": lambda ins: "tanh",
    "aten.gelu.default": lambda ins: {"none": "gelu", "tanh": "gelu_tanh"}.get(
        arg(ins, 1, "approximate", "none")
    ),
}


def _plain(ctx: Rewriter, n: Node) -> bool:
    k = n.ins.kwargs
    return k.get("activation") == "none" and "residual" not in k


def _to_kernl(ctx: Rewriter, lin: Node) -> list[Instruction] | None:
    ins = lin.ins
    if ins.kwargs or not 2 <= len(ins.args) <= 3:
        return None
    b = ins.args[2] if len(ins.args) > 2 else None
    return [
        Instruction(
            "kernl.linear", [ins.args[0], ins.args[1], b], {"activation": "none"}, ins.outputs
        )
    ]


def _absorb_activation(ctx: Rewriter, act: Node, lin: Node) -> list[Instruction] | None:
    name = _ACTIVATION[act.ins.op](act.ins)
    if name is None or len(act.ins.args) > 2:
        return None
    return [
        Instruction(
            "kernl.linear",
            list(lin.ins.args),
            {**lin.ins.kwargs, "activation": name},
            act.ins.outputs,
        )
    ]


def _absorb_residual(ctx: Rewriter, add: Node, lin: Node, r: Node) -> list[Instruction] | None:
    if add.ins.kwargs or len(add.ins.args) != 2:
        return None  # alpha= scales the residual: not what the epilogue computes
    y = lin.ins.outputs[0]
    if ctx.shape(r.vid) is None or ctx.shape(r.vid) != ctx.shape(y):
        return None  # a broadcasting add would need a broadcasting load
    if ctx.dtype(r.vid) != ctx.dtype(y):
        return None
    return [
        Instruction(
            "kernl.linear",
            list(lin.ins.args),
            {**lin.ins.kwargs, "residual": {"v": r.vid}},
            add.ins.outputs,
        )
    ]


_LIN = dict(op="kernl.linear", name="lin", one_use=True)
RULES: list[Rule] = [
    (Pat("aten.linear.default", name="lin"), _to_kernl),
    (Pat(tuple(_ACTIVATION), name="act", src=(Pat(**_LIN, where=_plain),)), _absorb_activation),
    (
        Pat(
            "aten.add.Tensor",
            name="add",
            src=(Pat(**_LIN, where=lambda c, n: "residual" not in n.ins.kwargs), Pat(name="r")),
        ),
        _absorb_residual,
    ),
    (
        Pat(
            "aten.add.Tensor",
            name="add",
            src=(Pat(name="r"), Pat(**_LIN, where=lambda c, n: "residual" not in n.ins.kwargs)),
        ),
        _absorb_residual,
    ),
]


def fuse_linear(program: Program) -> Program:
    """Every aten.linear becomes kernl.linear; a single-use result feeding an activation
    or a same-shape add absorbs it."""
    return rewrite_with(program, RULES)
