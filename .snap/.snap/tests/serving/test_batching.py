"""The batch planner and group runner, without Ray: groups fit buckets, cover every row once,
keep short rows out of long buckets, and a group's outputs equal direct calls."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernl.runtime
from kernl.artifacts.schema import Bucket, InputSpec
from kernl.serving.batching import (
    Row,
    group_inputs,
    measure_costs,
    plan_groups,
    run_group,
    smallest_bucket,
    token_costs,
)

GRID = [Bucket(b, s) for b in (1, 4, 8) for s in (8, 16, 32)]


def test_smallest_bucket_follows_runtime_order():
    assert smallest_bucket(GRID, 1, 5) == Bucket(1, 8)
    assert smallest_bucket(GRID, 3, 9) == Bucket(4, 16)
    assert smallest_bucket(GRID, 9, 8) is None
    assert smallest_bucket(GRID, 1, 33) is None


def test_small_rows_share_one_replay():
    groups = plan_groups([3, 5, 8, 2], GRID)
    assert [(sorted(g.rows), g.bucket) for g in groups] == [([0, 1, 2, 3], Bucket(4, 8))]


def test_long_row_does_not_drag_short_ones_into_a_big_bucket():
    # Seven short rows and a long one: 4x8 + 4x8 ... cheaper than one 8x32 replay.
    lengths = [4] * 7 + [32]
    groups = plan_groups(lengths, GRID)
    assert sum(g.bucket.tokens for g in groups) < Bucket(8, 32).tokens
    long_group = next(g for g in groups if 7 in g.rows)
    assert long_group.bucket.seq == 32 and long_group.rows == (7,)


def test_measured_prices_decide_the_cut():
    # When any replay costs the same, one big replay beats eight small ones; when price
    # follows tokens, the long row goes alone.
    lengths = [4] * 7 + [32]
    flat = {b: 1.0 for b in GRID}
    assert [len(g.rows) for g in plan_groups(lengths, GRID, flat)] == [8]
    by_tokens = plan_groups(lengths, GRID, token_costs(GRID))
    assert len(by_tokens) == 2


def test_measure_costs_times_every_bucket(tiny_artifact):
    model = kernl.runtime.load(tiny_artifact, device="cpu")
    costs = measure_costs(model, repeats=1)
    assert sorted(costs) == sorted(model.buckets)
    assert all(c > 0 for c in costs.values())


def test_more_rows_than_the_largest_batch_take_several_replays():
    groups = plan_groups([8] * 19, GRID)
    assert sorted(len(g.rows) for g in groups) == [3, 8, 8]
    assert all(g.bucket.batch >= len(g.rows) for g in groups)


def test_row_longer_than_every_bucket_is_refused():
    with pytest.raises(ValueError, match="fits no bucket"):
        plan_groups([4, 40], GRID)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 32), min_size=1, max_size=40),
    buckets=st.sets(
        st.tuples(st.sampled_from([1, 2, 3, 8]), st.sampled_from([8, 13, 32])), min_size=1
    ).map(lambda s: [Bucket(b, q) for b, q in s]),
)
def test_plan_covers_every_row_once_in_fitting_buckets(lengths, buckets):
    if smallest_bucket(buckets, 1, max(lengths)) is None:
        with pytest.raises(ValueError):
            plan_groups(lengths, buckets)
        return
    groups = plan_groups(lengths, buckets)
    served = sorted(i for g in groups for i in g.rows)
    assert served == list(range(len(lengths)))
    for g in groups:
        longest = max(lengths[i] for i in g.rows)
        assert g.bucket == smallest_bucket(buckets, len(g.rows), longest)


def test_group_outputs_equal_direct_calls(tiny_artifact):
    model = kernl.runtime.load(tiny_artifact, device="cpu")
    g = torch.Generator().manual_seed(1)
    rows = []
    for length in (3, 8, 5, 1):
        ids = torch.randint(4, 120, (length,), generator=g).tolist()
        inputs = {"input_ids": tuple(ids)}
        if length == 8:  # a caller's own padding inside a row
            inputs["attention_mask"] = (1,) * 6 + (0, 0)
        if length == 5:
            inputs["token_type_ids"] = (0, 0, 1, 1, 1)
        rows.append(Row(inputs))
    served = run_group(model, rows)
    for row, got in zip(rows, served):
        direct = model(**{k: torch.tensor([v]) for k, v in row.inputs.items()})
        for name, expected in direct.items():
            torch.testing.assert_close(got[name], expected[0], atol=2e-5, rtol=1e-4)
        assert got["last_hidden_state"].shape[0] == row.length


def test_group_copies_back_only_the_outputs_asked_for(tiny_artifact):
    model = kernl.runtime.load(tiny_artifact, device="cpu")
    rows = [Row({"input_ids": (5, 6, 7)}), Row({"input_ids": (8, 9)})]
    served = run_group(model, rows, wanted={"pooler_output"})
    assert [set(r) for r in served] == [{"pooler_output"}] * 2
    everything = run_group(model, rows)
    for got, full in zip(served, everything):
        torch.testing.assert_close(got["pooler_output"], full["pooler_output"])


def group_inputs_before(rows, input_specs):
    """group_inputs as it was, one row at a time: the reference."""
    longest = max(r.length for r in rows)
    tensors = {}
    for spec in input_specs:
        t = torch.full((len(rows), longest), spec.pad_value, dtype=getattr(torch, spec.dtype))
        for k, row in enumerate(rows):
            values = row.inputs.get(spec.name)
            if values is not None:
                t[k, : row.length] = torch.tensor(values, dtype=t.dtype)
            else:
                t[k, : row.length] = 1 if spec.default == "ones" else 0
        tensors[spec.name] = t
    return tensors


@pytest.mark.parametrize("lengths", [[4], [3, 3, 3], [1, 5, 2, 5]])
@pytest.mark.parametrize("given", ["all", "none", "some"])
def test_group_inputs_equal_row_by_row_filling(lengths, given):
    specs = [
        InputSpec("input_ids", "int64", 0, "required"),
        InputSpec("attention_mask", "int64", 0, "ones"),
        InputSpec("token_type_ids", "int64", 0, "zeros"),
        InputSpec("position_ids", "int32", 7, "zeros"),
    ]
    rows = []
    for k, n in enumerate(lengths):
        inputs = {"input_ids": tuple(range(10 + k, 10 + k + n))}
        if given == "all" or (given == "some" and k % 2):
            inputs["attention_mask"] = (1,) * (n - 1) + (0,)
            inputs["token_type_ids"] = (1,) * n
            inputs["position_ids"] = tuple(range(n))
        rows.append(Row(inputs))
    got, expected = group_inputs(rows, specs), group_inputs_before(rows, specs)
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name])


def test_group_inputs_refuse_a_missing_required_input():
    specs = [InputSpec("input_ids", "int64", 0, "required"), InputSpec("x", "int64", 0)]
    with pytest.raises(ValueError, match="lacks the required input 'x'"):
        group_inputs([Row({"input_ids": (1, 2)})], specs)


def test_inputs_nobody_gave_are_left_to_the_runtime_only_without_padding(tiny_artifact):
    specs = [
        InputSpec("input_ids", "int64", 0, "required"),
        InputSpec("attention_mask", "int64", 0, "ones"),
    ]
    even = [Row({"input_ids": (5, 6, 7)}), Row({"input_ids": (8, 9, 10)})]
    ragged = [Row({"input_ids": (5, 6, 7)}), Row({"input_ids": (8,)})]
    assert list(group_inputs(even, specs, leave_defaults=True)) == ["input_ids"]
    assert list(group_inputs(ragged, specs, leave_defaults=True)) == specs_names(specs)
    assert list(group_inputs(even, specs)) == specs_names(specs)
    model = kernl.runtime.load(tiny_artifact, device="cpu")
    served = run_group(model, even)  # the runtime's defaults: the same answers
    for row, got in zip(even, served):
        direct = model(input_ids=torch.tensor([row.inputs["input_ids"]]))
        for name, expected in direct.items():
            torch.testing.assert_close(got[name], expected[0], atol=2e-5, rtol=1e-4)


def specs_names(specs):
    return [s.name for s in specs]
