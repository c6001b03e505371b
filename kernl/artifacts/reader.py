"""Read and verify an artifact. Everything is checked before anything is used: the format
version, that every path stays inside the folder (no '..', no absolute path, no symbolic
link), every file's sha256, the structure of the manifest and programs, the sizes they ask
for, and the safetensors header against the file's real size. The reader never executes,
imports or unpickles anything from the artifact."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from .analysis import SAFETENSORS_DTYPES, ProgramUsage, WeightInfo, analyse_program
from .checks import check_manifest, check_program, check_program_matches
from .errors import (
    ArtifactCorruptError,
    ArtifactError,
    ArtifactUnsafeError,
    ArtifactVersionError,
)
from .hashing import manifest_digest, run_hash_jobs, sha256_fd
from .limits import DEFAULT_LIMITS, ReadLimits
from .memory import MemoryPlan
from .opened import ArtifactFiles, artifact_files, refuse_pickle
from .program import Program
from .schema import (
    FILE_CHUNKS_KEY,
    MANIFEST_CHECKSUM_KEY,
    MANIFEST_FILE,
    SUPPORTED_FORMAT_VERSIONS,
    WEIGHTS_FILE,
    Manifest,
)
from .signing import PublicKey, check_signature, load_trusted_keys, trusted_keys_from_env
from .vocabulary import is_allowed_op

if TYPE_CHECKING:  # imported where a causal-LM artifact is checked: the rest never need it
    from .generation import GenerationDescription

SAFETENSORS_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}


def _unpack(path: Path, data: bytes, what: str) -> Any:
    refuse_pickle(path, data, what)

    def refuse_ext(code, _data):
        raise ArtifactCorruptError(f"{path}: msgpack extension type {code} is not allowed")

    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=refuse_ext)
    except ArtifactError:
        raise
    except Exception as e:  # msgpack raises many types for garbage input
        raise ArtifactCorruptError(f"{path}: not valid msgpack ({type(e).__name__}: {e})") from e


def read_manifest(
    root: str | os.PathLike | ArtifactFiles,
    limits: ReadLimits = DEFAULT_LIMITS,
    trusted_keys: Sequence[str | os.PathLike | PublicKey] | None = None,
) -> Manifest:
    """Parse and check the manifest alone (no file hashes); cheap. With `trusted_keys` (public
    key files or loaded keys), the manifest's bytes must first carry a valid signature by one
    of them (signing.py): the same bytes are then parsed."""
    with artifact_files(root) as files:
        data = files.read(MANIFEST_FILE, "manifest", limits.max_manifest_bytes)
        if trusted_keys:
            check_signature(files, data, load_trusted_keys(trusted_keys))
    path = files.path(MANIFEST_FILE)
    raw = _unpack(path, data, "the manifest")
    if not isinstance(raw, dict):
        raise ArtifactCorruptError(f"{path}: the manifest is not a map")
    version = raw.get("format_version")
    if type(version) is not int or version not in SUPPORTED_FORMAT_VERSIONS:
        if _checksum_mismatch(raw):  # a flipped byte, not a newer kernl's artifact
            raise ArtifactCorruptError(
                f"{path}: the manifest does not match its own checksum (corrupted or edited); "
                f"its format version reads {version!r}"
            )
        raise ArtifactVersionError(
            f"{path}: format version {version!r}; this kernl reads versions "
            f"{list(SUPPORTED_FORMAT_VERSIONS)}. A newer artifact needs a newer kernl; an "
            f"older one, a recompile."
        )
    _check_manifest_checksum(path, raw)
    try:
        manifest = Manifest.from_dict(raw)
        check_manifest(manifest, str(path), limits)
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactCorruptError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from e
    return manifest


def _checksum_mismatch(raw: dict) -> bool:
    """A checksum is recorded and the manifest does not match it. A manifest without one, or
    with one of another shape, is left to the version check: a later format may record it
    elsewhere."""
    extra = raw.get("extra")
    recorded = extra.get(MANIFEST_CHECKSUM_KEY) if isinstance(extra, dict) else None
    if not isinstance(recorded, str):
        return False
    try:
        return recorded != manifest_digest(raw)
    except Exception:  # a map msgpack cannot re-encode: not this format's checksum to judge
        return False


def _check_manifest_checksum(path: Path, raw: dict) -> None:
    """The writer stores the sha256 of the rest of the manifest in extra; a manifest without
    it, or with one that does not match, is refused (a flipped bit anywhere, the checksum's
    own key included, is caught)."""
    extra = raw.get("extra")
    recorded = extra.get(MANIFEST_CHECKSUM_KEY) if isinstance(extra, dict) else None
    if recorded is None:
        raise ArtifactCorruptError(
            f"{path}: the manifest has no checksum (extra.{MANIFEST_CHECKSUM_KEY}); it was "
            "damaged, edited by hand, or written by a kernl from before checksums: recompile"
        )
    if recorded != manifest_digest(raw):
        raise ArtifactCorruptError(
            f"{path}: the manifest does not match its own checksum (corrupted or edited)"
        )


def verify_files(
    root: str | os.PathLike | ArtifactFiles,
    manifest: Manifest,
    workers: int | None = None,
    files: Collection[str] | None = None,
) -> None:
    """Every file listed exists inside the folder and matches its sha256; the programs,
    weights and kernel binaries the manifest names are among them. A file with chunk hashes
    (extra.file_chunks, checked by check_manifest) must have exactly the size they cover, and
    each chunk its sha256; files and chunks are hashed on `workers` threads (default: the
    cores, capped; hashing.hash_workers). The first mismatch stops the rest. `files`: hash
    only these of the listed files (load() checks the code before the weights)."""
    with artifact_files(root) as opened:
        _verify_files(opened, manifest, workers, files)


def _verify_files(
    opened: ArtifactFiles, manifest: Manifest, workers: int | None, files: Collection[str] | None
) -> None:
    root = opened.root
    needed = [WEIGHTS_FILE] + [e.program for e in manifest.buckets]
    needed += [k.file for k in manifest.kernels]
    for rel in needed:
        if rel not in manifest.files:
            raise ArtifactUnsafeError(f"{root}: {rel!r} is used but has no hash in the manifest")
    chunked = manifest.extra.get(FILE_CHUNKS_KEY) or {}
    files = None if files is None else set(files)
    jobs = []
    for rel, digest in manifest.files.items():
        if files is not None and rel not in files:
            continue
        fd = opened.fd(rel, "file")  # opened once: what is hashed is what load() reads
        entry = chunked.get(rel)
        if entry is None:
            jobs.append(partial(_check_hash, opened, rel, fd, digest, 0, None, None))
            continue
        size = os.fstat(fd).st_size
        if size != entry["bytes"]:
            raise ArtifactCorruptError(
                f"{root}: {rel} is {size} bytes; its chunk hashes in the manifest cover "
                f"{entry['bytes']}"
            )
        step = entry["chunk_bytes"]
        for i, chunk_digest in enumerate(entry["sha256"]):
            jobs.append(partial(_check_hash, opened, rel, fd, chunk_digest, i * step, step, i))
    run_hash_jobs(jobs, workers)


def _check_hash(
    opened: ArtifactFiles, rel: str, fd: int, digest: str, offset: int, length: int | None, chunk
) -> None:
    try:
        actual = sha256_fd(fd, offset, length)
    except OSError as e:
        raise ArtifactCorruptError(f"{opened.path(rel)}: cannot be read: {e.strerror}") from None
    if actual != digest:
        part = "" if chunk is None else f" chunk {chunk} (bytes {offset}..{offset + length})"
        raise ArtifactCorruptError(
            f"{opened.root}: {rel}{part} does not match its sha256 in the manifest"
        )


def _newer_kernl(manifest: Manifest, unknown: list[str]) -> str:
    """What to add where a kernl op is unknown: kernl ops are added between versions
    (kernl.qkv_attention, 2026-12-05), and an older reader refuses them, rightly, but should
    say which kernl made the artifact (this package may not import kernl's own version)."""
    if not any(op.startswith("kernl.") for op in unknown):
        return ""
    return (
        f"; the artifact was built by kernl {manifest.kernl_version}: a kernl op added after "
        "this kernl's version needs a kernl that has it (or recompile with this one)"
    )


def read_program(
    root: str | os.PathLike | ArtifactFiles, rel: str, limits: ReadLimits = DEFAULT_LIMITS
) -> Program:
    with artifact_files(root) as files:
        data = files.read(rel, "program", limits.max_program_bytes)
    path = files.path(rel)
    raw = _unpack(path, data, "the program")
    try:
        if not isinstance(raw, dict):
            raise ValueError("not a map")
        program = Program.from_dict(raw)
        check_program(program, str(path), limits)
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactCorruptError(f"{path}: malformed program ({type(e).__name__}: {e})") from e
    return program


def check_safetensors_header(
    path: str | os.PathLike, max_total_bytes: int | None = None, limits: ReadLimits = DEFAULT_LIMITS
) -> dict[str, Any]:
    """Parse the header ourselves and check every tensor lies inside the file, before any
    library allocates from it."""
    path = Path(path)
    with ArtifactFiles(path.parent) as files:
        return _safetensors_header(files, path.name, max_total_bytes, limits)


def _safetensors_header(
    files: ArtifactFiles, rel: str, max_total_bytes: int | None, limits: ReadLimits
) -> dict[str, Any]:
    path, what = files.path(rel), "the weights file"
    size = files.size(rel, what)
    head = files.pread(rel, what, 0, 8)
    if len(head) < 8:
        refuse_pickle(path, head, what)
        raise ArtifactCorruptError(f"{path}: truncated safetensors file")
    # The first 8 bytes are the header's length, not magic bytes: a real header of 640, 896,
    # 1152 or 1408 bytes begins like a pickle. A pickle is named only once the file is not
    # safetensors.
    (hlen,) = struct.unpack("<Q", head)
    if hlen > min(limits.max_safetensors_header_bytes, size - 8):
        refuse_pickle(path, head, what)
        raise ArtifactCorruptError(
            f"{path}: safetensors header length {hlen} is impossible for a file of {size} bytes"
        )
    text = files.pread(rel, what, 8, hlen)
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except ArtifactCorruptError as e:  # a name twice: said with the file's path
        raise ArtifactCorruptError(f"{path}: {e}") from None
    except ArtifactError:
        raise
    except Exception as e:
        refuse_pickle(path, head, what)
        raise ArtifactCorruptError(f"{path}: safetensors header is not JSON") from e
    if not isinstance(header, dict):
        raise ArtifactCorruptError(f"{path}: safetensors header is not a map")
    data_size = size - 8 - hlen
    total = 0
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            # safetensors reads it as a map of strings to strings and refuses anything else
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ArtifactCorruptError(
                    f"{path}: safetensors __metadata__ is not a map of strings to strings"
                )
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (
                dtype in SAFETENSORS_ITEMSIZE
                and isinstance(shape, list)
                and all(type(s) is int and s >= 0 for s in shape)
                and type(start) is int
                and type(end) is int
                and 0 <= start <= end <= data_size
                and end - start == math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
            )
        except Exception:
            ok = False
        if not ok:
            raise ArtifactCorruptError(
                f"{path}: tensor {name!r} has an impossible header entry (dtype, shape or "
                f"offsets do not fit the {data_size} bytes of data)"
            )
        total += end - start
        spans.append((start, end, name))
    # What safetensors itself requires: tensors tile the data exactly, in offset order, with
    # no overlap (two names on the same bytes), no gap and no trailing bytes.
    spans.sort()
    for (_, prev_end, prev), (start, end, name) in zip(spans, spans[1:]):
        if start < prev_end:
            raise ArtifactCorruptError(
                f"{path}: tensor {name!r} at bytes [{start}, {end}) overlaps tensor {prev!r}"
            )
    at = 0
    for start, end, name in spans:
        if start != at:
            raise ArtifactCorruptError(
                f"{path}: tensor {name!r} at bytes [{start}, {end}) leaves a gap at byte {at}; "
                "tensors must tile the data exactly"
            )
        at = end
    if at != data_size:
        raise ArtifactCorruptError(
            f"{path}: {data_size - at} trailing bytes after the last tensor (data is "
            f"{data_size} bytes, tensors end at {at})"
        )
    if max_total_bytes is not None and total > max_total_bytes:
        raise ArtifactUnsafeError(f"{path}: weights claim {total} bytes, over the limit")
    return header


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ArtifactCorruptError(f"safetensors header names {dup[:3]} twice")
    return dict(pairs)


def read_weights(root: str | os.PathLike | ArtifactFiles, device: str = "cpu") -> dict:
    """Every weight of the artifact on `device`, each a tensor of its own, read in one
    pipelined pass (`weights.read_tensors`) once the header is checked."""
    from .weights import read_tensors

    with artifact_files(root) as files:
        path = files.path(WEIGHTS_FILE)
        header = _safetensors_header(files, WEIGHTS_FILE, None, DEFAULT_LIMITS)
        try:
            return read_tensors(files.fd(WEIGHTS_FILE, "weights"), header, device)
        except Exception as e:
            raise ArtifactCorruptError(f"{path}: cannot read weights ({e})") from e


def _weight_infos(
    files: ArtifactFiles, rel: str, header: dict[str, Any], limits: ReadLimits
) -> dict[str, WeightInfo]:
    """Every tensor of the weights file as its (checked) header describes it, with the value
    range of the integer ones (position_ids, token_type_ids buffers), read from the file:
    the checker bounds the indices they feed."""
    import numpy as np

    what = "the weights file"
    (hlen,) = struct.unpack("<Q", files.pread(rel, what, 0, 8))
    infos: dict[str, WeightInfo] = {}
    budget = limits.max_index_weight_bytes
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        values = None
        np_dtype = _NUMPY_INTS.get(info["dtype"])
        if np_dtype is not None and 0 < end - start <= budget:
            budget -= end - start
            data = files.pread(rel, what, 8 + hlen + start, end - start)
            array = np.frombuffer(data, dtype=np.dtype(np_dtype).newbyteorder("<"))
            values = (int(array.min()), int(array.max()))
        infos[name] = WeightInfo(tuple(info["shape"]), dtype, end - start, values)
    return infos


_NUMPY_INTS = {
    "I64": "i8",
    "I32": "i4",
    "I16": "i2",
    "I8": "i1",
    "U8": "u1",
    "U16": "u2",
    "U32": "u4",
    "U64": "u8",
    "BOOL": "u1",
}


@dataclass
class CheckedArtifact:
    """An artifact that passed every check `load()` relies on; what the checks found."""

    manifest: Manifest
    programs: list[Program]  # in the manifest's bucket order
    weights: dict[str, WeightInfo]
    memory: MemoryPlan
    generation: GenerationDescription | None = None
    usage: list[ProgramUsage] | None = None


def check_artifact(
    root: str | os.PathLike | ArtifactFiles,
    *,
    limits: ReadLimits = DEFAULT_LIMITS,
    trusted_keys: Sequence[str | os.PathLike | PublicKey] | None = None,
    free_bytes: int | None = None,
    hash_files: bool = True,
    is_known_op: Callable[[str], bool] | None = None,
    manifest: Manifest | None = None,
) -> CheckedArtifact:
    """The whole-artifact check that `verify_artifact` (and `kernl verify`) and
    `kernl.runtime.load` share. In order: the signature (when `trusted_keys` are given), the
    manifest, every file's sha256 (`hash_files`; load hashes on a thread of its own), the
    weights header, the causal-LM description against the weights, then per program its
    structure, op vocabulary, weights, shapes, index bounds and writes (analysis.py), and
    last the memory plan against `limits` and `free_bytes` (the device's free memory, from
    the runtime). Raises an ArtifactError subclass.

    `manifest`: the one `read_manifest(root, limits, trusted_keys)` returned to the caller,
    checked here instead of the file read again (`trusted_keys` then go unused: its bytes
    were checked when it was read). load() builds the model from the manifest it read: a
    second read could see another artifact's (a recompile replacing the folder meanwhile),
    and the model would then be built from a manifest no whole-artifact check had seen.
    `root` opened once (ArtifactFiles): every read and hash goes through the same files."""
    with artifact_files(root) as files:
        return _check_artifact(
            files, limits, trusted_keys, free_bytes, hash_files, is_known_op, manifest
        )


def _check_artifact(
    files: ArtifactFiles,
    limits: ReadLimits,
    trusted_keys: Sequence[str | os.PathLike | PublicKey] | None,
    free_bytes: int | None,
    hash_files: bool,
    is_known_op: Callable[[str], bool] | None,
    manifest: Manifest | None,
) -> CheckedArtifact:
    root = files.root
    if manifest is None:
        manifest = read_manifest(files, limits, trusted_keys)
    if hash_files:
        verify_files(files, manifest)
    header = _safetensors_header(files, WEIGHTS_FILE, None, limits)
    weights = _weight_infos(files, WEIGHTS_FILE, header, limits)
    weight_bytes = sum(w.nbytes for w in weights.values())
    where = str(root / MANIFEST_FILE)
    programs: list[Program] = []
    total_instructions = 0
    usage: list[ProgramUsage] = []
    generation = seq2seq = None
    if manifest.task == "causal-lm":
        from .generation import check_generation

        described = {n: (list(w.shape), w.dtype) for n, w in weights.items()}
        generation = check_generation(manifest.extra, manifest.dtype, described, where, limits)
    elif manifest.task in ("seq2seq-lm", "speech-seq2seq"):
        from .seq2seq import check_seq2seq

        described = {n: (list(w.shape), w.dtype) for n, w in weights.items()}
        seq2seq = check_seq2seq(manifest.extra, manifest.dtype, described, where, limits)
    for entry in manifest.buckets:
        program = read_program(files, entry.program, limits)
        where_p = str(root / entry.program)
        check_program_matches(program, manifest, entry.bucket, where_p)
        total_instructions += len(program.instructions)
        if total_instructions > limits.max_total_instructions:
            raise ArtifactUnsafeError(
                f"{where_p}: the programs hold more than {limits.max_total_instructions} "
                "instructions in all"
            )
        unknown = sorted(op for op in program.ops_used() if not is_allowed_op(op))
        if is_known_op is not None:
            unknown += sorted(op for op in program.ops_used() if not is_known_op(op))
        if unknown:
            raise ArtifactUnsafeError(
                f"{where_p}: ops outside the vocabulary: {unknown}{_newer_kernl(manifest, unknown)}"
            )
        absent = sorted(set(program.weights.values()) - set(weights))
        if absent:
            raise ArtifactUnsafeError(
                f"{where_p}: uses weights absent from {WEIGHTS_FILE}: {absent[:5]}"
            )
        if manifest.task == "causal-lm":
            # The runtime's own decoder serves these; their programs only record the bucket.
            if program.instructions or program.weights or program.inputs:
                raise ArtifactCorruptError(
                    f"{where_p}: a causal-LM bucket's program holds instructions; kernl "
                    "writes none (the runtime's decoder serves them)"
                )
        else:
            usage.append(analyse_program(program, manifest, weights, where_p, limits))
        programs.append(program)
    if generation is not None:
        from .generation import generation_memory

        static, pool = generation_memory(generation, _itemsize(manifest.dtype))
        memory = MemoryPlan(weight_bytes, static, pool)
    elif seq2seq is not None:
        from .seq2seq import seq2seq_memory

        static, pool = seq2seq_memory(seq2seq, _itemsize(manifest.dtype))
        memory = MemoryPlan(weight_bytes, static, pool)
    else:
        memory = MemoryPlan(
            weight_bytes,
            sum(u.inputs + u.outputs for u in usage),
            max((u.peak for u in usage), default=0),
        )
    memory.check(where, limits, free_bytes)
    return CheckedArtifact(manifest, programs, weights, memory, generation, usage)


_ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE[dtype]


def verify_artifact(
    root: str | os.PathLike,
    is_known_op: Callable[[str], bool] | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
    trusted_keys: Sequence[str | os.PathLike | PublicKey] | None = None,
    free_bytes: int | None = None,
) -> Manifest:
    """Everything short of loading onto a device, i.e. every check `load()` makes
    (`check_artifact`). `is_known_op` adds a vocabulary of the caller's on top of the
    format's own (it can narrow it, never widen it). Without `trusted_keys`, the key files
    `KERNL_TRUSTED_KEYS` names are required, as `load()` requires them. Raises an
    ArtifactError subclass; returns the manifest."""
    return check_artifact(
        root,
        limits=limits,
        trusted_keys=trusted_keys or trusted_keys_from_env(),
        free_bytes=free_bytes,
        is_known_op=is_known_op,
    ).manifest
