"""The `kernl` click group: compile, verify, inspect, bench and serve are all there;
`kernl compile` is `kernl-compile`; `kernl serve` hands its arguments to kernl.serving."""

import subprocess
import sys
import types

import torch
import transformers as T
from click.testing import CliRunner

import kernl.runtime
from kernl.compiler.cli import compile_command, main

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=120,
    max_position_embeddings=80,
)


def test_group_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("compile", "verify", "inspect", "bench", "serve"):
        assert f"  {name} " in result.output, name
    bench_help = CliRunner().invoke(main, ["bench", "--help"]).output
    for option in ("--against", "--model", "--buckets", "--iters", "--warmup", "--plot", "--json"):
        assert option in bench_help, option


def test_compile_then_verify_then_inspect(tmp_path):
    torch.manual_seed(1)
    T.BertModel(T.BertConfig(**SMALL)).save_pretrained(tmp_path / "m")
    out = tmp_path / "m.kernl"
    runner = CliRunner()
    compiled = runner.invoke(
        main,
        [
            "compile",
            str(tmp_path / "m"),
            "-o",
            str(out),
            "--buckets",
            "batch=1 seq=8",
            "--dtype",
            "fp32",
            "--device",
            "cpu",
        ],
    )
    assert compiled.exit_code == 0, compiled.output
    assert "1x8" in compiled.stdout
    verified = runner.invoke(main, ["verify", str(out)])
    assert verified.exit_code == 0 and verified.output.startswith(f"OK {out}")
    assert ", 1 bucket, " in verified.output  # not "1 buckets"
    inspected = runner.invoke(main, ["inspect", str(out)])
    assert inspected.exit_code == 0 and "bert (BertModel)" in inspected.output
    ids = torch.randint(1, 120, (1, 5))
    assert kernl.runtime.load(out, device="cpu")(input_ids=ids).last_hidden_state.shape == (
        1,
        5,
        64,
    )


def test_kernl_compile_entry_point_still_works():
    result = CliRunner().invoke(compile_command, ["--help"], prog_name="kernl-compile")
    assert result.exit_code == 0 and "--buckets" in result.output


def test_serve_forwards_every_argument(monkeypatch):
    seen = []
    fake = types.ModuleType("kernl.serving.cli")
    fake.serve_main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "kernl.serving.cli", fake)
    args = ["bert.kernl", "--port", "8080", "--replicas", "2", "--help"]
    result = CliRunner().invoke(main, ["serve", *args])
    assert seen == [args]
    assert result.exit_code == 3  # serve_main's return code is the exit status


def test_serve_without_the_serving_package_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "kernl.serving.cli", None)  # import raises ImportError
    result = CliRunner().invoke(main, ["serve", "bert.kernl"])
    assert result.exit_code == 1
    assert "kernl.serving is not available" in result.output and "kernl[serve]" in result.output


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "kernl.compiler.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "bench" in proc.stdout
