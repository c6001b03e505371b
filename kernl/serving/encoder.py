"""One gathered batch of encoder requests served without Ray: every row of every request cut
into the artifact's buckets (batching.plan_groups), one model call per group, one JSON answer
per request. The deployment (deployment.py) calls `serve_batch_bytes` for each batch its
gatherer (gather.py) forms and sends its bytes as they are; the in-process benchmark (benchmarks/bench_serving_direct.py,
on a GPU machine without Ray) calls it the same way. `serve_batch` gives the same answers as
JSON objects, for callers in the same process."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .batching import plan_groups, run_group
from .pooling import POOLED, SENTENCE_EMBEDDING, pool
from .protocol import ParsedRequest, response_body, response_bytes


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
    served = _serve(model, requests, costs, on_replay)
    return [
        response_body(rows, request, {**(extra or {}), "replays": replays})
        for request, (rows, replays) in zip(requests, served)
    ]


def serve_batch_bytes(
    model,
    requests: Sequence[ParsedRequest],
    costs: dict | None = None,
    extra: dict | None = None,
    on_replay: Callable[[Replay], None] | None = None,
) -> list[bytes]:
    """serve_batch's answers encoded as the server sends them: `json.dumps(answer).encode()`
    byte for byte (protocol.response_bytes), at a fraction of its cost for fp16/bf16."""
    served = _serve(model, requests, costs, on_replay)
    return [
        response_bytes(rows, request, {**(extra or {}), "replays": replays})
        for request, (rows, replays) in zip(requests, served)
    ]


def _serve(
    model,
    requests: Sequence[ParsedRequest],
    costs: dict | None,
    on_replay: Callable[[Replay], None] | None,
) -> list[tuple[list[dict], list[dict]]]:
    """Per request, its rows' outputs (CPU tensors) and the notes of the replays that served
    it."""
    rows = [(i, row) for i, r in enumerate(requests) for row in r.rows]
    groups = plan_groups([row.length for _, row in rows], model.buckets, costs)
    per_row: list[dict | None] = [None] * len(rows)
    replays: list[list[dict]] = [[] for _ in requests]
    for group in groups:
        members = [rows[k] for k in group.rows]
        wanted = {
            POOLED if name == SENTENCE_EMBEDDING else name
            for i in {i for i, _ in members}
            for name in requests[i].outputs
        }
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
        own = per_row[k : k + len(request.rows)]
        if request.pooling is not None:
            for out, row in zip(own, request.rows):
                mask = row.inputs.get("attention_mask")
                out[SENTENCE_EMBEDDING] = pool(out[POOLED], mask, request.pooling)
        results.append((own, replays[i]))
        k += len(request.rows)
    return results
