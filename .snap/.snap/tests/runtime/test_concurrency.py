"""Several threads calling one loaded model on different buckets get exactly the results of
sequential calls (CPU mode; on CUDA the same lock guards copy-in, replay and copy-out)."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers as T

import kernl.compiler
import kernl.runtime

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=120,
    max_position_embeddings=80,
)
THREADS = 4
CALLS_PER_THREAD = 3
# (batch, seq) per thread: each thread stays on its own bucket of "batch=1,2 seq=8,16".
SHAPES = [(1, 5), (1, 13), (2, 8), (2, 16)]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(**SMALL)).eval()
    out = tmp_path_factory.mktemp("concurrency") / "bert.kernl"
    kernl.compiler.compile(model, "batch=1,2 seq=8,16", out, dtype="fp32", device="cpu")
    return kernl.runtime.load(out, device="cpu")


def _calls():
    g = torch.Generator().manual_seed(3)
    calls = []
    for t, (b, s) in enumerate(SHAPES):
        for _ in range(CALLS_PER_THREAD):
            ids = torch.randint(3, 120, (b, s), generator=g)
            mask = torch.ones_like(ids)
            mask[-1, s // 2 :] = 0
            calls.append((t, dict(input_ids=ids, attention_mask=mask)))
    return calls


def test_threads_on_different_buckets_match_sequential_calls(compiled):
    calls = _calls()
    buckets = {compiled.select_bucket(*c["input_ids"].shape) for _, c in calls}
    assert len(buckets) == THREADS, "each thread must use its own bucket"
    sequential = [compiled(**c) for _, c in calls]

    results: list = [None] * len(calls)
    errors: list = []
    start = threading.Barrier(THREADS)

    def worker(thread: int) -> None:
        try:
            start.wait()
            for i, (t, c) in enumerate(calls):
                if t == thread:
                    results[i] = compiled(**c)
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    for i, (want, got) in enumerate(zip(sequential, results)):
        for name in want:
            assert torch.equal(want[name], got[name]), f"call {i}: {name} differs"


def test_returned_tensors_are_not_overwritten_by_later_calls(compiled):
    """Outputs are copies: a later call on the same bucket must not change them."""
    calls = _calls()
    first = compiled(**calls[0][1])
    kept = {k: v.clone() for k, v in first.items()}
    compiled(**calls[1][1])
    for name in kept:
        assert torch.equal(kept[name], first[name])
