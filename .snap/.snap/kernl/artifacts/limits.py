"""Upper bounds a reader enforces before it allocates anything an artifact asks for.

An artifact is untrusted input: sizes in it (file lengths, bucket shapes, the sizes a program
passes to `aten.empty` or `aten.full`) are checked against these limits at read time, so a
hostile or corrupt artifact is refused with an `ArtifactUnsafeError` instead of exhausting
memory. The defaults are far above what a real transformer bucket needs and far below a
terabyte."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReadLimits:
    max_manifest_bytes: int = 16 << 20
    max_program_bytes: int = 64 << 20
    max_safetensors_header_bytes: int = 64 << 20
    max_batch: int = 1 << 16
    max_seq: int = 1 << 20
    # Static input buffers hold batch * seq tokens per input; 16M tokens is 128 MiB of int64.
    max_bucket_tokens: int = 1 << 24
    # One tensor a program creates from static sizes (empty/full/zeros/expand/arange...):
    # 16G elements (32 GiB in fp16) holds the largest legitimate logits tensor (batch 64 x
    # seq 512 x a 250k vocabulary is 8G elements) and refuses terabyte requests.
    max_tensor_elements: int = 1 << 34
    # Per program, and over all of an artifact's programs: every instruction is checked (and
    # shape-inferred) at verify and load, so the count bounds that work too.
    max_instructions: int = 1 << 17
    max_total_instructions: int = 1 << 21
    max_values: int = 1 << 24
    # Buckets (encoder buckets, or causal-LM prefill + decode shapes): each is a program, a
    # graph and static buffers. Real artifacts have tens.
    max_buckets: int = 1024
    # The memory plan of an artifact (weights + static buffers + the activation pool + KV
    # caches): above any single GPU sold today (192 GB), so a legal artifact passes on any
    # host and 400 tensors of 4 GiB do not; at load the device's free memory is the bound.
    max_memory_bytes: int = 256 << 30
    # Integer weights (position_ids, token_type_ids buffers) are read by the checker to bound
    # the indices they feed; larger integer tensors are treated as unbounded.
    max_index_weight_bytes: int = 64 << 20
    # Chunk hashes over all files (manifest extra.file_chunks): 64Ki chunks of 16 MiB is
    # 1 TiB of files; each is a job on the hashing pool.
    max_file_chunks: int = 1 << 16


DEFAULT_LIMITS = ReadLimits()
