"""One arrival-counter buffer for the split-K linears of a program (after tuning).

The split-K kernel (kernels/skinny_linear_fused.py, a kernl.linear config with `split_k`)
reduces its K chunks in the same launch: each output block's last chunk to arrive, counted in
an int32 buffer of zeros, sums them, and leaves its counter zeroed. Made by each call, that
buffer would be a fill kernel before every such linear; but a program's linears run one after
the other on one stream, each leaving the buffer as it found it, so one buffer serves them
all: a single `aten.zeros` before the first of them (one fill a call, inside the bucket's
graph), read by every split-K linear as its `counters`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kernl.artifacts.program import Instruction, Program
from kernl.kernels.skinny_linear_fused import MAX_COUNTERS


def _split_k(ins: Instruction) -> bool:
    config = ins.kwargs.get("config")
    return (
        ins.op == "kernl.linear"
        and ins.kwargs.get("impl") == "triton"
        and bool(config)
        and bool(dict(config).get("split_k"))
    )


def share_split_k_counters(program: Program, records: Sequence[Any] = ()) -> int:
    """Gives every split-K kernl.linear of `program` (in place) the counters of one zeros
    instruction put right before the first of them; returns how many linears read it (0: the
    program is unchanged). `records` (the tuner's, each with the `index` of an instruction):
    those past the new instruction are renumbered, so the compile report still names the
    program's instructions."""
    users = [ins for ins in program.instructions if _split_k(ins)]
    if not users:
        return 0
    counters = program.num_values
    program.num_values += 1
    zeros = Instruction(
        "aten.zeros.default",
        [[MAX_COUNTERS]],
        {"dtype": {"dtype": "int32"}, "device": {"device": None}},
        [counters],
    )
    first = next(i for i, ins in enumerate(program.instructions) if ins is users[0])
    program.instructions.insert(first, zeros)
    for record in records:
        if record.index >= first:
            record.index += 1
    for ins in users:
        ins.kwargs["counters"] = {"v": counters}
    return len(users)
