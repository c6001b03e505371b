"""load() reads the manifest once: the manifest the whole-artifact check passes is the one
the model is built from, even where a recompile replaces the folder while load() runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from artifact_edit import copy_artifact, edit_manifest

import kernl.runtime
from kernl.artifacts import ArtifactUnsafeError, reader
from kernl.artifacts.schema import MANIFEST_FILE


def test_the_manifest_load_checks_is_the_one_it_serves_with(small_artifact, tmp_path, monkeypatch):
    """A manifest that passes the manifest-alone checks but not the whole-artifact ones (an
    input_ids pad value past the vocabulary: padded positions would read outside the
    embedding) is read first; then the folder gets a valid one. load() read the manifest
    again for its whole-artifact check, checked the valid one and served the other."""
    root = copy_artifact(small_artifact, tmp_path / "artifact")
    valid = (root / MANIFEST_FILE).read_bytes()
    edit_manifest(root, lambda m: m["inputs"][0].__setitem__("pad_value", 5000))
    real_read_inside = reader.read_inside
    reads: list[str] = []

    def read_then_replace(where: Path, rel: str, what: str, limit: int) -> bytes:
        data = real_read_inside(where, rel, what, limit)
        if rel == MANIFEST_FILE:
            reads.append(rel)
            (root / MANIFEST_FILE).write_bytes(valid)  # the recompile lands meanwhile
        return data

    monkeypatch.setattr(reader, "read_inside", read_then_replace)
    with pytest.raises(ArtifactUnsafeError, match="padded with 5000"):
        kernl.runtime.load(root, device="cpu")
    assert reads == [MANIFEST_FILE]
