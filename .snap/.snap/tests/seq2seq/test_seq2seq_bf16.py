"""Text seq2seq (T5 v1.0, T5 v1.1 gated, BART) in bf16: every step of kernl's greedy decode
against Hugging Face eager, teacher-forced on kernl's own prefix, in float32 (the reference)
and in bf16 (the stock op). The bar is STYLE rule 6: kernl's worst logit error against float32,
relative to the step's largest |logit|, is at most twice HF bf16's.

The models are random at moderate widths with initialisations of a trained model's scale
(the CPU tests' tiny configs use inflated weights, whose bf16 greedy ids already flip at
near-ties after a few tokens, inside the compiler's own validation). On the CPU the same check
runs in CI; on the GPU each step is a captured CUDA graph."""

from __future__ import annotations

import copy

import pytest
import torch

import kernl.compiler
import kernl.runtime

from .test_seq2seq_generate import FAMILIES, sources, tiny_seq2seq

VOCAB = 1024


def medium_seq2seq(family: str) -> torch.nn.Module:
    return tiny_seq2seq(
        family, d_model=256, heads=8, ffn=1024, layers=4, vocab=VOCAB, inflated=False
    )


def step_logit_errors(
    family: str, device: str, path, kernels: bool | None = None
) -> tuple[float, float]:
    """(kernl's worst relative logit error, HF bf16's) over 24 greedy steps of three sources
    of mixed lengths (padding in the source), both against HF float32. `kernels`: whether
    the loaded decode step must run on kernl's kernels (None: whatever compile chose)."""
    hf32 = medium_seq2seq(family).to(device)
    hf = copy.deepcopy(hf32).to(torch.bfloat16)
    kernl.compiler.compile(hf, "batch=1,4 source=16,32 cache=32", path, dtype="bf16", device=device)
    model = kernl.runtime.load(path, device=device)
    if kernels is not None:
        assert model.model.kernels == kernels and bool(model.manifest.kernels) == kernels
    ids, mask = sources([29, 7, 16], seed=3)
    steps = list(model.stream(ids, mask, max_new_tokens=24, eos_token_id=[], output_logits=True))
    new = torch.stack([s[0] for s in steps], dim=1).to(device)
    got = torch.stack([s[1] for s in steps], dim=1).to(device).float()
    start = torch.full((3, 1), hf32.config.decoder_start_token_id, device=device)
    dec = torch.cat([start, new[:, :-1]], 1)
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.float()
        r32 = hf32(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.float()
    scale = r32.abs().amax(-1, keepdim=True)
    err = ((got - r32).abs() / scale).amax().item()
    stock = ((ref - r32).abs() / scale).amax().item()
    return err, stock


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_step_logits_match_hugging_face_eager_on_the_cpu(family, tmp_path):
    err, stock = step_logit_errors(family, "cpu", tmp_path / "a")
    assert err <= 2 * stock, f"{family}: kernl bf16 {err:.4f} vs fp32, HF bf16 {stock:.4f}"


@pytest.mark.gpu
@pytest.mark.parametrize("decode", ["chosen", "kernl", "kernl-linear", "torch"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_step_logits_match_hugging_face_eager_on_the_gpu(
    family, decode, tmp_path, monkeypatch
):
    """On the GPU every step is a replayed CUDA graph; the decode step as the compiler chose
    it, and forced onto each variant: kernl's kernels with or without the norms folded in
    (their binaries recorded, none compiled at load), or torch."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from kernl.compiler.tasks.seq2seq import decode_kernels

    kernels = None
    if decode != "chosen":
        monkeypatch.setattr(decode_kernels, "FORCE", decode)
        kernels = decode != "torch"
    err, stock = step_logit_errors(family, "cuda", tmp_path / "a", kernels)
    assert err <= 2 * stock, f"{family}: kernl bf16 {err:.4f} vs fp32, HF bf16 {stock:.4f}"
