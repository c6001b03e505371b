"""A bucket's program: a flat, ordered instruction list over numbered values.

Instruction arguments are plain msgpack data. Non-scalar arguments are tagged one-key maps,
so nothing needs pickling and nothing read back can name code:

    {"v": 7}                 the value numbered 7 (a tensor produced earlier, an input, a weight)
    {"dtype": "float16"}     a torch dtype, by name
    {"device": None}         "the device the program runs on", filled in at load
    {"layout": "strided"}    {"memory_format": "contiguous_format"}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .schema import Bucket

ARG_TAGS = ("v", "dtype", "device", "layout", "memory_format")


@dataclass
class Instruction:
    op: str  # a name from the runtime's closed vocabulary, e.g. "aten.linear.default"
    args: list[Any]
    kwargs: dict[str, Any]
    outputs: list[int | None]  # value ids; None for results nobody reads


@dataclass
class Program:
    bucket: Bucket
    num_values: int
    inputs: dict[str, int]  # model input name -> value id
    weights: dict[int, str]  # value id -> tensor name in weights.safetensors
    outputs: list[int]  # value ids, in the manifest's output order
    instructions: list[Instruction]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bucket": {"batch": self.bucket.batch, "seq": self.bucket.seq},
            "num_values": self.num_values,
            "inputs": dict(self.inputs),
            "weights": {int(k): v for k, v in self.weights.items()},
            "outputs": list(self.outputs),
            "instructions": [[i.op, i.args, i.kwargs, i.outputs] for i in self.instructions],
            "meta": self.meta,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Program:
        return Program(
            bucket=Bucket(int(d["bucket"]["batch"]), int(d["bucket"]["seq"])),
            num_values=int(d["num_values"]),
            inputs={str(k): int(v) for k, v in d["inputs"].items()},
            weights={int(k): str(v) for k, v in d["weights"].items()},
            outputs=[int(v) for v in d["outputs"]],
            instructions=[_instruction(i, entry) for i, entry in enumerate(d["instructions"])],
            meta=dict(d.get("meta", {})),
        )

    def ops_used(self) -> set[str]:
        return {i.op for i in self.instructions}


def iter_value_refs(arg: Any):
    """Yield every value id referenced inside an encoded argument."""
    if isinstance(arg, dict):
        if "v" in arg:
            yield arg["v"]
    elif isinstance(arg, list):
        for a in arg:
            yield from iter_value_refs(a)


def _instruction(index: int, entry: Any) -> Instruction:
    """Instruction `index` of a program as read: [op, args, kwargs, outputs]; anything else is
    named with its index (the reader said "too many values to unpack (expected 4)")."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 4:
        what = f"{len(entry)} fields" if isinstance(entry, (list, tuple)) else type(entry).__name__
        raise ValueError(f"instruction {index} is not [op, args, kwargs, outputs] ({what})")
    op, args, kwargs, outs = entry
    return Instruction(str(op), list(args), dict(kwargs), list(outs))
