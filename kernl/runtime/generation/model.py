"""Serve a causal-LM artifact: `model.generate(...)` and `model.stream(...)`.

At load: the weights go to the device once, each batch bucket gets its static buffers
(its KV cache a view of one the buckets share, but the smallest's: see
generation/state.py), and on CUDA every greedy step graph is captured
— one prefill graph per (batch, prompt) bucket, one decode graph per (batch, kv length)
bucket — all drawing on one memory pool. Sampling graphs are captured on the first sampling
call. A call left-pads each prompt into the smallest prefill bucket, replays its prefill, then
replays one decode graph per new token; the host reads nothing back until the end except,
every few steps, whether every row has finished (and each step's ids when streaming).

Padded `input_ids` given without an `attention_mask` get Hugging Face's decoder-only mask: the
positions of the call's pad id, unless that id is one of its EOS ids (`_plan`)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from kernl.artifacts.errors import ArtifactCorruptError
from kernl.artifacts.generation import (
    DECODE_KERNEL_CHOICES,
    DecodeKernels,
    DecoderSpec,
    GenerationBuckets,
)
from kernl.artifacts.generation_defaults import generation_defaults_of
from kernl.artifacts.schema import Manifest, pick_size

from ..binaries import KernelBinaries, running_with
from ..graphs import capture_graph
from ..model import input_tensor, new_call_lock, refuse_pickling
from .config_defaults import takes_generation_defaults
from .decoder import Decoder
from .hf_options import LENGTH_IS_A_BOUND, refuse_hf_options, shown_value
from .joining import OpenBatch, pad_mask
from .numbers import plain_number
from .sampling import MAX_TEMPERATURE, MIN_TEMPERATURE, call_seed, checked_seed
from .state import MAX_EOS_IDS, BatchState, shared_cache

# How often generate() asks the GPU whether every row has finished: a host sync costs a few
# microseconds of idle GPU, the extra steps after the last EOS only emit pad ids.
FINISHED_CHECK_EVERY = 8

# How long a call waits, on the thread that last pulled an open stream(), for another thread
# to pull it on (a server's thread pool does) before taking it for re-entry (`_refuse_reentry`).
STREAM_HANDOFF_WAIT_S = 2.0


class _Step:
    """One step function: run eagerly, or captured once as a CUDA graph and replayed.
    `running` is the model's launch context (its kernel binaries, its device), entered only
    around the step itself: never across a `stream()` yield, where the caller's own code runs."""

    def __init__(
        self,
        fn: Callable[[], torch.Tensor],
        reset: Callable[[], None],
        running: Callable[[], AbstractContextManager] | None = None,
    ):
        self.fn = fn
        self.reset = reset
        self.running = running
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def capture(self, pool, device: torch.device) -> None:
        with _enter(self.running):
            self.graph, self.logits = capture_graph(self.fn, pool, reset=self.reset, device=device)

    def run(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        with _enter(self.running):
            return self.fn()


def _enter(running: Callable[[], AbstractContextManager] | None) -> AbstractContextManager:
    from contextlib import ExitStack, nullcontext

    context = running() if running is not None else nullcontext()
    devices = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    if not devices:
        return context
    # The caller's torch.autocast would cast the step's matmuls to its dtype while the KV
    # cache keeps the artifact's ("index_copy_(): ... Float and BFloat16" in the first decode
    # step): the step runs in the dtype it was compiled for, as a replayed graph does.
    stack = ExitStack()
    for device in devices:
        stack.enter_context(torch.autocast(device, enabled=False))
    stack.enter_context(context)
    return stack


class StepLoop:
    """The host side of generation shared by the causal-LM and encoder-decoder models: run a
    request's steps (`_run(plan, state)` yields each step's logits) collecting the ids, or
    yield them as they come. A plan has `batch` and `eos`; a state `tokens`, `finished`, `out`.
    `_lock` serialises requests; an open stream() holds it between its yields, an open batch
    (`open_batch`) until it is closed."""

    __reduce__ = refuse_pickling

    _lock: threading.Lock
    # The thread holding the lock between calls: an open batch's, or the thread that pulled
    # an open stream's last step (any thread may pull the next one). The Thread object, not
    # its ident: a new thread may get an ended one's ident and would be taken for the holder.
    _streaming_thread: threading.Thread | None = None
    _batch_threads: frozenset | set = frozenset()  # the threads that opened or drove the batch
    _holder: str = "stream()"  # what it holds it for: "stream()" or "open_batch()"

    def _collect(self, plan, state, first: int = 1) -> torch.Tensor:
        """Every step's ids [batch, steps run] on the CPU; stops early once every row has
        finished (checked every few steps from step `first` on)."""
        n = 0
        for n, _ in enumerate(self._run(plan, state), 1):
            if plan.eos and n >= first and n % FINISHED_CHECK_EVERY == 0:
                if bool(state.finished[: plan.batch].all()):
                    break
        out = state.out[: plan.batch, :n].to("cpu", copy=True)
        self._check_steps()
        return out

    def _check_steps(self) -> None:
        """Raise if a step of this request is known to have computed wrongly (a model whose
        steps can tell: the persistent decode step's timed-out barrier)."""

    def _stream_steps(
        self, plan, start: Callable, output_logits: bool, steps: int, skip: int = 0
    ) -> Iterator:
        """Yield the ids of each step after the first `skip` of the `steps` that `_run`
        yields (the state comes from `start()`, under the lock), with its float32 logits when
        `output_logits`; stops after the step where every row has finished. The last step is
        yielded after the lock is released: a consumer that reads the tokens it expects and
        pulls no further (nor closes the stream) leaves the model free for other requests."""
        self._refuse_reentry()
        last = None
        with self._lock:
            self._streaming_thread, self._holder = threading.current_thread(), "stream()"
            try:
                state = start()
                for n, logits in enumerate(self._run(plan, state), 1):
                    if n <= skip:
                        continue
                    # the logits' copy is queued before the ids' copy to the host, which waits
                    # for it: once the lock is released, the next request's steps may
                    # overwrite the logits buffer from another thread
                    out = logits[: plan.batch].float().clone() if output_logits else None
                    ids = state.tokens[: plan.batch].to("cpu", copy=True)
                    self._check_steps()
                    item = (ids, out) if output_logits else ids
                    if n == steps or bool(state.finished[: plan.batch].all()):
                        last = item
                        break
                    yield item
                    # Whichever thread resumed the stream holds it now (a web server's thread
                    # pool pulls each step on whichever worker is free).
                    self._streaming_thread = threading.current_thread()
            finally:
                self._streaming_thread = None
        if last is not None:
            yield last

    def _refuse_reentry(self) -> None:
        """The lock is held by an open stream() between its yields, or by an open batch: the
        thread that holds it would wait for itself forever. A stream is held by the thread
        that pulled its last step; when another thread pulls the next one within
        STREAM_HANDOFF_WAIT_S (a thread pool moving the stream between its workers), this
        call waits its turn instead."""
        me = threading.current_thread()
        batch = self._holder == "open_batch()" and self._lock.locked()
        if self._streaming_thread is not me and not (batch and me in self._batch_threads):
            return
        if self._holder == "open_batch()":
            raise RuntimeError(
                "this thread holds an open batch of this model (open_batch()): call its "
                "close() (or leave its with block) before generate(), stream() or "
                "open_batch() again"
            )
        deadline = time.monotonic() + STREAM_HANDOFF_WAIT_S
        while self._streaming_thread is me and time.monotonic() < deadline:
            time.sleep(0.005)
        if self._streaming_thread is not me:
            return
        raise RuntimeError(
            "this thread pulled the last step of an open stream() of this model (a stream "
            "holds the model until it ends): exhaust it or call its close() before "
            "generate() or stream() again. A `break` closes only a stream no variable names; "
            "iterate `contextlib.closing(model.stream(...))` to close a named one on any exit"
        )


@dataclass
class _Plan:
    rows: list[list[int]]
    batch_bucket: int
    prompt_bucket: int
    max_new_tokens: int
    do_sample: bool
    eos: list[int]
    pad: int
    # The pad id whose positions are padding when no attention_mask is given (None: none).
    mask_pad: int | None = None

    @property
    def batch(self) -> int:
        return len(self.rows)


def asked_length(max_new_tokens: int | None, max_length: int | None, new: int) -> str:
    """The `new` tokens of a call as the call asked for them (its max_new_tokens, its
    max_length, or neither), for a message refusing them: a call that gave no length was told
    "max_new_tokens 20 exceeds the decoder cache", an argument it never passed."""
    if max_new_tokens is not None:
        return f"max_new_tokens {new}"
    if max_length is None:
        return f"the default of {new} new tokens (no max_new_tokens given)"
    return f"max_length {max_length} ({new} new tokens)"


class _ModelDefault:
    """The default of an option whose None means "none" (eos_token_id, pad_token_id): Hugging
    Face's generate applies a keyword even when it is None (GenerationConfig.update), so an
    explicit None is not "the model's" there either (seq2seq.py's forced_bos_token_id reasons
    the same way)."""

    def __repr__(self) -> str:
        return "<the model's>"


MODEL_DEFAULT: Any = _ModelDefault()


# generate's options that a caller may hold as numpy or torch scalars (a loop over
# np.arange, a value read from a tensor): taken as the Python numbers they stand for.
_NUMERIC_OPTIONS = frozenset(
    {
        "max_new_tokens",
        "max_length",
        "temperature",
        "top_k",
        "top_p",
        "seed",
        "eos_token_id",
        "pad_token_id",
        "forced_bos_token_id",
    }
)


def plain_numbers(method: Callable) -> Callable:
    """generate/stream/open_batch with their numeric options as Python numbers."""

    names = list(inspect.signature(method).parameters)[1:]  # after self, in order

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(
            plain_number(a) if i < len(names) and names[i] in _NUMERIC_OPTIONS else a
            for i, a in enumerate(args)
        )
        for name in _NUMERIC_OPTIONS & kwargs.keys():
            kwargs[name] = plain_number(kwargs[name])
        return method(self, *args, **kwargs)

    return wrapper


class GenerativeModel(StepLoop):
    """A loaded causal-LM artifact; see `generate` and `stream`."""

    def __init__(
        self,
        manifest: Manifest,
        weights: dict[str, torch.Tensor],  # taken: left empty
        device: torch.device,
        capture: str = "load",
        binaries: KernelBinaries | None = None,
    ):
        if capture not in ("load", "lazy", "never"):
            raise ValueError(f"capture must be 'load', 'lazy' or 'never', not {capture!r}")
        self.manifest = manifest
        self.device = device
        # what generate/stream take where a call leaves them out (config_defaults.py)
        self.generation_defaults = generation_defaults_of(manifest.extra)
        self._binaries = binaries
        try:
            self.spec = DecoderSpec.from_dict(manifest.extra["decoder"])
            self.buckets = GenerationBuckets.from_dict(manifest.extra["generation_buckets"])
            kernels = DecodeKernels.from_dict(manifest.extra.get("decode_kernels"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactCorruptError(
                f"the manifest's causal-LM description is invalid: {type(e).__name__}: {e}"
            ) from None
        self.dtype = getattr(torch, manifest.dtype)
        self.capture_mode = capture if device.type == "cuda" else "never"
        self._lock = new_call_lock(self)
        self._pool = torch.cuda.graph_pool_handle() if self.capture_mode != "never" else None
        spec = self.spec
        self.default_pad = (
            spec.pad_token_id
            if spec.pad_token_id is not None
            else (spec.eos_token_ids[0] if spec.eos_token_ids else 0)
        )
        kernels = _runnable(kernels, device)
        # The decoder takes the tensors: the dict is emptied before the persistent step stacks
        # the layers' weights (new tensors), or the loaded ones would sit beside the stacks
        # until load() returns, through the graphs' capture (twice the weights at load).
        pieces = dataclasses.replace(kernels, step="pieces")
        self.decoder = Decoder(spec, weights, self.buckets.cache_len, self.dtype, device, pieces)
        weights.clear()
        self.decoder.kernels = kernels
        shared = shared_cache(self.decoder, self.buckets.batches, self.buckets.cache_len, device)
        smallest = min(self.buckets.batches)
        self._states = {
            b: BatchState(
                self.decoder,
                b,
                self.buckets.prompts,
                self.buckets.cache_len,
                self.default_pad,
                device,
                shared if b > smallest else None,
            )
            for b in self.buckets.batches
        }
        self._steps: dict[tuple, _Step] = {}
        if self.capture_mode == "load":
            # Largest first, so smaller graphs reuse the pool's blocks.
            keys = [("prefill", b, p, False) for b, p in self.buckets.prefill_shapes()]
            keys.sort(key=lambda k: -k[1] * k[2])
            keys += [("decode", b, k, False) for b, k in self.buckets.decode_shapes()]
            for key in keys:
                self._step(key)

    def _check_steps(self) -> None:
        if self.decoder.persistent_timed_out():
            raise RuntimeError(
                "a persistent decode step timed out waiting at a grid barrier, so this "
                "request's tokens are wrong: another kernel held SMs the step needed (two "
                "persistent steps running at once on this GPU, from two streams or under "
                "MPS?). Run one model's generation at a time per GPU, or compile with "
                "--no-tune (tune=False), which keeps the plain torch decode step."
            )

    # -- public API -------------------------------------------------------------------------

    @takes_generation_defaults
    @plain_numbers
    def generate(
        self,
        input_ids=None,
        attention_mask=None,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 50,
        top_p: float | Sequence[float] = 1.0,
        eos_token_id: int | Sequence[int] | None = MODEL_DEFAULT,
        pad_token_id: int | None = MODEL_DEFAULT,
        seed: int | Sequence[int] | None = None,
        max_length: int | None = None,
        **hf_options: Any,
    ) -> torch.Tensor:
        """Like Hugging Face `generate`: returns [batch, prompt + new] ids, the prompt as given
        followed by the new tokens; a row that emitted an EOS id is padded with `pad_token_id`
        (default: the model's pad id, else the first EOS id) until every row has finished or
        `max_new_tokens` were produced. Prompts may differ in length (`attention_mask` zeros
        mark padding, on either side; in a tensor without one, as in Hugging Face, the pad
        id's positions are, unless it is an EOS id; a list of token lists is left-padded with
        the pad id). `input_ids` may be passed as `inputs`, as in Hugging Face.
        `eos_token_id` defaults to the model's. As in Hugging Face, an explicit None is a
        value, not the default: `eos_token_id=None` stops at no EOS id, `pad_token_id=None`
        pads with the first EOS id (and infers no mask from the pad id). Sampling
        (`do_sample=True`) applies temperature, top-k, top-p (None: off); the same `seed`
        gives the same ids, and a call without one (None) draws its seed from torch's global
        RNG, as Hugging Face samples (`torch.manual_seed(n)` repeats it). Each of the four is
        one value or a list of one per row; with a seed per row, each row draws what it would
        alone with its seed. `max_new_tokens`
        defaults to 20; `max_length`, as in Hugging Face, counts the prompt (its padded
        length) too, and `max_new_tokens` wins when both are given."""
        input_ids = main_input("generate", input_ids, hf_options)
        refuse_hf_options("generate", hf_options)
        sampling = (do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id, seed)
        prompt, plan = self._request(
            input_ids, attention_mask, max_new_tokens, max_length, sampling
        )
        seed = call_seed(seed, do_sample is True)  # once taken: a refused call draws nothing
        with self._lock:
            new = self._collect(plan, self._start(plan, temperature, top_k, top_p, seed))
        new = new[:, : _generated_length(new, plan.eos)]
        return torch.cat([prompt, new], dim=1).to(_device_of(input_ids))

    @takes_generation_defaults
    @plain_numbers
    def stream(
        self,
        input_ids=None,
        attention_mask=None,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 50,
        top_p: float | Sequence[float] = 1.0,
        eos_token_id: int | Sequence[int] | None = MODEL_DEFAULT,
        pad_token_id: int | None = MODEL_DEFAULT,
        seed: int | Sequence[int] | None = None,
        output_logits: bool = False,
        max_length: int | None = None,
        **hf_options: Any,
    ) -> Iterator:
        """The same generation, yielding each step's new ids ([batch] on the CPU) as they come
        (with `output_logits`, pairs of ids and that step's float32 logits [batch, vocab]).
        Stops after the step where every row has finished. Arguments are checked before this
        returns; the model serves nothing else until the iterator is exhausted or closed
        (the thread iterating it gets a RuntimeError if it calls `generate` or `stream`
        before then, instead of waiting for itself; the stream may move between threads, as
        a server's thread pool pulls it: see `_refuse_reentry`)."""
        input_ids = main_input("stream", input_ids, hf_options)
        refuse_hf_options("stream", hf_options)
        sampling = (do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id, seed)
        _, plan = self._request(input_ids, attention_mask, max_new_tokens, max_length, sampling)
        seed = call_seed(seed, do_sample is True)  # once taken: a refused call draws nothing
        start = lambda: self._start(plan, temperature, top_k, top_p, seed)  # noqa: E731
        return self._stream_steps(plan, start, output_logits, steps=plan.max_new_tokens)

    @takes_generation_defaults
    @plain_numbers
    def open_batch(
        self,
        input_ids,
        max_new_tokens: int | Sequence[int] | None = None,
        do_sample: bool = False,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 50,
        top_p: float | Sequence[float] = 1.0,
        eos_token_id: int | Sequence[int] | None = MODEL_DEFAULT,
        pad_token_id: int | None = MODEL_DEFAULT,
        seed: int | Sequence[int] | None = None,
        rows: int | None = None,
    ) -> OpenBatch:
        """Start a batch that other prompts can join between its steps (`OpenBatch.join`,
        see generation/joining.py): the prompts' prefill runs now and `.first` holds their
        first tokens; `.step()` runs one decode step. `max_new_tokens` is one budget or one per
        prompt (None: 20, as in `generate`); `rows` asks for a batch bucket with at least that
        many rows (room for joiners; default: the prompts'). Each row's tokens are those
        `generate` gives its prompt alone (greedy; sampled rows with a seed per row);
        `eos_token_id` and `pad_token_id` as in `generate`. The model serves nothing else
        until `close()` (or the end of a `with` block)."""
        budgets = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else None
        bad = [n for n in budgets or [] if not _is_int(n) or n < 1]
        if bad or budgets == []:
            raise ValueError(f"max_new_tokens must be positive integers, got {bad or budgets!r}")
        # None as generate takes it, before the batch takes the model: a None budget got
        # through every check and failed after the prefill, with the model locked
        most = max(budgets) if budgets else _new_tokens(max_new_tokens, None, 0)
        sampling = (do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id, seed)
        _, plan = self._request(input_ids, None, most, None, sampling)
        if budgets is not None and len(budgets) != plan.batch:
            raise ValueError(f"{len(budgets)} max_new_tokens for {plan.batch} prompts")
        if rows is not None:
            rows = plain_number(rows)
            if not _is_int(rows) or rows < 1:
                raise ValueError(
                    f"rows must be a positive integer (the batch's rows), got {rows!r}"
                )
            bucket = pick_size(self.buckets.batches, max(rows, plan.batch))
            if bucket is None:
                raise ValueError(
                    f"rows={rows}: no batch bucket holds that many ({self.buckets.batches})"
                )
            plan.batch_bucket = bucket
        # the plan cut a config's length to the cache (LENGTH_IS_A_BOUND, with a warning):
        # each row stops there too, as generate's do (they ran past the cache)
        limits = [min(n, plan.max_new_tokens) for n in budgets or [most] * plan.batch]
        seed = call_seed(seed, do_sample is True)  # once taken: a refused call draws nothing
        return OpenBatch(self, plan, (temperature, top_k, top_p, seed), limits)

    def _request(
        self, input_ids, attention_mask, max_new_tokens, max_length, sampling: tuple
    ) -> tuple[torch.Tensor, _Plan]:
        """generate's and stream's common start: (the prompts as one batch, the checked plan).
        A ragged list of token lists comes back left-padded with the call's pad id. The seed
        (sampling's last) may be None: the caller draws it once this returns (checked_seed)."""
        sampling = (*sampling[:-1], checked_seed(sampling[-1]))
        if input_ids is None:
            # HF's text-generation pipeline passes None for an empty prompt (HF's generate
            # then starts from the BOS id)
            raise TypeError(
                "input_ids is required: the prompt token ids [batch, length] (an empty prompt "
                "is not supported: give at least the BOS id)"
            )
        self._refuse_reentry()
        prompt, mask = _as_batch(input_ids, attention_mask)
        new = _new_tokens(max_new_tokens, max_length, prompt.shape[1])
        asked = asked_length(max_new_tokens, max_length, new)
        if _is_token_lists(input_ids):
            plan = self._plan(prompt, mask, new, *sampling, asked=asked)
            return prompt.masked_fill(~mask, plan.pad), plan
        # A tensor without a mask (what Hugging Face takes): the mask inferred from the pad id
        # (_plan). Lists of ids are taken as given.
        infer = attention_mask is None and not isinstance(input_ids, (list, tuple))
        return prompt, self._plan(prompt, None if infer else mask, new, *sampling, asked=asked)

    def __repr__(self) -> str:
        b = self.buckets
        return (
            f"GenerativeModel({self.manifest.model_type}, {self.manifest.dtype}, "
            f"device={self.device}, batch={b.batches}, prompt={b.prompts}, "
            f"kv={b.kv_lengths})"
        )

    # -- internals --------------------------------------------------------------------------

    def _plan(
        self,
        prompt,
        mask,
        max_new_tokens,
        do_sample,
        temperature,
        top_k,
        top_p,
        eos_token_id,
        pad_token_id,
        seed=0,
        asked: str | None = None,
    ) -> _Plan:
        """Check a request and pick its buckets; raises ValueError before touching any state
        (an out-of-range id reaching the GPU is a device-side error that poisons the whole
        CUDA context, not just this call). `mask` None: Hugging Face's for a decoder-only
        model given no attention_mask (`_prepare_attention_mask_for_generation`): the
        positions of the pad id (`pad_token_id`, else the model's) are padding, unless that
        id is one of the call's EOS ids (a pad id taken from the EOS never is).
        `eos_token_id`/`pad_token_id` MODEL_DEFAULT: the model's; None: Hugging Face's None
        (no EOS id; the pad id is the first EOS id)."""
        b = self.buckets
        vocab = self.spec.vocab_size
        check_options(
            max_new_tokens,
            do_sample,
            temperature,
            top_k,
            top_p,
            None if eos_token_id is MODEL_DEFAULT else eos_token_id,
            None if pad_token_id is MODEL_DEFAULT else pad_token_id,
            seed,
            vocab,
            len(prompt),
        )
        lo, hi = int(prompt.min()), int(prompt.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab}); got values in [{lo}, {hi}]")
        if eos_token_id is MODEL_DEFAULT:
            eos = self.spec.eos_token_ids
        else:
            eos = [] if eos_token_id is None else eos_token_id
        eos = [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
        if len(eos) > MAX_EOS_IDS:
            raise ValueError(f"at most {MAX_EOS_IDS} EOS ids are supported, got {len(eos)}")
        if pad_token_id is MODEL_DEFAULT:
            pad = self.default_pad if self.spec.pad_token_id is not None or not eos else eos[0]
            mask_pad = self.spec.pad_token_id
        elif pad_token_id is None:
            # HF's None pad falls back to the first EOS id, which then marks no padding
            pad, mask_pad = (eos[0] if eos else self.default_pad), None
        else:
            pad = mask_pad = int(pad_token_id)
        if mask_pad in eos:
            mask_pad = None
        inferred = mask is None
        if inferred:
            mask = pad_mask(prompt, mask_pad)
        rows = [prompt[i][mask[i]].tolist() for i in range(prompt.shape[0])]
        empty = [i for i, r in enumerate(rows) if not r]
        if empty:
            why = f"every id is the pad id {mask_pad}" if inferred else "attention_mask all 0"
            raise ValueError(f"row(s) {empty} of the batch have no tokens ({why})")
        batch, longest = len(rows), max(len(r) for r in rows)
        batch_bucket = pick_size(b.batches, batch)
        if batch_bucket is None:
            raise ValueError(
                f"batch of {batch} prompts is larger than every batch bucket of this artifact "
                f"({b.batches}); split the batch or recompile with a larger batch bucket"
            )
        prompt_bucket = pick_size(b.prompts, longest)
        if prompt_bucket is None:
            raise ValueError(
                f"a prompt of {longest} tokens is longer than every prompt bucket of this "
                f"artifact ({b.prompts}); shorten it or recompile with a longer prompt bucket"
            )
        room = b.cache_len - prompt_bucket + 1
        if max_new_tokens > room and LENGTH_IS_A_BOUND.get() is not None and room >= 1:
            warnings.warn(
                f"{LENGTH_IS_A_BOUND.get()} asks for up to {max_new_tokens} new tokens; this "
                f"artifact's KV cache of {b.cache_len} slots holds {room} after this prompt: "
                "generating at most that many (pass max_new_tokens, or recompile with a "
                "larger cache=)",
                stacklevel=4,
            )
            max_new_tokens = room
        if prompt_bucket + max_new_tokens - 1 > b.cache_len:
            raise ValueError(
                f"prompt bucket {prompt_bucket} + {asked or f'max_new_tokens {max_new_tokens}'}"
                " - 1 exceeds "
                f"the KV cache of {b.cache_len} slots; at most "
                f"{b.cache_len - prompt_bucket + 1} new tokens fit after this prompt "
                f"(recompile with a larger cache= to go further)"
            )
        return _Plan(
            rows, batch_bucket, prompt_bucket, max_new_tokens, do_sample, eos, pad, mask_pad
        )

    def _start(self, plan: _Plan, temperature, top_k, top_p, seed) -> BatchState:
        """Write the request into its batch bucket's buffers (one copy per buffer)."""
        state = self._states[plan.batch_bucket]
        p, bb = plan.prompt_bucket, plan.batch_bucket
        ids = torch.full((bb, p), plan.pad, dtype=torch.int64)
        valid = torch.zeros(bb, p, dtype=torch.bool)
        for i, row in enumerate(plan.rows):
            ids[i, p - len(row) :] = torch.tensor(row, dtype=torch.int64)
            valid[i, p - len(row) :] = True
        valid[plan.batch :, -1] = True  # rows that only fill the bucket: one token each
        active = torch.arange(bb) < plan.batch
        eos = torch.full((MAX_EOS_IDS,), -1, dtype=torch.int64)
        eos[: len(plan.eos)] = torch.tensor(plan.eos, dtype=torch.int64)
        state.prompt_ids[p].copy_(ids)
        state.prompt_valid[p].copy_(valid)
        state.active.copy_(active)
        state.eos.copy_(eos)
        state.pad.fill_(plan.pad)
        state.sampler.set(temperature, top_k, top_p, seed, self.spec.vocab_size)
        return state

    def _run(self, plan: _Plan, state: BatchState) -> Iterator[torch.Tensor]:
        """Replay the prefill, then one decode step per further token; yields each step's
        logits (device memory that the next step overwrites)."""
        prefill = self._step(("prefill", plan.batch_bucket, plan.prompt_bucket, plan.do_sample))
        decodes = {
            kv: self._step(("decode", plan.batch_bucket, kv, plan.do_sample))
            for kv in self._kv_lengths_for(plan)
        }
        self.decoder.clear_persistent_timeout()
        yield prefill.run()
        for n in range(1, plan.max_new_tokens):
            slot = plan.prompt_bucket + n - 1  # where this step writes its token's key/value
            kv = pick_size(self.buckets.kv_lengths, slot + 1)  # slots [0, slot] attended
            yield decodes[kv].run()

    def _kv_lengths_for(self, plan: _Plan) -> list[int]:
        slots = range(plan.prompt_bucket, plan.prompt_bucket + plan.max_new_tokens - 1)
        return sorted({pick_size(self.buckets.kv_lengths, s + 1) for s in slots})

    def _step(self, key: tuple) -> _Step:
        step = self._steps.get(key)
        if step is None:
            kind, batch, size, do_sample = key
            state = self._states[batch]
            if kind == "prefill":
                fn = lambda: state.prefill(size, do_sample)  # noqa: E731
            else:
                fn = lambda: state.decode(size, do_sample)  # noqa: E731
            # not the bound self._running: the model would hold itself in a cycle (its steps
            # -> the method -> the model), freed by gc only, so `del model` kept its memory
            running = functools.partial(running_with, self._binaries, self.device)
            step = _Step(fn, state.reset_counters, running)
            if self.capture_mode != "never":
                step.capture(self._pool, self.device)
            self._steps[key] = step
        return step


def _kernel_modules() -> dict:
    """The kernel module behind each (piece, choice) that is not plain torch or SDPA."""
    from kernl.kernels import (
        decode_attention,
        decode_step,
        gated_mlp,
        lm_head_argmax,
        norm,
        norm_linear,
        rope_cache_write,
        skinny_linear,
        skinny_linear_fused,
    )

    return {
        ("attention", "triton"): decode_attention,
        ("norm", "triton"): norm,
        ("norm", "fused"): norm_linear,
        ("gated_mlp", "triton"): gated_mlp,
        ("linear", "triton"): skinny_linear,
        ("linear", "fused"): skinny_linear_fused,
        ("rope", "triton"): rope_cache_write,
        ("lm_head", "triton"): lm_head_argmax,
        ("step", "persistent"): decode_step,
    }


def _runnable(kernels: DecodeKernels, device: torch.device) -> DecodeKernels:
    """On the CPU, kernl's kernels run only in Triton's interpreter (see
    kernl_ops.triton_usable); where it is not on, the plain torch pieces compute the same."""
    if device.type != "cpu" or kernels == DecodeKernels():
        return kernels
    from ..kernl_ops import triton_usable

    modules = _kernel_modules()
    kept = {}
    for piece, choice in dataclasses.asdict(kernels).items():
        module = modules.get((piece, choice))
        usable = module is None or triton_usable(device, module)
        kept[piece] = choice if usable else DECODE_KERNEL_CHOICES[piece][0]
    return DecodeKernels(**kept)


def _is_token_lists(input_ids) -> bool:
    return (
        isinstance(input_ids, (list, tuple))
        and bool(input_ids)
        and isinstance(input_ids[0], (list, tuple))
    )


def _as_batch(input_ids, attention_mask, left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, S] int64 on the CPU, mask [B, S] bool); ragged lists are padded on the left
    (prompts: a causal LM continues from the right end) or the right (encoder sources), with
    id 0 under a False mask (the caller puts its pad id there where it returns them)."""
    if isinstance(input_ids, (str, bytes, Mapping)):
        raise TypeError(
            f"input_ids must be token ids ([batch, sequence] integers, or a list of token "
            f"lists), got a {type(input_ids).__name__}"
            + (
                ": pass the tokenizer's output as keywords (**enc)"
                if isinstance(input_ids, Mapping)
                else ""
            )
        )
    if isinstance(input_ids, (list, tuple)) and len(input_ids) == 0:
        raise ValueError("input_ids is empty: it holds no prompt")
    if _is_token_lists(input_ids):
        if attention_mask is not None:
            raise ValueError("attention_mask is not used with a list of token lists")
        odd = [i for i, r in enumerate(input_ids) if not isinstance(r, (list, tuple))]
        if odd:  # [[1, 2], 3]: was "object of type 'int' has no len()"
            raise TypeError(
                f"input_ids is a list of token lists whose row(s) {odd} are not lists "
                "(a list of token lists, or a [batch, sequence] tensor)"
            )
        empty = [i for i, r in enumerate(input_ids) if len(r) == 0]
        if empty:
            raise ValueError(f"input_ids row(s) {empty} are empty lists: each prompt needs a token")
        longest = max(len(r) for r in input_ids)
        ids = torch.zeros(len(input_ids), longest, dtype=torch.int64)
        mask = torch.zeros(len(input_ids), longest, dtype=torch.bool)
        for i, r in enumerate(input_ids):
            try:  # its own dtype: a float or bool row is refused, not cast
                row = torch.as_tensor(r)
            except (TypeError, ValueError, RuntimeError):  # ["a", "b"], [1, [2]]
                raise TypeError(f"input_ids row {i} must hold integers, got {r!r:.80}") from None
            if row.dim() != 1:
                raise TypeError(f"input_ids row {i} must be a flat list of integers, got {r!r:.80}")
            if not _holds_integers(row):
                raise TypeError(f"input_ids row {i} must hold integers, got {row.dtype}")
            cols = slice(longest - len(r), None) if left else slice(0, len(r))
            ids[i, cols] = row.to(torch.int64)
            mask[i, cols] = True
        return ids, mask
    ids = input_tensor("input_ids", input_ids)
    if not _holds_integers(ids):
        raise TypeError(f"input_ids must hold integers, got {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(
            f"input_ids must be [batch, sequence] and not empty, got {tuple(ids.shape)}"
        )
    ids = ids.to("cpu", torch.int64)
    if attention_mask is None:
        return ids, torch.ones_like(ids, dtype=torch.bool)
    if type(attention_mask).__name__ == "GenerationConfig":  # Hugging Face's second position
        raise TypeError(
            "generate's second positional argument is attention_mask, not a GenerationConfig: "
            "pass its settings as arguments (max_new_tokens, do_sample, temperature, top_k, "
            "top_p, eos_token_id, pad_token_id)"
        )
    mask = input_tensor("attention_mask", attention_mask)
    if mask.dim() == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}, input_ids has {tuple(ids.shape)}"
        )
    return ids, _keep_mask(mask.to("cpu"))  # on the host already: the check costs no sync


def _keep_mask(mask: torch.Tensor) -> torch.Tensor:
    """A CPU attention_mask as the bool mask it means. Only 0 and 1 are taken, as the encoder
    path takes them (runtime/model.py `_float_mask`): Hugging Face builds a decoder's
    positions from cumsum(mask), so a 2 or a 0.5 is not a "keep" there, and kernl's ids would
    differ from its ids."""
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_complex:
        raise TypeError(f"attention_mask must hold 0 and 1, got {mask.dtype}")
    if not mask.dtype.is_floating_point:
        mask = mask.long()  # torch compares no wide unsigned types
    keep = mask != 0
    odd = keep & (mask != 1)
    if bool(odd.any()):
        values = torch.unique(mask[odd]).tolist()
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise ValueError(
            f"attention_mask must hold 0 and 1 only (1: a token, 0: padding), got {shown}"
        )
    return keep


def _holds_integers(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def main_input(method: str, value, options: dict, name: str = "input_ids"):
    """The model's main input, which Hugging Face's generate also takes as `inputs`."""
    if "inputs" not in options:
        return value
    inputs = options.pop("inputs")
    if value is not None and inputs is not None:
        raise TypeError(f"{method}() got both {name} and inputs (its other name): pass one")
    return inputs if value is None else value


def take_decoder_start(
    method: str, options: dict, start: int, rows: int | None, decoder_ids: bool = False
) -> None:
    """An encoder-decoder's `decoder_start_token_id`, which Hugging Face's generate takes: the
    model's own (or None, HF's "the config's"; or one per row, each the model's) is taken;
    another is refused, as the decoder starts from the token it was compiled with. With
    `decoder_ids` (a text model's generate), `decoder_input_ids` holding only that token per
    row is taken too: HF then decodes as without them (a longer decoder prompt is refused
    later, as any other)."""
    if "decoder_start_token_id" in options:
        given = options.pop("decoder_start_token_id")
        if not _only_start(given, start, rows, per_row=False):
            raise TypeError(
                f"{method}() does not take decoder_start_token_id={shown_value(given)}: the "
                f"decoder starts from the model's decoder start token, {start}, as compiled"
                + _rows_hint(given, rows)
            )
    if decoder_ids and options.get("decoder_input_ids") is not None:
        if _only_start(options["decoder_input_ids"], start, rows, per_row=True):
            del options["decoder_input_ids"]


def _only_start(given, start: int, rows: int | None, per_row: bool) -> bool:
    """`given` is the start token: one int, or one per row (`per_row`: a [rows, 1] column)."""
    if given is None and not per_row:
        return True
    if isinstance(given, torch.Tensor):
        if given.is_floating_point() or given.is_complex():
            return False
        if not per_row and given.ndim == 0:
            return given.item() == start
        given = given.tolist()
    if _is_int(given):
        return not per_row and given == start
    if not isinstance(given, (list, tuple)) or (rows is not None and len(given) != rows):
        return False
    if per_row:
        return all(isinstance(r, (list, tuple)) and len(r) == 1 for r in given) and all(
            _is_int(r[0]) and r[0] == start for r in given
        )
    return bool(given) and all(_is_int(t) and t == start for t in given)


def _rows_hint(given, rows: int | None) -> str:
    if isinstance(given, torch.Tensor):
        given = given.tolist()  # a 0-d tensor has no len(): one int then
    if isinstance(given, (list, tuple)) and rows is not None and len(given) != rows:
        return f" (and a list of them holds one per row: {rows}, got {len(given)})"
    return ""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_finite_number(x) -> bool:
    """A number a float holds: math.isfinite raises OverflowError for an int beyond it."""
    if not _is_number(x):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _new_tokens(
    max_new_tokens: int | None,
    max_length: int | None,
    prompt_length: int,
    counted: str | None = None,
) -> int:
    """Hugging Face's rule: `max_length` counts the (padded) prompt, for an encoder-decoder
    the decoder start token (`prompt_length` 1, `counted` naming it); `max_new_tokens`
    wins."""
    if max_length is None:
        return 20 if max_new_tokens is None else max_new_tokens
    if not _is_int(max_length):
        raise ValueError(f"max_length must be an integer, got {max_length!r}")
    if max_new_tokens is not None:
        warnings.warn(
            "both max_new_tokens and max_length were given; max_new_tokens takes precedence",
            stacklevel=3,
        )
        return max_new_tokens
    if max_length <= prompt_length:
        raise ValueError(
            f"max_length={max_length} leaves no room after "
            f"{counted or f'a prompt of {prompt_length} tokens'} (it counts "
            f"{'it' if counted else 'the prompt'}); use max_new_tokens to set the number of "
            "new tokens"
        )
    return max_length - prompt_length


def _device_of(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _generated_length(new: torch.Tensor, eos: list[int]) -> int:
    """Hugging Face stops after the step at which the last row emitted its EOS."""
    if not eos:
        return new.shape[1]
    is_eos = torch.isin(new, torch.tensor(eos, dtype=new.dtype))
    if not bool(is_eos.any(dim=1).all()):
        return new.shape[1]
    return int(is_eos.int().argmax(dim=1).max()) + 1


def _rows_of(name: str, value, rows: int) -> list:
    """A sampler argument as its per-row values: a sequence must hold one per row."""
    if not isinstance(value, (list, tuple)):
        return [value]
    if len(value) != rows:
        raise ValueError(f"{name} holds {len(value)} values for a batch of {rows} rows")
    return list(value)


def check_options(
    max_new_tokens,
    do_sample,
    temperature,
    top_k,
    top_p,
    eos_token_id,
    pad_token_id,
    seed,
    vocab: int,
    rows: int,
) -> None:
    """The generation options of a request of `rows` rows (shared by the causal-LM and
    seq2seq models); temperature, top_k, top_p and seed may each be one value or a sequence
    of one per row; None is off for temperature, top_k and top_p (1.0, 0, 1.0), as in
    Hugging Face. Raises ValueError."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    for t in _rows_of("temperature", temperature, rows):
        if t is None:
            continue
        if not _is_finite_number(t):
            raise ValueError(f"temperature must be a finite number, got {t!r}")
        if do_sample and not t > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {t}")
        if do_sample and not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must lie in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] when "
                f"sampling, got {t:g}: below, sampling is greedy decoding (do_sample=False); "
                "above, every token is equally likely"
            )
    for p in _rows_of("top_p", top_p, rows):
        if p is None:
            continue
        if not _is_number(p) or not 0 < p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {p!r}")
    for k in _rows_of("top_k", top_k, rows):
        if k is not None and (not _is_int(k) or not 0 <= k < 2**31):
            raise ValueError(f"top_k must be an integer in [0, 2**31) (0: off), got {k!r}")
    for v in _rows_of("seed", seed, rows):
        if not _is_int(v) or not 0 <= v < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {v!r}")
    if pad_token_id is not None and not (_is_int(pad_token_id) and 0 <= pad_token_id < vocab):
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab}), got {pad_token_id!r}")
    if eos_token_id is not None:
        ids = [eos_token_id] if not isinstance(eos_token_id, (list, tuple)) else eos_token_id
        bad = [e for e in ids if not (_is_int(e) and 0 <= e < vocab)]
        if bad:
            raise ValueError(f"eos_token_id must be token ids in [0, {vocab}), got {bad!r}")
