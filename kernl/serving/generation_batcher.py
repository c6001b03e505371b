"""Concurrent generation requests sharing decode steps: requests waiting when the model is
free start one batch together, and requests arriving while it runs join it at its next step
in a free row. Each request receives its own row's tokens. No Ray, no HTTP: the deployment
(generation.py) and the in-process benchmark both drive it.

Policy (the runtime decides what is possible: a batch's prompts are left-padded into one
prefill bucket; one set of EOS ids, greedy or sampled for all rows, sampler parameters per
row; a running batch seats a new prompt in a free row between two steps, see
runtime/generation/joining.py):
- A batch starts when the model is free and a request waits. The oldest waiting request opens
  it; every later waiting request with the same SamplingKey (greedy or sampled, EOS ids) joins
  it in arrival order, as long as the batch stays within `max_requests` (at most the largest
  batch bucket) and the longest `max_new_tokens` still fits the KV cache after the batch's
  prompt bucket (`fits_together`).
- With `join` (the default, where the model offers `open_batch`): the batch runs in the batch
  bucket that holds `max_requests` rows, and between two steps the waiting requests are
  seated in its free rows (never used, or freed by a request that ended or left), in arrival
  order, each prefilled alone first. A request joins if it has the batch's SamplingKey, its
  prompt bucket fits before the batch's current cache slot, and its `max_new_tokens` fits
  the cache after that slot. The first waiting request that cannot join stops the joining:
  the batch then drains and that request opens the next one, so no request waits behind
  more than one batch it could not join, however many later ones could. A batch whose rows
  have all ended stops rather than seating waiting requests one by one (each joiner is
  prefilled alone): they open the next batch together, with one prefill.
- Without `join`, a request that arrives while a batch runs waits for that batch to end.
- A request arriving at an idle batcher waits up to `window_s` for others to join (the
  window is measured from the oldest request's arrival, so requests that queued behind a
  running batch start at once when it ends).
- Each request is answered as soon as its own row emits an EOS id or reaches its own
  `max_new_tokens`. A joinable batch reads the ids back after every step while a request
  streams or a waiting one could take a free row, otherwise every QUIET_STEPS steps (never
  past a row's budget): a request that arrives then waits at most that many steps to join,
  and an answer whose row emitted its EOS inside such a stretch comes that much later.
  Without `join`, ids are read back every step, or, when no request streams and all ask for
  the same `max_new_tokens`, one `model.generate` call runs instead: it reads them back once
  at the end.
- A client that leaves (`Ticket.cancel`) before its batch starts is dropped from the queue;
  during the batch its row is released when the ids are next read back (with `join`, a
  joiner may take it); a batch whose rows are all answered or abandoned stops there. A
  `generate`-mode batch runs to its end.

Every answer equals `model.generate([prompt], ...)` of the request alone: greedy rows
trivially, and a sampled row draws with its own temperature, top-k, top-p and seed, its
noise keyed as if it were alone (the runtime's per-row seeds and step counts), so requests
that differ in their sampling arguments share a batch, and one seed gives one answer however
it is batched."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from .generation_protocol import (
    GenerationLimits,
    GenerationRequest,
    fits_together,
    generate_options,
)

DEFAULT_WINDOW_MS = 5.0
# Decode steps a joinable batch runs between two readbacks of its ids when no request streams
# and no waiting one could take a free row: a request arriving meanwhile waits at most this
# many steps to join.
QUIET_STEPS = 8


@dataclass(frozen=True)
class BatchPolicy:
    """max_requests: most requests one batch holds at once (at most the largest batch
    bucket). window_s: how long a request arriving at an idle batcher waits for others.
    join: requests arriving while a batch runs join it in free rows (where the model offers
    `open_batch`)."""

    max_requests: int
    window_s: float = DEFAULT_WINDOW_MS / 1000
    join: bool = True

    def __post_init__(self) -> None:
        if self.max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {self.max_requests}")
        if not (math.isfinite(self.window_s) and self.window_s >= 0):  # NaN: no deadline
            raise ValueError(f"window_s must be a finite number >= 0, got {self.window_s}")


@dataclass
class BatchRecord:
    """One call into the model: what it served and what it cost."""

    index: int
    requests: int  # opening and joined
    mode: str  # "join" or "stream" (ids read back each step), "generate" (at the end)
    steps: int = 0  # generation steps run (prefill included)
    seconds: float = 0.0  # the call, on the worker thread
    waits_s: list[float] = field(default_factory=list)  # each request's queueing time
    abandoned: int = 0  # requests whose client left during the call
    joined: int = 0  # requests seated after the batch started
    error: str | None = None


class Ticket:
    """One request's place in the batcher: its tokens arrive here as its row produces them.
    Created and read on the event loop's thread; the worker thread hands it tokens through
    the loop (call_soon_threadsafe), and reads `cancelled`, a plain flag."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.arrived = time.monotonic()
        self.started: float | None = None  # when its batch started
        self.batch_index: int | None = None
        self.batch_requests = 0  # requests its batch had served when it was answered
        self.finish_reason: str | None = None  # "eos" | "length", once answered
        self.cancelled = False
        self._queue: asyncio.Queue = asyncio.Queue()
        # Written by the worker thread only:
        self._sent = 0
        self._finished = False

    def cancel(self) -> None:
        """The client left: drop the request if it waits, discard its row if it runs."""
        self.cancelled = True

    @property
    def produced(self) -> int:
        """Tokens its row produced for it so far."""
        return self._sent

    @property
    def wait_s(self) -> float | None:
        return None if self.started is None else self.started - self.arrived

    async def tokens(self) -> AsyncIterator[int]:
        """The request's new token ids as they come; `finish_reason` is set at the end. A
        model failure raises its exception here."""
        while True:
            kind, value = await self._queue.get()
            if kind == "token":
                yield value
            elif kind == "end":
                self.finish_reason = value
                return
            else:
                raise value

    async def result(self) -> list[int]:
        return [t async for t in self.tokens()]


class GenerationBatcher:
    """Batches submitted requests into `model.generate`/`model.stream` calls (see the module
    docstring). `submit` must be called from the event loop that runs the batches; the model
    is called on `executor` (one thread: the runtime's stream iterator is created, advanced
    and closed on the thread that runs the batch)."""

    def __init__(
        self,
        model,
        limits: GenerationLimits,
        policy: BatchPolicy,
        executor: Executor | None = None,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ):
        self.model = model
        self.limits = limits
        self.policy = policy
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="kernl-batch")
        self.on_batch = on_batch
        self.batches = 0  # calls made so far
        self._pending: list[Ticket] = []
        # The worker thread takes joiners from _pending while a batch runs.
        self._pending_lock = threading.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def submit(self, request: GenerationRequest) -> Ticket:
        ticket = Ticket(request)
        with self._pending_lock:
            self._pending.append(ticket)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return ticket

    @property
    def waiting(self) -> int:
        with self._pending_lock:
            return sum(not t.cancelled for t in self._pending)

    async def _run(self) -> None:
        # Returns once nothing is pending (submit starts it again): a task waiting forever
        # held the batcher, its model and its thread in a cycle after the server dropped it,
        # and asyncio logged "Task was destroyed but it is pending!" when gc broke it.
        while True:
            with self._pending_lock:
                self._pending = [t for t in self._pending if not t.cancelled]
                if not self._pending:
                    return
            deadline = self._pending[0].arrived + self.policy.window_s
            while len(self._next_group()) < self.policy.max_requests:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:  # TimeoutError from 3.11 on, not on 3.10
                    break
            with self._pending_lock:
                group = self._next_group()
                taken = set(map(id, group))
                self._pending = [t for t in self._pending if id(t) not in taken]
            if group:
                await self._run_batch(group)

    def _next_group(self) -> list[Ticket]:
        """The oldest live request and the later ones that may share its call."""
        live = [t for t in self._pending if not t.cancelled]  # the caller holds the lock
        if not live:
            return []
        group = [live[0]]
        for t in live[1:]:
            if len(group) == self.policy.max_requests:
                break
            if t.request.key == group[0].request.key and fits_together(
                [x.request for x in group] + [t.request], self.limits
            ):
                group.append(t)
        return group

    async def _run_batch(self, group: list[Ticket]) -> None:
        loop = asyncio.get_running_loop()
        index = self.batches
        self.batches += 1
        now = time.monotonic()
        for t in group:
            t.started, t.batch_index, t.batch_requests = now, index, len(group)
        if self.policy.join and hasattr(self.model, "open_batch"):
            mode = "join"
        else:
            mode = "stream" if _per_step(group) else "generate"
        record = BatchRecord(index, len(group), mode, waits_s=[now - t.arrived for t in group])
        try:
            await loop.run_in_executor(self.executor, self._call, group, record, loop)
        except Exception as e:  # a bug of this module, not the model's (that is caught there)
            record.error = f"{type(e).__name__}: {e}"
            for t in group:
                t._queue.put_nowait(("error", e))
        if self.on_batch is not None:
            self.on_batch(record)

    # -- on the worker thread ---------------------------------------------------------------

    def _call(self, group: list[Ticket], record: BatchRecord, loop) -> None:
        start = time.perf_counter()
        key = group[0].request.key
        prompts = [t.request.prompt for t in group]
        options = {
            **generate_options(key, [t.request.sampler for t in group]),
            "max_new_tokens": max(t.request.max_new_tokens for t in group),
        }
        eos = frozenset(key.eos)
        try:
            if record.mode == "join":
                self._call_joining(group, record, loop, options)
            elif record.mode == "stream":
                steps = self.model.stream(prompts, **options)
                try:
                    for ids in steps:
                        record.steps += 1
                        out: list = []
                        for t, token in zip(group, ids.tolist()):
                            self._emit(t, token, eos, out)
                        loop.call_soon_threadsafe(_deliver, out)
                        if all(t._finished for t in group):
                            break
                finally:
                    steps.close()  # stops the call when every row is answered or abandoned
                out = []
                for t in group:  # the runtime stopped early only if every row emitted an EOS
                    if not t._finished:
                        t._finished = True
                        out.append((t, ("end", "length")))
                loop.call_soon_threadsafe(_deliver, out)
            else:
                ids = self.model.generate(prompts, **options)
                # after the prompt (a causal LM's, left-padded) or the decoder's start token
                skip = 1 if self.limits.encoder_decoder else max(len(p) for p in prompts)
                new = ids[:, skip:].tolist()
                record.steps = len(new[0])
                out = []
                for t, row in zip(group, new):
                    for token in row:
                        self._emit(t, token, eos, out)
                    if not t._finished:  # every request gets its end, whatever came back
                        t._finished = True
                        out.append((t, ("end", "length")))
                loop.call_soon_threadsafe(_deliver, out)
        except Exception as e:
            record.error = f"{type(e).__name__}: {e}"
            loop.call_soon_threadsafe(
                _deliver, [(t, ("error", e)) for t in group if not t._finished]
            )
        finally:
            record.seconds = time.perf_counter() - start
            record.abandoned = sum(t.cancelled for t in group)

    def _call_joining(self, group: list[Ticket], record: BatchRecord, loop, options) -> None:
        """One open batch: the group's rows, then joiners seated between steps until every
        row has ended (see the module docstring)."""
        key = group[0].request.key
        eos = frozenset(key.eos)
        options = {k: v for k, v in options.items() if k != "max_new_tokens"}
        batch = self.model.open_batch(
            [t.request.prompt for t in group],
            max_new_tokens=[t.request.max_new_tokens for t in group],
            rows=self.policy.max_requests,
            **options,
        )
        out: list = []
        try:
            rows: dict[int, Ticket] = {}
            for row, token in batch.first:
                rows[row] = group[row]
                self._emit(rows[row], token, eos, out)
            record.steps = 1
            while True:
                for row, t in list(rows.items()):
                    if t._finished or t.cancelled:  # ended, or its client left
                        t._finished = True
                        batch.release(row)
                        del rows[row]
                # A batch whose rows all ended stops rather than seating joiners one by one:
                # the waiting requests then open the next batch with one prefill for all.
                joiners = self._take_joiners(batch, key, len(rows)) if rows else []
                group += joiners  # answered like the others if the model fails
                for t in joiners:
                    sampling = asdict(t.request.sampler) if key.do_sample else {}
                    try:
                        row, token = batch.join(
                            t.request.prompt, t.request.max_new_tokens, **sampling
                        )
                    except ValueError as e:  # the runtime refused this request alone
                        t._finished = True
                        out.append((t, ("error", e)))
                        continue
                    t.started, t.batch_index = time.monotonic(), record.index
                    record.requests += 1
                    record.joined += 1
                    record.waits_s.append(t.started - t.arrived)
                    rows[row] = t
                    self._emit(t, token, eos, out)
                for t in rows.values():
                    t.batch_requests = record.requests
                loop.call_soon_threadsafe(_deliver, out)
                out = []
                if not batch.rows:
                    break
                # Read the ids back every step while someone streams or waits to join;
                # otherwise every few steps (a host sync per step idles the GPU).
                seat = self.waiting and batch.free_rows() and len(rows) < self.policy.max_requests
                per_step = seat or any(t.request.stream for t in rows.values())
                for pairs in batch.steps(1 if per_step else QUIET_STEPS):
                    for row, token in pairs:
                        self._emit(rows[row], token, eos, out)
                    record.steps += 1
            for t in rows.values():  # the runtime ends a row only at its EOS or budget
                if not t._finished:
                    t._finished = True
                    out.append((t, ("end", "length")))
            loop.call_soon_threadsafe(_deliver, out)
            out = []
        except BaseException:
            # What this step already answered goes out before the error: a row that ended
            # (its ticket marked finished) or a joiner refused is not among those `_call`
            # answers with the error, and would wait for good.
            if out:
                loop.call_soon_threadsafe(_deliver, out)
            raise
        finally:
            batch.close()

    def _take_joiners(self, batch, key, live: int) -> list[Ticket]:
        """The waiting requests that `batch` (running `live` requests) seats now, oldest
        first, up to `max_requests` at once; stops at the first live one that cannot join (it
        opens the next batch)."""
        taken: list[Ticket] = []
        free = min(batch.free_rows(), self.policy.max_requests - live)
        with self._pending_lock:
            for t in self._pending:
                if t.cancelled:
                    continue
                r = t.request
                if len(taken) == free or r.key != key:
                    break
                if not batch.can_join(len(r.prompt), r.max_new_tokens):
                    break
                taken.append(t)
            if taken:
                ids = set(map(id, taken))
                self._pending = [t for t in self._pending if id(t) not in ids]
        return taken

    @staticmethod
    def _emit(t: Ticket, token: int, eos: frozenset, out: list) -> None:
        """Hand one token of `t`'s row to its request, unless the request is answered or
        abandoned; finish it at its EOS or its own max_new_tokens."""
        if t._finished:
            return
        if t.cancelled:
            t._finished = True
            return
        t._sent += 1
        out.append((t, ("token", token)))
        if token in eos:
            t._finished = True
            out.append((t, ("end", "eos")))
        elif t._sent >= t.request.max_new_tokens:
            t._finished = True
            out.append((t, ("end", "length")))


def _per_step(group: list[Ticket]) -> bool:
    """Read ids back every step when a request streams, or when requests end at different
    steps (each is answered at its own end, not the batch's)."""
    return (
        any(t.request.stream for t in group) or len({t.request.max_new_tokens for t in group}) > 1
    )


def _deliver(items: list) -> None:
    for ticket, item in items:
        ticket._queue.put_nowait(item)
