"""On a GPU: BERT-base-sized fp16, compiled for CUDA, loaded with graphs, equal to eager."""

import pytest
import torch

import kernl.compiler
import kernl.runtime


def check_bert_against_eager(model, served, shapes, tol: float = 2e-2) -> None:
    """`served` (a loaded BERT artifact) against `model` in fp16 on the GPU, one call per
    (batch, seq) of `shapes`, the last row half padded: real positions and the pooler."""
    model = model.half().cuda()
    for b, s in shapes:
        ids = torch.randint(1000, 30000, (b, s), device="cuda")
        mask = torch.ones_like(ids)
        mask[-1, s // 2 :] = 0
        got = served(input_ids=ids, attention_mask=mask)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask)
        real = mask.bool()
        diff = got.last_hidden_state[real].float() - ref.last_hidden_state[real].float()
        assert diff.abs().max() < tol, f"{b}x{s}: {diff.abs().max()}"
        torch.testing.assert_close(got.pooler_output, ref.pooler_output, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_bert_base_fp16_on_cuda_matches_eager(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    kernl.compiler.compile(
        model, "batch=1,4 seq=32,128", tmp_path / "b.kernl", dtype="fp16", device="cuda"
    )
    served = kernl.runtime.load(tmp_path / "b.kernl", device="cuda")
    assert served._runners[served.buckets[0]].graph is not None  # captured at load
    check_bert_against_eager(model, served, [(1, 32), (3, 100), (4, 128)])
