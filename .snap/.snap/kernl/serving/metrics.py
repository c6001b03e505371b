"""Counters of the server: replays, how many requests and rows each one carried, padding.

Every replica reports each replay to one shared `ReplayStats` (a Ray actor, see
deployment.py), so GET /metrics shows the whole application whichever replica answers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ReplayStats:
    replays: int = 0
    batched_replays: int = 0  # replays that served rows of more than one request
    requests: int = 0
    rows: int = 0
    tokens: int = 0  # real tokens served
    bucket_tokens: int = 0  # tokens of the buckets replayed (real + padding)
    max_requests_per_replay: int = 0
    bad_requests: int = 0
    by_bucket: Counter = field(default_factory=Counter)
    by_replica: Counter = field(default_factory=Counter)
    request_sizes: Counter = field(default_factory=Counter)  # requests per replay -> replays

    def record_replay(
        self,
        requests: int,
        rows: int,
        tokens: int,
        bucket: str,
        bucket_tokens: int,
        replica: str,
    ) -> None:
        self.replays += 1
        self.batched_replays += requests > 1
        self.rows += rows
        self.tokens += tokens
        self.bucket_tokens += bucket_tokens
        self.max_requests_per_replay = max(self.max_requests_per_replay, requests)
        self.by_bucket[bucket] += 1
        self.by_replica[replica] += 1
        self.request_sizes[requests] += 1

    def record_requests(self, served: int = 0, bad: int = 0) -> None:
        self.requests += served
        self.bad_requests += bad

    def snapshot(self) -> dict:
        return {
            "replays": self.replays,
            "batched_replays": self.batched_replays,
            "requests": self.requests,
            "bad_requests": self.bad_requests,
            "rows": self.rows,
            "rows_per_replay": self.rows / self.replays if self.replays else 0.0,
            "max_requests_per_replay": self.max_requests_per_replay,
            "padding_fraction": 1 - self.tokens / self.bucket_tokens if self.bucket_tokens else 0.0,
            "replays_by_bucket": dict(sorted(self.by_bucket.items())),
            "replays_by_replica": dict(sorted(self.by_replica.items())),
            "replays_by_requests_served": {
                str(k): v for k, v in sorted(self.request_sizes.items())
            },
        }


@dataclass
class GenerationStats:
    """The counters of a causal-LM server (one Ray actor for the application, like
    ReplayStats): requests by outcome, tokens generated, and per replica."""

    requests: int = 0  # answered in full (streamed to the end, or returned)
    streams: int = 0  # of which streamed
    cancelled: int = 0  # streams whose client left before the end: generation stopped early
    failed: int = 0  # the model raised mid-request
    bad_requests: int = 0
    tokens: int = 0  # new tokens generated, every outcome
    by_replica: Counter = field(default_factory=Counter)
    cancelled_at_step: list = field(default_factory=list)  # steps run by each cancelled stream
    batches: int = 0  # generate calls
    shared_batches: int = 0  # calls that served more than one request
    max_requests_per_batch: int = 0
    batch_sizes: Counter = field(default_factory=Counter)  # requests per call -> calls
    abandoned_rows: int = 0  # rows whose client left during their call
    joined: int = 0  # requests seated in a batch that was already running
    max_queue_ms: float = 0.0  # the longest a request waited for its call to start

    def record(self, outcome: str, tokens: int, replica: str, streamed: bool) -> None:
        self.tokens += tokens
        self.by_replica[replica] += 1
        if outcome == "done":
            self.requests += 1
            self.streams += streamed
        elif outcome == "cancelled":
            self.cancelled += 1
            self.cancelled_at_step = (self.cancelled_at_step + [tokens])[-100:]
        else:
            self.failed += 1

    def record_batch(
        self,
        requests: int,
        steps: int,
        abandoned: int,
        wait_s: float,
        replica: str,
        joined: int = 0,
    ) -> None:
        self.batches += 1
        self.shared_batches += requests > 1
        self.max_requests_per_batch = max(self.max_requests_per_batch, requests)
        self.batch_sizes[requests] += 1
        self.abandoned_rows += abandoned
        self.joined += joined
        self.max_queue_ms = max(self.max_queue_ms, 1000 * wait_s)

    def record_bad(self) -> None:
        self.bad_requests += 1

    def snapshot(self) -> dict:
        return {
            "requests": self.requests,
            "streams": self.streams,
            "cancelled": self.cancelled,
            "cancelled_at_step": list(self.cancelled_at_step),
            "failed": self.failed,
            "bad_requests": self.bad_requests,
            "tokens": self.tokens,
            "requests_by_replica": dict(sorted(self.by_replica.items())),
            "batches": self.batches,
            "shared_batches": self.shared_batches,
            "max_requests_per_batch": self.max_requests_per_batch,
            "batches_by_requests": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "abandoned_rows": self.abandoned_rows,
            "joined_requests": self.joined,
            "max_queue_ms": self.max_queue_ms,
        }
