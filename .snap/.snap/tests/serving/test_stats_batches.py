"""SharedStats without Ray: counts made while the sender thread is busy go together in its
next actor call, in the order they were made; an idle sender sends a count at once; a
snapshot sees every count made before it."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from kernl.serving.metrics import ReplayStats

# replica.py speaks HTTP through starlette, which comes with the serve extra (Ray Serve)
pytest.importorskip("starlette", reason="kernl serve needs Ray Serve (kernl[serve])")
from kernl.serving.replica import SharedStats, _counting_in_batches  # noqa: E402


class FakeActor:
    """Stands for the Ray actor: `.apply_calls.remote(calls)` applies them to a real
    counters object; the first call blocks until `gate` opens."""

    def __init__(self, counters):
        self.counters = counters
        self.batches: list[list] = []
        self.gate = threading.Event()
        self.entered = threading.Event()

        def apply(calls):
            self.batches.append([c[0] for c in calls])
            self.entered.set()
            if len(self.batches) == 1:
                self.gate.wait(10)
            counters.apply_calls(calls)

        self.apply_calls = SimpleNamespace(remote=apply)
        # taken on the sender thread, awaited on the event loop, like an ObjectRef
        self.snapshot = SimpleNamespace(remote=lambda: Ready(counters.snapshot()))


class Ready:
    def __init__(self, value):
        self.value = value

    def __await__(self):
        if False:
            yield
        return self.value


def stats_with(actor, window_s: float = 0.0) -> SharedStats:
    stats = SharedStats.__new__(SharedStats)
    stats.actor = actor
    stats.sender = ThreadPoolExecutor(1)
    stats._pending, stats._lock, stats._sending = [], threading.Lock(), False
    stats.window_s = window_s
    return stats


def test_counts_made_while_sending_go_together_in_order():
    counters = _counting_in_batches(ReplayStats)()
    actor = FakeActor(counters)
    stats = stats_with(actor)
    stats.send("record_requests", served=1)  # idle: sent at once, alone
    assert actor.entered.wait(10)
    stats.send("record_replay", 2, 3, 30, "4x16", 64, "r1")
    stats.send("record_requests", served=2)
    stats.send("record_requests", bad=1)
    actor.gate.set()

    async def snap():
        return await stats.snapshot()

    snapshot = asyncio.run(snap())
    assert actor.batches == [
        ["record_requests"],
        ["record_replay", "record_requests", "record_requests"],
    ]
    assert snapshot["requests"] == 3 and snapshot["bad_requests"] == 1
    assert snapshot["replays"] == 1 and snapshot["rows"] == 3
    stats.sender.shutdown()


def test_the_counting_class_keeps_its_name_and_methods():
    counting = _counting_in_batches(ReplayStats)
    assert counting.__name__ == "ReplayStats" and issubclass(counting, ReplayStats)
    c = counting()
    c.apply_calls([("record_requests", (), {"served": 4})])
    assert c.snapshot()["requests"] == 4


def test_the_counts_of_a_window_go_in_one_call():
    counters = _counting_in_batches(ReplayStats)()
    actor = FakeActor(counters)
    actor.gate.set()
    stats = stats_with(actor, window_s=0.2)
    for served in range(1, 6):
        stats.send("record_requests", served=served)

    async def snap():
        return await stats.snapshot()

    assert asyncio.run(snap())["requests"] == 15  # asked for after the counts: sees them all
    assert actor.batches == [["record_requests"] * 5]
    stats.sender.shutdown()


def test_a_snapshot_is_not_kept_waiting_by_a_replica_that_never_stops_counting():
    counters = _counting_in_batches(ReplayStats)()
    actor = FakeActor(counters)
    actor.gate.set()
    stats = stats_with(actor, window_s=0.01)
    stop = threading.Event()

    def count():
        while not stop.is_set():
            stats.send("record_requests", served=1)
            time.sleep(0.0005)

    counting = threading.Thread(target=count)
    counting.start()
    try:
        time.sleep(0.05)

        async def snap():
            return await asyncio.wait_for(stats.snapshot(), 5)

        start = time.monotonic()
        assert asyncio.run(snap())["requests"] > 0
        assert time.monotonic() - start < 1.0  # a window or two, not the life of the load
    finally:
        stop.set()
        counting.join()
        stats.sender.shutdown()
    assert len(actor.batches) < 100  # about one call per window, not one per count
