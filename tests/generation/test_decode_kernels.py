"""A decode step on kernl's Triton kernels (Triton's interpreter on the CPU) or on SDPA computes
what the plain-torch step computes: same ids, logits within float32 rounding, for every
family, with a batch of mixed prompt lengths (left padding: the slot mask matters)."""

from __future__ import annotations

import pytest
import torch

import kernl.compiler
import kernl.runtime
from kernl.runtime.generation_decoder import DecodeKernels

from .tiny_models import mixed_prompts, tiny_model

VARIANTS = [
    DecodeKernels(attention="triton"),
    DecodeKernels(attention="sdpa"),
    DecodeKernels(norm="triton", gated_mlp="triton"),
]
NEW = 12


@pytest.fixture(scope="module", params=["llama3", "qwen2", "gpt2"])
def artifact(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "lm.kernl"
    kernl.compiler.compile(
        tiny_model(request.param), "batch=4 prompt=16 cache=32", out, dtype="fp32",
        device="cpu", task="causal-lm",
    )  # fmt: skip
    return out


def _steps(model, ids, mask):
    steps = list(
        model.stream(ids, mask, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0,
                     output_logits=True)
    )  # fmt: skip
    return torch.stack([i for i, _ in steps], 1), torch.stack([lg for _, lg in steps], 1)


@pytest.mark.parametrize("kernels", VARIANTS, ids=lambda k: f"{k.attention}-{k.norm}-{k.gated_mlp}")
def test_decode_variant_matches_torch_step(artifact, kernels):
    model = kernl.runtime.load(artifact)
    assert model.decoder.kernels == DecodeKernels()  # the artifact asks for nothing else
    ids, mask = mixed_prompts(3, [11, 4, 16])
    ref_ids, ref_logits = _steps(model, ids, mask)
    model.decoder.kernels = kernels
    out_ids, out_logits = _steps(model, ids, mask)
    assert out_logits.shape == ref_logits.shape == (3, NEW, 97)
    err = (out_logits - ref_logits).abs().max().item()
    assert err < 1e-4 * max(1.0, ref_logits.abs().max().item()), err
    assert torch.equal(out_ids, ref_ids)


def test_decode_kernels_are_checked():
    with pytest.raises(ValueError, match="attention must be one of"):
        DecodeKernels(attention="flash")
    assert DecodeKernels.from_dict({"norm": "triton"}) == DecodeKernels(norm="triton")
    assert DecodeKernels.from_dict(None) == DecodeKernels()
