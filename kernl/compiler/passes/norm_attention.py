"""aten.layer_norm over the last axis becomes kernl.layer_norm (absorbing a preceding
single-use residual add); aten.scaled_dot_product_attention with a boolean mask or none
becomes kernl.attention."""

from __future__ import annotations

from kernl.artifacts.program import Instruction, Program

from .graph import ProgramView, arg, ref


def replace_layer_norm(program: Program) -> Program:
    view = ProgramView(program)
    uses = view.use_counts()
    producer = view.producers()
    for n, ins in enumerate(program.instructions):
        if ins is None or ins.op != "aten.layer_norm.default":
            continue
        x = ref(arg(ins, 0, "input"))
        shape = arg(ins, 1, "normalized_shape")
        w, b = ref(arg(ins, 2, "weight")), ref(arg(ins, 3, "bias"))
        eps = arg(ins, 4, "eps", 1e-5)
        if x is None or w is None or view.shape(x) is None or shape != view.shape(x)[-1:]:
            continue
        new = Instruction(
            "kernl.layer_norm", [{"v": x}, {"v": w}, None if b is None else {"v": b}, eps], {},
            ins.outputs,
        )  # fmt: skip
        p = producer.get(x)
        add = program.instructions[p] if p is not None else None
        if (
            add is not None
            and add.op == "aten.add.Tensor"
            and not add.kwargs
            and uses[x] == 1
            and len(add.args) == 2
            and all(ref(a) is not None for a in add.args)
            and view.shape(ref(add.args[0])) == view.shape(ref(add.args[1])) == view.shape(x)
        ):
            new.args[0] = add.args[0]
            new.kwargs["residual"] = add.args[1]
            program.instructions[p] = None
        program.instructions[n] = new
    program.instructions = [i for i in program.instructions if i is not None]
    return view.commit()


def replace_attention(program: Program) -> Program:
    view = ProgramView(program)
    for n, ins in enumerate(program.instructions):
        if ins.op != "aten.scaled_dot_product_attention.default":
            continue
        q, k, v = (arg(ins, i, name) for i, name in enumerate(("query", "key", "value")))
        mask = arg(ins, 3, "attn_mask")
        dropout = arg(ins, 4, "dropout_p", 0.0)
        causal = arg(ins, 5, "is_causal", False)
        scale = arg(ins, 6, "scale")
        gqa = arg(ins, 7, "enable_gqa", False)
        if dropout or gqa or (mask is not None and view.dtype(ref(mask)) != "bool"):
            continue  # additive float masks and dropout stay with aten
        shapes = [view.shape(ref(t)) for t in (q, k, v)]
        if any(s is None or len(s) != 4 for s in shapes) or shapes[0][1] != shapes[1][1]:
            continue
        program.instructions[n] = Instruction(
            "kernl.attention", [q, k, v, mask, scale, bool(causal)], {}, ins.outputs
        )
    return view.commit()


def hoist_attention_mask(program: Program) -> Program:
    """kernl.attention instructions sharing a boolean mask read one additive bias made once
    (kernl.mask_to_bias) instead of each converting the mask again."""
    view = ProgramView(program)
    by_mask: dict[int, list[int]] = {}
    for n, ins in enumerate(program.instructions):
        if ins.op == "kernl.attention" and ref(ins.args[3]) is not None:
            mask = ref(ins.args[3])
            if view.dtype(mask) == "bool":
                by_mask.setdefault(mask, []).append(n)
    inserts: dict[int, Instruction] = {}
    for mask, users in by_mask.items():
        dtype = view.dtype(ref(program.instructions[users[0]].args[0]))
        if dtype is None:
            continue
        bias = view.new_value(view.shape(mask), dtype)
        inserts[users[0]] = Instruction(
            "kernl.mask_to_bias", [{"v": mask}, {"dtype": dtype}], {}, [bias]
        )
        for n in users:
            program.instructions[n].args[3] = {"v": bias}
    out: list[Instruction] = []
    for n, ins in enumerate(program.instructions):
        if n in inserts:
            out.append(inserts[n])
        out.append(ins)
    program.instructions = out
    return view.commit()
