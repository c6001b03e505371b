"""Chunk hashes (manifest extra.file_chunks): the writer records the sha256 of each
fixed-size chunk of a large file beside its whole-file sha256, and the reader checks the
chunks on a thread pool. Here the writer's threshold and chunk size are lowered to 4 KiB so
a small artifact's weights get tens of chunks. A chunk list that does not match, does not
cover the file exactly, or is malformed is refused by `verify_artifact`, `kernl verify` and
`load()` alike; an artifact from the writer before chunk hashes still verifies and loads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgpack
import pytest
import torch
from artifact_edit import compile_small, copy_artifact, edit_manifest, read_msgpack, resign
from click.testing import CliRunner

import kernl.runtime
from kernl.artifacts import (
    ArtifactCorruptError,
    ArtifactUnsafeError,
    read_manifest,
    verify_artifact,
    verify_files,
)
from kernl.artifacts import writer as writer_module
from kernl.artifacts.signing import generate_keypair, sign_artifact
from kernl.compiler.cli import main

W = "weights.safetensors"
CHUNK = 4 << 10


@pytest.fixture(scope="module")
def chunked(tmp_path_factory) -> Path:
    """A small BERT artifact written with 4 KiB chunk hashes for every file above 4 KiB."""
    out = tmp_path_factory.mktemp("chunked") / "bert.kernl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(writer_module, "CHUNK_THRESHOLD", CHUNK)
        mp.setattr(writer_module, "CHUNK_BYTES", CHUNK)
        compile_small(out)
    return out


def _chunks(root: Path) -> dict:
    return read_msgpack(root / "manifest.msgpack")["extra"]["file_chunks"]


def test_the_writer_records_chunk_hashes_beside_the_whole_file_hash(chunked):
    manifest = read_msgpack(chunked / "manifest.msgpack")
    data = (chunked / W).read_bytes()
    entry = manifest["extra"]["file_chunks"][W]
    assert entry["chunk_bytes"] == CHUNK and entry["bytes"] == len(data)
    pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    assert len(pieces) > 10
    assert entry["sha256"] == [hashlib.sha256(p).hexdigest() for p in pieces]
    # The whole-file sha256 stays (readers from before chunk hashes check it).
    assert manifest["files"][W] == hashlib.sha256(data).hexdigest()
    for rel in manifest["files"]:  # exactly the files above the threshold are chunked
        assert (rel in manifest["extra"]["file_chunks"]) == ((chunked / rel).stat().st_size > CHUNK)


def test_a_chunked_artifact_verifies_and_loads(chunked):
    assert verify_artifact(chunked).model_type == "bert"
    model = kernl.runtime.load(chunked, device="cpu")
    assert model(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state.shape == (1, 3, 64)
    result = CliRunner().invoke(main, ["verify", str(chunked)])
    assert result.exit_code == 0 and result.output.startswith("OK"), result.output


@pytest.mark.parametrize("workers", [1, 3, 16])
def test_any_pool_size_checks_every_chunk(chunked, tmp_path, workers):
    manifest = read_manifest(chunked)
    verify_files(chunked, manifest, workers=workers)
    root = copy_artifact(chunked, tmp_path / "a")
    n = len(_chunks(root)[W]["sha256"])
    _flip_byte(root / W, (n - 1) * CHUNK + 1)  # in the last chunk: the last job to run
    with pytest.raises(ArtifactCorruptError, match=rf"{W} chunk {n - 1} \(bytes"):
        verify_files(root, manifest, workers=workers)


def test_an_artifact_from_the_writer_before_chunk_hashes_verifies_and_loads(chunked, tmp_path):
    """No extra.file_chunks, as the earlier writer wrote: the whole-file sha256 is checked."""
    root = copy_artifact(chunked, tmp_path / "old")
    edit_manifest(root, lambda m: m["extra"].pop("file_chunks"), resign_files=False)
    assert "file_chunks" not in read_msgpack(root / "manifest.msgpack")["extra"]
    assert verify_artifact(root).model_type == "bert"
    model = kernl.runtime.load(root, device="cpu")
    assert model(input_ids=torch.tensor([[5, 6]])).last_hidden_state.shape == (1, 2, 64)
    _flip_byte(root / W, 5000)
    _refused_everywhere(root, ArtifactCorruptError, f"{W} does not match its sha256")


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def _edit_chunks(root: Path, edit) -> None:
    """Edit extra.file_chunks[W] and write the manifest back with a valid checksum (the
    files themselves are not rehashed: the edit is what the reader sees)."""
    edit_manifest(root, lambda m: edit(m["extra"]["file_chunks"][W]), resign_files=False)


def _truncate(root: Path, n: int) -> None:
    path = root / W
    path.write_bytes(path.read_bytes()[:-n])


HEX = "ab" * 32
CASES = {
    "a chunk hash does not match": (
        lambda r: _edit_chunks(r, lambda e: e["sha256"].__setitem__(3, HEX)),
        ArtifactCorruptError,
        rf"{W} chunk 3 \(bytes 12288\.\.16384\) does not match its sha256",
    ),
    "a byte of the file flipped": (
        lambda r: _flip_byte(r / W, 5 * CHUNK + 17),
        ArtifactCorruptError,
        rf"{W} chunk 5 \(bytes",
    ),
    "a missing chunk": (
        lambda r: _edit_chunks(r, lambda e: e["sha256"].pop()),
        ArtifactCorruptError,
        "chunk hashes do not cover its",
    ),
    "a missing chunk, size edited to match": (
        lambda r: _edit_chunks(
            r, lambda e: (e["sha256"].pop(), e.__setitem__("bytes", len(e["sha256"]) * CHUNK))
        ),
        ArtifactCorruptError,
        "its chunk hashes in the manifest cover",
    ),
    "a chunk list too long": (
        lambda r: _edit_chunks(r, lambda e: e["sha256"].append(HEX)),
        ArtifactCorruptError,
        "chunk hashes do not cover its",
    ),
    "a chunk list over the limit": (
        lambda r: _edit_chunks(r, lambda e: e["sha256"].extend([HEX] * (1 << 16))),
        ArtifactUnsafeError,
        "more than 65536 chunk hashes",
    ),
    "a non-hex chunk digest": (
        lambda r: _edit_chunks(r, lambda e: e["sha256"].__setitem__(0, "zz" * 32)),
        ArtifactCorruptError,
        "sha256 of chunk 0 is not 64 hex digits",
    ),
    "an upper-case chunk digest": (
        lambda r: _edit_chunks(r, lambda e: e["sha256"].__setitem__(1, e["sha256"][1].upper())),
        ArtifactCorruptError,
        "sha256 of chunk 1 is not 64 hex digits",
    ),
    "a chunk digest with a newline": (
        lambda r: _edit_chunks(r, lambda e: e["sha256"].__setitem__(2, e["sha256"][2] + "\n")),
        ArtifactCorruptError,
        "sha256 of chunk 2 is not 64 hex digits",
    ),
    "a chunk digest that is bytes": (
        lambda r: _edit_chunks(
            r, lambda e: e["sha256"].__setitem__(0, bytes.fromhex(e["sha256"][0]))
        ),
        ArtifactCorruptError,
        "sha256 of chunk 0 is not 64 hex digits",
    ),
    "the file truncated by a chunk": (
        lambda r: _truncate(r, CHUNK),
        ArtifactCorruptError,
        "its chunk hashes in the manifest cover",
    ),
    "the file truncated, chunks rehashed, size kept": (
        lambda r: (
            _truncate(r, 10),
            resign(r),
            _edit_chunks(r, lambda e: e.__setitem__("bytes", e["bytes"] + 10)),
        ),
        ArtifactCorruptError,
        "its chunk hashes in the manifest cover",
    ),
    "a chunk size that is not a power of two": (
        lambda r: _edit_chunks(r, lambda e: e.__setitem__("chunk_bytes", 5000)),
        ArtifactCorruptError,
        "chunk size 5000 is not a power of two",
    ),
    "a chunk size of one byte": (
        lambda r: _edit_chunks(r, lambda e: e.__setitem__("chunk_bytes", 1)),
        ArtifactCorruptError,
        "chunk size 1 is not",
    ),
    "a chunk size that is a bool": (
        lambda r: _edit_chunks(r, lambda e: e.__setitem__("chunk_bytes", True)),
        ArtifactCorruptError,
        "chunk size True is not",
    ),
    "a negative file size": (
        lambda r: _edit_chunks(r, lambda e: e.__setitem__("bytes", -1)),
        ArtifactCorruptError,
        "file size -1 is not a size",
    ),
    "an entry without its size": (
        lambda r: _edit_chunks(r, lambda e: e.pop("bytes")),
        ArtifactCorruptError,
        "is not a map of",
    ),
    "an entry with an unknown key": (
        lambda r: _edit_chunks(r, lambda e: e.__setitem__("offset", 0)),
        ArtifactCorruptError,
        "is not a map of",
    ),
    "chunks of a file not in the file list": (
        lambda r: edit_manifest(
            r,
            lambda m: m["extra"]["file_chunks"].__setitem__("../x", m["extra"]["file_chunks"][W]),
            resign_files=False,
        ),
        ArtifactCorruptError,
        "not in the file list",
    ),
    "file_chunks not a map": (
        lambda r: edit_manifest(
            r, lambda m: m["extra"].__setitem__("file_chunks", [W]), resign_files=False
        ),
        ArtifactCorruptError,
        "file_chunks is not a map",
    ),
}


def _refused_everywhere(root: Path, error: type, what: str) -> None:
    with pytest.raises(error, match=what):
        verify_artifact(root)
    with pytest.raises(error, match=what):
        kernl.runtime.load(root, device="cpu")
    result = CliRunner().invoke(main, ["verify", str(root)])
    assert result.exit_code == 1 and "INVALID" in result.output, result.output


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_chunk_list_is_refused(name, chunked, tmp_path):
    mutate, error, what = CASES[name]
    root = copy_artifact(chunked, tmp_path / "a")
    mutate(root)
    _refused_everywhere(root, error, what)


def test_the_signature_covers_the_chunk_hashes(chunked, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    generate_keypair(keys / "k", keys / "k.pub")
    root = copy_artifact(chunked, tmp_path / "signed")
    sign_artifact(root, keys / "k")
    assert verify_artifact(root, trusted_keys=[keys / "k.pub"]).model_type == "bert"
    # A chunk swapped and its hash (and the manifest checksum) recomputed: consistent, so
    # only the signature tells.
    _flip_byte(root / W, 2 * CHUNK)
    resign(root)
    verify_artifact(root)
    before = msgpack.unpackb((chunked / "manifest.msgpack").read_bytes(), strict_map_key=False)
    assert _chunks(root)[W]["sha256"][2] != before["extra"]["file_chunks"][W]["sha256"][2]
    with pytest.raises(ArtifactUnsafeError, match="modified after signing"):
        verify_artifact(root, trusted_keys=[keys / "k.pub"])
    with pytest.raises(ArtifactUnsafeError, match="modified after signing"):
        kernl.runtime.load(root, device="cpu", trusted_keys=[keys / "k.pub"])


def test_load_runs_no_code_before_its_hash_and_fails_on_weights_hashed_meanwhile(
    chunked, tmp_path, monkeypatch
):
    """load() checks the code (programs, kernel binaries, every file but the weights) before
    building the model; the weights' hashes are checked while the model is built (its graphs
    captured), and a mismatch there still fails the load."""
    import kernl.runtime as runtime

    built = []
    real_open = runtime._open
    monkeypatch.setattr(runtime, "_open", lambda *a: built.append(1) or real_open(*a))
    program = next(rel for rel in read_manifest(chunked).files if rel.endswith(".msgpack"))
    code = copy_artifact(chunked, tmp_path / "code")
    _flip_byte(code / program, 10)
    with pytest.raises(ArtifactCorruptError, match="does not match its sha256"):
        kernl.runtime.load(code, device="cpu")
    assert built == []  # refused before the model was built
    data = copy_artifact(chunked, tmp_path / "data")
    _flip_byte(data / W, 5000)
    with pytest.raises(ArtifactCorruptError, match=rf"{W} chunk 1 \(bytes"):
        kernl.runtime.load(data, device="cpu")
    assert built == [1]  # built while its weights were hashed, then refused
