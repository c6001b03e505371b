"""Gather queued encoder requests into model batches: a batch forms when the worker frees.

Ray Serve's `@serve.batch` forms the next batch while the current one runs and closes it
`batch_wait_timeout_s` after its first request; requests that queue after that wait for the
batch after it. With a short timeout, a loaded replica then alternates a full batch with a
batch of the one or two requests that came first, and under an open stream of requests
(2,000/s on a 0.5 ms model) the queue grows without bound; with a long one, every request of
an idle replica pays the whole wait (5 ms, ten model calls of a small BERT on an H200).

Here the batch forms when the worker is free: everything queued by then goes in (up to
`max_rows` rows, in arrival order), so a batch is as large as the load made it while the
previous one ran, and a request reaching an idle replica runs at once. `wait_s` can still
hold the first request of a batch for more (measured on a GPU-like stub: it only costs
latency, at 1, 16 and 64 clients and at 500-5,000 requests/s); the default is none.

No Ray here: the deployment (deployment.py) and the in-process benchmark use this class."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatchGatherer(Generic[T, R]):
    """`await submit(item)` queues one request and returns its answer; `serve(items)` runs
    on `executor`, one batch at a time, and returns one answer per item (in order). An
    exception from `serve` fails every request of its batch and the next batch runs. A
    request whose caller stopped waiting (its task cancelled: the client left) is dropped
    before its batch forms. `batches` and `requests` count what was served (counters, not
    lists: a replica runs for days)."""

    def __init__(
        self,
        serve: Callable[[list[T]], Sequence[R]],
        executor: Executor,
        max_rows: int,
        rows_of: Callable[[T], int] = lambda item: 1,
        wait_s: float = 0.0,
    ):
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if not (math.isfinite(wait_s) and wait_s >= 0):
            raise ValueError(f"wait_s must be a finite number >= 0, got {wait_s}")
        self.serve = serve
        self.executor = executor
        self.max_rows = max_rows
        self.rows_of = rows_of
        self.wait_s = wait_s
        self.batches = 0
        self.requests = 0
        self._queue: deque[tuple[T, asyncio.Future, float]] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, item: T) -> R:
        rows = self.rows_of(item)
        if rows > self.max_rows:
            raise ValueError(f"a request of {rows} rows exceeds the batch limit of {self.max_rows}")
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._arrived = asyncio.Event()
            self._task = loop.create_task(self._run())
        future = loop.create_future()
        self._queue.append((item, future, time.monotonic()))
        self._arrived.set()
        return await future

    async def close(self) -> None:
        """Stop gathering (requests still queued are cancelled)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue:
            self._queue.popleft()[1].cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if self.wait_s > 0:
                await self._wait_for_more(self._queue[0][2] + self.wait_s)
            batch = self._take()
            if not batch:
                continue
            self.batches += 1
            self.requests += len(batch)
            try:
                answers = await loop.run_in_executor(
                    self.executor, self.serve, [item for item, _ in batch]
                )
                if len(answers) != len(batch):
                    raise RuntimeError(f"{len(answers)} answers for {len(batch)} requests")
            except asyncio.CancelledError:  # close(): nobody will answer this batch
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as e:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), answer in zip(batch, answers):
                if not future.done():
                    future.set_result(answer)

    async def _wait_for_more(self, deadline: float) -> None:
        while self._queued_rows() < self.max_rows:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:  # TimeoutError from 3.11 on, not on 3.10
                return

    def _take(self) -> list[tuple[T, asyncio.Future]]:
        batch, rows = [], 0
        while self._queue:
            item, future, _ = self._queue[0]
            if future.done():  # its caller left
                self._queue.popleft()
                continue
            n = self.rows_of(item)
            if rows + n > self.max_rows:
                break
            self._queue.popleft()
            batch.append((item, future))
            rows += n
        return batch

    def _queued_rows(self) -> int:
        return sum(self.rows_of(item) for item, future, _ in self._queue if not future.done())
