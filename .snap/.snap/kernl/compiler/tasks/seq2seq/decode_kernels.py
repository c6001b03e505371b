"""Which kernels an encoder-decoder's decode step runs, chosen by timing at compile.

The runtime's decoder (kernl/runtime/generation/encoder_decoder.py) runs a step either on
plain torch ops or, for batches of at most 16 rows, on kernl's few-rows kernels: every
pre-norm folded into the prologue of the linear after it (norm_linear), every output
projection with its bias and residual add in the epilogue (skinny_linear_fused). At a decode
step a 768- or 1280-wide linear is a few MB of weights: cuBLAS's GEMV kernels take ~5 µs each
whatever their size, and the norms and adds around them are one launch each. The compiler
captures one step of each batch bucket (the longest cache and source buckets) each way
(VARIANTS),
replays each graph, and keeps kernl's kernels only if the summed step time is at least
`MIN_GAIN` lower; then every launch of the chosen step is recorded as a binary, so that the
runtime compiles nothing."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kernl.artifacts import Manifest
from kernl.runtime.binaries import allow_jit
from kernl.runtime.generation import open_seq2seq
from kernl.runtime.generation.encoder_decoder import FEW_ROWS
from kernl.runtime.generation.model import _Step
from kernl.runtime.generation.seq2seq import Seq2SeqModel

from ...bench import time_calls
from ...tune import recording_binaries

MIN_GAIN = 0.02  # as the causal LM's decode-kernel choice: below this, timing noise decides
# torch; kernl's linears with the norms folded in; kernl's linears after torch's norms (a
# LayerNorm folded in recomputes the row's statistics in every program of the linear).
VARIANTS = ("torch", "kernl", "kernl-linear")
# Launch tiles of the few-rows kernels tried with each kernl variant: their default (narrow
# N tiles, deep K, split-K to ~2 programs per SM) and the wide, shallow tile the causal LM's
# sweep kept for most 2048-wide projections (docs/performance.md).
TILES: tuple[tuple[int, ...], ...] = ((), (64, 64, 0, 4, 5))
FORCE: str | None = None  # tests: keep this variant whatever the timing says
TUNE_SITES = True  # then tune each call site's tile too (decode_tiles.py), kept if faster
REPLAYS = 50


@dataclass
class DecodeChoice:
    kernels: str  # one of VARIANTS
    tile: tuple[int, ...]  # one of TILES
    step_us: dict[str, float]  # "variant tile" -> summed median step time of the buckets
    skipped: str = ""  # the candidates that failed to build or run, and why
    site_tiles: list[list] = field(default_factory=list)  # Seq2SeqSpec.decode_site_tiles

    def describe(self) -> str:
        times = ", ".join(f"{k} {v:.0f} us" for k, v in self.step_us.items())
        tile = f" tile {list(self.tile)}" if self.tile else ""
        if self.site_tiles:
            tile += f" with {len(self.site_tiles)} per-site tiles"
        skipped = f"; skipped: {self.skipped}" if self.skipped else ""
        return (
            f"decode step on {self.kernels}{tile} ({times}; summed over the batch buckets{skipped})"
        )


def with_decode_kernels(
    manifest: Manifest,
    kernels: str,
    tile: tuple[int, ...] = (),
    site_tiles: list[list] | None = None,
) -> Manifest:
    """A copy of `manifest` whose decode step runs on `kernels` with launch tile `tile` and
    the per-site tiles `site_tiles`."""
    out = copy.copy(manifest)
    out.extra = {**manifest.extra, "seq2seq": {**manifest.extra["seq2seq"]}}
    out.extra["seq2seq"]["decode_kernels"] = kernels
    out.extra["seq2seq"]["decode_tile"] = list(tile)
    out.extra["seq2seq"]["decode_site_tiles"] = [list(t) for t in site_tiles or []]
    return out


def choose_decode_kernels(
    manifest: Manifest,
    weights: dict[str, torch.Tensor],
    device: torch.device,
    say: Callable[[str], None] = lambda _msg: None,
) -> DecodeChoice:
    """Time one decode step per batch bucket of at most 16 rows, on torch and on each kernl
    variant and tile (CUDA graphs, median of REPLAYS replays each), and keep the fastest if
    it beats torch by MIN_GAIN; then, for a kernl variant, tune every call site's tile
    (decode_tiles.py) and keep them if the step is faster with them. A candidate that fails
    to compile or run (a Triton error on some shape) is skipped, with the reason in the
    report: never a failed compile."""
    totals: dict[str, float] = {}
    candidates = {"torch": ("torch", ())}
    for variant in VARIANTS[1:]:
        for tile in TILES:
            candidates[f"{variant} {list(tile) if tile else 'default'}"] = (variant, tile)
    skipped = []
    for name, (variant, tile) in candidates.items():
        try:
            totals[name] = _summed_step_us(manifest, weights, device, variant, tile)
        except Exception as e:  # noqa: BLE001 - only kernl's variants may fail here
            if variant == "torch":
                raise
            first = str(e).strip().splitlines()
            skipped.append(f"{name}: {type(e).__name__}: {first[-1] if first else ''}"[:300])
            torch.cuda.synchronize(device)
    best = min(totals, key=totals.get)
    if totals[best] >= (1 - MIN_GAIN) * totals["torch"]:
        best = "torch"
    if FORCE is not None:
        best = min((n for n in totals if candidates[n][0] == FORCE), key=totals.get)
    variant, tile = candidates[best]
    site_tiles: list[list] = []
    if variant != "torch" and TUNE_SITES:
        name = f"{variant} per-site"
        try:
            site_tiles = _tuned_sites(manifest, weights, device, variant, tile, say)
            totals[name] = _summed_step_us(manifest, weights, device, variant, tile, site_tiles)
        except Exception as e:  # noqa: BLE001 - the variant's single tile still serves
            skipped.append(f"{name}: {type(e).__name__}: {str(e).strip()[-200:]}")
            torch.cuda.synchronize(device)
        if name not in totals or totals[name] >= totals[best]:
            site_tiles = []
    return DecodeChoice(variant, tile, totals, "; ".join(skipped), site_tiles)


def _tuned_sites(manifest, weights, device, variant, tile, say) -> list[list]:
    from .decode_tiles import tune_site_tiles

    runtime = open_seq2seq(with_decode_kernels(manifest, variant, tile), weights, device, "never")
    with allow_jit():
        tiles, _ = tune_site_tiles(runtime, say)
    return tiles


def _summed_step_us(
    manifest: Manifest,
    weights: dict[str, torch.Tensor],
    device: torch.device,
    variant: str,
    tile: tuple[int, ...],
    site_tiles: list[list] | None = None,
) -> float:
    described = with_decode_kernels(manifest, variant, tile, site_tiles)
    runtime = open_seq2seq(described, weights, device, "never")
    b = runtime.buckets
    with allow_jit(), torch.no_grad():
        return sum(
            _step_us(runtime, batch, b.cache_len, max(b.sources))
            for batch in b.batches
            if batch <= FEW_ROWS
        )


def _step_us(runtime: Seq2SeqModel, batch: int, kv_len: int, source: int) -> float:
    state = runtime._states[batch]
    step = _Step(lambda: state.decode(kv_len, source, False), state.reset_counters)
    step.capture(torch.cuda.graph_pool_handle(), runtime.device)

    def replay() -> None:
        state.reset_counters()  # every replay writes slot 0 and attends over kv_len slots
        step.run()

    return statistics.median(time_calls(replay, REPLAYS, cuda=True)) * 1e3


def recording_decode_binaries(
    runtime: Seq2SeqModel, validate: Callable[[], None]
) -> dict[str, Any]:
    """Run `validate` (the compiler's checks against eager) and one decode step of every
    (batch, cache, source) bucket with kernl's kernels compiled through Triton's JIT, and
    return every launch's binary ({launch key: (BinarySpec, cubin)})."""
    b = runtime.buckets
    with recording_binaries(runtime.device) as found:
        validate()
        for batch in b.batches:
            state = runtime._states[batch]
            for kv_len in b.caches:
                for source in b.sources:
                    state.reset_counters()
                    state.decode(kv_len, source, False)
    return found
