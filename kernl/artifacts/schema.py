"""The on-disk format, version 1: what each file holds, as dataclasses.

An artifact is a folder:

    manifest.msgpack            Manifest (below), including the sha256 of every other file
                                (and of each 16 MiB chunk of the large ones, extra.file_chunks)
    weights.safetensors         every weight, once, in the layout the programs use
    programs/<bucket>.msgpack   one Program per bucket: a flat instruction list
    kernels/<name>.cubin        (optional) compiled kernel binaries

Nothing is pickled; every file is msgpack, safetensors or an opaque binary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

FORMAT_VERSION = 1
# An encoder artifact whose forward takes its inputs in another order than HF's usual one
# records it (POSITIONAL_INPUTS_KEY): a reader that ignores it reads `model(ids, x)` wrongly,
# so such an artifact is version 2, which older readers refuse (docs/reliability.md's policy).
ORDERED_INPUTS_FORMAT_VERSION = 2
# Readers accept exactly the versions listed here; a newer artifact needs a newer kernl.
SUPPORTED_FORMAT_VERSIONS = (1, 2)

# Where a description holds a field or a choice this reader does not know: most likely a newer
# kernl's addition, not damage (kernl's version string does not tell them apart)
NEWER_KERNL_HINT = (
    " (an artifact built by a newer kernl than this one? read it with that kernl, or "
    "recompile it with this one)"
)

MANIFEST_FILE = "manifest.msgpack"
WEIGHTS_FILE = "weights.safetensors"
# Key in `Manifest.extra` holding the sha256 of the rest of the manifest (see writer.py).
MANIFEST_CHECKSUM_KEY = "manifest_sha256"
# Key in `Manifest.extra`: for files larger than the writer's threshold, the sha256 of each
# fixed-size chunk, {path: {"chunk_bytes": int, "bytes": int, "sha256": [hex, ...]}}, in
# addition to the file's whole sha256 in `files`. Readers that know it check the chunks (in
# parallel) instead of the whole-file hash; older readers ignore it and check `files`.
FILE_CHUNKS_KEY = "file_chunks"
# Key in `Manifest.extra` (encoders): the model's forward's positional parameters, in order, up
# to the last input served, where they are not (input_ids, attention_mask, token_type_ids):
# RoCBert's (input_ids, input_shape_ids, input_pronunciation_ids, attention_mask, ...). A call's
# positional inputs are read in this order; absent, in the usual one.
POSITIONAL_INPUTS_KEY = "positional_inputs"
# The chunk sizes a reader accepts (powers of two): small enough for a test artifact, large
# enough that a 2 GB file is not a million hashes.
MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = 1 << 30
PROGRAMS_DIR = "programs"
# Hugging Face's fast-tokenizer file, for `kernl serve`'s text requests. kernl-compile carries
# the model folder's into the artifact, listed in `files` (hashed and signed); one copied in
# later is not listed: a deployment that pins keys refuses to tokenize with it.
TOKENIZER_FILE = "tokenizer.json"
# Large multilingual tokenizers are ~35 MB; anything this size is not a tokenizer.
MAX_TOKENIZER_BYTES = 256 << 20
KERNELS_DIR = "kernels"

_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")  # fullmatch: "$" would accept "x\n"


@dataclass(frozen=True, order=True)
class Bucket:
    """One static input shape the artifact serves: `batch` rows of `seq` tokens."""

    batch: int
    seq: int

    @property
    def name(self) -> str:
        return f"b{self.batch}_s{self.seq}"

    def holds(self, batch: int, seq: int) -> bool:
        return batch <= self.batch and seq <= self.seq

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def pick_bucket(buckets: Sequence[Bucket], batch: int, seq: int) -> Bucket | None:
    """The one rule of the format for which bucket serves (batch, seq): the first that holds
    it by fewest tokens, then smallest batch; None when none does. The runtime, the serving
    batcher and the compiler's reports all ask here."""
    for bucket in sorted(buckets, key=lambda b: (b.tokens, b.batch)):
        if bucket.holds(batch, seq):
            return bucket
    return None


def pick_size(sizes: Sequence[int], n: int) -> int | None:
    """The same rule along one axis (generation's batch, prompt and KV-length buckets): the
    smallest size that holds n."""
    return min((s for s in sizes if s >= n), default=None)


@dataclass
class InputSpec:
    """A model input. `pad_value` fills padded positions; `default` says what a caller may
    omit: "required", "zeros" or "ones" (a tensor of that value with input_ids' shape)."""

    name: str
    dtype: str
    pad_value: int
    default: str = "required"


@dataclass
class OutputSpec:
    """A model output; `seq_axis` is the axis that follows the sequence length (None if the
    output is per sequence, like pooler_output)."""

    name: str
    dtype: str
    batch_axis: int = 0
    seq_axis: int | None = None


@dataclass
class BucketEntry:
    bucket: Bucket
    program: str  # path relative to the artifact root
    max_abs_error: float | None = None
    compile_seconds: float | None = None


@dataclass
class KernelBinary:
    """A compiled kernel and what is needed to launch it without Triton's JIT."""

    name: str
    file: str  # relative path of the cubin
    function: str  # symbol inside the cubin
    num_warps: int
    shared_mem: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    format_version: int
    kernl_version: str
    torch_version: str
    triton_version: str
    cuda_version: str | None
    target: str  # "cpu" or "cuda"
    gpu_name: str | None
    compute_capability: str | None  # "9.0"
    dtype: str  # float16 | bfloat16 | float32
    task: str
    model_type: str
    model_source: str
    model_config: dict[str, Any]
    inputs: list[InputSpec]
    outputs: list[OutputSpec]
    buckets: list[BucketEntry]
    files: dict[str, str]  # relative path -> sha256 hex
    kernels: list[KernelBinary] = field(default_factory=list)
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Manifest:
        d = dict(d)
        d["inputs"] = _records(InputSpec, d["inputs"], "inputs")
        d["outputs"] = _records(OutputSpec, d["outputs"], "outputs")
        d["buckets"] = [
            BucketEntry(**{**x, "bucket": Bucket(**x["bucket"])})
            for x in _records(dict, d["buckets"], "buckets")
        ]
        d["kernels"] = _records(KernelBinary, d.get("kernels", []), "kernels")
        return Manifest(**d)

    def bucket_list(self) -> list[Bucket]:
        return [e.bucket for e in self.buckets]


def is_safe_relative_path(path: str) -> bool:
    """True for 'a/b.ext'-style paths made of plain names: no '..', no absolute paths."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        return False
    parts = path.split("/")
    return all(p not in ("", ".", "..") and _SAFE_NAME.fullmatch(p) for p in parts)


def _records(cls: type, items: Any, what: str) -> list:
    """`items` (a list of maps) as `cls` records; an entry that is not a map, or whose fields
    are not the record's, is named by its index and fields (the reader said "KernelBinary.
    __init__() missing 1 required positional argument")."""
    if not isinstance(items, list):
        raise ValueError(f"{what} is not a list")
    out = []
    for i, x in enumerate(items):
        if not isinstance(x, dict):
            raise ValueError(f"{what} entry {i} is not a map")
        if cls is dict:
            out.append(x)
            continue
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(map(str, set(x) - set(known)))
        missing = sorted(
            n
            for n, f in known.items()
            if n not in x and f.default is MISSING and f.default_factory is MISSING
        )
        if unknown or missing:
            said = [f"unknown field(s) {unknown}"] * bool(unknown)
            said += [f"missing field(s) {missing}"] * bool(missing)
            raise ValueError(f"{what} entry {i}: {'; '.join(said)}")
        out.append(cls(**x))
    return out
