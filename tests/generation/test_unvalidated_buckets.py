"""A decode bucket no validation step reaches is recorded as not validated (None, shown as "-"),
never as a 0 error that reads as a perfect match; kv lengths that no decode step can ever use
are refused when the buckets are parsed."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import kernl.compiler
import kernl.runtime
from kernl.artifacts import read_manifest, verify_artifact
from kernl.compiler.buckets import BucketSyntaxError
from kernl.compiler.cli import main
from kernl.compiler.inspect_report import inspect_artifact, render_text
from kernl.compiler.tasks.causal_lm.buckets import parse_generation_buckets

from .tiny_models import tiny_model


def test_a_decode_bucket_no_step_reaches_is_not_validated(tmp_path):
    out = tmp_path / "lm.kernl"
    # The prompt fills the cache: the one token generated comes from prefill, no decode step.
    report = kernl.compiler.compile(
        tiny_model("gpt2"), "batch=1 prompt=8 cache=8", out, dtype="fp32", device="cpu"
    )
    decode = next(e for e in report.stages if e.stage == "decode")
    assert decode.steps == 0 and decode.max_abs_error is None
    prefill = next(e for e in report.stages if e.stage == "prefill")
    assert prefill.steps == 1 and prefill.max_abs_error is not None

    lines = report.table().splitlines()
    row = next(ln for ln in lines if ln.split()[:1] == ["decode"])
    assert row.split()[-2:] == ["-", "-"], row
    assert len(row) == len(lines[0]), (row, lines[0])  # still aligned
    assert any(ln.startswith("warning: not validated") and "decode 1x8" in ln for ln in lines)

    entries = {e.program: e for e in read_manifest(out).buckets}
    assert entries["programs/decode_b1_kv8.msgpack"].max_abs_error is None
    assert isinstance(entries["programs/prefill_b1_p8.msgpack"].max_abs_error, float)
    verify_artifact(out)  # the reader's checks take a None error
    kernl.runtime.load(out, device="cpu")

    text = render_text(inspect_artifact(out))
    row = next(ln for ln in text.splitlines() if "KV length 8" in ln)
    assert row.split()[5] == "-", row
    row = next(ln for ln in text.splitlines() if "prompt 8" in ln)
    assert float(row.split()[4]) >= 0, row
    as_json = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).output)
    errors = {b["stage"]: b["max_abs_error"] for b in as_json["buckets"]}
    assert errors["decode"] is None and isinstance(errors["prefill"], float)


@pytest.mark.parametrize(
    "spec, dead",
    [
        ("batch=1 prompt=8 cache=4:32", "cache lengths 4, 8 would never be used"),
        ("batch=1 prompt=16,32 cache=16,64", "cache length 16 would never be used"),
    ],
)
def test_kv_lengths_no_decode_step_uses_are_refused(spec, dead):
    with pytest.raises(BucketSyntaxError, match=dead) as e:
        parse_generation_buckets(spec)
    assert "shortest prompt bucket (" in str(e.value) and "use cache lengths above" in str(e.value)


def test_kv_lengths_a_decode_step_uses_are_kept():
    assert parse_generation_buckets("batch=1 prompt=8,16 cache=9,16,32").kv_lengths == [9, 16, 32]
    assert parse_generation_buckets("batch=1 prompt=8 cache=8").kv_lengths == [8]
