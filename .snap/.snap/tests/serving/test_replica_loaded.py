"""Replica.loaded(): a request during the load waits for it, a failed load's error reaches
every request, and a finished load returns without a trip through the event loop."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest

pytest.importorskip("starlette", reason="kernl serve needs Ray Serve (kernl[serve])")
from kernl.serving.replica import Replica  # noqa: E402


def replica_loading(future: Future) -> Replica:
    replica = Replica.__new__(Replica)
    replica.loading = future
    return replica


def test_a_request_during_the_load_waits_for_it():
    future: Future = Future()
    replica = replica_loading(future)

    async def request():
        threading.Timer(0.05, future.set_result, (None,)).start()
        await replica.loaded()
        return future.done()

    assert asyncio.run(request())


def test_a_failed_load_fails_every_request_with_its_error():
    future: Future = Future()
    future.set_exception(OSError("no such artifact"))
    with pytest.raises(OSError, match="no such artifact"):
        asyncio.run(replica_loading(future).loaded())


def test_a_finished_load_does_not_yield_to_the_event_loop():
    future: Future = Future()
    future.set_result(None)
    replica = replica_loading(future)
    order = []

    async def main():
        async def other():
            order.append("other")

        task = asyncio.get_running_loop().create_task(other())
        await replica.loaded()
        order.append("loaded")  # before `other` ran: loaded() never gave the loop a turn
        await task

    asyncio.run(main())
    assert order == ["loaded", "other"]
