"""On a GPU: the captured graphs generate the same greedy ids as Hugging Face eager (fp32, tiny
Llama-3), and a decode step is one graph replay."""

from __future__ import annotations

import pytest
import torch

import kernl.compiler
import kernl.runtime

from .tiny_models import mixed_prompts, tiny_model


@pytest.mark.gpu
def test_cuda_graph_generation_matches_eager(tmp_path):
    hf = tiny_model("llama3").cuda()
    kernl.compiler.compile(
        hf, "batch=1,4 prompt=8,16 cache=48,96", tmp_path / "lm.kernl", dtype="fp32",
        device="cuda", task="causal-lm",
    )  # fmt: skip
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    assert all(step.graph is not None for step in model._steps.values())
    ids, mask = mixed_prompts(3, [11, 4, 16])
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=64,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    out = model.generate(ids.cuda(), mask.cuda(), max_new_tokens=64, eos_token_id=[])
    assert out.device.type == "cuda"
    assert torch.equal(out, ref)
    a = model.generate(ids, mask, max_new_tokens=16, do_sample=True, seed=5, eos_token_id=[])
    b = model.generate(ids, mask, max_new_tokens=16, do_sample=True, seed=5, eos_token_id=[])
    assert torch.equal(a, b)
