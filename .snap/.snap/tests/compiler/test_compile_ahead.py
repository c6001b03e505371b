"""Tuning candidates compiled side by side before they are timed (compile_ahead.py): which
candidates go, that nothing is launched and no error escapes, and on the GPU that the
candidates' own launches then compile nothing (the tuner's use of it: test_tune_session.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from kernl.compiler import compile_ahead as ahead
from kernl.compiler import tune
from kernl.kernels.launch import launch_kernel


@pytest.mark.parametrize("raw, want", [("0", 0), ("1", 0), ("2", 2), (" 16 ", 16)])
def test_threads_come_from_the_environment(raw, want, monkeypatch):
    monkeypatch.setenv(ahead.ENV, raw)
    assert ahead.compile_threads() == want


@pytest.mark.parametrize("cores, want", [(None, 0), (1, 0), (2, 2), (16, 8), (128, 8)])
def test_by_default_one_thread_per_core_up_to_eight(cores, want, monkeypatch):
    monkeypatch.delenv(ahead.ENV, raising=False)
    monkeypatch.setattr(ahead.os, "cpu_count", lambda: cores)
    assert ahead.compile_threads() == want


@pytest.mark.parametrize("raw", ["many", "-2", "1.5"])
def test_a_bad_thread_count_is_refused_with_the_variable_named(raw, monkeypatch):
    monkeypatch.setenv(ahead.ENV, raw)
    with pytest.raises(ValueError, match=ahead.ENV):
        ahead.compile_threads()


class _Kernel:
    """Stands for a Triton JITFunction: `warmup` compiles (here: records), a launch runs."""

    def __init__(self):
        self.warmed, self.launched, self.threads = [], [], set()

    def warmup(self, *args, grid, **kwargs):
        self.threads.add(threading.current_thread().name)
        self.warmed.append(kwargs["BLOCK"])

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append(kwargs["BLOCK"])


def test_every_candidate_is_compiled_and_none_is_launched():
    kernel = _Kernel()

    def op(x, impl="aten", config=None):
        if config["BLOCK"] == 3:
            raise RuntimeError("PassManager::run failed")  # left to its own launch
        launch_kernel(kernel, (1,), x, BLOCK=config["BLOCK"])
        return x

    configs = [{"BLOCK": b} for b in (1, 2, 3, 4)]
    submitted = ahead.compile_ahead(op, [torch.zeros(2)], {}, configs, threads=2)
    assert submitted == 3 and sorted(kernel.warmed) == [1, 2, 4] and kernel.launched == []
    launch_kernel(kernel, (1,), torch.zeros(2), BLOCK=9)  # the launcher is restored after
    assert kernel.launched == [9]


def test_inside_the_callers_own_async_compile_nothing_is_compiled_ahead():
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode

    kernel = _Kernel()

    def op(x, impl="aten", config=None):
        launch_kernel(kernel, (1,), x, BLOCK=config["BLOCK"])
        return x

    with ThreadPoolExecutor(1) as pool, AsyncCompileMode(pool):
        assert ahead.compile_ahead(op, [torch.zeros(2)], {}, [{"BLOCK": 1}], threads=2) == 0
    assert kernel.warmed == []


def test_decode_tile_candidates_are_compiled_ahead_then_timed():
    """fastest_checked (the decode tiles' tuner, causal LM and seq2seq): with threads, every
    config's kernels compile first, none launched; then each is checked and timed as before."""
    from kernl.compiler.tasks.causal_lm.decode_tiles import TileTiming, fastest_checked

    def call(layer, config):
        launch_kernel(kernel, (1,), torch.zeros(2), BLOCK=config)
        return torch.full((2,), float(config))

    def measure(calls, config):
        return float(config)  # the smallest config is the fastest

    for threads in (0, 2):
        kernel, timings = _Kernel(), []
        best = fastest_checked(
            lambda c: TileTiming(1, "skinny_linear", "o", c, None),
            call,
            lambda out: (0.0, 1.0),
            [3, 1, 2],
            1,
            measure,
            timings,
            threads,
        )
        assert best.config == 1 and [t.ms for t in timings] == [3.0, 1.0, 2.0]
        assert kernel.launched == [3, 1, 2]  # the checks' launches, after the compiles
        assert sorted(kernel.warmed) == ([1, 2, 3] if threads else [])


def test_warp_specialised_candidates_are_not_compiled_ahead():
    """Whoever calls it (the encoder tuner's dicts, the decode tiles' dataclasses), the
    mechanism leaves warp-specialised candidates to the tuner's own thread."""
    from dataclasses import dataclass

    assert ahead.worth_compiling_ahead({"BLOCK_M": 64})
    assert ahead.worth_compiling_ahead({"warp_specialize": False})
    assert not ahead.worth_compiling_ahead({"warp_specialize": True})

    @dataclass(frozen=True)
    class Config:
        BLOCK: int
        warp_specialize: bool = False

    kernel = _Kernel()

    def launch(config):
        launch_kernel(kernel, (1,), torch.zeros(2), BLOCK=config.BLOCK)

    configs = [Config(1), Config(2, True), Config(3)]
    assert ahead.compile_ahead_calls(launch, configs, threads=2) == 2
    assert sorted(kernel.warmed) == [1, 3]

    def op(x, impl="aten", config=None):
        launch_kernel(kernel, (1,), x, BLOCK=config["BLOCK"])
        return x

    kernel.warmed.clear()
    dicts = [{"BLOCK": 4}, {"BLOCK": 5, "warp_specialize": True}]
    assert ahead.compile_ahead(op, [torch.zeros(2)], {}, dicts, threads=2) == 1
    assert kernel.warmed == [4]


@pytest.mark.gpu
def test_gpu_candidates_compiled_ahead_are_not_compiled_again(monkeypatch):
    """Real layer_norm candidates on the GPU: compile_ahead compiles them on its threads, and
    each candidate's own launch then finds its kernel in Triton's JIT cache."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import triton

    from kernl.runtime.binaries import allow_jit

    misses = []

    def hook(*args, **kwargs):
        misses.append(threading.current_thread().name)
        return None

    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", hook)
    fn = tune.kernl_ops_fn("kernl.layer_norm")
    # a width no other test uses, so that no config is in the JIT cache already
    x = torch.randn(37, 1000, device="cuda", dtype=torch.float16)
    w = torch.randn(1000, device="cuda", dtype=torch.float16)
    args, kwargs = [x, w, torch.zeros_like(w), 1e-5], {"residual": torch.randn_like(x)}
    configs = [c for c in tune._configs("kernl.layer_norm") if ahead.worth_compiling_ahead(c)]
    with allow_jit(), torch.no_grad():
        submitted = ahead.compile_ahead(fn, args, kwargs, configs, threads=4)
        compiled_ahead = len(misses)
        want = fn(*args, **kwargs, impl="aten")
        for config in configs:
            got = fn(*args, **kwargs, impl="triton", config=config)
            assert (got.float() - want.float()).abs().max().item() < 2e-2, config
    assert submitted == len(configs) and compiled_ahead > 0
    assert len(misses) == compiled_ahead, "a candidate compiled again at its own launch"


def _compile_ahead_for_sm90(cache_dir: str) -> None:
    """Run in a process where Triton compiles (no interpreter), with no GPU: a stand-in driver
    names sm_90 as the target, so the JIT's binder, specialisation, cache keys and Triton's
    whole compile (MLIR passes, ptxas) are the real ones; only launching is impossible."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    import kernl.runtime.kernl_ops as kernl_ops
    from kernl.kernels import norm
    from kernl.runtime.binaries import allow_jit

    class Hopper:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    driver.set_active(Hopper())
    triton.knobs.cache.dir = cache_dir  # empty: every kernel really compiles
    kernl_ops.triton_usable = lambda device, module: True  # CPU tensors stand for CUDA ones
    compiled = []
    triton.knobs.runtime.jit_cache_hook = lambda *a, **k: compiled.append(1)
    fn = tune.kernl_ops_fn("kernl.layer_norm")
    x = torch.randn(37, 1024, dtype=torch.float16)
    w = torch.randn(1024, dtype=torch.float16)
    args, kwargs = [x, w, torch.zeros_like(w), 1e-5], {"residual": torch.randn_like(x)}
    configs = [c for c in tune._configs("kernl.layer_norm") if ahead.worth_compiling_ahead(c)]
    configs = configs[:4]
    with allow_jit(), torch.no_grad():
        assert ahead.compile_ahead(fn, args, kwargs, configs, threads=2) == 4
        assert len(compiled) == 4, compiled
        cached = sum(len(c[0]) for c in norm._norm_kernel.device_caches.values())
        assert cached == 4, cached
        ahead.compile_ahead(fn, args, kwargs, configs, threads=2)  # all in the JIT cache now
        assert len(compiled) == 4, "a kernel compiled ahead was compiled again"


def test_candidates_compile_ahead_for_sm90_on_the_cpu(tmp_path):
    # "0", not unset: without a GPU kernl turns the interpreter on when it is unset.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


if __name__ == "__main__":
    _compile_ahead_for_sm90(sys.argv[1])
