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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from .checks import check_manifest, check_program, check_program_matches
from .errors import (
    ArtifactCorruptError,
    ArtifactError,
    ArtifactMissingError,
    ArtifactUnsafeError,
    ArtifactVersionError,
)
from .limits import DEFAULT_LIMITS, ReadLimits
from .paths import read_inside, refuse_pickle, resolve_inside
from .program import Program
from .schema import (
    MANIFEST_CHECKSUM_KEY,
    MANIFEST_FILE,
    SUPPORTED_FORMAT_VERSIONS,
    WEIGHTS_FILE,
    Manifest,
)
from .writer import manifest_digest, sha256_file

SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
    "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip


def _resolve_inside(root: Path, rel: str, what: str) -> Path:
    """Kept for callers of the earlier private name (kernl.runtime loads binaries with it)."""
    return resolve_inside(Path(root), rel, what)


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


def read_manifest(root: str | os.PathLike, limits: ReadLimits = DEFAULT_LIMITS) -> Manifest:
    """Parse and check the manifest alone (no file hashes); cheap."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactMissingError(f"{root}: not a folder (an artifact is a folder)")
    data = read_inside(root, MANIFEST_FILE, "manifest", limits.max_manifest_bytes)
    path = root / MANIFEST_FILE
    raw = _unpack(path, data, "the manifest")
    if not isinstance(raw, dict):
        raise ArtifactCorruptError(f"{path}: the manifest is not a map")
    version = raw.get("format_version")
    if type(version) is not int or version not in SUPPORTED_FORMAT_VERSIONS:
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


def verify_files(root: str | os.PathLike, manifest: Manifest) -> None:
    """Every file listed exists inside the folder and matches its sha256; the programs,
    weights and kernel binaries the manifest names are among them."""
    root = Path(root)
    needed = [WEIGHTS_FILE] + [e.program for e in manifest.buckets]
    needed += [k.file for k in manifest.kernels]
    for rel in needed:
        if rel not in manifest.files:
            raise ArtifactUnsafeError(f"{root}: {rel!r} is used but has no hash in the manifest")
    for rel, digest in manifest.files.items():
        path = resolve_inside(root, rel, "file")
        try:
            actual = sha256_file(path)
        except OSError as e:
            raise ArtifactCorruptError(f"{path}: cannot be read: {e.strerror}") from None
        if actual != digest:
            raise ArtifactCorruptError(f"{root}: {rel} does not match its sha256 in the manifest")


def read_program(root: str | os.PathLike, rel: str, limits: ReadLimits = DEFAULT_LIMITS) -> Program:
    root = Path(root)
    data = read_inside(root, rel, "program", limits.max_program_bytes)
    path = root / rel
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
    path: Path, max_total_bytes: int | None = None, limits: ReadLimits = DEFAULT_LIMITS
) -> dict[str, Any]:
    """Parse the header ourselves and check every tensor lies inside the file, before any
    library allocates from it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            refuse_pickle(path, head, "the weights file")
            if len(head) < 8:
                raise ArtifactCorruptError(f"{path}: truncated safetensors file")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > min(limits.max_safetensors_header_bytes, size - 8):
                raise ArtifactCorruptError(
                    f"{path}: safetensors header length {hlen} is impossible for a file of {size} bytes"
                )
            text = f.read(hlen)
    except OSError as e:
        raise ArtifactCorruptError(f"{path}: cannot be read: {e.strerror}") from None
    try:
        header = json.loads(text)
    except Exception as e:
        raise ArtifactCorruptError(f"{path}: safetensors header is not JSON") from e
    if not isinstance(header, dict):
        raise ArtifactCorruptError(f"{path}: safetensors header is not a map")
    data_size = size - 8 - hlen
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise ArtifactCorruptError(f"{path}: safetensors __metadata__ is not a map")
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
    if max_total_bytes is not None and total > max_total_bytes:
        raise ArtifactUnsafeError(f"{path}: weights claim {total} bytes, over the limit")
    return header


def read_weights(root: str | os.PathLike, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    path = resolve_inside(Path(root), WEIGHTS_FILE, "weights")
    check_safetensors_header(path)
    try:
        return load_file(str(path), device=device)
    except Exception as e:
        raise ArtifactCorruptError(f"{path}: cannot read weights ({e})") from e


def _runtime_vocabulary() -> Callable[[str], bool] | None:
    # The op vocabulary is the runtime's (it maps names to callables). Imported lazily and
    # only here, so the artifact package itself depends on nothing but msgpack/safetensors.
    try:
        from kernl.runtime.vocabulary import is_known_op
    except ImportError:  # pragma: no cover - a reader installed without the runtime
        return None
    return is_known_op


def verify_artifact(
    root: str | os.PathLike,
    is_known_op: Callable[[str], bool] | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> Manifest:
    """Everything short of loading onto a device: manifest, hashes, programs (structure, data
    flow, allocation sizes, op vocabulary, agreement with the manifest), the weights header
    and every weight a program uses. Raises an ArtifactError subclass; returns the manifest."""
    root = Path(root)
    manifest = read_manifest(root, limits)
    verify_files(root, manifest)
    header = check_safetensors_header(resolve_inside(root, WEIGHTS_FILE, "weights"), limits=limits)
    known = is_known_op or _runtime_vocabulary()
    for entry in manifest.buckets:
        program = read_program(root, entry.program, limits)
        where = str(root / entry.program)
        check_program_matches(program, manifest, entry.bucket, where)
        absent = sorted(set(program.weights.values()) - set(header))
        if absent:
            raise ArtifactUnsafeError(
                f"{where}: uses weights absent from {WEIGHTS_FILE}: {absent[:5]}"
            )
        if known is not None:
            unknown = sorted(op for op in program.ops_used() if not known(op))
            if unknown:
                raise ArtifactUnsafeError(f"{where}: ops outside the vocabulary: {unknown}")
    return manifest
