"""Read and verify an artifact. Everything is checked before anything is used: the format
version, that every path stays inside the folder, every file's sha256, the structure of the
manifest and programs, and the safetensors header against the file's real size. The reader
never executes anything from the artifact."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import msgpack

from .errors import (
    ArtifactCorruptError,
    ArtifactError,
    ArtifactMissingError,
    ArtifactUnsafeError,
    ArtifactVersionError,
)
from .program import ARG_TAGS, Program
from .schema import (
    MANIFEST_FILE,
    SUPPORTED_FORMAT_VERSIONS,
    WEIGHTS_FILE,
    Manifest,
    is_safe_relative_path,
)
from .writer import sha256_file

MAX_MANIFEST_BYTES = 16 << 20
MAX_PROGRAM_BYTES = 64 << 20
MAX_SAFETENSORS_HEADER = 64 << 20
SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1,
}  # fmt: skip


def _resolve_inside(root: Path, rel: str, what: str) -> Path:
    if not is_safe_relative_path(rel):
        raise ArtifactUnsafeError(f"{root}: {what} has an unsafe path {rel!r}")
    path = root / rel
    if path.is_symlink():
        raise ArtifactUnsafeError(f"{root}: {what} {rel!r} is a symbolic link")
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise ArtifactUnsafeError(f"{root}: {what} {rel!r} leaves the artifact folder")
    if not path.is_file():
        raise ArtifactMissingError(f"{root}: {what} {rel!r} is missing")
    return path


def _unpack(path: Path, limit: int) -> Any:
    size = path.stat().st_size
    if size > limit:
        raise ArtifactCorruptError(f"{path}: {size} bytes, more than the {limit} allowed")
    data = path.read_bytes()

    def refuse_ext(code, _data):
        raise ArtifactCorruptError(f"{path}: msgpack extension type {code} is not allowed")

    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=False, ext_hook=refuse_ext
        )
    except ArtifactError:
        raise
    except Exception as e:  # msgpack raises many types for garbage input
        raise ArtifactCorruptError(f"{path}: not valid msgpack ({type(e).__name__}: {e})") from e


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Parse and check the manifest alone (no hashes); cheap."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactMissingError(f"{root}: not a folder (an artifact is a folder)")
    path = _resolve_inside(root, MANIFEST_FILE, "manifest")
    raw = _unpack(path, MAX_MANIFEST_BYTES)
    if not isinstance(raw, dict):
        raise ArtifactCorruptError(f"{path}: the manifest is not a map")
    version = raw.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ArtifactVersionError(
            f"{path}: format version {version!r}; this kernl reads versions "
            f"{list(SUPPORTED_FORMAT_VERSIONS)}. A newer artifact needs a newer kernl."
        )
    try:
        manifest = Manifest.from_dict(raw)
        _check_manifest_types(manifest)
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactCorruptError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from e
    return manifest


def _check_manifest_types(m: Manifest) -> None:
    if not m.buckets:
        raise ValueError("no buckets")
    for e in m.buckets:
        b = e.bucket
        if not (isinstance(b.batch, int) and isinstance(b.seq, int)):
            raise ValueError(f"bucket {b} is not two integers")
        if not (0 < b.batch <= 1 << 16 and 0 < b.seq <= 1 << 20):
            raise ValueError(f"bucket {b} is out of range")
    if not isinstance(m.files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in m.files.items()
    ):
        raise ValueError("files is not a map of path to sha256")
    for spec in [*m.inputs, *m.outputs]:
        if not isinstance(spec.name, str) or not isinstance(spec.dtype, str):
            raise ValueError(f"bad input/output spec {spec}")


def verify_files(root: str | os.PathLike, manifest: Manifest) -> None:
    """Every file listed exists inside the folder and matches its sha256; the programs and
    weights the manifest names are among them."""
    root = Path(root)
    for rel, digest in manifest.files.items():
        path = _resolve_inside(root, rel, "file")
        if sha256_file(path) != digest:
            raise ArtifactCorruptError(f"{root}: {rel} does not match its sha256 in the manifest")
    needed = [WEIGHTS_FILE] + [e.program for e in manifest.buckets]
    needed += [k.file for k in manifest.kernels]
    for rel in needed:
        if rel not in manifest.files:
            raise ArtifactUnsafeError(f"{root}: {rel!r} is used but has no hash in the manifest")


def read_program(root: str | os.PathLike, rel: str) -> Program:
    root = Path(root)
    path = _resolve_inside(root, rel, "program")
    raw = _unpack(path, MAX_PROGRAM_BYTES)
    try:
        program = Program.from_dict(raw)
        _check_program(program)
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactCorruptError(f"{path}: malformed program ({type(e).__name__}: {e})") from e
    return program


def _check_arg(arg: Any, n: int) -> None:
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return
    if isinstance(arg, list):
        for a in arg:
            _check_arg(a, n)
        return
    if isinstance(arg, dict) and len(arg) == 1:
        (tag, val), = arg.items()
        if tag not in ARG_TAGS:
            raise ValueError(f"unknown argument tag {tag!r}")
        if tag == "v" and not (isinstance(val, int) and 0 <= val < n):
            raise ValueError(f"value reference {val!r} out of range")
        if tag != "v" and not (val is None or isinstance(val, str)):
            raise ValueError(f"bad {tag} argument {val!r}")
        return
    raise ValueError(f"argument of type {type(arg).__name__} is not allowed")


def _check_program(p: Program) -> None:
    n = p.num_values
    if not 0 < n < 1 << 24:
        raise ValueError(f"num_values {n} out of range")
    ids = [*p.inputs.values(), *p.weights.keys(), *p.outputs]
    if not all(0 <= i < n for i in ids):
        raise ValueError("a value id is out of range")
    for ins in p.instructions:
        if not isinstance(ins.op, str):
            raise ValueError(f"op name {ins.op!r} is not a string")
        _check_arg(ins.args, n)
        if not all(isinstance(k, str) for k in ins.kwargs):
            raise ValueError("keyword names must be strings")
        _check_arg(list(ins.kwargs.values()), n)
        if not all(o is None or (isinstance(o, int) and 0 <= o < n) for o in ins.outputs):
            raise ValueError(f"{ins.op}: output id out of range")


def check_safetensors_header(path: Path, max_total_bytes: int | None = None) -> dict[str, Any]:
    """Parse the header ourselves and check every tensor lies inside the file, before any
    library allocates from it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactCorruptError(f"{path}: truncated safetensors file")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise ArtifactCorruptError(f"{path}: safetensors header length {hlen} is impossible")
        try:
            header = json.loads(f.read(hlen))
        except Exception as e:
            raise ArtifactCorruptError(f"{path}: safetensors header is not JSON") from e
    if not isinstance(header, dict):
        raise ArtifactCorruptError(f"{path}: safetensors header is not a map")
    data_size = size - 8 - hlen
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(int(s) for s in shape)
            ok = (
                dtype in SAFETENSORS_ITEMSIZE
                and all(isinstance(s, int) and s >= 0 for s in shape)
                and 0 <= start <= end <= data_size
                and end - start == numel * SAFETENSORS_ITEMSIZE[dtype]
            )
        except Exception:
            ok = False
        if not ok:
            raise ArtifactCorruptError(f"{path}: tensor {name!r} has an impossible header entry")
        total += end - start
    if max_total_bytes is not None and total > max_total_bytes:
        raise ArtifactUnsafeError(f"{path}: weights claim {total} bytes, over the limit")
    return header


def read_weights(root: str | os.PathLike, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    path = _resolve_inside(Path(root), WEIGHTS_FILE, "weights")
    check_safetensors_header(path)
    try:
        return load_file(str(path), device=device)
    except Exception as e:
        raise ArtifactCorruptError(f"{path}: cannot read weights ({e})") from e


def verify_artifact(root: str | os.PathLike) -> Manifest:
    """Everything short of loading onto a device: manifest, hashes, programs, weights header."""
    manifest = read_manifest(root)
    verify_files(root, manifest)
    for entry in manifest.buckets:
        read_program(root, entry.program)
    check_safetensors_header(Path(root) / WEIGHTS_FILE)
    return manifest
