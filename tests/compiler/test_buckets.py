import pytest

from kernl.artifacts.schema import Bucket
from kernl.compiler.buckets import BucketSyntaxError, as_buckets, parse_buckets


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
