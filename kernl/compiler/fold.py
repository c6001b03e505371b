"""Values of an exported graph that no call can change, computed at compile time.

DeBERTa-v2/v3's relative positions go through `sign`, `ceil` and `log` (log-spaced buckets):
ops outside kernl's vocabulary, on tensors made from the sequence length alone. The lowering
asks this module for such an op's value instead of refusing the model; the value becomes a
constant weight of the bucket's program. Besides those, only indices made through a float
are folded (`index_folds`: the reader cannot bound them): what kernl's passes match on
(masks, positions) stays as traced.

A value is constant when it depends on no model input and no parameter (buffers and
trace-time constants are data), through ops that are functions of their arguments: no
random op, no uninitialised memory, no in-place write (a write would change what an earlier
reader of the same tensor saw)."""

from __future__ import annotations

import hashlib
import operator
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from kernl.runtime.vocabulary import is_known_op

from .aliasing import IDENTITIES, lowered_functionally, memory_of, returns_alias, writes

_UNINITIALISED = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}
_UNINITIALISED |= {"empty_permuted"}
# A folded value is a weight of every program that needs it: past this, the op is refused.
MAX_FOLDED_BYTES = 64 << 20
# A folded index is read by the artifact's reader to bound it, within 64 MiB of integer
# weights in all (artifacts/limits.py): past this, the ops that make it stay.
MAX_FOLDED_INDEX_BYTES = 8 << 20
# Where ops read indices into a table: op name -> positions of the index arguments.
_INDEX_ARGUMENTS = {"embedding": (1,), "index_select": (2,), "gather": (2,), "index": (1,)}


def _pure(target: Any) -> bool:
    if not isinstance(target, torch._ops.OpOverload):
        return target is operator.getitem
    if target._opname in _UNINITIALISED or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return not writes(target)


class ConstantValues:
    """`value(node)`: the node's tensor when no call can change it, else None."""

    def __init__(self, ep: ExportedProgram):
        data = {**ep.state_dict, **ep.constants}
        self.position = {node: i for i, node in enumerate(ep.graph.nodes)}
        kinds = {spec.arg.name: spec for spec in ep.graph_signature.input_specs}
        mutated = set(ep.graph_signature.buffers_to_mutate.values())  # a call changes them
        self.known: dict[torch.fx.Node, Any] = {}
        # memory some op writes in place (`f[0].fill_(5)`): what reads it is no constant, as
        # a read before the write and one after see other values
        # (in-place ops the lowering computes as their functional twins are computed so here)
        self.twins = {
            node: twin
            for node in ep.graph.nodes
            if node.op == "call_function"
            and (twin := lowered_functionally(node, is_known_op)) is not None
        }
        self.written = {
            memory_of(target)
            for node in ep.graph.nodes
            if node.op == "call_function"
            and writes(node.target)
            and node.target._opname not in IDENTITIES  # detach_ writes no value
            and node not in self.twins
            for target in [*node.args[:1], node.kwargs.get("out")]  # in place, or out=
            if isinstance(target, torch.fx.Node)
        }
        for node in ep.graph.nodes:
            if node.op != "placeholder":
                continue
            spec = kinds.get(node.name)
            fixed = spec is not None and spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
            fixed = fixed and spec.target not in mutated
            fixed = fixed and node not in self.written
            self.known[node] = data[spec.target].detach() if fixed else None

    def value(self, node: torch.fx.Node) -> Any:
        if node in self.known:
            return self.known[node]
        # the node's cone not known yet, found without recursion (cones can be long), then
        # computed in the graph's order
        order, stack, seen = [], [node], set()
        while stack:
            n = stack.pop()
            if n in self.known or n in seen:
                continue
            seen.add(n)
            order.append(n)
            stack.extend(n.all_input_nodes)
        for n in sorted(order, key=self.position.__getitem__):  # the graph's order
            self.known[n] = self._compute(n)
        return self.known[node]

    def _compute(self, node: torch.fx.Node) -> Any:
        if node.op != "call_function" or memory_of(node) in self.written:
            return None
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target._opname in IDENTITIES:
            return self.known.get(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
        target = self.twins.get(node, target)
        if not _pure(target):
            return None
        if any(self.known.get(n) is None for n in node.all_input_nodes):
            return None
        # on the devices the trace recorded, as eager ran it: DeBERTa-v3's log buckets on the
        # GPU, MPNet's on the CPU (a float cast near an integer may differ between devices)
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: self.known[n])
        try:
            with torch.no_grad():
                value = target(*args, **kwargs)
            if node in self.twins:  # an in-place op keeps its tensor's dtype
                value = value.to(node.meta["val"].dtype)
            return value
        except Exception:  # noqa: BLE001 - not computable here: the op is then refused
            return None


def foldable(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor) and value.numel() * value.element_size() <= MAX_FOLDED_BYTES
    )


def constant_name(tensor: torch.Tensor) -> str:
    """A trace-time constant's weight name, by content (with dtype and shape: a 0-dim 0.0
    and a [1] zero are not one weight), so that one tensor is one weight in every bucket."""
    digest = hashlib.sha1(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return f"constant.{digest.hexdigest()[:16]}"


def index_folds(ep: ExportedProgram, constants: ConstantValues) -> dict[torch.fx.Node, Any]:
    """Indices made from constants through a float, with their values: MPNet's relative
    position buckets are `arange`s through `log` and a float-to-long cast, the same for every
    call of a bucket, and the reader cannot bound what a float cast yields (its ranges are
    integer intervals), so it refused the embedding they index. Computed here as the trace
    ran them (on its devices: a float cast near an integer may differ between them), they
    become weights the reader bounds by reading them. An index that is a view of such a
    value (DeBERTa's expanded positions) is folded below its views, smallest. Indices made of
    integers alone (BERT's positions, the mask's aranges) stay as traced, and so do the
    patterns kernl's passes match on them."""
    folds: dict[torch.fx.Node, Any] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for i in _INDEX_ARGUMENTS.get(node.target._opname, ()):
            given = node.args[i] if i < len(node.args) else None
            for index in given if isinstance(given, (list, tuple)) else [given]:
                target = (
                    _below_views(index, constants) if isinstance(index, torch.fx.Node) else None
                )
                value = constants.value(target) if target is not None else None
                if _small_index(value) and _through_a_float(target):
                    folds[target] = value
    return folds


def _below_views(node: torch.fx.Node, constants: ConstantValues) -> torch.fx.Node:
    while (
        node.op == "call_function"
        and returns_alias(node)
        and not writes(node.target)  # an in-place op's result is not its input's value
        and node.args
        and isinstance(node.args[0], torch.fx.Node)
        and constants.value(node.args[0]) is not None
    ):
        node = node.args[0]
    return node


def _small_index(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and not value.dtype.is_floating_point
        and value.numel() * value.element_size() <= MAX_FOLDED_INDEX_BYTES
    )


def _through_a_float(node: torch.fx.Node) -> bool:
    """Whether a float value lies in the node's cone (what the reader cannot bound)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype.is_floating_point:
            return True
        stack.extend(n.all_input_nodes)
    return False
