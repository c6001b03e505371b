"""A bf16 generation whose logits are beyond the tolerance against eager bf16 is compared with
eager in float32 before it is refused: a tiny Gemma of head_dim 256 (a random model that
amplifies bf16 rounding: eager bf16 itself is ~10% of its largest logit off float32) compiles,
with the look recorded in the report, while a kernl step that is really off stays refused."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import kernl.compiler
from kernl.compiler.tasks.causal_lm import compile_causal_lm
from kernl.compiler.tasks.causal_lm.validate import FLOAT32_SLACK, STEP_SLACK, no_less_accurate
from kernl.compiler.validate import ValidationError
from kernl.runtime.generation.decoder import Decoder

from .tiny_models import VOCAB, tiny_model

BUCKETS = "batch=1,4 prompt=16 cache=32,64"


def test_bf16_rounding_that_eager_shares_is_not_refused(tmp_path):
    hf = tiny_model("gemma_head256").to(torch.bfloat16)
    lines = []
    report = kernl.compiler.compile(
        hf, BUCKETS, tmp_path / "lm.kernl", dtype="bf16", device="cpu", progress=lines.append
    )
    looked = [e for e in report.stages if e.against_float32]
    assert looked, "the tolerance alone accepted every step: the look is untested here"
    for e in looked:
        assert e.max_abs_error > 0.08  # beyond bf16's atol (its rtol reads each step's scale)
        assert "rms error from float32" in e.against_float32
    assert any("as close to eager in float32 as eager is" in line for line in lines)
    table = report.table()
    assert "note: decode" in table and "as close to eager in float32" in table


def test_a_bf16_step_that_is_off_is_still_refused(tmp_path, monkeypatch):
    """Every step's logits moved by 0.3: beyond the tolerance and further from float32 than
    eager bf16 is, so the float32 look refuses it too, and says so."""
    logits = Decoder._logits

    def off(self, *args, **kwargs):
        return logits(self, *args, **kwargs) + 0.3

    monkeypatch.setattr(Decoder, "_logits", off)
    hf = tiny_model("gemma_head256").to(torch.bfloat16)
    with pytest.raises(ValidationError, match="kernl is further off than eager in bfloat16"):
        compile_causal_lm(
            hf,
            BUCKETS,
            tmp_path / "lm.kernl",
            dtype="bf16",
            device="cpu",
            decode_kernels={"attention": "torch"},
        )
    assert not (tmp_path / "lm.kernl").exists()


def test_an_error_in_one_row_at_one_step_is_refused(tmp_path, monkeypatch):
    """One logit of one row at one decode step moved by 0.25 (about twice eager bf16's largest
    error from float32 anywhere in the run): run-wide figures hide it (the rms barely moves,
    and the run's largest error is within 3x eager's largest), so the look bounds each row's
    largest error at each step by eager's there."""
    decode = Decoder.decode

    def off(self, cache, tokens, positions, slot, kv_valid, ids_out=None):
        logits, wrote = decode(self, cache, tokens, positions, slot, kv_valid, ids_out)
        if tokens.shape[0] == 4 and int(slot) == 40:
            logits = logits.clone()
            logits[1, 5] += 0.25
        return logits, wrote

    monkeypatch.setattr(Decoder, "decode", off)
    hf = tiny_model("gemma_head256").to(torch.bfloat16)
    with pytest.raises(ValidationError, match="kernl is further off than eager in bfloat16"):
        compile_causal_lm(hf, BUCKETS, tmp_path / "lm.kernl", dtype="bf16", device="cpu")


@pytest.mark.parametrize("elements", [1 << 24, 120, 1])  # the whole at once; 2 rows; 1 row
def test_the_look_reads_the_rms_error_and_bounds_the_largest(monkeypatch, elements):
    """The same verdicts and summary whatever slice of rows the look reads at a time."""
    import kernl.compiler.tasks.causal_lm.validate as validate

    monkeypatch.setattr(validate, "COMPARE_CHUNK", elements)
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(3, 20, 50, generator=g)
    noise = 0.01 * torch.randn(3, 20, 50, generator=g)
    eager = exact + noise
    same_size = exact + 0.01 * torch.randn(3, 20, 50, generator=g)
    summary = no_less_accurate(same_size, eager, exact)
    ours_rms = float((same_size.double() - exact.double()).pow(2).mean().sqrt())
    assert summary is not None and f"kernl {ours_rms:.3g}, eager" in summary
    assert no_less_accurate(exact + noise * (FLOAT32_SLACK + 0.1), eager, exact) is None
    one_wrong = same_size.clone()
    one_wrong[1, 7, 3] += (2 * STEP_SLACK + 1) * float(noise.abs().max())
    assert no_less_accurate(one_wrong, eager, exact) is None  # the rms barely moves
    with_nan = same_size.clone()
    with_nan[0, 0, 0] = float("nan")
    assert no_less_accurate(with_nan, eager, exact) is None


def test_a_refusal_says_when_the_float32_look_could_not_be_made(tmp_path, monkeypatch):
    """The model in float32 does not fit (out of memory): the run is refused on the tolerance
    alone, and the refusal says that no float32 look was made."""
    import kernl.compiler.tasks.causal_lm.validate as validate

    logits = Decoder._logits
    monkeypatch.setattr(Decoder, "_logits", lambda self, *a, **k: logits(self, *a, **k) + 0.3)
    widen = validate.float32_module_by_module

    @contextmanager
    def no_float32(model):
        with widen(model):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        yield

    monkeypatch.setattr(validate, "float32_module_by_module", no_float32)
    hf = tiny_model("gemma_head256").to(torch.bfloat16)
    with pytest.raises(ValidationError) as refused:
        compile_causal_lm(
            hf,
            BUCKETS,
            tmp_path / "lm.kernl",
            dtype="bf16",
            device="cpu",
            decode_kernels={"attention": "torch"},
        )
    message = str(refused.value)
    assert "logits differ from eager" in message
    assert "no float32 look (the model in float32 does not fit in memory)" in message


@pytest.mark.parametrize(
    "family",
    [
        "llama3",
        "mistral_window",
        "qwen2_window",
        "qwen3",
        "phi3",
        "gemma",
        "gemma2",
        "gemma3",
        "gpt2",
    ],
)
def test_the_model_module_by_module_in_float32_computes_what_a_float32_copy_computes(family):
    """The float32 look runs the user's bf16 model with each module on float32 copies of its
    own tensors (`float32_module_by_module`): the same logits, bit for bit, as a float32 deep
    copy (which held the whole model twice over), and the model's tensors untouched after,
    an exception inside included."""
    import copy

    from kernl.compiler.tasks.causal_lm.validate import (
        float32_module_by_module,
        reference_logits,
    )

    hf = tiny_model(family).to(torch.bfloat16)
    before = {k: (v.data_ptr(), v.dtype, v.clone()) for k, v in hf.state_dict().items()}
    originals = {m: {**m._parameters, **m._buffers} for m in hf.modules()}
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(1, VOCAB, (3, 12), generator=g)
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[1, :5] = False  # left padding
    keep = [4, 7, 11]
    expected = reference_logits(copy.deepcopy(hf).float(), seqs, valid, keep)
    with float32_module_by_module(hf):
        got = reference_logits(hf, seqs, valid, keep)
    assert torch.equal(got, expected)
    assert not torch.equal(reference_logits(hf, seqs, valid, keep), expected)  # bf16 differs
    layer = hf.model.layers[0] if hasattr(hf, "model") else hf.transformer.h[0]

    def cut_short(*args):
        raise RuntimeError("cut short")

    hook = layer.register_forward_hook(cut_short)
    with pytest.raises(RuntimeError, match="cut short"), float32_module_by_module(hf):
        reference_logits(hf, seqs, valid, keep)
    hook.remove()
    # a float32 copy that fails (memory) halfway through a module's tensors
    widen, made = torch.Tensor.float, [0]

    def out_of_memory_at_the_third(self, *args, **kwargs):
        made[0] += 1
        if made[0] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return widen(self, *args, **kwargs)

    with pytest.raises(torch.OutOfMemoryError), float32_module_by_module(hf):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.Tensor, "float", out_of_memory_at_the_third)
            reference_logits(hf, seqs, valid, keep)
    after = hf.state_dict()
    for k, (ptr, dtype, value) in before.items():
        assert after[k].data_ptr() == ptr and after[k].dtype == dtype
        assert torch.equal(after[k], value)
    for module in hf.modules():  # the very objects, in every slot, and no hook left
        assert not module._forward_pre_hooks and not module._forward_hooks
        for name, t in [*module._parameters.items(), *module._buffers.items()]:
            assert t is None or t is originals[module][name]
