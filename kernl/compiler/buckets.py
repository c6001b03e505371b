"""The bucket syntax: `"batch=1,8,32 seq=16:512"`, or an explicit list `"1x16,8x128"`.

Each axis takes a comma list whose items are numbers or power-of-two ranges `lo:hi`
(lo, 2·lo, 4·lo, … up to hi; hi itself is added when the doublings miss it). The buckets are
the cartesian product of the axes. The list form names each bucket as BATCHxSEQ (the form
`kernl bench --buckets` and `kernl inspect` print).

Sizes are ASCII digits, and are checked here, before any model is loaded, against the limits a
reader enforces (`kernl.artifacts.DEFAULT_LIMITS`: batch, sequence length, tokens per bucket,
number of buckets): an artifact the runtime would refuse to load is never compiled."""

from __future__ import annotations

import itertools
import numbers
import re

from kernl.artifacts import DEFAULT_LIMITS
from kernl.artifacts.schema import Bucket

AXES = ("batch", "seq")
# ASCII digits only: Python's \d (and int()) take any Unicode digit, e.g. a full-width "８".
_ITEM = re.compile(r"^([0-9]+)(?::([0-9]+))?$")
_SHAPE = re.compile(r"([0-9]+)x([0-9]+)")


class BucketSyntaxError(ValueError):
    pass


class BucketLimitError(BucketSyntaxError):
    """A bucket the model cannot run (longer than its position table), or one over the limits
    a reader of artifacts enforces."""


def axis_limit(axis: str) -> int:
    """The largest size of `axis` a reader accepts: batch, or a length (seq, prompt, cache,
    source)."""
    return DEFAULT_LIMITS.max_batch if axis == "batch" else DEFAULT_LIMITS.max_seq


def check_axis(axis: str, values) -> None:
    """Refuse a size of `axis` over the reader's limit (before any list of them is built)."""
    top = axis_limit(axis)
    over = [v for v in values if v > top]
    if over:
        raise BucketLimitError(
            f"{axis}={max(over)} is more than the {top} a kernl artifact allows ({axis} 1..{top})"
        )


def check_count(count: int, what: str = "buckets") -> None:
    if count > DEFAULT_LIMITS.max_buckets:
        raise BucketLimitError(
            f"{count} {what}, more than the {DEFAULT_LIMITS.max_buckets} a kernl artifact "
            "allows (each is a program, a graph and static buffers): give fewer sizes"
        )


def check_tokens(tokens: int, what: str) -> None:
    """`what` (e.g. "bucket 8x128") holds `tokens` tokens of static buffers."""
    if tokens > DEFAULT_LIMITS.max_bucket_tokens:
        raise BucketLimitError(
            f"{what} holds {tokens} tokens, more than the {DEFAULT_LIMITS.max_bucket_tokens} "
            "a kernl artifact allows per bucket"
        )


def check_limits(buckets: list[Bucket]) -> None:
    """Refuse encoder buckets a reader would refuse to load (kernl.artifacts.DEFAULT_LIMITS)."""
    check_axis("batch", [b.batch for b in buckets])
    check_axis("seq", [b.seq for b in buckets])
    for b in buckets:
        check_tokens(b.batch * b.seq, f"bucket {b.batch}x{b.seq} (batch x seq)")
    check_count(len(buckets))


def _parse_axis(axis: str, text: str) -> list[int]:
    if not text.strip():
        raise BucketSyntaxError(f"{axis}: no sizes after {axis}=")
    values: set[int] = set()
    for item in text.split(","):
        if not item.strip():
            raise BucketSyntaxError(
                f"{axis}: empty item in {text!r} (a trailing or doubled comma?); sizes are "
                'separated by commas, axes by spaces: "batch=1,8 seq=16:512"'
            )
        m = _ITEM.match(item.strip())
        if not m:
            raise BucketSyntaxError(
                f"{axis}: {item.strip()!r} is neither a number nor a range like 16:512"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if lo <= 0:
            raise BucketSyntaxError(f"{axis}: sizes must be positive, got {lo}")
        if hi < lo:
            raise BucketSyntaxError(f"{axis}: range {lo}:{hi} goes downwards")
        check_axis(axis, [hi])
        v = lo
        while v <= hi:
            values.add(v)
            v *= 2
        values.add(hi)
    return sorted(values)


def parse_axes(
    spec: str, axes: tuple[str, ...], required: tuple[str, ...], example: str, task: str
) -> dict[str, list[int]]:
    """The one grammar of every task: space-separated AXIS=VALUES over the task's `axes`
    (encoder: batch, seq; causal LM: batch, prompt, cache), each axis at most once."""
    found: dict[str, list[int]] = {}
    for part in spec.replace(";", " ").split():
        if "=" not in part:
            raise BucketSyntaxError(f"{part!r}: expected AXIS=VALUES, e.g. {example}")
        name, values = part.split("=", 1)
        name = name.strip().lower()
        if name not in axes:
            raise BucketSyntaxError(
                f"unknown axis {name!r} for {task}; the axes are {', '.join(axes)} "
                f'(e.g. "{example}")'
            )
        if name in found:
            raise BucketSyntaxError(f"axis {name!r} is given twice")
        found[name] = _parse_axis(name, values)
    missing = [a for a in required if a not in found]
    if missing:
        raise BucketSyntaxError(f"missing axis {', '.join(missing)} in {spec!r}")
    return found


def parse_buckets(spec: str) -> list[Bucket]:
    """`"batch=1,8 seq=16:64"` -> [Bucket(1,16), Bucket(1,32), Bucket(1,64), Bucket(8,16), ...];
    `"1x16,8x128"` -> [Bucket(1,16), Bucket(8,128)]."""
    if "=" not in spec and spec.strip():
        return _parse_shape_list(spec)
    axes = parse_axes(spec, AXES, AXES, "batch=1,8 seq=16:512", "an encoder")
    check_count(len(axes["batch"]) * len(axes["seq"]))
    buckets = [Bucket(b, s) for b, s in itertools.product(axes["batch"], axes["seq"])]
    check_limits(buckets)
    return buckets


def _parse_shape_list(spec: str) -> list[Bucket]:
    shapes = []
    for item in re.split(r"[,;\s]+", spec.strip()):
        if not item:
            raise BucketSyntaxError(
                f"empty item in {spec!r} (a trailing or doubled comma?); the list form is "
                'BATCHxSEQ items separated by commas, e.g. "1x16,8x128"'
            )
        m = _SHAPE.fullmatch(item.lower())
        if not m:
            raise BucketSyntaxError(
                f'{item!r}: expected BATCHxSEQ (e.g. 8x128) in a list like "1x16,8x128", or '
                'axes like "batch=1,8 seq=16:512"'
            )
        batch, seq = int(m.group(1)), int(m.group(2))
        if batch <= 0 or seq <= 0:
            raise BucketSyntaxError(f"{item!r}: sizes must be positive")
        shapes.append(Bucket(batch, seq))
    shapes = sorted(set(shapes))
    check_limits(shapes)
    return shapes


def position_limit(config) -> int | None:
    """The longest sequence a Hugging Face encoder config can embed, or None when it has no
    absolute position table. RoBERTa-style models start positions after the pad id, so two
    of their rows are not usable (514 rows: 512 tokens)."""
    rows = getattr(config, "max_position_embeddings", None)
    if not isinstance(rows, int) or isinstance(rows, bool) or rows <= 0:
        return None
    if getattr(config, "position_biased_input", True) is False:  # DeBERTa: relative only
        return None
    model_type = getattr(config, "model_type", None)
    if model_type == "esm" and getattr(config, "position_embedding_type", None) != "absolute":
        return None  # rotary ESM: the table is never read
    if model_type in _PADDING_OFFSET_MODELS:
        pad = getattr(config, "pad_token_id", None)
        return rows - (pad if isinstance(pad, int) else 1) - 1
    return rows


_PADDING_OFFSET_MODELS = {
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "data2vec-text",
    "esm",  # with absolute positions (rotary ones returned above)
    "ibert",
    "layoutlmv3",
    "lilt",
    "longformer",
    "luke",
    "markuplm",
    "mpnet",
    "roberta-prelayernorm",
    "xmod",
}


def check_buckets_fit(buckets: list[Bucket], config) -> None:
    """Refuse, before any tracing, buckets longer than the model's position table: they
    would fail deep inside export after every shorter bucket was compiled."""
    limit = position_limit(config)
    if limit is None:
        return
    over = [b for b in buckets if b.seq > limit]
    if over:
        names = ", ".join(f"{b.batch}x{b.seq}" for b in over)
        raise BucketLimitError(
            f"bucket(s) {names} longer than the model's {limit} positions "
            f"(config max_position_embeddings={config.max_position_embeddings}); "
            f"use seq<={limit}"
        )


def _is_size(v) -> bool:
    """An integer (numpy's too), not a bool, a float or a string."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def dict_axis(axis: str, value) -> list[int]:
    """One axis of buckets given as a dict: one size, a list of sizes, or the string syntax
    ("16:512", "1,8"); sorted, without repeats, each a positive integer within the reader's
    limit (a float is not taken as the integer below it, nor a string as its characters)."""
    if isinstance(value, str):
        return _parse_axis(axis, value)
    if _is_size(value):
        value = [value]
    try:
        sizes = list(value)
    except TypeError:
        raise BucketSyntaxError(
            f'{axis}: a size, a list of sizes or a string such as "1,8", not {value!r}'
        ) from None
    bad = [v for v in sizes if not (_is_size(v) and v >= 1)]
    if bad or not sizes:
        raise BucketSyntaxError(
            f"{axis}: sizes are positive integers, got {bad[0]!r}" if bad else f"{axis}: no sizes"
        )
    check_axis(axis, sizes)
    return sorted({int(v) for v in sizes})


def dict_axes(
    spec: dict, axes: tuple[str, ...], fields: tuple[str, ...], task: str
) -> dict[str, list[int]]:
    """A generation task's buckets given as a dict: keyed by the string syntax's axis names
    (`axes`, the first two required) or by its dataclass's fields (`fields`, what `to_dict`
    gives, in the same order); each value as `dict_axis` takes it."""
    keys = set(spec)
    for names in (axes, fields):
        if keys <= set(names) and set(names[:2]) <= keys:
            return {a: dict_axis(a, spec[n]) for a, n in zip(axes, names) if n in spec}
    raise BucketSyntaxError(
        f"{task} buckets as a dict take the keys {', '.join(map(repr, axes[:2]))} and optionally "
        f"{axes[2]!r} (or {', '.join(map(repr, fields))}), got {sorted(map(str, keys))}"
    )


def as_buckets(spec) -> list[Bucket]:
    """Accept a bucket string, Buckets, (batch, seq) pairs, or {"batch": [...], "seq": [...]}
    (their product, as the string's axes)."""
    if isinstance(spec, str):
        return parse_buckets(spec)
    if isinstance(spec, dict):
        if set(spec) != {"batch", "seq"}:
            raise BucketSyntaxError(
                f'encoder buckets as a dict take the keys "batch" and "seq", got {sorted(spec)}'
            )
        axes = {k: dict_axis(k, v) for k, v in spec.items()}
        check_count(len(axes["batch"]) * len(axes["seq"]))  # before the product is built
        spec = [(b, s) for b in axes["batch"] for s in axes["seq"]]
    if isinstance(spec, bytes) or not hasattr(spec, "__iter__"):
        raise BucketSyntaxError(
            'buckets are a string such as "batch=1,8 seq=16:512", (batch, seq) pairs or a dict '
            f"of those two axes, not {spec!r}"
        )
    out = []
    for b in spec:
        if isinstance(b, Bucket):
            out.append(b)
            continue
        try:
            batch, seq = b
            if not (_is_size(batch) and _is_size(seq)):  # 1.9 was taken as 1, "8" as 8
                raise TypeError
            bucket = Bucket(int(batch), int(seq))
        except (TypeError, ValueError):
            raise BucketSyntaxError(
                f"a bucket is a (batch, seq) pair of integers, not {b!r}"
            ) from None
        if bucket.batch < 1 or bucket.seq < 1:
            raise BucketSyntaxError(f"a bucket's batch and seq are positive, not {b!r}")
        out.append(bucket)
    if not out:
        raise BucketSyntaxError("no buckets given")
    out = sorted(set(out))
    check_limits(out)
    return out
