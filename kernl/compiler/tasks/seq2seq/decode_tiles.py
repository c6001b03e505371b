"""The launch config of each few-rows kernel of an encoder-decoder's decode step, per batch
bucket and call site, chosen by timing on the model's own weights.

A decode step's linears differ by shape (Whisper-large: 1280 -> 3840 QKV, 1280 -> 1280 O and
cross-attention, 1280 -> 5120 -> 1280 MLP) and one tile for all of them left them at ~31% of
the copy bandwidth (docs/performance.md). So, once the decode-kernel choice
(decode_kernels.py) has kept kernl's kernels, every call site of the step is timed over its
kernel's decode space (`*_decode_configs()` in the kernel's file), exactly as the runtime calls
it (`EncoderDecoder._linear` / `_residual_linear` with that config), each config first checked
against float64 (compiler/tasks/causal_lm/decode_tiles.py's rule: at most twice the error of
the computation in the model's dtype, plus a rounding step), then timed over every layer's
weights (a CUDA graph of one call per layer, so that nothing is served from L2). The
cross-attention is one more site: kernl's split-K decode attention over each config of its
space against the SDPA kernel the torch path runs; a tile is kept only where it beats SDPA
(Whisper at 8 rows reads 61 MB of cross K/V per layer and step; T5's 128-token sources are a
few hundred KB).

The result is a list of `[batch, kernel, site, *config]` (Seq2SeqSpec.decode_site_tiles); the
decode-kernel choice then times the whole step with them against the single tile, and keeps
the faster."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from kernl.artifacts.seq2seq import SITE_TILES
from kernl.runtime.generation.encoder_decoder import FEW_ROWS, EncoderDecoder, _Normed
from kernl.runtime.generation.seq2seq import Seq2SeqModel

from ...compile_ahead import compile_threads
from ..causal_lm.decode_tiles import TileTiming, _allowed, _err, fastest_checked, graph_ms

# (kernel, site, the norm folded into it or None, whether a residual rides in its epilogue)
_Site = tuple[str, str, str | None, bool]


def linear_sites(model: EncoderDecoder) -> list[_Site]:
    """The linears of one decoder layer's step, as `EncoderDecoder.decode` calls them."""
    s = model.spec
    fold = model.fold_norms and s.pre_norm
    mlp_in, mlp_out = ("gate_up", "down") if s.mlp == "gated" else ("fc", "proj")
    sites = []
    for norm, site_in, site_out in [
        ("attn_norm", "qkv", "o"),
        ("cross_norm", "cross_q", "cross_o"),
        ("mlp_norm", mlp_in, mlp_out),
    ]:
        kernel = "norm_linear" if fold else "skinny_linear_fused"
        sites.append((kernel, site_in, norm if fold else None, False))
        sites.append(("skinny_linear_fused", site_out, None, True))
    return sites


def tune_site_tiles(
    runtime: Seq2SeqModel,
    say: Callable[[str], None],
    measure: Callable[[list[Callable[[], object]]], float] | None = None,
    seed: int = 0,
) -> tuple[list[list], list[TileTiming]]:
    """The fastest checked config of every call site at every batch bucket of <= FEW_ROWS
    rows, and every timing taken. `runtime` is built with the decode variant being tuned;
    `measure(calls)` (ms per call) defaults to `graph_ms` on its device. A config that fails to
    compile, run or check is reported and skipped."""
    model = runtime.model
    measure = measure or (lambda calls: graph_ms(calls, runtime.device))
    threads = compile_threads() if torch.device(runtime.device).type == "cuda" else 0
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tiles, timings = [], []
    with torch.no_grad():
        for batch in sorted(b for b in runtime.buckets.batches if b <= FEW_ROWS):
            rnd = lambda *shape: torch.randn(*shape, generator=gen).to(  # noqa: E731
                device=runtime.device, dtype=model.dtype
            )
            x = rnd(batch, model.spec.d_model)
            for kernel, site, norm, residual in linear_sites(model):
                calls = _linear_calls(model, batch, kernel, site, norm, residual, x, rnd)
                tiles += _entry(_best(batch, kernel, site, *calls, measure, say, timings, threads))
            cache = runtime._states[batch].cache
            tiles += _tune_cross(model, batch, cache, rnd, measure, say, timings, threads)
    return tiles, timings


def _linear_calls(model, batch, kernel, site, norm, residual, x, rnd):
    """(call(i, config) on layer i, check(out) -> (error, allowed), configs)."""
    from kernl.kernels import norm_linear as nl
    from kernl.kernels import skinny_linear_fused as slf

    s, w = model.spec, model.w
    layers = [f"dec.layers.{n}." for n in range(s.num_decoder_layers)]
    weight = lambda p, name: w.get(p + name)  # noqa: E731
    d = lambda t: None if t is None else t.double()  # noqa: E731
    # the projection's input: the residual stream x for the input linears, else its own width
    h = rnd(batch, weight(layers[0], site + ".weight").shape[1]) if residual else x

    def call(i: int, config) -> torch.Tensor:
        model._site_configs[(batch, kernel, site)] = config
        p = layers[i]
        if norm is not None:
            return model._linear(_Normed(x, p + norm), p + site, True)
        if residual:
            return model._residual_linear(x, h, p + site, True)
        return model._linear(h, p + site, True)

    p = layers[0]
    w0, b0 = weight(p, site + ".weight"), weight(p, site + ".bias")
    if norm is not None:
        nw, nb = weight(p, norm + ".weight"), weight(p, norm + ".bias")
        kw = dict(eps=s.norm_eps, norm=s.norm)
        ref = nl.norm_linear_reference(d(x), d(nw), d(nb), d(w0), d(b0), **kw)
        stock = nl.norm_linear_reference(x, nw, nb, w0, b0, **kw)
        configs = nl.norm_linear_decode_configs()
    else:
        res = x if residual else None
        ref = slf.skinny_linear_fused_reference(d(h), d(w0), d(b0), d(res))
        stock = slf.skinny_linear_fused_reference(h, w0, b0, res)
        configs = slf.skinny_linear_fused_decode_configs()
    allowed = _allowed(ref, stock)
    return call, lambda out: (_err(out, ref), allowed), configs, len(layers)


def _tune_cross(model, batch, cache, rnd, measure, say, timings, threads=0) -> list[list]:
    """decode_attention's best config over the cross K/V, kept only if it beats SDPA."""
    from kernl.kernels import decode_attention as da

    s = model.spec
    length = cache.cross_k.shape[3]
    cache.cross_k.normal_()
    cache.cross_v.normal_()
    q = rnd(batch, s.num_heads, 1, s.head_dim)
    valid = torch.ones(batch, length, dtype=torch.bool, device=q.device)
    if length > 1:
        valid[-1, length // 2 :] = False  # a padded source row (text models only)
    mask = None if s.family == "whisper" else valid
    additive = None if mask is None else model._additive(mask[:, None, None, :])
    kv = lambda i: (cache.cross_k[i], cache.cross_v[i])  # noqa: E731
    layers = s.num_decoder_layers
    sdpa = TileTiming(batch, "sdpa", "cross", None, None)
    try:
        sdpa.ms = measure([lambda i=i: model._attend(q, *kv(i), additive) for i in range(layers)])
    except Exception as e:  # noqa: BLE001 - then decode attention only has to work
        sdpa.error = f"{type(e).__name__}: {e}"[:200]
    timings.append(sdpa)

    def call(i: int, config) -> torch.Tensor:
        return model._decode_attend(q, *kv(i), mask, config)

    ref = da.decode_attention_reference(
        q.double(), *(t.double() for t in kv(0)), sm_scale=s.attention_scale, kv_mask=mask
    )
    stock = da.decode_attention_reference(q, *kv(0), sm_scale=s.attention_scale, kv_mask=mask)
    ref, stock = ref.reshape(batch, -1), stock.reshape(batch, -1)
    allowed = _allowed(ref, stock)
    check = lambda out: (_err(out, ref), allowed)  # noqa: E731
    configs = da.decode_attention_configs()
    best = _best(
        batch,
        "decode_attention",
        "cross",
        call,
        check,
        configs,
        layers,
        measure,
        say,
        timings,
        threads,
    )
    if best is not None and sdpa.ms is not None and best.ms >= sdpa.ms:
        say(f"batch {batch} cross-attention stays on SDPA ({sdpa.ms * 1e3:.2f} us per call)")
        return []
    return _entry(best)


def _best(batch, kernel, site, call, check, configs, layers, measure, say, timings, threads=0):
    """The timing of the fastest config that passes its check, or None (`threads`: compile
    the configs' kernels on that many threads first)."""
    best = fastest_checked(
        lambda c: TileTiming(batch, kernel, site, c, None),
        call,
        check,
        configs,
        layers,
        lambda calls, _config: measure(calls),
        timings,
        threads,
    )
    if best is None:
        say(f"batch {batch} {kernel} at {site}: no config passed; the step's tile serves it")
    else:
        say(f"decode tile {best.describe()} (best of {len(configs)})")
    return best


def _entry(t: TileTiming | None) -> list[list]:
    """[[batch, kernel, site, *config]], or [] for no choice: the config's first fields, as
    many as the artifact's format holds for that kernel (SITE_TILES). A later field (the split-K
    kernel's BLOCK_M, which encoders tune) is read back as its default, so a config whose later
    field is not its default cannot be stored, and is refused here rather than stored as
    another config (or, as on 2026-12-04, written whole and refused by every load)."""
    if t is None:
        return []
    width = SITE_TILES[t.kernel][1]
    later = dataclasses.fields(t.config)[width:]
    changed = [f.name for f in later if getattr(t.config, f.name) != f.default]
    if changed:
        raise ValueError(f"{t.describe()}: {changed} cannot be stored in a decode site tile")
    return [[t.batch, t.kernel, t.site, *dataclasses.astuple(t.config)[:width]]]
