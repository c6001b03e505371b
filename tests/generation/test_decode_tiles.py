"""The fused decode kernels' tiles: tuned per decode batch and call site by the compiler (each
config checked, then timed; decode attention's per kv length too), stored in the manifest as
typed `DecodeTile`s, read by the runtime decoder; and the PDL knob of the decode-kernel choice. On the CPU the kernels run in
Triton's interpreter and the timings are injected."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import kernl.compiler
import kernl.runtime
from kernl.artifacts.generation import DECODE_TILE_KERNELS, DecodeKernels, DecodeTile
from kernl.compiler.tasks.causal_lm import decode_tiles
from kernl.kernels import launch
from kernl.kernels.decode_attention import decode_attention_configs
from kernl.kernels.gated_mlp import gated_mlp_decode_configs
from kernl.kernels.lm_head_argmax import lm_head_argmax_decode_configs
from kernl.kernels.norm_linear import norm_linear_decode_configs
from kernl.kernels.skinny_linear_fused import skinny_linear_fused_decode_configs

from .tiny_models import mixed_prompts, tiny_model

SPACES = {
    "norm_linear": norm_linear_decode_configs(),
    "skinny_linear_fused": skinny_linear_fused_decode_configs(),
    "gated_mlp": gated_mlp_decode_configs(),
    "lm_head_argmax": lm_head_argmax_decode_configs(),
    "decode_attention": decode_attention_configs(),
}
KV = 32  # the artifact's one decode kv length
FUSED = dict(attention="triton", norm="fused", linear="fused", rope="triton", lm_head="triton")
# the norms on their own kernel: QKV on skinny_linear_fused, gate/up + SiLU·mul on gated_mlp
UNFOLDED = {**FUSED, "norm": "triton", "gated_mlp": "triton"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiles") / "lm.kernl"
    kernl.compiler.compile(
        tiny_model("llama3"),
        "batch=1,3 prompt=16 cache=32",
        out,
        dtype="fp32",
        device="cpu",
        task="causal-lm",
    )
    return out


def _tile(batch: int, kernel: str, site: str, c, cache: int = 0) -> DecodeTile:
    if kernel == "decode_attention":
        n, w, st, sp = c.BLOCK_N, c.num_warps, c.num_stages, c.num_splits
        return DecodeTile(batch, kernel, site, n, 0, sp, w, st, cache)
    split = getattr(c, "split_k", 0)
    return DecodeTile(batch, kernel, site, c.BLOCK_N, c.BLOCK_K, split, c.num_warps, c.num_stages)


def _sites(kv_lengths=(KV,)) -> list[tuple[str, str, int]]:
    """(kernel, site, cache length) of every tuned site: attention's once per kv length."""
    out = []
    for kernel, sites in DECODE_TILE_KERNELS.items():
        caches = kv_lengths if kernel == "decode_attention" else (0,)
        out += [(kernel, site, cache) for site in sites for cache in caches]
    return out


def test_tiles_are_the_fastest_checked_config_of_every_site_and_batch(artifact):
    model = kernl.runtime.load(artifact)
    # fake timings: the third config of each space is fastest at batch 1, the last at batch 3
    calls_seen = []

    def fake_ms(calls, config):
        calls_seen.append(len(calls))
        space = next(s for s in SPACES.values() if config in s)
        want = 2 if fake_ms.batch == 1 else len(space) - 1
        return 1.0 if space.index(config) == want else 2.0 + space.index(config)

    tiles, timings = [], []
    kv_lengths = (24, KV)  # attention: a cache as long as the longest, its buckets' slices
    for batch in (1, 3):  # one batch at a time, to know which one the fake is timing
        fake_ms.batch = batch
        t, tm = decode_tiles.tune_decode_tiles(
            model.decoder, [batch], lambda _: None, fake_ms, kv_lengths=kv_lengths
        )
        tiles += t
        timings += tm
    assert all(t.error is None for t in timings), [t.describe() for t in timings if t.error]
    sites = _sites(kv_lengths)
    assert len(timings) == 2 * sum(len(SPACES[k]) for k, _, _ in sites)
    expected = [
        _tile(b, k, s, SPACES[k][2 if b == 1 else -1], cache)
        for b in (1, 3)
        for k, s, cache in sites
    ]
    assert sorted(tiles) == sorted(expected)
    assert "attn, cache 24" in next(t for t in timings if t.cache == 24).describe()
    # every layer's weights (cache) are in the timed calls (one call for the single lm_head)
    assert set(calls_seen) == {model.decoder.spec.num_layers, 1}
    # without kv lengths, no attention site
    alone, _ = decode_tiles.tune_decode_tiles(model.decoder, [1], lambda _: None, fake_ms)
    assert {t.kernel for t in alone} == set(SPACES) - {"decode_attention"}
    # batches over 16 rows have no few-rows kernels: nothing to tune
    assert decode_tiles.tune_decode_tiles(model.decoder, [17], print, fake_ms) == ((), [])


def test_gemma2_tunes_only_the_kernels_its_step_runs(tmp_path):
    """Gemma2's softcapped logits keep lm_head_argmax out of its step, and its norms fold
    into no linear: skinny_linear_fused is tuned, its O and down sites without the residual
    (added after the norms of their outputs), and decode attention with its softcap, each
    config checked against the softcapped reference."""
    out = tmp_path / "lm.kernl"
    kernl.compiler.compile(
        tiny_model("gemma2"), "batch=3 prompt=16 cache=32", out, dtype="fp32", device="cpu",
        task="causal-lm",
    )  # fmt: skip
    dec = kernl.runtime.load(out).decoder
    sites = decode_tiles.decode_sites(dec, 3, kv_lengths=(KV,))
    assert [(s.kernel, s.site) for s in sites] == [
        ("skinny_linear_fused", site) for site in ("qkv", "up", "o", "down")
    ] + [("decode_attention", "attn")]
    for site in sites[:4]:
        assert site.operands.endswith(f"none layers={dec.spec.num_layers}"), site.operands
    assert sites[4].operands.endswith(f"softcap={dec.spec.attn_logit_softcap}")
    for site in sites:
        err, allowed = site.check(site.call(0, site.configs[0]))
        assert err <= allowed, (site.site, err, allowed)


def test_tile_choices_are_cached_on_disk(artifact, tmp_path):
    model = kernl.runtime.load(artifact)
    timed = []

    def fake_ms(calls, config):
        timed.append(config)
        return 1.0 if config == SPACES[type(config).__module__.split(".")[-1]][1] else 2.0

    def tune(batch, kv_lengths=(KV,)):
        return decode_tiles.tune_decode_tiles(
            model.decoder, [batch], print, fake_ms, tmp_path, kv_lengths=kv_lengths
        )

    first, t1 = tune(3)
    n = len(timed)
    assert n == len(t1) and not any(t.cached for t in t1)
    assert _tile(3, "decode_attention", "attn", SPACES["decode_attention"][1], KV) in first
    again, t2 = tune(3)
    assert again == first and len(timed) == n  # nothing timed the second time
    assert len(t2) == len(first) and all(t.cached for t in t2)
    # a corrupt record is timed again; another batch is another key
    victim = sorted(tmp_path.glob("decode_tile-*.json"))[0]
    victim.write_text("{not json")
    third, _ = tune(3)
    assert third == first and n < len(timed) < 2 * n
    tune(1)
    assert len(list(tmp_path.glob("decode_tile-*.json"))) == 2 * len(first)
    # another kv length is another key, for attention only
    tune(1, (16,))
    assert len(list(tmp_path.glob("decode_tile-*.json"))) == 2 * len(first) + 1


def test_a_config_that_computes_wrongly_is_never_chosen(artifact, monkeypatch):
    model = kernl.runtime.load(artifact)
    real_sites = decode_tiles.decode_sites
    bad = {k: SPACES[k][1] for k in ("skinny_linear_fused", "decode_attention")}

    def sabotaged(dec, batch, seed=0, kv_lengths=()):
        sites = real_sites(dec, batch, seed, kv_lengths)
        for s in sites:
            if s.kernel in bad:
                call, b = s.call, bad[s.kernel]
                s.call = lambda i, c, call=call, b=b: call(i, c) + (1.0 if c == b else 0.0)
        return sites

    monkeypatch.setattr(decode_tiles, "decode_sites", sabotaged)
    fastest_is_bad = lambda calls, c: 0.5 if c in bad.values() else 1.0  # noqa: E731
    tiles, timings = decode_tiles.tune_decode_tiles(
        model.decoder, [3], lambda _: None, fastest_is_bad, kv_lengths=(KV,)
    )
    failed = [t for t in timings if t.error]
    # QKV, up, O, down, attention
    assert len(failed) == 5 and all(t.config == bad[t.kernel] for t in failed)
    assert "check failed" in failed[0].describe()
    for t in tiles:
        if t.kernel in bad:
            assert t == _tile(3, t.kernel, t.site, SPACES[t.kernel][0], t.cache)


@pytest.mark.parametrize("kernels", [FUSED, UNFOLDED], ids=["norm-fused", "norm-alone"])
def test_the_decoder_launches_the_tiles_it_is_given(artifact, kernels):
    model = kernl.runtime.load(artifact)
    ids, mask = mixed_prompts(3, [11, 4, 16])
    ref = list(model.stream(ids, mask, max_new_tokens=4, eos_token_id=[], output_logits=True))
    picks = {k: SPACES[k][-1] for k in SPACES}  # none of them the kernels' default
    # attention: 16-slot chunks, so the 32-slot cache is 2 of them (the second past the valid
    # length at the first steps); decoys for every cache length and for another one
    picks["decode_attention"] = space = SPACES["decode_attention"][3]
    assert (space.BLOCK_N, space.num_splits) == (16, 64)
    tiles = tuple(_tile(3, k, s, picks[k], cache) for k, s, cache in _sites())
    decoys = [(SPACES["decode_attention"][4], 0), (SPACES["decode_attention"][7], 16)]
    tiles += tuple(_tile(3, "decode_attention", "attn", c, cache) for c, cache in decoys)
    model.decoder.kernels = DecodeKernels(**kernels, tiles=tiles)
    model._steps.clear()
    launched = []

    def spy(kernel, grid, args, kwargs):
        name = kernel.fn.__name__
        launched.append((name, kwargs.get("BLOCK_N"), kwargs.get("BLOCK_K")))
        if name == "_decode_split_kernel":
            launched.append(("attention grid", grid[0], kwargs["num_warps"]))
        return launch.jit_launch(kernel, grid, args, kwargs)

    with launch.launching_with(spy):
        out = list(model.stream(ids, mask, max_new_tokens=4, eos_token_id=[], output_logits=True))
    for (i, lg), (ri, rlg) in zip(out, ref):
        assert torch.equal(i, ri)
        assert (lg - rlg).abs().max() < 1e-4 * max(1.0, rlg.abs().max())
    names = {"norm_linear": "_norm_linear_kernel", "skinny_linear_fused": "_skinny_fused_kernel"}
    names["lm_head_argmax"] = "_lm_head_argmax_kernel"
    names["decode_attention"] = "_decode_split_kernel"
    names["gated_mlp"] = "_gated_mlp_kernel"
    # with the norms folded, QKV and up run norm_linear; alone, skinny_linear_fused (QKV) and
    # gated_mlp (up): each on its site's tile
    runs = {"norm_linear"} if kernels is FUSED else {"gated_mlp"}
    runs |= {"skinny_linear_fused", "lm_head_argmax", "decode_attention"}
    for kernel, c in picks.items():
        used = {(bn, bk) for name, bn, bk in launched if name == names[kernel]}
        want = {(c.BLOCK_N, getattr(c, "BLOCK_K", None))} if kernel in runs else set()
        assert used == want, (kernel, used)
    grids = {(n, w) for name, n, w in launched if name == "attention grid"}
    assert grids == {(2, space.num_warps)}


def test_tiles_and_pdl_are_stored_checked_and_served(tmp_path):
    from kernl.compiler.tasks.causal_lm import compile_causal_lm

    c = SPACES["norm_linear"][3]
    a = SPACES["decode_attention"][2]
    forced = {**FUSED, "pdl": True, "prefetch": True}
    # a tile as written before the cache length existed (8 fields), and one per cache length
    forced["tiles"] = [list(_tile(4, "norm_linear", "qkv", c))[:8]]
    forced["tiles"].append(list(_tile(4, "decode_attention", "attn", a, 24)))
    compile_causal_lm(
        tiny_model("llama3"),
        "batch=4 prompt=16 cache=24",  # the compile's check runs the forced step to the end
        tmp_path / "lm.kernl",
        dtype="fp32",
        device="cpu",
        decode_kernels=forced,
    )
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    k = model.decoder.kernels
    attn = _tile(4, "decode_attention", "attn", a, 24)
    assert k.pdl and k.tiles == (_tile(4, "norm_linear", "qkv", c), attn)
    assert k.tile(4, "norm_linear", "qkv").block_k == c.BLOCK_K
    assert k.tile(1, "norm_linear", "qkv") is None
    assert k.tile(4, "decode_attention", "attn", 24) == attn
    assert k.tile(4, "decode_attention", "attn", 16) is None
    assert model.decoder._tile_config(4, "decode_attention", "attn", 24) == a
    assert k.prefetch and "pdl prefetch tiles=2" in k.describe()
    ids, mask = mixed_prompts(3, [11, 4, 16])
    assert model.generate(ids, mask, max_new_tokens=4).shape == (3, 20)


def test_prefetch_needs_pdl():
    with pytest.raises(ValueError, match="prefetch needs pdl"):
        DecodeKernels(prefetch=True)
    with pytest.raises(ValueError, match="must be bools"):
        DecodeKernels(pdl="yes")


@pytest.mark.parametrize(
    "tiles",
    [
        [[1, "norm_linear", "o", 32, 128, 0, 4, 4]],  # no such site for the kernel
        [[1, "os.system", "qkv", 32, 128, 0, 4, 4]],
        [[1, "norm_linear", "qkv", 24, 128, 0, 4, 4]],  # not a power of two
        [[1, "norm_linear", "qkv", 32, 128, 0, 4, 99]],
        [[1, "lm_head_argmax", "lm_head", 32, 128, 2, 4, 4]],  # lm_head has no split
        [[1, "norm_linear", "qkv", 32, 128, 0, 4]],  # a field short
        [[1, "norm_linear", "qkv", 32, 128, 0, 4, 4]] * 2,  # twice
        [[1, "norm_linear", "qkv", 32.0, 128, 0, 4, 4]],
        [[1, "norm_linear", "qkv", 32, 128, 0, 4, 4, 32]],  # a cache length: it reads none
        [[1, "decode_attention", "attn", 16, 0, 64, 2, 2, -32]],
        [[1, "decode_attention", "attn", 16, 0, 64, 2, 2, "32"]],
        [[1, "decode_attention", "attn", 16, 0, 64, 2, 2, 48]],  # no such kv bucket
        [[1, "decode_attention", "attn", 16, 64, 64, 2, 2, 32]],  # attention has no K tile
        [[1, "decode_attention", "attn", 16, 0, 128, 2, 2, 32]],  # more chunks than merged
        [[1, "decode_attention", "attn", 16, 0, 64, 2, 2, 32, 0]],  # a field too many
        [[1, "decode_attention", "attn", 16, 0, 64, 2, 2, 32]] * 2,  # twice
        "tiles",
    ],
)
def test_a_hostile_tile_is_refused_as_an_artifact_error(artifact, tmp_path, tiles):
    from kernl.artifacts import ArtifactError

    root = _with_tiles(artifact, tmp_path, tiles)
    with pytest.raises(ArtifactError, match="causal-LM description is invalid"):
        kernl.runtime.load(root)


def test_tiles_written_before_the_cache_length_still_load(artifact, tmp_path):
    old = [[3, "norm_linear", "qkv", 32, 128, 0, 4, 4], [3, "lm_head_argmax", "lm_head"]]
    old[1] += [64, 128, 0, 4, 3]
    model = kernl.runtime.load(_with_tiles(artifact, tmp_path, old))
    tiles = model.decoder.kernels.tiles
    assert [list(t) for t in tiles] == [t + [0] for t in old]
    assert model.decoder.kernels.tile(3, "norm_linear", "qkv", cache=32) == tiles[0]
    ids, mask = mixed_prompts(3, [11, 4, 16])
    assert model.generate(ids, mask, max_new_tokens=2).shape == (3, 18)


def _with_tiles(artifact: Path, tmp_path: Path, tiles) -> Path:
    """A copy of `artifact` whose manifest declares the fused kernels on `tiles`."""
    import shutil

    import msgpack

    from kernl.artifacts import pack_manifest

    root = Path(shutil.copytree(artifact, tmp_path / "copy"))
    m = msgpack.unpackb((root / "manifest.msgpack").read_bytes(), raw=False)
    m["extra"]["decode_kernels"] = {**FUSED, "tiles": tiles}
    (root / "manifest.msgpack").write_bytes(pack_manifest(m))
    return root


@pytest.mark.parametrize(
    "pdl_faster,prefetch_faster", [(True, False), (False, False), (True, True), (False, True)]
)
def test_the_choice_keeps_the_used_tiles_and_pdl_only_when_faster(
    artifact, pdl_faster, prefetch_faster
):
    from kernl.compiler.tasks.causal_lm.decode_kernels import choose_decode_kernels

    model = kernl.runtime.load(artifact)
    tiles = tuple(_tile(b, k, s, SPACES[k][0], cache) for b in (1, 3) for k, s, cache in _sites())

    def fake_ms(gen):
        k = gen.decoder.kernels
        # every candidate runs on the tuned tiles (PDL, tried last: those the choice uses)
        assert k.tiles == tiles or k.pdl and set(k.tiles) < set(tiles)
        ms = 10.0 - (k.linear == "fused") - (k.lm_head == "triton")  # norm=fused not kept
        ms -= k.attention == "triton"
        ms -= 2.0 if k.pdl and pdl_faster else 0.0
        ms -= 1.0 if k.prefetch and prefetch_faster else 0.0
        ms += 5.0 if k.step == "persistent" else 0.0  # slower: not kept
        return [ms / 2, ms / 2]  # the artifact's two decode buckets

    chosen, timings = choose_decode_kernels(
        model, lambda _: None, step_ms=fake_ms, tiles=tiles, try_pdl=True
    )
    assert chosen.linear == "fused" and chosen.lm_head == "triton" and chosen.norm != "fused"
    assert chosen.attention == "triton"
    # norm_linear's and gated_mlp's tiles dropped: the choice runs neither
    assert chosen.tiles == tuple(t for t in tiles if t.kernel not in ("norm_linear", "gated_mlp"))
    # PDL, then PDL with the prefetch, tried after the pieces (no-ops in the interpreter: same
    # logits); then the persistent step on the choice, slower here
    pieces = [t for t in timings if t.kernels.step == "pieces"]
    assert [(t.kernels.pdl, t.kernels.prefetch) for t in pieces[-2:]] == [
        (True, False),
        (True, True),
    ]
    assert timings[-1].kernels.step == "persistent" and chosen.step == "pieces"
    assert chosen.pdl is (pdl_faster or prefetch_faster) and chosen.prefetch is prefetch_faster
    assert model.decoder.kernels == chosen and not model._steps
    no_pdl, _ = choose_decode_kernels(
        model, lambda _: None, step_ms=fake_ms, tiles=tiles, try_pdl=False
    )
    assert no_pdl == dataclasses.replace(chosen, pdl=False, prefetch=False)


def test_a_pdl_trial_that_fails_leaves_the_choice_without_pdl(artifact, monkeypatch):
    from kernl.compiler.tasks.causal_lm import decode_kernels as dk

    model = kernl.runtime.load(artifact)

    def fake_ms(gen):
        k = gen.decoder.kernels
        return [10.0 - (k.linear == "fused") - 5.0 * k.pdl] * 2

    def broken(gen, kernels):
        raise RuntimeError("graph capture refused the programmatic edge")

    monkeypatch.setattr(dk, "_decode_logits", broken)
    said = []
    chosen, _ = dk.choose_decode_kernels(model, said.append, step_ms=fake_ms, try_pdl=True)
    assert chosen.linear == "fused" and not chosen.pdl
    assert any("PDL not tried further: RuntimeError" in m for m in said)
    assert model.decoder.kernels == chosen and not model._steps


@pytest.mark.parametrize("family, timed_window", [("mistral_window", 8), ("gemma2_window", None)])
def test_decode_attention_is_tuned_over_the_window_where_every_layer_has_it(
    tmp_path, family, timed_window
):
    """Mistral's every layer reads the window's slots only: its attention tiles are timed and
    checked so (a tile cached for the whole cache is another entry); Gemma2's mix of windowed
    and full layers is timed over the whole cache."""
    out = tmp_path / "lm.kernl"
    kernl.compiler.compile(
        tiny_model(family), "batch=3 prompt=16 cache=32", out, dtype="fp32", device="cpu",
        task="causal-lm",
    )  # fmt: skip
    dec = kernl.runtime.load(out).decoder
    assert dec.window == 8
    (site,) = [s for s in decode_tiles.decode_sites(dec, 3, kv_lengths=(KV,)) if s.site == "attn"]
    assert site.operands.endswith(f"window={timed_window}") == (timed_window is not None)
    for config in (site.configs[0], site.configs[-1]):
        err, allowed = site.check(site.call(0, config))
        assert err <= allowed, (config, err, allowed)


def test_attention_sites_make_their_cache_on_first_call_on_the_device(artifact, monkeypatch):
    """Decode attention's tuning cache (as long as the longest bucket) is made when a config
    first runs, not with the sites: a site whose tile the tuning cache holds makes none. It is
    filled a layer at a time on the device, never a whole cache of values made on the host
    (17 GB of host memory for Llama-3-8B at batch 16 and 8192 slots, before)."""
    from kernl.runtime.generation.decoder import KVCache

    dec = kernl.runtime.load(artifact).decoder
    made = []
    allocate = KVCache.allocate
    monkeypatch.setattr(
        KVCache, "allocate", staticmethod(lambda *a: made.append(a) or allocate(*a))
    )
    host_draws = []
    randn = torch.randn
    monkeypatch.setattr(
        torch, "randn", lambda *shape, **kw: host_draws.append(shape) or randn(*shape, **kw)
    )
    sites = decode_tiles.decode_sites(dec, 3, kv_lengths=(24, KV))
    attention = [s for s in sites if s.kernel == "decode_attention"]
    assert len(attention) == 2 and made == []
    largest_draw = max(torch.Size(s).numel() for s in host_draws)
    spec = dec.spec
    assert largest_draw < 3 * spec.num_kv_heads * KV * spec.head_dim  # not one layer's cache
    config = decode_attention_configs()[0]
    for site in attention:  # both lengths read one cache, made once
        out = site.call(0, config)
        err, allowed = site.check(out)
        assert err <= allowed
    assert len(made) == 1
    spec_, batch, slots = made[0][:3]
    assert (batch, slots) == (3, KV)
