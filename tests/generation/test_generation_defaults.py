"""A loaded artifact's generate takes the generation config it was compiled with where a call
leaves a setting out, as Hugging Face's generate takes its model's: an instruct model's
sampling settings, its length, and the refusal of what kernl does not apply. It decoded
greedily and stopped at 20 new tokens whatever the config said (review, 2026-12-07)."""

from __future__ import annotations

import pytest
import torch

import kernl.compiler
import kernl.runtime
from kernl.artifacts import ArtifactCorruptError
from kernl.artifacts.generation_defaults import GenerationDefaults

from .tiny_models import mixed_prompts, tiny_model

BUCKETS = "batch=1,4 prompt=8,16 cache=48"


def compiled(tmp_path, **settings):
    hf = tiny_model("llama3")
    for key, value in settings.items():
        setattr(hf.generation_config, key, value)
    kernl.compiler.compile(
        hf, BUCKETS, tmp_path / "lm.kernl", dtype="fp32", device="cpu", task="causal-lm"
    )
    return hf, kernl.runtime.load(tmp_path / "lm.kernl")


def test_an_instruct_models_sampling_settings_apply_where_the_call_leaves_them_out(tmp_path):
    hf, model = compiled(tmp_path, do_sample=True, temperature=0.6, top_p=0.9, top_k=None)
    ids, mask = mixed_prompts(3, [11, 4, 16])
    told = dict(do_sample=True, temperature=0.6, top_p=0.9, top_k=50)  # HF's top_k default
    got = model.generate(ids, mask, seed=7)
    assert torch.equal(got, model.generate(ids, mask, seed=7, **told))
    assert not torch.equal(got, model.generate(ids, mask, seed=7, do_sample=False))
    # a call's own setting wins, as in HF: greedy is HF's greedy
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, mask, do_sample=False, pad_token_id=0), ref)
    steps = list(model.stream(ids, mask, seed=7))
    assert torch.equal(torch.stack(steps, 1), got[:, 16:])


def test_sampling_that_can_only_pick_one_token_is_hugging_faces_greedy(tmp_path):
    hf, model = compiled(tmp_path, do_sample=True, top_k=1)
    ids, mask = mixed_prompts(3, [11, 4, 16])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, pad_token_id=0)  # HF samples too
    assert torch.equal(model.generate(ids, mask, pad_token_id=0), ref)


@pytest.mark.parametrize("setting, new", [("max_new_tokens", 7), ("max_length", 19)])
def test_the_configs_length_applies_where_the_call_gives_none(tmp_path, setting, new):
    hf, model = compiled(tmp_path, **{setting: new})
    ids, mask = mixed_prompts(2, [11, 4])  # prompt bucket 16 holds the 11 tokens
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, pad_token_id=0)
    out = model.generate(ids, mask, pad_token_id=0)
    assert torch.equal(out, ref), (out.shape, ref.shape)
    assert model.generate(ids, mask, max_new_tokens=3).shape[1] == 11 + 3  # the call's wins
    batch = model.open_batch(ids[:1, -11:])  # no max_length there: max_new_tokens alone
    tokens = len(batch.first)
    while batch.rows:
        tokens += len(batch.step())
    assert tokens == (7 if setting == "max_new_tokens" else 20)


def test_what_kernl_does_not_apply_is_refused_unless_the_call_overrides_it(tmp_path):
    _, model = compiled(tmp_path, num_return_sequences=2)
    ids, mask = mixed_prompts(2, [11, 4])
    with pytest.raises(ValueError, match="the artifact's generation config .* sets "
                       "num_return_sequences=2"):  # fmt: skip
        model.generate(ids, mask)
    with pytest.raises(ValueError, match="num_return_sequences=2"):
        model.stream(ids, mask)
    assert model.generate(ids, mask, num_return_sequences=1).shape[0] == 2


def test_an_artifact_that_recorded_no_settings_decodes_as_it_is_told(tmp_path):
    """Compiled before the settings were recorded (or through kernl serve, which decides its
    requests' decoding itself): greedy, 20 new tokens."""
    _, model = compiled(tmp_path, do_sample=True, max_new_tokens=5)
    ids, mask = mixed_prompts(2, [11, 4])
    model.generation_defaults = None
    a, b = model.generate(ids, mask), model.generate(ids, mask)
    assert torch.equal(a, b) and a.shape[1] == 11 + 20


@pytest.mark.parametrize(
    "record, needle",
    [
        ({"do_sample": "yes"}, "do_sample is 'yes', not true or false"),
        ({"top_p": 1.5}, "top_p is 1.5, not a number in"),
        ({"max_new_tokens": -1}, "max_new_tokens is -1"),
        ({"stop_strings": [3]}, "stop_strings is"),
        ({"penalty": 2}, r"unknown settings \['penalty'\] \(an artifact built by a newer kernl"),
        ([], "is not a map"),
    ],
)
def test_a_damaged_record_is_refused_at_load(record, needle):
    with pytest.raises(ArtifactCorruptError, match=needle):
        GenerationDefaults.from_dict(record)


def test_the_record_holds_every_option_the_runtime_refuses():
    """What the compile passes to HF's reference at its neutral value (prompt lookup aside:
    HF's ids are the same with it) is what a loaded artifact refuses per call, so the record
    must hold each of them."""
    from dataclasses import fields

    from kernl.compiler.tasks.generation_config import HF_GENERATE_AS_KERNL
    from kernl.runtime.generation.config_defaults import CONFIG_OPTIONS_NOT_APPLIED

    refused = set(HF_GENERATE_AS_KERNL) - {"prompt_lookup_num_tokens"}
    assert set(CONFIG_OPTIONS_NOT_APPLIED) == refused
    assert refused <= {f.name for f in fields(GenerationDefaults)}


@pytest.mark.parametrize(
    "settings, needle",
    [
        (dict(do_sample=True, top_p=0.0), r"top_p must lie in \(0, 1\], got 0.0"),
        (dict(do_sample=True, temperature=1e-7), "temperature must lie in"),
    ],
)
def test_sampling_settings_kernls_sampler_refuses_are_refused_at_compile(
    tmp_path, settings, needle
):
    """Recorded as they were, every call that left them out failed, naming an argument the
    caller never passed (review)."""
    from kernl.compiler.trace import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=f"the model's generation config.*{needle}"):
        compiled(tmp_path, **settings)
    _, model = compiled(tmp_path, do_sample=False, top_p=0.0)  # greedy: HF ignores it too
    assert model.generation_defaults.top_p == 0.0
