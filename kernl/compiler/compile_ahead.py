"""Compile an instruction's tuning candidates side by side before they are timed one by one.

The first bucket of a BERT-base compile took 67 of its 106 s (H200, 2026-12-02); the later
buckets, which time as many candidates but find them compiled, took 2-6 s each: most of the
first bucket's time is Triton compiling candidates one after another (inferred from that
difference, not profiled). Triton's compile runs its MLIR passes and
ptxas without holding the GIL (two threads compiled six kernels for sm_90 in 1.4 s against
2.7 s serially, on this project's 2-core CPU), so threads are enough: each candidate's launch
goes through `JITFunction.warmup` under Triton's `AsyncCompileMode`, which compiles on the
pool and, once all are done, files each kernel in its JIT cache under the key the
candidate's own launch computes. The serial loop then finds them compiled.

Nothing here decides anything: a candidate that fails to compile here is left for its own
launch, which fails again where the tuner records the failure, as before. Warp-specialised
candidates are left out: they are the ones whose compile is known to crash inside Triton's
passes (caught by LLVM's crash recovery, trusted here only on the thread that runs the tuner).

Up to 8 threads by default (one per core); KERNL_COMPILE_THREADS=N sets N, 0 or 1 turns it
off. Checked on the CPU against Triton's real compile for sm_90 (a stand-in driver: layer_norm
candidates compiled on two threads, then found in the JIT cache, none compiled
again); the GPU test is tests/compiler/test_compile_ahead.py."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kernl.kernels.jit import made
from kernl.kernels.launch import launching_with, triton_args

ENV = "KERNL_COMPILE_THREADS"


DEFAULT_MAX_THREADS = 8


def compile_threads() -> int:
    """Threads that compile candidates ahead: KERNL_COMPILE_THREADS, else one per core up to
    DEFAULT_MAX_THREADS; 0 where that is 0 or 1 (the serial loop compiles)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        threads = min(DEFAULT_MAX_THREADS, os.cpu_count() or 1)
        return threads if threads > 1 else 0
    try:
        threads = int(raw)
    except ValueError:
        raise ValueError(f"{ENV} must be a whole number of threads, not {raw!r}") from None
    if threads < 0:
        raise ValueError(f"{ENV} must be 0 or more, not {threads}")
    return threads if threads > 1 else 0


def worth_compiling_ahead(config: Any) -> bool:
    """Not a warp-specialised candidate (a config dict or a config dataclass)."""
    if isinstance(config, dict):
        return not config.get("warp_specialize", False)
    return not getattr(config, "warp_specialize", False)


def compile_ahead(
    fn: Callable[..., Any],
    args: list,
    kwargs: dict,
    configs: list[dict[str, Any]],
    threads: int,
) -> int:
    """Compiles `fn(*args, **kwargs, impl="triton", config=c)` (a kernl op's candidate) for
    every c of `configs` on `threads` threads without running it; see compile_ahead_calls."""
    return compile_ahead_calls(
        lambda config: fn(*args, **{**kwargs, "impl": "triton", "config": config}),
        configs,
        threads,
    )


def compile_ahead_calls(launch: Callable[[Any], Any], configs: list, threads: int) -> int:
    """Compiles the kernels `launch(c)` would launch, for every c of `configs` but the
    warp-specialised ones, on `threads` threads without running them; returns how many
    candidates were submitted (0 where this Triton has no asynchronous compile, or the caller
    runs its own). Errors are left to the candidates' own launches."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode, active_mode
    except ImportError:  # a Triton without it: the serial loop compiles as before
        return 0
    if active_mode.get() is not None:  # the caller's own (Triton allows one at a time)
        return 0

    def compile_only(jit_fn, grid, a: tuple, kw: dict):
        return made(jit_fn).warmup(*triton_args(a), grid=grid, **kw)

    submitted = 0
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kernl-compile") as pool:
        with AsyncCompileMode(pool, ignore_errors=True), launching_with(compile_only):
            for config in filter(worth_compiling_ahead, configs):
                try:
                    launch(config)
                    submitted += 1
                except Exception:  # noqa: BLE001 - its own launch reports it
                    continue
    return submitted
