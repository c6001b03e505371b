"""T5's relative position buckets for any relative_attention_max_distance, on the CPU in fp32.

kernl's decoder gathers its position bias from a table over query-key distances. Clamping
distances at max_distance is exact only where max_distance > num_buckets // 2 (every distance
from max_distance on is in the last bucket); below that, Hugging Face's buckets keep changing
(and past some distance fall below 0, where HF's T5 fails with an IndexError)."""

from __future__ import annotations

import functools

import pytest
import torch

import kernl.compiler
import kernl.runtime
from kernl.runtime.generation.encoder_decoder import (
    decoder_bias_distances,
    relative_distance_limit,
    relative_position_bucket,
)

VOCAB = 97
CONFIGS = [
    (32, 128),
    (32, 17),
    (32, 16),
    (32, 8),
    (32, 4),
    (16, 3),
    (33, 5),
    (8, 16),
    (32, 1),
    (8, 1),
]
FAR = 2000  # query-key distances compared with Hugging Face's buckets


def tiny_t5(num_buckets: int, max_distance: int) -> torch.nn.Module:
    """A random T5 with inflated weights (the position bias shows in fp32 ids)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="relu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=max_distance,
        initializer_factor=8.0,
    )
    return tf.T5ForConditionalGeneration(cfg).eval()


def hf_buckets(relative: torch.Tensor, bidirectional: bool, nb: int, md: int) -> torch.Tensor:
    from transformers.models.t5.modeling_t5 import T5Attention

    return T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=nb, max_distance=md
    )


@pytest.mark.parametrize("bidirectional", [False, True], ids=["decoder", "encoder"])
@pytest.mark.parametrize("nb,md", CONFIGS)
def test_the_distance_limit_is_where_hugging_face_s_buckets_stop(nb, md, bidirectional):
    distance = torch.arange(FAR)
    sides = (distance, -distance) if bidirectional else (-distance,)
    bad = torch.zeros(FAR, dtype=torch.bool)
    for relative in sides:
        bucket = hf_buckets(relative, bidirectional, nb, md)
        bad |= (bucket < 0) | (bucket >= nb)
    first = int(bad.nonzero()[0]) if bool(bad.any()) else None
    assert relative_distance_limit(bidirectional, nb, md) == first
    if first is not None:  # once gone, the buckets never come back
        assert bool(bad[first:].all())


@pytest.mark.parametrize("nb,md", CONFIGS)
def test_the_decoder_table_gives_hugging_face_s_bucket_at_every_distance(nb, md):
    """The table's buckets, a distance past its end taking its last one (as decode clamps),
    against HF's at every distance HF has a bucket for. Before: a table over max_distance + 1
    distances, wrong from max_distance + 1 to num_buckets // 2 and beyond where
    max_distance <= num_buckets // 2."""
    n = decoder_bias_distances(nb, md)
    limit = relative_distance_limit(False, nb, md)
    distance = torch.arange(FAR if limit is None else limit)
    ours = relative_position_bucket(-distance.clamp(max=n - 1), False, nb, md)
    assert torch.equal(ours, hf_buckets(-distance, False, nb, md))


def _hf_greedy(hf, ids, mask, new: int) -> torch.Tensor:
    with torch.no_grad():
        return hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            num_beams=1,
            eos_token_id=None,
            pad_token_id=0,
        )


def _sources(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize(
    "md,cache,seeds",
    [(4, 40, (0, 2, 4)), (16, 16, (0,))],
    ids=["max_distance-below-exact", "max_distance-equals-exact"],
)
def test_t5_with_a_short_max_distance_gives_hugging_face_ids_and_logits(tmp_path, md, cache, seeds):
    """relative_attention_num_buckets=32: the decoder's 16 exact buckets. Before, with
    max_distance 4, greedy ids differed from HF's after ~20 tokens (seeds 2 and 4) and each
    step's logits by 4% to 170% of their scale (all three seeds)."""
    hf = tiny_t5(32, md)
    path = tmp_path / "t5"
    buckets = f"batch=1,4 source=8,16 cache={cache}"
    kernl.compiler.compile(hf, buckets, path, dtype="fp32", device="cpu")
    model = kernl.runtime.load(path, device="cpu")
    for seed in seeds:
        ids, mask = _sources([12, 7, 16, 3], seed)
        ref = _hf_greedy(hf, ids, mask, cache)
        got = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=cache, eos_token_id=[]
        )
        assert torch.equal(got, ref), f"seed {seed}\nkernl {got.tolist()}\nhf    {ref.tolist()}"
        with torch.no_grad():
            logits = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=ref[:, :-1]).logits
        steps = model.stream(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=cache,
            eos_token_id=[],
            output_logits=True,
        )
        ours = torch.stack([step_logits for _, step_logits in steps], 1)
        # (this inflated model's fp32 logits differ from its fp64 ones by up to 0.3% of scale)
        worst = float((ours - logits).abs().max())
        assert worst <= 1e-2 * float(logits.abs().max()), f"seed {seed}: worst |diff| {worst}"


def test_buckets_reaching_distances_without_a_position_bucket_are_refused_by_name(tmp_path):
    """max_distance 8 of 32 buckets: the encoder's buckets end at distance 8 (0 / 0 there), the
    decoder's at 34; HF's T5 fails on longer inputs (IndexError), and so would kernl's (a
    device-side assert on a GPU)."""
    from kernl.compiler.buckets import BucketLimitError

    hf = tiny_t5(32, 8)
    compile_ = functools.partial(kernl.compiler.compile, hf, dtype="fp32", device="cpu")
    with pytest.raises(BucketLimitError) as e:
        compile_("batch=1 source=16 cache=16", tmp_path / "a")
    for named in ("relative_attention_max_distance=8", "num_buckets=32", "source <= 8"):
        assert named in str(e.value)
    with pytest.raises(BucketLimitError, match=r"decoder distances from 34 on .* cache <= 34"):
        compile_("batch=1 source=8 cache=48", tmp_path / "a")
    assert not (tmp_path / "a").exists()
