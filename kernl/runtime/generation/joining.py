"""A running batch that new requests join between decode steps (`GenerativeModel.open_batch`).

A batch bucket's decode step already keeps a position, a row of valid cache slots and the
sampler's parameters per row; only the cache slot it writes is shared. So a request can join
a running batch in a free row (one that never held a request, or whose request ended) at the
step where the batch writes slot `s`, if its prompt bucket P fits before it (P <= s):
- its prompt is prefilled alone, on the smallest batch bucket's own buffers and graph (the
  same step that `generate` runs for one prompt), which gives its first token;
- that prefill's keys and values, slots [0, P) of the small cache, are copied into the row's
  slots [s - P, s) of the running cache; the row's valid slots are those and no other (what
  the row's previous request left there is never attended);
- the row's position, token, finished flag and sampler parameters are set from the small
  batch's row; its noise is keyed by its own step count (SamplerParams.step_offset), so a
  seeded row draws what it would alone.
Rotary (or learned) positions are the row's own, never the slot's: attention over the cache
sees the same keys as the request alone would, at other slots. The copies run on the stream
between two graph replays; nothing is captured anew.

A joiner must be able to finish inside the cache: s + max_new_tokens - 1 <= cache length. A
batch whose bucket is the smallest has no smaller bucket to prefill joiners on: nobody joins
it. The batch holds the model (its lock) from `open_batch` to `close`, or until the batch
object is collected (a batch dropped without `close` does not lock the model for good); one
thread drives it. A closed batch refuses to step or join: other calls may have reused its
bucket's cache since."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from kernl.artifacts.schema import pick_size

from .numbers import plain_number
from .sampling import call_seed, checked_seed


class _BatchDefault:
    """join()'s temperature, top-k or top-p left out: the batch's own (OpenBatch.__init__),
    where None already means "off"."""

    def __repr__(self) -> str:
        return "<the batch's>"


BATCH_DEFAULT: Any = _BatchDefault()


class OpenBatch:
    """See the module docstring. `first` holds (row, token) of the opening rows' first tokens;
    `step()` and `join()` give (row, token) pairs, `steps(n)` a list of them per step. A row
    is freed once it emitted an EOS id or its own `max_new_tokens`, or by `release(row)`."""

    def __init__(self, model, plan, sampling: tuple, limits: list[int]):
        self.model = model
        self.plan = plan
        self.bucket = plan.batch_bucket
        self.state = model._states[self.bucket]
        self.do_sample = plan.do_sample
        # a joiner's temperature, top-k and top-p when it gives none: the batch's (where one
        # value serves every opening row), else generate's defaults
        self._join_sampling = tuple(
            default if isinstance(value, (list, tuple)) else value
            for value, default in zip(sampling[:3], (1.0, 50, 1.0))
        )
        self.eos = frozenset(plan.eos)
        smallest = min(model.buckets.batches)
        self.join_bucket = smallest if smallest < self.bucket else None
        self._left: dict[int, int] = {}  # live row -> tokens it may still emit
        self._slot = plan.prompt_bucket  # the cache slot the next decode step writes
        self._steps = 1  # steps run so far (the prefill is the first)
        # steps, joins, releases and close() one at a time: a close() from another thread (a
        # cancel handler) freed the model mid-steps, and a waiting generate() then ran on the
        # batch's own buffers (wrong ids, or an out-of-bounds cache index; review)
        self._busy = threading.RLock()
        model._refuse_reentry()
        self._hold = _ModelHold(model)
        # released once: by close(), or when the batch is collected unclosed. Made before the
        # lock is taken: a Ctrl-C between the two left the model locked for good.
        self._release = weakref.finalize(self, _ModelHold.release, self._hold)
        # Everything after the lock is taken runs in the try: a failure that left the batch
        # open kept the model locked for as long as its traceback lived (a notebook keeps the
        # last one), so other threads' calls waited and this thread's were refused.
        try:
            self._hold.acquire()
            self._capture_steps()
            model.decoder.clear_persistent_timeout()
            model._start(plan, *sampling)
            model._step(("prefill", self.bucket, plan.prompt_bucket, plan.do_sample)).run()
            ids = self.state.tokens[: plan.batch].tolist()
            self._left = dict(enumerate(limits))
            self.first = self._emitted(list(enumerate(ids)))
        except BaseException:
            self.close()
            raise

    def _capture_steps(self) -> None:
        """Every step this batch and its joiners can replay, captured before any buffer holds
        a request: capturing runs a step for real after resetting its bucket's slot, positions
        and valid slots, which mid-batch would wipe the running rows (sampling graphs are
        otherwise captured on first use)."""
        model, buckets = self.model, self.model.buckets
        slots = range(self.plan.prompt_bucket, buckets.cache_len)
        for kv in sorted({pick_size(buckets.kv_lengths, s + 1) for s in slots}):
            model._step(("decode", self.bucket, kv, self.do_sample))
        if self.join_bucket is not None:
            for p in buckets.prompts:
                model._step(("prefill", self.join_bucket, p, self.do_sample))

    @property
    def rows(self) -> list[int]:
        """The rows whose request is still generating."""
        return sorted(self._left)

    @property
    def slot(self) -> int:
        return self._slot

    def free_rows(self) -> int:
        return self.bucket - len(self._left)

    def can_join(self, prompt_length: int, max_new_tokens: int) -> bool:
        """Whether a request of this prompt length and budget may join now (join() then runs
        it); a request this refuses may fit later (a freed row, a later slot) or never. A
        length or budget that no request can have (0, negative, not an integer) raises
        ValueError, as join() does, rather than answering for a request join() would refuse."""
        prompt_length, max_new_tokens = plain_number(prompt_length), plain_number(max_new_tokens)
        for name, value in (("prompt_length", prompt_length), ("max_new_tokens", max_new_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"can_join takes a positive integer {name}, got {value!r}")
        if self.closed or self.join_bucket is None or self.free_rows() == 0:
            return False
        bucket = pick_size(self.model.buckets.prompts, prompt_length)
        if bucket is None or bucket > self._slot:
            return False
        return self._slot + max_new_tokens - 1 <= self.model.buckets.cache_len

    def join(
        self,
        input_ids,
        max_new_tokens: int,
        temperature: float | None = BATCH_DEFAULT,
        top_k: int | None = BATCH_DEFAULT,
        top_p: float | None = BATCH_DEFAULT,
        seed: int | None = None,
    ) -> tuple[int, int] | None:
        """Prefill one prompt alone and seat it in a free row: (row, its first token), or None
        when `can_join` says it cannot join now. A bad prompt or argument raises ValueError
        (as `generate` would), leaving the batch as it was; so does a batch on the smallest
        batch bucket, which nobody can ever join. Temperature, top-k and top-p left out are
        the batch's own (one value for every opening row; else generate's defaults); a seed
        left out is drawn from torch's RNG, as generate draws one. In a tensor prompt, the
        batch's pad id marks padding, as in `generate` without an attention_mask."""
        with self._busy:
            return self._join(input_ids, max_new_tokens, temperature, top_k, top_p, seed)

    def _join(self, input_ids, max_new_tokens, temperature, top_k, top_p, seed):
        self._check_open()
        self._driven_here()
        if self.join_bucket is None:  # never "not now": it cannot ever join
            raise ValueError(
                f"nobody can join this batch: it runs on the smallest batch bucket "
                f"({self.bucket} rows), and joiners are prefilled on a smaller one. Open it "
                f"with rows= a larger bucket ({self.model.buckets.batches}), or compile a "
                "smaller batch bucket (e.g. batch=1)"
            )
        temperature, top_k, top_p = (
            own if value is BATCH_DEFAULT else value
            for value, own in zip((temperature, top_k, top_p), self._join_sampling)
        )
        max_new_tokens, temperature, top_k, top_p, seed = map(
            plain_number, (max_new_tokens, temperature, top_k, top_p, seed)
        )
        model, plan = self.model, self.plan
        try:
            prompt = torch.as_tensor(input_ids)
        except (TypeError, ValueError, RuntimeError):  # "hello", None, [1, [2]]
            raise ValueError(
                f"join takes one prompt of token ids (a list of ints or a 1-D tensor), got "
                f"{type(input_ids).__name__} {input_ids!r:.80}"
            ) from None
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1 or prompt.numel() == 0:
            raise ValueError(f"join takes one prompt of token ids, got {tuple(prompt.shape)}")
        if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integers, got {prompt.dtype}")
        prompt = prompt.to("cpu", torch.int64).view(1, -1)
        # A tensor's padding as generate takes it: the positions of the batch's pad id.
        tensor = not isinstance(input_ids, (list, tuple))
        mask = pad_mask(prompt, plan.mask_pad if tensor else None)
        # The batch's own EOS and pad ids: a request with other ones cannot share it.
        small = model._plan(
            prompt,
            mask,
            max_new_tokens,
            self.do_sample,
            temperature,
            top_k,
            top_p,
            plan.eos,
            plan.pad,
            checked_seed(seed),
        )
        if not self.can_join(len(small.rows[0]), max_new_tokens):
            return None  # not now: its seed not drawn, as if never asked
        sampling = (temperature, top_k, top_p, call_seed(seed, self.do_sample))
        row = min(set(range(self.bucket)) - set(self._left))
        # the joiner's prefill runs on the smallest bucket's buffers: the batch's are untouched
        source = model._start(small, *sampling)
        p = small.prompt_bucket
        model._step(("prefill", self.join_bucket, p, self.do_sample)).run()
        try:
            big, s = self.state, self._slot
            # the row's other slots hold its last request's values: zeros, as a prefill leaves
            # them where the decode attention reads masked slots (state.py: 0 x NaN is NaN)
            if model.decoder.reads_masked_slots:
                big.cache.k[:, row].zero_()
                big.cache.v[:, row].zero_()
            big.cache.k[:, row, :, s - p : s].copy_(source.cache.k[:, 0, :, :p])
            big.cache.v[:, row, :, s - p : s].copy_(source.cache.v[:, 0, :, :p])
            big.kv_valid[row].fill_(False)
            big.kv_valid[row, s - p : s].copy_(source.kv_valid[0, :p])
            for name in ("positions", "tokens", "finished"):
                getattr(big, name)[row].copy_(getattr(source, name)[0])
            # Its own step n (n = 1 at its first decode) runs as the batch's step self._steps.
            big.sampler.copy_row(row, source.sampler, 0, self._steps - 1)
        except BaseException:
            self.close()  # a row half seated: as in steps(), the batch cannot go on
            raise
        self._left[row] = max_new_tokens
        return self._emitted([(row, int(source.tokens[0]))])[0]

    def step(self) -> list[tuple[int, int]]:
        """One decode step of the whole bucket: (row, token) for every live row."""
        return self.steps(1)[0]

    def steps(self, n: int) -> list[list[tuple[int, int]]]:
        """Up to `n` decode steps replayed back to back, the ids read back once at the end
        (a host sync per step idles the GPU between steps): each step's (row, token) pairs
        of the rows live at that step. Stops at the first step where a live row spends its
        budget, so that no row passes it (a row's EOS frees it mid-way)."""
        with self._busy:
            return self._steps_locked(n)

    def _steps_locked(self, n: int) -> list[list[tuple[int, int]]]:
        self._check_open()
        self._driven_here()
        n = plain_number(n)  # np.int64(2), as join() and generate() take them
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"steps(n) takes a positive integer, got {n!r}")
        if not self._left:
            raise RuntimeError("no row of this batch is generating: join one, or close it")
        n = min(n, *self._left.values())
        first = self._steps  # the column of `state.out` the first of these steps writes
        try:
            for _ in range(n):
                kv = pick_size(self.model.buckets.kv_lengths, self._slot + 1)
                self.model._step(("decode", self.bucket, kv, self.do_sample)).run()
                self._slot += 1
                self._steps += 1
            ids = self.state.out[:, first : first + n].tolist()
            self.model._check_steps()
            # counted inside: an interrupt while the tokens are counted left the budgets
            # short of the steps run, and later steps ran past the cache (review)
            return [self._emitted([(row, ids[row][j]) for row in self.rows]) for j in range(n)]
        except BaseException:
            # steps ran whose ids nobody reads back: the rows' budgets no longer match the
            # cache. Going on lost those tokens and stepped past the cache (an interrupt
            # mid-steps, 2026-12-05): closed, the batch refuses to, and frees the model
            self.close()
            raise

    def release(self, row: int) -> None:
        """Stop generating for `row` (its client left): it emits the pad id from now on and
        may seat a joiner (after close(), nothing: the cache may serve other calls)."""
        row = plain_number(row)  # a tensor or numpy row, as steps() hands them out
        if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < self.bucket:
            raise ValueError(
                f"release takes a row of this batch, 0 to {self.bucket - 1}, got {row!r}"
            )
        with self._busy:
            if self.closed:
                return
            if self._left.pop(row, None) is not None:
                self.state.finished[row].fill_(True)

    def close(self) -> None:
        """Free the model for other calls; the batch then refuses to step or join. From
        another thread, it waits for the step or join in flight."""
        with self._busy:
            self._release()
            self._left.clear()

    @property
    def closed(self) -> bool:
        return not self._release.alive

    def _driven_here(self) -> None:
        """The model is held by the thread that drives the batch now, as a stream's is by the
        thread that pulled its last step: a pool worker stepping a batch another opened
        waited for itself forever in its own next generate(), with no error (review)."""
        if self._hold.held and self.model._lock is self._hold.lock:
            me = threading.current_thread()
            self.model._streaming_thread = me
            # and by every thread that drove it: the opener's own generate() inside its with
            # block waited forever once a worker had stepped it (review)
            if me not in self.model._batch_threads:
                self.model._batch_threads = {*self.model._batch_threads, me}

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(
                "this batch is closed: other calls may have reused its cache since; open a "
                "new one with open_batch()"
            )
        if self.model._lock is not self._hold.lock:
            # a forked child's copy: its model is free there, and its calls reuse the cache
            raise RuntimeError(
                "this batch was opened before the process forked: this process's model does "
                "not hold it; open a new one with open_batch()"
            )

    def __enter__(self) -> OpenBatch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _emitted(self, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Count each row's token; free the rows that emitted an EOS id or their last token."""
        for row, token in pairs:
            self._left[row] -= 1
            if token in self.eos or self._left[row] == 0:
                self.release(row)
        return pairs


class _ModelHold:
    """The model's lock as an open batch holds it (not the batch itself: a finalizer of the
    batch releases it)."""

    def __init__(self, model):
        # the lock object it takes: a forked child gives the model a fresh one meanwhile
        self.lock = model._lock
        self.model = model
        self._holding = None

    def acquire(self) -> None:
        # The lock is taken in a `with` inside a generator: an interrupt (Ctrl-C, a request
        # timeout's async exception) that lands right after the acquire runs the with's exit,
        # and one that lands after next() returns finds the generator stored, which release()
        # (or its collection) closes. `self.held = self.lock.acquire()` lost the lock there:
        # the exception came before the store, and the model stayed locked for good (review).
        self._holding = self._hold()
        next(self._holding)

    def _hold(self):
        with self.lock:
            self.model._streaming_thread = threading.current_thread()
            self.model._batch_threads = {threading.current_thread()}
            self.model._holder = "open_batch()"
            try:
                yield
            finally:
                if self.model._lock is self.lock:
                    self.model._streaming_thread = None
                    self.model._batch_threads = frozenset()

    @property
    def held(self) -> bool:
        return self._holding is not None and self._holding.gi_frame is not None

    def release(self) -> None:
        holding, self._holding = self._holding, None
        if holding is not None:  # a generator that never got the lock closes as a no-op
            holding.close()


def pad_mask(ids: torch.Tensor, pad: int | None) -> torch.Tensor:
    """Hugging Face's inferred attention mask: False at the pad id (None: all True)."""
    if pad is None:
        return torch.ones_like(ids, dtype=torch.bool)
    return ids != pad
