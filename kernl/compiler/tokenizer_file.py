"""The model folder's tokenizer.json, carried into the artifact as one of its own files:
listed in the manifest, hashed and signed with the rest, so that `kernl serve` tokenizes text
with it out of the box and a deployment that pins keys can trust it (a tokenizer edited after
signing changes which ids go in and which text comes out)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import msgpack

from kernl.artifacts import ArtifactDestinationError
from kernl.artifacts.schema import MANIFEST_FILE, MAX_TOKENIZER_BYTES, TOKENIZER_FILE
from kernl.artifacts.writer import listed_files


def _tell(message: str, progress) -> None:
    # compile() from Python passes no progress: a tokenizer left out is then a warning, not
    # a line nobody reads (text requests fail on it later, at serve time)
    if progress is not None:
        progress(message)
    else:
        warnings.warn(message, stacklevel=4)


def _model_file(source: str, name: str) -> Path | None:
    """The model's file `name` (a local folder's, or a model id's in the local Hugging Face
    cache), or None where it has none."""
    local = Path(source).expanduser()
    if local.is_dir():
        return local / name
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(source, name)
    except Exception:  # not a model id (a mistyped path): the trace names what is wrong
        return None
    return Path(found) if isinstance(found, str) else None


def model_tokenizer(source: str, progress=None) -> bytes | None:
    """The bytes of the tokenizer.json beside the model's config.json (a local folder, or a
    model id in the local Hugging Face cache), or None where it has none or it is not carried
    (said through `progress`, else warned)."""
    path = _model_file(source, TOKENIZER_FILE)
    if path is None or not path.is_file():
        return None
    outside = _link_out_of_the_model(path)
    if outside is not None:
        _tell(
            f"{path} is a link to {outside}, outside the model folder: not carried into the "
            "artifact (a signed artifact would vouch for a file the folder does not hold); "
            "copy the tokenizer into the folder to carry it",
            progress,
        )
        return None
    size = path.stat().st_size
    if size > MAX_TOKENIZER_BYTES:
        _tell(f"{path} is {size} bytes, over what kernl serve reads: not carried", progress)
        return None
    data = path.read_bytes()
    try:
        parsed = json.loads(data)
        ok = isinstance(parsed, dict) and "model" in parsed
    except ValueError:
        ok = False
    if not ok:
        _tell(f"{path} is not a tokenizers file (JSON with a model): not carried", progress)
        return None
    return data


def _link_out_of_the_model(path: Path) -> Path | None:
    """Where `path` links to outside its model folder (None where it does not): the local
    Hugging Face cache's snapshot files (and older local_dir downloads' large files) link to
    a repository's blobs, which count as inside; a link elsewhere (a cloned repository's
    tokenizer.json pointing at a user's key file) is not followed into an artifact."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    folder = path.parent.resolve()
    inside = [folder]
    if folder.parent.name == "snapshots":  # models--org--name/snapshots/<revision>/
        inside.append(folder.parent.parent)
    if target.parent.name == "blobs" and target.parent.parent.name.startswith("models--"):
        return None  # a cache blob: huggingface_hub's older local_dir downloads link there
    return None if any(target.is_relative_to(d) for d in inside) else target


def _listed(root: Path) -> dict:
    """The file list of the artifact at `root` ({} where there is none)."""
    try:
        return listed_files(root)
    except (OSError, ArtifactDestinationError):
        return {}  # none, or not a kernl manifest: the writer's own check says so


def _model_identity(model_or_path: Any) -> tuple[str | None, int | None]:
    """(model_type, vocab_size) of the model being compiled, None where unknown."""
    if isinstance(model_or_path, (str, os.PathLike)):
        path = _model_file(os.fspath(model_or_path), "config.json")
        try:
            config = json.loads(path.read_text()) if path is not None else None
        except (OSError, ValueError):
            return None, None
        if not isinstance(config, dict):
            return None, None
        return config.get("model_type"), config.get("vocab_size")
    config = getattr(model_or_path, "config", None)
    return getattr(config, "model_type", None), getattr(config, "vocab_size", None)


def artifact_tokenizer(
    out: str | os.PathLike, model_or_path: Any = None, signing_key: Any = None
) -> bytes | None:
    """The tokenizer.json the artifact at `out` carries (listed in its manifest), for a
    recompile from a model object or a folder without one: kept, hashed and signed again, not
    dropped. Refused before any work where it no longer matches its hash, where it belongs to
    another model (model type or vocabulary), and, for a signed compile (`signing_key`, a
    loaded private key), where the artifact there is not signed by that key: signing would
    vouch for a tokenizer nobody checked (one planted with its hash in the manifest)."""
    root = Path(out).expanduser()
    path = root / TOKENIZER_FILE
    try:
        manifest_bytes = (root / MANIFEST_FILE).read_bytes()
        manifest = msgpack.unpackb(manifest_bytes, raw=False)
        digest = manifest["files"].get(TOKENIZER_FILE)
    except Exception:  # none, or not a kernl manifest: the writer's own check says so
        return None
    if not isinstance(digest, str) or path.is_symlink() or not path.is_file():
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ArtifactDestinationError(
            f"{path} does not match its sha256 in the artifact's manifest (edited after the "
            "compile), and the new artifact would carry it: put the tokenizer you want in the "
            "model folder and compile from there, or remove it, then compile again"
        )
    model_type, vocab = _model_identity(model_or_path)
    config = manifest.get("model_config")
    was_type = manifest.get("model_type")
    was_vocab = config.get("vocab_size") if isinstance(config, dict) else None
    if (model_type and was_type and model_type != was_type) or (
        isinstance(vocab, int) and isinstance(was_vocab, int) and vocab != was_vocab
    ):
        raise ArtifactDestinationError(
            f"{path} is the tokenizer of the artifact there, a {was_type} of vocabulary "
            f"{was_vocab}, not of this {model_type} of vocabulary {vocab}; the new artifact "
            "would carry it for text requests: compile from a model folder that holds this "
            "model's tokenizer.json, or move it away, then compile again"
        )
    if signing_key is not None:
        from kernl.artifacts.errors import ArtifactCorruptError, ArtifactUnsafeError
        from kernl.artifacts.signing import check_signature, public_key_of

        try:
            check_signature(root, manifest_bytes, [public_key_of(signing_key)])
        except (ArtifactUnsafeError, ArtifactCorruptError) as e:
            raise ArtifactDestinationError(
                f"{path} would be kept from the artifact there and signed, but that artifact "
                f"is not vouched for by the key you sign with ({e}): compile from a model "
                "folder that holds the tokenizer, or move it away, then compile again"
            ) from None
    return data


def check_kept_tokenizer(out: str | os.PathLike, data: bytes) -> None:
    """A tokenizer.json in an existing artifact at `out` that the new artifact (which carries
    the model folder's `data`) would drop: copied in by hand (or linked), or the artifact's
    own edited after its compile. Refused before any work, so that nothing is lost."""
    root = Path(out).expanduser()
    kept = root / TOKENIZER_FILE
    if not (root / MANIFEST_FILE).is_file():
        return
    digest = _listed(root).get(TOKENIZER_FILE)
    if kept.is_symlink():
        raise ArtifactDestinationError(
            f"{kept} is a symbolic link kept in the artifact folder, and the new artifact "
            f"carries the model folder's {TOKENIZER_FILE} (hashed and signed with it): remove "
            "the link, then compile again"
        )
    if not kept.is_file():
        return
    have = kept.read_bytes()
    if have == data or (digest is not None and hashlib.sha256(have).hexdigest() == digest):
        return  # the model's own, or the artifact's as compiled: replaced, nothing lost
    how = (
        "was edited after the compile (it no longer matches its sha256 in the manifest)"
        if digest is not None
        else "was copied into the artifact there"
    )
    raise ArtifactDestinationError(
        f"{kept} {how} and differs from the model folder's {TOKENIZER_FILE}, which the new "
        "artifact carries (hashed and signed with it): move it away (or copy the one you "
        "want into the model folder), then compile again"
    )
