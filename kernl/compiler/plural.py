"""`count(1, "bucket")` is "1 bucket", `count(2, "bucket")` "2 buckets": every count the
compiler prints goes through here, so that none reads "1 timed calls"."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`plural`: for the nouns that do not just take an s ("kernel binary")."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
