"""Text requests, when the artifact folder carries a `tokenizer.json` (Hugging Face's fast
tokenizer file) and the `tokenizers` package is installed. Optional: without either, the
server takes token ids only. transformers is never needed.

The file is read as the artifact's own: a regular file directly in the folder, never through
a symbolic link (an artifact copied from elsewhere could point it at any file the server can
read), and of bounded size. One that kernl-compile carried in from the model folder is listed
in the manifest: its bytes must match their sha256 there (and so the signature, where keys are
pinned). One copied in by hand is not: where KERNL_TRUSTED_KEYS pins signing keys it is
refused, since nothing vouches for it and it decides which ids go in and which text comes
out."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from kernl.artifacts import read_manifest
from kernl.artifacts.schema import MANIFEST_FILE, MAX_TOKENIZER_BYTES, TOKENIZER_FILE
from kernl.artifacts.signing import trusted_keys_from_env

from .protocol import Tokenize


class TokenizerFileError(ValueError):
    """The artifact's tokenizer.json is there but is not a file kernl will read."""


def read_tokenizer_file(artifact: str | Path) -> str | None:
    """The text of the artifact's tokenizer.json, or None when the folder has none. Raises
    TokenizerFileError for a symlink, a non-regular file, an oversized or non-UTF-8 one."""
    artifact = Path(artifact).expanduser()  # as load() reads it: "~/bert.kernl" had none
    path = artifact / TOKENIZER_FILE
    if not os.path.lexists(path):
        return None
    try:
        # O_NOFOLLOW: the check and the read are one step, so the file cannot be swapped for
        # a link between them.
        fd = os.open(
            path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        )
    except OSError as e:
        why = "a symbolic link" if path.is_symlink() else f"unreadable ({e.strerror})"
        raise TokenizerFileError(
            f"{path} is {why}; the tokenizer must be a regular file inside the artifact folder "
            "(copy it there instead of linking it)"
        ) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise TokenizerFileError(f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > MAX_TOKENIZER_BYTES:
            raise TokenizerFileError(
                f"{path} is {info.st_size} bytes, over the {MAX_TOKENIZER_BYTES >> 20} MiB a "
                "tokenizer file may take"
            )
        data = f.read(MAX_TOKENIZER_BYTES + 1)
    _check_vouched_for(artifact, path, data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerFileError(f"{path} is not UTF-8 text: {e}") from None


def _check_vouched_for(artifact: str | Path, path: Path, data: bytes) -> None:
    keys = trusted_keys_from_env()
    listed = None
    if os.path.lexists(Path(artifact) / MANIFEST_FILE) or keys:  # a bare folder: nothing listed
        # with keys pinned, the manifest read is the signed one (a bad signature is refused)
        listed = read_manifest(artifact, trusted_keys=keys or None).files.get(TOKENIZER_FILE)
    if listed is not None:
        if hashlib.sha256(data).hexdigest() != listed:
            raise TokenizerFileError(
                f"{path} does not match its sha256 in the manifest: it was edited after the "
                "compile (compile again from a model folder holding the tokenizer you want)"
            )
    elif keys:
        raise TokenizerFileError(
            f"{path} was copied into the artifact after the compile: nothing vouches for it, "
            "and KERNL_TRUSTED_KEYS pins signing keys. Compile (and sign) from a model folder "
            "holding it: kernl-compile carries the folder's tokenizer.json into the artifact, "
            "hashed and signed; or remove it to serve token ids only"
        )


def load_tokenizer(artifact: str | Path) -> Tokenize | None:
    """A function from texts to per-text inputs (input_ids, attention_mask, token_type_ids),
    or None when the artifact has no tokenizer file or `tokenizers` is missing. Raises
    TokenizerFileError when the file is one kernl does not read (see read_tokenizer_file)."""
    text = read_tokenizer_file(artifact)
    if text is None:
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises its own Exception type for a malformed file
        raise TokenizerFileError(f"{Path(artifact) / TOKENIZER_FILE}: {e}") from None
    tokenizer.no_padding()  # the batcher pads; each text keeps its own length
    # Nor the file's truncation, as Hugging Face's tokenizer(text) ignores it: a file saved
    # with {"max_length": 128} (all-MiniLM-L6-v2's, a 512-position model) cut every text at
    # 128 tokens, silently (0.927 cosine to sentence-transformers on a 201-token text), and
    # skipped the size check of texts before tokenizing. A text too long for every bucket is
    # refused, as the model's own forward would refuse it.
    tokenizer.no_truncation()

    def tokenize(texts: list[str]) -> list[dict[str, list[int]]]:
        return [
            {"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}
            for e in tokenizer.encode_batch(texts)
        ]

    return tokenize


def load_detokenizer(artifact: str | Path) -> Callable[[list[int]], str] | None:
    """A function from token ids to text (special tokens skipped), or None like
    load_tokenizer: what a generation answer's "text" is made with."""
    text = read_tokenizer_file(artifact)
    if text is None:
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as e:
        raise TokenizerFileError(f"{Path(artifact) / TOKENIZER_FILE}: {e}") from None

    def detokenize(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    return detokenize
