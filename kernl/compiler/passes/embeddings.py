"""BERT-style embeddings: three table lookups summed, then layernorm, become one
kernl.bert_embeddings (one kernel instead of five)."""

from __future__ import annotations

from kernl.artifacts.program import Instruction, Program

from .graph import ProgramView, ref


def fuse_bert_embeddings(program: Program) -> Program:
    view = ProgramView(program)
    uses = view.use_counts()
    producer = view.producers()

    def lookups(vid: int | None, dead: list[int]) -> list[tuple[dict, dict]] | None:
        """The (table, ids) gathers whose sum is `vid`, or None if it is anything else."""
        if vid is None or vid not in producer or uses[vid] != 1:
            return None
        n = producer[vid]
        ins = program.instructions[n]
        if ins.op == "aten.embedding.default" and view.is_weight(ref(ins.args[0])):
            if len(ins.args) > 3 or ins.kwargs:  # scale_grad_by_freq / sparse: training only
                return None
            dead.append(n)
            return [(ins.args[0], ins.args[1])]
        if ins.op == "aten.add.Tensor" and not ins.kwargs and len(ins.args) == 2:
            a, b = lookups(ref(ins.args[0]), dead), lookups(ref(ins.args[1]), dead)
            if a is None or b is None:
                return None
            dead.append(n)
            return a + b
        return None

    for n, ins in enumerate(program.instructions):
        if ins is None or ins.op != "kernl.layer_norm":
            continue
        dead: list[int] = []
        terms = lookups(ref(ins.args[0]), dead)
        if "residual" in ins.kwargs and terms is not None:
            more = lookups(ref(ins.kwargs["residual"]), dead)
            terms = None if more is None else terms + more
        if terms is None or len(terms) != 3 or ins.args[2] is None:
            continue
        # the kernel sums three gathers; which table plays which role does not matter
        (w_tab, w_ids), (p_tab, p_ids), (t_tab, t_ids) = terms
        program.instructions[n] = Instruction(
            "kernl.bert_embeddings",
            [w_ids, w_tab, p_ids, p_tab, t_ids, t_tab, ins.args[1], ins.args[2], ins.args[3]],
            {}, ins.outputs,
        )  # fmt: skip
        for d in dead:
            program.instructions[d] = None
    program.instructions = [i for i in program.instructions if i is not None]
    return view.commit()
