"""The causal-LM validation's eager reference reads only the positions it compares and goes
through the rows in passes whose attention scores fit a budget: a Gemma2 compile at batch 8
and an 8192-token cache ran out of memory on an 80 GB GPU reading [8, 8, 8192, 8192] float32
scores and [8, 8192, 256000] logits at once. The logits are those of one full forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kernl.compiler.tasks.causal_lm.validate import reference_logits, reference_rows_per_pass

from .tiny_models import mixed_prompts, tiny_model


def _full_forward(hf, seqs, valid, keep):
    position_ids = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)
    with torch.no_grad():
        out = hf(input_ids=seqs, attention_mask=valid.long(), position_ids=position_ids)
    return out.logits[:, keep].float()


@pytest.mark.parametrize("family", ["llama3", "gemma2_window", "gpt2"])
def test_passes_of_rows_give_the_logits_of_one_full_forward(family):
    hf = tiny_model(family)
    ids, mask = mixed_prompts(4, [16, 3, 9, 12])
    valid = mask.bool()
    keep = [0, 7, 14, 15]
    whole = _full_forward(hf, ids, valid, keep)
    one_pass = reference_logits(hf, ids, valid, keep)
    row_by_row = reference_logits(hf, ids, valid, keep, score_bytes=1)
    assert one_pass.shape == row_by_row.shape == (4, len(keep), hf.config.vocab_size)
    torch.testing.assert_close(one_pass, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(row_by_row, whole, rtol=0, atol=1e-5)


def test_a_model_without_logits_to_keep_is_sliced_after_its_forward():
    class NoKeep(torch.nn.Module):
        config = SimpleNamespace(num_attention_heads=2)

        def forward(self, input_ids, attention_mask, position_ids, use_cache):
            return SimpleNamespace(logits=(input_ids[..., None] * 1.0 + position_ids[..., None]))

    seqs = torch.tensor([[0, 5, 6, 7], [1, 2, 3, 4], [9, 9, 9, 9]])
    valid = torch.tensor([[False, True, True, True], [True] * 4, [True] * 4])
    got = reference_logits(NoKeep(), seqs, valid, [1, 3], score_bytes=1)
    assert got[:, :, 0].tolist() == [[5.0, 9.0], [3.0, 7.0], [10.0, 12.0]]


def test_rows_per_pass_fit_the_budget():
    model = SimpleNamespace(config=SimpleNamespace(num_attention_heads=8))
    # Gemma2 at 8x8192: one row of [8, 8192, 8192] float32 scores is 2 GiB, over 1 GiB
    assert reference_rows_per_pass(model, 8192, 1 << 30) == 1
    assert reference_rows_per_pass(model, 2048, 1 << 30) == 8  # 128 MiB a row
    assert reference_rows_per_pass(model, 64, 1 << 30) == (1 << 30) // (8 * 64 * 64 * 4)
