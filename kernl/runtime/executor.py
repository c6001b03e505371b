"""Run a program: resolve every op name once, then walk the instruction list.

Values are freed right after their last use, so that under CUDA-graph capture the caching
allocator can reuse their memory within the graph's pool."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kernl.artifacts.errors import ArtifactUnsafeError
from kernl.artifacts.program import Program, iter_value_refs

from .vocabulary import DTYPES, LAYOUTS, MEMORY_FORMATS, UnknownOpError, resolve_op


class ProgramRunError(RuntimeError):
    """An instruction of a program failed while it ran: the message names the bucket, the
    instruction and its op; the op's own error is its __cause__."""


class _ProgramOutOfMemoryError(ProgramRunError, torch.OutOfMemoryError):
    """Out of memory in an instruction: still a torch.OutOfMemoryError to whoever catches
    one (a server that answers it as overload, not as a broken model)."""


class _Ref:
    __slots__ = ("id",)

    def __init__(self, id: int):
        self.id = id


def _decode(arg: Any, device: torch.device) -> Any:
    if isinstance(arg, list):
        return [_decode(a, device) for a in arg]
    if isinstance(arg, dict):
        ((tag, val),) = arg.items()
        if tag == "v":
            return _Ref(val)
        table = {"dtype": DTYPES, "layout": LAYOUTS, "memory_format": MEMORY_FORMATS}.get(tag)
        if tag == "device":
            return device
        if table is None or val not in table:
            raise ArtifactUnsafeError(f"argument {arg!r} is not allowed")
        return table[val]
    return arg


def _has_ref(a: Any) -> bool:
    return isinstance(a, _Ref) or (isinstance(a, list) and any(_has_ref(x) for x in a))


def _bind(a: Any, env: list) -> Any:
    if isinstance(a, _Ref):
        return env[a.id]
    if isinstance(a, list):
        return [_bind(x, env) for x in a]
    return a


class Executor:
    def __init__(self, program: Program, weights: dict[str, torch.Tensor], device: torch.device):
        self.program = program
        self.device = device
        self.steps: list[tuple[Callable, list, dict, list, list[int]]] = []
        keep = set(program.outputs) | set(program.weights) | set(program.inputs.values())
        last_use: dict[int, int] = {}
        for i, ins in enumerate(program.instructions):
            for v in iter_value_refs([ins.args, list(ins.kwargs.values())]):
                last_use[v] = i
        frees: list[list[int]] = [[] for _ in program.instructions]
        for v, i in last_use.items():
            if v not in keep:
                frees[i].append(v)
        for i, ins in enumerate(program.instructions):
            try:
                fn = resolve_op(ins.op)
            except UnknownOpError as e:
                raise ArtifactUnsafeError(
                    f"program {program.bucket.name}, instruction {i}: {e}"
                ) from None
            args = [_decode(a, device) for a in ins.args]
            kwargs = {k: _decode(v, device) for k, v in ins.kwargs.items()}
            self.steps.append((fn, args, kwargs, ins.outputs, frees[i]))
        self.weight_values = {}
        for vid, name in program.weights.items():
            if name not in weights:
                raise ArtifactUnsafeError(
                    f"program {program.bucket.name} uses weight {name!r}, absent from weights"
                )
            self.weight_values[vid] = weights[name]

    def initial_env(self, inputs: dict[str, torch.Tensor]) -> list[Any]:
        """Value slots with the weights and inputs in place."""
        env: list[Any] = [None] * self.program.num_values
        for vid, t in self.weight_values.items():
            env[vid] = t
        for name, vid in self.program.inputs.items():
            env[vid] = inputs[name]
        return env

    @staticmethod
    def store(env: list[Any], outs: list[int | None], result: Any) -> None:
        if isinstance(result, (tuple, list)):
            for o, r in zip(outs, result):
                if o is not None:
                    env[o] = r
        else:
            env[outs[0]] = result

    def run(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        env = self.initial_env(inputs)
        try:  # costs nothing until an op raises (and a graph's replay never comes here)
            for fn, args, kwargs, outs, frees in self.steps:
                self.store(
                    env,
                    outs,
                    fn(*_bind(args, env), **{k: _bind(v, env) for k, v in kwargs.items()}),
                )
                for v in frees:
                    env[v] = None
        except Exception as e:
            # the failing step is the one whose args list (made per instruction) is bound now
            i = next(i for i, step in enumerate(self.steps) if step[1] is args)
            b = self.program.bucket
            oom = isinstance(e, torch.OutOfMemoryError)
            raise (_ProgramOutOfMemoryError if oom else ProgramRunError)(
                f"bucket {b.name} (batch {b.batch}, seq {b.seq}), instruction {i} "
                f"({self.program.instructions[i].op}): {type(e).__name__}: {e}"
            ) from e
        return [env[o] for o in self.program.outputs]
