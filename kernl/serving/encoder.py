"""One gathered batch of encoder requests served without Ray: every row of every request cut
into the artifact's buckets (batching.plan_groups), one model call per group, one JSON answer
per request. The deployment (deployment.py) calls it from `@serve.batch`; the in-process
benchmark (benchmarks/bench_serving_direct.py, on a GPU machine without Ray) calls it the
same way."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .batching import plan_groups, run_group
from .protocol import ParsedRequest, response_body


@dataclass(frozen=True)
class Replay:
    """One model call of a batch: what the deployment's metrics count."""

    bucket: str  # "BxS"
    bucket_tokens: int
    requests: int  # requests with rows in it
    rows: int
    tokens: int  # real tokens (the rest of bucket_tokens is padding)


def serve_batch(
    model,
    requests: Sequence[ParsedRequest],
    costs: dict | None = None,
    extra: dict | None = None,
    on_replay: Callable[[Replay], None] | None = None,
) -> list[dict]:
    """The answers (JSON objects) of `requests`, served together: `costs` prices each bucket
    for the planner (default: tokens), `extra` goes into every answer, `on_replay` hears of
    each model call."""
    rows = [(i, row) for i, r in enumerate(requests) for row in r.rows]
    groups = plan_groups([row.length for _, row in rows], model.buckets, costs)
    per_row: list[dict | None] = [None] * len(rows)
    replays: list[list[dict]] = [[] for _ in requests]
    for group in groups:
        members = [rows[k] for k in group.rows]
        wanted = {name for i in {i for i, _ in members} for name in requests[i].outputs}
        outputs = run_group(model, [row for _, row in members], wanted)
        for k, out in zip(group.rows, outputs):
            per_row[k] = out
        served = sorted({i for i, _ in members})
        note = {
            "bucket": f"{group.bucket.batch}x{group.bucket.seq}",
            "requests": len(served),
            "rows": len(members),
        }
        for i in served:
            replays[i].append(note)
        if on_replay is not None:
            on_replay(
                Replay(
                    note["bucket"],
                    group.bucket.tokens,
                    len(served),
                    len(members),
                    sum(row.length for _, row in members),
                )
            )
    results, k = [], 0
    for i, request in enumerate(requests):
        mine = per_row[k : k + len(request.rows)]
        k += len(request.rows)
        results.append(response_body(mine, request, {**(extra or {}), "replays": replays[i]}))
    return results
