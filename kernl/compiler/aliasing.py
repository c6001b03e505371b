"""Which values of an exported graph share memory, and which ops write it: what the
lowering (in-place ops as their functional twins) and the compile-time fold (no constant of
memory an op writes) must know to keep the function the model computes."""

from __future__ import annotations

import operator
from typing import Any

import torch

# What the lowering drops as identities in inference (their `.default` overloads): `detach_`
# follows a `torch.tensor(...)` made in forward, and writes nothing.
IDENTITIES = {"dropout", "alias", "detach", "detach_"}


def returns_alias(node: torch.fx.Node) -> bool:
    """Whether the node's value shares memory with another value of the graph (a view, an
    input, or an op that lowering treats as its input)."""
    target = node.target
    if target is operator.getitem:
        return returns_alias(node.args[0])
    if not isinstance(target, torch._ops.OpOverload):
        return node.op == "placeholder"
    if target._opname in IDENTITIES:
        return True
    return any(r.alias_info is not None for r in target._schema.returns)


def writes(target: Any) -> bool:
    """Whether the op writes any of its arguments in place."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return any(a.alias_info is not None and a.alias_info.is_write for a in target._schema.arguments)


def writes_its_first_argument(target: Any) -> bool:
    if not isinstance(target, torch._ops.OpOverload) or not target._schema.arguments:
        return False
    first = target._schema.arguments[0].alias_info
    return first is not None and first.is_write


def memory_of(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose memory this one's value is (itself, or what it views)."""
    while node.op == "call_function" and returns_alias(node) and node.args:
        if not isinstance(node.args[0], torch.fx.Node):
            break
        node = node.args[0]
    return node


def written_through(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The node, the in-place writes it is the result of, and the tensor they all wrote
    (`h += x; h.mul_(3)`: [mul_, add_, h])."""
    chain = [node]
    while writes_its_first_argument(chain[-1].target) and isinstance(
        chain[-1].args[0], torch.fx.Node
    ):
        chain.append(chain[-1].args[0])
    return chain


def private_view(node: torch.fx.Node) -> bool:
    """A view no other reader sees through: each tensor above it, up to one an op made
    afresh, is read by the next view alone (DeBERTa's `pos_query_layer /= ...` on the head
    view of a linear's output)."""
    while returns_alias(node):
        src = node.args[0] if node.args else None
        if node.op != "call_function" or node.target is operator.getitem:
            return False  # an input or a weight, or one of several views (split)
        if not isinstance(src, torch.fx.Node) or len(src.users) != 1:
            return False
        node = src
    return node.op == "call_function"


def functional_twin(target: Any) -> torch._ops.OpOverload | None:
    """`aten.add.Tensor` for `aten.add_.Tensor`: the op that writes its first argument, if it
    has a functional twin."""
    if not writes_its_first_argument(target) or not target._opname.endswith("_"):
        return None
    packet = getattr(getattr(torch.ops, target.namespace), target._opname[:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def lowered_functionally(node: torch.fx.Node, is_known_op) -> torch._ops.OpOverload | None:
    """The functional twin the lowering computes an in-place op as (an op outside the
    vocabulary whose twin is in it: `ret += ...` in MPNet's buckets), where nothing reads the
    written tensor after the write but through its result; else None."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or is_known_op(_name(target)):
        return None
    twin = functional_twin(target)
    if twin is None or not is_known_op(_name(twin)) or not isinstance(node.args[0], torch.fx.Node):
        return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    chain = written_through(node.args[0])
    later = [u for c in chain for u in c.users if u is not node and order[u] > order[node]]
    return None if later else twin


def _name(target: torch._ops.OpOverload) -> str:
    return f"{target.namespace}.{target._opname}.{target._overloadname}"
