"""Hand-built programs for pass tests: declare inputs, weights and instructions by name, render
a program as short lines ("kernl.linear(x, w, b; activation=gelu) -> h"), and run one on the
CPU with random weights to check a rewrite keeps the computed function."""

from __future__ import annotations

import copy
from typing import Any

import torch

from kernl.artifacts.program import Instruction, Program
from kernl.artifacts.schema import Bucket
from kernl.runtime.executor import Executor

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bool": torch.bool,
    "int64": torch.int64,
}


class Builder:
    def __init__(self, dtype: str = "float32", seed: int = 0):
        self.dtype = dtype
        self.gen = torch.Generator().manual_seed(seed)
        self.instructions: list[Instruction] = []
        self.values: dict[int, list] = {}
        self.inputs: dict[str, int] = {}
        self.weights: dict[int, str] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.names: dict[int, str] = {}

    def _value(self, shape: list[int], dtype: str | None, name: str | None) -> dict:
        vid = len(self.values)
        self.values[vid] = [list(shape), dtype or self.dtype]
        if name:
            self.names[vid] = name
        return {"v": vid}

    def input(self, name: str, shape: list[int], dtype: str | None = None) -> dict:
        v = self._value(shape, dtype, name)
        self.inputs[name] = v["v"]
        return v

    def weight(self, name: str, shape: list[int], dtype: str | None = None) -> dict:
        v = self._value(shape, dtype, name)
        self.weights[v["v"]] = name
        t = torch.randn(shape, generator=self.gen) * 0.5
        self.tensors[name] = t.to(DTYPES[dtype or self.dtype])
        return v

    def op(
        self,
        op: str,
        *args: Any,
        shape: list[int] | list[list[int]],
        dtype: str | None = None,
        name: str | list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Append `op(*args, **kwargs)`; a list of shapes makes several outputs."""
        multi = bool(shape) and isinstance(shape[0], list)
        shapes = shape if multi else [shape]
        names = name if isinstance(name, list) else [name] * len(shapes)
        outs = [self._value(s, dtype, n) for s, n in zip(shapes, names)]
        self.instructions.append(Instruction(op, list(args), dict(kwargs), [o["v"] for o in outs]))
        return outs if multi else outs[0]

    def program(self, *outputs: dict) -> Program:
        return Program(
            bucket=Bucket(1, 1),
            num_values=len(self.values),
            inputs=dict(self.inputs),
            weights=dict(self.weights),
            outputs=[o["v"] for o in outputs],
            instructions=copy.deepcopy(self.instructions),
            meta={"values": copy.deepcopy(self.values)},
        )

    def example(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, vid in self.inputs.items():
            shape, dtype = self.values[vid]
            if dtype == "bool":
                out[name] = torch.rand(shape, generator=self.gen) > 0.3
            elif dtype == "int64":
                out[name] = torch.randint(0, 4, shape, generator=self.gen)
            else:
                out[name] = torch.randn(shape, generator=self.gen).to(DTYPES[dtype])
        return out

    def show(self, program: Program) -> list[str]:
        return show(program, self.names)


def show(program: Program, names: dict[int, str] | None = None) -> list[str]:
    """One line per instruction; values by name where the builder named them, weights by their
    tensor name, the rest as %id."""
    names = dict(names or {})

    def fmt(a: Any) -> str:
        if isinstance(a, dict) and "v" in a:
            v = a["v"]
            return names.get(v) or program.weights.get(v) or f"%{v}"
        if isinstance(a, dict):
            ((k, v),) = a.items()
            return f"{k}:{v}"
        if isinstance(a, list):
            return "[" + ", ".join(fmt(x) for x in a) + "]"
        return repr(a)

    lines = []
    for ins in program.instructions:
        args = ", ".join(fmt(a) for a in ins.args)
        if ins.kwargs:
            args += "; " + ", ".join(f"{k}={fmt(v)}" for k, v in ins.kwargs.items())
        outs = ", ".join("_" if o is None else fmt({"v": o}) for o in ins.outputs)
        lines.append(f"{ins.op}({args}) -> {outs}")
    return lines


def run(program: Program, tensors: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]):
    return Executor(program, tensors, torch.device("cpu")).run(inputs)


def assert_same_function(
    before: Program,
    after: Program,
    b: Builder,
    atol: float = 1e-5,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    inputs = b.example()
    tensors = tensors if tensors is not None else b.tensors
    for x, y in zip(run(before, tensors, inputs), run(after, tensors, inputs)):
        torch.testing.assert_close(y, x, atol=atol, rtol=atol)
