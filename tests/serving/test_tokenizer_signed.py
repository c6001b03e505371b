"""The tokenizer is part of what a signature vouches for: kernl-compile carries the model
folder's tokenizer.json into the artifact (listed in the manifest: hashed and signed), `kernl
serve` checks those bytes against their hash, and where KERNL_TRUSTED_KEYS pins keys it
refuses a tokenizer copied in after the compile. A tampered tokenizer changed which ids went
in and which text came out of a signed deployment, silently (review, 2026-12-07)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as T

import kernl.compiler
from kernl.artifacts import (
    ArtifactCorruptError,
    ArtifactDestinationError,
    read_manifest,
    verify_artifact,
)
from kernl.artifacts.signing import TRUSTED_KEYS_ENV, generate_keypair
from kernl.serving.tokenizer import TokenizerFileError, load_tokenizer, read_tokenizer_file

BUCKETS = "batch=1 seq=8"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer_writer):
    torch.manual_seed(0)
    config = T.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=80,
        max_position_embeddings=16,
    )
    folder = tmp_path_factory.mktemp("model") / "bert"
    T.BertModel(config).eval().save_pretrained(folder)
    tokenizer_writer(folder)
    return folder


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d / "k", d / "k.pub")
    return d / "k", d / "k.pub"


def _compile(folder, out, **kw):
    return kernl.compiler.compile(
        folder, BUCKETS, out, dtype="fp32", device="cpu", kernels=False, **kw
    )


def _permuted(path) -> None:
    """The same tokenizer with two words' ids swapped: valid, and wrong."""
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab["w0"], vocab["w5"] = vocab["w5"], vocab["w0"]
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def signed(model_folder, keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("signed") / "bert.kernl"
    _compile(model_folder, out, sign_key=keys[0])
    return out


def test_the_compile_carries_the_folders_tokenizer_hashed_and_signed(
    signed, model_folder, keys, monkeypatch
):
    tok = signed / "tokenizer.json"
    assert tok.read_bytes() == (model_folder / "tokenizer.json").read_bytes()
    assert "tokenizer.json" in read_manifest(signed).files
    verify_artifact(signed, trusted_keys=[keys[1]])
    from kernl.compiler.inspect_report import inspect_artifact, render_text

    assert "tokenizer.json" in render_text(inspect_artifact(signed))  # kernl inspect's files
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keys[1]))
    assert load_tokenizer(signed)(["w0 w5"])[0]["input_ids"] == [2, 4, 9, 3]


def test_a_carried_tokenizer_edited_after_the_compile_is_refused(signed, keys, tmp_path):
    root = tmp_path / "bert.kernl"
    shutil.copytree(signed, root)
    _permuted(root / "tokenizer.json")
    with pytest.raises(TokenizerFileError, match="does not match its sha256"):
        read_tokenizer_file(root)
    with pytest.raises(ArtifactCorruptError, match="tokenizer.json does not match"):
        verify_artifact(root, trusted_keys=[keys[1]])


@pytest.fixture(scope="module")
def bare_folder(model_folder, tmp_path_factory):
    """The model folder without its tokenizer."""
    folder = tmp_path_factory.mktemp("bare") / "bert"
    shutil.copytree(model_folder, folder)
    (folder / "tokenizer.json").unlink()
    return folder


def test_a_tokenizer_copied_in_is_refused_where_keys_are_pinned(
    bare_folder, keys, tmp_path, monkeypatch, tokenizer_writer
):
    root = tmp_path / "bert.kernl"
    _compile(bare_folder, root, sign_key=keys[0])
    assert not (root / "tokenizer.json").exists()
    tokenizer_writer(root)  # by hand, after the compile and its signature
    assert load_tokenizer(root) is not None  # no keys pinned: read as before
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keys[1]))
    verify_artifact(root)  # the artifact itself is intact
    with pytest.raises(TokenizerFileError, match="copied into the artifact after the compile"):
        load_tokenizer(root)


def test_a_recompile_takes_over_the_same_tokenizer_copied_in(bare_folder, model_folder, tmp_path):
    root = tmp_path / "bert.kernl"
    _compile(bare_folder, root)
    shutil.copy(model_folder / "tokenizer.json", root / "tokenizer.json")  # as the docs said
    _compile(model_folder, root)  # the same bytes: now the artifact's own file
    assert "tokenizer.json" in read_manifest(root).files
    verify_artifact(root)


def test_a_recompile_refuses_a_different_copied_in_tokenizer_before_any_work(
    bare_folder, model_folder, tmp_path, monkeypatch, tokenizer_writer
):
    root = tmp_path / "bert.kernl"
    _compile(bare_folder, root)
    tokenizer_writer(root)
    _permuted(root / "tokenizer.json")
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    from kernl.compiler import api

    def no_work(*args, **kwargs):
        raise AssertionError("the compile started")

    monkeypatch.setattr(api, "_compile", no_work)
    with pytest.raises(ArtifactDestinationError, match="differs from the model folder's"):
        _compile(model_folder, root)
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before


def test_a_recompile_from_a_model_object_keeps_the_carried_tokenizer(
    model_folder, bare_folder, tmp_path
):
    """A carried tokenizer is the artifact's own file: a recompile from a model object (no
    folder to take one from) or from a folder without one dropped it, without a word."""
    root = tmp_path / "bert.kernl"
    _compile(model_folder, root)
    want = (root / "tokenizer.json").read_bytes()
    model = T.BertModel.from_pretrained(model_folder).eval()
    _compile(model, root)
    assert (root / "tokenizer.json").read_bytes() == want
    assert "tokenizer.json" in read_manifest(root).files
    _compile(bare_folder, root)
    assert "tokenizer.json" in read_manifest(root).files
    verify_artifact(root)


def test_kernl_optimize_save_to_keeps_a_carried_tokenizer(model_folder, tmp_path):
    """save_to= copies a cached artifact over the folder: its carried tokenizer stays there,
    as a file of the folder (the cached artifact has none)."""
    from kernl.artifacts.writer import carry_kept_files

    root = tmp_path / "bert.kernl"
    _compile(model_folder, root)
    into = tmp_path / "new"
    into.mkdir()
    assert carry_kept_files(root, into) == ["tokenizer.json"]
    assert (into / "tokenizer.json").read_bytes() == (root / "tokenizer.json").read_bytes()


def test_a_linked_tokenizer_in_the_destination_is_refused_before_any_work(
    bare_folder, model_folder, tmp_path, monkeypatch
):
    root = tmp_path / "bert.kernl"
    _compile(bare_folder, root)
    (root / "tokenizer.json").symlink_to(model_folder / "tokenizer.json")
    from kernl.compiler import api

    def no_work(*args, **kwargs):
        raise AssertionError("the compile started")

    monkeypatch.setattr(api, "_compile", no_work)
    with pytest.raises(ArtifactDestinationError, match="symbolic link kept in the artifact"):
        _compile(model_folder, root)


def _plant(root, tokenizer_writer) -> None:
    """What someone who may write the folder but holds no key can do: a tokenizer of their
    own, its hash written into the manifest's file list."""
    import hashlib

    import msgpack

    tokenizer_writer(root)
    _permuted(root / "tokenizer.json")
    manifest = msgpack.unpackb((root / "manifest.msgpack").read_bytes(), raw=False)
    digest = hashlib.sha256((root / "tokenizer.json").read_bytes()).hexdigest()
    manifest["files"]["tokenizer.json"] = digest
    (root / "manifest.msgpack").write_bytes(msgpack.packb(manifest, use_bin_type=True))


def test_a_signed_recompile_never_signs_a_kept_tokenizer_its_key_did_not_sign(
    bare_folder, model_folder, keys, tmp_path, tokenizer_writer
):
    """A tokenizer planted with its hash in the manifest was kept by a signed recompile from a
    folder without one (or a model object) and signed: a pinned-key deployment then served
    the planted vocabulary (review, 2026-12-07)."""
    root = tmp_path / "bert.kernl"
    _compile(bare_folder, root, sign_key=keys[0])
    _plant(root, tokenizer_writer)
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    with pytest.raises(ArtifactDestinationError, match="not vouched for by the key you sign"):
        _compile(bare_folder, root, sign_key=keys[0])
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before
    unsigned = tmp_path / "unsigned.kernl"  # compiled without a key: nothing vouches for it
    _compile(model_folder, unsigned)
    model = T.BertModel.from_pretrained(model_folder).eval()
    with pytest.raises(ArtifactDestinationError, match="artifact is not signed"):
        _compile(model, unsigned, sign_key=keys[0])
    _compile(model_folder, unsigned, sign_key=keys[0])  # from the folder that holds it
    _compile(model, unsigned, sign_key=keys[0])  # now signed by this key: kept
    assert (unsigned / "tokenizer.json").read_bytes() == (
        model_folder / "tokenizer.json"
    ).read_bytes()
    verify_artifact(unsigned, trusted_keys=[keys[1]])


def test_a_recompile_of_another_model_does_not_keep_the_artifacts_tokenizer(model_folder, tmp_path):
    root = tmp_path / "bert.kernl"
    _compile(model_folder, root)
    other = T.BertModel(
        T.BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=30,
            max_position_embeddings=16,
        )
    ).eval()
    with pytest.raises(ArtifactDestinationError, match="a bert of vocabulary 80, not of this"):
        _compile(other, root)
    assert "tokenizer.json" in read_manifest(root).files  # nothing lost


def test_an_edited_carried_tokenizer_is_not_dropped_by_a_recompile_from_the_folder(
    model_folder, tmp_path
):
    root = tmp_path / "bert.kernl"
    _compile(model_folder, root)
    _permuted(root / "tokenizer.json")  # the user's edit, after the compile
    edited = (root / "tokenizer.json").read_bytes()
    with pytest.raises(ArtifactDestinationError, match="was edited after the compile"):
        _compile(model_folder, root)
    assert (root / "tokenizer.json").read_bytes() == edited


def test_a_tokenizer_linked_out_of_the_model_folder_is_not_carried(model_folder, tmp_path, recwarn):
    """A cloned repository's tokenizer.json linking to a user's file: the compile copied the
    target into the artifact, listed and signed it (review, 2026-12-07)."""
    folder = tmp_path / "bert"
    shutil.copytree(model_folder, folder)
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(secret)
    root = tmp_path / "bert.kernl"
    with pytest.warns(UserWarning, match="outside the model folder: not carried"):
        _compile(folder, root)
    assert not (root / "tokenizer.json").exists()
    assert "tokenizer.json" not in read_manifest(root).files
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").write_text("not json")
    said = []
    _compile(folder, root, progress=said.append)
    assert any("is not a tokenizers file" in line for line in said)
    assert not (root / "tokenizer.json").exists()


def test_the_hugging_face_caches_snapshot_links_are_carried(model_folder, tmp_path):
    """The local cache's snapshot files link to its blobs, inside the cached repository."""
    repo = tmp_path / "models--org--bert"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(model_folder, snapshot)
    (repo / "blobs").mkdir()
    blob = repo / "blobs" / "f00d"
    shutil.move(snapshot / "tokenizer.json", blob)
    (snapshot / "tokenizer.json").symlink_to("../../blobs/f00d")
    root = tmp_path / "bert.kernl"
    _compile(snapshot, root)
    assert (root / "tokenizer.json").read_bytes() == blob.read_bytes()
    local_dir = tmp_path / "downloaded"  # huggingface_hub's older local_dir: links to blobs
    shutil.copytree(model_folder, local_dir)
    (local_dir / "tokenizer.json").unlink()
    (local_dir / "tokenizer.json").symlink_to(blob)
    _compile(local_dir, tmp_path / "local.kernl")
    assert (tmp_path / "local.kernl" / "tokenizer.json").read_bytes() == blob.read_bytes()


def test_a_model_id_of_another_model_does_not_keep_the_artifacts_tokenizer(
    model_folder, tmp_path, monkeypatch
):
    """The model's type and vocabulary were read from `<id>/config.json`, which a model id of
    the local Hugging Face cache does not have there: a recompile from another model's id kept
    (and signed) the artifact's tokenizer (review, 2026-12-07)."""
    import huggingface_hub

    from kernl.compiler.tokenizer_file import artifact_tokenizer

    root = tmp_path / "bert.kernl"
    _compile(model_folder, root)
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-gpt2" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 256}))
    (cache / "models--acme--tiny-gpt2" / "refs").mkdir()
    (cache / "models--acme--tiny-gpt2" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ArtifactDestinationError, match="a bert of vocabulary 80, not of this gpt2"):
        artifact_tokenizer(root, "acme/tiny-gpt2")
    assert artifact_tokenizer(root, model_folder) is not None  # its own model: kept
