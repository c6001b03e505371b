"""The tuner across the buckets of one compile, on the CPU with the GPU timing faked: a
candidate that fails to compile is skipped and counted, its compiler output (written to fd 2
by native code, like Triton's MLIR crash dumps) never reaches the user unless asked for, and
it is not compiled again for another shape; kernel instances of equal shapes in different
buckets (1x16 and 2x8 run the same GEMMs and norms) are timed once."""

from __future__ import annotations

import copy
import ctypes
import json
import os
from pathlib import Path

import pytest
import torch

from kernl.artifacts.schema import Bucket
from kernl.compiler import tune
from kernl.compiler.lower import lower
from kernl.compiler.passes import rewrite
from kernl.compiler.report import CompileReport
from kernl.compiler.trace import FlatModel, example_inputs, export_bucket, model_signature

DUMP = b"python: NVGPUWarpSpecialization.cpp:412: Assertion `partition' failed.\n"
GOOD = {"name": "good"}
BAD = {"name": "bad"}


def _native_stderr(data: bytes) -> None:
    """Write to fd 2 from C, the way Triton's C++ passes do (past sys.stderr)."""
    libc = ctypes.CDLL(None)
    libc.write(2, data, len(data))


def test_quiet_native_stderr_keeps_native_writes_and_restores_fd_2(capfd):
    with tune.quiet_native_stderr() as dump:
        _native_stderr(DUMP)
        os.write(2, b"second line\n")
    _native_stderr(b"after\n")
    err = capfd.readouterr().err
    assert "Assertion" not in err and "second line" not in err
    assert err == "after\n"
    assert dump == [DUMP.decode() + "second line\n"]
    assert tune._first_line(dump[0]).startswith("python: NVGPUWarpSpecialization")


def test_verbose_leaves_stderr_alone(capfd):
    with tune.quiet_native_stderr(verbose=True) as dump:
        _native_stderr(DUMP)
    assert "Assertion" in capfd.readouterr().err and dump == []


@pytest.fixture(scope="module")
def programs():
    """A small BERT's rewritten programs for two buckets of 16 tokens each."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
    )
    model = BertModel(cfg).eval()
    dev = torch.device("cpu")
    sig = model_signature(model, dev)
    flat = FlatModel(model, [s.name for s in sig.inputs], [s.name for s in sig.outputs])
    found = []
    for bucket in (Bucket(1, 16), Bucket(2, 8)):
        program, weights = lower(export_bucket(flat, bucket, 100, dev), bucket, flat.input_names)
        example = dict(zip(flat.input_names, example_inputs(flat.input_names, bucket, 100, dev)))
        found.append((bucket, program, weights, example))
    return found


def _signature(op, args, kwargs) -> tuple:
    """What a compile of one config depends on: dtypes and plain arguments, not sizes."""

    def kind(v):
        return str(v.dtype) if isinstance(v, torch.Tensor) else repr(v)

    rest = sorted((k, kind(v)) for k, v in kwargs.items() if k not in ("impl", "config"))
    return (op, tuple(kind(a) for a in args), tuple(rest))


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """Timing mode on the CPU: a fake GPU name, a fake clock, two configs per op of which
    "bad" fails to compile after writing a crash dump to fd 2; every candidate computes with
    aten (the interpreter would only make this slow)."""
    monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KERNL_VERBOSE", raising=False)
    monkeypatch.setenv("KERNL_COMPILE_THREADS", "0")  # the serial loop (compile_ahead: below)
    monkeypatch.setattr(tune, "_timing_target", lambda device: "fake-gpu")
    clock = iter(range(1000, 100000))
    monkeypatch.setattr(tune, "_bench_us", lambda fn: (fn(), float(next(clock)))[1])
    monkeypatch.setattr(tune, "_configs", lambda op, *call: [dict(GOOD), dict(BAD)])
    compiled_bad = []
    real = tune.kernl_ops_fn

    def fake_fn(op):
        fn = real(op)

        def run(*args, **kwargs):
            if kwargs.get("config") == BAD:
                compiled_bad.append(_signature(op, args, kwargs))
                _native_stderr(DUMP)
                raise RuntimeError("PassManager::run failed")
            kwargs = {**kwargs, "impl": "aten", "config": None}
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(tune, "kernl_ops_fn", fake_fn)
    return compiled_bad


def _tune_all(programs, session):
    report = CompileReport(path=None, task="base", dtype="float32", device="fake-gpu")
    for bucket, program, weights, example in programs:
        weights = dict(weights)  # rewrite adds the fused weights
        program = rewrite(copy.deepcopy(program), weights)
        records = tune.tune_program(program, weights, example, torch.device("cpu"), session=session)
        report.tuning[bucket] = records
    return report


def test_a_failing_candidate_is_skipped_counted_and_quiet(programs, fake_gpu, capfd):
    report = _tune_all(programs, tune.TuneSession())
    out, err = capfd.readouterr()
    assert "Assertion" not in out + err, "a crash dump reached the user"
    records = [r for rs in report.tuning.values() for r in rs]
    assert records and all(r.impl in ("aten", "triton") for r in records)
    # every non-cached instance lists the bad config as skipped, with the compiler's line
    fresh = [r for r in records if not r.cached and r.time_us is not None]
    assert fresh and all(len(r.errors) == 1 for r in fresh)
    assert all("PassManager::run failed" in r.errors[0] for r in fresh)
    assert any("NVGPUWarpSpecialization" in r.errors[0] for r in fresh)
    # compiled once per (op, dtypes, epilogue), not once per shape
    assert len(fake_gpu) == len(set(fake_gpu)) < len(fresh), fake_gpu
    assert any("(failed before)" in r.errors[0] for r in fresh)
    table = "\n".join(report.tuning_table())
    assert "configs skipped (failed to compile or run)" in table
    summary = [line for line in report.table().splitlines() if line.startswith("tuning:")]
    assert summary and f"{len(fresh)} configs skipped" in summary[0], summary


def test_verbose_session_shows_the_dump(programs, fake_gpu, capfd):
    _tune_all(programs[:1], tune.TuneSession(verbose=True))
    assert "NVGPUWarpSpecialization" in capfd.readouterr().err


def test_equal_shapes_in_two_buckets_are_timed_once(programs, fake_gpu):
    """1x16 and 2x8 hold 16 tokens each: their linears (but the pooler's, on [batch, H]) and
    norms are the same kernels on the same [16, K] rows; the attention and the embeddings
    are not ([B, H, L, D] and [B, L] differ)."""
    report = _tune_all(programs, tune.TuneSession())
    first, second = report.tuning.values()
    timed_first = {r.shapes for r in first if not r.cached}
    for r in second:
        if r.op in tune.ROWS_OPS and r.shapes in timed_first:
            assert r.cached and r.timed == 0, r
    rows_ops = [r for r in second if r.op in tune.ROWS_OPS]
    shared = [r for r in rows_ops if r.shapes in timed_first]
    assert len(shared) == len(rows_ops) - 1, [r.shapes for r in rows_ops]  # not the pooler
    others = [r for r in second if r.op not in tune.ROWS_OPS]
    assert others and all(r.shapes not in timed_first for r in others)


def test_without_rows_descriptions_the_second_bucket_is_timed_again(
    programs, fake_gpu, monkeypatch
):
    """The same compile with the [rows, K] description turned off: what the test above saves."""
    timed, rows = {}, tune.ROWS_OPS
    for rows_ops in (rows, ()):
        monkeypatch.setattr(tune, "ROWS_OPS", rows_ops)
        monkeypatch.setenv("KERNL_CACHE_DIR", os.environ["KERNL_CACHE_DIR"] + str(len(rows_ops)))
        second = list(_tune_all(programs, tune.TuneSession()).tuning.values())[1]
        timed[rows_ops] = sum(r.timed for r in second)
    assert timed[()] > timed[rows] > 0, timed


def test_kernl_compile_verbose_turns_the_dumps_on(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from kernl.compiler.cli import compile_command

    monkeypatch.setenv("KERNL_VERBOSE", "0")  # restored after the test, whatever the CLI sets
    args = [str(tmp_path / "no-model"), "-o", str(tmp_path / "a.kernl"), "--buckets", "batch=1"]
    CliRunner().invoke(compile_command, args)
    assert not tune.TuneSession().verbose
    CliRunner().invoke(compile_command, [*args, "--verbose"])
    assert tune.TuneSession().verbose


def test_the_tuner_compiles_ahead_what_it_then_times(programs, fake_gpu, monkeypatch):
    """With threads, each timed instance first hands its candidates to compile_ahead, minus
    those known to fail (compile_ahead itself leaves out the warp-specialised ones:
    test_compile_ahead.py); the choices are those made without."""
    WS = {"name": "ws", "warp_specialize": True}
    monkeypatch.setattr(tune, "_configs", lambda op, *call: [dict(GOOD), dict(BAD), dict(WS)])
    handed = []

    def fake_ahead(fn, args, kwargs, configs, threads):
        handed.append(([c["name"] for c in configs], threads))
        return len(configs)

    monkeypatch.setattr(tune, "compile_ahead", fake_ahead)
    without = _tune_all(programs, tune.TuneSession(compile_threads=0))
    assert handed == []
    monkeypatch.setenv("KERNL_CACHE_DIR", str(tune.cache_dir().parent) + "-threads")
    session = tune.TuneSession(compile_threads=4)
    with_threads = _tune_all(programs, session)
    fresh = [r for rs in with_threads.tuning.values() for r in rs if not r.cached and r.timed]
    assert len(handed) == len(fresh) and all(t == 4 for _, t in handed)
    assert handed[0][0] == ["good", "bad", "ws"]  # the first sees "bad" fail only afterwards
    assert any(names == ["good", "ws"] for names, _ in handed)  # "bad" failed before
    assert session.compiled_ahead == sum(len(names) for names, _ in handed)
    with_threads.compiled_ahead, with_threads.compile_threads = session.compiled_ahead, 4
    assert f"({session.compiled_ahead} compiled ahead on 4 threads)" in with_threads.table()
    assert "compiled ahead" not in without.table()

    def choices(report):
        return [(r.op, r.shapes, r.impl, r.config) for rs in report.tuning.values() for r in rs]

    assert choices(with_threads) == choices(without)


def test_the_attention_space_follows_the_call():
    # the short-key kernel's configs are candidates where every key fits one block and the
    # attention is not causal, and only there (its launcher refuses the rest)
    def call(keys, causal):
        q = torch.empty(2, 12, keys, 64, device="meta")
        return tune._configs("kernl.attention", (q, q, q, None, 0.125, causal), {})

    def short(configs):
        return [c for c in configs if c["programs_per_sm"]]

    assert short(call(128, False)) and all(c["BLOCK_N"] == 128 for c in short(call(128, False)))
    assert not short(call(128, True))
    assert not short(call(512, False))
    assert tune._configs("kernl.attention") == call(512, False)
    assert not short(tune._configs("kernl.attention", (), {"q": None, "k": None, "v": None}))


# -- the tuning cache on disk ------------------------------------------------------------------


def test_the_tuning_cache_folder_follows_kernl_optimize_s_rules(monkeypatch, tmp_path):
    """An empty KERNL_CACHE_DIR was the working directory's `tuning/`, and '~' was a folder
    named '~' there; kernl.optimize's models were where the rules say (one helper now)."""
    from kernl.compiler import optimize

    home = Path.home() / ".cache" / "kernl"
    monkeypatch.setenv("KERNL_CACHE_DIR", "")
    assert tune.cache_dir() == home / "tuning" and optimize.cache_root() == home
    monkeypatch.setenv("KERNL_CACHE_DIR", "~/kc")
    assert tune.cache_dir() == Path.home() / "kc" / "tuning"
    with tune.cache_root_of(tmp_path / "given"):  # kernl.optimize(cache_dir=...)'s compile
        assert tune.cache_dir() == tmp_path / "given" / "tuning"
    assert tune.cache_dir() == Path.home() / "kc" / "tuning"


def _cache_files(root: Path) -> list[Path]:
    return sorted((root / "tuning").glob("*.json"))


def test_a_corrupt_or_unreadable_cache_file_is_a_miss_with_a_warning(programs, fake_gpu, tmp_path):
    """A torn write or another format crashed every later compile with a raw JSONDecodeError."""
    first = _tune_all(programs[:1], tune.TuneSession())
    files = _cache_files(tmp_path)
    assert len(files) >= 3
    files[0].write_text('{"impl": "triton", "conf')  # torn
    files[1].write_text('["not", "a", "record"]')
    files[2].unlink()
    files[2].mkdir()  # cannot be read as a file (nor replaced)
    with pytest.warns(RuntimeWarning) as said:
        again = _tune_all(programs[:1], tune.TuneSession())
    text = "\n".join(str(w.message) for w in said)
    unusable = {w.message.args[0].split()[4] for w in said if "cannot be used" in str(w.message)}
    assert unusable == {str(f) for f in files[:3]} and "timing again" in text, text
    assert "cannot be written" in text  # the folder in the way of the rewrite
    records = [r for rs in again.tuning.values() for r in rs]
    assert sum(1 for r in records if r.timed) >= 3 and any(r.cached for r in records)

    def choices(report):
        return [(r.op, r.shapes, r.impl, r.config) for rs in report.tuning.values() for r in rs]

    assert choices(again) == choices(first)
    assert json.loads(files[0].read_text())["impl"] in ("aten", "triton")  # rewritten


def test_an_unwritable_tuning_cache_is_a_warning_not_a_failed_compile(
    programs, fake_gpu, monkeypatch, tmp_path
):
    """A read-only home (or a file in the way): the write raised, and the compile failed after
    timing its first kernel."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    with pytest.warns(RuntimeWarning) as said:
        report = _tune_all(programs[:1], tune.TuneSession())
    unwritable = [w for w in said if "cannot be written" in str(w.message)]
    assert len(unwritable) == 1, [str(w.message) for w in said]  # once per compile
    assert "a_file" in str(unwritable[0].message)
    records = [r for rs in report.tuning.values() for r in rs]
    assert sum(1 for r in records if r.timed) >= 3


def test_two_pid_1_processes_write_through_other_temporary_files(
    programs, fake_gpu, monkeypatch, tmp_path
):
    """Two containers, both pid 1, sharing a cache volume: a temporary file named after the pid
    was one file for both, and their writes could interleave into a corrupt record."""
    written: dict[str, list[str]] = {}
    real = os.replace

    def spy(src, dst):
        written.setdefault(Path(dst).name, []).append(Path(src).name)
        return real(src, dst)

    monkeypatch.setattr(os, "getpid", lambda: 1)
    monkeypatch.setattr(os, "replace", spy)
    for container in ("a", "b"):  # the same keys, written twice
        monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path / container))
        _tune_all(programs[:1], tune.TuneSession())
    assert written and all(len(set(names)) == len(names) == 2 for names in written.values())
    assert not list((tmp_path / "a" / "tuning").glob("*tmp*"))  # no temporary file left
