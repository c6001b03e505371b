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
