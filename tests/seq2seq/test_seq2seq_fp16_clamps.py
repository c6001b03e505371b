"""fp16 encoder layers clamped as Hugging Face's are: Whisper's and mBART's always (to the
dtype's max - 1000), BART's and Marian's once a value is not finite, T5's every block
(tests/seq2seq/test_seq2seq_generate.py). Without it an encoder whose residual stream passed
65504 went to inf, then NaN at the next norm, and kernl generated garbage where Hugging Face
generated text."""

from __future__ import annotations

import pytest
import torch

import kernl.compiler
from kernl.runtime.generation.encoder_decoder import (
    _ENCODER_LAYER_CLAMPS,
    _clamp_always,
    _clamp_non_finite,
)

from .test_mbart_marian_generate import tiny_family
from .test_seq2seq_generate import BUCKETS, sources

TOP = 65504.0
CLAMPED = TOP - 1000


def _hf_clamp(x: torch.Tensor, always: bool) -> torch.Tensor:
    """Hugging Face's encoder-layer clamp, as modeling_mbart / modeling_bart write it."""
    if always or not torch.isfinite(x).all():
        return torch.clamp(x, min=-CLAMPED, max=CLAMPED)
    return x


@pytest.mark.parametrize(
    "values",
    [[1.0, 65000.0, -65000.0], [1.0, float("inf"), 65000.0], [float("nan"), 65000.0, 2.0]],
    ids=["finite", "inf", "nan"],
)
def test_the_clamps_are_hugging_faces(values):
    x = torch.tensor(values, dtype=torch.float16)
    for fn, always in ((_clamp_always, True), (_clamp_non_finite, False)):
        got, want = fn(x), _hf_clamp(x, always)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), (fn.__name__, got, want)
    assert set(_ENCODER_LAYER_CLAMPS) == {"whisper", "mbart", "bart", "marian"}


def test_mbart_in_fp16_past_its_range_is_clamped_like_hugging_face(tmp_path):
    """An mBART whose encoder residual passes 65504: Hugging Face's fp16 encoder clamps each
    layer; kernl's logits went NaN (inf through the next layer norm). Built from an fp32
    artifact cast to fp16, as the T5 case: in this regime fp16 leaves fp32's ids (HF's too)."""
    from kernl.artifacts import read_manifest
    from kernl.artifacts.reader import read_weights
    from kernl.runtime.generation.seq2seq import Seq2SeqModel

    hf = tiny_family("mbart")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.startswith("model.encoder.layers.") and name.endswith("fc2.weight"):
                p.mul_(1e4)
    kernl.compiler.compile(hf, BUCKETS, tmp_path / "a", dtype="fp32", device="cpu")
    manifest = read_manifest(tmp_path / "a")
    manifest.dtype = "float16"
    weights = {k: v.half() for k, v in read_weights(tmp_path / "a", device="cpu").items()}
    model = Seq2SeqModel(manifest, weights, torch.device("cpu"), capture="never")
    ids, mask = sources([13, 5, 9])
    with torch.no_grad():
        hidden = hf.half().model.encoder(
            input_ids=ids, attention_mask=mask, output_hidden_states=True
        )
    clamped = torch.tensor(CLAMPED, dtype=torch.float16).item()  # 64512: fp16's nearest
    assert max(h.abs().max().item() for h in hidden.hidden_states) == clamped  # HF clamps
    assert torch.isfinite(hidden.last_hidden_state).all()
    steps = list(model.stream(ids, mask, max_new_tokens=6, eos_token_id=[], output_logits=True))
    assert torch.isfinite(torch.stack([s[1] for s in steps])).all()


def test_the_logits_bias_is_added_in_the_models_dtype_as_hugging_face_adds_it(tmp_path):
    """BART's family adds `final_logits_bias` in fp16, so its logits lie on fp16's grid, with
    exact ties that argmax breaks by index; kernl added it in float32 (57% of the logits
    off that grid, ties broken otherwise)."""
    hf = tiny_family("mbart").half()
    hf.generation_config.forced_bos_token_id = None
    with torch.no_grad():
        hf.final_logits_bias.normal_(0, 1.0)
    kernl.compiler.compile(hf, BUCKETS, tmp_path / "a", dtype="fp16", device="cpu")
    model = kernl.runtime.load(tmp_path / "a", device="cpu")
    ids, mask = sources([13, 5, 9])
    first = next(iter(model.stream(ids, mask, max_new_tokens=1, output_logits=True)))[1]
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=1,
            do_sample=False,
            num_beams=1,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(first, first.half().float())  # on fp16's grid, as HF's
    assert torch.equal(out.logits[0], out.logits[0].half().float())
    # (the values: within fp16's rounding of this inflated model's ~10-wide logits)
    torch.testing.assert_close(first, out.logits[0], atol=0.05, rtol=0)


def test_a_t5_compiled_in_fp16_says_it_is_not_from_pretrained_in_fp16(tmp_path):
    from .test_seq2seq_generate import tiny_seq2seq

    hf = tiny_seq2seq("t5", inflated=False)
    lines: list[str] = []
    kernl.compiler.compile(
        hf, BUCKETS, tmp_path / "a", dtype="fp16", device="cpu", progress=lines.append
    )
    assert any("model.half()" in line and "bf16" in line for line in lines), lines
