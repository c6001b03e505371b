"""Validation of an fp16 compile: where kernl is further from eager fp16 than the tolerance, the
bucket still passes if kernl is no further from eager float32 than eager fp16 is (a deep bf16
DeBERTa-v3 was refused, 2026-12-05, though kernl was closer to float32 than eager); a program
that is less accurate is refused as before."""

import pytest
import torch
import transformers as T

import kernl.compiler
import kernl.runtime.kernl_ops as kernl_ops
from kernl.compiler.validate import ValidationError

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             vocab_size=120, max_position_embeddings=80)  # fmt: skip


def bert():
    torch.manual_seed(0)
    return T.BertModel(T.BertConfig(**SMALL)).eval()


def test_a_tolerance_fp16_itself_misses_passes_where_kernl_is_as_accurate(tmp_path):
    """atol=rtol=0: the rounding differences of kernl's kernels (fp32 accumulators, one
    rounding per fused op) from eager fp16 are beyond it; they are no further from float32."""
    said = []
    report = kernl.compiler.compile(bert(), "batch=2 seq=8", tmp_path / "a", dtype="fp16",
                                    device="cpu", atol=0.0, rtol=0.0,
                                    progress=said.append)  # fmt: skip
    assert len(report.buckets) == 1 and report.buckets[0].max_abs_error > 0
    note = [m for m in said if "no less accurate" in m]
    assert note and "from float32, eager torch.float16" in note[0], said


def test_a_program_less_accurate_than_eager_fp16_is_refused(tmp_path, monkeypatch):
    real = kernl_ops.layer_norm

    def noisy(x, *args, **kwargs):  # 2% off: far beyond fp16's own error
        return real(x, *args, **kwargs) * 1.02

    monkeypatch.setitem(kernl_ops.OPS, "kernl.layer_norm", noisy)
    with pytest.raises(ValidationError, match="differs from eager"):
        kernl.compiler.compile(bert(), "batch=2 seq=8", tmp_path / "a", dtype="fp16",
                               device="cpu", atol=1e-3, rtol=0.0)  # fmt: skip


def test_a_refusal_says_when_the_float32_look_could_not_be_made(tmp_path, monkeypatch):
    """The float32 copy does not fit (out of memory): the refusal stands on the tolerance
    alone, and says so, rather than reading as a plain tolerance failure (a 7B model's float32
    copy seldom fits beside it)."""
    import kernl.compiler.validate as validate

    real = kernl_ops.layer_norm
    monkeypatch.setitem(
        kernl_ops.OPS, "kernl.layer_norm", lambda x, *a, **k: real(x, *a, **k) * 1.02
    )
    flat_model = validate.FlatModel

    class NoFloat32(flat_model):
        def __call__(self, *args):
            if next(self.model.parameters()).dtype == torch.float32:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 26 GiB")
            return super().__call__(*args)

    monkeypatch.setattr(validate, "FlatModel", NoFloat32)
    with pytest.raises(ValidationError) as refused:
        kernl.compiler.compile(bert(), "batch=2 seq=8", tmp_path / "a", dtype="fp16",
                               device="cpu", atol=1e-3, rtol=0.0)  # fmt: skip
    message = str(refused.value)
    assert "differs from eager" in message
    assert "No float32 look (the model in float32 does not fit in memory)" in message
