"""A small pattern matcher for rewrite passes, after tinygrad's PatternMatcher.

A pass is a table of rules `(Pat, fn)`. `Rewriter(program, rules).run()` walks the program
once, front to back. At each instruction it tries the rules in order; the first whose pattern
matches calls `fn(ctx, **bound)`, which returns the instructions that replace the matched one
(or None: the rule declines, the next one is tried). The replacement is tried against the rules
again on the spot, so chains fuse in one walk (linear -> +gelu -> +residual) and nothing is
rescanned from the start.

Patterns look backwards only (an instruction's arguments and their producers): producers come
earlier in the program, so a forward walk sees them already rewritten. A matched producer that
has no reader left after the replacement is deleted; nothing else is. What a pattern cannot prove
safe it does not match: `one_use` producers only (a value read elsewhere is not fused away), and
no producer is moved past an in-place write to one of its inputs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kernl.artifacts.program import Instruction, Program

from .graph import ProgramView, reads, ref

_MAX_REWRITES_PER_SLOT = 16  # a replacement re-matched more often than this is a rule loop


@dataclass
class Node:
    """A matched value: its id, the instruction producing it (None for inputs and weights)."""

    vid: int | None
    ins: Instruction | None


@dataclass(frozen=True)
class Pat:
    """A pattern over one value.

    op: the producing instruction's op name, a tuple of names, or None for any value (an input,
        a weight, anything produced). src: patterns for the producer's leading positional
        arguments, each of which must then be a value reference (None: anything there).
        name: bind the matched Node under this name for the rule's function. one_use: the value
        has exactly one reader (so its producer may be fused away). weight: a program weight.
        where: any further condition, `where(ctx, node) -> bool`, checked after `src`."""

    op: str | tuple[str, ...] | None = None
    src: tuple[Pat | None, ...] = ()
    name: str | None = None
    one_use: bool = False
    weight: bool = False
    where: Callable[[Rewriter, Node], bool] | None = None

    def ops(self) -> tuple[str, ...] | None:
        return (self.op,) if isinstance(self.op, str) else self.op


Rule = tuple[Pat, Callable[..., list[Instruction] | None]]


def _holds(instructions: list[Instruction], ins: Instruction) -> bool:
    """By identity: two instructions may be equal field by field and still be two."""
    return any(i is ins for i in instructions)


def _writes_in_place(ins: Instruction) -> int | None:
    """The value an in-place aten op (`fill_`, `copy_`, ...; not `__and__`) overwrites, or None."""
    parts = ins.op.split(".")
    in_place = len(parts) == 3 and parts[0] == "aten" and parts[1].endswith("_")
    in_place = in_place and not parts[1].startswith("__")
    return ref(ins.args[0]) if ins.args and in_place else None


@dataclass
class Rewriter:
    """One walk of `rules` over `program`. Rule functions get this object as `ctx`: value shapes
    and dtypes, use counts, readers of a value, new values, and a memo shared by the walk."""

    program: Program
    rules: Sequence[Rule]
    weights: dict[str, Any] | None = None  # tensor name -> tensor, for passes that make weights
    memo: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.view = ProgramView(self.program)
        # slot i holds what instruction i became (a replacement may be several instructions)
        self.slots: list[list[Instruction]] = [[ins] for ins in self.program.instructions]
        self.slot_of: dict[int, int] = {}  # id(instruction) -> slot
        self.producer: dict[int, Instruction] = {}
        self.uses: Counter = Counter(self.program.outputs)
        self.in_place: list[tuple[int, int]] = []  # (slot, value written), in program order
        for i, ins in enumerate(self.program.instructions):
            self._add(ins, i)
            w = _writes_in_place(ins)
            if w is not None:
                self.in_place.append((i, w))
        self._consumed: list[Node] = []
        self._slot = 0

    # -- queries for rule functions ---------------------------------------------------------
    def shape(self, vid: int | None) -> list[int] | None:
        return self.view.shape(vid)

    def dtype(self, vid: int | None) -> str | None:
        return self.view.dtype(vid)

    def is_weight(self, vid: int | None) -> bool:
        return self.view.is_weight(vid)

    def node(self, vid: int | None) -> Node:
        return Node(vid, None if vid is None else self.producer.get(vid))

    def readers(self, vid: int) -> list[Instruction]:
        """Instructions reading `vid`, in program order (a scan: for rare, grouping rules)."""
        return [ins for slot in self.slots for ins in slot if vid in reads(ins)]

    def new_value(self, shape: list[int], dtype: str) -> int:
        return self.view.new_value(shape, dtype)

    def consume(self, node: Node) -> bool:
        """Mark a producer the rule folds in (beyond those its pattern bound): it is deleted
        after the replacement if nothing reads it any more. False (and nothing marked) when it
        cannot move to the instruction being rewritten; the rule should then decline."""
        if node.ins is None or not (
            _holds(self.slots[self._slot], node.ins) or self._movable(node.ins, self._slot)
        ):
            return False
        self._consumed.append(node)
        return True

    def remove(self, ins: Instruction) -> None:
        """Delete an instruction whose outputs the replacement now produces (e.g. a linear
        merged into its sibling). The rule vouches that they are produced before any reader."""
        self._drop(ins)

    # -- bookkeeping ------------------------------------------------------------------------
    def _add(self, ins: Instruction, slot: int) -> None:
        self.slot_of[id(ins)] = slot
        for o in ins.outputs:
            if o is not None:
                self.producer[o] = ins
        self.uses.update(reads(ins))

    def _drop(self, ins: Instruction) -> None:
        slot = self.slot_of.pop(id(ins))
        self.slots[slot] = [i for i in self.slots[slot] if i is not ins]
        for o in ins.outputs:
            if o is not None and self.producer.get(o) is ins:
                del self.producer[o]
        self.uses.subtract(reads(ins))

    def _dead(self, ins: Instruction) -> bool:
        return all(o is None or self.uses[o] <= 0 for o in ins.outputs)

    # -- matching ---------------------------------------------------------------------------
    def _match(self, pat: Pat, node: Node, bound: dict[str, Node], root_slot: int) -> bool:
        if pat.weight and not self.is_weight(node.vid):
            return False
        if pat.one_use and (node.vid is None or self.uses[node.vid] != 1):
            return False
        ops = pat.ops()
        if ops is not None:
            ins = node.ins
            if ins is None or ins.op not in ops:
                return False
            if not _holds(self.slots[root_slot], ins) and not self._movable(ins, root_slot):
                return False
            for k, sub in enumerate(pat.src):
                if sub is None:
                    continue
                vid = ref(ins.args[k]) if k < len(ins.args) else None
                if vid is None or not self._match(sub, self.node(vid), bound, root_slot):
                    return False
        elif pat.src:
            raise ValueError(f"pattern {pat} has sources but no op")
        if pat.where is not None and not pat.where(self, node):
            return False
        if pat.name is not None:
            bound[pat.name] = node
        return True

    def _movable(self, ins: Instruction, root_slot: int) -> bool:
        """A producer fused into the instruction at `root_slot` runs there instead: only if no
        in-place write between the two touches what it reads, or what it produced (the fused
        op would not see the write: a `fill_` of a matched intermediate, review 2026-12-06)."""
        start = self.slot_of.get(id(ins))
        if start is None:
            return False
        touched = set(reads(ins)) | {o for o in ins.outputs if o is not None}
        return not any(start < s < root_slot and w in touched for s, w in self.in_place)

    def _try(self, ins: Instruction, slot: int) -> list[Instruction] | None:
        for pat, fn in self.rules:
            bound: dict[str, Node] = {}
            root = Node(ins.outputs[0] if ins.outputs else None, ins)
            if not self._match(pat, root, bound, slot):
                continue
            self._consumed, self._slot = [], slot
            new = fn(self, **bound)
            if new is None:
                continue
            matched = [n.ins for n in [*bound.values(), *self._consumed] if n.ins is not None]
            return self._replace(ins, slot, new, matched)
        return None

    def _replace(
        self, ins: Instruction, slot: int, new: list[Instruction], matched: list[Instruction]
    ) -> list[Instruction]:
        at = next(k for k, i in enumerate(self.slots[slot]) if i is ins)
        self._drop(ins)
        self.slots[slot][at:at] = new
        for n in new:
            self._add(n, slot)
        # Matched producers nothing reads any more go; dropping one may free the next (a tree
        # of adds), hence the loop. Unmatched instructions are never touched.
        left = [m for m in matched if m is not ins and not _holds(new, m)]
        changed = True
        while changed:
            changed = False
            for m in left:
                if id(m) in self.slot_of and self._dead(m) and _writes_in_place(m) is None:
                    self._drop(m)
                    changed = True
        return new

    def run(self) -> Program:
        for slot in range(len(self.slots)):
            pending = list(self.slots[slot])
            budget = _MAX_REWRITES_PER_SLOT
            while pending:
                ins = pending.pop(0)
                if id(ins) not in self.slot_of:  # removed by an earlier rule
                    continue
                new = self._try(ins, slot)
                if new is not None:
                    budget -= 1
                    if budget < 0:
                        raise RuntimeError(f"rewrite rules loop on {ins.op} (slot {slot})")
                    pending = [n for n in new if id(n) in self.slot_of] + pending
        self.program.instructions = [ins for slot in self.slots for ins in slot]
        return self.view.commit()


def rewrite_with(
    program: Program, rules: Sequence[Rule], weights: dict[str, Any] | None = None
) -> Program:
    """Apply a rule table to `program` in one walk (see the module docstring)."""
    return Rewriter(program, rules, weights).run()
