"""Structural checks of a manifest and a program read from an untrusted artifact.

Everything the runtime later trusts is checked here first: types (a bool is not an int),
names (dtypes from a closed list, plain identifiers), ranges (bucket shapes, value ids), the
data flow of a program (every value read was defined before) and the sizes a program asks to
allocate. Malformed data raises ArtifactCorruptError; data that is well formed but asks for
something a reader must not do raises ArtifactUnsafeError."""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import ArtifactCorruptError, ArtifactUnsafeError
from .limits import DEFAULT_LIMITS, ReadLimits
from .program import ARG_TAGS, Program, iter_value_refs
from .schema import (
    FILE_CHUNKS_KEY,
    MANIFEST_FILE,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    POSITIONAL_INPUTS_KEY,
    Bucket,
    Manifest,
    is_safe_relative_path,
)

TENSOR_DTYPES = frozenset(
    "float16 bfloat16 float32 float64 int8 uint8 int16 int32 int64 bool".split()
)
# Integer dtypes an input may have, with the range its pad value must fit in.
INPUT_DTYPES = {
    "int8": (-(1 << 7), 1 << 7),
    "uint8": (0, 1 << 8),
    "int16": (-(1 << 15), 1 << 15),
    "int32": (-(1 << 31), 1 << 31),
    "int64": (-(1 << 63), 1 << 63),
}
# The inputs the runtime range-checks against a table of model_config's (runtime/model.py):
# their dtype must hold every row of it.
TABLE_SIZES = {"input_ids": "vocab_size", "token_type_ids": "type_vocab_size"}
INPUT_DEFAULTS = ("required", "zeros", "ones")
TARGETS = ("cpu", "cuda")
# Matched with fullmatch only: `re.match("...$")` accepts a trailing newline.
OP_NAME = re.compile(
    r"aten\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*|kernl\.[A-Za-z_][A-Za-z0-9_]*"
)
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
KERNEL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
MAX_AXIS = 8

# aten ops that allocate a tensor whose size is a static list argument: op base name ->
# index of that argument (also accepted as the keyword "size"). Views are included because
# a later contiguous/clone materialises them.
SIZE_ARGUMENT = {
    "empty": 0,
    "zeros": 0,
    "ones": 0,
    "full": 0,
    "empty_strided": 0,
    "rand": 0,
    "randn": 0,
    "new_empty": 1,
    "new_zeros": 1,
    "new_ones": 1,
    "new_full": 1,
    "new_empty_strided": 1,
    "expand": 1,
    "repeat": 1,
    "view": 1,
    "reshape": 1,
    "_unsafe_view": 1,
    "as_strided": 1,
}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _one_of(x: Any, allowed) -> bool:
    return isinstance(x, str) and x in allowed


def _require(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise ArtifactCorruptError(f"{where}: {what}")


def check_bucket(b: Bucket, where: str, limits: ReadLimits = DEFAULT_LIMITS) -> None:
    _require(_is_int(b.batch) and _is_int(b.seq), where, f"bucket {b} is not two integers")
    if not (0 < b.batch <= limits.max_batch and 0 < b.seq <= limits.max_seq):
        raise ArtifactUnsafeError(
            f"{where}: bucket batch={b.batch} seq={b.seq} is outside batch 1..{limits.max_batch}, "
            f"seq 1..{limits.max_seq}"
        )
    if b.batch * b.seq > limits.max_bucket_tokens:
        raise ArtifactUnsafeError(
            f"{where}: bucket {b.batch}x{b.seq} holds {b.batch * b.seq} tokens, more than the "
            f"{limits.max_bucket_tokens} a reader allocates"
        )


def check_manifest(m: Manifest, where: str, limits: ReadLimits = DEFAULT_LIMITS) -> None:
    """Types and ranges of every manifest field the runtime uses."""
    for name in (
        "kernl_version",
        "torch_version",
        "triton_version",
        "task",
        "model_type",
        "model_source",
        "created_at",
    ):
        _require(isinstance(getattr(m, name), str), where, f"{name} is not a string")
    for name in ("cuda_version", "gpu_name", "compute_capability"):
        value = getattr(m, name)
        _require(value is None or isinstance(value, str), where, f"{name} is not a string")
    _require(_one_of(m.target, TARGETS), where, f"target {m.target!r} is not one of {TARGETS}")
    _require(_one_of(m.dtype, TENSOR_DTYPES), where, f"dtype {m.dtype!r} is not a known dtype")
    _require(isinstance(m.model_config, dict), where, "model_config is not a map")
    _require(isinstance(m.extra, dict), where, "extra is not a map")
    order = m.extra.get(POSITIONAL_INPUTS_KEY)
    _require(
        order is None
        or (
            isinstance(order, list)
            and 0 < len(order) <= 64
            and all(isinstance(n, str) and 0 < len(n) <= 128 for n in order)
            and len(set(order)) == len(order)
            and "input_ids" in order
        ),
        where,
        f"extra.{POSITIONAL_INPUTS_KEY} is not a list of distinct input names with input_ids",
    )

    _require(isinstance(m.inputs, list) and m.inputs, where, "no inputs")
    seen: set[str] = set()
    for spec in m.inputs:
        _require(
            isinstance(spec.name, str) and bool(IDENTIFIER.fullmatch(spec.name)),
            where,
            f"input name {spec.name!r} is not an identifier",
        )
        _require(spec.name not in seen, where, f"input {spec.name!r} is listed twice")
        seen.add(spec.name)
        _require(
            _one_of(spec.dtype, INPUT_DTYPES),
            where,
            f"input {spec.name!r} has dtype {spec.dtype!r}, not an integer dtype",
        )
        lo, hi = INPUT_DTYPES[spec.dtype]
        _require(
            _is_int(spec.pad_value) and lo <= spec.pad_value < hi,
            where,
            f"input {spec.name!r} has pad value {spec.pad_value!r}, not a {spec.dtype}",
        )
        _require(
            _one_of(spec.default, INPUT_DEFAULTS),
            where,
            f"input {spec.name!r} has default {spec.default!r}",
        )
        key = TABLE_SIZES.get(spec.name)
        size = m.model_config.get(key) if key and isinstance(m.model_config, dict) else None
        _require(
            not _is_int(size) or size <= hi,
            where,
            f"input {spec.name!r} is {spec.dtype}, which cannot hold the {size} rows of its "
            f"table (model_config.{key})",
        )

    _require(isinstance(m.outputs, list) and m.outputs, where, "no outputs")
    seen = set()
    for spec in m.outputs:
        _require(
            isinstance(spec.name, str) and bool(IDENTIFIER.fullmatch(spec.name)),
            where,
            f"output name {spec.name!r} is not an identifier",
        )
        _require(spec.name not in seen, where, f"output {spec.name!r} is listed twice")
        seen.add(spec.name)
        _require(
            _one_of(spec.dtype, TENSOR_DTYPES),
            where,
            f"output {spec.name!r} has dtype {spec.dtype!r}",
        )
        _require(
            _is_int(spec.batch_axis) and 0 <= spec.batch_axis < MAX_AXIS,
            where,
            f"output {spec.name!r} has batch axis {spec.batch_axis!r}",
        )
        _require(
            spec.seq_axis is None
            or (
                _is_int(spec.seq_axis)
                and 0 <= spec.seq_axis < MAX_AXIS
                and spec.seq_axis != spec.batch_axis
            ),
            where,
            f"output {spec.name!r} has sequence axis {spec.seq_axis!r}",
        )

    _require(isinstance(m.buckets, list) and m.buckets, where, "no buckets")
    if len(m.buckets) > limits.max_buckets:
        raise ArtifactUnsafeError(
            f"{where}: {len(m.buckets)} buckets, more than the {limits.max_buckets} a reader "
            "accepts (each is a program, a graph and static buffers)"
        )
    buckets, programs = set(), set()
    for e in m.buckets:
        check_bucket(e.bucket, where, limits)
        # A causal-LM lists a prefill (batch, prompt) and a decode (batch, kv length) entry
        # per shape: prompt=512 and cache=512 are two programs of one (batch, 512).
        key = e.bucket if m.task != "causal-lm" else (e.bucket, e.program)
        _require(key not in buckets, where, f"bucket {e.bucket.name} is listed twice")
        buckets.add(key)
        if not is_safe_relative_path(e.program):
            raise ArtifactUnsafeError(
                f"{where}: bucket {e.bucket.name} has an unsafe program path {e.program!r}"
            )
        _require(e.program not in programs, where, f"program {e.program!r} is used by two buckets")
        programs.add(e.program)
        for name in ("max_abs_error", "compile_seconds"):
            value = getattr(e, name)
            _require(
                value is None or _is_number(value),
                where,
                f"bucket {e.bucket.name}: {name} is not a number",
            )

    _require(isinstance(m.files, dict), where, "files is not a map of path to sha256")
    for rel, digest in m.files.items():
        if not is_safe_relative_path(rel) or rel == MANIFEST_FILE:
            raise ArtifactUnsafeError(f"{where}: the file list holds an unsafe path {rel!r}")
        _require(
            isinstance(digest, str) and bool(SHA256_HEX.fullmatch(digest)),
            where,
            f"the sha256 of {rel!r} is not 64 hex digits",
        )
    check_file_chunks(m, where, limits)

    _require(isinstance(m.kernels, list), where, "kernels is not a list")
    for k in m.kernels:
        _require(
            isinstance(k.name, str) and bool(KERNEL_NAME.fullmatch(k.name)),
            where,
            f"kernel name {k.name!r}",
        )
        if not is_safe_relative_path(k.file):
            raise ArtifactUnsafeError(f"{where}: kernel {k.name!r} has an unsafe path {k.file!r}")
        _require(
            isinstance(k.function, str) and bool(IDENTIFIER.fullmatch(k.function)),
            where,
            f"kernel {k.name!r}: function {k.function!r} is not an identifier",
        )
        _require(
            _is_int(k.num_warps) and 1 <= k.num_warps <= 64,
            where,
            f"kernel {k.name!r}: num_warps {k.num_warps!r}",
        )
        _require(
            _is_int(k.shared_mem) and 0 <= k.shared_mem <= 1 << 20,
            where,
            f"kernel {k.name!r}: shared_mem {k.shared_mem!r}",
        )
        _require(isinstance(k.meta, dict), where, f"kernel {k.name!r}: meta is not a map")
        _check_kernel_meta(k.name, k.meta, where)


CHUNK_ENTRY_KEYS = ("chunk_bytes", "bytes", "sha256")


def check_file_chunks(m: Manifest, where: str, limits: ReadLimits = DEFAULT_LIMITS) -> None:
    """extra.file_chunks, when present: a map from a path of `files` to {"chunk_bytes": a
    power of two, "bytes": the file's size, "sha256": one 64-hex digest per chunk}, the
    chunks covering exactly `bytes` (the reader then checks the file's size on disk)."""
    chunks = m.extra.get(FILE_CHUNKS_KEY)
    if chunks is None:
        return
    what = f"extra.{FILE_CHUNKS_KEY}"
    _require(isinstance(chunks, dict), where, f"{what} is not a map of path to chunk hashes")
    total = 0
    for rel, entry in chunks.items():
        _require(
            isinstance(rel, str) and rel in m.files,
            where,
            f"{what} holds {rel!r}, which is not in the file list",
        )
        _require(
            isinstance(entry, dict) and set(entry) == set(CHUNK_ENTRY_KEYS),
            where,
            f"{what}[{rel!r}] is not a map of {list(CHUNK_ENTRY_KEYS)}",
        )
        size, digests = entry["chunk_bytes"], entry["sha256"]
        _require(
            _is_int(size) and MIN_CHUNK_BYTES <= size <= MAX_CHUNK_BYTES and size & (size - 1) == 0,
            where,
            f"{what}[{rel!r}]: chunk size {size!r} is not a power of two in "
            f"{MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}",
        )
        _require(
            _is_int(entry["bytes"]) and entry["bytes"] >= 0,
            where,
            f"{what}[{rel!r}]: file size {entry['bytes']!r} is not a size",
        )
        _require(isinstance(digests, list), where, f"{what}[{rel!r}]: sha256 is not a list")
        total += len(digests)
        if total > limits.max_file_chunks:
            raise ArtifactUnsafeError(
                f"{where}: {what} lists more than {limits.max_file_chunks} chunk hashes"
            )
        expected = -(-entry["bytes"] // size)
        _require(
            len(digests) == expected,
            where,
            f"{what}[{rel!r}]: {len(digests)} chunk hashes do not cover its "
            f"{entry['bytes']} bytes exactly ({expected} chunks of {size})",
        )
        for i, digest in enumerate(digests):
            _require(
                isinstance(digest, str) and bool(SHA256_HEX.fullmatch(digest)),
                where,
                f"{what}[{rel!r}]: the sha256 of chunk {i} is not 64 hex digits",
            )


def _check_kernel_meta(name: str, meta: dict, where: str) -> None:
    """key and arg_types are what the runtime launches a binary by (runtime/__init__.py)."""
    _require(isinstance(meta.get("key"), str), where, f"kernel {name!r}: meta.key is not a string")
    if "num_ctas" in meta:
        n = meta["num_ctas"]
        _require(_is_int(n) and 1 <= n <= 16, where, f"kernel {name!r}: num_ctas {n!r}")
    at = meta.get("arg_types")
    ok = isinstance(at, list) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in at
    )
    _require(ok, where, f"kernel {name!r}: meta.arg_types is not a list of [name, type] pairs")


def _check_arg(arg: Any, n: int, depth: int = 0) -> None:
    if depth > 16:
        raise ValueError("arguments nest too deeply")
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return
    if isinstance(arg, list):
        for a in arg:
            _check_arg(a, n, depth + 1)
        return
    if isinstance(arg, dict) and len(arg) == 1:
        ((tag, val),) = arg.items()
        if tag not in ARG_TAGS:
            raise ValueError(f"unknown argument tag {tag!r}")
        if tag == "v" and not (_is_int(val) and 0 <= val < n):
            raise ValueError(f"value reference {val!r} out of range")
        if tag != "v" and not (val is None or isinstance(val, str)):
            raise ValueError(f"bad {tag} argument {val!r}")
        return
    raise ValueError(f"argument of type {type(arg).__name__} is not allowed")


def _static_numel(size: Any) -> int | None:
    """The element count a static size list asks for (-1 entries infer and count as 1);
    None when the argument is not a plain list of integers."""
    if not isinstance(size, list) or not all(_is_int(s) for s in size):
        return None
    return math.prod(max(s, 1) for s in size)


def _requested_elements(op: str, args: list, kwargs: dict) -> int:
    base = op.split(".")[1] if op.startswith("aten.") else ""
    if base in SIZE_ARGUMENT:
        i = SIZE_ARGUMENT[base]
        size = kwargs.get("size", args[i] if len(args) > i else None)
        return _static_numel(size) or 0
    if base == "arange":
        nums = [a for a in args if _is_number(a)]
        start, end, step = 0, None, 1
        if len(nums) == 1:
            end = nums[0]
        elif len(nums) >= 2:
            start, end = nums[0], nums[1]
            step = nums[2] if len(nums) > 2 else kwargs.get("step", 1)
        start, end = kwargs.get("start", start), kwargs.get("end", end)
        if end is None or not all(_is_number(x) for x in (start, end, step)) or step == 0:
            return 0
        return max(0, math.ceil((end - start) / step))
    return 0


def check_program(p: Program, where: str, limits: ReadLimits = DEFAULT_LIMITS) -> None:
    """Raises ValueError (the reader adds where) for malformed programs, ArtifactUnsafeError
    for allocations over the limits."""
    check_bucket(p.bucket, where, limits)
    n = p.num_values
    if not 0 < n <= limits.max_values:
        raise ValueError(f"num_values {n} out of range")
    if len(p.instructions) > limits.max_instructions:
        raise ValueError(f"{len(p.instructions)} instructions, more than {limits.max_instructions}")
    if not all(isinstance(k, str) and IDENTIFIER.fullmatch(k) for k in p.inputs):
        raise ValueError("input names must be identifiers")
    ids = [*p.inputs.values(), *p.weights.keys(), *p.outputs]
    if not all(_is_int(i) and 0 <= i < n for i in ids):
        raise ValueError("a value id is out of range")
    if not all(isinstance(w, str) and w for w in p.weights.values()):
        raise ValueError("weight names must be non-empty strings")
    defined = set(p.inputs.values()) | set(p.weights)
    for index, ins in enumerate(p.instructions):
        if not isinstance(ins.op, str) or not OP_NAME.fullmatch(ins.op):
            raise ArtifactUnsafeError(
                f"{where}: instruction {index}: op name {ins.op!r} is not a kernl or aten op name"
            )
        _check_arg(ins.args, n)
        if not all(isinstance(k, str) and IDENTIFIER.fullmatch(k) for k in ins.kwargs):
            raise ValueError(f"instruction {index} ({ins.op}): keyword names must be identifiers")
        _check_arg(list(ins.kwargs.values()), n)
        if not ins.outputs or not all(
            o is None or (_is_int(o) and 0 <= o < n) for o in ins.outputs
        ):
            raise ValueError(f"instruction {index} ({ins.op}): output id out of range")
        for v in iter_value_refs([ins.args, list(ins.kwargs.values())]):
            if v not in defined:
                raise ValueError(
                    f"instruction {index} ({ins.op}) reads value {v} before it is defined"
                )
        elements = _requested_elements(ins.op, ins.args, ins.kwargs)
        if elements > limits.max_tensor_elements:
            raise ArtifactUnsafeError(
                f"{where}: instruction {index} ({ins.op}) asks for a tensor of {elements} "
                f"elements, more than the {limits.max_tensor_elements} a reader allows"
            )
        defined.update(o for o in ins.outputs if o is not None)
    missing = [o for o in p.outputs if o not in defined]
    if missing:
        raise ValueError(f"outputs {missing} are never computed")
    _check_value_shapes(p, where, limits)


def _check_value_shapes(p: Program, where: str, limits: ReadLimits) -> None:
    """The compiler records every value's static shape in meta["values"]; a shape over the
    limits there means the program was built (or edited) to allocate it."""
    values = p.meta.get("values") if isinstance(p.meta, dict) else None
    if not isinstance(values, dict):
        return
    for vid, info in values.items():
        if isinstance(info, list) and info and (numel := _static_numel(info[0])) is not None:
            if numel > limits.max_tensor_elements:
                raise ArtifactUnsafeError(
                    f"{where}: value {vid} has shape {info[0]} ({numel} elements), more than "
                    f"the {limits.max_tensor_elements} a reader allows"
                )


def check_program_matches(p: Program, m: Manifest, bucket: Bucket, where: str) -> None:
    """A bucket's program serves that bucket and speaks the manifest's inputs and outputs."""
    if p.bucket != bucket:
        raise ArtifactCorruptError(
            f"{where}: the program is for bucket {p.bucket.name}, the manifest lists it for {bucket.name}"
        )
    if m.task == "causal-lm":
        return  # generation programs take cache and position inputs of their own
    names = {s.name for s in m.inputs}
    unknown = sorted(set(p.inputs) - names)
    if unknown:
        raise ArtifactCorruptError(
            f"{where}: the program takes inputs {unknown} the manifest does not declare"
        )
    if len(p.outputs) != len(m.outputs):
        raise ArtifactCorruptError(
            f"{where}: the program returns {len(p.outputs)} values, the manifest declares "
            f"{len(m.outputs)} outputs"
        )
