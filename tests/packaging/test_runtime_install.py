"""`pip install kernl` is the runtime alone: a fresh virtual environment with kernl's own
install (torch from the local CPU wheel, triton, safetensors, msgpack, numpy) loads an
artifact compiled in CPU mode and serves calls, without transformers, click or Ray.

The venv is a plain one (no --system-site-packages): it sees nothing of the development
environment. kernl is installed from a copy of the sources with its declared dependencies
resolved by pip, so a compile-time package slipped into `dependencies` would show up here."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
import torch
import transformers as T
from safetensors.torch import load_file

import kernl.compiler
import kernl.runtime

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
# The local CPU build of torch, and what Triton's interpreter needs; nothing else is named:
# pip resolves the rest from kernl's own `dependencies`.
PINS = ["torch==2.13.0", "triton==3.6.0", "numpy<2.4"]


def run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, **kw)
    assert result.returncode == 0, (
        f"{cmd} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )
    return result


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["TRITON_INTERPRET"] = "1"
    return env


def test_declared_runtime_dependencies_hold_no_compile_extras():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {
        d.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower()
        for d in project["dependencies"]
    }
    assert names == {"torch", "triton", "safetensors", "msgpack", "numpy"}
    assert "transformers" not in names and "click" not in names
    assert any(d.startswith("ray[serve]") for d in project["optional-dependencies"]["serve"])


@pytest.mark.slow
def test_runtime_only_venv_loads_and_serves(tmp_path):
    torch.manual_seed(0)
    config = T.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=40,
    )
    artifact = tmp_path / "tiny.kernl"
    # Kernl's fused kernels included: Triton (a runtime dependency) runs them in the venv.
    kernl.compiler.compile(
        T.BertModel(config).eval(), "batch=1,2 seq=8", artifact, dtype="fp32", device="cpu"
    )

    start = time.perf_counter()
    src = tmp_path / "src"  # a copy, so building kernl writes nothing into the repository
    shutil.copytree(REPO / "kernl", src / "kernl", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    env = clean_env()
    run(pip + ["install", *PINS], env=env)
    run(pip + ["install", str(src), *PINS], env=env)
    setup_seconds = time.perf_counter() - start
    print(f"runtime-only venv built in {setup_seconds:.0f} s")

    listed = run(pip[:-1] + ["list", "--format=json"], env=env).stdout
    installed = {p["name"].lower() for p in json.loads(listed)}
    assert {"kernl", "torch", "triton", "safetensors", "msgpack", "numpy"} <= installed
    assert not installed & {"transformers", "click", "ray", "tokenizers", "huggingface-hub"}

    # Both console scripts are installed with the runtime: each names the extra it lacks.
    for script, args in (("kernl", ["inspect", str(artifact)]), ("kernl-compile", ["m"])):
        done = subprocess.run(
            [str(venv / "bin" / script), *args], capture_output=True, text=True, env=env
        )
        assert done.returncode == 2, done.stderr
        assert "pip install 'kernl[compile]'" in done.stderr and "Traceback" not in done.stderr

    out = tmp_path / "outputs.safetensors"
    result = run(
        [str(venv / "bin" / "python"), str(HERE / "runtime_only_call.py"), str(artifact), str(out)],
        env=env,
        cwd=tmp_path,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["absent"] == {"transformers": True, "click": True, "ray": True}
    assert report["heavy_modules_loaded"] == []
    assert Path(report["kernl_file"]).is_relative_to(venv), report["kernl_file"]

    got = load_file(str(out))
    model = kernl.runtime.load(artifact, device="cpu")
    expected = model(input_ids=torch.tensor([[5, 9, 14, 3, 7]]))
    for name, t in expected.items():
        torch.testing.assert_close(got[f"direct/{name}"], t, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[f"served0/{name}"], t[0], atol=2e-5, rtol=1e-4)
    short = model(input_ids=torch.tensor([[8, 8]]))
    torch.testing.assert_close(
        got["served1/last_hidden_state"], short.last_hidden_state[0], atol=2e-5, rtol=1e-4
    )
