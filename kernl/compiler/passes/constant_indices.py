"""Indices computed from constants alone through a float, computed once at compile time.

MPNet's relative position buckets are `arange`s through `abs`, `log`, a float-to-long cast
and `where`: the same for every call of a bucket, yet the reader cannot bound what a float
cast yields (its ranges are integer intervals), so it refused the embedding they index. As a
weight, the buckets are data the reader bounds by reading them (artifacts/reader.py
`weight_infos`), and the call runs none of the ~20 small ops that made them.

Indices made of integers alone (BERT's mask and position aranges) the reader bounds as they
are: they stay, and so do the patterns other passes match on them."""

from __future__ import annotations

import hashlib

import torch

from kernl.artifacts.program import Instruction, Program
from kernl.artifacts.vocabulary import is_in_place, split_aten

from .graph import arg, reads, ref

# Ops whose result is not a function of their arguments' values.
_NOT_CONSTANT = {"empty", "empty_like", "new_empty", "rand", "randn", "randint", "bernoulli"}
# Folded tensors are stored once per content; past this size the ops stay in the program.
MAX_FOLDED_BYTES = 8 << 20


def constant_name(tensor: torch.Tensor) -> str:
    """A trace-time constant's weight name, by content (with dtype and shape: a 0-dim 0.0
    and a [1] zero are not one weight). Shared with lowering, so one tensor is one weight."""
    digest = hashlib.sha1(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return f"constant.{digest.hexdigest()[:16]}"


def _index_reads(ins: Instruction) -> list[int]:
    """The values an instruction uses as indices into a table (the reader bounds these)."""
    parts = split_aten(ins.op)
    base = parts[0] if parts else ins.op
    if base == "embedding":
        found = [ref(arg(ins, 1, "indices"))]
    elif base in ("index_select", "gather"):
        found = [ref(arg(ins, 2, "index"))]
    elif base == "index":
        indices = arg(ins, 1, "indices")
        found = [ref(a) for a in indices] if isinstance(indices, list) else []
    else:
        found = []
    return [v for v in found if v is not None]


def _is_view(op: str) -> bool:
    parts = split_aten(op)
    packet = getattr(torch.ops.aten, parts[0], None) if parts else None
    overload = getattr(packet, parts[1], None) if packet is not None else None
    return overload is not None and any(r.alias_info is not None for r in overload._schema.returns)


def _written(program: Program) -> set[int]:
    """Values whose memory an in-place op writes (`fill_` on a view of it included): a read
    before the write and one after see other values, so none of them is a constant."""
    producer = {o: ins for ins in program.instructions for o in ins.outputs if o is not None}
    written: set[int] = set()
    for ins in program.instructions:
        vid = ref(ins.args[0]) if ins.args and is_in_place(ins.op) else None
        while vid is not None:  # up to the memory it views
            written.add(vid)
            src = producer.get(vid)
            vid = ref(src.args[0]) if src is not None and src.args and _is_view(src.op) else None
    for ins in program.instructions:  # and every view of that memory
        if _is_view(ins.op) and ins.args and ref(ins.args[0]) in written:
            written.update(o for o in ins.outputs if o is not None)
    return written


def _constant_producers(program: Program) -> dict[int, int]:
    """value -> index of the instruction making it, for values that depend on no input and
    no weight and whose memory nothing writes."""
    constant: dict[int, int] = {}
    written = _written(program)
    for i, ins in enumerate(program.instructions):
        parts = split_aten(ins.op)
        if parts is None or parts[0] in _NOT_CONSTANT or is_in_place(ins.op):
            continue
        if any(o in written for o in ins.outputs):
            continue
        if all(v in constant for v in reads(ins)):
            for o in ins.outputs:
                if o is not None:
                    constant[o] = i
    return constant


def _cone(program: Program, producers: dict[int, int], values: set[int]) -> set[int]:
    """The instructions the values depend on (all constant)."""
    needed: set[int] = set()
    stack = [producers[v] for v in values]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        stack.extend(producers[v] for v in reads(program.instructions[i]))
    return needed


def _through_a_float(program: Program, cone: set[int]) -> bool:
    values = program.meta.get("values", {})
    dtypes = {
        (values.get(o) or values.get(str(o)) or [None, ""])[1]
        for i in cone
        for o in program.instructions[i].outputs
        if o is not None
    }
    return any(d in ("float16", "bfloat16", "float32", "float64") for d in dtypes)


def _evaluate(program: Program, needed: set[int], wanted: set[int]) -> dict:
    """The wanted values, computed on the CPU with the ops the runtime would run. (On the
    CPU, where a model that makes these on its own, MPNet, makes them: a float cast near an
    integer could differ between devices.)"""
    from kernl.runtime.executor import Executor

    sub = Program(
        bucket=program.bucket,
        num_values=program.num_values,
        inputs={},
        weights={},
        outputs=sorted(wanted),
        instructions=[program.instructions[i] for i in sorted(needed)],
        meta={},
    )
    with torch.no_grad():
        results = Executor(sub, {}, torch.device("cpu")).run({})
    return dict(zip(sub.outputs, results))


def fold_constant_indices(program: Program, weights: dict[str, torch.Tensor]) -> Program:
    """Indices computed from constants alone become weights; `weights` gains them. The ops
    that made them stay until `drop_dead` finds nobody reads them."""
    producers = _constant_producers(program)
    wanted = {
        v
        for ins in program.instructions
        for v in _index_reads(ins)
        if v in producers and _through_a_float(program, _cone(program, producers, {v}))
    }
    if not wanted:
        return program
    from kernl.runtime.executor import ProgramRunError

    try:
        folded = _evaluate(program, _cone(program, producers, wanted), wanted)
    except ProgramRunError:
        return program  # left as traced: the reader names what it cannot bound
    # where the program's weights are (tuning and validation run it there)
    device = next((t.device for t in weights.values()), torch.device("cpu"))
    emptied = set()
    for vid, tensor in folded.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.numel() * tensor.element_size() > MAX_FOLDED_BYTES:
            continue
        tensor = tensor.contiguous()
        name = constant_name(tensor)
        weights[name] = tensor.to(device)
        program.weights[vid] = name
        ins = program.instructions[producers[vid]]
        ins.outputs = [None if o == vid else o for o in ins.outputs]
        if all(o is None for o in ins.outputs):
            emptied.add(producers[vid])
    program.instructions = [x for i, x in enumerate(program.instructions) if i not in emptied]
    return program
