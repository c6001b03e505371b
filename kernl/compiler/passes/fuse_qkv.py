"""Linears that read the same input (attention's q, k and v projections) become one linear
over their concatenated weights, followed by a split: one GEMM instead of three."""

from __future__ import annotations

import torch

from kernl.artifacts.program import Instruction, Program

from .graph import ProgramView, ref

_LINEAR = "aten.linear.default"


def fuse_qkv(program: Program, weights: dict[str, torch.Tensor]) -> Program:
    view = ProgramView(program)
    groups: dict[int, list[int]] = {}
    for i, ins in enumerate(program.instructions):
        if ins.op != _LINEAR or ins.kwargs or len(ins.args) != 3:
            continue
        x, w, b = (ref(a) for a in ins.args)
        if view.is_weight(w) and view.is_weight(b) and x is not None:
            groups.setdefault(x, []).append(i)
    replaced: dict[int, list[Instruction]] = {}
    dropped: set[int] = set()
    for x, members in groups.items():
        if not 2 <= len(members) <= 4:
            continue
        ins = [program.instructions[i] for i in members]
        w_names = [program.weights[ref(i.args[1])] for i in ins]
        b_names = [program.weights[ref(i.args[2])] for i in ins]
        ws = [weights[n] for n in w_names]
        if len({(w.shape[1], w.dtype) for w in ws}) != 1:
            continue
        fused_w = "fused." + "+".join(w_names)
        fused_b = "fused." + "+".join(b_names)
        weights.setdefault(fused_w, torch.cat(ws, 0))
        weights.setdefault(fused_b, torch.cat([weights[n] for n in b_names], 0))
        w_id = view.new_value(list(weights[fused_w].shape), view.dtype(ref(ins[0].args[1])))
        b_id = view.new_value(list(weights[fused_b].shape), view.dtype(ref(ins[0].args[2])))
        program.weights[w_id] = fused_w
        program.weights[b_id] = fused_b
        sizes = [w.shape[0] for w in ws]
        out_shape = list(view.shape(ins[0].outputs[0]))
        out_shape[-1] = sum(sizes)
        y = view.new_value(out_shape, view.dtype(ins[0].outputs[0]))
        replaced[members[0]] = [
            Instruction(_LINEAR, [{"v": x}, {"v": w_id}, {"v": b_id}], {}, [y]),
            Instruction(
                "aten.split_with_sizes.default",
                [{"v": y}, sizes, -1],
                {},
                [i.outputs[0] for i in ins],
            ),  # fmt: skip
        ]
        dropped.update(members[1:])
    out: list[Instruction] = []
    for i, ins in enumerate(program.instructions):
        if i in replaced:
            out.extend(replaced[i])
        elif i not in dropped:
            out.append(ins)
    program.instructions = out
    return view.commit()
