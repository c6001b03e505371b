"""`kernl bench` on a tiny BERT compiled in CPU mode against eager: the figures are real
measurements of the right shapes, the same inputs reach both implementations, the table,
JSON and plot agree."""

import json
import math
import statistics
import sys
import time

import numpy as np
import pytest
import torch
import transformers as T
from click.testing import CliRunner

import kernl.compiler
from kernl.artifacts.schema import Bucket
from kernl.compiler.bench import _percentile, parse_against, parse_shapes, time_calls
from kernl.compiler.cli import main

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=120,
    max_position_embeddings=80,
)
ITERS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    T.BertModel(T.BertConfig(**SMALL)).save_pretrained(root / "bert")
    return root / "bert"


@pytest.fixture(scope="module")
def artifact(model_dir):
    out = model_dir.parent / "bert.kernl"
    kernl.compiler.compile(str(model_dir), "batch=1,2 seq=8,16", out, dtype="fp32", device="cpu")
    return out


@pytest.fixture(scope="module")
def bench_run(artifact, tmp_path_factory):
    """One real run, shared by the tests that read its table, JSON and plot."""
    out = tmp_path_factory.mktemp("bench_out")
    args = [
        "bench",
        str(artifact),
        "--against",
        "eager",
        "--iters",
        str(ITERS),
        "--warmup",
        "1",
        "--buckets",
        "1x8,2x12",
        "--json",
        str(out / "b.json"),
    ]
    has_mpl = _has_matplotlib()
    if has_mpl:
        args += ["--plot", str(out / "b.png")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result, out, has_mpl


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_json_holds_real_measurements_of_the_asked_shapes(bench_run):
    _, out, _ = bench_run
    d = json.loads((out / "b.json").read_text())
    assert d["device"] == "cpu" and d["dtype"] == "float32" and d["iters"] == ITERS
    rows = {(t["impl"], t["batch"], t["seq"]): t for t in d["timings"]}
    assert set(rows) == {(i, b, s) for i in ("kernl", "eager") for b, s in ((1, 8), (2, 12))}
    for (impl, b, _s), t in rows.items():
        assert len(t["times_ms"]) == ITERS
        assert all(_finite_positive(x) for x in t["times_ms"])
        assert len(set(t["times_ms"])) > 1, "identical timings are not measurements"
        assert t["median_ms"] == pytest.approx(statistics.median(t["times_ms"]))
        assert min(t["times_ms"]) <= t["median_ms"] <= t["p90_ms"] <= max(t["times_ms"])
        assert t["sequences_per_s"] == pytest.approx(b * 1000 / t["median_ms"])
        assert _finite_positive(t["warmup_s"])
        # Same inputs for both: kernl matches eager, eager matches itself exactly.
        assert t["max_abs_diff_vs_eager"] < (1e-4 if impl == "kernl" else 1e-12)
    assert rows[("kernl", 1, 8)]["served_by"] == "1x8"
    assert rows[("kernl", 2, 12)]["served_by"] == "2x16"  # padded into the next bucket up
    for shape, speedups in d["speedups"].items():
        b, s = map(int, shape.split("x"))
        want = rows[("eager", b, s)]["median_ms"] / rows[("kernl", b, s)]["median_ms"]
        assert speedups["eager"] == pytest.approx(want)
    cold = d["cold_start"]
    assert all(_finite_positive(cold[k]) for k in ("import_s", "load_s", "first_call_s"))
    assert cold["total_s"] == pytest.approx(
        cold["import_s"] + cold["load_s"] + cold["first_call_s"]
    )
    assert _finite_positive(d["kernl_load_s"]) and _finite_positive(d["model_load_s"])


def test_table_shows_every_row_and_its_speedup(bench_run):
    result, out, _ = bench_run
    d = json.loads((out / "b.json").read_text())
    table = result.stdout
    assert "kernl bench:" in table and "kernl cold start in a fresh process" in table
    for t in d["timings"]:
        row = next(
            ln
            for ln in table.splitlines()
            if ln.split()[:2] == [f"{t['batch']}x{t['seq']}", t["impl"]]
        )
        assert f"{t['median_ms']:.3f}" in row and f"{t['p90_ms']:.3f}" in row
        if t["impl"] == "eager":
            sp = d["speedups"][f"{t['batch']}x{t['seq']}"]["eager"]
            assert (f"{sp:.2f}x" if sp >= 0.1 else f"{sp:.2g}x") in row
    assert "[5/5] eager 2x12" in result.stderr  # progress, one line per step off a terminal


def test_plot_is_written(bench_run):
    _, out, has_mpl = bench_run
    if not has_mpl:
        pytest.skip("matplotlib is not installed")
    data = (out / "b.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_without_matplotlib_fails_before_measuring(artifact, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(main, ["bench", str(artifact), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 2 and "--plot needs matplotlib" in result.output
    assert "cold-start" not in result.output


def test_a_plot_name_without_an_image_format_fails_before_measuring(artifact, tmp_path):
    """`--plot bench.xyz` printed a traceback after the whole run; `--plot bench` wrote
    bench.png and said it wrote `bench` (review)."""
    pytest.importorskip("matplotlib")
    for name in ("p.xyz", "p"):
        result = CliRunner().invoke(main, ["bench", str(artifact), "--plot", str(tmp_path / name)])
        assert result.exit_code == 2 and "names no image format" in result.output
        assert ".png" in result.output and "cold-start" not in result.output


def test_model_not_found_asks_for_model_and_model_option_works(model_dir, tmp_path):
    # Compiled from an in-memory model: the manifest records no folder to reload.
    model = T.BertModel.from_pretrained(model_dir)
    out = tmp_path / "mem.kernl"
    kernl.compiler.compile(model, "batch=1 seq=8", out, dtype="fp32", device="cpu")
    quick = ["--iters", "2", "--warmup", "0", "--no-cold-start"]
    result = CliRunner().invoke(main, ["bench", str(out), *quick])
    assert result.exit_code == 1 and "pass --model DIR" in result.output
    result = CliRunner().invoke(main, ["bench", str(out), "--model", str(model_dir), *quick])
    assert result.exit_code == 0, result.output
    assert "kernl (1x8)" in result.stdout and "eager" in result.stdout


def test_bad_arguments_are_clear_errors(artifact):
    run = lambda *a: CliRunner().invoke(main, ["bench", str(artifact), *a])
    too_big = run("--buckets", "4x8", "--against", "none")
    assert too_big.exit_code == 1 and "larger than every bucket" in too_big.output
    assert "1x8, 1x16, 2x8, 2x16" in too_big.output
    assert run("--buckets", "8by8").exit_code == 2
    # a bad --against is a usage error naming the option, as a bad --buckets is
    peer = run("--against", "eager,jit")
    assert peer.exit_code == 2 and "unknown peer(s) jit" in peer.output, peer.output
    assert "--against" in peer.output
    empty = run("--against", ",")
    assert empty.exit_code == 2 and "empty name" in empty.output, empty.output


def test_parsers():
    assert parse_shapes("1x16, 8x128,1x16") == [Bucket(1, 16), Bucket(8, 128)]
    assert parse_shapes("batch=1,2 seq=8") == [Bucket(1, 8), Bucket(2, 8)]
    assert parse_against("eager,compile,max-autotune") == ["eager", "compile", "max-autotune"]
    assert parse_against("none") == []


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        xs = rng.random(n).tolist()
        for q in (50, 90):
            assert _percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def test_time_calls_measures_the_call_on_cpu():
    times = time_calls(lambda: time.sleep(0.003), 3, cuda=False)
    assert len(times) == 3 and all(3.0 <= t < 200 for t in times)


QUICK = ["--iters", "1", "--warmup", "0", "--no-cold-start", "--buckets", "1x8"]


def test_a_model_of_another_shape_is_refused_before_timing(model_dir, artifact, tmp_path):
    # It was timed against kernl first, then crashed with a raw IndexError in the embedding.
    torch.manual_seed(0)
    other = tmp_path / "bert48"
    T.BertModel(T.BertConfig(**{**SMALL, "hidden_size": 48, "vocab_size": 50})).save_pretrained(
        other
    )
    result = CliRunner().invoke(main, ["bench", str(artifact), "--model", str(other), *QUICK])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "kernl bench: error:" in result.output and str(other) in result.output
    assert str(model_dir) in result.output  # the artifact's model, named too
    assert "hidden_size 48 (the artifact's: 64)" in result.output
    assert "vocab_size 50 (the artifact's: 120)" in result.output
    assert "kernl 1x8" not in result.output  # nothing was timed


def test_a_local_model_folder_is_recorded_as_an_absolute_path(model_dir, tmp_path, monkeypatch):
    # Recorded as typed ("bert"), bench run elsewhere compared against whatever ./bert was there.
    monkeypatch.chdir(model_dir.parent)
    out = tmp_path / "rel.kernl"
    kernl.compiler.compile("bert", "batch=1 seq=8", out, dtype="fp32", device="cpu", kernels=False)
    from kernl.artifacts import read_manifest

    assert read_manifest(out).model_source == str(model_dir)
    monkeypatch.chdir(tmp_path)  # no ./bert here: bench still finds the model
    result = CliRunner().invoke(main, ["bench", str(out), *QUICK])
    assert result.exit_code == 0, result.output
    assert "eager" in result.stdout and "note:" not in result.output


def test_json_into_a_missing_folder_fails_before_measuring(artifact, tmp_path):
    target = tmp_path / "missing" / "b.json"
    result = CliRunner().invoke(main, ["bench", str(artifact), "--json", str(target), *QUICK])
    assert result.exit_code == 2, result.output
    assert "--json" in result.output and "does not exist" in result.output
    assert "kernl 1x8" not in result.output


@pytest.fixture(scope="module")
def generation_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("generation")
    torch.manual_seed(0)
    gpt2 = T.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=97,
                        pad_token_id=0, eos_token_id=None, bos_token_id=None)  # fmt: skip
    T.GPT2LMHeadModel(gpt2).eval().save_pretrained(root / "gpt2")
    t5 = T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                    num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    T.T5ForConditionalGeneration(t5).eval().save_pretrained(root / "t5")
    cpu = dict(dtype="fp32", device="cpu", kernels=False)
    kernl.compiler.compile(str(root / "gpt2"), "batch=1 prompt=8 cache=16", root / "g", **cpu)
    kernl.compiler.compile(str(root / "t5"), "batch=1 source=8 cache=4", root / "s", **cpu)
    return {"causal-lm": root / "g", "seq2seq-lm": root / "s"}


@pytest.mark.parametrize("task", ["causal-lm", "seq2seq-lm"])
@pytest.mark.parametrize("cold_start", ["--cold-start", "--no-cold-start"])
def test_a_generation_artifact_is_refused_up_front(generation_artifacts, task, cold_start):
    # The cold start failed with a child's traceback, --no-cold-start with an uncaught
    # AttributeError after the Hugging Face model was loaded.
    path = generation_artifacts[task]
    result = CliRunner().invoke(main, ["bench", str(path), "--iters", "1", cold_start])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.output == (
        "kernl bench: error: bench times encoder artifacts (base, sequence-classification, "
        f"token-classification, masked-lm, question-answering); {path} is a {task} artifact, "
        "whose generate() bench does not time\n"
    )
    help_text = " ".join(CliRunner().invoke(main, ["bench", "--help"]).output.split())
    assert "Measure an encoder artifact" in help_text
    assert "causal-lm, seq2seq-lm and speech-seq2seq artifacts are refused" in help_text


@pytest.mark.parametrize("device", ["bogus", "cuda:x", "cpu:0", "mps", "cuda:"])
def test_a_device_bench_does_not_run_on_is_a_usage_error(artifact, device):
    # torch's own message listed 20 device types, without naming --device.
    result = CliRunner().invoke(main, ["bench", str(artifact), "--device", device, *QUICK])
    assert result.exit_code == 2, result.output
    assert "'--device'" in result.output and "is not cpu, cuda or cuda:N" in result.output
    assert "ipu" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_gpu_asked_for_without_one_blames_the_option_not_the_artifact(artifact, device):
    # It said "the artifact targets cuda:1" of a CPU artifact.
    result = CliRunner().invoke(main, ["bench", str(artifact), "--device", device, *QUICK])
    assert result.exit_code == 1, result.output
    assert result.output == (
        f"kernl bench: error: --device {device} was asked for but torch sees no CUDA GPU; the "
        "artifact targets cpu: pass --device cpu\n"
    )


@pytest.mark.parametrize("cold_start", ["--cold-start", "--no-cold-start"])
def test_a_damaged_artifact_is_one_line_before_any_step(artifact, tmp_path, cold_start):
    """One byte flipped in the weights: the cold start (the first step) failed with its child
    process's traceback."""
    import shutil

    broken = tmp_path / "broken.kernl"
    shutil.copytree(artifact, broken)
    weights = broken / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    args = ["--iters", "1", "--warmup", "0", "--buckets", "1x8", cold_start]
    result = CliRunner().invoke(main, ["bench", str(broken), *args])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("kernl bench: error: ")
    assert "sha256" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
