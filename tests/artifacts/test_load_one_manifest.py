"""load() reads the manifest once, and every file through one descriptor opened once: the
manifest the whole-artifact check passes is the one the model is built from, and the files
hashed are the files served, even where a recompile replaces the folder, or a writer a file,
while load() runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from artifact_edit import copy_artifact, edit_manifest

import kernl.runtime
from kernl.artifacts import ArtifactUnsafeError
from kernl.artifacts.opened import ArtifactFiles
from kernl.artifacts.schema import MANIFEST_FILE


def test_the_manifest_load_checks_is_the_one_it_serves_with(small_artifact, tmp_path, monkeypatch):
    """A manifest that passes the manifest-alone checks but not the whole-artifact ones (an
    input_ids pad value past the vocabulary: padded positions would read outside the
    embedding) is read first; then the folder gets a valid one. load() read the manifest
    again for its whole-artifact check, checked the valid one and served the other."""
    root = copy_artifact(small_artifact, tmp_path / "artifact")
    valid = (root / MANIFEST_FILE).read_bytes()
    edit_manifest(root, lambda m: m["inputs"][0].__setitem__("pad_value", 5000))
    real_read = ArtifactFiles.read
    reads: list[str] = []

    def read_then_replace(files, rel: str, what: str, limit: int | None = None) -> bytes:
        data = real_read(files, rel, what, limit)
        if rel == MANIFEST_FILE:
            reads.append(rel)
            (root / MANIFEST_FILE).write_bytes(valid)  # rewritten in place meanwhile
        return data

    monkeypatch.setattr(ArtifactFiles, "read", read_then_replace)
    with pytest.raises(ArtifactUnsafeError, match="padded with 5000"):
        kernl.runtime.load(root, device="cpu")
    assert reads == [MANIFEST_FILE]


def _weights_of(root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(root / "weights.safetensors"))


@pytest.mark.parametrize("old_folder", ["kept", "removed"])
def test_a_folder_replaced_while_loading_is_read_as_it_was(
    small_artifact, small_causal_lm, tmp_path, monkeypatch, old_folder
):
    """A compile to the same path replaces the whole folder while load() runs (here just
    before the weights are read). By path, the weights came from the new folder and the
    manifest from the old: a model whose range checks were made for another table. The
    folder is opened once: the load reads the artifact it started with."""
    root = copy_artifact(small_artifact, tmp_path / "a")
    expected = _weights_of(root)
    real_read_weights = kernl.runtime.read_weights

    def replaced_first(files, **kwargs):
        root.rename(tmp_path / "old")
        copy_artifact(small_causal_lm, root)  # another model, another task
        if old_folder == "removed":
            shutil.rmtree(tmp_path / "old")
        return real_read_weights(files, **kwargs)

    monkeypatch.setattr(kernl.runtime, "read_weights", replaced_first)
    model = kernl.runtime.load(root, device="cpu")
    assert model.manifest.task != "causal-lm"
    assert sorted(model.weights) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(model.weights[name], tensor), name
    assert model(input_ids=torch.tensor([[5, 6, 119]])).last_hidden_state.shape == (1, 3, 64)


def test_a_weights_file_swapped_after_its_hash_began_is_not_what_is_served(
    small_artifact, tmp_path, monkeypatch
):
    """A writer of the folder swaps the weights file (a rename over it) once load() has
    started hashing it. By path, the hash read one file and the weights reader another, and
    the load served weights no hash had checked (a signed artifact too). Both read the file
    opened once: the swap changes nothing the load uses."""
    root = copy_artifact(small_artifact, tmp_path / "a")
    expected = _weights_of(root)
    tampered = {name: t.clone() for name, t in expected.items()}
    name = next(n for n, t in tampered.items() if t.dtype.is_floating_point)
    tampered[name].fill_(7.0)
    real_read_weights = kernl.runtime.read_weights

    def swapped_first(files, **kwargs):
        from safetensors.torch import save_file

        save_file(tampered, str(tmp_path / "tampered.safetensors"))
        os.replace(tmp_path / "tampered.safetensors", root / "weights.safetensors")
        return real_read_weights(files, **kwargs)

    monkeypatch.setattr(kernl.runtime, "read_weights", swapped_first)
    model = kernl.runtime.load(root, device="cpu", verify=True)
    assert torch.equal(model.weights[name], expected[name])
    assert torch.equal(_weights_of(root)[name], tampered[name])  # the swap did happen
