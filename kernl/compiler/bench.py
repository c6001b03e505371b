"""`kernl bench`: a compiled artifact against the model it came from, on the same inputs.

Implementations: "kernl" (the artifact through `kernl.runtime.load`), and the peers "eager"
(the Hugging Face model in the artifact's dtype on the same device), "compile"
(torch.compile mode="reduce-overhead") and "max-autotune" (torch.compile mode="max-autotune").
Per shape and implementation: the first calls (compilation, graph capture) are timed as the
warm-up, then `warmup` more calls, then `iters` calls are timed one by one (CUDA events on a
GPU, perf_counter on the CPU); the report gives the median, p90 and sequences/s. kernl's cold
start is measured in a fresh process: import, load and the first call.

The work is a list of steps (`Bench.steps()`), run one at a time (`Bench.run(step)`), so the
CLI can show progress; torch.compile peers take minutes per shape."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kernl._version import __version__ as kernl_version
from kernl.artifacts import verify_artifact
from kernl.artifacts.compat import check_torch_version
from kernl.artifacts.schema import Bucket, Manifest

from .plural import count
from .trace import ALL_TASKS, GENERATION_TASKS

# What bench times: artifacts called as model(input_ids, ...) per bucket. The generation
# tasks' runtime models have generate() instead.
ENCODER_TASKS = tuple(t for t in ALL_TASKS if t not in GENERATION_TASKS)
PEERS = {"eager": None, "compile": "reduce-overhead", "max-autotune": "max-autotune"}
# Calls timed as the warm-up of each shape: torch.compile compiles on the first call and,
# with CUDA graphs, records on the next ones.
FIRST_CALLS = 3


class BenchError(ValueError):
    """A bench that cannot run as asked (bad shapes, model not found, ...)."""


class DeviceOptionError(BenchError):
    """--device is not one bench runs on (cpu, cuda, cuda:N): a usage error."""


def parse_device(text: str) -> torch.device:
    """--device: cpu, cuda or cuda:N (torch.device takes 20 other types bench has no use for)."""
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", text):
        raise DeviceOptionError(f"{text!r} is not cpu, cuda or cuda:N")
    return torch.device(text)


@dataclass
class BenchConfig:
    path: Path
    against: list[str] = field(default_factory=lambda: ["eager"])
    model: str | None = None  # default: the manifest's model_source
    shapes: list[Bucket] | None = None  # default: the artifact's buckets
    iters: int = 100
    warmup: int = 10
    device: str | None = None  # default: where the artifact was built for
    seed: int = 0
    cold_start: bool = True


@dataclass
class Step:
    impl: str  # "cold-start", "kernl" or a peer
    shape: Bucket | None = None

    @property
    def label(self) -> str:
        return (
            self.impl if self.shape is None else f"{self.impl} {self.shape.batch}x{self.shape.seq}"
        )


@dataclass
class Timing:
    impl: str
    batch: int
    seq: int
    times_ms: list[float]
    warmup_s: float  # wall time of the first FIRST_CALLS calls (compilation, capture)
    served_by: str | None = None  # kernl: the bucket that served this shape
    max_abs_diff_vs_eager: float | None = None  # first output, against the eager model

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p90_ms(self) -> float:
        return _percentile(self.times_ms, 90)

    @property
    def sequences_per_s(self) -> float:
        return self.batch * 1000.0 / self.median_ms

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            median_ms=self.median_ms,
            p90_ms=self.p90_ms,
            mean_ms=statistics.fmean(self.times_ms),
            min_ms=min(self.times_ms),
            sequences_per_s=self.sequences_per_s,
        )
        return d


def speed_text(speedup: float) -> str:
    """2.41x; small ratios keep two significant digits (0.0028x) instead of showing 0.00x."""
    return f"{speedup:.2f}x" if speedup >= 0.1 else f"{speedup:.2g}x"


def _percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def parse_shapes(text: str) -> list[Bucket]:
    """ "1x16,8x128" (explicit shapes) or "batch=1,8 seq=16:128" (the cartesian product): the
    bucket grammar of kernl-compile --buckets."""
    from .buckets import parse_buckets

    return parse_buckets(text)


class PeerSyntaxError(ValueError):
    """--against names no peer kernl bench knows (a usage error, as a bad --buckets is)."""


def parse_against(text: str) -> list[str]:
    names = [] if text.strip() in ("", "none") else [p.strip() for p in text.split(",")]
    if "" in names:
        raise PeerSyntaxError(f"{text!r} has an empty name; e.g. eager,compile, or none")
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise PeerSyntaxError(
            f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)} or none"
        )
    return list(dict.fromkeys(names))


@dataclass
class BenchResult:
    artifact: str
    model_source: str
    model_type: str
    task: str
    dtype: str
    device: str
    device_name: str
    date: str
    versions: dict[str, str | None]
    iters: int
    warmup: int
    kernl_load_s: float | None = None
    model_load_s: float | None = None
    cold_start: dict[str, float] | None = None
    timings: list[Timing] = field(default_factory=list)

    def impls(self) -> list[str]:
        return list(dict.fromkeys(t.impl for t in self.timings))

    def shapes(self) -> list[tuple[int, int]]:
        return list(dict.fromkeys((t.batch, t.seq) for t in self.timings))

    def timing(self, impl: str, batch: int, seq: int) -> Timing | None:
        for t in self.timings:
            if (t.impl, t.batch, t.seq) == (impl, batch, seq):
                return t
        return None

    def speedup(self, impl: str, batch: int, seq: int) -> float | None:
        """How many times faster kernl is than `impl` on this shape (median over median)."""
        k, p = self.timing("kernl", batch, seq), self.timing(impl, batch, seq)
        return None if k is None or p is None else p.median_ms / k.median_ms

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["timings"] = [t.to_json() for t in self.timings]
        d["speedups"] = {
            f"{b}x{s}": {i: self.speedup(i, b, s) for i in self.impls() if i != "kernl"}
            for b, s in self.shapes()
        }
        return d

    def table(self) -> str:
        head = (
            f"kernl bench: {self.artifact} ({self.model_type}, {self.task}, {self.dtype}) on "
            f"{self.device_name}; {count(self.iters, 'timed call')} after "
            f"{FIRST_CALLS}+{self.warmup} warm-up calls per shape"
        )
        cols = (
            f"{'shape':>8}  {'impl':<16} {'median ms':>10} {'p90 ms':>10} {'seq/s':>10} "
            f"{'warm-up s':>9} {'kernl speedup':>13} {'max|diff| eager':>15}"
        )
        lines = [head, "", cols, "-" * len(cols)]
        for b, s in self.shapes():
            for impl in self.impls():
                t = self.timing(impl, b, s)
                if t is None:
                    continue
                sp = self.speedup(impl, b, s)
                speed = "-" if impl == "kernl" or sp is None else speed_text(sp)
                diff = "-" if t.max_abs_diff_vs_eager is None else f"{t.max_abs_diff_vs_eager:.3g}"
                name = impl if t.served_by is None else f"{impl} ({t.served_by})"
                lines.append(
                    f"{f'{b}x{s}':>8}  {name:<16} {t.median_ms:10.3f} {t.p90_ms:10.3f} "
                    f"{t.sequences_per_s:10.1f} {t.warmup_s:9.2f} {speed:>13} {diff:>15}"
                )
        lines.append("")
        if self.kernl_load_s is not None:
            lines.append(f"kernl load in this process: {self.kernl_load_s:.2f} s")
        if self.cold_start:
            c = self.cold_start
            lines.append(
                f"kernl cold start in a fresh process: import {c['import_s']:.2f} s + load "
                f"{c['load_s']:.2f} s + first call {c['first_call_s']:.3f} s = {c['total_s']:.2f} s"
            )
        if self.model_load_s is not None:
            lines.append(f"peers: Hugging Face model load {self.model_load_s:.2f} s")
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items() if v))
        return "\n".join(lines)


COLD_START_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import kernl.runtime
t1 = time.perf_counter()
path, device, batch, seq, vocab = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
model = kernl.runtime.load(path, device=device)
cuda = device.startswith("cuda")
if cuda:
    torch.cuda.synchronize()
t2 = time.perf_counter()
ids = torch.randint(1, max(2, vocab), (batch, seq), device=device)
masked = any(s.name == "attention_mask" for s in model.manifest.inputs)
out = model(input_ids=ids, **({"attention_mask": torch.ones_like(ids)} if masked else {}))
if cuda:
    torch.cuda.synchronize()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_call_s": t3 - t2,
                  "total_s": t3 - t0}))
"""


def measure_cold_start(path: Path, device: str, shape: Bucket, vocab: int) -> dict[str, float]:
    """Import, load and first call of the artifact in a fresh Python process."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            COLD_START_SCRIPT,
            str(path),
            device,
            str(shape.batch),
            str(shape.seq),
            str(vocab),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start process failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_calls(fn: Callable[[], Any], iters: int, cuda: bool) -> list[float]:
    """Milliseconds of each of `iters` calls, one at a time (each call finishes before the
    next starts: latency, not pipelined throughput)."""
    times = []
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        torch.cuda.synchronize()
        for a, b in zip(starts, ends):
            a.record()
            fn()
            b.record()
            b.synchronize()
        return [a.elapsed_time(b) for a, b in zip(starts, ends)]
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def make_inputs(names: list[str], shape: Bucket, vocab: int, device, seed: int) -> dict:
    """Random token ids, full attention mask, zero token types: one set per shape, shared by
    every implementation."""
    g = torch.Generator().manual_seed(seed + shape.batch * 7919 + shape.seq)
    ids = torch.randint(min(3, vocab - 1), vocab, (shape.batch, shape.seq), generator=g)
    tensors = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
    }
    return {n: tensors[n].to(device) for n in names if n in tensors}


def _versions() -> dict[str, str | None]:
    import transformers
    import triton

    return {
        "kernl": kernl_version,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    """One bench run: construct (cheap checks), then `run` each of `steps()`, then `result`."""

    def __init__(self, config: BenchConfig):
        self.config = config
        # the checks load() makes that need no GPU, before any step: a damaged or incompatible
        # artifact was a cold-start child's traceback
        self.manifest: Manifest = verify_artifact(config.path)
        check_torch_version(self.manifest)
        m = self.manifest
        if m.task in GENERATION_TASKS:
            # Their runtime model generates (no bucketed forward to call): every step would
            # fail, after the Hugging Face model was loaded.
            raise BenchError(
                f"bench times encoder artifacts ({', '.join(ENCODER_TASKS)}); {config.path} is "
                f"a {m.task} artifact, whose generate() bench does not time"
            )
        if config.device is None:
            device = "cuda" if m.target == "cuda" else "cpu"
            self.device = torch.device(device)
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise BenchError(
                    f"the artifact targets {device} but torch sees no CUDA GPU; "
                    "pass --device cpu for an aten-only artifact"
                )
        else:
            try:
                self.device = parse_device(config.device)
            except DeviceOptionError as e:  # the CLI's callback already names the option
                raise DeviceOptionError(f"--device {e}") from None
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if self.device.type == "cuda" and (self.device.index or 0) >= count:
                seen = (
                    f"{count} CUDA GPU(s), cuda:0 to cuda:{count - 1}" if count else "no CUDA GPU"
                )
                hint = (
                    ""
                    if m.target == "cuda"
                    else f"; the artifact targets {m.target}: pass --device {m.target}"
                )
                raise BenchError(
                    f"--device {config.device} was asked for but torch sees {seen}{hint}"
                )
        self.cuda = self.device.type == "cuda"
        self.dtype = getattr(torch, m.dtype)
        buckets = m.bucket_list()
        self.shapes = list(config.shapes or sorted(buckets))
        too_big = [s for s in self.shapes if not any(b.holds(s.batch, s.seq) for b in buckets)]
        if too_big:
            have = ", ".join(f"{b.batch}x{b.seq}" for b in sorted(buckets))
            bad = ", ".join(f"{s.batch}x{s.seq}" for s in too_big)
            raise BenchError(
                f"shape(s) {bad} are larger than every bucket of the artifact ({have})"
            )
        if config.iters < 1 or config.warmup < 0:
            raise BenchError("--iters must be at least 1 and --warmup at least 0")
        self.input_names = [s.name for s in m.inputs]
        self.vocab = int(m.model_config.get("vocab_size") or 2)
        self.inputs = {
            s: make_inputs(self.input_names, s, self.vocab, self.device, config.seed)
            for s in self.shapes
        }
        self._kernl = None
        self._hf = None
        self._reference: dict[Bucket, torch.Tensor] = {}
        name = torch.cuda.get_device_name(self.device) if self.cuda else _cpu_name()
        self.result = BenchResult(
            artifact=str(config.path),
            model_source=self.model_source(),
            model_type=m.model_type,
            task=m.task,
            dtype=m.dtype,
            device=str(self.device),
            device_name=name,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            versions=_versions(),
            iters=config.iters,
            warmup=config.warmup,
        )

    def steps(self) -> list[Step]:
        # Shape by shape, every implementation in turn: a run cut short still compares
        # every implementation on the shapes it finished.
        steps = [Step("cold-start")] if self.config.cold_start else []
        for s in self.shapes:
            steps += [Step(impl, s) for impl in ["kernl", *self.config.against]]
        return steps

    def model_source(self) -> str:
        """The peers' model: --model, else the manifest's model_source; a local folder as an
        absolute path, so the result records which folder was used."""
        source = self.config.model or self.manifest.model_source
        local = Path(source).expanduser()
        return os.path.abspath(local) if (local / "config.json").is_file() else source

    def relative_source_note(self) -> str | None:
        """A note when the peers' model is the manifest's relative model_source (artifacts
        compiled before kernl recorded absolute paths): which folder it names depends on the
        directory the bench runs in."""
        recorded = self.manifest.model_source
        if self.config.model or not self.config.against or os.path.isabs(recorded):
            return None
        if self.model_source() == recorded:  # a model id of the Hugging Face cache
            return None
        return (
            f"the manifest records the model folder as the relative path {recorded!r}; "
            f"comparing against {self.model_source()} (pass --model to choose another)"
        )

    def check_model(self) -> None:
        """Fail before any timing if peers are asked for and the model cannot be found."""
        if not self.config.against:
            return
        source = self.model_source()
        if not (Path(source).expanduser() / "config.json").is_file() and not _in_hf_cache(source):
            where = (
                f"--model {source!r} is"
                if self.config.model
                else f"the manifest says it came from {source!r}, which is"
            )
            raise BenchError(
                f"peers need the original model; {where} not a local model folder nor in the "
                "local Hugging Face cache: pass --model DIR"
            )
        self._check_config(source)

    def _check_config(self, source: str) -> None:
        """The peer model must be the one the artifact was compiled from: its config's shape
        fields (model type, vocabulary, widths, depth, labels) must equal those the manifest
        recorded. Another ./bert, or a model of another size, would be timed and compared
        against kernl for nothing (or fail on the first call, after kernl was timed)."""
        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as e:
            raise BenchError(f"cannot read the config of the model {source!r}: {e}") from None
        recorded = _shape_fields(self.manifest.model_config or {})
        peer = _shape_fields(config.to_dict())
        differ = [
            f"{k} {peer.get(k)!r} (the artifact's: {v!r})"
            for k, v in recorded.items()
            if peer.get(k) != v
        ]
        if differ:
            what = f"--model {source!r}" if self.config.model else f"the model at {source!r}"
            raise BenchError(
                f"{what} is not the model the artifact {str(self.config.path)!r} was compiled "
                f"from (manifest model_source {self.manifest.model_source!r}): "
                f"{'; '.join(differ)}. Pass --model with the original model's folder"
            )

    def run(self, step: Step) -> Timing | None:
        if step.impl == "cold-start":
            smallest = min(self.shapes, key=lambda s: (s.tokens, s.batch))
            self.result.cold_start = measure_cold_start(
                self.config.path, str(self.device), smallest, self.vocab
            )
            return None
        fn, served_by = self._callable(step.impl, step.shape)
        timing = self._measure(step.impl, step.shape, fn)
        timing.served_by = served_by
        self.result.timings.append(timing)
        return timing

    def _measure(self, impl: str, shape: Bucket, fn: Callable[[], Any]) -> Timing:
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(FIRST_CALLS):
                out = fn()
            _sync(self.device)
            warmup_s = time.perf_counter() - t0
            diff = self._diff(shape, out)
            for _ in range(self.config.warmup):
                fn()
            times = time_calls(fn, self.config.iters, self.cuda)
        return Timing(impl, shape.batch, shape.seq, times, warmup_s, max_abs_diff_vs_eager=diff)

    def _diff(self, shape: Bucket, out: Any) -> float | None:
        ref = self._eager_reference(shape)
        if ref is None:
            return None
        got = out[self.manifest.outputs[0].name]
        return (got.float() - ref).abs().max().item()

    def _eager_reference(self, shape: Bucket) -> torch.Tensor | None:
        if self._hf is None:
            return None
        if shape not in self._reference:
            with torch.no_grad():
                out = self._hf(**self.inputs[shape])
            self._reference[shape] = out[self.manifest.outputs[0].name].float().clone()
        return self._reference[shape]

    def _callable(self, impl: str, shape: Bucket) -> tuple[Callable[[], Any], str | None]:
        x = self.inputs[shape]
        if self.config.against and self._hf is None:
            self._load_hf()
        if impl == "kernl":
            model = self._load_kernl()
            b = model.select_bucket(shape.batch, shape.seq)
            return (lambda: model(**x)), f"{b.batch}x{b.seq}"
        mode = PEERS[impl]
        if mode is None:
            return (lambda: self._hf(**x)), None
        # One fresh compilation per shape (static shapes, as kernl's buckets): the first calls
        # of _measure then time this shape's compilation and CUDA-graph recording.
        torch._dynamo.reset()
        compiled = torch.compile(self._hf, mode=mode, dynamic=False)
        return (lambda: compiled(**x)), None

    def _load_kernl(self):
        if self._kernl is None:
            import kernl.runtime

            t0 = time.perf_counter()
            self._kernl = kernl.runtime.load(self.config.path, device=self.device)
            _sync(self.device)
            self.result.kernl_load_s = time.perf_counter() - t0
        return self._kernl

    def _load_hf(self) -> None:
        from .trace import load_model

        self.check_model()
        source = self.model_source()
        t0 = time.perf_counter()
        self._hf, _, _ = load_model(source, self.manifest.task, self.dtype, self.device)
        _sync(self.device)
        self.result.model_load_s = time.perf_counter() - t0


# Config fields that fix the shapes of a model's weights, inputs and outputs: equal in the
# artifact's recorded config and the peer's, or the peer is another model.
_SHAPE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "d_model",
    "num_layers",
    "num_decoder_layers",
    "encoder_layers",
    "decoder_layers",
    "n_embd",
    "n_layer",
    "n_head",
    "n_positions",
)


def _shape_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The _SHAPE_FIELDS a config (as a dict) has, and its number of labels."""
    out = {k: config[k] for k in _SHAPE_FIELDS if k in config}
    if isinstance(config.get("id2label"), dict):
        out["num_labels"] = len(config["id2label"])
    return out


def _in_hf_cache(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:
        return False


def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} cores)"


def plot(result: BenchResult, out: str | os.PathLike) -> None:
    """Latency (median, with the p90 as an error bar) per shape for every implementation."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes, impls = result.shapes(), result.impls()
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(shapes) + 2), 4.8))
    for i, impl in enumerate(impls):
        timed = [(j, t) for j, sh in enumerate(shapes) if (t := result.timing(impl, *sh))]
        xs = [j + (i - (len(impls) - 1) / 2) * width for j, _ in timed]
        med = [t.median_ms for _, t in timed]
        above = [t.p90_ms - t.median_ms for _, t in timed]
        ax.bar(xs, med, width, yerr=[[0] * len(above), above], capsize=2, label=impl)
        if impl == "kernl":
            continue
        for x, (_, t) in zip(xs, timed):
            sp = result.speedup(impl, t.batch, t.seq)
            if sp is not None:  # above the p90 whisker, so the two never overlap
                ax.annotate(
                    speed_text(sp),
                    (x, t.p90_ms),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([f"{b}x{s}" for b, s in shapes])
    ax.set_xlabel("batch x sequence length")
    ax.set_ylabel("latency, median ms (log scale; bar tip to whisker: p90)")
    ax.set_yscale("log")
    ax.set_title(
        f"kernl bench: {result.model_type} {result.dtype} on {result.device_name}, "
        f"{result.date[:10]}\n(labels: kernl's speedup over that peer)",
        fontsize=9,
    )
    ax.legend()
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
