"""kernl serve's generation path on a text encoder-decoder artifact (a tiny T5, CPU), without
Ray: its limits read from the manifest (source buckets, a decoder cache that starts at the
start token), requests refused on arrival naming them, concurrent requests sharing one call
with each answer equal to the model's `generate` of its source alone (new tokens only, the
start token dropped), streamed or returned; and a Whisper artifact refused with the way to
use it instead."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

import kernl.compiler
import kernl.runtime
from kernl.serving.generation_batcher import BatchPolicy, GenerationBatcher
from kernl.serving.generation_protocol import (
    GenerationLimits,
    check_servable,
    parse_generation_request,
)
from kernl.serving.protocol import RequestError

sys.path.insert(0, str(Path(__file__).parent.parent / "seq2seq"))
from test_seq2seq_generate import tiny_seq2seq  # noqa: E402

CACHE = 24


@pytest.fixture(scope="module")
def t5_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-s2s") / "t5.kernl"
    buckets = f"batch=1,4 source=8,16 cache={CACHE}"
    kernl.compiler.compile(tiny_seq2seq("t5"), buckets, path, dtype="fp32", device="cpu")
    return path


@pytest.fixture(scope="module")
def t5(t5_path):
    return kernl.runtime.load(t5_path, device="cpu")


def request(limits, source, **fields):
    body = json.dumps({"input_ids": source, **fields}).encode()
    return parse_generation_request(body, limits)


def alone(model, source, **options):
    return model.generate([source], **options)[0, 1:].tolist()


SOURCES = [[5, 17, 33, 40], [9, 12], list(range(3, 17)), [60, 61, 62, 63, 64, 65, 66]]


def test_limits_come_from_the_seq2seq_manifest_and_refuse_what_does_not_fit(t5):
    limits = GenerationLimits.from_manifest(t5.manifest)
    assert limits.encoder_decoder and limits.prompts == [8, 16] and limits.cache_len == CACHE
    assert limits.batches == (1, 4) and limits.eos_token_ids == [1]
    # The decoder's cache holds CACHE new tokens, however long the source.
    assert request(limits, list(range(3, 19)), max_new_tokens=CACHE).max_new_tokens == CACHE
    with pytest.raises(RequestError, match="decoder cache of 24 slots: at most 24") as e:
        request(limits, [5, 6], max_new_tokens=CACHE + 1)
    assert e.value.status == 413
    with pytest.raises(RequestError, match="source has 17 tokens") as e:
        request(limits, list(range(3, 20)))
    assert e.value.status == 413


@pytest.mark.parametrize("stream", [False, True])
def test_concurrent_requests_share_a_call_and_each_gets_its_source_alone(t5, stream):
    limits = GenerationLimits.from_manifest(t5.manifest)
    new = [12, 12, 12, 12] if not stream else [12, 5, 20, 9]
    requests = [
        request(limits, s, max_new_tokens=n, stream=stream, eos_token_id=[])
        for s, n in zip(SOURCES, new)
    ]
    records = []

    async def main():
        reported = asyncio.Event()  # the record comes after the call, maybe after the answers

        def on_batch(record):
            records.append(record)
            reported.set()

        batcher = GenerationBatcher(t5, limits, BatchPolicy(4, 0.0), on_batch=on_batch)
        tickets = [batcher.submit(r) for r in requests]
        results = await asyncio.gather(*(t.result() for t in tickets))
        await asyncio.wait_for(reported.wait(), 60)
        return results

    results = asyncio.run(main())
    assert len(records) == 1 and records[0].requests == 4
    assert records[0].mode == ("stream" if stream else "generate")  # no open_batch here
    for source, n, ids in zip(SOURCES, new, results):
        assert ids == alone(t5, source, max_new_tokens=n, eos_token_id=[]), source


def test_sampled_requests_draw_what_they_would_alone(t5):
    limits = GenerationLimits.from_manifest(t5.manifest)
    fields = [dict(do_sample=True, temperature=1.3, seed=s, top_k=0) for s in (3, 4)]
    requests = [request(limits, s, max_new_tokens=10, **f) for s, f in zip(SOURCES, fields)]

    async def main():
        batcher = GenerationBatcher(t5, limits, BatchPolicy(4, 0.0))
        return await asyncio.gather(*(batcher.submit(r).result() for r in requests))

    for source, f, ids in zip(SOURCES, fields, asyncio.run(main())):
        assert ids == alone(t5, source, max_new_tokens=10, **f)


def test_a_forced_eos_ends_each_request_at_its_own_budget(tmp_path):
    """BART with a forced EOS (as mBART and Marian checkpoints set it): the last token a call
    makes is that EOS, at the call's max_new_tokens. A 5-token request that shared a 12-token
    call ended without it (and with finish reason "length"), unlike the request alone; now
    only requests of one budget share a call."""
    hf = tiny_seq2seq("bart")
    hf.generation_config.forced_eos_token_id = 2
    path = tmp_path / "bart.kernl"
    kernl.compiler.compile(hf, "batch=1,4 source=8 cache=16", path, dtype="fp32", device="cpu")
    bart = kernl.runtime.load(path, device="cpu")
    limits = GenerationLimits.from_manifest(bart.manifest)
    assert limits.forced_eos
    budgets = [5, 12, 5]
    requests = [
        request(limits, src, max_new_tokens=n, eos_token_id=[])
        for src, n in zip(SOURCES[:2] + SOURCES[3:], budgets)
    ]
    assert requests[0].key == requests[2].key != requests[1].key
    records = []

    async def main():
        both = asyncio.Event()  # a call's record may come after its answers

        def on_batch(record):
            records.append(record)
            if len(records) == 2:
                both.set()

        batcher = GenerationBatcher(bart, limits, BatchPolicy(4, 0.0), on_batch=on_batch)
        results = await asyncio.gather(*(batcher.submit(r).result() for r in requests))
        await asyncio.wait_for(both.wait(), 60)
        return results

    results = asyncio.run(main())
    for r, ids in zip(requests, results):
        want = alone(bart, r.prompt, max_new_tokens=r.max_new_tokens, eos_token_id=[])
        assert ids == want and ids[-1] == 2, (ids, want)
    assert sorted(rec.requests for rec in records) == [1, 2]


def test_a_whisper_artifact_is_refused_naming_the_alternative():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="speech-seq2seq.*generate\\(input_features"):
        check_servable(SimpleNamespace(task="speech-seq2seq"))
    check_servable(SimpleNamespace(task="seq2seq-lm"))  # served


def test_kernl_serve_routes_a_text_encoder_decoder_to_the_generator(t5_path):
    pytest.importorskip("ray", reason="kernl serve needs Ray Serve (kernl[serve])")
    from kernl.serving.config import ServeConfig
    from kernl.serving.deployment import application

    app = application(ServeConfig(artifact=str(t5_path), device="cpu"))
    assert app._bound_deployment.name == "KernlGenerator"
