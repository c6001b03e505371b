"""What the compile summaries and kernl bench print: counts agree with their noun ("1 timed
call", never "1 timed calls" as kernl bench --iters 1 said), the tuning rows stay aligned past
long op names, the total time is the command's from its start (imports included) and the
artifact's size counts every file written (the manifest and signature too)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as T
from click.testing import CliRunner

from kernl.artifacts.schema import Bucket
from kernl.artifacts.signing import generate_keypair
from kernl.compiler.bench import BenchResult
from kernl.compiler.cli import main
from kernl.compiler.op_counts import OpCounts
from kernl.compiler.plural import count
from kernl.compiler.report import BucketReport, CompileReport
from kernl.compiler.tasks.causal_lm.compile import CausalLMReport
from kernl.compiler.tasks.seq2seq.compile import Seq2SeqReport
from kernl.compiler.tune import TuneRecord


def test_count_agrees_with_its_noun():
    assert count(1, "bucket") == "1 bucket"
    assert count(0, "bucket") == "0 buckets"
    assert count(2, "kernel binary", "kernel binaries") == "2 kernel binaries"
    assert count(1, "kernel binary", "kernel binaries") == "1 kernel binary"


def test_bench_with_one_timed_call():
    result = BenchResult("a", "m", "bert", "base", "float32", "cpu", "CPU", "", {}, 1, 0)
    assert "; 1 timed call after 3+0 warm-up calls per shape" in result.table()


def test_compile_summary_with_one_of_each():
    bucket = Bucket(1, 8)
    record = TuneRecord(0, "kernl.linear", "", "triton", None, 2.0, 3.0, errors=["x"], timed=1)
    cached = TuneRecord(1, "kernl.linear", "", "triton", None, 2.0, 3.0, cached=True)
    report = CompileReport(
        Path("a"),
        "base",
        "float16",
        "cuda",
        [BucketReport(bucket, 1.0, 0.0, OpCounts(1, 1, 1, 1))],
        tuning={bucket: [record, cached]},
        compiled_ahead=1,
        compile_threads=1,
    )
    text = report.table()
    assert "1x8: 2 kernel instances," in text and "; 2 configs skipped" not in text
    assert "tuning: 1 candidate timed (1 compiled ahead on 1 thread), 1 kernel instance " in text
    assert "1 config skipped" in text and ", 1 bucket in " in text
    untuned = CompileReport(
        Path("a"),
        "base",
        "float32",
        "cpu",
        [BucketReport(bucket, 1.0, 0.0, OpCounts(3, 1, 1))],
        tuning={bucket: [TuneRecord(0, "kernl.linear", "", "triton", None, None, None)]},
    )
    assert "1x8: 1 kernl op, 1 on Triton" in untuned.table()
    assert OpCounts(1, 1, 0, 1).describe() == (
        "1 instruction: 1 kernl op (0 on Triton kernels, 1 on aten), 0 aten ops; "
        "1 kernel launch per call"
    )


def test_generation_summaries_with_one_kernel_binary():
    causal = CausalLMReport(Path("a"), "causal-lm", "float16", "cuda", num_binaries=1)
    assert "; 1 kernel binary\n" in causal.table() and ", 0 buckets in " in causal.table()
    seq2seq = Seq2SeqReport(Path("a"), "seq2seq-lm", "float16", "cuda", num_binaries=1)
    assert "; 1 kernel binary\n" in seq2seq.table()


def test_tuning_rows_stay_aligned_past_long_op_names():
    bucket = Bucket(1, 8)
    records = [
        TuneRecord(i, op, "", impl, None, 2.0, 3.0, timed=1)
        for i, (op, impl) in enumerate(
            [("kernl.linear", "triton"), ("kernl.bert_embeddings", "cublaslt")]
        )
    ]
    counts = OpCounts(2, 2, 2)
    report = CompileReport(
        Path("a"), "base", "float16", "cuda", [BucketReport(bucket, 1.0, 0.0, counts)]
    )
    report.tuning = {bucket: records}
    rows = [ln for ln in report.table().splitlines() if ln.startswith("    #")]
    assert len(rows) == 2 and len({ln.index(" us ") for ln in rows}) == 1, "\n".join(rows)


SMALL = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=120,
    max_position_embeddings=40,
)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "m"
    torch.manual_seed(0)
    T.BertModel(T.BertConfig(**SMALL)).save_pretrained(path)
    return path


def _compile_args(model, out, *more):
    return [str(model), "-o", str(out), "--buckets", "batch=1 seq=8", "--dtype", "fp32"] + [
        "--device",
        "cpu",
        "--no-kernels",
        *more,
    ]


def _stamps(stderr: str) -> list[float]:
    return [float(m) for m in re.findall(r"^\[\s*([0-9.]+)s\]", stderr, re.M)]


def _total(stdout: str) -> float:
    return float(re.search(r"1 bucket in ([0-9.]+) s", stdout).group(1))


def test_the_total_counts_from_the_commands_start(bert_dir, tmp_path, monkeypatch):
    """The total was compile()'s own time: the progress lines already stood past it (they
    counted the import of the compiler and the task's detection, here made a second long)."""
    import kernl.compiler.api

    detect = kernl.compiler.api.task_from_source
    monkeypatch.setattr(
        kernl.compiler.api, "task_from_source", lambda m: time.sleep(1) or detect(m)
    )
    before = time.perf_counter()
    result = CliRunner().invoke(main, ["compile", *_compile_args(bert_dir, tmp_path / "a")])
    took = time.perf_counter() - before
    assert result.exit_code == 0, result.output
    stamps = _stamps(result.stderr)
    assert stamps and _total(result.stdout) >= stamps[-1]
    # called in a process that started long before (pytest's): counted from the call
    assert stamps[0] <= took


def test_the_total_of_a_kernl_compile_process_counts_from_its_start(bert_dir, tmp_path):
    """A user waits through Python's start and the imports of torch and transformers (seconds)
    before the compiler prints anything: the total and the progress count them."""
    script = (
        "import time; t0 = time.perf_counter(); time.sleep(1)\n"
        "import sys\n"
        f"sys.argv = ['kernl-compile', *{_compile_args(bert_dir, tmp_path / 'a')!r}]\n"
        "from kernl.compiler.cli import compile_command\n"
        "try:\n    compile_command()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('waited', time.perf_counter() - t0)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    waited = float(run.stdout.split("waited ")[1])
    assert _stamps(run.stderr)[0] >= 1  # the sleep before the command started is counted
    assert _total(run.stdout) >= waited - 0.5, (run.stdout, waited)


def _files_bytes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_the_artifact_size_counts_every_file_written(bert_dir, tmp_path):
    """It was the writer's size before commit: without manifest.msgpack (or manifest.sig)."""
    import kernl.compiler

    out = tmp_path / "a"
    options = dict(dtype="fp32", device="cpu", kernels=False)
    report = kernl.compiler.compile(str(bert_dir), "batch=1 seq=8", out, **options)
    files = _files_bytes(out)
    assert "manifest.msgpack" in files and report.artifact_bytes == sum(files.values())
    # signed, into a folder where a user keeps a tokenizer: the signature counts, not that
    generate_keypair(tmp_path / "key", tmp_path / "key.pub")
    (out / "tokenizer.json").write_text("{}" * 1000)
    report = kernl.compiler.compile(
        str(bert_dir), "batch=1 seq=8", out, sign_key=tmp_path / "key", **options
    )
    files = _files_bytes(out)
    assert "manifest.sig" in files and "tokenizer.json" in files
    assert report.artifact_bytes == sum(files.values()) - files["tokenizer.json"]
    # kernl inspect's total is the same figure (it left the signature out)
    from kernl.compiler.inspect_report import inspect_artifact

    assert inspect_artifact(out).total_bytes == report.artifact_bytes
