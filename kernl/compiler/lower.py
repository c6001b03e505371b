"""Turn an exported graph (aten ops) into a Program: number every value, encode every
argument as plain msgpack data, and collect the weights it reads."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from kernl.artifacts.program import Instruction, Program
from kernl.artifacts.schema import Bucket
from kernl.runtime.vocabulary import is_known_op

from .aliasing import (
    IDENTITIES,
    functional_twin,
    memory_of,
    private_view,
    returns_alias,
    written_through,
)
from .fold import ConstantValues, constant_name, foldable, index_folds

# Ops that do nothing in inference: dropped, their output aliased to their input (detach_
# follows a constant made in forward, `torch.tensor(...)`: it returns its input).
_IDENTITY_OPS = {f"aten.{name}.default" for name in IDENTITIES}
# `x.reshape_as(y)` is `x.reshape(y.shape)`: the shape is static in a bucket's program
# (RoFormer's rotary embeddings).
_SHAPE_AS = {"aten.reshape_as.default": "aten.reshape.default"}
_SHAPE_AS |= {"aten.view_as.default": "aten.view.default"}
# Ops that only check metadata at trace time (and would pin the tracing device).
_DROPPED_OPS = {"aten._assert_tensor_metadata.default", "aten._assert_scalar.default"}
# Ops whose output layout is their kernel's choice: SDPA's is [B, L, H, D] seen as
# [B, H, L, D] from the CPU's flash kernel, [B, H, L, D] from the math one, and the passes put
# it on kernl.attention, whose layout depends on its implementation.
_LAYOUT_BY_KERNEL = {"aten.scaled_dot_product_attention.default"}
# What a view whose input's strides the program need not repeat is lowered as.
_VIEWS = {"aten.view.default": "aten.reshape.default"}
_VIEWS |= {"aten.view_as.default": "aten.reshape_as.default"}


class UnsupportedOpError(ValueError):
    pass


def _promoted_dtype(node: torch.fx.Node) -> torch.dtype | None:
    """The dtype the functional twin of an in-place op computes in (torch's promotion of its
    operands), or None where more than two operands make it uncertain."""
    operands = [
        a.meta.get("val") if isinstance(a, torch.fx.Node) else a
        for a in node.args
        if isinstance(a, (torch.fx.Node, bool, int, float))
    ]
    if not operands or not isinstance(operands[0], torch.Tensor):
        return None
    if op_name(node.target).startswith("aten.masked_fill"):
        return operands[0].dtype  # the mask is bool, the value is cast: never promoted
    if len(operands) == 1:
        return operands[0].dtype
    if len(operands) == 2 and isinstance(operands[1], (torch.Tensor, bool, int, float)):
        return torch.result_type(operands[0], operands[1])
    tensors = [t for t in operands if isinstance(t, torch.Tensor)]
    same = all(t.dtype == operands[0].dtype for t in tensors)
    return operands[0].dtype if same and len(tensors) == len(operands) else None


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
        self.order = {node: i for i, node in enumerate(ep.graph.nodes)}
        self.constants = ConstantValues(ep)
        self.index_folds = index_folds(ep, self.constants)

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
                    name = constant_name(tensor)  # they may differ per bucket
                self.weights[name] = tensor
                self.program_weights[vid] = name
            else:
                raise UnsupportedOpError(f"input {node.name} of kind {spec.kind} is not supported")

    def call(self, node: torch.fx.Node) -> None:
        if node.target is operator.getitem:
            src, index = node.args
            self.ids[node] = self.ids[src][index]
            return
        if node in self.index_folds:  # an index made through a float (fold.index_folds)
            return self.fold(node, self.index_folds[node])
        name = op_name(node.target)
        where = f"{name} (node {node.name})"
        if name in _DROPPED_OPS:
            return
        if name in _IDENTITY_OPS:
            self.ids[node] = self.ids[node.args[0]]
            return
        if name in _VIEWS and _layout_is_a_kernels_choice(node.args[0]):
            # torch.export dropped a `.contiguous()` the traced strides made a no-op, and the
            # view relies on them (ModernBERT's `sdpa(...).transpose(1, 2).contiguous().view()`
            # in transformers 5.0): a reshape is that view where the program's op lays its
            # output out alike (kernl.attention's kernel), else the copy the model asked for
            name = _VIEWS[name]
        if name in _SHAPE_AS and isinstance(node.args[1], torch.fx.Node):
            shape = list(node.args[1].meta["val"].shape)
            return self.emit(node, _SHAPE_AS[name], where, [node.args[0], shape])
        functional = None if is_known_op(name) else functional_twin(node.target)
        if functional is not None and is_known_op(op_name(functional)):
            return self.call_in_place(node, functional)
        if not isinstance(node.target, torch._ops.OpOverload) or not is_known_op(name):
            value = self.constants.value(node)
            if foldable(value):
                return self.fold(node, value)
            stack = node.meta.get("stack_trace") or ""
            origin = stack.strip().splitlines()[-1].strip() if stack else ""
            raise UnsupportedOpError(
                f"the model uses {name}, which kernl does not support (yet)"
                + (f"; it comes from: {origin}" if origin else "")
            )
        self.emit(node, name, where)

    def fold(self, node: torch.fx.Node, value: torch.Tensor) -> None:
        """An op the vocabulary lacks, on values no call can change (compiler/fold.py): its
        value, computed now, is a constant weight of the program."""
        val = node.meta.get("val")
        device = getattr(val, "device", None) or torch.device("cpu")
        tensor = value.contiguous().to(device)
        name = constant_name(tensor)
        vid = self.new_id()
        self.weights[name] = tensor
        self.program_weights[vid] = name
        self.ids[node] = vid
        self.describe(vid, tensor)

    def call_in_place(self, node: torch.fx.Node, functional: torch._ops.OpOverload) -> None:
        """`x += y` (MegatronBERT's embeddings, MPNet's position buckets) as `x = x + y`: the
        graph's later readers of x read the new value. Sound only where nothing else sees x's
        memory: x is no input or weight, no view another reader sees through, and no view of
        it was taken before."""
        name, written = op_name(node.target), node.args[0]
        where = f"{name} (node {node.name})"
        chain = written_through(written) if isinstance(written, torch.fx.Node) else []
        earlier_views = [
            u
            for c in chain
            for u in c.users
            if u is not node
            and u not in chain
            and self.order[u] < self.order[node]
            and returns_alias(u)
        ]
        shared = returns_alias(chain[-1]) and not private_view(chain[-1]) if chain else True
        if shared or earlier_views:
            stack = node.meta.get("stack_trace") or ""
            origin = stack.strip().splitlines()[-1].strip() if stack else ""
            raise UnsupportedOpError(
                f"the model uses {name} on an input, a weight or a tensor that shares memory "
                "with another, which kernl does not support (yet)"
                + (f"; it comes from: {origin}" if origin else "")
            )
        kept = node.meta["val"].dtype
        promoted = _promoted_dtype(node)
        if promoted is None:
            raise UnsupportedOpError(f"{where}: its operands' dtypes are not known to agree")
        if promoted == kept:
            self.emit(node, op_name(functional), where)
        else:  # `h.mul_(fp32)` on fp16 h computes in fp32 and stores fp16: so does the cast
            wide = self.new_id()
            self.values[wide] = [list(node.meta["val"].shape), str(promoted).removeprefix("torch.")]
            args = self.encode(list(node.args), where)
            kwargs = {k: self.encode(v, where) for k, v in node.kwargs.items()}
            self.instructions.append(Instruction(op_name(functional), args, kwargs, [wide]))
            out = self.new_id()
            self.describe(out, node.meta["val"])
            dtype = {"dtype": self.encode(kept, where)}
            self.instructions.append(
                Instruction("aten._to_copy.default", [{"v": wide}], dtype, [out])
            )
            self.ids[node] = out
        self.ids[written] = self.ids[node]

    def emit(self, node: torch.fx.Node, name: str, where: str, args: list | None = None) -> None:
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
                self.encode(list(node.args) if args is None else args, where),
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


def _layout_is_a_kernels_choice(node: Any) -> bool:
    """Whether the memory `node` views (or is) has strides the program need not repeat: not
    contiguous at trace time (an op's choice for its output, a weight's own layout; a program
    stores weights and folded constants contiguous), or made by an op whose kernels lay their
    output out differently (_LAYOUT_BY_KERNEL)."""
    if not isinstance(node, torch.fx.Node):
        return False
    base = memory_of(node)
    val = base.meta.get("val")
    if isinstance(val, torch.Tensor) and not val.is_contiguous():
        return True
    return base.op == "call_function" and op_name(base.target) in _LAYOUT_BY_KERNEL


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
