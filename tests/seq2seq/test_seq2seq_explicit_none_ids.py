"""An explicit `eos_token_id=None` / `pad_token_id=None` as Hugging Face 5.x's generate takes
it, on the CPU in fp32. Its generate applies a keyword even when it is None
(GenerationConfig.update), so for a text encoder-decoder (BART, T5) None is not the model's
id: eos None stops at no EOS id, pad None pads with the first EOS id of the call (no source
mask is inferred from the pad id either way). Hugging Face's Whisper hands its config on to
GenerationMixin.generate, which fills a None there from the model's generation config: its
steps still stop at the model's EOS and pad with the model's pad id, and only the cut of the
rows differs (the EOS kept where the pad id is another id; with pad None only a last EOS cut
and shorter rows padded with 0). kernl took every explicit None as the model's id."""

from __future__ import annotations

import pytest
import torch

import kernl.compiler
import kernl.runtime

from .test_seq2seq_generate import sources, tiny_seq2seq
from .test_whisper_generate import features, tiny_whisper

TEXT_BUCKETS = "batch=1,4 source=16 cache=24"
SPEECH_BUCKETS = "batch=1,4 cache=32"
NEW = 20
OTHER_EOS = 7  # an id these models never emit: a call's first EOS id that only pads


def _hf_text(hf, ids, mask, **options):
    with torch.no_grad():
        return hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **options
        )


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """A BART and a T5 whose EOS id is a token they emit early in some rows and never in
    others (rows end at different steps, one runs out of budget)."""
    out = {}
    for family in ("bart", "t5"):
        hf = tiny_seq2seq(family)
        ids, mask = sources([12, 5, 9], seed=1)
        hf.generation_config.eos_token_id = int(_hf_text(hf, ids, mask)[0, 3])
        path = tmp_path_factory.mktemp("s2s_none") / family
        kernl.compiler.compile(hf, TEXT_BUCKETS, path, dtype="fp32", device="cpu")
        out[family] = (hf, kernl.runtime.load(path, device="cpu"))
    return out


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.parametrize(
    "options",
    [
        dict(eos_token_id=None),
        dict(pad_token_id=None),
        dict(pad_token_id=None, eos_token_id="call"),
        dict(eos_token_id=None, pad_token_id=None),
    ],
    ids=["eos-none", "pad-none", "pad-none-call-eos", "both-none"],
)
def test_text_seq2seq_takes_an_explicit_none_as_hugging_face(text_models, family, options):
    """Before: kernl stopped at the model's EOS for eos None and padded with the model's pad
    id for pad None."""
    hf, model = text_models[family]
    eos = hf.generation_config.eos_token_id
    if options.get("eos_token_id") == "call":
        options = {**options, "eos_token_id": [OTHER_EOS, eos]}  # pads with 7, its first
    ids, mask = sources([12, 5, 9], seed=1)
    default = _hf_text(hf, ids, mask)
    ref = _hf_text(hf, ids, mask, **options)
    assert not torch.equal(ref, default)  # the None changes HF's ids
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, **options)
    assert torch.equal(got, ref), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"
    steps = model.stream(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, **options)
    assert torch.equal(torch.stack(list(steps), 1), ref[:, 1:])
    # the default is still the model's ids
    assert torch.equal(model.generate(ids, mask, max_new_tokens=NEW), default)
    # without an attention_mask, as in HF, no source padding is inferred from the pad id
    src = ids.masked_fill(mask == 0, hf.generation_config.pad_token_id)
    with torch.no_grad():
        unmasked = hf.generate(input_ids=src, max_new_tokens=NEW, do_sample=False, **options)
    assert torch.equal(model.generate(src, max_new_tokens=NEW, **options), unmasked)


def test_a_model_without_a_pad_id_pads_with_the_call_s_first_eos_id(tmp_path):
    """Hugging Face's pad for a generation config without one is the first EOS id of the call
    (`_prepare_special_tokens`), as the causal LM's; kernl padded with the model's EOS."""
    hf = tiny_seq2seq("t5")
    ids, mask = sources([12, 5, 9], seed=1)
    eos = int(_hf_text(hf, ids, mask)[0, 3])
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = eos, None
    kernl.compiler.compile(hf, TEXT_BUCKETS, tmp_path / "m", dtype="fp32", device="cpu")
    model = kernl.runtime.load(tmp_path / "m", device="cpu")
    for options in ({}, dict(eos_token_id=[OTHER_EOS, eos])):
        ref = _hf_text(hf, ids, mask, **options)
        got = model.generate(ids, mask, max_new_tokens=NEW, **options)
        assert torch.equal(got, ref), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"
    assert (ref == OTHER_EOS).any()


def _hf_speech(hf, x, **options):
    with torch.no_grad():
        return hf.generate(input_features=x, max_new_tokens=NEW, **options)


@pytest.fixture(scope="module")
def whisper_models(tmp_path_factory):
    """Whisper whose EOS id is a token it emits mid-way in some rows (one row runs out of
    budget), never first (begin-suppressed, as every checkpoint's EOS: HF's eos None fails
    on a row that is its EOS alone): `pad-is-eos` pads with that id too, as every Whisper
    checkpoint does with <|endoftext|>; `pad-is-not-eos` keeps the fixture's pad id."""
    out = {}
    for name in ("pad-is-eos", "pad-is-not-eos"):
        hf = tiny_whisper("multilingual")
        eos = int(_hf_speech(hf, features(4, seed=3))[0, 6])
        g = hf.generation_config
        g.eos_token_id, g.begin_suppress_tokens = eos, [5, eos]
        if name == "pad-is-eos":
            g.pad_token_id = eos
        path = tmp_path_factory.mktemp("whisper_none") / name
        kernl.compiler.compile(hf, SPEECH_BUCKETS, path, dtype="fp32", device="cpu")
        out[name] = (hf, kernl.runtime.load(path, device="cpu"))
    return out


@pytest.mark.parametrize("name", ["pad-is-eos", "pad-is-not-eos"])
@pytest.mark.parametrize(
    "options",
    [dict(eos_token_id=None), dict(pad_token_id=None), dict(eos_token_id=None, pad_token_id=None)],
    ids=["eos-none", "pad-none", "both-none"],
)
def test_whisper_takes_an_explicit_none_as_hugging_face(whisper_models, name, options):
    """Before: kernl cut every row before the model's EOS and padded it with the model's pad
    id, where HF keeps the EOS (eos None, the pad id another id) or cuts only a last EOS and
    pads shorter rows with 0 (pad None)."""
    hf, model = whisper_models[name]
    x = features(4, seed=3)
    default = _hf_speech(hf, x)
    ref = _hf_speech(hf, x, **options)
    got = model.generate(x, max_new_tokens=NEW, **options)
    assert torch.equal(got, ref), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"
    assert torch.equal(model.generate(x, max_new_tokens=NEW), default)
    # the steps stop at the model's EOS and pad with its pad id, as HF's inner generate
    eos = hf.generation_config.eos_token_id
    steps = torch.stack(list(model.stream(x, max_new_tokens=NEW, **options)), 1)
    assert torch.equal(steps, torch.stack(list(model.stream(x, max_new_tokens=NEW)), 1))
    assert (steps == eos).any(1).tolist() == [True, True, True, False]
