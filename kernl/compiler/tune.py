"""Choose an implementation for every kernl instruction of a bucket's program.

On a GPU each instruction is benchmarked, on its real input shapes, over the Triton kernel's
tuning space plus the aten implementation; the fastest wins. Results are cached on disk,
keyed by GPU, toolchain versions, kernel source, op, shapes and attributes, so a recompile
does not re-tune, and an instance whose shapes another bucket already had is not timed again
(linear and layer_norm are described by their [rows, K] shapes, see ROWS_OPS). A candidate
that fails to compile is skipped and counted; its compiler output goes to the error list,
not to the terminal (KERNL_VERBOSE=1 shows it). On the CPU (interpreter) every instruction takes the kernel's default
config: there is nothing meaningful to time."""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import json
import os
import secrets
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton

from kernl.artifacts.program import Program
from kernl.artifacts.schema import KernelBinary
from kernl.runtime import kernl_ops
from kernl.runtime.binaries import allow_jit, key_digest
from kernl.runtime.executor import Executor

from .compile_ahead import compile_ahead, compile_threads

# kernl op -> (kernel module under kernl.kernels, function listing its configs as dicts)
TUNABLE = {
    "kernl.linear": ("fused_linear", "linear_configs"),
    "kernl.layer_norm": ("norm", "norm_configs"),
    "kernl.attention": ("attention", "attention_configs"),
    "kernl.bert_embeddings": ("bert_embeddings", "bert_embeddings_configs"),
    "kernl.rotary": ("rotary", "rotary_configs"),
    "kernl.gated_linear": ("gated_mlp", "gated_mlp_configs"),
}


# the cache folder of the compile running in this context: kernl.optimize's cache_dir= (see
# cache_root_of); None: the environment's
_CACHE_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "kernl_cache_root", default=None
)


def cache_root() -> Path:
    """kernl's cache folder: the one of the kernl.optimize call compiling in this context (its
    cache_dir=), else $KERNL_CACHE_DIR, else ~/.cache/kernl. The tuning cache lives in its
    `tuning/` subfolder, kernl.optimize's compiled models in `models/`."""
    given = _CACHE_ROOT.get()
    if given is not None:
        return given
    # an empty value is unset: not the working directory
    given = os.environ.get("KERNL_CACHE_DIR")
    try:
        return Path(given).expanduser() if given else Path.home() / ".cache" / "kernl"
    except RuntimeError:  # HOME unset and a uid without a passwd entry (docker run --user N)
        raise NoCacheFolderError(
            "kernl's cache folder is ~/.cache/kernl by default, and this process has no home "
            "folder (HOME is unset and its user has none): set KERNL_CACHE_DIR to a writable "
            "folder (or pass kernl.optimize a cache_dir=)"
        ) from None


class NoCacheFolderError(RuntimeError):
    """No KERNL_CACHE_DIR and no home folder to put ~/.cache/kernl in."""


def cache_dir() -> Path:
    """The tuning cache's folder (both tuners': this one's and the decode tiles')."""
    return cache_root() / "tuning"


@contextmanager
def cache_root_of(root: str | os.PathLike) -> Iterator[None]:
    """Within the block (this thread or task only) the tuning cache lives under `root`:
    kernl.optimize(cache_dir=...) compiles in it, so that tuning results go where its models
    go, not to $KERNL_CACHE_DIR or the home folder (read-only in many containers)."""
    token = _CACHE_ROOT.set(Path(root).expanduser())
    try:
        yield
    finally:
        _CACHE_ROOT.reset(token)


@dataclass
class TuneRecord:
    index: int
    op: str
    shapes: str
    impl: str
    config: dict[str, Any] | None
    time_us: float | None
    aten_time_us: float | None
    cached: bool = False
    errors: list[str] = field(default_factory=list)
    approximation: str | None = None  # e.g. erf GELU run as cuBLASLt's tanh-GELU epilogue
    timed: int = 0  # candidates benchmarked for this record (0: cached or untimed)


def verbose_compiler() -> bool:
    """KERNL_VERBOSE=1: failing candidates' compiler output reaches the terminal."""
    return os.environ.get("KERNL_VERBOSE", "") == "1"


@dataclass
class TuneSession:
    """What the tuning of one compile shares across its buckets. Kernel instances of equal
    shapes share one tuning already (the disk cache, keyed by shapes); a config that failed to
    compile for an op and signature is not compiled again for another shape, since what made
    it fail (the config, the dtypes, the epilogue) is the same."""

    failed: dict[str, str] = field(default_factory=dict)  # failure key -> its error
    # Threads compiling an instruction's candidates before they are timed (compile_ahead.py)
    compile_threads: int = field(default_factory=compile_threads)
    compiled_ahead: int = 0  # candidates submitted to them
    source_hashes: dict[str, str] = field(default_factory=dict)  # kernel module -> hash
    verbose: bool = field(default_factory=verbose_compiler)
    # the split-K linears' arrival counters while they are timed, one buffer per device (a
    # program shares one: compiler/passes/split_k_counters.py)
    counters: dict[str, torch.Tensor] = field(default_factory=dict)
    cache_unwritable: bool = False  # a write to the tuning cache failed (warned once)

    def counters_on(self, device: torch.device) -> torch.Tensor:
        from kernl.kernels.skinny_linear_fused import new_counters

        key = str(device)
        if key not in self.counters:
            self.counters[key] = new_counters(device)
        return self.counters[key]

    def source_hash(self, module: str) -> str:
        """The kernel's source hash of the cache key, read once per compile."""
        if module not in self.source_hashes:
            self.source_hashes[module] = _kernel_source_hash(module)
        return self.source_hashes[module]


# Ops whose kernels (and aten paths) see a contiguous [..., K] tensor as [rows, K]: the
# instance of batch 8 x seq 16 is the one of 1 x 128, and is tuned once.
ROWS_OPS = ("kernl.linear", "kernl.layer_norm")


def _describe(values: list[Any], rows: bool = False) -> str:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            shape, stride = list(v.shape), list(v.stride())
            if rows and v.dim() > 2 and v.is_contiguous():
                shape = [v.numel() // shape[-1], shape[-1]]
                stride = [shape[-1], 1]
            out.append(f"{str(v.dtype).removeprefix('torch.')}{shape}s{stride}")
        else:
            out.append(repr(v))
    return ",".join(out)


def _failure_key(op: str, config: dict[str, Any], values: list[Any]) -> str:
    """What a compile failure of `config` depends on: the op, the config, the dtypes and the
    non-tensor arguments (activation, eps, ...), not the sizes."""
    described = [
        str(v.dtype) if isinstance(v, torch.Tensor) else repr(v) for v in values if v is not None
    ]
    return json.dumps([op, sorted(config.items()), described], default=str)


@contextmanager
def quiet_native_stderr(verbose: bool = False) -> Iterator[list[str]]:
    """Within the block, whatever is written to file descriptor 2 (Triton's MLIR passes write
    their crash dumps there from C++, past Python's sys.stderr) goes to a temporary file; the
    yielded list then holds its text. verbose=True leaves stderr alone. The redirection is of
    the process (fd 2): only for the short compile-and-time of one tuning candidate."""
    captured: list[str] = []
    try:
        saved = None if verbose else os.dup(2)
    except OSError:  # no fd 2 to redirect (a daemon): nothing can reach the user either
        saved = None
    if saved is None:
        yield captured
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read(1 << 20).decode(errors="replace"))


def _first_line(dump: str) -> str:
    """The line of a compiler dump that says what failed."""
    lines = [line.strip() for line in dump.splitlines() if line.strip()]
    for line in lines:
        if "Assertion" in line or "error" in line.lower():
            return line[:160]
    return lines[0][:160] if lines else ""


def _timing_target(device: torch.device) -> str | None:
    """The name of the GPU that candidates are timed on; None where nothing is timed (the
    CPU, whose interpreter says nothing about speed)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def _kernel_source_hash(module: str) -> str:
    """Of the kernel module, the modules its kernels come from (attention.py launches
    attention_short.py's too) and kernl_ops."""
    import importlib

    mod = importlib.import_module(f"kernl.kernels.{module}")
    names = {mod.__name__}
    for kernel in getattr(mod, "JIT_FUNCTIONS", ()):
        names.add(getattr(kernel, "fn", kernel).__module__)
    sources = [inspect.getsource(importlib.import_module(n)) for n in sorted(names)]
    ops_src = inspect.getsource(kernl_ops)
    return hashlib.sha256(("".join(sources) + ops_src).encode()).hexdigest()[:16]


def _configs(op: str, args: tuple = (), kwargs: dict | None = None) -> list[dict[str, Any]]:
    """The op's tuning space for this call: a config function that takes parameters gets
    those of the op's call it names (attention_configs(k, causal): the short-key kernel's
    configs only where the keys fit one block)."""
    import dataclasses
    import importlib

    module, fn = TUNABLE[op]
    configs_fn = getattr(importlib.import_module(f"kernl.kernels.{module}"), fn)
    wanted = inspect.signature(configs_fn).parameters
    call = {}
    if wanted and (args or kwargs):
        bound = inspect.signature(kernl_ops_fn(op)).bind(*args, **(kwargs or {}))
        call = {k: v for k, v in bound.arguments.items() if k in wanted}
    found = configs_fn(**call)
    return [c if isinstance(c, dict) else dataclasses.asdict(c) for c in found]


def _kernel_available(op: str, device: torch.device) -> bool:
    """The op's kernel exists and can run on `device` (see kernl_ops.triton_usable)."""
    import importlib

    module, fn = TUNABLE[op]
    try:
        mod = importlib.import_module(f"kernl.kernels.{module}")
    except ImportError:
        return False
    return hasattr(mod, fn) and kernl_ops.triton_usable(device, mod)


# The ops whose kernel loads the reduction dimension in 16-byte steps: an input whose last
# dimension is not a multiple of 8 stays on aten (kernl_ops falls back there too), where the
# compile failed on the kernel's assertion (BERT with hidden_size 60, review).
_K_MULTIPLE_OF_8 = ("kernl.linear", "kernl.gated_linear")


def _kernel_takes(op: str, args: list) -> bool:
    """Whether the op's kernel takes this call's shapes."""
    return op not in _K_MULTIPLE_OF_8 or args[0].shape[-1] % 8 == 0


# GPU milliseconds per timing sample (Triton replays a graph of that many calls 10 times and
# takes the median): the main cost of a compile, about 10 x BENCH_REP_MS per candidate. 5 ms
# still averages each sample over hundreds of calls of a kernel of a few microseconds, and
# over 30+ calls of BERT-base's largest GEMM.
BENCH_REP_MS = 5


def _bench_us(fn) -> float:
    """GPU time per call under CUDA-graph replay, which is how programs run in production:
    Python launch overhead (large for Triton launchers, small for aten) must not count."""
    fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    ms = triton.testing.do_bench_cudagraph(fn, rep=BENCH_REP_MS, return_mode="median")
    return ms * 1000.0


def tune_program(
    program: Program,
    weights: dict,
    inputs: dict,
    device: torch.device,
    progress=None,
    benchmark: bool = True,
    session: TuneSession | None = None,
) -> list[TuneRecord]:
    """Sets `impl` and `config` on every kernl instruction of `program` in place.
    benchmark=False (and always on the CPU) takes each kernel's default config untimed.
    `session` carries what the buckets of one compile share (see TuneSession)."""
    session = session or TuneSession()
    records: list[TuneRecord] = []
    executor = Executor(program, weights, device)
    env_values = {}
    gpu = _timing_target(device)
    on_gpu = gpu is not None
    with allow_jit(), torch.no_grad():
        for i, _op, _outs, _results in _walk(executor, inputs, env_values):
            ins = program.instructions[i]
            if ins.op not in TUNABLE:
                continue
            args, kwargs = env_values["args"], env_values["kwargs"]
            fn = kernl_ops_fn(ins.op)
            values = list(args) + [kwargs.get(k) for k in sorted(kwargs)]
            described = _describe(values, rows=ins.op in ROWS_OPS)
            if ins.op == "kernl.linear":  # timed as the program runs it: counters made once
                kwargs = {**kwargs, "counters": session.counters_on(device)}
            if not _kernel_available(ins.op, device) or not _kernel_takes(ins.op, args):
                ins.kwargs.update(impl="aten", config=None)
                records.append(TuneRecord(i, ins.op, described, "aten", None, None, None))
                continue
            if not on_gpu or not benchmark:
                ins.kwargs.update(impl="triton", config=None)  # the kernel's default
                records.append(TuneRecord(i, ins.op, described, "triton", None, None, None))
                continue
            key_src = json.dumps(
                [
                    gpu,
                    torch.__version__,
                    triton.__version__,
                    session.source_hash(TUNABLE[ins.op][0]),
                    ins.op,
                    described,
                ]
            )
            key = hashlib.sha256(key_src.encode()).hexdigest()
            path = cache_dir() / f"{key}.json"
            hit = _read_cached(path)
            if hit is not None:
                ins.kwargs.update(impl=hit["impl"], config=encode_config(hit["config"]))
                if hit.get("activation"):
                    ins.kwargs["activation"] = hit["activation"]
                records.append(
                    TuneRecord(
                        i,
                        ins.op,
                        described,
                        hit["impl"],
                        hit["config"],
                        hit["time_us"],
                        hit["aten_time_us"],
                        cached=True,
                        approximation=hit.get("approximation"),
                    )
                )
                continue
            t0 = time.perf_counter()
            aten_us = _bench_us(lambda: fn(*args, **{**kwargs, "impl": "aten"}))
            timed = 1
            best = ("aten", None, aten_us)
            errors = []
            reference = fn(*args, **{**kwargs, "impl": "aten"})
            activation, approximation = None, None
            if ins.op == "kernl.linear" and kwargs.get("activation") == "gelu":
                # cuBLASLt fuses bias + GELU into the GEMM, but its GELU is the tanh one
                tanh = {**kwargs, "impl": "aten", "activation": "gelu_tanh"}
                err, stock_err = gelu_tanh_error(fn, args, kwargs)
                if err <= 2 * stock_err:  # STYLE rule 6: within 2x stock PyTorch's error
                    us = _bench_us(lambda: fn(*args, **tanh))
                    timed += 1
                    if us < best[2]:
                        best, activation = ("aten", None, us), "gelu_tanh"
                        approximation = (
                            f"gelu as gelu_tanh: max err {err:.2g} vs float64 "
                            f"(stock {stock_err:.2g})"
                        )
            configs = _configs(ins.op, args, kwargs)
            if session.compile_threads:
                ahead = [
                    c for c in configs if _failure_key(ins.op, c, values) not in session.failed
                ]
                with quiet_native_stderr(session.verbose):
                    session.compiled_ahead += compile_ahead(
                        fn, args, kwargs, ahead, session.compile_threads
                    )
            found, us, tried, more = time_candidates(
                lambda c: fn(*args, **{**kwargs, "impl": "triton", "config": c}),
                reference,
                configs,
                failure_key=lambda c: _failure_key(ins.op, c, values),
                session=session,
            )
            timed += tried
            errors += more
            if found is not None and us < best[2]:
                best, activation, approximation = ("triton", found, us), None, None
            ins.kwargs.update(impl=best[0], config=encode_config(best[1]))
            if activation:
                ins.kwargs["activation"] = activation
            rec = TuneRecord(
                i,
                ins.op,
                described,
                best[0],
                best[1],
                best[2],
                aten_us,
                errors=errors,
                approximation=approximation,
                timed=timed,
            )
            records.append(rec)
            found = {
                "impl": best[0],
                "config": best[1],
                "time_us": best[2],
                "aten_time_us": aten_us,
                "activation": activation,
                "approximation": approximation,
            }
            try:
                write_cache_record(path, found)
            except OSError as e:  # a read-only home: the next compile times it again
                if not session.cache_unwritable:
                    session.cache_unwritable = True
                    warnings.warn(
                        f"kernl: the tuning cache {path.parent} cannot be written "
                        f"({e.strerror or e}); tuning results are not kept for the next "
                        "compile (point KERNL_CACHE_DIR, or kernl.optimize's cache_dir=, at a "
                        "writable folder)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            if progress:
                progress(
                    f"tuned #{i} {ins.op} {best[0]} {best[1]} {best[2]:.1f}us "
                    f"(aten {aten_us:.1f}us) in {time.perf_counter() - t0:.1f}s"
                )
    return records


def time_candidates(
    launch, reference: torch.Tensor, configs: list, failure_key, session: TuneSession
) -> tuple[Any, float, int, list[str]]:
    """(best config or None, its µs, candidates timed, errors) of `launch(config)` over
    `configs`: each checked against `reference` first, then timed. A candidate that fails to
    compile or run is skipped and remembered under `failure_key(config)` for the compile (its
    compiler dump's telling line in the error); one that computes something else is skipped
    only, since a wrong result may be bound to the shape. Both tuners use it (tune_program's
    instructions, tune_qkv_attention's fused kernel)."""
    best: tuple[Any, float] = (None, float("inf"))
    errors: list[str] = []
    timed = 0
    for config in configs:
        failure = failure_key(config)
        if failure in session.failed:
            errors.append(f"{config}: {session.failed[failure]} (failed before)")
            continue
        error, mismatch = None, None
        with quiet_native_stderr(session.verbose) as dump:
            try:
                out = launch(config)
                if not torch.allclose(
                    out.float(), reference.float(), atol=5e-2, rtol=5e-2, equal_nan=True
                ):
                    raise _Mismatch("result differs from aten")
                us = _bench_us(lambda c=config: launch(c))
                timed += 1
            except Exception as e:  # a config that fails to compile or run is skipped
                error, mismatch = f"{type(e).__name__}: {str(e)[:120]}", e
        if error is not None:  # the compiler's dump is read once its block has closed
            said = _first_line(dump[0]) if dump else ""
            if said:
                error += f" [compiler: {said}]"
            if not isinstance(mismatch, _Mismatch):
                session.failed[failure] = error
            errors.append(f"{config}: {error}")
            continue
        if us < best[1]:
            best = (config, us)
    return best[0], best[1], timed, errors


def _read_cached(path: Path) -> dict[str, Any] | None:
    """The tuning cache's record at `path`; None where there is none. One that cannot be read
    or is not a record (a torn write, another kernl's format) is a miss, with a warning: the
    instruction is timed again and the record overwritten."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        problem = getattr(e, "strerror", None) or str(e)
    else:
        try:
            hit = json.loads(text)
            if (
                hit["impl"] in ("aten", "triton")
                and (hit["config"] is None or isinstance(hit["config"], dict))
                and all(
                    hit[k] is None or isinstance(hit[k], (int, float))
                    for k in ("time_us", "aten_time_us")
                )
                and isinstance(hit.get("activation"), (str, type(None)))
                and isinstance(hit.get("approximation"), (str, type(None)))
            ):
                return hit
            problem = "not a tuning record"
        except (ValueError, KeyError, TypeError) as e:
            problem = f"not a tuning record: {type(e).__name__}: {e}"[:200]
    warnings.warn(
        f"kernl: tuning cache file {path} cannot be used ({problem}); timing again",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def write_cache_record(path: Path, record: dict[str, Any]) -> None:
    """Write the record in one rename, from a temporary file of a random name (two containers
    that are both pid 1 on one shared cache volume must not write into one temporary file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _Mismatch(ValueError):
    """A candidate that ran but computed something else than aten."""


def gelu_tanh_error(fn, args: list, kwargs: dict) -> tuple[float, float]:
    """For a kernl.linear with an erf GELU: max |error| against the exact op in float64 of (the
    op with tanh-GELU, the exact op in its own dtype). The tuner accepts the tanh form (cuBLASLt's
    epilogue) only where the first is within 2x the second: in fp16/bf16 the GEMM's own rounding
    hides the approximation, in fp32 it does not."""

    def wide(a):
        return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    exact = fn(*map(wide, args), **{**{k: wide(v) for k, v in kwargs.items()}, "impl": "aten"})
    stock = fn(*args, **{**kwargs, "impl": "aten"})
    tanh = fn(*args, **{**kwargs, "impl": "aten", "activation": "gelu_tanh"})
    err = (tanh.double() - exact).abs().max().item()
    stock_err = (stock.double() - exact).abs().max().item()
    return err, stock_err


def encode_config(config: dict[str, Any] | None) -> list | None:
    """Programs hold plain msgpack data: a config travels as [[name, value], ...]."""
    return None if config is None else [[k, v] for k, v in sorted(config.items())]


def kernl_ops_fn(op: str):
    from kernl.runtime.vocabulary import resolve_op

    return resolve_op(op)


def _walk(executor: Executor, inputs: dict, out: dict):
    """Run the program step by step, exposing each step's bound arguments in `out` before
    the step runs, so the tuner can benchmark the instruction on its real inputs. Each value
    is dropped after its last use, as `Executor.run` drops it: kept, a deep encoder's every
    intermediate stayed alive (ModernBERT-large at 8x8192: ~59 GB)."""
    from kernl.runtime.executor import _bind

    env = executor.initial_env(inputs)
    for i, (fn, args, kwargs, outs, frees) in enumerate(executor.steps):
        out["args"] = _bind(args, env)
        out["kwargs"] = {k: _bind(v, env) for k, v in kwargs.items()}
        yield i, executor.program.instructions[i].op, outs, None
        # The caller may have re-tuned the instruction meanwhile: run its current choice.
        ins = executor.program.instructions[i]
        chosen = ("impl", "config", "activation")  # activation: gelu may become gelu_tanh
        kw = {**out["kwargs"], **{k: ins.kwargs[k] for k in chosen if k in ins.kwargs}}
        executor.store(env, outs, fn(*out["args"], **kw))
        for v in frees:
            env[v] = None


@contextmanager
def recording_binaries(device: torch.device) -> Iterator[dict[str, Any]]:
    """Within the block kernl kernels compile through Triton's JIT; the yielded dict fills
    with the compiled binary of every launch: {launch key: (BinarySpec, cubin bytes)}."""
    from kernl.runtime.binaries import spec_from_compiled

    found: dict[str, Any] = {}

    def recorder(key: str, kernel) -> None:
        if key not in found:
            found[key] = spec_from_compiled(key, kernel)

    with allow_jit(recorder), torch.no_grad():
        yield found
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def record_binaries(program: Program, weights: dict, inputs: dict, device: torch.device) -> dict:
    """Run the tuned program once and collect its kernl kernels' binaries."""
    with recording_binaries(device) as found:
        Executor(program, weights, device).run(inputs)
    return found


def write_binaries(writer, binaries: dict) -> list[KernelBinary]:
    """Write recorded binaries ({launch key: (BinarySpec, cubin)}) into the artifact being
    written; returns their manifest entries."""
    entries = []
    for key, (spec, cubin) in sorted(binaries.items()):
        name = key_digest(key)
        rel = writer.write_kernel(name, cubin)
        entries.append(
            KernelBinary(
                name=name,
                file=rel,
                function=spec.function,
                num_warps=spec.num_warps,
                shared_mem=spec.shared,
                meta={"key": key, "num_ctas": spec.num_ctas, "arg_types": spec.arg_types},
            )
        )
    return entries
