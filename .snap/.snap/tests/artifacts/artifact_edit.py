"""Helpers that build a small real artifact and edit its files the way an attacker or a
broken disk would. `resign` recomputes every file hash and the manifest checksum, so an
edit is seen by the checks that come after the hashes (a malicious but consistent artifact)."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from kernl.artifacts import pack_manifest
from kernl.artifacts.writer import chunk_count, sha256_file, sha256_range

SMALL_BERT = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=120,
    max_position_embeddings=80,
)


def compile_small(out: Path, buckets: str = "batch=1,2 seq=8", kernels: bool = True):
    """A random 2-layer BERT compiled in CPU mode; returns (model, report)."""
    import torch
    import transformers as T

    import kernl.compiler

    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(**SMALL_BERT)).eval()
    report = kernl.compiler.compile(
        model, buckets, out, dtype="fp32", device="cpu", kernels=kernels
    )
    return model, report


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def read_msgpack(path: Path) -> Any:
    return msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)


def write_msgpack(path: Path, data: Any) -> None:
    path.write_bytes(msgpack.packb(data, use_bin_type=True))


def edit_manifest(root: Path, edit: Callable[[dict], None], resign_files: bool = True) -> None:
    """Apply `edit` to the manifest map, then write it back with a valid checksum."""
    m = read_msgpack(root / "manifest.msgpack")
    if resign_files:
        _rehash(root, m)
    edit(m)
    (root / "manifest.msgpack").write_bytes(pack_manifest(m))


def edit_program(root: Path, rel: str, edit: Callable[[dict], None]) -> None:
    p = read_msgpack(root / rel)
    edit(p)
    write_msgpack(root / rel, p)
    resign(root)


def resign(root: Path) -> None:
    """Recompute every listed file's sha256 (where the file is readable) and the checksum."""
    edit_manifest(root, lambda m: None)


def _rehash(root: Path, m: dict) -> None:
    for rel in m["files"]:
        path = root / rel
        if path.is_symlink() and path.resolve().is_file():
            path = path.resolve()
        elif not path.is_file() or path.is_symlink():
            continue
        m["files"][rel] = sha256_file(path)
        entry = m.get("extra", {}).get("file_chunks", {}).get(rel)
        if isinstance(entry, dict) and isinstance(entry.get("chunk_bytes"), int):
            rechunk(path, entry)


def rechunk(path: Path, entry: dict) -> None:
    """Recompute a chunk entry (extra.file_chunks[rel]) for the file as it is now."""
    step = entry["chunk_bytes"]
    entry["bytes"] = size = path.stat().st_size
    entry["sha256"] = [sha256_range(path, i * step, step) for i in range(chunk_count(size, step))]


def first_program(root: Path) -> str:
    return read_msgpack(root / "manifest.msgpack")["buckets"][0]["program"]


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_safetensors(path: Path, header: dict, payload: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


def compile_small_causal_lm(out: Path, buckets: str = "batch=1,2 prompt=8 cache=16"):
    """A random 2-layer GPT-2 (learned positions, biases, tied embeddings) compiled for
    generation in CPU mode."""
    import sys

    import kernl.compiler

    sys.path.insert(0, str(Path(__file__).parent.parent))
    from generation.tiny_models import tiny_model

    return kernl.compiler.compile(
        tiny_model("gpt2"), buckets, out, dtype="fp32", device="cpu", task="causal-lm"
    )


def edit_weights(root: Path, edit: Callable[[dict], None]) -> None:
    """Load weights.safetensors as tensors, apply `edit` to the dict, write it back (a valid
    safetensors file) and re-sign the artifact."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(root / "weights.safetensors"))
    edit(tensors)
    save_file(tensors, str(root / "weights.safetensors"), metadata={"format": "pt"})
    resign(root)


def edit_extra(root: Path, edit: Callable[[dict], None]) -> None:
    """Edit the manifest's `extra` (a causal-LM description lives there) and re-sign."""
    edit_manifest(root, lambda m: edit(m["extra"]))


def insert_instructions(root: Path, rel: str, instructions: list[list]) -> list[int]:
    """Put `instructions` ([op, args, kwargs]) first in a program, each with a fresh output
    value; "$0", "$1", ... in their arguments name the outputs of the earlier ones. Returns
    the new value ids."""
    ids: list[int] = []

    def resolve(a):
        if isinstance(a, str) and a.startswith("$"):
            return {"v": ids[int(a[1:])]}
        if isinstance(a, list):
            return [resolve(x) for x in a]
        if isinstance(a, dict):
            return {k: resolve(v) for k, v in a.items()}
        return a

    def edit(p):
        new = []
        for op, args, kwargs in instructions:
            ids.append(p["num_values"])
            p["num_values"] += 1
            new.append([op, resolve(args), resolve(kwargs), [ids[-1]]])
        p["instructions"][:0] = new

    edit_program(root, rel, edit)
    return ids


def program_ids(root: Path, rel: str) -> tuple[dict[str, int], dict[str, int]]:
    """(input name -> value id, weight name -> value id) of a program."""
    p = read_msgpack(root / rel)
    return dict(p["inputs"]), {name: int(v) for v, name in p["weights"].items()}
