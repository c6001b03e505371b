"""The bucket syntax: `"batch=1,8,32 seq=16:512"`.

Each axis takes a comma list whose items are numbers or power-of-two ranges `lo:hi`
(lo, 2·lo, 4·lo, … up to hi; hi itself is added when the doublings miss it). The buckets are
the cartesian product of the axes."""

from __future__ import annotations

import itertools
import re

from kernl.artifacts.schema import Bucket

AXES = ("batch", "seq")
_ITEM = re.compile(r"^(\d+)(?::(\d+))?$")


class BucketSyntaxError(ValueError):
    pass


def _parse_axis(axis: str, text: str) -> list[int]:
    values: set[int] = set()
    for item in text.split(","):
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
        v = lo
        while v <= hi:
            values.add(v)
            v *= 2
        values.add(hi)
    return sorted(values)


def parse_buckets(spec: str) -> list[Bucket]:
    """`"batch=1,8 seq=16:64"` -> [Bucket(1,16), Bucket(1,32), Bucket(1,64), Bucket(8,16), ...]"""
    axes: dict[str, list[int]] = {}
    for part in spec.replace(";", " ").split():
        if "=" not in part:
            raise BucketSyntaxError(f"{part!r}: expected AXIS=VALUES, e.g. seq=16:512")
        name, values = part.split("=", 1)
        name = name.strip().lower()
        if name not in AXES:
            raise BucketSyntaxError(f"unknown axis {name!r}; the axes are {', '.join(AXES)}")
        if name in axes:
            raise BucketSyntaxError(f"axis {name!r} is given twice")
        axes[name] = _parse_axis(name, values)
    missing = [a for a in AXES if a not in axes]
    if missing:
        raise BucketSyntaxError(f"missing axis {', '.join(missing)} in {spec!r}")
    return [Bucket(b, s) for b, s in itertools.product(axes["batch"], axes["seq"])]


def as_buckets(spec) -> list[Bucket]:
    """Accept a bucket string, Buckets, or (batch, seq) pairs."""
    if isinstance(spec, str):
        return parse_buckets(spec)
    out = []
    for b in spec:
        out.append(b if isinstance(b, Bucket) else Bucket(int(b[0]), int(b[1])))
    if not out:
        raise BucketSyntaxError("no buckets given")
    return sorted(set(out))
