"""The causal-LM bucket syntax: `"batch=1,4,8 prompt=16:1024 cache=2048"`.

batch   batch buckets; each gets a static KV cache, allocated once at load (all but the
        smallest share one storage: requests run one at a time).
prompt  prefill buckets (prompt lengths).
cache   KV-cache lengths. The largest is the cache size; with several (e.g. `cache=256:2048`)
        each is a decode bucket, so a step attends only to the smallest length that holds
        the tokens so far. Default: one length, the largest prompt bucket times two. A decode
        step after a prompt bucket P attends to more than P slots, so a length below the
        cache size and no longer than the shortest prompt bucket would never run (nor be
        validated): it is refused.

Each axis takes the same items as the encoder buckets: numbers and power-of-two ranges lo:hi,
within the limits a reader of artifacts enforces (checked here, before the model is loaded)."""

from __future__ import annotations

from kernl.artifacts.generation import GenerationBuckets

from ...buckets import (
    BucketSyntaxError,
    check_axis,
    check_count,
    check_tokens,
    dict_axes,
    parse_axes,
)

AXES = ("batch", "prompt", "cache")
EXAMPLE = "batch=1,4,8 prompt=16:1024 cache=2048"


def parse_generation_buckets(spec: str) -> GenerationBuckets:
    if "=" not in spec and "x" in spec.lower():
        raise BucketSyntaxError(f'{spec!r}: causal-lm buckets name their axes, e.g. "{EXAMPLE}"')
    axes = parse_axes(spec, AXES, ("batch", "prompt"), EXAMPLE, "causal-lm")
    return checked(
        GenerationBuckets(
            axes["batch"], axes["prompt"], axes.get("cache", [2 * max(axes["prompt"])])
        )
    )


def checked(b: GenerationBuckets) -> GenerationBuckets:
    check_axis("batch", b.batches)
    check_axis("prompt", b.prompts)
    check_axis("cache", b.kv_lengths)
    check_count(len(b.prefill_shapes()) + len(b.decode_shapes()), "generation buckets")
    for batch in b.batches:
        check_tokens(batch * b.cache_len, f"batch {batch} x a cache of {b.cache_len} slots")
    if max(b.prompts) > b.cache_len:
        raise BucketSyntaxError(
            f"the longest prompt bucket ({max(b.prompts)}) does not fit the cache "
            f"({b.cache_len}); use cache>={max(b.prompts)}"
        )
    shortest = min(b.prompts)
    # The cache size is kept even when no decode step reaches it (prompt=8 cache=8): it bounds
    # prompt + new tokens, and validation records that bucket as not validated.
    dead = sorted(k for k in b.kv_lengths if k <= shortest and k < b.cache_len)
    if dead:
        raise BucketSyntaxError(
            f"cache length{'s' if len(dead) > 1 else ''} {', '.join(map(str, dead))} would "
            f"never be used: the first decode step after the shortest prompt bucket "
            f"({shortest}) already attends to {shortest + 1} slots; use cache lengths above "
            f"{shortest}"
        )
    return b


def as_generation_buckets(spec) -> GenerationBuckets:
    """Accept the string syntax, a GenerationBuckets, or a dict of its fields."""
    if isinstance(spec, str):
        return parse_generation_buckets(spec)
    if isinstance(spec, GenerationBuckets):
        spec = spec.to_dict()
    if isinstance(spec, dict):
        axes = dict_axes(spec, AXES, ("batches", "prompts", "kv_lengths"), "causal-lm")
        cache = axes.get("cache") or [2 * max(axes["prompt"])]
        return checked(GenerationBuckets(axes["batch"], axes["prompt"], cache))
    raise BucketSyntaxError(
        f'causal-lm buckets must be a string like "batch=1,4 prompt=16:1024 cache=2048", '
        f"not {type(spec).__name__}"
    )
