"""The model folder's tokenizer.json, carried into the artifact as one of its own files:
listed in the manifest, hashed and signed with the rest, so that `kernl serve` tokenizes text
with it out of the box and a deployment that pins keys can trust it (a tokenizer edited after
signing changes which ids go in and which text comes out)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kernl.artifacts import ArtifactDestinationError
from kernl.artifacts.schema import MANIFEST_FILE, MAX_TOKENIZER_BYTES, TOKENIZER_FILE
from kernl.artifacts.writer import listed_files


def model_tokenizer(source: str, say=None) -> bytes | None:
    """The bytes of the tokenizer.json beside the model's config.json (a local folder, or a
    model id in the local Hugging Face cache), or None where it has none."""
    local = Path(source).expanduser()
    if local.is_dir():
        path = local / TOKENIZER_FILE
    else:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        try:
            found = try_to_load_from_cache(source, TOKENIZER_FILE)
        except Exception:  # not a model id (a mistyped path): the trace names what is wrong
            return None
        if not isinstance(found, str):
            return None
        path = Path(found)
    if not path.is_file():  # the cache's snapshot files are links to its blobs: followed
        return None
    size = path.stat().st_size
    if size > MAX_TOKENIZER_BYTES:
        if say is not None:
            say(f"{path} is {size} bytes, over what kernl serve reads: not carried")
        return None
    return path.read_bytes()


def _listed(root: Path) -> dict:
    """The file list of the artifact at `root` ({} where there is none)."""
    try:
        return listed_files(root)
    except (OSError, ArtifactDestinationError):
        return {}  # none, or not a kernl manifest: the writer's own check says so


def artifact_tokenizer(out: str | os.PathLike) -> bytes | None:
    """The tokenizer.json the artifact at `out` carries (listed in its manifest), for a
    recompile from a model object, which has no folder to take one from: kept, hashed and
    signed again, not dropped. Refused before any work where it no longer matches its hash."""
    root = Path(out).expanduser()
    digest = _listed(root).get(TOKENIZER_FILE)
    path = root / TOKENIZER_FILE
    if digest is None or path.is_symlink() or not path.is_file():
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ArtifactDestinationError(
            f"{path} does not match its sha256 in the artifact's manifest (edited after the "
            "compile), and the new artifact would carry it: put the tokenizer you want in the "
            "model folder and compile from there, or remove it, then compile again"
        )
    return data


def check_kept_tokenizer(out: str | os.PathLike, data: bytes) -> None:
    """A tokenizer.json copied into an existing artifact at `out` by hand (or linked), other
    than the model's: the new artifact carries the model's, and would have to drop the copy
    (its commit refuses a kept file the artifact has too). Refused before any work."""
    root = Path(out).expanduser()
    kept = root / TOKENIZER_FILE
    if not (root / MANIFEST_FILE).is_file() or TOKENIZER_FILE in _listed(root):
        return
    if kept.is_symlink():
        raise ArtifactDestinationError(
            f"{kept} is a symbolic link kept in the artifact folder, and the new artifact "
            f"carries the model folder's {TOKENIZER_FILE} (hashed and signed with it): remove "
            "the link, then compile again"
        )
    if not kept.is_file() or kept.read_bytes() == data:
        return
    raise ArtifactDestinationError(
        f"{kept} was copied into the artifact there and differs from the model folder's "
        f"{TOKENIZER_FILE}, which the new artifact carries (hashed and signed with it): move "
        "it away (or copy the one you want into the model folder), then compile again"
    )
