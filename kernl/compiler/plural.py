"""`count(1, "bucket")` is "1 bucket", `count(2, "bucket")` "2 buckets": every count the
compiler prints goes through here, so that none reads "1 timed calls"; `first_few` names the
first items of a long list in a message."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`plural`: for the nouns that do not just take an s ("kernel binary")."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def first_few(items: list[str], shown: int = 4) -> str:
    """ "a, b, c, d and 3 more": a message's list of names, cut after `shown`."""
    rest = len(items) - shown
    return ", ".join(items[:shown]) + (f" and {rest} more" if rest > 0 else "")
