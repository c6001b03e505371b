"""Crash-safe compiles: a compile killed at any point leaves either no artifact or the previous
complete one at the destination (never a partial one), and a re-run succeeds; a destination
without space or write access is refused before any tracing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import transformers as T
from click.testing import CliRunner

import kernl.compiler
from kernl.artifacts import ArtifactDestinationError, read_manifest, verify_artifact
from kernl.compiler.cli import compile_command

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=120,
    max_position_embeddings=80,
)
OLD_BUCKETS, NEW_BUCKETS = "batch=1 seq=8", "batch=1,2 seq=8"
ENV = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny-bert"
    T.BertModel(T.BertConfig(**SMALL)).save_pretrained(path)
    return path


def _buckets(dest: Path) -> list[tuple[int, int]]:
    return [(b.batch, b.seq) for b in verify_artifact(dest).bucket_list()]


def _compile_killed_after(model_dir: Path, dest: Path, lines: int) -> bool:
    """Run kernl-compile and SIGKILL it after `lines` progress lines; True if it finished
    before that."""
    return _compile_signalled_after(model_dir, dest, lines, signal.SIGKILL) == 0


def _compile_signalled_after(model_dir: Path, dest: Path, lines: int, sig: int) -> int:
    """Run kernl-compile, send it `sig` after `lines` progress lines, and return its exit
    status."""
    cmd = [
        sys.executable,
        "-m",
        "kernl.compiler",
        str(model_dir),
        "-o",
        str(dest),
        "--buckets",
        NEW_BUCKETS,
        "--device",
        "cpu",
        "--dtype",
        "fp32",
    ]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV
    )
    seen = 0
    for line in proc.stderr:
        if line.startswith("["):
            seen += 1
        if seen == lines:
            proc.send_signal(sig)
            break
    if sig != signal.SIGKILL:
        proc.stderr.read()  # what it says on its way out: a closed pipe would fail its writes
    proc.stderr.close()
    return proc.wait(timeout=300)


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


def test_killed_compiles_leave_nothing_or_the_previous_artifact(model_dir, tmp_path):
    dest = tmp_path / "bert.kernl"
    # Killed while loading the model, with nothing there before: still nothing there.
    assert not _compile_killed_after(model_dir, dest, lines=1)
    assert not dest.exists()

    kernl.compiler.compile(model_dir, OLD_BUCKETS, dest, dtype="fp32", device="cpu")
    old = _buckets(dest)
    # Killed in the first bucket, in the second, and while writing weights / committing.
    for lines in (3, 9, 14):
        finished = _compile_killed_after(model_dir, dest, lines)
        got = _buckets(dest)  # verify_artifact passes: never a partial artifact
        assert got == old or (got == [(1, 8), (2, 8)] and lines == 14), (lines, finished, got)
        if lines == 9:
            assert _leftovers(dest), "a compile killed mid-way leaves its temporary folder"

    # A re-run succeeds and removes what the killed runs left behind.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kernl.compiler",
            str(model_dir),
            "-o",
            str(dest),
            "--buckets",
            NEW_BUCKETS,
            "--device",
            "cpu",
            "--dtype",
            "fp32",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert _buckets(dest) == [(1, 8), (2, 8)]
    assert _leftovers(dest) == []


def test_a_terminated_compile_removes_its_partial_folder(model_dir, tmp_path):
    """SIGTERM (`docker stop`, a job runner's cancel) mid-compile ended the process at once
    and left the hidden partial folder that SIGKILL leaves (above); it now unwinds as Ctrl-C
    does, exit status 143, nothing left behind."""
    dest = tmp_path / "bert.kernl"
    assert _compile_signalled_after(model_dir, dest, 9, signal.SIGTERM) == 143
    assert not dest.exists()
    assert _leftovers(dest) == []


# Commit, step by step, in a child process that kills itself at one point of it.
_COMMIT_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from safetensors.torch import load_file
    import kernl.artifacts.writer as writer
    from kernl.artifacts import ArtifactWriter, read_manifest, read_program

    src, dest, point = sys.argv[1:]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    real_exchange, real_rename, renames = writer._exchange, os.rename, []
    if point == "before-exchange":
        writer._exchange = lambda a, b: die()
    elif point == "after-exchange":
        writer._exchange = lambda a, b: real_exchange(a, b) and die()
    elif point == "between-renames":  # a filesystem without an atomic exchange
        writer._exchange = lambda a, b: False
        def rename(a, b):
            renames.append(a)
            if len(renames) == 2:
                die()
            real_rename(a, b)
        writer.os.rename = rename
    manifest = read_manifest(src)
    manifest.model_config["marker"] = "new"
    w = ArtifactWriter(dest)
    for e in manifest.buckets:
        w.write_program(read_program(src, e.program))
    w.write_weights(load_file(os.path.join(src, "weights.safetensors")))
    w.commit(manifest)
    """
)


@pytest.mark.parametrize("point", ["before-exchange", "after-exchange", "between-renames"])
def test_kill_inside_commit(point, model_dir, tmp_path):
    src = tmp_path / "src.kernl"
    kernl.compiler.compile(model_dir, OLD_BUCKETS, src, dtype="fp32", device="cpu")
    dest = tmp_path / "bert.kernl"
    shutil.copytree(src, dest)
    proc = subprocess.run(
        [sys.executable, "-c", _COMMIT_SCRIPT, str(src), str(dest), point], env=ENV, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL
    if point == "between-renames":
        assert not dest.exists()  # the window a plain rename pair has...
        kernl.artifacts.writer.clean_stale(dest)  # ...which the next compile closes
    marker = verify_artifact(dest).model_config.get("marker")
    assert marker == ("new" if point == "after-exchange" else None)
    subprocess.run(
        [sys.executable, "-c", _COMMIT_SCRIPT, str(src), str(dest), "none"],
        env=ENV,
        check=True,
        timeout=300,
    )
    assert read_manifest(dest).model_config["marker"] == "new"
    assert _leftovers(dest) == []


@pytest.fixture
def full_disk(monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(
        shutil, "disk_usage", lambda _p: Usage(1 << 40, (1 << 40) - (1 << 20), 1 << 20)
    )


def test_full_disk_is_refused_before_tracing(model_dir, tmp_path, full_disk):
    progress: list[str] = []
    with pytest.raises(ArtifactDestinationError, match="not enough free space"):
        kernl.compiler.compile(
            model_dir,
            OLD_BUCKETS,
            tmp_path / "out",
            dtype="fp32",
            device="cpu",
            progress=progress.append,
        )
    assert not any("export" in line for line in progress), progress
    assert list(tmp_path.iterdir()) == []


def test_cli_says_why_it_cannot_write(model_dir, tmp_path, full_disk):
    result = CliRunner().invoke(
        compile_command,
        [
            str(model_dir),
            "-o",
            str(tmp_path / "out"),
            "--buckets",
            OLD_BUCKETS,
            "--device",
            "cpu",
            "--dtype",
            "fp32",
        ],
    )
    assert result.exit_code == 1
    assert "kernl-compile: error: not enough free space" in result.output
    assert "export" not in result.output
