"""RMSNorm rounded as Hugging Face rounds it: normalised in float32, rounded to the model's
dtype, then scaled by the weight in that dtype. kernl scaled before rounding (one rounding):
a quarter of fp16 norm outputs moved by an ulp, and greedy ids left Hugging Face's a score of
steps later. The tiny test models keep norm weights at 1, which hid it: here they are random."""

from __future__ import annotations

import torch

import kernl.compiler
import kernl.runtime

from .tiny_models import mixed_prompts, tiny_model


def test_the_first_logits_of_an_fp16_llama_with_random_norm_weights_are_hugging_faces(
    tmp_path,
):
    hf = tiny_model("llama3")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
    hf = hf.half()
    path = tmp_path / "lm.kernl"
    kernl.compiler.compile(hf, "batch=1,4 prompt=16 cache=32", path, dtype="fp16", device="cpu")
    model = kernl.runtime.load(path)
    ids, mask = mixed_prompts(3, [11, 4, 16])
    step = next(iter(model.stream(ids, mask, max_new_tokens=1, pad_token_id=0, output_logits=True)))
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(step[1], out.logits[0].float())
