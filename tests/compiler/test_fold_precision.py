"""Folding evaluates float32 matmuls of constants (ModernBERT's positions times inv_freq) in
full float32 whatever the process's precision setting, and puts that setting back as it was.
It set and restored the legacy `allow_tf32` flag: after the user's
`torch.set_float32_matmul_precision("medium")`, the process's getter then raised; after the
new API (`torch.backends.cuda.matmul.fp32_precision = "tf32"`), reading the flag raised
inside the fold, which then folded nothing, silently (review, 2026-12-07)."""

from __future__ import annotations

import pytest
import torch

from kernl.artifacts.schema import Bucket
from kernl.compiler.lower import lower
from kernl.compiler.passes import drop_dead
from kernl.compiler.passes.fold_constants import fold_constants
from kernl.runtime.executor import Executor


class RotaryTable(torch.nn.Module):
    """A rotary table as ModernBERT makes it: a float32 matmul of constants, then cos."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (1000.0 ** (torch.arange(0, 64, 2) / 64.0)))

    def forward(self, x):
        positions = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * 37.0
        freqs = positions @ self.inv_freq[None, :]
        return (x * torch.cos(freqs)[None],)


def _settings() -> tuple:
    return (
        torch.backends.cuda.matmul.fp32_precision,
        torch.backends.mkldnn.matmul.fp32_precision,
    )


@pytest.fixture
def restored_precision():
    """The process's settings as they were (later tests in this worker see no change)."""
    before = _settings()
    legacy = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(legacy)
    cuda, mkldnn = before
    torch.backends.cuda.matmul.fp32_precision = cuda
    torch.backends.mkldnn.matmul.fp32_precision = mkldnn
    assert torch.get_float32_matmul_precision() == legacy


def _set(setting: str) -> None:
    if setting in ("medium", "high"):
        torch.set_float32_matmul_precision(setting)
    elif setting == "new api tf32":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    elif setting == "legacy allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True


SETTINGS = ["medium", "high", "new api tf32", "legacy allow_tf32", "default"]


@pytest.mark.parametrize("setting", SETTINGS)
def test_inside_the_fold_both_precision_apis_agree_on_full_float32(setting, restored_precision):
    """With only the new API set to "ieee" under the user's "high", torch's legacy setting
    still said TF32, and torch refuses a CUDA matmul whose two settings disagree (reading
    allow_tf32 raises the same check on the CPU): every fp32 fold on the GPU then failed and
    nothing was folded, silently (review, 2026-12-07)."""
    from kernl.compiler.passes.fold_constants import _full_fp32_matmuls

    _set(setting)
    before = _settings()
    with _full_fp32_matmuls():
        assert torch.backends.cuda.matmul.allow_tf32 is False  # raised on disagreement
        assert torch.get_float32_matmul_precision() == "highest"
        assert _settings() == ("ieee", "ieee")
    assert _settings() == before


@pytest.mark.parametrize("setting", ["medium", "new api tf32", "default"])
def test_folding_computes_in_full_float32_and_leaves_the_precision_setting(
    setting, restored_precision
):
    _set(setting)
    before = _settings()
    getter = torch.get_float32_matmul_precision() if setting != "new api tf32" else None
    m = RotaryTable().eval()
    x = torch.randn(1, 48, 32, generator=torch.Generator().manual_seed(0))
    ep = torch.export.export(m, (x,), strict=False)
    program, weights = lower(ep, Bucket(1, 48), ["x"])
    weights = dict(weights)
    program, folded = fold_constants(drop_dead(program), weights, torch.device("cpu"))
    assert folded >= 1, "nothing folded"
    assert "aten.cos.default" not in {i.op for i in program.instructions}
    assert _settings() == before
    if getter is not None:
        assert torch.get_float32_matmul_precision() == getter  # raised after "medium"
    (got,) = Executor(program, weights, torch.device("cpu")).run({"x": x.double().float()})
    positions = torch.arange(48, dtype=torch.float64)[:, None] * 37.0
    want = x.double() * torch.cos(positions @ m.inv_freq.double()[None, :])[None]
    assert (got.double() - want).abs().max().item() < 2e-3  # float32 rounding at ~1700 rad: ~1e-4
