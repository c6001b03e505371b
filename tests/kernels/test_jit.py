"""kernels/jit.py: kernel modules import no Triton, their launchers reach a loaded artifact's
binaries without importing it, and the launch keys they make then are the keys the compiler
stored (made from Triton's own JITFunction)."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import kernl.kernels
from kernl.kernels import jit
from kernl.runtime import binaries


def _kernel_modules():
    names = [m.name for m in pkgutil.iter_modules(kernl.kernels.__path__)]
    return [importlib.import_module(f"kernl.kernels.{n}") for n in names if n not in ("jit",)]


def _lazy_kernels():
    """Every @jit kernel: as module attributes they may be made already (this process
    launched kernels), the JIT_FUNCTIONS tuples keep the lazy objects. Named by the module
    that defines it (attention.py lists attention_short.py's kernel too)."""
    found = {}
    for module in _kernel_modules():
        for kernel in getattr(module, "JIT_FUNCTIONS", ()):
            found[f"{kernel.fn.__module__}.{kernel.__name__}"] = kernel
    return found


def test_every_kernel_module_lists_lazy_kernels():
    kernels = _lazy_kernels()
    assert len(kernels) >= 15
    assert all(isinstance(k, jit.LazyJIT) for k in kernels.values())


@pytest.mark.parametrize("name", sorted(_lazy_kernels()))
def test_a_lazy_kernel_describes_its_parameters_and_launch_key_as_triton_does(name):
    import torch
    from triton.runtime.jit import JITFunction

    lazy = _lazy_kernels()[name]
    real = JITFunction(lazy.fn)  # what `triton.jit` makes on a GPU host
    assert lazy.arg_names == real.arg_names
    assert lazy.signature == real.signature
    assert [(p.name, p.is_constexpr, p.has_default) for p in lazy.params] == [
        (p.name, p.is_constexpr, p.has_default) for p in real.params
    ]
    assert any(p.is_constexpr for p in lazy.params)
    # a launch as a launcher makes it: pointers, sizes, constexprs, launch options
    x = torch.zeros(8)
    kwargs = {
        p.name: (3 if p.is_constexpr else x if p.name[0].isupper() else 16)
        for p in lazy.params
        if not p.has_default
    }
    kwargs |= {"num_warps": 4, "num_stages": 2}
    key = binaries.launch_key(lazy, *binaries.bind(lazy, (), kwargs))
    assert key == binaries.launch_key(real, *binaries.bind(real, (), kwargs))
    assert key.startswith(f"{name}|") or key.startswith(name)
    made_types = ("GluonJITFunction",) if lazy.gluon else ("JITFunction", "InterpretedFunction")
    assert type(jit.made(lazy)).__name__ in made_types
    assert jit.made(lazy).fn is lazy.fn


def test_made_kernels_replace_the_lazy_names_in_their_modules():
    from kernl.kernels import fused_linear, pdl

    jit.made(fused_linear.JIT_FUNCTIONS[0])
    assert not isinstance(fused_linear._fused_linear_kernel, jit.LazyJIT)
    assert fused_linear.tl is importlib.import_module("triton.language")
    assert not isinstance(pdl.gdc_wait, jit.TritonName)
    assert not isinstance(pdl.pdl_start, jit.LazyJIT)


def test_cdiv_and_next_power_of_2_are_tritons():
    import triton

    assert all(jit.next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 5000))
    assert all(jit.cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 200) for b in range(1, 33))


# Runs in a fresh process with TRITON_INTERPRET=0 (as on a GPU host): every launcher below
# goes to a recording launcher, as a loaded artifact's go to its binaries; then Triton is
# imported and the same launches are keyed again on the made kernels.
LAUNCHES = textwrap.dedent(
    """
    import json, sys
    import torch
    import kernl.runtime
    from kernl.kernels import (attention, bert_embeddings, decode_attention, fused_linear,
        lm_head_argmax, norm, norm_linear, rope_cache_write, skinny_linear)
    from kernl.kernels.jit import made
    from kernl.kernels.launch import launching_with
    from kernl.runtime.binaries import bind, launch_key

    launches = []
    def record(kernel, grid, args, kwargs):
        launches.append((kernel, args, kwargs))
        launch_key(kernel, *bind(kernel, args, kwargs))

    h = torch.float16
    x = torch.zeros(4, 64, dtype=h)
    w = torch.zeros(96, 64, dtype=h)
    b = torch.zeros(96, dtype=h)
    q = torch.zeros(1, 2, 16, 32, dtype=h)
    with launching_with(record):
        fused_linear.fused_linear(x, w, b, "gelu")
        norm.layer_norm(x, torch.ones(64, dtype=h), torch.zeros(64, dtype=h), 1e-5, x)
        norm.rms_norm(x, torch.ones(64, dtype=h))
        attention.attention(q, q, q, key_padding_mask=torch.ones(1, 16, dtype=torch.bool))
        bert_embeddings.bert_embeddings(
            torch.zeros(1, 16, dtype=torch.long), torch.zeros(50, 64, dtype=h),
            torch.zeros(32, 64, dtype=h), torch.zeros(2, 64, dtype=h),
            torch.ones(64, dtype=h), torch.zeros(64, dtype=h))
        skinny_linear.skinny_linear(x[:1], w, b)
        norm_linear.norm_linear(x[:1], torch.ones(64, dtype=h), None, w, eps=1e-6)
        decode_attention.decode_attention(
            torch.zeros(1, 2, 1, 32, dtype=h), torch.zeros(1, 2, 64, 32, dtype=h),
            torch.zeros(1, 2, 64, 32, dtype=h), kv_lens=torch.full((1,), 10))
        kc = torch.zeros(1, 1, 64, 32, dtype=h)
        rope_cache_write.rope_cache_write(
            torch.zeros(1, 128, dtype=h), torch.zeros(1, dtype=torch.long),
            torch.zeros(64, 32), torch.zeros(64, 32), kc, torch.zeros_like(kc),
            torch.zeros(1, dtype=torch.long), num_heads=2, num_kv_heads=1)
        lm_head_argmax.lm_head_argmax(x[:1], torch.zeros(100, 64, dtype=h))
    assert "triton" not in sys.modules, "a launcher imported Triton"
    lazy_keys = [launch_key(k, *bind(k, a, kw)) for k, a, kw in launches]
    made_keys = [launch_key(made(k), *bind(made(k), a, kw)) for k, a, kw in launches]
    assert "triton" in sys.modules
    print(json.dumps({"lazy": lazy_keys, "made": made_keys}))
    """
)


def test_launchers_reach_the_binaries_without_importing_triton():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run(
        [sys.executable, "-c", LAUNCHES], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    keys = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(keys["lazy"]) >= 11
    assert keys["lazy"] == keys["made"]
    kernels = {k.split("|", 1)[0] for k in keys["lazy"]}
    assert "kernl.kernels.fused_linear._fused_linear_kernel" in kernels


@pytest.mark.parametrize(
    "value", ["1", "0", "true", "True", "ON", "yes", "y", "Y", "t", "false", "off", "2", " 1", ""]
)
def test_interpret_requested_reads_triton_interpret_as_triton_does(value, monkeypatch):
    from triton._C.libtriton import getenv_bool

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert jit.interpret_requested() == getenv_bool("TRITON_INTERPRET", False)
