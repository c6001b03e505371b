"""Values no call can change, computed once at compile time and shipped as weights.

After the rewrite, what a program still computes from its weights and trace-time constants
alone is the same at every call: ModernBERT's rotary tables (`arange` -> outer product with
`inv_freq` -> `cat` -> `cos`/`sin` -> casts) and its sliding-window band (`arange`s, `abs`,
compares, an `and`) were about 30 kernel launches of each call's ~250. Here the values those
instructions make are computed by the runtime's own executor on the compile device (so they
are what the replay would have computed) and become weights named by content, which equal
buckets share.

This runs after the passes, not at lowering (compiler/fold.py): the passes match on what is
folded here (the rotary pass takes `cos` and `sin` as any values, the mask passes match the
traced mask ops), and a value they consumed is no longer computed.

Not folded: anything an input reaches; kernl ops (kernels, and the split-K linear writes its
counters); ops that write in place, and every value sharing memory with one that is written;
uninitialised memory (`empty*`); random ops; integer values over MAX_INDEX_BYTES (the reader
bounds an integer weight by reading it, within a limit for all of them; `arange`s of a batch's
and a sequence's positions are far below it); a value that is
itself a view (its base is folded and the view kept: no launch); a value a call returns, or
a view of one (the caller owns it: a weight is shared); a value over MAX_BYTES."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from kernl.artifacts.program import Instruction, Program
from kernl.artifacts.vocabulary import is_in_place, split_aten, written_arguments
from kernl.runtime.executor import Executor
from kernl.runtime.vocabulary import DTYPES, UnknownOpError, resolve_op

from ..fold import constant_name
from .graph import ProgramView, drop_dead, reads

# Each folded value, and all of a program's together: beyond these the ops stay (a 8192-long
# sliding-window band is 64 MiB of bools a bucket; computing it per call costs one launch).
MAX_BYTES = 8 << 20
MAX_INDEX_BYTES = 64 << 10
MAX_PROGRAM_BYTES = 64 << 20
# All of an artifact's (FoldBudget): the values are weights on the GPU for good, where they
# were the graph pool's scratch before
MAX_ARTIFACT_BYTES = 256 << 20
_MAY_COPY = ("to", "contiguous", "reshape", "reshape_as", "flatten", "type_as")
# Ops that copy their one input, maybe after a broadcast (MPNet's position bias, expanded to
# the batch then made contiguous): the smaller value before them is folded, the copy kept.
_COPIES = (*_MAY_COPY, "clone", "repeat", "_to_copy", "expand_copy")
# Ops whose results share their input's memory though their schemas do not say so
_UNMARKED_ALIASES = ("type_as", "_unsafe_view", "unsafe_split")
_UNINITIALISED = ("empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided")


def _schema(name: str) -> torch.FunctionSchema | None:
    if split_aten(name) is None:
        return None
    try:
        return resolve_op(name)._schema
    except UnknownOpError:
        return None


def _returns_view(schema: torch.FunctionSchema | None) -> bool:
    """Whether the result may share its argument's memory (for what a write reaches)."""
    return schema is not None and any(
        r.alias_info is not None and not r.alias_info.is_write for r in schema.returns
    )


def _shares_memory(ins: Instruction, schema: torch.FunctionSchema | None) -> bool:
    return _returns_view(schema) or _op(ins) in _UNMARKED_ALIASES


def _always_view(ins: Instruction, schema: torch.FunctionSchema | None) -> bool:
    """Whether the result is a view, never a copy: no launch when it runs. `to`, `reshape`
    and the like copy where they must (a cast to another dtype is a kernel)."""
    return _shares_memory(ins, schema) and _op(ins) not in (*_MAY_COPY, "type_as")


def _op(ins: Instruction) -> str:
    parts = split_aten(ins.op)
    return parts[0] if parts else ""


@dataclass
class FoldBudget:
    """Bytes of folded values an artifact may still gain (MAX_ARTIFACT_BYTES), over its
    buckets; a value already folded by an earlier bucket (same name) costs nothing."""

    bytes_left: int = MAX_ARTIFACT_BYTES


def _computable(ins: Instruction, schema: torch.FunctionSchema | None) -> bool:
    """An aten op whose result is a function of its arguments alone."""
    if schema is None or is_in_place(ins.op) or ins.op.endswith(".out"):
        return False
    if split_aten(ins.op)[0] in _UNINITIALISED or "out" in ins.kwargs:
        return False
    op = resolve_op(ins.op)
    return torch.Tag.nondeterministic_seeded not in op.tags and not any(
        a.alias_info is not None and a.alias_info.is_write for a in schema.arguments
    )


class _Memory:
    """Which values share memory: views join their inputs (by the op's schema)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, v: int) -> int:
        while self.parent.get(v, v) != v:
            v = self.parent[v]
        return v

    def join(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _written(program: Program, schemas: list) -> tuple[_Memory, set[int]]:
    memory, written = _Memory(), set()
    for ins, schema in zip(program.instructions, schemas):
        if _shares_memory(ins, schema):
            for o in ins.outputs:
                for v in reads(ins):
                    if o is not None:
                        memory.join(o, v)
        targets = written_arguments(ins.op, ins.args, ins.kwargs)
        if "counters" in ins.kwargs:  # the split-K linear's arrival counters
            targets.append(ins.kwargs["counters"])
        written.update(reads(Instruction(ins.op, targets, {}, [])))
    return memory, {memory.find(v) for v in written}


def _nbytes(view: ProgramView, vid: int) -> int | None:
    shape, dtype = view.shape(vid), view.dtype(vid)
    if shape is None or dtype not in DTYPES:
        return None
    return DTYPES[dtype].itemsize * int(torch.Size(shape).numel())


def fold_constants(
    program: Program,
    weights: dict[str, torch.Tensor],
    device: torch.device,
    budget: FoldBudget | None = None,
) -> tuple[Program, int]:
    """(the program with its input-independent values as weights, how many values were
    folded). `weights` gains the folded tensors, on `device`; `budget` (one per artifact)
    loses the bytes of the new ones."""
    budget = budget or FoldBudget()
    view = ProgramView(program)
    schemas = [_schema(ins.op) for ins in program.instructions]
    memory, written = _written(program, schemas)
    constant, producer = _constants(program, view, schemas, memory, written, MAX_BYTES)

    def base_of(v: int) -> int:
        """Below the views of a constant: the value a computing op made (or a weight)."""
        while v in producer and _always_view(
            program.instructions[producer[v]], schemas[producer[v]]
        ):
            sources = [r for r in reads(program.instructions[producer[v]]) if r in constant]
            if len(sources) != 1:
                break
            v = sources[0]
        return v

    # not what a call returns, nor its views: the caller owns those, and a weight is shared
    returned = {memory.find(v) for v in program.outputs}

    def smaller_before_copy(v: int) -> int:
        """MPNet's bias expanded to the batch and made contiguous: its [seq, seq, heads]
        before the expand is folded, not a copy per batch row (the copy stays a launch)."""
        while v in producer and _op(program.instructions[producer[v]]) in _COPIES:
            sources = [r for r in reads(program.instructions[producer[v]]) if r in constant]
            source = base_of(sources[0]) if len(sources) == 1 else None
            if source is None or source in program.weights or source not in producer:
                break
            if (_nbytes(view, source) or MAX_BYTES + 1) >= (_nbytes(view, v) or 0):
                break
            v = source
        return v

    frontier = []
    for ins in program.instructions:
        # not where a reader takes only its shape (empty_like)
        if not set(ins.outputs) & constant and _op(ins) not in _UNINITIALISED:
            frontier += [v for v in reads(ins) if v in constant]
    bases, total = [], 0
    for v in dict.fromkeys(smaller_before_copy(base_of(v)) for v in frontier):
        if v in program.weights or v not in producer or memory.find(v) in returned:
            continue
        ins, dtype = program.instructions[producer[v]], view.dtype(v)
        if len([o for o in ins.outputs if o is not None]) != 1 or _always_view(
            ins, schemas[producer[v]]
        ):
            continue
        if dtype not in DTYPES:
            continue
        size = _nbytes(view, v)
        integer = dtype != "bool" and not DTYPES[dtype].is_floating_point
        if integer and (size is None or size > MAX_INDEX_BYTES):
            continue
        if size is None or size > MAX_BYTES or total + size > MAX_PROGRAM_BYTES:
            continue
        bases.append(v)
        total += size
    if not bases:
        return program, 0
    try:
        values = _evaluate(program, _cone(program, bases, producer), bases, weights, device)
    except Exception:  # noqa: BLE001 - not computable here: the program computes it, as before
        return program, 0
    computed: set[int] = set()  # the instructions that made the folded values
    shared = {t.untyped_storage().data_ptr() for t in weights.values()}
    for v, tensor in zip(bases, values):
        if list(tensor.shape) != view.shape(v) or str(tensor.dtype) != f"torch.{view.dtype(v)}":
            continue  # not the value the program declared: left as traced
        if not _plain(tensor) or tensor.untyped_storage().data_ptr() in shared:
            continue  # strides a kept view relies on, or a weight itself (`reshape` of one)
        tensor = tensor.detach().clone()
        name = constant_name(tensor)
        if name not in weights:
            size = tensor.numel() * tensor.element_size()
            if size > budget.bytes_left:
                continue
            budget.bytes_left -= size
            weights[name] = tensor
        program.weights[v] = name
        computed.add(producer[v])
    program.instructions = [ins for i, ins in enumerate(program.instructions) if i not in computed]
    program = drop_dead(program)
    used = set(program.outputs).union(*(reads(ins) for ins in program.instructions))
    program.weights = {v: n for v, n in program.weights.items() if v in used}
    return program, len(computed)


def _constants(
    program: Program, view: ProgramView, schemas: list, memory: _Memory, written: set, limit: int
) -> tuple[set[int], dict[int, int]]:
    """(the values no call can change, each value's producing instruction)."""
    constant = {v for v in program.weights if memory.find(v) not in written}
    producer: dict[int, int] = {}
    for i, (ins, schema) in enumerate(zip(program.instructions, schemas)):
        outs = [o for o in ins.outputs if o is not None]
        for o in outs:
            producer[o] = i
        if not outs or not _computable(ins, schema) or not set(reads(ins)) <= constant:
            continue
        if any(memory.find(o) in written for o in outs):
            continue
        sizes = [_nbytes(view, o) for o in outs]
        if not _always_view(ins, schema) and any(s is None or s > limit for s in sizes):
            continue
        constant.update(outs)
    return constant, producer


def constant_value(
    program: Program,
    weights: dict[str, torch.Tensor],
    device: torch.device,
    vid: int,
    limit: int = 1 << 30,
) -> torch.Tensor | None:
    """The value `vid` has at every call, computed now (a weight's tensor as it is), or None
    where an input reaches it, memory it shares is written, or it or a value before it is
    over `limit` bytes. For passes that read a value without storing it (an 8192-token
    sliding-window band is 64 MiB: passes/attention_window.py)."""
    view = ProgramView(program)
    schemas = [_schema(ins.op) for ins in program.instructions]
    memory, written = _written(program, schemas)
    constant, producer = _constants(program, view, schemas, memory, written, limit)
    if vid not in constant:
        return None  # (a weight some op writes is not)
    if vid in program.weights:
        return weights[program.weights[vid]]
    try:
        (value,) = _evaluate(program, _cone(program, [vid], producer), [vid], weights, device)
    except Exception:  # noqa: BLE001 - not computable here: as not constant
        return None
    return value


def _plain(t: torch.Tensor) -> bool:
    """Laid out as its contiguous copy will be (a view kept over it, an `as_strided` too,
    sees the same elements where it sees them now)."""
    size = t.numel() * t.element_size()
    return t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == size


def _cone(program: Program, bases: Iterable[int], producer: dict[int, int]) -> list[int]:
    """Indices of the instructions the bases are computed by, in program order."""
    needed, stack = set(), list(bases)
    while stack:
        v = stack.pop()
        i = producer.get(v)
        if i is None or i in needed:
            continue
        needed.add(i)
        stack.extend(reads(program.instructions[i]))
    return sorted(needed)


def _evaluate(
    program: Program,
    cone: list[int],
    bases: list[int],
    weights: dict[str, torch.Tensor],
    device: torch.device,
) -> list[torch.Tensor]:
    instructions = [program.instructions[i] for i in cone]
    read = {v for ins in instructions for v in reads(ins)}
    part = Program(
        bucket=program.bucket,
        num_values=program.num_values,
        inputs={},
        weights={v: n for v, n in program.weights.items() if v in read},
        outputs=list(bases),
        instructions=instructions,
        meta={},
    )
    with torch.no_grad(), _full_fp32_matmuls():
        return Executor(part, weights, device).run({})


@contextlib.contextmanager
def _full_fp32_matmuls():
    """float32 matmuls in full float32 (ModernBERT's positions times inv_freq is one): computed
    once for every later call, whatever the compile process's precision setting (TF32 on the
    GPU; `set_float32_matmul_precision("medium")` makes them bf16 on the CPU). Both of torch's
    APIs are set, consistently (one alone left the other saying TF32, and torch refuses a
    matmul whose two settings disagree), and both put back as they were: the legacy
    allow_tf32 flag alone raised under the new API (folding nothing, silently), and writing it
    back broke `torch.get_float32_matmul_precision()` after "medium"."""
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    before = [b.fp32_precision for b in backends]
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the new API was used per backend: no one legacy value to restore
        legacy = None
    try:
        torch.set_float32_matmul_precision("highest")
        for b in backends:
            b.fp32_precision = "ieee"
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for b, value in zip(backends, before):
            b.fp32_precision = value
