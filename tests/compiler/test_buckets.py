import types

import pytest

from kernl.artifacts.schema import Bucket
from kernl.compiler.buckets import (
    BucketLimitError,
    BucketSyntaxError,
    as_buckets,
    check_buckets_fit,
    parse_buckets,
    position_limit,
)


def test_lists_and_power_of_two_ranges_make_a_cartesian_product():
    buckets = parse_buckets("batch=1,8 seq=16:64")
    assert buckets == [Bucket(b, s) for b in (1, 8) for s in (16, 32, 64)]


def test_range_adds_its_upper_end_when_doublings_miss_it():
    assert [b.seq for b in parse_buckets("batch=1 seq=16:100")] == [16, 32, 64, 100]


def test_items_mix_numbers_and_ranges_and_deduplicate():
    assert [b.seq for b in parse_buckets("seq=8,16:32,24 batch=2")] == [8, 16, 24, 32]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("batch=1", "missing axis seq"),
        ("batch=1 seq=0", "positive"),
        ("batch=1 seq=64:16", "downwards"),
        ("batch=1 seq=abc", "neither a number"),
        ("batch=1 seq=16 heads=2", "unknown axis"),
        ("batch=1 batch=2 seq=16", "given twice"),
        ("batch1 seq=16", "expected AXIS=VALUES"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(BucketSyntaxError, match=message):
        parse_buckets(spec)


def test_as_buckets_accepts_pairs():
    assert as_buckets([(2, 8), Bucket(1, 4)]) == [Bucket(1, 4), Bucket(2, 8)]


def test_as_buckets_accepts_the_axes_as_a_dict_and_names_what_is_wrong():
    # the dict form causal-LM buckets take; an encoder's raised int("b") on its keys
    assert as_buckets({"batch": [1, 2], "seq": 8}) == [Bucket(1, 8), Bucket(2, 8)]
    for bad, needle in [({"batch": [1], "sequence": [8]}, 'keys "batch" and "seq"'),
                        (["b8"], "pair of integers"), ([(0, 8)], "positive")]:  # fmt: skip
        with pytest.raises(BucketSyntaxError, match=needle):
            as_buckets(bad)


def test_buckets_listed_as_batch_x_seq():
    # The form `kernl bench --buckets` and `kernl inspect` print.
    assert parse_buckets("8x128,1x16") == [Bucket(1, 16), Bucket(8, 128)]
    assert parse_buckets(" 1x16 8X128 1x16 ") == [Bucket(1, 16), Bucket(8, 128)]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("1x16,8", "expected BATCHxSEQ"),
        ("1x16,seq=8", "unknown axis"),
        ("0x16", "positive"),
        ("1x16x2", "expected BATCHxSEQ"),
    ],
)
def test_bad_bucket_lists_say_what_is_wrong(spec, message):
    with pytest.raises(BucketSyntaxError, match=message):
        parse_buckets(spec)


@pytest.mark.parametrize(
    "config, limit",
    [
        (dict(model_type="bert", max_position_embeddings=512), 512),
        # RoBERTa's positions start after the pad id (1): 514 rows hold 512 tokens.
        (dict(model_type="roberta", max_position_embeddings=514, pad_token_id=1), 512),
        (
            dict(model_type="deberta-v2", max_position_embeddings=512, position_biased_input=False),
            None,
        ),
        (dict(model_type="custom"), None),
        # ESM with absolute positions offsets them as RoBERTa does; rotary ESM has no table.
        (
            dict(
                model_type="esm",
                max_position_embeddings=514,
                pad_token_id=1,
                position_embedding_type="absolute",
            ),
            512,
        ),
        # RoBERTa's derivatives offset theirs alike (I-BERT's failed past its table, review)
        (dict(model_type="ibert", max_position_embeddings=514, pad_token_id=1), 512),
        (dict(model_type="xmod", max_position_embeddings=514, pad_token_id=1), 512),
        # MarkupLM's and LayoutLMv3's too (a full-table bucket was an IndexError in export)
        (dict(model_type="markuplm", max_position_embeddings=514, pad_token_id=1), 512),
        (dict(model_type="layoutlmv3", max_position_embeddings=514, pad_token_id=1), 512),
        (
            dict(
                model_type="esm",
                max_position_embeddings=1026,
                pad_token_id=1,
                position_embedding_type="rotary",
            ),
            None,
        ),
    ],
)
def test_position_limit_from_the_config(config, limit):
    cfg = types.SimpleNamespace(**config)
    assert position_limit(cfg) == limit
    buckets = [Bucket(1, 16), Bucket(4, 512), Bucket(1, 513)]
    if limit is None:
        check_buckets_fit(buckets, cfg)
        return
    with pytest.raises(
        BucketLimitError, match=rf"bucket\(s\) 1x513 longer than the model's {limit}"
    ):
        check_buckets_fit(buckets, cfg)
    check_buckets_fit(buckets[:2], cfg)


@pytest.mark.parametrize(
    "spec, message",
    [
        # non-ASCII digits (int() takes them): refused as the numbers they are not
        ("batch=1 seq=８", "'８' is neither a number"),
        ("１x8", "expected BATCHxSEQ"),
        # a trailing or doubled comma names the empty item
        ("1x16,", r"empty item in '1x16,'"),
        ("batch=1, seq=8", r"batch: empty item in '1,'.*axes by spaces"),
        ("batch=1,,2 seq=8", "batch: empty item"),
        ("batch= seq=8", "batch: no sizes"),
    ],
)
def test_unclear_specs_say_what_is_wrong(spec, message):
    with pytest.raises(BucketSyntaxError, match=message):
        parse_buckets(spec)


MANY = ",".join(str(n) for n in range(1, 41))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("batch=99999999999999999999 seq=8", "batch=99999999999999999999 is more than the 65536"),
        ("batch=1:99999999999999999999 seq=8", "is more than the 65536"),
        ("70000x1", "batch=70000 is more than the 65536"),
        ("1x1048577", "seq=1048577 is more than the 1048576"),
        ("65536x512", r"bucket 65536x512 \(batch x seq\) holds 33554432 tokens"),
        (f"batch={MANY} seq={MANY}", "1600 buckets, more than the 1024"),
    ],
)
def test_buckets_over_the_readers_limits_are_refused_at_parse_time(spec, message):
    # The reader (kernl.artifacts.DEFAULT_LIMITS) refuses them at verify and load.
    with pytest.raises(BucketLimitError, match=message):
        parse_buckets(spec)


def test_limits_are_the_readers_and_the_largest_legal_bucket_parses():
    from kernl.artifacts import DEFAULT_LIMITS as L

    assert parse_buckets(f"{L.max_batch}x{L.max_bucket_tokens // L.max_batch}")
    assert parse_buckets(f"1x{L.max_seq}") == [Bucket(1, L.max_seq)]
    with pytest.raises(BucketLimitError, match="65536"):
        as_buckets([(L.max_batch + 1, 1)])


@pytest.mark.parametrize(
    "task, spec, message",
    [
        ("causal-lm", "batch=70000 prompt=8", "batch=70000 is more than"),
        ("causal-lm", "batch=1 prompt=8 cache=2000000", "cache=2000000 is more than"),
        ("causal-lm", "batch=4096 prompt=8 cache=8192", "cache of 8192 slots holds"),
        ("causal-lm", "batch=1 prompt=8,", "prompt: empty item"),
        ("causal-lm", "batch=1 prompt=８", "neither a number"),
        ("seq2seq-lm", "batch=1 source=2000000", "source=2000000 is more than"),
        ("seq2seq-lm", "batch=4096 source=8192 cache=8", r"\(cache 8 \+ source 8192\) holds"),
        ("seq2seq-lm", "batch=1, source=8", "batch: empty item"),
        ("speech-seq2seq", "batch=99999999999999999999", "batch=99999999999999999999 is more"),
    ],
)
def test_generation_buckets_are_checked_the_same_way(task, spec, message):
    from kernl.compiler.tasks.causal_lm.buckets import as_generation_buckets
    from kernl.compiler.tasks.seq2seq.buckets import as_seq2seq_buckets

    with pytest.raises(BucketSyntaxError, match=message):
        if task == "causal-lm":
            as_generation_buckets(spec)
        else:
            as_seq2seq_buckets(spec, 1500 if task == "speech-seq2seq" else None)


def test_buckets_as_dicts_are_checked_as_strings_are_before_anything_is_built():
    """A dict of buckets (optimize(buckets=...)) was taken field by field: batch 0 failed deep
    in the compile's validation, 1.9 served as 1, "18" as [1, 8], the string syntax's axis
    names raised KeyError, and an encoder's two axes built their whole product (4 million
    pairs, 34 s) before the count was checked."""
    import time

    from kernl.compiler.tasks.causal_lm.buckets import as_generation_buckets
    from kernl.compiler.tasks.seq2seq.buckets import as_seq2seq_buckets

    for bad, needle in [
        ({"batches": [0], "prompts": [16]}, "batch: sizes are positive integers, got 0"),
        ({"batches": [], "prompts": [16]}, "batch: no sizes"),
        ({"batch": [1.9], "prompt": [16]}, "got 1.9"),
        ({"batch": True, "prompt": [16]}, "not True"),
        ({"batch": [1]}, "take the keys 'batch', 'prompt' and optionally 'cache'"),
        ({"batch": [1], "prompts": [16]}, "got \\['batch', 'prompts'\\]"),
    ]:
        with pytest.raises(BucketSyntaxError, match=needle):
            as_generation_buckets(bad)
    got = as_generation_buckets({"batch": "1,8", "prompt": "16:64"})
    assert (got.batches, got.prompts, got.kv_lengths) == ([1, 8], [16, 32, 64], [128])
    assert as_generation_buckets(got) == got  # its own fields, as to_dict gives them
    assert as_generation_buckets({"batch": "18", "prompt": 8}).batches == [18]
    with pytest.raises(BucketSyntaxError, match="source: sizes are positive integers, got -8"):
        as_seq2seq_buckets({"batch": [1], "source": [-8]})
    speech = as_seq2seq_buckets({"batch": [1, 8], "cache": 448}, source_positions=1500)
    assert (speech.batches, speech.sources, speech.caches) == ([1, 8], [1500], [448])
    assert as_seq2seq_buckets(speech, source_positions=1500) == speech
    start = time.perf_counter()
    with pytest.raises(BucketSyntaxError, match="4000000 buckets"):
        as_buckets({"batch": range(1, 2001), "seq": range(1, 2001)})
    assert time.perf_counter() - start < 10  # refused by count, not after building them
    for bad in (5, {"batch": True, "seq": [8]}):
        with pytest.raises(BucketSyntaxError):
            as_buckets(bad)
