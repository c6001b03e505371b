"""A small editing view over a Program for rewrite passes: who produces a value, who reads
it, and its shape and dtype (recorded at lowering)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from kernl.artifacts.program import Instruction, Program, iter_value_refs
from kernl.artifacts.vocabulary import is_in_place


def ref(a: Any) -> int | None:
    """The value id of an encoded tensor argument, or None."""
    return a["v"] if isinstance(a, dict) and "v" in a else None


def reads(ins: Instruction) -> list[int]:
    """The value ids an instruction reads, positional and keyword arguments alike."""
    return list(iter_value_refs([ins.args, list(ins.kwargs.values())]))


def arg(ins: Instruction, index: int, name: str, default: Any = None) -> Any:
    """An argument given positionally or by keyword."""
    if index < len(ins.args):
        return ins.args[index]
    return ins.kwargs.get(name, default)


class ProgramView:
    def __init__(self, program: Program):
        self.program = program
        self.values: dict[int, list] = {
            int(k): v for k, v in program.meta.get("values", {}).items()
        }

    def use_counts(self) -> Counter:
        counts: Counter = Counter()
        for ins in self.program.instructions:
            counts.update(reads(ins))
        counts.update(self.program.outputs)
        return counts

    def producers(self) -> dict[int, int]:
        return {
            o: i
            for i, ins in enumerate(self.program.instructions)
            for o in ins.outputs
            if o is not None
        }

    def shape(self, vid: int | None) -> list[int] | None:
        return None if vid is None or vid not in self.values else self.values[vid][0]

    def dtype(self, vid: int | None) -> str | None:
        return None if vid is None or vid not in self.values else self.values[vid][1]

    def is_weight(self, vid: int | None) -> bool:
        return vid is not None and vid in self.program.weights

    def new_value(self, shape: list[int], dtype: str) -> int:
        vid = self.program.num_values
        self.program.num_values += 1
        self.values[vid] = [list(shape), dtype]
        return vid

    def commit(self) -> Program:
        self.program.meta["values"] = self.values
        return self.program


def drop_dead(program: Program) -> Program:
    """Drop the instructions whose results nobody reads: a trace keeps values the model
    computed and never used (transformers' mask code makes a head index it does not read),
    and a rewrite leaves the instructions it replaced. Ops that write their input in place
    stay, and so does anything a kept instruction reads."""
    used = set(program.outputs)
    kept: list[Instruction] = []
    for ins in reversed(program.instructions):
        outs = [o for o in ins.outputs if o is not None]
        if not outs or is_in_place(ins.op) or any(o in used for o in outs):
            used.update(reads(ins))
            kept.append(ins)
    program.instructions = kept[::-1]
    return program
