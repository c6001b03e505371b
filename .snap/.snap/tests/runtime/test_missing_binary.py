"""A launch with no binary in the loaded artifact is refused with a reason: another bucket or
GPU, or binaries of the same kernel built for other parameters (another kernl built the
artifact: a kernel gained a constexpr, as the attention's BIAS_PER_KEY on 2026-12-02)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import triton

from kernl.runtime import binaries as b


def _kernel_before():
    def _k(X, N, BLOCK: triton.language.constexpr):
        pass

    return triton.runtime.jit.JITFunction(_k)


def _kernel_now():
    def _k(X, N, BLOCK: triton.language.constexpr, PER_KEY: triton.language.constexpr):
        pass

    return triton.runtime.jit.JITFunction(_k)


class _Fake:
    def __init__(self):
        self.launches = 0

    def launch(self, grid, bound, pdl=False, cooperative=False):
        self.launches += 1


@pytest.fixture
def binaries(monkeypatch):
    monkeypatch.setattr(b.torch.cuda, "device", lambda _d: contextlib.nullcontext())
    return b.KernelBinaries(torch.device("cpu"))


def _store(kb, jit_fn, args, kwargs):
    fake = _Fake()
    kb.loaded[b.launch_key(jit_fn, *b.bind(jit_fn, args, kwargs))] = fake
    return fake


def test_a_kernel_built_with_other_parameters_asks_for_a_recompile(binaries):
    x = torch.zeros(4)
    _store(binaries, _kernel_before(), (x, 4), {"BLOCK": 16, "num_warps": 4})
    with pytest.raises(b.MissingBinaryError) as e:
        binaries(_kernel_now(), (1,), (x, 4), {"BLOCK": 16, "PER_KEY": True, "num_warps": 4})
    assert "+PER_KEY" in str(e.value) and "another version of kernl" in str(e.value)
    assert "Recompile" in str(e.value)


def test_a_missing_shape_or_config_says_bucket_and_gpu(binaries):
    x = torch.zeros(4)
    now = _kernel_now()
    fake = _store(binaries, now, (x, 4), {"BLOCK": 16, "PER_KEY": False, "num_warps": 4})
    binaries(now, (1,), (x, 4), {"BLOCK": 16, "PER_KEY": False, "num_warps": 4})
    assert fake.launches == 1
    # same kernel, same parameters, another value or launch option: not a version change
    for kwargs in (
        {"BLOCK": 32, "PER_KEY": False, "num_warps": 4},
        {"BLOCK": 16, "PER_KEY": False, "num_warps": 8},
    ):
        with pytest.raises(b.MissingBinaryError) as e:
            binaries(now, (1,), (x, 4), kwargs)
        assert "built for this bucket and GPU" in str(e.value)
