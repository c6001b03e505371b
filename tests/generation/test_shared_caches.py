"""Batch buckets share one KV-cache storage, the largest bucket's, all but the smallest, which
keeps its own (an open batch's joiners are prefilled there while the batch runs): requests run
one at a time, so a bucket's cache holds nothing another request needs. Each bucket's
generation is the same whatever ran on the others before it, and an open batch on a larger
bucket still takes joiners."""

from __future__ import annotations

import pytest
import torch

import kernl.compiler
import kernl.runtime

from .test_open_batch import alone, prompt, run
from .tiny_models import mixed_prompts, tiny_model

NEW = 24


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("shared") / "lm.kernl"
    kernl.compiler.compile(
        tiny_model("llama3"),
        "batch=1,2,4 prompt=16 cache=64",
        path,
        dtype="fp32",
        device="cpu",
        task="causal-lm",
    )
    return path


@pytest.fixture(scope="module")
def model(artifact):
    return kernl.runtime.load(artifact)


def test_the_memory_plan_charges_the_storages_the_states_hold(artifact, model):
    """load()'s plan (`generation_memory`) against what the batch buckets' states hold, each
    storage once: two KV caches (the smallest bucket's, the shared one), not three (a plan of
    a cache per bucket is 1.28x what they hold here)."""
    from kernl.artifacts.reader import check_artifact

    seen, held = set(), 0
    rope = [model.decoder.rope, model.decoder.rope_local]  # the torch step's rotary matrices
    for state in model._states.values():
        values = [*vars(state).values(), *vars(state.cache).values()]
        values += [*vars(state.sampler).values(), *rope]
        for v in values:
            for t in v.values() if isinstance(v, dict) else [v]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    held += t.untyped_storage().nbytes()
    plan = check_artifact(artifact, hash_files=False).memory
    # (the plan leaves out a few scalars a bucket: its step, slot, flags and EOS ids)
    assert held - 1024 <= plan.static_buffers <= 1.05 * held


def test_every_bucket_but_the_smallest_is_a_view_of_one_storage(model):
    caches = {b: state.cache for b, state in model._states.items()}
    whole = caches[4].k.untyped_storage().data_ptr()
    assert caches[2].k.untyped_storage().data_ptr() == whole
    assert caches[2].v.untyped_storage().data_ptr() == caches[4].v.untyped_storage().data_ptr()
    assert caches[1].k.untyped_storage().data_ptr() != whole
    spec = model.decoder.spec
    for b, cache in caches.items():
        assert cache.k.shape == (spec.num_layers, b, spec.num_kv_heads, 64, spec.head_dim)
        assert cache.k.is_contiguous() and cache.v.is_contiguous()


def test_a_bucket_generates_the_same_after_the_others_wrote_the_shared_storage(model):
    four, four_mask = mixed_prompts(4, [16, 5, 11, 9])
    two, two_mask = mixed_prompts(2, [7, 16])
    one, one_mask = mixed_prompts(1, [12])

    def run(ids, mask):
        return model.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[])

    first = run(four, four_mask)
    pair = run(two, two_mask)  # writes the storage bucket 4 reads
    assert torch.equal(run(four, four_mask), first)
    single = run(one, one_mask)
    assert torch.equal(run(two, two_mask), pair)
    # each row generates alone what it generated in its batch (a bucket of its own)
    assert torch.equal(run(four[1:2, -5:], four_mask[1:2, -5:])[:, -NEW:], first[1:2, -NEW:])
    assert torch.equal(run(one, one_mask), single)


def test_an_open_batch_on_the_shared_storage_takes_joiners(model):
    """The batch runs on bucket 4 (the shared storage), its joiners are prefilled on bucket
    1 (its own): every row gives what its prompt gives alone, and a generation on bucket 2
    (the shared storage again) after the batch is as before it."""
    a, b, c = prompt(5, 1), prompt(7, 2), prompt(12, 3)
    two, two_mask = mixed_prompts(2, [7, 16])
    pair = model.generate(two, two_mask, max_new_tokens=NEW, eos_token_id=[])
    with model.open_batch([a, b], max_new_tokens=20, eos_token_id=[], rows=4) as batch:
        assert batch.bucket == 4
        got = run(batch, {3: (c, 12, {})})
    assert got[("open", 0)] == alone(model, a, 20)
    assert got[("open", 1)] == alone(model, b, 20)
    assert got[("join", 3)] == alone(model, c, 12)
    assert torch.equal(model.generate(two, two_mask, max_new_tokens=NEW, eos_token_id=[]), pair)


def _poison(model) -> None:
    """NaN in every slot of every cache, as a request whose keys overflowed would leave."""
    for state in model._states.values():
        state.cache.k.fill_(float("nan"))
        state.cache.v.fill_(float("nan"))


def test_non_finite_values_an_earlier_request_left_in_the_caches_reach_no_later_one(model):
    """Masked slots are still read (the torch and SDPA decode paths read every slot of the
    bucket's length), and 0 x NaN is NaN: a request's slots past its prompt start as zeros,
    and a joiner's row is cleared before its prompt is copied in."""
    four, four_mask = mixed_prompts(4, [16, 5, 11, 9])
    one, one_mask = mixed_prompts(1, [12])
    a, b, c = prompt(5, 1), prompt(7, 2), prompt(12, 3)
    clean = [
        model.generate(four, four_mask, max_new_tokens=NEW, eos_token_id=[]),
        model.generate(one, one_mask, max_new_tokens=NEW, eos_token_id=[]),
    ]
    _poison(model)
    assert torch.equal(
        model.generate(four, four_mask, max_new_tokens=NEW, eos_token_id=[]), clean[0]
    )
    _poison(model)
    assert torch.equal(model.generate(one, one_mask, max_new_tokens=NEW, eos_token_id=[]), clean[1])
    expected = {("open", 0): alone(model, a, 20), ("join", 3): alone(model, c, 12)}
    with model.open_batch([a, b], max_new_tokens=20, eos_token_id=[], rows=4) as batch:
        for cache in (batch.state.cache.k, batch.state.cache.v):  # the free rows' last requests
            cache[:, 2:].fill_(float("nan"))
        got = run(batch, {3: (c, 12, {})})
    assert got[("open", 0)] == expected[("open", 0)]
    assert got[("join", 3)] == expected[("join", 3)]
