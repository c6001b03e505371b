"""Property-based fuzzing of the reader, bounded for CI (derandomized, a few hundred cases).

Raw: flip, overwrite, insert or cut bytes of one file of a valid artifact. The reader must
refuse with an ArtifactError, never another exception, and never accept altered content
(every file is hashed; the manifest carries its own checksum).

Structured: edit one node of a decoded manifest, program or weights header (any msgpack
value, or a deletion) and re-sign the artifact, as a malicious author would. `verify_artifact`
and `kernl.runtime.load` may accept the result or refuse it with an ArtifactError; any other
exception type is a reader bug."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest
from artifact_edit import (
    copy_artifact,
    first_program,
    read_msgpack,
    read_safetensors,
    resign,
    write_msgpack,
    write_safetensors,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernl.runtime
from kernl.artifacts import ArtifactError, pack_manifest, read_manifest, verify_artifact
from kernl.artifacts.schema import MANIFEST_CHECKSUM_KEY

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def work(small_artifact, tmp_path_factory) -> Path:
    """One copy per module; each example restores what it changed."""
    return copy_artifact(small_artifact, tmp_path_factory.mktemp("fuzz") / "artifact")


def _files(root: Path) -> list[str]:
    return ["manifest.msgpack", first_program(root), "weights.safetensors"]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {rel: (root / rel).read_bytes() for rel in _files(root)}


def _restore(root: Path, saved: dict[str, bytes]) -> None:
    for rel, data in saved.items():
        (root / rel).write_bytes(data)


def _outcome(root: Path) -> tuple[bool, bool]:
    """(verify accepted, load accepted); any exception but ArtifactError propagates."""
    results = []
    for check in (verify_artifact, lambda r: kernl.runtime.load(r, device="cpu")):
        try:
            check(root)
            results.append(True)
        except ArtifactError:
            results.append(False)
    return results[0], results[1]


mutation = st.tuples(
    st.sampled_from(["flip", "overwrite", "insert", "cut"]),
    st.floats(min_value=0, max_value=1, exclude_max=True),
    st.integers(min_value=0, max_value=255),
    st.binary(min_size=1, max_size=16),
)


@FUZZ
@given(which=st.integers(min_value=0, max_value=2), mutation=mutation)
def test_raw_mutation_is_refused_or_harmless(work, which, mutation):
    kind, where, byte, blob = mutation
    rel = _files(work)[which]
    saved = _snapshot(work)
    original_manifest = read_manifest(work)
    data = bytearray(saved[rel])
    i = int(where * len(data))
    if kind == "flip":
        data[i] ^= 1 << (byte % 8)
    elif kind == "overwrite":
        data[i] = byte
    elif kind == "insert":
        data[i:i] = blob
    else:
        del data[i:]
    try:
        (work / rel).write_bytes(bytes(data))
        verified, loaded = _outcome(work)
        if verified or loaded:
            # Accepted: only if nothing that matters changed.
            if rel == "manifest.msgpack":
                assert read_manifest(work) == original_manifest
            else:
                assert bytes(data) == saved[rel], f"{rel} altered by {kind} at {i} was accepted"
    finally:
        _restore(work, saved)


leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.binary(max_size=8),
    st.sampled_from(["float32", "int64", "aten.add.Tensor", "kernl.linear", "../x", "/etc/passwd"]),
    st.sampled_from([0, 1, -1, 2, 7, 1 << 20, 1 << 40]),
)
value = st.recursive(
    leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _locations(node: Any, skip: str = "") -> list[tuple[Any, Any]]:
    """Every (container, key) in a decoded msgpack tree."""
    out = []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for k, v in items:
        if k == skip:
            continue
        out.append((node, k))
        out.extend(_locations(v, skip))
    return out


json_value = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(1 << 64), max_value=1 << 64),
        st.floats(allow_nan=False),
        st.text(max_size=12),
        st.sampled_from(["F32", "I64", "BOOL", "F128"]),
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _edit(tree: Any, data, skip: str = "", values=value) -> None:
    where = _locations(tree, skip)
    # A uniform pick: hypothesis's integers favour small values, which would mostly hit the
    # first fields of a file.
    container, key = where[data.draw(st.randoms(use_true_random=False)).randrange(len(where))]
    if data.draw(st.booleans()):
        del container[key]
    else:
        container[key] = data.draw(values)


@FUZZ
@given(which=st.integers(min_value=0, max_value=2), data=st.data())
def test_resigned_structured_edit_raises_only_artifact_errors(work, which, data):
    rel = _files(work)[which]
    saved = _snapshot(work)
    try:
        if rel == "manifest.msgpack":
            m = read_msgpack(work / rel)
            _edit(m, data, skip=MANIFEST_CHECKSUM_KEY)
            # pack_manifest signs a dict whose extra is a map; any other edit goes in unsigned
            signable = isinstance(m, dict) and isinstance(m.get("extra") or {}, dict)
            (work / rel).write_bytes(pack_manifest(m) if signable else msgpack.packb(m))
        elif rel.endswith(".msgpack"):
            p = read_msgpack(work / rel)
            _edit(p, data)
            write_msgpack(work / rel, p)
            resign(work)
        else:
            header, payload = read_safetensors(work / rel)
            _edit(header, data, values=json_value)
            write_safetensors(work / rel, header, payload)
            resign(work)
        _outcome(work)  # accepted or ArtifactError; anything else fails the test
    finally:
        _restore(work, saved)


@pytest.fixture(scope="module")
def gen_work(small_causal_lm, tmp_path_factory) -> Path:
    return copy_artifact(small_causal_lm, tmp_path_factory.mktemp("fuzz-gen") / "artifact")


GEN_FUZZ = settings(FUZZ, max_examples=100)


@GEN_FUZZ
@given(data=st.data())
def test_resigned_causal_lm_description_edit_raises_only_artifact_errors(gen_work, data):
    """One node of a causal-LM description (decoder, buckets, decode kernels) edited and the
    manifest re-signed: accepted or an ArtifactError, never a KeyError/TypeError."""
    saved = (gen_work / "manifest.msgpack").read_bytes()
    try:
        m = read_msgpack(gen_work / "manifest.msgpack")
        section = data.draw(st.sampled_from(["decoder", "generation_buckets", "decode_kernels"]))
        _edit(m["extra"][section], data)
        (gen_work / "manifest.msgpack").write_bytes(pack_manifest(m))
        _outcome(gen_work)
    finally:
        (gen_work / "manifest.msgpack").write_bytes(saved)


# Ops an inserted instruction may call, with plausible arguments: what a crafted program can
# ask of the runtime within the vocabulary.
FUZZ_OPS = [
    "aten.add.Tensor",
    "aten.mul.Tensor",
    "aten.embedding.default",
    "aten.index_select.default",
    "aten.gather.default",
    "aten.full.default",
    "aten.expand.default",
    "aten.view.default",
    "aten.as_strided.default",
    "aten.fill_.Scalar",
    "aten.empty.memory_format",
    "aten.slice.Tensor",
    "aten.cumsum.default",
    "aten.arange.default",
    "aten.cat.default",
    "aten.index.Tensor",
    "aten.select.int",
    "aten.repeat.default",
    "aten.matmul.default",
    "aten.new_empty.default",
    "aten.to.dtype",
    "aten.remainder.Scalar",
    "aten.clamp.default",
]


@FUZZ
@given(data=st.data())
def test_an_inserted_instruction_is_refused_or_runs(work, data):
    """A crafted instruction first in a program (its result maybe returned), re-signed. The
    checker must refuse it with an ArtifactError, or accept it and then the first call must
    run: whatever verify and load accept, a call does not crash on."""
    import torch

    rel = first_program(work)
    saved = _snapshot(work)
    p = read_msgpack(work / rel)
    known = [*p["inputs"].values(), *(int(k) for k in p["weights"])]
    ref = st.sampled_from(known).map(lambda v: {"v": v})
    small = st.integers(min_value=-3, max_value=130)
    arg = st.one_of(
        ref,
        small,
        st.floats(-4, 4),
        st.lists(st.one_of(small, ref), max_size=3),
        st.sampled_from([{"dtype": "int64"}, {"dtype": "float32"}, 1 << 40]),
    )
    op = data.draw(st.sampled_from(FUZZ_OPS))
    args = data.draw(st.lists(arg, min_size=1, max_size=4))
    returned = data.draw(st.booleans())
    try:
        new = p["num_values"]
        p["num_values"] += 1
        p["instructions"].insert(0, [op, args, {}, [new]])
        if returned:
            p["outputs"][0] = new
        write_msgpack(work / rel, p)
        resign(work)
        try:
            model = kernl.runtime.load(work, device="cpu")
        except ArtifactError:
            with pytest.raises(ArtifactError):
                verify_artifact(work)
            return
        verify_artifact(work)
        model(input_ids=torch.tensor([[5, 6, 7]]))
    finally:
        _restore(work, saved)
