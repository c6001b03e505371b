"""The memory a causal-LM artifact asks of the device at load (`generation_memory`, which
`load()` checks against the free memory and the compiler against the reader's cap) follows
what the prefill holds: boolean masks and SDPA's additive one, not [B, heads, S, S] scores,
and Gemma2's eager attention a block of queries at a time. Charged before for scores the
runtime never makes, a Mistral-7B at a 32k prompt asked 96 GB and was refused by an 80 GB
GPU; with a 4x32k bucket it asked 344 GB and failed its compile at commit (2026-12-06)."""

from __future__ import annotations

import dataclasses

from kernl.artifacts.generation import (
    PREFILL_SCORE_BYTES,
    DecodeKernels,
    DecoderSpec,
    GenerationBuckets,
    GenerationDescription,
    generation_memory,
)

GB = 1e9


def _spec(**overrides) -> DecoderSpec:
    mistral_7b = dict(
        family="llama",
        model_type="mistral",
        num_layers=32,
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=32000,
        norm="rms",
        norm_eps=1e-5,
        mlp="gated",
        activation="silu",
        positions="rope",
        max_positions=None,
        attention_scale=128**-0.5,
        sliding_window=4096,
        sliding_layers=list(range(32)),
    )
    return DecoderSpec(**{**mistral_7b, **overrides})


ROPE_KERNEL = DecodeKernels(rope="triton")


def _memory(spec, batches, prompts, cache, kernels=ROPE_KERNEL):
    kv = sorted({p for p in prompts if p < cache} | {cache})
    desc = GenerationDescription(spec, GenerationBuckets(batches, prompts, kv), kernels)
    return generation_memory(desc, 2)  # bf16


def _kv_cache(spec, batches, cache):
    return sum(
        2 * spec.num_layers * b * spec.num_kv_heads * cache * spec.head_dim * 2 for b in batches
    )


def test_a_32k_prompt_asks_for_its_masks_not_for_scores():
    spec = _spec()
    static, pool = _memory(spec, [1], [32768], 32768)
    scores = 32 * 32768**2 * 2  # [1, 32 heads, S, S] in bf16: 68.7 GB, never made
    # boolean [S, S] masks while they are made (three parts, the valid pairs twice, the
    # windowed layers' two) and SDPA's bf16 one: 9.7 GB; the rest is activations
    masks = 32768**2 * (3 + 2 + 2 + 2)
    assert masks < pool < masks + 8 * GB, pool / GB
    assert pool < scores / 4
    assert static >= _kv_cache(spec, [1], 32768)
    # weights 14.5 GB: the whole artifact fits an 80 GB GPU with room to spare
    assert 14.5 * GB + static + pool < 40 * GB, (static + pool) / GB


def test_gemma2_prefill_is_charged_one_block_of_scores():
    gemma2_9b = _spec(
        model_type="gemma2",
        num_layers=42,
        hidden_size=3584,
        num_heads=16,
        head_dim=256,
        vocab_size=256000,
        attn_logit_softcap=50.0,
        sliding_layers=list(range(0, 42, 2)),
    )
    plain = dataclasses.replace(gemma2_9b, attn_logit_softcap=None)
    _, capped_pool = _memory(gemma2_9b, [1, 8], [8192], 8192)
    _, plain_pool = _memory(plain, [1, 8], [8192], 8192)
    # float32 probabilities and three bf16 copies of one block: 2.5 blocks
    assert capped_pool - plain_pool == PREFILL_SCORE_BYTES * 5 // 2
    # a prompt so short that its whole scores are under one block is charged those only
    _, short_capped = _memory(gemma2_9b, [1], [64], 8192)
    _, short_plain = _memory(plain, [1], [64], 8192)
    assert short_capped - short_plain == 16 * 64 * 64 * 4 * 5 // 2


def test_the_torch_rotary_matrices_are_charged_where_the_step_reads_them():
    spec = _spec()
    matrices = 8192 * 128 * 128 * 2
    with_kernels, _ = _memory(spec, [1], [1024], 8192)
    on_torch, _ = _memory(spec, [1], [1024], 8192, DecodeKernels(rope="torch"))
    assert on_torch - with_kernels == matrices


def test_the_batch_buckets_are_charged_two_kv_caches():
    """The smallest bucket's cache and the storage the others share (runtime/generation/
    state.py): buckets 1, 8 and 16 hold 17 rows of cache, not 25."""
    spec = _spec()
    static, _ = _memory(spec, [1, 8, 16], [1024], 8192)
    alone, _ = _memory(spec, [16], [1024], 8192)
    one, _ = _memory(spec, [1], [1024], 8192)
    rows = _kv_cache(spec, [1], 8192)
    assert static - alone - one < rows  # the rest: ids, masks and prompt buffers
    assert static < _kv_cache(spec, [1, 8, 16], 8192)
