"""Per call-site launch tiles of an encoder-decoder's decode step (compiler/tasks/seq2seq/
decode_tiles.py): every site is tuned, its choice reaches the kernel it names and changes no
greedy id, the cross-attention moves to kernl's decode attention only where it beats SDPA, and
the artifact's reader refuses a malformed entry. CPU, fp32, Triton's interpreter, a fake timer
(the interpreter's timings mean nothing)."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import msgpack
import pytest
import torch

import kernl.runtime
from kernl.compiler.tasks.seq2seq import decode_tiles

from .test_seq2seq_generate import compiled, hf_generate, sources  # noqa: F401 - fixture
from .test_whisper_generate import compiled as whisper_compiled  # noqa: F401 - fixture
from .test_whisper_generate import features
from .test_whisper_generate import hf_generate as whisper_generate


@pytest.fixture(autouse=True)
def small_spaces(monkeypatch):
    """Each kernel's decode space cut to its first and last configs: the interpreter runs every
    config it checks, and two are enough to see a choice."""
    from kernl.kernels import decode_attention as da
    from kernl.kernels import norm_linear as nl
    from kernl.kernels import skinny_linear_fused as slf

    for module, name in [
        (nl, "norm_linear_decode_configs"),
        (slf, "skinny_linear_fused_decode_configs"),
        (da, "decode_attention_configs"),
    ]:
        full = getattr(module, name)()
        monkeypatch.setattr(module, name, lambda full=full: [full[0], full[-1]])


def fake_timer(model, sdpa_ms: float):
    """Per-call ms that falls with every measurement (the last config of a space wins), and
    `sdpa_ms` for the SDPA cross-attention; each measured call runs once."""
    falling = itertools.count()
    attend = model._attend
    seen = {}

    def spy(*args, **kwargs):
        seen["sdpa"] = True
        return attend(*args, **kwargs)

    model._attend = spy

    def measure(calls) -> float:
        seen.clear()
        calls[-1]()
        return sdpa_ms if seen else 1.0 / (2 + next(falling))

    return measure


def tuned(path: Path, fold_norms: bool, sdpa_ms: float) -> tuple[object, list[list], list]:
    model = kernl.runtime.load(path, device="cpu")
    model.model.kernels, model.model.fold_norms = True, fold_norms
    measure = fake_timer(model.model, sdpa_ms)
    tiles, timings = decode_tiles.tune_site_tiles(model, lambda _msg: None, measure)
    del model.model._attend  # the spy
    return model, tiles, timings


@pytest.mark.parametrize("family,fold_norms", [("t5", True), ("bart", False), ("t5_gated", True)])
def test_every_site_is_tuned_and_its_tile_changes_no_id(compiled, family, fold_norms, tmp_path):  # noqa: F811
    from kernl.artifacts import pack_manifest
    from kernl.kernels import decode_attention as da
    from kernl.kernels import norm_linear as nl
    from kernl.kernels import skinny_linear_fused as slf

    hf, path, _ = compiled[family]
    model, tiles, timings = tuned(path, fold_norms, sdpa_ms=10.0)
    sites = decode_tiles.linear_sites(model.model)
    assert len(sites) == 6
    # both batch buckets (1 and 4), every linear site plus the cross-attention
    assert sorted({(t[0], t[2]) for t in tiles}) == sorted(
        {(b, s) for b in (1, 4) for s in [site for _, site, _, _ in sites] + ["cross"]}
    )
    spaces = {
        "norm_linear": nl.norm_linear_decode_configs(),
        "skinny_linear_fused": slf.skinny_linear_fused_decode_configs(),
        "decode_attention": da.decode_attention_configs(),
    }
    assert all(t.error is None for t in timings), [t.describe() for t in timings if t.error]
    # the tiles as the compiler writes them, through the artifact's reader (a config field
    # the format does not hold made every GPU-tuned artifact unloadable on 2026-12-04)
    root = Path(shutil.copytree(path, tmp_path / "tiled"))
    m = msgpack.unpackb((root / "manifest.msgpack").read_bytes(), raw=False)
    m["extra"]["seq2seq"]["decode_site_tiles"] = tiles
    (root / "manifest.msgpack").write_bytes(pack_manifest(m))
    model = kernl.runtime.load(root, device="cpu")
    model.model.kernels, model.model.fold_norms = True, fold_norms
    loaded = model.model._site_configs
    assert len(loaded) == len(tiles)
    for (_batch, kernel, site), config in loaded.items():  # the fake timer: the last config
        assert config == spaces[kernel][-1], (kernel, site)
    ids, mask = sources([13, 5, 9])
    got = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(got, hf_generate(hf, ids, mask, 12))


def test_a_site_tile_reaches_the_kernel_of_its_site(compiled, monkeypatch):  # noqa: F811
    from kernl.kernels import skinny_linear_fused as slf
    from kernl.kernels.skinny_linear_fused import SkinnyLinearFusedConfig

    _, path, _ = compiled["bart"]
    model = kernl.runtime.load(path, device="cpu")
    model.model.kernels, model.model.fold_norms = True, False
    odd = [4, "skinny_linear_fused", "cross_o", 16, 32, 2, 2, 2]
    model.model.set_site_tiles([odd])
    used = []
    real = slf.skinny_linear_fused

    def spy(*args, config=None, **kwargs):
        used.append((args[0].shape[0], args[1].shape, config))
        return real(*args, config=config, **kwargs)

    monkeypatch.setattr(slf, "skinny_linear_fused", spy)
    ids, mask = sources([13, 5, 9])  # batch bucket 4
    model.generate(ids, mask, max_new_tokens=2, eos_token_id=[])
    configs = {c for _, _, c in used}
    assert SkinnyLinearFusedConfig(16, 32, 2, 2, 2) in configs
    assert None in configs  # every other site: the step's tile (the kernel's default here)


def test_cross_attention_stays_on_sdpa_where_it_is_faster(compiled):  # noqa: F811
    _, path, _ = compiled["t5"]
    _, tiles, timings = tuned(path, True, sdpa_ms=1e-9)
    assert tiles and not [t for t in tiles if t[1] == "decode_attention"]
    assert [t for t in timings if t.kernel == "sdpa" and t.ms == 1e-9]


def test_whisper_cross_attention_on_decode_attention_gives_the_same_ids(whisper_compiled):  # noqa: F811
    hf, path, _ = whisper_compiled["multilingual"]
    model, tiles, _ = tuned(path, True, sdpa_ms=10.0)
    assert [t for t in tiles if t[1] == "decode_attention" and t[2] == "cross"]
    model.model.set_site_tiles(tiles)
    x = features(2)
    # 3 new tokens: each step's cross-attention over 1500 frames takes the interpreter ~10 s
    got = model.generate(input_features=x, max_new_tokens=3)
    assert torch.equal(got, whisper_generate(hf, x, 3))


@pytest.mark.parametrize(
    "tiles",
    [
        [[1, "skinny_linear_fused", "lm_head", 64, 64, 0, 4, 5]],  # no such site
        [[17, "skinny_linear_fused", "o", 64, 64, 0, 4, 5]],  # past the few-rows kernels
        [[1, "norm_linear", "o", 64, 64, 0, 4, 5]],  # o has no norm before it
        [[1, "decode_attention", "cross", 64, 4, 3]],  # one field short
        [[1, "skinny_linear_fused", "o", 48, 64, 0, 4, 5]],  # not a power of two
        [[1, "os.system", "o", 64, 64, 0, 4, 5]],
        "qkv",
    ],
)
def test_a_malformed_site_tile_is_refused(compiled, tmp_path, tiles):  # noqa: F811
    from kernl.artifacts import ArtifactError, pack_manifest, verify_artifact

    root = Path(shutil.copytree(compiled["t5"][1], tmp_path / "copy"))
    m = msgpack.unpackb((root / "manifest.msgpack").read_bytes(), raw=False)
    m["extra"]["seq2seq"]["decode_site_tiles"] = tiles
    (root / "manifest.msgpack").write_bytes(pack_manifest(m))
    with pytest.raises(ArtifactError, match="decode_site_tiles"):
        kernl.runtime.load(root, device="cpu")
    with pytest.raises(ArtifactError, match="decode_site_tiles"):
        verify_artifact(root)


def test_site_tiles_travel_in_the_artifact(compiled, tmp_path):  # noqa: F811
    from kernl.artifacts import pack_manifest
    from kernl.compiler.inspect_report import inspect_artifact, render_text
    from kernl.kernels.decode_attention import DecodeAttentionConfig

    root = Path(shutil.copytree(compiled["t5"][1], tmp_path / "copy"))
    m = msgpack.unpackb((root / "manifest.msgpack").read_bytes(), raw=False)
    entries = [
        [4, "norm_linear", "qkv", 16, 256, 0, 4, 3],
        [4, "decode_attention", "cross", 32, 4, 4, 2],
    ]
    m["extra"]["seq2seq"]["decode_site_tiles"] = entries
    (root / "manifest.msgpack").write_bytes(pack_manifest(m))
    model = kernl.runtime.load(root, device="cpu")
    assert model.model._site_configs[(4, "decode_attention", "cross")] == DecodeAttentionConfig(
        32, 4, 4, 2
    )
    assert "4 norm_linear qkv [16, 256, 0, 4, 3]" in render_text(inspect_artifact(root))


def test_a_chosen_decode_step_that_fails_validation_falls_back_to_torch(monkeypatch):
    from types import SimpleNamespace

    from kernl.compiler.tasks.seq2seq import compile as s2s_compile
    from kernl.compiler.validate import ValidationError

    manifest = SimpleNamespace(extra={"seq2seq": {"decode_kernels": "kernl"}})
    opened = []

    def fake_open(m, weights, dev, capture):
        kernels = m.extra["seq2seq"]["decode_kernels"]
        opened.append(kernels)
        return SimpleNamespace(model=SimpleNamespace(kernels=kernels != "torch"), kernels=kernels)

    def validate(runtime):
        if runtime.kernels != "torch":
            raise ValidationError("kernl's greedy ids differ from eager generate")

    def recording(runtime, run):
        run()
        return {"key": "binary"}

    monkeypatch.setattr(s2s_compile, "open_seq2seq", fake_open)
    monkeypatch.setattr(s2s_compile, "recording_decode_binaries", recording)

    def with_kernels(m, kernels, *rest):
        return SimpleNamespace(extra={"seq2seq": {"decode_kernels": kernels}})

    monkeypatch.setattr(s2s_compile, "with_decode_kernels", with_kernels)
    said = []
    m, binaries, why = s2s_compile.validated_runtime(
        manifest, {}, "cpu", validate, True, said.append
    )
    assert m.extra["seq2seq"]["decode_kernels"] == "torch" and binaries is None
    assert opened == ["kernl", "torch"] and "failed validation" in why and said == [why]
    # forced kernels: the failure is the compile's
    with pytest.raises(ValidationError):
        s2s_compile.validated_runtime(manifest, {}, "cpu", validate, False, said.append)
    # kernels that validate keep their binaries
    m, binaries, why = s2s_compile.validated_runtime(
        manifest, {}, "cpu", lambda runtime: None, True, said.append
    )
    assert m is manifest and binaries == {"key": "binary"} and why == ""
