"""A loaded model is freed when its last reference goes (`del model`), not at the cyclic
garbage collector's next pass: a model holding itself in a cycle kept its memory (on a GPU:
its weights, caches and graph pool) after `del old`, so that `load(new)` could find too little
free memory. Each test runs with gc disabled, so only reference counts free anything."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import weakref
from pathlib import Path

import pytest
import torch
import transformers as T

import kernl.compiler
import kernl.runtime

sys.path.insert(0, str(Path(__file__).parent.parent / "generation"))
sys.path.insert(0, str(Path(__file__).parent.parent / "seq2seq"))
from test_seq2seq_generate import tiny_seq2seq  # noqa: E402
from tiny_models import tiny_model  # noqa: E402


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("refcount")
    cpu = dict(dtype="fp32", device="cpu", kernels=False)
    llama, t5, bert = root / "llama.kernl", root / "t5.kernl", root / "bert.kernl"
    kernl.compiler.compile(
        tiny_model("llama3"), "batch=1,2 prompt=8 cache=32", llama, task="causal-lm", **cpu
    )
    kernl.compiler.compile(tiny_seq2seq("t5"), "batch=1 source=8 cache=8", t5, **cpu)
    torch.manual_seed(0)
    config = T.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=50, max_position_embeddings=16,
    )  # fmt: skip
    kernl.compiler.compile(T.BertModel(config).eval(), "batch=1 seq=8", bert, **cpu)
    return {"llama": llama, "t5": t5, "bert": bert}


def _assert_dead(ref: weakref.ref) -> None:
    alive = ref()
    assert alive is None, [type(r).__name__ for r in gc.get_referrers(alive)]


def test_a_causal_lm_is_freed_after_generate_and_stream(artifacts, no_gc):
    model = kernl.runtime.load(artifacts["llama"], device="cpu")
    model.generate([[5, 6, 7]], max_new_tokens=4)
    model.generate([[5, 6, 7], [8, 9]], max_new_tokens=3, do_sample=True, seed=1)
    for _ in model.stream([[5, 6, 7]], max_new_tokens=3):
        pass
    ref = weakref.ref(model)
    del model
    _assert_dead(ref)


def test_an_encoder_decoder_is_freed_after_generate(artifacts, no_gc):
    model = kernl.runtime.load(artifacts["t5"], device="cpu")
    model.generate([[5, 6, 7]], max_new_tokens=4)
    ref = weakref.ref(model)
    del model
    _assert_dead(ref)


def test_an_encoder_is_freed_with_its_graph_edit(artifacts, no_gc):
    """The graph edit (cuBLAS's memsets as fills, the side work off the path) is made on a
    GPU only; made here on the CPU model, it must not hold the model either."""
    model = kernl.runtime.load(artifacts["bert"], device="cpu")
    model(input_ids=torch.tensor([[5, 6, 7]]))
    model._graph_edit = model._capture_edit(side_work=True, fills=True)
    ref = weakref.ref(model)
    del model
    _assert_dead(ref)


def test_a_dropped_generation_batcher_frees_its_model(artifacts, no_gc):
    from kernl.serving.generation_batcher import BatchPolicy, GenerationBatcher
    from kernl.serving.generation_protocol import GenerationLimits, parse_generation_request

    model = kernl.runtime.load(artifacts["llama"], device="cpu")
    limits = GenerationLimits.from_manifest(model.manifest)

    async def serve_one(served) -> weakref.ref:
        batcher = GenerationBatcher(served, limits, BatchPolicy(max_requests=2, window_s=0.0))
        body = json.dumps({"input_ids": [5, 6], "max_new_tokens": 2}).encode()
        ticket = batcher.submit(parse_generation_request(body, limits))
        assert len(await ticket.result()) == 2
        for _ in range(100):  # the batcher's task sees nothing pending and returns
            if batcher._task.done():
                break
            await asyncio.sleep(0.01)
        assert batcher._task.done()
        batcher.executor.shutdown(wait=True)
        return weakref.ref(batcher)

    batcher = asyncio.run(serve_one(model))
    _assert_dead(batcher)
    ref = weakref.ref(model)
    del model
    _assert_dead(ref)
