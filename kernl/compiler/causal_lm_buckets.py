"""The causal-LM bucket syntax: `"batch=1,4,8 prompt=16:1024 cache=2048"`.

batch   batch buckets; each gets one static KV cache, allocated once at load.
prompt  prefill buckets (prompt lengths).
cache   KV-cache lengths. The largest is the cache size; with several (e.g. `cache=256:2048`)
        each is a decode bucket, so a step attends only to the smallest length that holds
        the tokens so far. Default: one length, the largest prompt bucket times two.

Each axis takes the same items as the encoder buckets: numbers and power-of-two ranges lo:hi."""

from __future__ import annotations

from kernl.artifacts.generation import GenerationBuckets

from .buckets import BucketSyntaxError, _parse_axis

AXES = ("batch", "prompt", "cache")


def parse_generation_buckets(spec: str) -> GenerationBuckets:
    axes: dict[str, list[int]] = {}
    for part in spec.replace(";", " ").split():
        if "=" not in part:
            raise BucketSyntaxError(f"{part!r}: expected AXIS=VALUES, e.g. prompt=16:1024")
        name, values = part.split("=", 1)
        name = name.strip().lower()
        if name not in AXES:
            raise BucketSyntaxError(
                f"unknown axis {name!r} for causal-lm; the axes are {', '.join(AXES)} "
                f'(e.g. "batch=1,4,8 prompt=16:1024 cache=2048")'
            )
        if name in axes:
            raise BucketSyntaxError(f"axis {name!r} is given twice")
        axes[name] = _parse_axis(name, values)
    missing = [a for a in ("batch", "prompt") if a not in axes]
    if missing:
        raise BucketSyntaxError(f"missing axis {', '.join(missing)} in {spec!r}")
    return checked(
        GenerationBuckets(
            axes["batch"], axes["prompt"], axes.get("cache", [2 * max(axes["prompt"])])
        )
    )


def checked(b: GenerationBuckets) -> GenerationBuckets:
    if max(b.prompts) > b.cache_len:
        raise BucketSyntaxError(
            f"the longest prompt bucket ({max(b.prompts)}) does not fit the cache "
            f"({b.cache_len}); use cache>={max(b.prompts)}"
        )
    return b


def as_generation_buckets(spec) -> GenerationBuckets:
    """Accept the string syntax, a GenerationBuckets, or a dict of its fields."""
    if isinstance(spec, str):
        return parse_generation_buckets(spec)
    if isinstance(spec, GenerationBuckets):
        return checked(GenerationBuckets.from_dict(spec.to_dict()))
    if isinstance(spec, dict):
        return checked(GenerationBuckets.from_dict(spec))
    raise BucketSyntaxError(
        f'causal-lm buckets must be a string like "batch=1,4 prompt=16:1024 cache=2048", '
        f"not {type(spec).__name__}"
    )
