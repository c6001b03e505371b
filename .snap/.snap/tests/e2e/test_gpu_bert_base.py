"""On a GPU: BERT-base-sized fp16, compiled for CUDA, loaded with graphs, equal to eager."""

import pytest
import torch

import kernl.compiler
import kernl.runtime


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
    model = model.half().cuda()
    for b, s in [(1, 32), (3, 100), (4, 128)]:
        ids = torch.randint(1000, 30000, (b, s), device="cuda")
        mask = torch.ones_like(ids)
        mask[-1, s // 2 :] = 0
        got = served(input_ids=ids, attention_mask=mask)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask)
        real = mask.bool()
        err = (
            (got.last_hidden_state[real].float() - ref.last_hidden_state[real].float()).abs().max()
        )
        assert err < 2e-2, f"{b}x{s}: {err}"
        torch.testing.assert_close(got.pooler_output, ref.pooler_output, atol=2e-2, rtol=2e-2)
