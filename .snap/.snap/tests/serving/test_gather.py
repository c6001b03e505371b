"""kernl.serving.gather.BatchGatherer without Ray: a batch forms when the worker frees, from
everything queued by then (up to the row limit, in arrival order); an idle gatherer serves a
request at once; failures and clients that left touch only their own batch."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from kernl.serving.gather import BatchGatherer


class Worker:
    """serve() records each batch; the first `hold` batches wait for release()."""

    def __init__(self, hold: int = 0, fail_on: str | None = None):
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        self.hold = hold
        self.fail_on = fail_on

    def serve(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        self.started.set()
        if len(self.batches) <= self.hold:
            self.gate.wait(10)
        if self.fail_on in items:
            raise RuntimeError("model call failed")
        return [f"answer to {i}" for i in items]


async def until(condition) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_requests_queued_while_a_batch_runs_form_the_next_batch_when_it_ends():
    async def main():
        worker = Worker(hold=1)
        with ThreadPoolExecutor(1) as pool:
            gather = BatchGatherer(worker.serve, pool, max_rows=4)
            first = asyncio.ensure_future(gather.submit("a"))
            await until(worker.started.is_set)  # an idle gatherer serves "a" at once, alone
            rest = [asyncio.ensure_future(gather.submit(x)) for x in "bcdef"]
            await asyncio.sleep(0.01)
            assert worker.batches == [["a"]]  # nothing else formed while "a" runs
            worker.gate.set()
            answers = await asyncio.gather(first, *rest)
            await gather.close()
        assert answers == [f"answer to {x}" for x in "abcdef"]
        assert worker.batches == [["a"], ["b", "c", "d", "e"], ["f"]]  # 4 rows at most
        assert (gather.batches, gather.requests) == (3, 6)

    run(main())


def test_rows_of_a_request_count_against_the_limit_and_a_larger_one_is_refused():
    async def main():
        worker = Worker(hold=1)
        with ThreadPoolExecutor(1) as pool:
            gather = BatchGatherer(worker.serve, pool, max_rows=5, rows_of=len)
            first = asyncio.ensure_future(gather.submit("x"))
            await until(worker.started.is_set)
            rest = [asyncio.ensure_future(gather.submit(s)) for s in ("aa", "bbb", "c")]
            await asyncio.sleep(0.01)
            with pytest.raises(ValueError, match="6 rows exceeds the batch limit of 5"):
                await gather.submit("dddddd")
            worker.gate.set()
            await asyncio.gather(first, *rest)
            await gather.close()
        # "aa" + "bbb" fill 5 rows; "c" waits for the next batch (arrival order kept)
        assert worker.batches == [["x"], ["aa", "bbb"], ["c"]]

    run(main())


def test_a_wait_holds_the_first_request_for_more_until_the_batch_is_full():
    async def main():
        worker = Worker()
        with ThreadPoolExecutor(1) as pool:
            # a long wait that a full batch cuts short: the test never sleeps it out
            gather = BatchGatherer(worker.serve, pool, max_rows=2, wait_s=30.0)
            answers = await asyncio.gather(gather.submit("a"), gather.submit("b"))
            await gather.close()
        assert answers == ["answer to a", "answer to b"]
        assert worker.batches == [["a", "b"]]

    run(main())


def test_a_failed_batch_fails_its_requests_only():
    async def main():
        worker = Worker(hold=1, fail_on="a")
        with ThreadPoolExecutor(1) as pool:
            gather = BatchGatherer(worker.serve, pool, max_rows=8)
            first = asyncio.ensure_future(gather.submit("a"))
            await until(worker.started.is_set)
            later = asyncio.ensure_future(gather.submit("b"))
            await asyncio.sleep(0.01)
            worker.gate.set()
            with pytest.raises(RuntimeError, match="model call failed"):
                await first
            assert await later == "answer to b"
            await gather.close()

    run(main())


def test_a_request_whose_client_left_is_not_served():
    async def main():
        worker = Worker(hold=1)
        with ThreadPoolExecutor(1) as pool:
            gather = BatchGatherer(worker.serve, pool, max_rows=8)
            first = asyncio.ensure_future(gather.submit("a"))
            await until(worker.started.is_set)
            left = asyncio.ensure_future(gather.submit("b"))
            stays = asyncio.ensure_future(gather.submit("c"))
            await asyncio.sleep(0.01)
            left.cancel()  # the client disconnected while queued
            await asyncio.sleep(0.01)
            worker.gate.set()
            assert await first == "answer to a" and await stays == "answer to c"
            await gather.close()
        assert worker.batches == [["a"], ["c"]]

    run(main())


def test_a_serve_giving_the_wrong_number_of_answers_fails_its_batch():
    async def main():
        with ThreadPoolExecutor(1) as pool:
            gather = BatchGatherer(lambda items: ["one"], pool, max_rows=8)
            with pytest.raises(RuntimeError, match="1 answers for 2 requests"):
                await asyncio.gather(gather.submit("a"), gather.submit("b"))
            await gather.close()

    run(main())


def test_close_cancels_the_running_batch_and_the_queue():
    async def main():
        worker = Worker(hold=1)
        with ThreadPoolExecutor(1) as pool:
            gather = BatchGatherer(worker.serve, pool, max_rows=1)
            running = asyncio.ensure_future(gather.submit("a"))
            await until(worker.started.is_set)
            queued = asyncio.ensure_future(gather.submit("b"))
            await asyncio.sleep(0.01)
            await gather.close()
            worker.gate.set()
            for request in (running, queued):
                with pytest.raises(asyncio.CancelledError):
                    await request

    run(main())
