"""What an encoder-decoder compile says it validated: the number of new tokens each row was
actually compared on (the cache, and for Whisper its decoder prompt, can leave fewer than the
usual 8), and in reduced precision that an id is only required near eager's argmax; `kernl
inspect` words it the same way."""

from __future__ import annotations

from pathlib import Path

import kernl.compiler
from kernl.compiler.inspect_report import inspect_artifact, render_text
from kernl.compiler.tasks.seq2seq.compile import Seq2SeqReport

from .test_seq2seq_generate import tiny_seq2seq
from .test_whisper_generate import tiny_whisper


def _summary_and_inspect(hf, buckets: str, out: Path) -> tuple[Seq2SeqReport, str, str]:
    report = kernl.compiler.compile(hf, buckets, out, dtype="fp32", device="cpu")
    inspected = inspect_artifact(out)
    assert report.artifact_bytes == inspected.total_bytes  # the manifest included
    validation = next(ln for ln in render_text(inspected).splitlines() if "greedy" in ln)
    return report, report.table().splitlines()[0], validation


def test_a_small_cache_is_reported_as_the_tokens_it_left(tmp_path):
    report, summary, validation = _summary_and_inspect(
        tiny_seq2seq("t5"), "batch=1,2 source=8 cache=2", tmp_path / "t5"
    )
    assert report.tokens == [2, 2]
    assert "(float32: equal, 2 new tokens per row)" in summary, summary
    assert "8 tokens" not in summary and "identical" not in summary
    assert "(float32: equal, 2 new tokens per row)" in validation, validation


def test_whisper_counts_the_tokens_after_its_decoder_prompt(tmp_path):
    # cache=2 holds the English-only prompt (start, notimestamps) and one new token
    report, summary, validation = _summary_and_inspect(
        tiny_whisper("english"), "batch=1 cache=2", tmp_path / "whisper"
    )
    assert report.tokens == [1]
    assert "(float32: equal, 1 new token per row)" in summary, summary
    assert "1 new token per row" in validation, validation
    # the multilingual prompt (start, detected language, notimestamps) leaves 3 of cache=5:
    # validation compared 1, as though every prompt took 4 tokens
    report, summary, _ = _summary_and_inspect(
        tiny_whisper("multilingual"), "batch=1 cache=5", tmp_path / "multilingual"
    )
    assert report.tokens == [3]
    assert "(float32: equal, 3 new tokens per row)" in summary, summary


def test_reduced_precision_is_not_called_identical():
    for dtype in ("bfloat16", "float16"):
        table = Seq2SeqReport(
            Path("a"), "seq2seq-lm", dtype, "cpu", buckets=[(1, 8), (4, 8)], tokens=[8, 5]
        )
        summary = table.table().splitlines()[0]
        assert f"({dtype}: each within a small margin of the argmax, 5 new tokens per row)" in (
            summary
        ), summary
        assert "identical" not in summary and "equal" not in summary
