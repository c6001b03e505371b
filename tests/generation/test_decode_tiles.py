"""The fused decode kernels' tiles: tuned per decode batch and call site by the compiler (each
config checked, then timed), stored in the manifest as typed `DecodeTile`s, read by the
runtime decoder; and the PDL knob of the decode-kernel choice. On the CPU the kernels run in
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
from kernl.kernels.lm_head_argmax import lm_head_argmax_decode_configs
from kernl.kernels.norm_linear import norm_linear_decode_configs
from kernl.kernels.skinny_linear_fused import skinny_linear_fused_decode_configs

from .tiny_models import mixed_prompts, tiny_model

SPACES = {
    "norm_linear": norm_linear_decode_configs(),
    "skinny_linear_fused": skinny_linear_fused_decode_configs(),
    "lm_head_argmax": lm_head_argmax_decode_configs(),
}
FUSED = dict(attention="triton", norm="fused", linear="fused", rope="triton", lm_head="triton")


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


def _tile(batch: int, kernel: str, site: str, c) -> DecodeTile:
    split = getattr(c, "split_k", 0)
    return DecodeTile(batch, kernel, site, c.BLOCK_N, c.BLOCK_K, split, c.num_warps, c.num_stages)


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
    for batch in (1, 3):  # one batch at a time, to know which one the fake is timing
        fake_ms.batch = batch
        t, tm = decode_tiles.tune_decode_tiles(model.decoder, [batch], lambda _: None, fake_ms)
        tiles += t
        timings += tm
    assert all(t.error is None for t in timings), [t.describe() for t in timings if t.error]
    sites = [(k, s) for k, ss in DECODE_TILE_KERNELS.items() for s in ss]
    assert len(timings) == 2 * sum(len(SPACES[k]) for k, _ in sites)
    expected = [_tile(b, k, s, SPACES[k][2 if b == 1 else -1]) for b in (1, 3) for k, s in sites]
    assert sorted(tiles) == sorted(expected)
    # every layer's weights are in the timed calls (one call for the single lm_head)
    assert set(calls_seen) == {model.decoder.spec.num_layers, 1}
    # batches over 16 rows have no few-rows kernels: nothing to tune
    assert decode_tiles.tune_decode_tiles(model.decoder, [17], print, fake_ms) == ((), [])


def test_tile_choices_are_cached_on_disk(artifact, tmp_path):
    model = kernl.runtime.load(artifact)
    timed = []

    def fake_ms(calls, config):
        timed.append(config)
        return 1.0 if config == SPACES[type(config).__module__.split(".")[-1]][1] else 2.0

    first, t1 = decode_tiles.tune_decode_tiles(model.decoder, [3], print, fake_ms, tmp_path)
    n = len(timed)
    assert n == len(t1) and not any(t.cached for t in t1)
    again, t2 = decode_tiles.tune_decode_tiles(model.decoder, [3], print, fake_ms, tmp_path)
    assert again == first and len(timed) == n  # nothing timed the second time
    assert len(t2) == len(first) and all(t.cached for t in t2)
    # a corrupt record is timed again; another batch is another key
    victim = sorted(tmp_path.glob("decode_tile-*.json"))[0]
    victim.write_text("{not json")
    third, _ = decode_tiles.tune_decode_tiles(model.decoder, [3], print, fake_ms, tmp_path)
    assert third == first and n < len(timed) < 2 * n
    decode_tiles.tune_decode_tiles(model.decoder, [1], print, fake_ms, tmp_path)
    assert len(list(tmp_path.glob("decode_tile-*.json"))) == 2 * len(first)


def test_a_config_that_computes_wrongly_is_never_chosen(artifact, monkeypatch):
    model = kernl.runtime.load(artifact)
    real_sites = decode_tiles.decode_sites
    bad = SPACES["skinny_linear_fused"][1]

    def sabotaged(dec, batch, seed=0):
        sites = real_sites(dec, batch, seed)
        for s in sites:
            if s.kernel == "skinny_linear_fused":
                call = s.call
                s.call = lambda i, c, call=call: call(i, c) + (1.0 if c == bad else 0.0)
        return sites

    monkeypatch.setattr(decode_tiles, "decode_sites", sabotaged)
    fastest_is_bad = lambda calls, c: 0.5 if c == bad else 1.0  # noqa: E731
    tiles, timings = decode_tiles.tune_decode_tiles(
        model.decoder, [3], lambda _: None, fastest_is_bad
    )
    failed = [t for t in timings if t.error]
    assert len(failed) == 2 and all(t.config == bad for t in failed)  # O and down
    assert "check failed" in failed[0].describe()
    for t in tiles:
        if t.kernel == "skinny_linear_fused":
            assert t == _tile(3, t.kernel, t.site, SPACES["skinny_linear_fused"][0])


def test_the_decoder_launches_the_tiles_it_is_given(artifact):
    model = kernl.runtime.load(artifact)
    ids, mask = mixed_prompts(3, [11, 4, 16])
    ref = list(model.stream(ids, mask, max_new_tokens=4, eos_token_id=[], output_logits=True))
    picks = {k: SPACES[k][-1] for k in SPACES}  # none of them the kernels' default
    sites = [(k, s) for k, ss in DECODE_TILE_KERNELS.items() for s in ss]
    tiles = tuple(_tile(3, k, s, picks[k]) for k, s in sites)
    model.decoder.kernels = DecodeKernels(**FUSED, tiles=tiles)
    model._steps.clear()
    launched = []

    def spy(kernel, grid, args, kwargs):
        launched.append((kernel.fn.__name__, kwargs.get("BLOCK_N"), kwargs.get("BLOCK_K")))
        return launch.jit_launch(kernel, grid, args, kwargs)

    with launch.launching_with(spy):
        out = list(model.stream(ids, mask, max_new_tokens=4, eos_token_id=[], output_logits=True))
    for (i, lg), (ri, rlg) in zip(out, ref):
        assert torch.equal(i, ri)
        assert (lg - rlg).abs().max() < 1e-4 * max(1.0, rlg.abs().max())
    names = {"norm_linear": "_norm_linear_kernel", "skinny_linear_fused": "_skinny_fused_kernel"}
    names["lm_head_argmax"] = "_lm_head_argmax_kernel"
    for kernel, c in picks.items():
        used = {(bn, bk) for name, bn, bk in launched if name == names[kernel]}
        assert used == {(c.BLOCK_N, c.BLOCK_K)}, (kernel, used)


def test_tiles_and_pdl_are_stored_checked_and_served(tmp_path):
    from kernl.compiler.tasks.causal_lm import compile_causal_lm

    c = SPACES["norm_linear"][3]
    forced = {**FUSED, "pdl": True, "prefetch": True}
    forced["tiles"] = [list(_tile(4, "norm_linear", "qkv", c))]
    compile_causal_lm(
        tiny_model("llama3"),
        "batch=4 prompt=16 cache=32",
        tmp_path / "lm.kernl",
        dtype="fp32",
        device="cpu",
        decode_kernels=forced,
    )
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    k = model.decoder.kernels
    assert k.pdl and k.tiles == (_tile(4, "norm_linear", "qkv", c),)
    assert k.tile(4, "norm_linear", "qkv").block_k == c.BLOCK_K
    assert k.tile(1, "norm_linear", "qkv") is None
    assert k.prefetch and "pdl prefetch tiles=1" in k.describe()
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
        "tiles",
    ],
)
def test_a_hostile_tile_is_refused_as_an_artifact_error(artifact, tmp_path, tiles):
    import shutil

    import msgpack

    from kernl.artifacts import ArtifactError, pack_manifest

    root = Path(shutil.copytree(artifact, tmp_path / "copy"))
    m = msgpack.unpackb((root / "manifest.msgpack").read_bytes(), raw=False)
    m["extra"]["decode_kernels"] = {**FUSED, "tiles": tiles}
    (root / "manifest.msgpack").write_bytes(pack_manifest(m))
    with pytest.raises(ArtifactError, match="causal-LM description is invalid"):
        kernl.runtime.load(root)


@pytest.mark.parametrize(
    "pdl_faster,prefetch_faster", [(True, False), (False, False), (True, True), (False, True)]
)
def test_the_choice_keeps_the_used_tiles_and_pdl_only_when_faster(
    artifact, pdl_faster, prefetch_faster
):
    from kernl.compiler.tasks.causal_lm.decode_kernels import choose_decode_kernels

    model = kernl.runtime.load(artifact)
    sites = [(k, s) for k, ss in DECODE_TILE_KERNELS.items() for s in ss]
    tiles = tuple(_tile(b, k, s, SPACES[k][0]) for b in (1, 3) for k, s in sites)

    def fake_ms(gen):
        k = gen.decoder.kernels
        # every candidate runs on the tuned tiles (PDL, tried last: those the choice uses)
        assert k.tiles == tiles or k.pdl and set(k.tiles) < set(tiles)
        ms = 10.0 - (k.linear == "fused") - (k.lm_head == "triton")  # norm=fused not kept
        ms -= 2.0 if k.pdl and pdl_faster else 0.0
        return ms - 1.0 if k.prefetch and prefetch_faster else ms

    chosen, timings = choose_decode_kernels(
        model, lambda _: None, step_ms=fake_ms, tiles=tiles, try_pdl=True
    )
    assert chosen.linear == "fused" and chosen.lm_head == "triton" and chosen.norm != "fused"
    # norm_linear's tiles dropped: the choice does not run it
    assert chosen.tiles == tuple(t for t in tiles if t.kernel != "norm_linear")
    # PDL, then PDL with the prefetch, tried last (no-ops in the interpreter: same logits)
    assert [(t.kernels.pdl, t.kernels.prefetch) for t in timings[-2:]] == [
        (True, False),
        (True, True),
    ]
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
        return 10.0 - (k.linear == "fused") - 5.0 * k.pdl

    def broken(gen, kernels):
        raise RuntimeError("graph capture refused the programmatic edge")

    monkeypatch.setattr(dk, "_decode_logits", broken)
    said = []
    chosen, _ = dk.choose_decode_kernels(model, said.append, step_ms=fake_ms, try_pdl=True)
    assert chosen.linear == "fused" and not chosen.pdl
    assert any("PDL not tried further: RuntimeError" in m for m in said)
    assert model.decoder.kernels == chosen and not model._steps
