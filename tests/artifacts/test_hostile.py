"""A corpus of hostile and broken artifacts, generated from a valid one. Each must be refused
by `kernl.artifacts.verify_artifact` and by `kernl.runtime.load(..., device="cpu")` before
anything runs, with a specific ArtifactError subclass whose message says what is wrong and
where; and no file outside the artifact folder may be opened while trying."""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
import torch
from artifact_edit import (
    copy_artifact,
    edit_manifest,
    edit_program,
    first_program,
    read_safetensors,
    resign,
    write_safetensors,
)

import kernl.runtime
from kernl.artifacts import (
    ArtifactCorruptError,
    ArtifactError,
    ArtifactMissingError,
    ArtifactUnsafeError,
    ArtifactVersionError,
    verify_artifact,
)

W = "weights.safetensors"
M = "manifest.msgpack"


@dataclass
class Case:
    mutate: Callable[[Path, Path], None]  # (artifact root, a folder outside it)
    error: type[ArtifactError]
    what: str  # a fragment of the message saying what is wrong
    where: str  # a fragment naming the file


def _append_instruction(root: Path, instruction: list) -> None:
    def edit(p):
        p["instructions"].insert(0, instruction)
        p["num_values"] += 1
        instruction[3] = [p["num_values"] - 1]

    edit_program(root, first_program(root), edit)


def _replace(root: Path, rel: str, data: bytes, rehash: bool = True) -> None:
    (root / rel).write_bytes(data)
    if rehash:
        resign(root)


def _flip_bit(root: Path, rel: str, offset: int) -> None:
    data = bytearray((root / rel).read_bytes())
    data[offset] ^= 0x10
    (root / rel).write_bytes(bytes(data))


def _symlink_out(root: Path, outside: Path, rel: str) -> None:
    # The outside copy is byte-identical, so its hash matches: only the path check can stop it.
    target = outside / Path(rel).name
    target.write_bytes((root / rel).read_bytes())
    (root / rel).unlink()
    (root / rel).symlink_to(target)


def _symlink_programs_dir(root: Path, outside: Path) -> None:
    target = outside / "programs"
    os.rename(root / "programs", target)
    (root / "programs").symlink_to(target, target_is_directory=True)


def _add_file_entry(root: Path, rel: str) -> None:
    edit_manifest(root, lambda m: m["files"].__setitem__(rel, "0" * 64))


def _set_program_path(root: Path, rel: str) -> None:
    def edit(m):
        old = m["buckets"][0]["program"]
        m["buckets"][0]["program"] = rel
        m["files"][rel] = m["files"].pop(old)

    edit_manifest(root, edit)


def _huge_tensor_header(root: Path, shape=None, offsets=None, dtype=None) -> None:
    header, payload = read_safetensors(root / W)
    name = next(k for k in header if k != "__metadata__")
    if shape is not None:
        header[name]["shape"] = shape
    if offsets is not None:
        header[name]["data_offsets"] = offsets
    if dtype is not None:
        header[name]["dtype"] = dtype
    write_safetensors(root / W, header, payload)
    resign(root)


def _truncate(root: Path, rel: str, keep: float, rehash: bool) -> None:
    data = (root / rel).read_bytes()
    _replace(root, rel, data[: int(len(data) * keep)], rehash)


def _msgpack_ext(root: Path) -> None:
    rel = first_program(root)
    p = msgpack.unpackb((root / rel).read_bytes(), raw=False, strict_map_key=False)
    p["meta"]["x"] = msgpack.ExtType(42, b"payload")
    _replace(root, rel, msgpack.packb(p, use_bin_type=True))


def _swap_programs(root: Path) -> None:
    def edit(m):
        a, b = m["buckets"][0], m["buckets"][1]
        a["program"], b["program"] = b["program"], a["program"]

    edit_manifest(root, edit)


def _rename_weight(root: Path) -> None:
    def edit(p):
        vid = next(iter(p["weights"]))
        p["weights"][vid] = "no.such.weight"

    edit_program(root, first_program(root), edit)


def _read_before_defined(root: Path) -> None:
    def edit(p):
        p["instructions"][0][1][0] = {"v": p["outputs"][0]}

    edit_program(root, first_program(root), edit)


GIB = 1 << 30
CASES = {
    # payloads that are not what the format says
    "pickle manifest": Case(lambda r, o: _replace(r, M, pickle.dumps({"format_version": 1}), rehash=False), ArtifactUnsafeError, "pickle", M),
    "pickle program": Case(lambda r, o: _replace(r, first_program(r), pickle.dumps([1, 2])), ArtifactUnsafeError, "pickle", "b1_s8"),
    "torch.save weights": Case(lambda r, o: torch.save({"w": torch.zeros(2)}, r / W) or resign(r), ArtifactUnsafeError, "pickle", W),
    "msgpack extension type": Case(lambda r, o: _msgpack_ext(r), ArtifactCorruptError, "extension type", "b1_s8"),
    "manifest not a map": Case(lambda r, o: _replace(r, M, msgpack.packb([1, 2, 3]), rehash=False), ArtifactCorruptError, "not a map", M),
    # safetensors headers that lie
    "weights header length huge": Case(lambda r, o: _replace(r, W, (1 << 60).to_bytes(8, "little") + b"{}"), ArtifactCorruptError, "header length", W),
    "weights tensor of a terabyte": Case(lambda r, o: _huge_tensor_header(r, shape=[1 << 20, 1 << 20]), ArtifactCorruptError, "impossible header entry", W),
    "weights offsets past the file": Case(lambda r, o: _huge_tensor_header(r, offsets=[0, 4 << 40]), ArtifactCorruptError, "impossible header entry", W),
    "weights unknown dtype": Case(lambda r, o: _huge_tensor_header(r, dtype="F128"), ArtifactCorruptError, "impossible header entry", W),
    # truncation and bit rot
    "weights truncated": Case(lambda r, o: _truncate(r, W, 0.5, rehash=False), ArtifactCorruptError, "sha256", W),
    "weights truncated, rehashed": Case(lambda r, o: _truncate(r, W, 0.5, rehash=True), ArtifactCorruptError, "impossible header entry", W),
    "weights truncated to 3 bytes": Case(lambda r, o: _truncate(r, W, 0.00001, rehash=True), ArtifactCorruptError, "truncated", W),
    "manifest truncated": Case(lambda r, o: _truncate(r, M, 0.6, rehash=False), ArtifactCorruptError, "msgpack", M),
    "program truncated, rehashed": Case(lambda r, o: _truncate(r, first_program(r), 0.7, rehash=True), ArtifactCorruptError, "msgpack", "b1_s8"),
    "weights bit flip": Case(lambda r, o: _flip_bit(r, W, 5000), ArtifactCorruptError, "sha256", W),
    "program bit flip": Case(lambda r, o: _flip_bit(r, first_program(r), 300), ArtifactCorruptError, "sha256", "b1_s8"),
    "manifest bit flip": Case(lambda r, o: _flip_bit(r, M, (r / M).read_bytes().index(b"bert") + 1), ArtifactCorruptError, "checksum", M),
    "manifest without checksum": Case(lambda r, o: _replace(r, M, msgpack.packb({**msgpack.unpackb((r / M).read_bytes(), strict_map_key=False), "extra": {}}), rehash=False), ArtifactCorruptError, "no checksum", M),
    "manifest hash does not match": Case(lambda r, o: edit_manifest(r, lambda m: m["files"].__setitem__(W, "ab" * 32)), ArtifactCorruptError, "does not match its sha256", W),
    # code and names an artifact must not be able to reach
    "op outside the vocabulary": Case(lambda r, o: _append_instruction(r, ["aten.system.default", ["id"], {}, []]), ArtifactUnsafeError, "vocabulary", "b1_s8"),
    "python name as op": Case(lambda r, o: _append_instruction(r, ["os.system", ["id"], {}, []]), ArtifactUnsafeError, "not a kernl or aten op name", "b1_s8"),
    "unknown kernl op": Case(lambda r, o: _append_instruction(r, ["kernl.eval", ["1"], {}, []]), ArtifactUnsafeError, "kernl.eval", "b1_s8"),
    "dtype naming a torch function": Case(lambda r, o: edit_manifest(r, lambda m: m["inputs"][0].__setitem__("dtype", "load")), ArtifactCorruptError, "dtype 'load'", M),
    "unknown argument tag": Case(lambda r, o: _append_instruction(r, ["aten.zeros.default", [[2]], {"dtype": {"import": "os"}}, []]), ArtifactCorruptError, "unknown argument tag", "b1_s8"),
    # paths leaving the folder
    "program path with ..": Case(lambda r, o: _set_program_path(r, "../outside.msgpack"), ArtifactUnsafeError, "unsafe program path", M),
    "absolute file path": Case(lambda r, o: _add_file_entry(r, "/etc/passwd"), ArtifactUnsafeError, "unsafe path '/etc/passwd'", M),
    "kernel binary path with ..": Case(lambda r, o: edit_manifest(r, lambda m: m["kernels"].append(dict(name="k", file="kernels/../../k.cubin", function="f", num_warps=4, shared_mem=0, meta={}))), ArtifactUnsafeError, "unsafe path", M),
    "program symlinked outside": Case(lambda r, o: _symlink_out(r, o, first_program(r)), ArtifactUnsafeError, "symbolic link", "b1_s8"),
    "weights symlinked outside": Case(lambda r, o: _symlink_out(r, o, W), ArtifactUnsafeError, "symbolic link", W),
    "manifest symlinked outside": Case(lambda r, o: _symlink_out(r, o, M), ArtifactUnsafeError, "symbolic link", M),
    "programs folder symlinked outside": Case(lambda r, o: _symlink_programs_dir(r, o), ArtifactUnsafeError, "symbolic link", "programs"),
    "program is a FIFO": Case(lambda r, o: (os.unlink(r / first_program(r)), os.mkfifo(r / first_program(r))), ArtifactUnsafeError, "not a regular file", "b1_s8"),
    # sizes that would allocate terabytes
    "aten.full of a terabyte": Case(lambda r, o: _append_instruction(r, ["aten.full.default", [[1 << 20, 1 << 20], 0.0], {}, []]), ArtifactUnsafeError, "asks for a tensor", "b1_s8"),
    "aten.empty of a terabyte": Case(lambda r, o: _append_instruction(r, ["aten.empty.memory_format", [[GIB, GIB]], {"dtype": {"dtype": "float32"}}, []]), ArtifactUnsafeError, "asks for a tensor", "b1_s8"),
    "aten.arange of a terabyte": Case(lambda r, o: _append_instruction(r, ["aten.arange.default", [1 << 42], {}, []]), ArtifactUnsafeError, "asks for a tensor", "b1_s8"),
    "value shape of a terabyte": Case(lambda r, o: edit_program(r, first_program(r), lambda p: p["meta"]["values"].__setitem__(0, [[1 << 21, 1 << 21], "float32"])), ArtifactUnsafeError, "elements", "b1_s8"),
    "bucket of a billion tokens": Case(lambda r, o: edit_manifest(r, lambda m: m["buckets"][0].__setitem__("bucket", {"batch": 1 << 12, "seq": 1 << 18})), ArtifactUnsafeError, "tokens", M),
    # versions and structure
    "future format version": Case(lambda r, o: edit_manifest(r, lambda m: m.__setitem__("format_version", 2)), ArtifactVersionError, "format version 2", M),
    "unknown manifest field": Case(lambda r, o: edit_manifest(r, lambda m: m.__setitem__("run_on_load", "id")), ArtifactCorruptError, "malformed manifest", M),
    "programs swapped between buckets": Case(lambda r, o: _swap_programs(r), ArtifactCorruptError, "is for bucket", "b1_s8"),
    "weight absent from the weights": Case(lambda r, o: _rename_weight(r), ArtifactUnsafeError, "no.such.weight", "b1_s8"),
    "value read before it is defined": Case(lambda r, o: _read_before_defined(r), ArtifactCorruptError, "before it is defined", "b1_s8"),
    # missing pieces
    "missing manifest": Case(lambda r, o: os.unlink(r / M), ArtifactMissingError, "missing", M),
    "missing weights": Case(lambda r, o: os.unlink(r / W), ArtifactMissingError, "missing", W),
    "missing program": Case(lambda r, o: os.unlink(r / first_program(r)), ArtifactMissingError, "missing", "b1_s8"),
    "program without a hash": Case(lambda r, o: edit_manifest(r, lambda m: m["files"].pop(m["buckets"][0]["program"])), ArtifactUnsafeError, "no hash", "b1_s8"),
}  # fmt: skip

# Every file opened while a hostile artifact is read: nothing outside the folder may be.
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


def _refused(fn, case: Case) -> str:
    global _OPENED
    _OPENED = []
    try:
        with pytest.raises(ArtifactError) as info:
            fn()
        opened = _OPENED
    finally:
        _OPENED = None
    assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert case.what in message and case.where in message, message
    return opened


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_artifact_is_refused(name, small_artifact, tmp_path):
    case = CASES[name]
    root = copy_artifact(small_artifact, tmp_path / "artifact")
    outside = tmp_path / "outside"
    outside.mkdir()
    case.mutate(root, outside)
    opened = _refused(lambda: verify_artifact(root), case)
    opened += _refused(lambda: kernl.runtime.load(root, device="cpu"), case)
    leaked = [p for p in opened if p.startswith(str(outside.resolve()))]
    assert not leaked, f"files outside the artifact were opened: {leaked}"


def test_the_valid_artifact_passes_and_loads(small_artifact):
    assert verify_artifact(small_artifact).model_type == "bert"
    model = kernl.runtime.load(small_artifact, device="cpu")
    assert model(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state.shape == (1, 3, 64)


def test_the_audit_hook_sees_the_reader_open_files(small_artifact):
    """The leak check above is only meaningful if the reader's opens are visible to it."""
    global _OPENED
    _OPENED = []
    try:
        verify_artifact(small_artifact)
        opened = _OPENED
    finally:
        _OPENED = None
    assert str((small_artifact / M).resolve()) in opened
    assert str((small_artifact / W).resolve()) in opened
