"""`kernl.optimize` on tiny encoder-decoders in memory (CPU, fp32): T5 and BART (seq2seq-lm) and
Whisper (speech-seq2seq) generate Hugging Face's greedy ids, the second call loads from the
cache without compiling, omitted buckets come from the config, and bad buckets are refused
before any hashing or compiling. The tiny models are the tests/seq2seq ones."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from seq2seq.test_seq2seq_generate import hf_generate, sources, tiny_seq2seq
from seq2seq.test_whisper_generate import features, tiny_whisper
from seq2seq.test_whisper_generate import hf_generate as hf_transcribe

import kernl
from kernl.compiler import api
from kernl.compiler import optimize as opt
from kernl.compiler.buckets import BucketLimitError, BucketSyntaxError

from .test_optimize import _assert_same, _snapshot

BUCKETS = "batch=1,2 source=8,16 cache=32"
SAME_BUCKETS = "batch=2,1 source=16,8 cache=32"  # another spelling of BUCKETS: the same entry
WHISPER_BUCKETS = "batch=1,2 cache=48"


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_text_seq2seq_generates_like_hugging_face_then_hits_the_cache(cache, compiles, family):
    hf = tiny_seq2seq(family)
    before = _snapshot(hf)
    model = kernl.optimize(hf, BUCKETS, progress=False)
    assert len(compiles) == 1 and compiles[0][1]["task"] == "seq2seq-lm"
    assert not model.cache_hit and model.runtime.manifest.task == "seq2seq-lm"
    _assert_same(before, _snapshot(hf))  # compile validates against hf.generate: left as it was

    ids, mask = sources([13, 5])
    ref = hf_generate(hf, ids, mask, 24)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    assert torch.equal(got, ref), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"
    steps = model.stream(input_ids=ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    assert torch.equal(torch.stack(list(steps), dim=1), ref[:, 1:])  # the same ids, step by step
    with pytest.raises(TypeError, match=r"model.generate"):
        model(ids)

    messages: list[str] = []
    again = kernl.optimize(tiny_seq2seq(family), SAME_BUCKETS, progress=messages.append)
    assert again.cache_hit and again.artifact == model.artifact and len(compiles) == 1
    assert any("cache hit" in m for m in messages)
    again_ids = again.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[]
    )
    assert torch.equal(again_ids, ref)


def test_whisper_generates_like_hugging_face_then_hits_the_cache(cache, compiles):
    hf = tiny_whisper()
    model = kernl.optimize(hf, WHISPER_BUCKETS, progress=False)
    # WhisperForConditionalGeneration ends like the text models' class: the task is told apart.
    assert len(compiles) == 1 and compiles[0][1]["task"] == "speech-seq2seq"
    assert model.runtime.manifest.task == "speech-seq2seq" and not model.cache_hit
    x = features(2)
    ref = hf_transcribe(hf, x, 24)
    got = model.generate(input_features=x, max_new_tokens=24)
    assert torch.equal(got, ref), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"

    again = kernl.optimize(tiny_whisper(), WHISPER_BUCKETS, progress=False)
    assert again.cache_hit and again.artifact == model.artifact and len(compiles) == 1
    assert torch.equal(again.generate(input_features=x, max_new_tokens=24), ref)


def test_default_seq2seq_buckets_from_the_config():
    t5 = T.T5Config()  # relative positions: no limit but the default 512
    assert opt.default_buckets(t5, "seq2seq-lm") == "batch=1,8 source=16:512 cache=256"
    bart = T.BartConfig(max_position_embeddings=1024)
    assert opt.default_buckets(bart, "seq2seq-lm") == "batch=1,8 source=16:512 cache=256"
    short = T.BartConfig(max_position_embeddings=64)
    assert opt.default_buckets(short, "seq2seq-lm") == "batch=1,8 source=16:64 cache=64"
    whisper = T.WhisperConfig()
    assert opt.default_buckets(whisper, "speech-seq2seq") == "batch=1,8 cache=448"
    # Every default is accepted by the task's own parser and the position check.
    for config, task in [(t5, "seq2seq-lm"), (short, "seq2seq-lm"), (whisper, "speech-seq2seq")]:
        opt._canonical_buckets(opt.default_buckets(config, task), task, config)
    assert opt._canonical_buckets("batch=1 cache=448", "speech-seq2seq", whisper) == {
        "batches": [1],
        "sources": [1500],  # one 30 s window, whatever the spelling
        "caches": [448],
    }


def test_omitted_whisper_buckets_are_chosen_and_said(cache, compiles):
    hf = tiny_whisper()  # max_target_positions=64
    messages: list[str] = []
    model = kernl.optimize(hf, progress=messages.append)
    assert compiles[0][0][1] == "batch=1,8 cache=64"
    assert any("chose 'batch=1,8 cache=64'" in m for m in messages)
    assert model.runtime.buckets.batches == [1, 8] and model.runtime.buckets.caches == [64]
    x = features(3)  # batch 3: served by the batch-8 bucket
    assert torch.equal(
        model.generate(input_features=x, max_new_tokens=40), hf_transcribe(hf, x, 40)
    )


def test_omitted_text_buckets_are_chosen_and_said(cache, monkeypatch):
    seen: dict = {}

    class Stop(Exception):
        pass

    def fake_compile(model, buckets, out, **kwargs):
        seen["buckets"] = buckets
        raise Stop

    monkeypatch.setattr(api, "compile", fake_compile)
    messages: list[str] = []
    with pytest.raises(Stop):
        kernl.optimize(tiny_seq2seq("bart"), progress=messages.append)  # 64 positions
    assert seen["buckets"] == "batch=1,8 source=16:64 cache=64"
    assert any("chose 'batch=1,8 source=16:64 cache=64'" in m for m in messages)


@pytest.mark.parametrize(
    "family, buckets, error, match",
    [
        ("t5", "batch=1 seq=8", BucketSyntaxError, r"unknown axis 'seq' for seq2seq-lm"),
        ("t5", "batch=1 cache=32", BucketSyntaxError, r"missing axis source"),
        ("t5", "batch=1 source=8:4", BucketSyntaxError, r"goes downwards"),
        ("bart", "batch=1 source=16:128", BucketLimitError, r"more than the model's 64"),
        ("whisper", "batch=1 source=8", BucketSyntaxError, r"unknown axis 'source' for speech"),
        ("whisper", "batch=1 cache=100", BucketLimitError, r"max_target_positions=64"),
        ("t5", 42, BucketSyntaxError, r"must be a string like"),
    ],
)
def test_bad_seq2seq_buckets_are_refused_before_any_work(
    cache, monkeypatch, family, buckets, error, match
):
    monkeypatch.setattr(api, "compile", lambda *a, **k: pytest.fail("compiled"))
    monkeypatch.setattr(opt, "weights_digest", lambda *a, **k: pytest.fail("hashed"))
    hf = tiny_whisper() if family == "whisper" else tiny_seq2seq(family)
    with pytest.raises(error, match=match):
        kernl.optimize(hf, buckets, progress=False)
