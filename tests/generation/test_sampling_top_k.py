"""Top-k as Hugging Face's TopKLogitsWarper: every token whose score equals the k-th is kept
(ties are common with fp16/bf16 logits); kernl kept exactly k by rank."""

from __future__ import annotations

import torch
import transformers as T

from kernl.runtime.generation.sampling import SamplerParams, sample, uniform_noise


def _drawn(logits: torch.Tensor, top_k: int, seeds: int = 400) -> set[int]:
    params = SamplerParams.allocate("cpu", rows=1)
    params.set(1.0, top_k, None, 0, vocab=logits.shape[-1])
    drawn = set()
    for step in range(seeds):
        drawn.add(int(sample(logits[None], params, torch.tensor(step))))
    return drawn


def test_tokens_tied_with_the_kth_are_kept_as_hugging_face_keeps_them():
    logits = torch.tensor([3.0, 2.5, 2.5, 2.5, 0.0], dtype=torch.bfloat16).float()
    warped = T.TopKLogitsWarper(top_k=2)(None, logits[None].clone())[0]
    hf_kept = set(torch.isfinite(warped).nonzero().flatten().tolist())
    assert hf_kept == {0, 1, 2, 3}
    assert _drawn(logits, 2) == hf_kept


def test_without_ties_top_k_keeps_k_and_a_k_past_the_vocabulary_keeps_all():
    logits = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5])
    assert _drawn(logits, 2) == {0, 1}
    assert _drawn(logits, 50) == {0, 1, 2, 3, 4}


def test_a_token_the_filters_dropped_is_never_drawn_even_at_the_noises_top_value():
    """(seed 80151, step 0, token 96) and (seed 3266, step 7, token 50) hash to the noise's
    top value, (2**24 - 0.5) / 2**24, which float32 rounded to 1.0: the Gumbel noise was
    +inf, the dropped token's -inf + inf a NaN, and argmax drew it (review, 2026-12-07)."""
    vocab = 97
    for seed, step, token in [(80151, 0, 96), (3266, 7, 50)]:
        u = uniform_noise(torch.arange(vocab)[None], torch.tensor([seed]), torch.tensor([[step]]))
        assert u.max() < 1.0 and u[0, token] == u.max()  # still the row's largest draw
        logits = torch.zeros(vocab)
        logits[3] = 5.0
        params = SamplerParams.allocate("cpu", rows=1)
        params.set(1.0, 1, None, seed, vocab=vocab)  # top-k 1: greedy, as in Hugging Face
        assert int(sample(logits[None], params, torch.tensor(step))) == 3
