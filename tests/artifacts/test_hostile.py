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
    edit_extra,
    edit_manifest,
    edit_program,
    edit_weights,
    first_program,
    insert_instructions,
    program_ids,
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


def _fill_weight(root: Path, name: str, value: int) -> None:
    edit_weights(root, lambda t: t[name].fill_(value))


def _cut_rows(root: Path, name: str, rows: int) -> None:
    edit_weights(root, lambda t: t.__setitem__(name, t[name][:rows].clone()))


def _drop_weight(root: Path, name: str) -> None:
    edit_weights(root, lambda t: t.pop(name))


def _set_config(root: Path, key: str, value) -> None:
    edit_manifest(root, lambda m: m["model_config"].__setitem__(key, value))


def _weight_id(root: Path, name: str) -> int:
    return program_ids(root, first_program(root))[1][name]


def _input_id(root: Path, name: str) -> int:
    return program_ids(root, first_program(root))[0][name]


WORD = "model.embeddings.word_embeddings.weight"
POSITIONS = "model.embeddings.position_ids"
LN_W = "model.embeddings.LayerNorm.weight"
TYPES = "model.embeddings.token_type_embeddings.weight"


def _instructions(root: Path, *instructions) -> None:
    """Insert instructions first in the first program; "@name" stands for the value of a
    weight or input of that name."""

    def named(a):
        if isinstance(a, str) and a.startswith("@"):
            inputs, weights = program_ids(root, first_program(root))
            return {"v": {**inputs, **weights}[a[1:]]}
        if isinstance(a, list):
            return [named(x) for x in a]
        if isinstance(a, dict):
            return {k: named(v) for k, v in a.items()}
        return a

    insert_instructions(root, first_program(root), [named(list(i)) for i in instructions])


def _return_new_value(root: Path, *instructions) -> None:
    """Insert instructions and make the last one's value the program's first output."""
    _instructions(root, *instructions)

    def edit(p):
        p["outputs"][0] = p["instructions"][len(instructions) - 1][3][0]

    edit_program(root, first_program(root), edit)


def _many_buckets(root: Path, n: int) -> None:
    def edit(m):
        first = m["buckets"][0]
        m["buckets"] = [
            {**first, "bucket": {"batch": 1, "seq": 8 + i}, "program": f"programs/p{i}.msgpack"}
            for i in range(n)
        ]

    edit_manifest(root, edit)


def _too_many_instructions(root: Path) -> None:
    def edit(p):
        n = p["num_values"]
        p["instructions"][:0] = [["aten.zeros.default", [[1]], {}, [n + i]] for i in range(140_000)]
        p["num_values"] = n + 140_000

    edit_program(root, first_program(root), edit)


def _overlapping_weights(root: Path) -> None:
    header, payload = read_safetensors(root / W)
    a, b = "model.embeddings.LayerNorm.weight", "model.embeddings.LayerNorm.bias"
    header[b]["data_offsets"] = list(header[a]["data_offsets"])  # two names, the same bytes
    write_safetensors(root / W, header, payload)
    resign(root)


def _safetensors_metadata(root: Path, metadata) -> None:
    header, payload = read_safetensors(root / W)
    header["__metadata__"] = metadata
    write_safetensors(root / W, header, payload)
    resign(root)


def _trailing_bytes(root: Path) -> None:
    (root / W).write_bytes((root / W).read_bytes() + b"\0" * 64)
    resign(root)


def _op_with_newline(root: Path) -> None:
    def edit(p):
        ins = next(i for i in p["instructions"] if i[0].startswith("aten."))
        ins[0] += "\n"

    edit_program(root, first_program(root), edit)


GIB = 1 << 30
CASES = {
    # payloads that are not what the format says
    "pickle manifest": Case(
        lambda r, o: _replace(r, M, pickle.dumps({"format_version": 1}), rehash=False),
        ArtifactUnsafeError,
        "pickle",
        M,
    ),
    "pickle program": Case(
        lambda r, o: _replace(r, first_program(r), pickle.dumps([1, 2])),
        ArtifactUnsafeError,
        "pickle",
        "b1_s8",
    ),
    "torch.save weights": Case(
        lambda r, o: torch.save({"w": torch.zeros(2)}, r / W) or resign(r),
        ArtifactUnsafeError,
        "pickle",
        W,
    ),
    "msgpack extension type": Case(
        lambda r, o: _msgpack_ext(r), ArtifactCorruptError, "extension type", "b1_s8"
    ),
    "manifest not a map": Case(
        lambda r, o: _replace(r, M, msgpack.packb([1, 2, 3]), rehash=False),
        ArtifactCorruptError,
        "not a map",
        M,
    ),
    # safetensors headers that lie
    "weights header length huge": Case(
        lambda r, o: _replace(r, W, (1 << 60).to_bytes(8, "little") + b"{}"),
        ArtifactCorruptError,
        "header length",
        W,
    ),
    "weights tensor of a terabyte": Case(
        lambda r, o: _huge_tensor_header(r, shape=[1 << 20, 1 << 20]),
        ArtifactCorruptError,
        "impossible header entry",
        W,
    ),
    "weights offsets past the file": Case(
        lambda r, o: _huge_tensor_header(r, offsets=[0, 4 << 40]),
        ArtifactCorruptError,
        "impossible header entry",
        W,
    ),
    "weights unknown dtype": Case(
        lambda r, o: _huge_tensor_header(r, dtype="F128"),
        ArtifactCorruptError,
        "impossible header entry",
        W,
    ),
    # truncation and bit rot
    "weights truncated": Case(
        lambda r, o: _truncate(r, W, 0.5, rehash=False), ArtifactCorruptError, "sha256", W
    ),
    "weights truncated, rehashed": Case(
        lambda r, o: _truncate(r, W, 0.5, rehash=True),
        ArtifactCorruptError,
        "impossible header entry",
        W,
    ),
    "weights truncated to 3 bytes": Case(
        lambda r, o: _truncate(r, W, 0.00001, rehash=True), ArtifactCorruptError, "truncated", W
    ),
    "manifest truncated": Case(
        lambda r, o: _truncate(r, M, 0.6, rehash=False), ArtifactCorruptError, "msgpack", M
    ),
    "program truncated, rehashed": Case(
        lambda r, o: _truncate(r, first_program(r), 0.7, rehash=True),
        ArtifactCorruptError,
        "msgpack",
        "b1_s8",
    ),
    "weights bit flip": Case(lambda r, o: _flip_bit(r, W, 5000), ArtifactCorruptError, "sha256", W),
    "program bit flip": Case(
        lambda r, o: _flip_bit(r, first_program(r), 300), ArtifactCorruptError, "sha256", "b1_s8"
    ),
    "manifest bit flip": Case(
        lambda r, o: _flip_bit(r, M, (r / M).read_bytes().index(b"bert") + 1),
        ArtifactCorruptError,
        "checksum",
        M,
    ),
    "manifest without checksum": Case(
        lambda r, o: _replace(
            r,
            M,
            msgpack.packb(
                {**msgpack.unpackb((r / M).read_bytes(), strict_map_key=False), "extra": {}}
            ),
            rehash=False,
        ),
        ArtifactCorruptError,
        "no checksum",
        M,
    ),
    "manifest hash does not match": Case(
        lambda r, o: edit_manifest(r, lambda m: m["files"].__setitem__(W, "ab" * 32)),
        ArtifactCorruptError,
        "does not match its sha256",
        W,
    ),
    # code and names an artifact must not be able to reach
    "op outside the vocabulary": Case(
        lambda r, o: _append_instruction(r, ["aten.system.default", ["id"], {}, []]),
        ArtifactUnsafeError,
        "vocabulary",
        "b1_s8",
    ),
    # a kernl op a newer kernl added: refused, saying which kernl built the artifact
    "kernl op from a newer kernl": Case(
        lambda r, o: (
            _append_instruction(r, ["kernl.from_a_newer_kernl", [], {}, []]),
            edit_manifest(r, lambda m: m.__setitem__("kernl_version", "99.0.0")),
        ),
        ArtifactUnsafeError,
        "built by kernl 99.0.0: a kernl op added after",
        "b1_s8",
    ),
    "python name as op": Case(
        lambda r, o: _append_instruction(r, ["os.system", ["id"], {}, []]),
        ArtifactUnsafeError,
        "not a kernl or aten op name",
        "b1_s8",
    ),
    "unknown kernl op": Case(
        lambda r, o: _append_instruction(r, ["kernl.eval", ["1"], {}, []]),
        ArtifactUnsafeError,
        "kernl.eval",
        "b1_s8",
    ),
    "dtype naming a torch function": Case(
        lambda r, o: edit_manifest(r, lambda m: m["inputs"][0].__setitem__("dtype", "load")),
        ArtifactCorruptError,
        "dtype 'load'",
        M,
    ),
    # the runtime range-checks inputs in their own dtype: a bool block has no iinfo
    "bool input": Case(
        lambda r, o: edit_manifest(
            r,
            lambda m: [s.__setitem__("dtype", "bool") for s in m["inputs"] if "mask" in s["name"]],
        ),
        ArtifactCorruptError,
        "dtype 'bool', not an integer dtype",
        M,
    ),
    "input dtype narrower than its table": Case(
        lambda r, o: edit_manifest(
            r,
            lambda m: (
                m["model_config"].__setitem__("vocab_size", 300),
                [s.__setitem__("dtype", "int8") for s in m["inputs"]],
            ),
        ),
        ArtifactCorruptError,
        "'input_ids' is int8, which cannot hold the 300 rows of its table",
        M,
    ),
    "kernel without its launch key": Case(
        lambda r, o: edit_manifest(
            r,
            lambda m: m["kernels"].append(
                dict(name="k", file="kernels/k.cubin", function="f", num_warps=4, shared_mem=0)
            ),
        ),
        ArtifactCorruptError,
        "kernel 'k': meta.key is not a string",
        M,
    ),
    # named by entry and field, not by a dataclass's TypeError or a tuple unpacking's
    "kernel entry without its name": Case(
        lambda r, o: edit_manifest(
            r,
            lambda m: m["kernels"].append(
                dict(file="kernels/k.cubin", function="f", num_warps=4, shared_mem=0)
            ),
        ),
        ArtifactCorruptError,
        "kernels entry 0: missing field(s) ['name']",
        M,
    ),
    "instruction of three fields": Case(
        lambda r, o: edit_program(
            r,
            first_program(r),
            lambda p: p["instructions"].insert(0, ["aten.zeros.default", [], {}]),
        ),
        ArtifactCorruptError,
        "instruction 0 is not [op, args, kwargs, outputs] (3 fields)",
        "b1_s8",
    ),
    # checked with the manifest, so that `kernl verify` refuses what load() would
    "positional inputs not starting at input_ids": Case(
        lambda r, o: edit_extra(r, lambda e: e.__setitem__("positional_inputs", [])),
        ArtifactCorruptError,
        "extra.positional_inputs is not a list of distinct input names",
        M,
    ),
    "unknown argument tag": Case(
        lambda r, o: _append_instruction(
            r, ["aten.zeros.default", [[2]], {"dtype": {"import": "os"}}, []]
        ),
        ArtifactCorruptError,
        "unknown argument tag",
        "b1_s8",
    ),
    # paths leaving the folder
    "program path with ..": Case(
        lambda r, o: _set_program_path(r, "../outside.msgpack"),
        ArtifactUnsafeError,
        "unsafe program path",
        M,
    ),
    "absolute file path": Case(
        lambda r, o: _add_file_entry(r, "/etc/passwd"),
        ArtifactUnsafeError,
        "unsafe path '/etc/passwd'",
        M,
    ),
    "kernel binary path with ..": Case(
        lambda r, o: edit_manifest(
            r,
            lambda m: m["kernels"].append(
                dict(
                    name="k",
                    file="kernels/../../k.cubin",
                    function="f",
                    num_warps=4,
                    shared_mem=0,
                    meta={},
                )
            ),
        ),
        ArtifactUnsafeError,
        "unsafe path",
        M,
    ),
    "program symlinked outside": Case(
        lambda r, o: _symlink_out(r, o, first_program(r)),
        ArtifactUnsafeError,
        "symbolic link",
        "b1_s8",
    ),
    "weights symlinked outside": Case(
        lambda r, o: _symlink_out(r, o, W),
        ArtifactUnsafeError,
        "symbolic link (weights.safetensors); an artifact is plain files and folders (a copy made with `cp -rL`",
        W,
    ),
    "manifest symlinked outside": Case(
        lambda r, o: _symlink_out(r, o, M), ArtifactUnsafeError, "symbolic link", M
    ),
    "programs folder symlinked outside": Case(
        lambda r, o: _symlink_programs_dir(r, o), ArtifactUnsafeError, "symbolic link", "programs"
    ),
    "program is a FIFO": Case(
        lambda r, o: (os.unlink(r / first_program(r)), os.mkfifo(r / first_program(r))),
        ArtifactUnsafeError,
        "not a regular file",
        "b1_s8",
    ),
    # sizes that would allocate terabytes
    "aten.full of a terabyte": Case(
        lambda r, o: _append_instruction(
            r, ["aten.full.default", [[1 << 20, 1 << 20], 0.0], {}, []]
        ),
        ArtifactUnsafeError,
        "asks for a tensor",
        "b1_s8",
    ),
    "aten.empty of a terabyte": Case(
        lambda r, o: _append_instruction(
            r, ["aten.empty.memory_format", [[GIB, GIB]], {"dtype": {"dtype": "float32"}}, []]
        ),
        ArtifactUnsafeError,
        "asks for a tensor",
        "b1_s8",
    ),
    "aten.arange of a terabyte": Case(
        lambda r, o: _append_instruction(r, ["aten.arange.default", [1 << 42], {}, []]),
        ArtifactUnsafeError,
        "asks for a tensor",
        "b1_s8",
    ),
    "value shape of a terabyte": Case(
        lambda r, o: edit_program(
            r,
            first_program(r),
            lambda p: p["meta"]["values"].__setitem__(0, [[1 << 21, 1 << 21], "float32"]),
        ),
        ArtifactUnsafeError,
        "elements",
        "b1_s8",
    ),
    "bucket of a billion tokens": Case(
        lambda r, o: edit_manifest(
            r, lambda m: m["buckets"][0].__setitem__("bucket", {"batch": 1 << 12, "seq": 1 << 18})
        ),
        ArtifactUnsafeError,
        "tokens",
        M,
    ),
    # versions and structure
    "future format version": Case(
        lambda r, o: edit_manifest(r, lambda m: m.__setitem__("format_version", 3)),
        ArtifactVersionError,
        "format version 3",
        M,
    ),
    "unknown manifest field": Case(
        lambda r, o: edit_manifest(r, lambda m: m.__setitem__("run_on_load", "id")),
        ArtifactCorruptError,
        "malformed manifest",
        M,
    ),
    "programs swapped between buckets": Case(
        lambda r, o: _swap_programs(r), ArtifactCorruptError, "is for bucket", "b1_s8"
    ),
    "weight absent from the weights": Case(
        lambda r, o: _rename_weight(r), ArtifactUnsafeError, "no.such.weight", "b1_s8"
    ),
    "value read before it is defined": Case(
        lambda r, o: _read_before_defined(r), ArtifactCorruptError, "before it is defined", "b1_s8"
    ),
    # missing pieces
    "missing manifest": Case(lambda r, o: os.unlink(r / M), ArtifactMissingError, "missing", M),
    "missing weights": Case(lambda r, o: os.unlink(r / W), ArtifactMissingError, "missing", W),
    "missing program": Case(
        lambda r, o: os.unlink(r / first_program(r)), ArtifactMissingError, "missing", "b1_s8"
    ),
    "program without a hash": Case(
        lambda r, o: edit_manifest(r, lambda m: m["files"].pop(m["buckets"][0]["program"])),
        ArtifactUnsafeError,
        "no hash",
        "b1_s8",
    ),
    # weights that do not match the programs (issue 12)
    "position_ids filled with 1e9": Case(
        lambda r, o: _fill_weight(r, POSITIONS, 10**9),
        ArtifactUnsafeError,
        "reach [1000000000, 1000000000]",
        "b1_s8",
    ),
    "position_ids negative": Case(
        lambda r, o: _fill_weight(r, POSITIONS, -1), ArtifactUnsafeError, "out of range", "b1_s8"
    ),
    "word embeddings cut to 10 rows": Case(
        lambda r, o: _cut_rows(r, WORD, 10),
        ArtifactCorruptError,
        "compiled for float32 [120, 64]",
        "b1_s8",
    ),
    "weight of another dtype": Case(
        lambda r, o: edit_weights(r, lambda t: t.__setitem__(LN_W, t[LN_W].half())),
        ArtifactCorruptError,
        "float16 [64] in the weights file",
        "b1_s8",
    ),
    "vocab_size larger than the embedding": Case(
        lambda r, o: _set_config(r, "vocab_size", 1000),
        ArtifactUnsafeError,
        "vocab_size=1000",
        "b1_s8",
    ),
    "type_vocab_size larger than its table": Case(
        lambda r, o: _set_config(r, "type_vocab_size", 7),
        ArtifactUnsafeError,
        "type_vocab_size=7",
        "b1_s8",
    ),
    "vocab_size missing": Case(
        lambda r, o: edit_manifest(r, lambda m: m["model_config"].pop("vocab_size")),
        ArtifactUnsafeError,
        "vocab_size is missing",
        "b1_s8",
    ),
    "input_ids pad value outside the vocabulary": Case(
        lambda r, o: edit_manifest(r, lambda m: m["inputs"][0].__setitem__("pad_value", 5000)),
        ArtifactUnsafeError,
        "padded with 5000",
        "b1_s8",
    ),
    "gather with a computed index": Case(
        lambda r, o: _instructions(
            r,
            ["aten.mul.Tensor", ["@input_ids", "@input_ids"], {}],
            ["aten.embedding.default", ["@" + WORD, "$0"], {}],
        ),
        ArtifactUnsafeError,
        "reach [0, 14161]",
        "b1_s8",
    ),
    # a clamp bounds an index whatever it clamps (DeBERTa's positions, made through a float),
    # by its own limits: past the table is refused
    "a float cast clamped past the table": Case(
        lambda r, o: _instructions(
            r,
            ["aten.to.dtype", ["@" + LN_W, {"dtype": "int64"}], {}],
            ["aten.clamp.default", ["$0", 0, 5000], {}],
            ["aten.embedding.default", ["@" + WORD, "$1"], {}],
        ),
        ArtifactUnsafeError,
        "a clamp, whose values reach [0, 5000]",
        "b1_s8",
    ),
    "a float cast clamped from one side": Case(
        lambda r, o: _instructions(
            r,
            ["aten.to.dtype", ["@" + LN_W, {"dtype": "int64"}], {}],
            ["aten.clamp.default", ["$0", 0], {}],
            ["aten.embedding.default", ["@" + WORD, "$1"], {}],
        ),
        ArtifactUnsafeError,
        "cannot be bounded",
        "b1_s8",
    ),
    # a bound of unknown values bounds nothing (it was taken for no bound: x's own range)
    "clamp_min by a float cast": Case(
        lambda r, o: _instructions(
            r,
            ["aten.arange.default", [64], {}],
            ["aten.to.dtype", ["@" + LN_W, {"dtype": "int64"}], {}],
            ["aten.clamp_min.Tensor", ["$0", "$1"], {}],
            ["aten.embedding.default", ["@" + WORD, "$2"], {}],
        ),
        ArtifactUnsafeError,
        "cannot be bounded",
        "b1_s8",
    ),
    "clamp by a float cast and a large tensor": Case(
        lambda r, o: _instructions(
            r,
            ["aten.arange.default", [64], {}],
            ["aten.to.dtype", ["@" + LN_W, {"dtype": "int64"}], {}],
            ["aten.full.default", [[64], 10000], {"dtype": {"dtype": "int64"}}],
            ["aten.clamp.Tensor", ["$0", "$1", "$2"], {}],
            ["aten.embedding.default", ["@" + WORD, "$3"], {}],
        ),
        ArtifactUnsafeError,
        "reach [0, 10000]",
        "b1_s8",
    ),
    "clamp_max by a float cast": Case(
        lambda r, o: _instructions(
            r,
            ["aten.arange.default", [64], {}],
            ["aten.to.dtype", ["@" + LN_W, {"dtype": "int64"}], {}],
            ["aten.clamp_max.Tensor", ["$0", "$1"], {}],
            ["aten.embedding.default", ["@" + WORD, "$2"], {}],
        ),
        ArtifactUnsafeError,
        "cannot be bounded",
        "b1_s8",
    ),
    # from a review (2026-12-05): each indexed row 1000, -5 or -10 of the 120-row table and
    # verified. A 0-dim int64 bound of an int32 clamp is cast to int32 and wraps
    "clamp by a 0-dim int64 that wraps in int32": Case(
        lambda r, o: _instructions(
            r,
            ["aten.arange.default", [8], {"dtype": {"dtype": "int32"}}],
            ["aten.full.default", [[], -(2**32) + 1000], {"dtype": {"dtype": "int64"}}],
            ["aten.clamp.Tensor", ["$0", "$1"], {}],
            ["aten.embedding.default", ["@" + WORD, "$2"], {}],
        ),
        ArtifactUnsafeError,
        "cannot be bounded",
        "b1_s8",
    ),
    "maximum with a 0-dim int64 that wraps in int32": Case(
        lambda r, o: _instructions(
            r,
            ["aten.arange.default", [8], {"dtype": {"dtype": "int32"}}],
            ["aten.full.default", [[], -(2**32) + 1000], {"dtype": {"dtype": "int64"}}],
            ["aten.maximum.default", ["$0", "$1"], {}],
            ["aten.embedding.default", ["@" + WORD, "$2"], {}],
        ),
        ArtifactUnsafeError,
        "cannot be bounded",
        "b1_s8",
    ),
    "max.other taken for a reduction": Case(
        lambda r, o: _instructions(
            r,
            ["aten.arange.default", [8], {}],
            ["aten.full.default", [[8], 1000], {"dtype": {"dtype": "int64"}}],
            ["aten.max.other", ["$0", "$1"], {}],
            ["aten.embedding.default", ["@" + WORD, "$2"], {}],
        ),
        ArtifactUnsafeError,
        "reach [1000, 1000]",
        "b1_s8",
    ),
    "a sum over an empty axis": Case(
        lambda r, o: _instructions(
            r,
            ["aten.full.default", [[8, 0], 10], {"dtype": {"dtype": "int64"}}],
            ["aten.sum.dim_IntList", ["$0", [1]], {}],
            ["aten.sub.Tensor", ["$1", 10], {}],
            ["aten.embedding.default", ["@" + WORD, "$2"], {}],
        ),
        ArtifactUnsafeError,
        "reach [-10, -10]",
        "b1_s8",
    ),
    "fill_ after the range was taken": Case(
        lambda r, o: _instructions(
            r,
            ["aten.arange.default", [8], {}],
            ["aten.fill_.Scalar", ["$0", 1000], {}],
            ["aten.embedding.default", ["@" + WORD, "$0"], {}],
        ),
        ArtifactUnsafeError,
        "cannot be bounded",
        "b1_s8",
    ),
    # the other triangle is zeros: 120 - tril(x) reaches row 120 of 120 though x stays in
    # [5, 12] (it was taken for [108, 115])
    "tril's zeros": Case(
        lambda r, o: _instructions(
            r,
            ["aten.arange.start", [5, 13], {}],
            ["aten.expand.default", ["$0", [8, 8]], {}],
            ["aten.tril.default", ["$1"], {}],
            ["aten.rsub.Scalar", ["$2", 120], {}],
            ["aten.embedding.default", ["@" + WORD, "$3"], {}],
        ),
        ArtifactUnsafeError,
        "reach [108, 120]",
        "b1_s8",
    ),
    "as_strided past its storage": Case(
        lambda r, o: _instructions(r, ["aten.as_strided.default", ["@" + LN_W, [64], [2]], {}]),
        ArtifactUnsafeError,
        "out of bounds",
        "b1_s8",
    ),
    # offset 0 of the mask's row in the runtime's input block is input_ids: as token types,
    # token ids read far past a 2-row table (the walk saw the mask's own 0/1 storage)
    "as_strided over an input at an explicit offset": Case(
        lambda r, o: _instructions(
            r,
            ["aten.as_strided.default", ["@attention_mask", [1, 8], [8, 1], 0], {}],
            ["aten.embedding.default", ["@" + TYPES, "$0"], {}],
        ),
        ArtifactUnsafeError,
        "as_strided over input 'attention_mask' with an explicit storage offset 0",
        "b1_s8",
    ),
    # unbounded totals
    "aten.full with a computed size": Case(
        lambda r, o: _instructions(r, ["aten.full.default", [["@input_ids", 2], 0.0], {}]),
        ArtifactUnsafeError,
        "size from a computed value",
        "b1_s8",
    ),
    "aten.arange with a computed end": Case(
        lambda r, o: _instructions(r, ["aten.arange.default", ["@input_ids"], {}]),
        ArtifactUnsafeError,
        "range from a computed value",
        "b1_s8",
    ),
    "broadcast to 4 TiB": Case(
        lambda r, o: _instructions(
            r,
            ["aten.full.default", [[1 << 20, 1], 0.0], {}],
            ["aten.full.default", [[1, 1 << 20], 0.0], {}],
            ["aten.add.Tensor", ["$0", "$1"], {}],
        ),
        ArtifactUnsafeError,
        "makes a tensor of shape [1048576, 1048576]",
        "b1_s8",
    ),
    "400 legal 4 GiB tensors": Case(
        lambda r, o: _instructions(r, *[["aten.full.default", [[GIB], 0.0], {}]] * 400),
        ArtifactUnsafeError,
        "1.6 TiB",
        M,
    ),
    "3,000 buckets": Case(
        lambda r, o: _many_buckets(r, 3000), ArtifactUnsafeError, "3000 buckets", M
    ),
    "140,000 instructions": Case(
        lambda r, o: _too_many_instructions(r),
        ArtifactCorruptError,
        "instructions, more than 131072",
        "b1_s8",
    ),
    # programs that write weights or inputs, or return uninitialised memory
    "aten.fill_ on a weight": Case(
        lambda r, o: _instructions(r, ["aten.fill_.Scalar", ["@" + LN_W, 0.0], {}]),
        ArtifactUnsafeError,
        "writes weight 'model.embeddings.LayerNorm.weight' in place",
        "b1_s8",
    ),
    "aten.max.dim_max writing a weight through its max= argument": Case(
        lambda r, o: _instructions(
            r,
            ["aten.zeros.default", [[1]], {"dtype": {"dtype": "int64"}}],
            ["aten.max.dim_max", ["@" + WORD, 0, False], {"max": "@" + LN_W, "max_values": "$0"}],
        ),
        ArtifactUnsafeError,
        "writes weight 'model.embeddings.LayerNorm.weight' in place",
        "b1_s8",
    ),
    "aten.fill_ through a view of a weight": Case(
        lambda r, o: _instructions(
            r,
            ["aten.slice.Tensor", ["@" + WORD, 0, 0, 2], {}],
            ["aten.fill_.Scalar", ["$0", 0.0], {}],
        ),
        ArtifactUnsafeError,
        "writes weight",
        "b1_s8",
    ),
    "aten.fill_ on an input": Case(
        lambda r, o: _instructions(r, ["aten.fill_.Scalar", ["@input_ids", 0], {}]),
        ArtifactUnsafeError,
        "writes input 'input_ids'",
        "b1_s8",
    ),
    "aten.copy_ (outside the vocabulary)": Case(
        lambda r, o: _instructions(r, ["aten.copy_.default", ["@input_ids", "@input_ids"], {}]),
        ArtifactUnsafeError,
        "outside the vocabulary",
        "b1_s8",
    ),
    "out= into a weight": Case(
        lambda r, o: _instructions(
            r, ["aten.add.out", ["@" + LN_W, "@" + LN_W], {"out": "@" + LN_W}]
        ),
        ArtifactUnsafeError,
        "writes weight",
        "b1_s8",
    ),
    "aten.empty returned": Case(
        lambda r, o: _return_new_value(
            r, ["aten.empty.memory_format", [[1, 8, 64]], {"dtype": {"dtype": "float32"}}]
        ),
        ArtifactUnsafeError,
        "uninitialised memory",
        "b1_s8",
    ),
    "aten.empty computed on and returned": Case(
        lambda r, o: _return_new_value(
            r,
            ["aten.empty.memory_format", [[1, 8, 64]], {"dtype": {"dtype": "float32"}}],
            ["aten.mul.Tensor", ["$0", 2.0], {}],
        ),
        ArtifactUnsafeError,
        "uninitialised memory",
        "b1_s8",
    ),
    "output of another dtype than the manifest declares": Case(
        lambda r, o: edit_manifest(r, lambda m: m["outputs"][0].__setitem__("dtype", "float16")),
        ArtifactCorruptError,
        "output 'last_hidden_state' is float32; the manifest declares float16",
        "b1_s8",
    ),
    "output of the wrong shape": Case(
        lambda r, o: _return_new_value(r, ["aten.zeros.default", [[3]], {}]),
        ArtifactCorruptError,
        "slices axis 0 as the batch",
        "b1_s8",
    ),
    # safetensors that safetensors itself refuses
    "weights with overlapping offsets": Case(
        lambda r, o: _overlapping_weights(r), ArtifactCorruptError, "overlaps", W
    ),
    "weights metadata not strings": Case(
        lambda r, o: _safetensors_metadata(r, {"format": 1}),
        ArtifactCorruptError,
        "map of strings to strings",
        W,
    ),
    "weights with trailing bytes": Case(
        lambda r, o: _trailing_bytes(r), ArtifactCorruptError, "trailing bytes", W
    ),
    # names matched with re.match("...$") accepted a trailing newline
    "op name with a trailing newline": Case(
        lambda r, o: _op_with_newline(r),
        ArtifactUnsafeError,
        "not a kernl or aten op name",
        "b1_s8",
    ),
    "input name with a trailing newline": Case(
        lambda r, o: edit_manifest(
            r, lambda m: m["inputs"][1].__setitem__("name", "attention_mask\n")
        ),
        ArtifactCorruptError,
        "is not an identifier",
        M,
    ),
}


def _decoder(**fields):
    return lambda r, o: edit_extra(r, lambda e: e["decoder"].update(fields))


def _gen_buckets(**fields):
    return lambda r, o: edit_extra(r, lambda e: e["generation_buckets"].update(fields))


def _attention_tile(cache: int):
    """Decode attention on a tile (batch 1, 16-key blocks, 64 chunks) for a `cache`-slot cache."""
    tile = [1, "decode_attention", "attn", 16, 0, 64, 2, 2, cache]
    kernels = {"attention": "triton", "tiles": [tile]}
    return lambda r, o: edit_extra(r, lambda e: e.__setitem__("decode_kernels", kernels))


def _gen_program_with_instructions(root: Path) -> None:
    edit_program(
        root,
        first_program(root),
        lambda p: p["instructions"].append(["aten.zeros.default", [[1]], {}, [0]]),
    )


# A causal-LM artifact is described by manifest.extra (decoder, buckets, decode kernels) and
# its weights under kernl's names; the runtime's decoder reads both.
GEN_CASES = {
    "batches=[-1]": Case(
        _gen_buckets(batches=[-1]), ArtifactCorruptError, "generation_buckets.batches is [-1]", M
    ),
    "a string where a number goes": Case(
        _decoder(hidden_size="64"), ArtifactCorruptError, "decoder.hidden_size is '64'", M
    ),
    "a float where an integer goes": Case(
        _decoder(num_layers=2.0), ArtifactCorruptError, "decoder.num_layers is 2.0", M
    ),
    "an unknown activation": Case(
        _decoder(activation="swish2"), ArtifactCorruptError, "decoder.activation is 'swish2'", M
    ),
    "an unknown family": Case(
        _decoder(family="os.system"), ArtifactCorruptError, "decoder.family", M
    ),
    "a field this reader does not know": Case(  # a newer kernl's, most likely: said so
        _decoder(added_later=1),
        ArtifactCorruptError,
        "unknown fields ['added_later'] (an artifact built by a newer kernl than this one?",
        M,
    ),
    "a missing layer weight": Case(
        lambda r, o: _drop_weight(r, "layers.1.o.weight"),
        ArtifactCorruptError,
        "'layers.1.o.weight', absent",
        M,
    ),
    "an unexpected weight": Case(
        lambda r, o: edit_weights(
            r, lambda t: t.__setitem__("layers.0.extra.weight", t["layers.0.o.bias"].clone())
        ),
        ArtifactCorruptError,
        "not part of the causal-LM description",
        M,
    ),
    "embedding cut to 10 rows": Case(
        lambda r, o: _cut_rows(r, "embed.weight", 10),
        ArtifactCorruptError,
        "'embed.weight' is float32 [10, 64]",
        M,
    ),
    "vocab_size larger than the embedding": Case(
        _decoder(vocab_size=1000), ArtifactCorruptError, "needs float32 [1000, 64]", M
    ),
    "pad id outside the vocabulary": Case(
        _decoder(pad_token_id=5000), ArtifactCorruptError, "pad_token_id is 5000", M
    ),
    "more EOS ids than the runtime holds": Case(
        _decoder(eos_token_ids=list(range(9))), ArtifactCorruptError, "eos_token_ids", M
    ),
    "heads not a multiple of KV heads": Case(
        _decoder(num_kv_heads=3), ArtifactCorruptError, "not a multiple of 3 KV heads", M
    ),
    "missing decoder field": Case(
        lambda r, o: edit_extra(r, lambda e: e["decoder"].pop("head_dim")),
        ArtifactCorruptError,
        "['head_dim'] are missing",
        M,
    ),
    "learned positions shorter than the cache": Case(
        _gen_buckets(kv_lengths=[256]),
        ArtifactCorruptError,
        "128 learned positions cannot index a cache of 256",
        M,
    ),
    "prompt longer than the cache": Case(
        _gen_buckets(prompts=[32]), ArtifactCorruptError, "does not fit the cache", M
    ),
    "unknown decode kernel": Case(
        lambda r, o: edit_extra(
            r, lambda e: e.__setitem__("decode_kernels", {"attention": "os.system"})
        ),
        ArtifactCorruptError,
        "decode_kernels",
        M,
    ),
    "a persistent step config with a field the kernel does not have": Case(
        lambda r, o: edit_extra(
            r,
            lambda e: e.__setitem__(
                "decode_kernels", {"step": "persistent", "step_config": [["__init__", 1]]}
            ),
        ),
        ArtifactCorruptError,
        "step_config",
        M,
    ),
    "a persistent step config out of range": Case(
        lambda r, o: edit_extra(
            r,
            lambda e: e.__setitem__(
                "decode_kernels", {"step": "persistent", "step_config": [["programs_per_sm", 99]]}
            ),
        ),
        ArtifactCorruptError,
        "step_config",
        M,
    ),
    "an attention tile for a kv length with no bucket": Case(
        _attention_tile(48), ArtifactCorruptError, "a tile for a 48-slot cache", M
    ),
    "an attention tile with a negative kv length": Case(
        _attention_tile(-16), ArtifactCorruptError, "DecodeTile out of range", M
    ),
    "KV cache of batch 4096 x 65536 slots": Case(
        _gen_buckets(batches=[4096], kv_lengths=[65536]),
        ArtifactUnsafeError,
        "268435456 tokens of static buffers",
        M,
    ),
    "3,000 generation buckets": Case(
        _gen_buckets(prompts=list(range(1, 3001)), kv_lengths=[3000]),
        ArtifactUnsafeError,
        "generation buckets",
        M,
    ),
    "a program with instructions": Case(
        lambda r, o: _gen_program_with_instructions(r),
        ArtifactCorruptError,
        "holds instructions",
        "prefill_b1_p8",
    ),
}

# Every file opened while a hostile artifact is read: nothing outside the folder may be.
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        # the reader opens the folder by its path, then each name relative to the folder
        # it opened (dir_fd, which the event does not carry): those are kept as they are
        name = os.fsdecode(args[0])
        _OPENED.append(os.path.realpath(name) if os.path.isabs(name) else name)


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
    # a name opened relative to a folder of the artifact is one plain name: never a path
    # that could climb out of it
    relative = [p for p in opened if not os.path.isabs(p)]
    assert all("/" not in p and p not in (".", "..") for p in relative), relative


@pytest.mark.parametrize("name", list(GEN_CASES))
def test_hostile_causal_lm_artifact_is_refused(name, small_causal_lm, tmp_path):
    case = GEN_CASES[name]
    root = copy_artifact(small_causal_lm, tmp_path / "artifact")
    case.mutate(root, tmp_path)
    _refused(lambda: verify_artifact(root), case)
    _refused(lambda: kernl.runtime.load(root, device="cpu"), case)


def test_the_valid_causal_lm_artifact_passes_and_loads(small_causal_lm):
    assert verify_artifact(small_causal_lm).task == "causal-lm"
    model = kernl.runtime.load(small_causal_lm, device="cpu")
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2).shape == (1, 5)


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
    assert str(small_artifact.resolve()) in opened  # the folder, by its path
    assert M in opened and W in opened  # its files, relative to the folder opened
