"""Turn an exported graph (aten ops) into a Program: number every value, encode every
argument as plain msgpack data, and collect the weights it reads."""

from __future__ import annotations

import hashlib
import operator
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from kernl.artifacts.program import Instruction, Program
from kernl.artifacts.schema import Bucket
from kernl.runtime.vocabulary import is_known_op

# Ops that do nothing in inference: dropped, their output aliased to their input (detach_
# follows a constant made in forward, `torch.tensor(...)`: it returns its input).
_IDENTITY_OPS = {"aten.dropout.default", "aten.alias.default", "aten.detach.default"}
_IDENTITY_OPS |= {"aten.detach_.default"}
# Ops that only check metadata at trace time (and would pin the tracing device).
_DROPPED_OPS = {"aten._assert_tensor_metadata.default", "aten._assert_scalar.default"}


class UnsupportedOpError(ValueError):
    pass


def op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    return getattr(target, "__name__", repr(target))


class _Lowering:
    def __init__(self, ep: ExportedProgram, bucket: Bucket, input_names: list[str]):
        self.ep = ep
        self.bucket = bucket
        self.input_names = input_names
        self.ids: dict[torch.fx.Node, Any] = {}
        self.next_id = 0
        self.weights: dict[str, torch.Tensor] = {}
        self.program_weights: dict[int, str] = {}
        self.program_inputs: dict[str, int] = {}
        self.instructions: list[Instruction] = []
        self.values: dict[int, list] = {}  # value id -> [shape, dtype], for passes and tuning

    def describe(self, vid: int, val: Any) -> None:
        if isinstance(val, torch.Tensor):
            self.values[vid] = [list(val.shape), str(val.dtype).removeprefix("torch.")]

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def encode(self, a: Any, where: str) -> Any:
        if isinstance(a, torch.fx.Node):
            v = self.ids.get(a)
            if not isinstance(v, int):
                raise UnsupportedOpError(f"{where}: argument {a.name} is not a single tensor")
            return {"v": v}
        if isinstance(a, (list, tuple)):
            return [self.encode(x, where) for x in a]
        if a is None or isinstance(a, (bool, int, float, str)):
            return a
        if isinstance(a, torch.dtype):
            return {"dtype": str(a).removeprefix("torch.")}
        if isinstance(a, torch.device):
            return {"device": None}
        if isinstance(a, torch.layout) and a == torch.strided:
            return {"layout": "strided"}
        if isinstance(a, torch.memory_format):
            name = str(a).removeprefix("torch.")
            return {"memory_format": name}
        raise UnsupportedOpError(f"{where}: cannot serialise argument {a!r} ({type(a).__name__})")

    def placeholders(self) -> None:
        sig = self.ep.graph_signature
        kinds = {spec.arg.name: spec for spec in sig.input_specs}
        user = iter(self.input_names)
        params = {**self.ep.state_dict, **self.ep.constants}
        for node in self.ep.graph.nodes:
            if node.op != "placeholder":
                continue
            spec = kinds[node.name]
            vid = self.new_id()
            self.ids[node] = vid
            self.describe(vid, node.meta.get("val"))
            if spec.kind == InputKind.USER_INPUT:
                self.program_inputs[next(user)] = vid
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                tensor = params[spec.target].detach()
                name = spec.target
                if spec.kind == InputKind.CONSTANT_TENSOR:
                    # Trace-time constants may differ per bucket: name them by content (with
                    # dtype and shape: a 0-dim 0.0 and a [1] zero are not one weight).
                    digest = hashlib.sha1(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
                    digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                    name = f"constant.{digest.hexdigest()[:16]}"
                self.weights[name] = tensor
                self.program_weights[vid] = name
            else:
                raise UnsupportedOpError(f"input {node.name} of kind {spec.kind} is not supported")

    def call(self, node: torch.fx.Node) -> None:
        if node.target is operator.getitem:
            src, index = node.args
            self.ids[node] = self.ids[src][index]
            return
        name = op_name(node.target)
        where = f"{name} (node {node.name})"
        if name in _DROPPED_OPS:
            return
        if name in _IDENTITY_OPS:
            self.ids[node] = self.ids[node.args[0]]
            return
        if not isinstance(node.target, torch._ops.OpOverload) or not is_known_op(name):
            stack = node.meta.get("stack_trace") or ""
            origin = stack.strip().splitlines()[-1].strip() if stack else ""
            raise UnsupportedOpError(
                f"the model uses {name}, which kernl does not support (yet)"
                + (f"; it comes from: {origin}" if origin else "")
            )
        val = node.meta.get("val")
        if isinstance(val, (list, tuple)):
            outs = []
            for v in val:
                outs.append(self.new_id())
                self.describe(outs[-1], v)
            self.ids[node] = outs
        else:
            outs = [self.new_id()]
            self.ids[node] = outs[0]
            self.describe(outs[0], val)
        self.instructions.append(
            Instruction(
                name,
                self.encode(list(node.args), where),
                {k: self.encode(v, where) for k, v in node.kwargs.items()},
                outs,
            )
        )

    def run(self) -> Program:
        self.placeholders()
        outputs: list[int] = []
        for node in self.ep.graph.nodes:
            if node.op == "call_function":
                self.call(node)
            elif node.op == "output":
                for a in node.args[0]:
                    v = self.ids.get(a)
                    if not isinstance(v, int):
                        raise UnsupportedOpError(f"output {a} is not a tensor the program makes")
                    outputs.append(v)
            elif node.op != "placeholder":
                raise UnsupportedOpError(f"graph node {node.name} ({node.op}) is not supported")
        _mark_unused_outputs(self.instructions, outputs)
        return Program(
            bucket=self.bucket,
            num_values=self.next_id,
            inputs=self.program_inputs,
            weights=self.program_weights,
            outputs=outputs,
            instructions=self.instructions,
            meta={"values": self.values},
        )


def _mark_unused_outputs(instructions: list[Instruction], outputs: list[int]) -> None:
    from kernl.artifacts.program import iter_value_refs

    used = set(outputs)
    for ins in instructions:
        used.update(iter_value_refs([ins.args, list(ins.kwargs.values())]))
    for ins in instructions:
        if len(ins.outputs) > 1:
            ins.outputs = [o if o in used else None for o in ins.outputs]


def lower(
    ep: ExportedProgram, bucket: Bucket, input_names: list[str]
) -> tuple[Program, dict[str, torch.Tensor]]:
    """Returns the bucket's program and the weights it reads (name -> tensor)."""
    lowering = _Lowering(ep, bucket, input_names)
    program = lowering.run()
    used = set(program.weights.values())
    return program, {k: v for k, v in lowering.weights.items() if k in used}
