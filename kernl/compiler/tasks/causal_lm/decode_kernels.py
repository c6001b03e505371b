"""Which kernels a generation artifact's decode step runs on, chosen by timing on the GPU, and
the Triton binaries the choice needs.

A decode step has replaceable pieces (`DecodeKernels`: attention, norms, gated MLP, linear
layers, rotary, lm_head), and for the Llama family the whole step has one more form: one
persistent kernel (`step="persistent"`, kernels/decode_step.py), tried last.
Starting from plain torch, each alternative is tried in turn and kept only if the decode
steps of every decode bucket, replayed as CUDA graphs, get faster in total by more than
`MIN_GAIN`: a kernel earns its place by measurement, never by default. An alternative that
fails (a kernel that does not compile for these shapes) is reported and skipped.
The persistent step is chosen bucket by bucket, against the pieces finally chosen: it serves
the decode buckets where one of its configs timed faster than the pieces by MIN_GAIN, each
on its fastest config (on an H200 it wins at short caches and loses at long ones).

The fused kernels and attention run the tiles (launch configs) tuned per batch and call site
(attention: and kv length) beforehand (decode_tiles.py); only the tiles of the kernels
finally chosen are kept. Last, where the choice runs a fused kernel on a GPU that has it
(Hopper and later), programmatic dependent launch is tried, then PDL with the weight
prefetch: each kept only if the step gets faster by MIN_GAIN than the best so far and its
logits stay bitwise the same in every decode bucket."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import median
from typing import Any

import torch

from kernl.artifacts.generation import DECODE_KERNEL_CHOICES, DecodeKernels, DecodeTile
from kernl.runtime.binaries import allow_jit
from kernl.runtime.generation import GenerativeModel

from ...tune import recording_binaries
from .decode_tiles import used_tiles

# every piece's implementations but plain torch, in the order they are tried
ALTERNATIVES = [(piece, choices[1:]) for piece, choices in DECODE_KERNEL_CHOICES.items()]
MIN_GAIN = 0.02
REPLAYS = 30


@dataclass
class DecodeTiming:
    kernels: DecodeKernels
    bucket_ms: tuple[float, ...] | None  # per decode bucket: the median of one step
    error: str | None = None

    @property
    def step_ms(self) -> float | None:
        """Summed over the decode buckets."""
        return None if self.bucket_ms is None else sum(self.bucket_ms)

    def describe(self) -> str:
        what = self.kernels.describe()
        if self.error is not None:
            return f"{what}: failed ({self.error})"
        each = " + ".join(f"{ms:.3f}" for ms in self.bucket_ms)
        return f"{what}: {self.step_ms:.3f} ms ({each})"


def _bucket_ms(gen: GenerativeModel, replays: int) -> tuple[float, ...]:
    """Per decode bucket (gen.buckets.decode_shapes()), the median time of one decode step (a
    graph replay on CUDA; the eager step elsewhere). Each step writes the bucket's last slot,
    so that every attention reads the bucket's whole kv length (kernl's skips the slots past
    the current one): the slowest step the bucket serves."""
    gen._steps.clear()  # graphs are captured again, with the decoder's current kernels
    out = []
    for batch, kv_len in gen.buckets.decode_shapes():
        step = gen._step(("decode", batch, kv_len, False))
        state = gen._states[batch]
        times = []
        for _ in range(replays):
            at_last_slot(state, kv_len)
            if gen.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                step.run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                step.run()
                times.append((time.perf_counter() - t) * 1e3)
        out.append(median(times))
    return tuple(out)


def at_last_slot(state, kv_len: int) -> None:
    """Set a batch state up for a decode step that writes slot kv_len - 1 (the others empty)."""
    state.reset_counters()
    state.slot.fill_(kv_len - 1)


def choose_decode_kernels(
    gen: GenerativeModel,
    say: Callable[[str], None],
    step_ms: Callable[[GenerativeModel], Sequence[float]] | None = None,
    tiles: tuple[DecodeTile, ...] = (),
    try_pdl: bool | None = None,
) -> tuple[DecodeKernels, list[DecodeTiming]]:
    """Greedy search from plain torch over ALTERNATIVES, the fused kernels on `tiles`; then
    PDL (`try_pdl`; None: on a CUDA device of compute capability >= 9); then the persistent
    step, bucket by bucket. `step_ms` (tests) times the current kernels per decode bucket.
    Leaves `gen` on the choice."""
    measure = step_ms or (lambda g: _bucket_ms(g, REPLAYS))
    decoder = gen.decoder
    buckets = len(gen.buckets.decode_shapes())

    def timed(kernels: DecodeKernels) -> DecodeTiming:
        decoder.kernels = kernels
        try:
            with allow_jit(), torch.no_grad():
                ms = tuple(float(x) for x in measure(gen))
            if len(ms) != buckets:
                raise ValueError(f"{len(ms)} timings for {buckets} decode buckets")
            t = DecodeTiming(kernels, ms)
        except Exception as e:  # a kernel that cannot run here: report it, keep the others
            t = DecodeTiming(kernels, None, f"{type(e).__name__}: {e}"[:300])
        say(f"decode step, {t.describe()}")
        return t

    best = timed(DecodeKernels(tiles=tiles))
    timings = [best]
    if best.error is not None:
        # Without a baseline nothing can earn its place: plain torch, which validation checks.
        say("decode step could not be timed; keeping plain torch")
        decoder.kernels = DecodeKernels()
        gen._steps.clear()
        return decoder.kernels, timings
    alternatives = [(knob, _runnable(decoder, knob, options)) for knob, options in ALTERNATIVES]
    for knob, options in alternatives:
        if not _applies(decoder, knob) or not options:
            continue
        if knob == "step":  # the persistent step: last, bucket by bucket
            continue
        for option in options:
            if knob == "attention" and option == "sdpa" and not decoder.sdpa_fits:
                continue  # Gemma2's softcapped scores: SDPA has no softcap
            t = timed(dataclasses.replace(best.kernels, **{knob: option}))
            timings.append(t)
            if t.step_ms is not None and t.step_ms < best.step_ms * (1 - MIN_GAIN):
                best = t
    # Pieces that only pay together (a norm folded into the linear after it, whose reduce is
    # in the same launch): every piece on its most fused kernel at once.
    together = dataclasses.replace(
        best.kernels,
        **{
            knob: options[-1]
            for knob, options in alternatives
            if knob != "step" and _applies(decoder, knob) and options
        },
    )
    if together not in [t.kernels for t in timings]:
        t = timed(together)
        timings.append(t)
        if t.step_ms is not None and t.step_ms < best.step_ms * (1 - MIN_GAIN):
            best = t
    k = best.kernels
    used = used_tiles(k.tiles, k.norm, k.linear, k.lm_head, k.attention, k.gated_mlp)
    chosen = dataclasses.replace(k, tiles=used)
    if try_pdl is None:
        try_pdl = gen.device.type == "cuda" and torch.cuda.get_device_capability(gen.device)[0] >= 9
    pieces = best
    if try_pdl and _runs_fused(chosen):
        try:
            chosen, pieces = _try_pdl(gen, chosen, best, timed, timings, say)
        except Exception as e:  # the step without PDL stays, as timed
            say(f"PDL not tried further: {type(e).__name__}: {e}"[:300])
    if decoder.persistent_fits:
        chosen = _persistent_by_bucket(gen, chosen, pieces, timed, timings, say)
    decoder.kernels = chosen
    gen._steps.clear()
    return chosen, timings


def _applies(decoder, knob: str) -> bool:
    """Whether the decoder runs a kernel other than torch for this piece (a choice it cannot
    run is served by torch: timing it would only time torch again, and storing it would name a
    kernel the step does not run)."""
    if knob == "gated_mlp":  # the kernel is gated SiLU without bias
        return decoder.gated_silu_without_bias
    if knob == "lm_head":  # Gemma2's softcapped logits: torch lm_head only
        return decoder.lm_head_kernel_fits
    return True


def _runnable(decoder, knob: str, options: Sequence[str]) -> list[str]:
    """The options the decoder would run as themselves: norm "fused" only where its norms
    fold (not an RMSNorm in fp16, nor Gemma's; Decoder.norm_folds)."""
    if knob == "norm" and not decoder.norm_folds:
        return [o for o in options if o != "fused"]
    return list(options)


def _persistent_by_bucket(
    gen: GenerativeModel, chosen: DecodeKernels, pieces: DecodeTiming, timed, timings: list, say
) -> DecodeKernels:
    """The persistent step on each config of `decode_step_choice_configs()`, every one timed
    and reported (a config that cannot run here, e.g. too many programs per SM, fails
    alone). Each decode bucket of <= 16 rows takes the fastest config there if it beats the
    pieces (`pieces`, the timing of `chosen`) by MIN_GAIN; the mix is timed once more and
    kept if faster in total. The others, and every bucket if none won, keep the pieces."""
    from kernl.kernels.decode_step import config_pairs, decode_step_choice_configs
    from kernl.runtime.generation.decoder import FEW_ROWS

    trials = []
    for config in decode_step_choice_configs():
        pairs = config_pairs(config)
        t = timed(dataclasses.replace(chosen, step="persistent", step_config=pairs))
        timings.append(t)
        if t.bucket_ms is not None:
            trials.append((pairs, t.bucket_ms))
    won = []
    for i, (batch, kv_len) in enumerate(gen.buckets.decode_shapes()):
        if batch > FEW_ROWS or not trials:
            continue
        pairs, ms = min(trials, key=lambda trial: trial[1][i])
        if ms[i] < pieces.bucket_ms[i] * (1 - MIN_GAIN):
            won.append((batch, kv_len, pairs))
    if not won:
        say("the persistent step: not faster than the pieces at any decode bucket")
        return chosen
    mixed = timed(dataclasses.replace(chosen, step="persistent", step_buckets=tuple(won)))
    timings.append(mixed)
    if mixed.step_ms is None or mixed.step_ms >= pieces.step_ms:
        say("the persistent step where it won, with the pieces elsewhere: not faster in total")
        return chosen
    return mixed.kernels


def _try_pdl(
    gen, chosen: DecodeKernels, best: DecodeTiming, timed, timings: list, say
) -> tuple[DecodeKernels, DecodeTiming]:
    """PDL, then PDL with the weight prefetch, on top of `chosen` (timed `best`): each kept if
    faster than the best so far by MIN_GAIN and bitwise the same logits as `chosen` in every
    decode bucket. Returns the choice and its timing."""
    plain = _decode_logits(gen, chosen)
    for flags in ({"pdl": True}, {"pdl": True, "prefetch": True}):
        t = timed(dataclasses.replace(chosen, **flags))
        timings.append(t)
        if t.step_ms is not None and t.step_ms < best.step_ms * (1 - MIN_GAIN):
            same = all(map(torch.equal, plain, _decode_logits(gen, t.kernels)))
            say(f"decode step with {flags} computes {'the same' if same else 'OTHER'} logits")
            if same:
                chosen, best = t.kernels, t
    return chosen, best


def _runs_fused(k: DecodeKernels) -> bool:
    """Whether the step's pieces run a kernel that takes PDL (kernl/kernels/pdl.py
    pdl_start)."""
    fused = k.norm == "fused" or k.linear == "fused" or k.lm_head == "triton"
    return fused or k.attention == "triton" or k.rope != "torch"


def _decode_logits(gen: GenerativeModel, kernels: DecodeKernels) -> list[torch.Tensor]:
    """One greedy decode step's logits per decode bucket, on `kernels`, from the same tokens,
    positions and cache slot each time (so that two kernel choices can be compared)."""
    gen.decoder.kernels = kernels
    gen._steps.clear()
    out = []
    with allow_jit(), torch.no_grad():
        for batch, kv_len in gen.buckets.decode_shapes():
            step = gen._step(("decode", batch, kv_len, False))
            state = gen._states[batch]
            state.reset_counters()
            state.tokens.copy_(torch.arange(batch, device=state.tokens.device))
            out.append(step.run().clone())
    gen._steps.clear()
    return out


def record_decode_binaries(gen: GenerativeModel) -> dict[str, Any]:
    """Run one greedy and one sampling decode step of every decode bucket and collect their
    kernl kernels' binaries (a greedy step may take its ids from the lm_head kernel, a
    sampling step runs the final norm and lm_head on their own kernels)."""
    with recording_binaries(gen.device) as found:
        for batch, kv_len in gen.buckets.decode_shapes():
            state = gen._states[batch]
            state.sampler.set(1.0, 0, 1.0, 0, gen.spec.vocab_size)
            for do_sample in (False, True):
                state.reset_counters()
                state.decode(kv_len, do_sample)
    return found
