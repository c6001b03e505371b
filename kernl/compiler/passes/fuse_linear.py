"""aten.linear followed by an activation and/or a residual add becomes one kernl.linear,
whose kernel applies both in its epilogue."""

from __future__ import annotations

from kernl.artifacts.program import Instruction, Program

from .graph import ProgramView, arg, ref

_ACTIVATION = {
    "aten.relu.default": lambda ins: "relu",
    "aten.silu.default": lambda ins: "silu",
    "aten.gelu.default": lambda ins: {"none": "gelu", "tanh": "gelu_tanh"}.get(
        arg(ins, 1, "approximate", "none")
    ),
}


def _linear_to_kernl(program: Program) -> None:
    for n, ins in enumerate(program.instructions):
        if ins.op == "aten.linear.default" and not ins.kwargs:
            x, w = ins.args[0], ins.args[1]
            b = ins.args[2] if len(ins.args) > 2 else None
            program.instructions[n] = Instruction(
                "kernl.linear", [x, w, b], {"activation": "none"}, ins.outputs
            )


def fuse_linear(program: Program) -> Program:
    """Every aten.linear becomes kernl.linear; a single-use result feeding an activation
    or a same-shape add absorbs it."""
    _linear_to_kernl(program)
    view = ProgramView(program)
    changed = True
    while changed:
        changed = False
        uses = view.use_counts()
        producer = view.producers()
        for n, ins in enumerate(program.instructions):
            src = ref(ins.args[0]) if ins.args else None
            if src is None or uses[src] != 1 or src not in producer:
                continue
            lin = program.instructions[producer[src]]
            if lin is None or lin.op != "kernl.linear":
                continue
            k = lin.kwargs
            if ins.op in _ACTIVATION and k["activation"] == "none" and "residual" not in k:
                act = _ACTIVATION[ins.op](ins)
                if act is None or len(ins.args) > 2:
                    continue
                k["activation"] = act
            elif ins.op == "aten.add.Tensor" and "residual" not in k and not ins.kwargs:
                other = ref(ins.args[1]) if len(ins.args) == 2 else None
                if other is None or view.shape(other) != view.shape(src):
                    continue
                if view.dtype(other) != view.dtype(src):
                    continue
                k["residual"] = {"v": other}
            else:
                continue
            lin.outputs = ins.outputs
            program.instructions[n] = None
            # Move the fused linear to where the consumer was: every input is ready there.
            program.instructions[producer[src]] = None
            program.instructions[n] = lin
            program.instructions = [i for i in program.instructions if i is not None]
            changed = True
            break
    return view.commit()
