"""The launch config (tile) of each fused few-rows kernel of a decode step, per decode batch and
call site, and of decode attention per decode batch and cache length, chosen by timing on the
model's own weights and cache layout.

The fused kernels (`norm_linear` at QKV and the MLP up projection, `skinny_linear_fused` at
QKV, up, O and down, `gated_mlp` at the up projection, `lm_head_argmax`) stream weights at
the bandwidth their tile, split-K, warps and stages allow, and the best differs by shape and
batch (issue 15: a first-guess tile left
`norm_linear` at a quarter of the copy bandwidth; decode attention's default split gave a
batch-1 Llama-1B step 16 programs per layer, each looping over 4 key blocks: latency-bound).
So for every decode batch of <= 16 rows and every site (attention: every kv length), each
config of the kernel's small decode space (`*_decode_configs()` in its file) is run once and
checked against a float64 reference (at most 2x the error of the same computation in the
model's dtype, plus a little), then timed: on a GPU a CUDA graph of one call per layer, each
on that layer's weights or cache (as a decode step streams them, so nothing is served from
L2), replayed; elsewhere the eager calls under a wall clock, which only shows the
search works. The fastest checked config becomes a `DecodeTile`; the runtime only reads it.

Batches differ only in M == 1 or not for Triton's specialisation, so a config compiles at most
twice per site; the report counts the timings. Each site's choice is cached on disk (beside
compiler/tune.py's), keyed by GPU, toolchain versions, the kernel's source, the operands'
shapes and dtypes, the batch and the space: compiling the same model again times nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch

from kernl.artifacts.generation import DECODE_TILE_KERNELS, DecodeTile
from kernl.runtime.binaries import allow_jit
from kernl.runtime.generation.decoder import FEW_ROWS, Decoder
from kernl.runtime.graphs import capturing

from ...compile_ahead import compile_ahead_calls, compile_threads
from ...tune import quiet_native_stderr, verbose_compiler, write_cache_record

REPLAYS = 10
MIN_CALLS = 8  # a CUDA graph holds at least this many calls (the layers, cycled)


@dataclass
class TileTiming:
    batch: int
    kernel: str
    site: str
    config: object
    ms: float | None  # per call
    error: str | None = None
    cached: bool = False  # the disk cache's record of an earlier compile, nothing timed now
    cache: int = 0  # the kv length (decode attention), 0 for the kernels that do not read it

    def describe(self) -> str:
        where = f"{self.site}, cache {self.cache}" if self.cache else self.site
        what = f"batch {self.batch} {self.kernel} at {where} {self.config}"
        if self.error:
            return f"{what}: {self.error}"
        return f"{what}: {self.ms * 1e3:.2f} us" + (" (cached)" if self.cached else "")


@dataclass
class Site:
    """One call site: `call(i, config)` runs the kernel on layer i's weights (outputs into
    buffers allocated once); `check(out)` takes what `call(0, config)` returned and gives its
    error vs float64 and the error allowed (references computed once, on first use)."""

    kernel: str
    site: str
    layers: int
    call: Callable[[int, object], object]
    check: Callable[[object], tuple[float, float]]
    configs: list
    operands: str  # shapes, dtypes and variant of what the kernel reads (the cache key)
    cache: int = 0  # decode attention: the kv length it reads (its tile is per length too)


def _allowed(ref64: torch.Tensor, stock: torch.Tensor) -> float:
    """Twice the error of the plain computation in the model's dtype, plus a rounding step of
    the output's scale (the fused kernels round once where the plain ones round twice)."""
    stock_err = (stock.double() - ref64).abs().max().item()
    eps = torch.finfo(stock.dtype).eps
    return 2 * stock_err + 4 * eps * max(1.0, ref64.abs().max().item())


def _err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    err = (out.double() - ref64).abs().max().item()
    return float("inf") if err != err else err  # NaN fails


def _shapes(tensors) -> str:
    return " ".join(
        "none" if t is None else f"{list(t.shape)}:{str(t.dtype).removeprefix('torch.')}"
        for t in tensors
    )


def _once(fn: Callable[[], object]) -> Callable[[], object]:
    """fn's result, computed on the first call only."""
    memo: list = []
    return lambda: memo[0] if memo else memo.append(fn()) or memo[0]


def decode_sites(
    dec: Decoder, batch: int, seed: int = 0, kv_lengths: tuple[int, ...] = ()
) -> list[Site]:
    """The call sites of `dec`'s decode step that a fused kernel can take, at `batch` rows,
    and decode attention's, one per kv length of `kv_lengths` (the decode buckets')."""
    from kernl.kernels import gated_mlp as mlp
    from kernl.kernels import norm_linear as nl
    from kernl.kernels import skinny_linear_fused as slf

    s, L = dec.spec, dec.layers
    dev, dt = dec.embed.device, dec.dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device=dev, dtype=dt)  # noqa: E731
    d = lambda t: None if t is None else t.double()  # noqa: E731
    x = rnd(batch, s.hidden_size)
    counters = nl.new_counters(dev)
    sites = []
    if dec.norm_folds:
        gated = dec.gated_silu_without_bias
        for site, norm_w, norm_b, w, b, g in [
            ("qkv", "attn_norm_w", "attn_norm_b", "qkv_w", "qkv_b", False),
            ("up", "mlp_norm_w", "mlp_norm_b", "up_w", "up_b", gated),
        ]:
            args = [
                (getattr(lw, norm_w), getattr(lw, norm_b), getattr(lw, w), getattr(lw, b))
                for lw in L
            ]
            n_out = args[0][2].shape[0] // (2 if g else 1)
            out = torch.empty(batch, n_out, device=dev, dtype=dt)
            kw = dict(eps=s.norm_eps, norm=s.norm, gated=g)

            def call(i, c, args=args, out=out, kw=kw):
                return nl.norm_linear(x, *args[i], out=out, counters=counters, config=c, **kw)

            @_once
            def refs(args=args, kw=kw):
                ref = nl.norm_linear_reference(d(x), *map(d, args[0]), **kw)
                return ref, _allowed(ref, nl.norm_linear_reference(x, *args[0], **kw))

            def check(out, refs=refs):
                ref, allowed = refs()
                return _err(out, ref), allowed

            ops = f"{_shapes(args[0])} norm={s.norm} eps={s.norm_eps} gated={g} layers={len(L)}"
            configs = nl.norm_linear_decode_configs()
            sites.append(Site("norm_linear", site, len(L), call, check, configs, ops))
    # QKV and up after a norm of their own (no residual); O and down add the residual stream,
    # but for Gemma2, whose residual adds come after the norms of their outputs
    stream = None if s.sandwich_norms else x
    for site, w, b, res in [
        ("qkv", "qkv_w", "qkv_b", None),
        ("up", "up_w", "up_b", None),
        ("o", "o_w", "o_b", stream),
        ("down", "down_w", "down_b", stream),
    ]:
        args = [(getattr(lw, w), getattr(lw, b)) for lw in L]
        h = rnd(batch, args[0][0].shape[1])
        out = torch.empty(batch, args[0][0].shape[0], device=dev, dtype=dt)

        def call(i, c, args=args, h=h, out=out, res=res):
            w, b = args[i]
            return slf.skinny_linear_fused(h, w, b, res, out=out, counters=counters, config=c)

        @_once
        def refs(args=args, h=h, res=res):
            w, b = args[0]
            ref = slf.skinny_linear_fused_reference(d(h), d(w), d(b), d(res))
            return ref, _allowed(ref, slf.skinny_linear_fused_reference(h, w, b, res))

        def check(out, refs=refs):
            ref, allowed = refs()
            return _err(out, ref), allowed

        ops = f"{_shapes(args[0] + (h, res))} layers={len(L)}"
        configs = slf.skinny_linear_fused_decode_configs()
        sites.append(Site("skinny_linear_fused", site, len(L), call, check, configs, ops))
    if dec.gated_silu_without_bias:  # gate/up + SiLU·mul after a norm of its own
        n = L[0].up_w.shape[0] // 2
        halves = [(lw.up_w[:n], lw.up_w[n:]) for lw in L]
        h = rnd(batch, s.hidden_size)
        out = torch.empty(batch, n, device=dev, dtype=dt)

        def call_mlp(i, c):
            return mlp.gated_mlp(h, *halves[i], out=out, config=c)

        @_once
        def refs_mlp():
            ref = mlp.gated_mlp_reference(d(h), *map(d, halves[0]))
            return ref, _allowed(ref, mlp.gated_mlp_reference(h, *halves[0]))

        def check_mlp(out):
            ref, allowed = refs_mlp()
            return _err(out, ref), allowed

        ops = f"{_shapes((h, *halves[0]))} layers={len(L)}"
        configs = mlp.gated_mlp_decode_configs()
        sites.append(Site("gated_mlp", "up", len(L), call_mlp, check_mlp, configs, ops))
    if dec.lm_head_kernel_fits:
        sites.append(_lm_head_site(dec, x, batch))
    if kv_lengths:
        sites += _attention_sites(dec, batch, sorted(set(kv_lengths)), rnd)
    return sites


def _lm_head_site(dec: Decoder, x: torch.Tensor, batch: int) -> Site:
    """The greedy step's lm_head as the decoder runs it: logits written, the final RMSNorm
    folded in where it folds."""
    from kernl.kernels import lm_head_argmax as lm

    s, dev, dt = dec.spec, dec.embed.device, dec.dtype
    d = lambda t: None if t is None else t.double()  # noqa: E731
    norm_w = dec.final_norm_w if dec.final_norm_folds else None
    logits = torch.empty(batch, dec.lm_head.shape[0], device=dev, dtype=dt)
    ids = torch.empty(batch, dtype=torch.int64, device=dev)
    workspace = lm.new_workspace(dev)

    def call_lm(i, c):
        return lm.lm_head_argmax(
            x,
            dec.lm_head,
            norm_weight=norm_w,
            eps=s.norm_eps,
            logits_out=logits,
            ids_out=ids,
            workspace=workspace,
            config=c,
        )

    @_once
    def refs_lm():
        _, ref = lm.lm_head_argmax_reference(d(x), d(dec.lm_head), d(norm_w), s.norm_eps)
        _, stock = lm.lm_head_argmax_reference(x, dec.lm_head, norm_w, s.norm_eps)
        return ref, _allowed(ref, stock)

    def check_lm(out):
        (got_ids, got), (ref, allowed) = out, refs_lm()
        err = _err(got, ref)
        if not torch.equal(got_ids, got.argmax(-1)):  # ids are the argmax of its own logits
            err = float("inf")
        return err, allowed

    # one weight: a few calls on it (hundreds of MB at real vocabularies: past L2 anyway)
    ops = f"{_shapes((x, dec.lm_head, norm_w))} eps={s.norm_eps}"
    configs = lm.lm_head_argmax_decode_configs()
    return Site("lm_head_argmax", "lm_head", 1, call_lm, check_lm, configs, ops)


def _attention_sites(dec: Decoder, batch: int, kv_lengths: list[int], rnd) -> list[Site]:
    """Decode attention as the decoder calls it: q a view of the rotated q/k rows, K/V the
    leading slots of a [layers, batch, kv heads, slots, head dim] cache as long as the longest
    bucket, the valid length one expanded scalar, and the valid-slot mask a slice of the
    state's [batch, slots] one (here with some left padding). Timed with the whole bucket
    valid: the slowest step the bucket serves (within the window where every layer has one)."""
    from kernl.kernels import decode_attention as da
    from kernl.runtime.generation.decoder import KVCache

    s, L = dec.spec, len(dec.layers)
    nh, kvh, d = s.num_heads, s.num_kv_heads, s.head_dim
    slots = max(kv_lengths)

    @_once
    def cache():
        """Made on the first call (a site whose tile the tuning cache holds needs none), filled
        a layer at a time on the device: a whole cache's random values made on the host were
        17 GB of host memory for Llama-3-8B at batch 16 and 8192 slots."""
        made = KVCache.allocate(s, batch, slots, dec.dtype, dec.embed.device)
        g = torch.Generator(device=made.k.device).manual_seed(0)
        for layer in (*made.k, *made.v):
            layer.normal_(generator=g)
        return made

    q = rnd(batch, nh + kvh, d)[:, :nh].unsqueeze(2)
    valid = torch.ones(batch, slots, dtype=torch.bool, device=q.device)
    for row in range(1, batch):
        valid[row, : row % 8] = False  # a left-padded prompt
    out = torch.empty(batch, nh, 1, d, device=q.device, dtype=dec.dtype)
    sites = []
    for kv_len in kv_lengths:

        def kv(i, kv_len=kv_len):
            return cache().k[i, :, :, :kv_len], cache().v[i, :, :, :kv_len]

        lens = torch.full((1,), kv_len, dtype=torch.int64, device=q.device).expand(batch)
        kw = dict(sm_scale=s.attention_scale, kv_lens=lens, kv_mask=valid[:, :kv_len])
        kw["softcap"] = s.attn_logit_softcap  # Gemma2's, as the step passes it
        # where every layer has the window (Mistral), the step reads the window's slots only:
        # timed so; a mix (Gemma2) is timed over the whole cache, the slower of its two reads
        windowed = dec.window is not None and all(dec.windowed)
        if windowed:
            kw["window"] = dec.window

        def call(i, c, kv=kv, kw=kw):
            return da.decode_attention(q, *kv(i), out=out, config=c, **kw)

        @_once
        def refs(kv=kv, kw=kw):
            ref = da.decode_attention_reference(q.double(), *(t.double() for t in kv(0)), **kw)
            return ref, _allowed(ref, da.decode_attention_reference(q, *kv(0), **kw))

        def check(out, refs=refs):
            ref, allowed = refs()
            return _err(out, ref), allowed

        # the cache key reads the K/V views' shapes, not the cache: meta tensors of them
        views = [torch.empty(batch, kvh, kv_len, d, dtype=dec.dtype, device="meta")] * 2
        ops = f"{_shapes((q, *views))} slots={slots} scale={s.attention_scale} layers={L}"
        if s.attn_logit_softcap is not None:  # its own kernel variant: its own cache entry
            ops += f" softcap={s.attn_logit_softcap}"
        if windowed:
            ops += f" window={dec.window}"
        configs = da.decode_attention_configs()
        sites.append(Site("decode_attention", "attn", L, call, check, configs, ops, kv_len))
    return sites


def graph_ms(calls: list[Callable[[], object]], device: torch.device) -> float:
    """Per-call time of `calls` in order: on CUDA, the median over REPLAYS replays of one CUDA
    graph holding them (cycled to at least MIN_CALLS); elsewhere one eager pass."""
    if device.type != "cuda":
        t = time.perf_counter()
        for fn in calls:
            fn()
        return (time.perf_counter() - t) * 1e3 / len(calls)
    seq = [calls[i % len(calls)] for i in range(max(MIN_CALLS, len(calls)))]
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for fn in calls:  # compile and warm outside the capture
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with capturing(graph):
        for fn in seq:
            fn()
    graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(seq))
    return median(times)


def tune_decode_tiles(
    dec: Decoder,
    batches: list[int],
    say: Callable[[str], None],
    measure: Callable[[list[Callable[[], object]], object], float] | None = None,
    cache: Path | None = None,
    kv_lengths: tuple[int, ...] = (),
) -> tuple[tuple[DecodeTile, ...], list[TileTiming]]:
    """The fastest checked config of every site at every batch of <= FEW_ROWS rows (decode
    attention's at every kv length of `kv_lengths`; none without), and every timing taken.
    `measure(calls, config)` (per-call ms) defaults to `graph_ms` on the decoder's device. A
    config that fails to compile, to run or its check is reported and skipped; a site where
    none passes gets no tile (its kernel's default config). `cache`: the folder of
    the disk cache; None: compiler/tune.py's cache folder on a GPU with the real timer, no
    cache otherwise (the interpreter's timings mean nothing)."""
    device = dec.embed.device
    if cache is None and measure is None and device.type == "cuda":
        from ...tune import cache_dir

        cache = cache_dir()
    measure = measure or (lambda calls, config: graph_ms(calls, device))
    threads = compile_threads() if device.type == "cuda" else 0
    tiles, timings = [], []
    with allow_jit(), torch.no_grad():
        for batch in sorted(b for b in set(batches) if b <= FEW_ROWS):
            try:
                sites = decode_sites(dec, batch, kv_lengths=tuple(kv_lengths))
            except Exception as e:  # no tiles at this batch: the kernels' defaults serve it
                say(f"decode tiles at batch {batch} not tuned: {type(e).__name__}: {e}"[:300])
                continue
            for site in sites:
                path = (
                    cache / f"decode_tile-{_cache_key(site, batch, device)}.json" if cache else None
                )
                hit = _read_cached(path, site, batch)
                if hit is not None:
                    tiles.append(_tile(batch, site, hit.config))
                    timings.append(hit)
                    say(f"decode tile {hit.describe()}")
                    continue
                best = fastest_checked(
                    lambda c, site=site: TileTiming(
                        batch, site.kernel, site.site, c, None, cache=site.cache
                    ),
                    site.call,
                    site.check,
                    site.configs,
                    site.layers,
                    measure,
                    timings,
                    threads,
                )
                if best is None:
                    say(f"batch {batch} {site.kernel} at {site.site}: no config passed; default")
                    continue
                tiles.append(_tile(batch, site, best.config))
                say(f"decode tile {best.describe()} (best of {len(site.configs)})")
                if path is not None:
                    _write_cached(path, site.configs.index(best.config), best.ms)
    return tuple(tiles), timings


def fastest_checked(
    timing: Callable[[object], TileTiming],
    call: Callable[[int, object], object],
    check: Callable[[object], tuple[float, float]],
    configs: list,
    layers: int,
    measure: Callable[[list[Callable[[], object]], object], float],
    timings: list[TileTiming],
    compile_threads: int = 0,
) -> TileTiming | None:
    """Of `configs`, the fastest whose `check(call(0, config))` passes, timed by `measure` over
    one call per layer; every config's record (`timing(config)`, its time or why it failed)
    is appended to `timings`. None when no config passes. With `compile_threads`, the
    configs' kernels compile on that many threads first (compiler/compile_ahead.py). Shared
    with the encoder-decoder's sites (compiler/tasks/seq2seq/decode_tiles.py)."""
    if compile_threads:
        with quiet_native_stderr(verbose_compiler()):
            compile_ahead_calls(lambda c: call(0, c), configs, compile_threads)
    best: TileTiming | None = None
    for c in configs:
        t = timing(c)
        try:
            err, allowed = check(call(0, c))
            if not err <= allowed:
                t.error = f"check failed: max error {err:.3g} > {allowed:.3g}"
            else:
                t.ms = measure([lambda i=i, c=c: call(i, c) for i in range(layers)], c)
        except Exception as e:  # noqa: BLE001 - a config that does not compile or fit here
            t.error = f"{type(e).__name__}: {e}"[:200]
        timings.append(t)
        if t.error is None and (best is None or t.ms < best.ms):
            best = t
    return best


def _tile(batch: int, site: Site, c) -> DecodeTile:
    if site.kernel == "decode_attention":  # no K tile; its split is the number of chunks
        block_k, split = 0, c.num_splits
    else:
        block_k, split = c.BLOCK_K, getattr(c, "split_k", 0)
    return DecodeTile(
        batch,
        site.kernel,
        site.site,
        c.BLOCK_N,
        block_k,
        split,
        c.num_warps,
        c.num_stages,
        site.cache,
    )


def _cache_key(site: Site, batch: int, device: torch.device) -> str:
    import triton

    from kernl.kernels import launch

    assert site.kernel in DECODE_TILE_KERNELS  # each is the name of its module in kernl.kernels
    mod = __import__(f"kernl.kernels.{site.kernel}", fromlist=["_"])
    source = inspect.getsource(mod) + inspect.getsource(launch)
    target = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    parts = [
        target,
        torch.__version__,
        triton.__version__,
        hashlib.sha256(source.encode()).hexdigest(),
        site.kernel,
        site.site,
        batch,
        site.operands,
        [dataclasses.asdict(c) for c in site.configs],
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _write_cached(path: Path, index: int, ms: float) -> None:
    try:  # through a temporary file of a random name: compiles may share the cache folder
        write_cache_record(path, {"index": index, "ms": ms})
    except OSError:
        pass  # a cache that cannot be written only costs the next compile its timings


def _read_cached(path: Path | None, site: Site, batch: int) -> TileTiming | None:
    """The cached choice of this site, if there is a readable one for this very space."""
    if path is None or not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
        config = site.configs[int(rec["index"])]
        ms = float(rec["ms"])
        return TileTiming(batch, site.kernel, site.site, config, ms, cached=True, cache=site.cache)
    except (
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
    ):  # UnicodeDecodeError: a ValueError
        return None  # unreadable: time again (and overwrite it)


def used_tiles(
    tiles: tuple[DecodeTile, ...],
    norm: str,
    linear: str,
    lm_head: str,
    attention: str = "torch",
    gated_mlp: str = "torch",
):
    """The tiles of the kernels a decode-kernel choice runs (the others are not stored)."""
    used = {
        "norm_linear": norm == "fused",
        "skinny_linear_fused": linear == "fused",
        "gated_mlp": gated_mlp == "triton",
        "lm_head_argmax": lm_head == "triton",
        "decode_attention": attention == "triton",
    }
    return tuple(t for t in tiles if used[t.kernel])
