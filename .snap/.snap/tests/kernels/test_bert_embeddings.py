import pytest
import torch
from kernel_check import DEVICE, assert_close, poisoned

from kernl.kernels.bert_embeddings import (
    BertEmbeddingsConfig,
    bert_embeddings,
    bert_embeddings_reference,
)


def _tables(V, P, T, H, dtype, device=DEVICE):
    return [torch.randn(n, H, dtype=dtype, device=device) for n in (V, P, T)] + [
        torch.randn(H, dtype=dtype, device=device),
        torch.randn(H, dtype=dtype, device=device),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H", [96, 40])
@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("config", [BertEmbeddingsConfig(), BertEmbeddingsConfig(1, 2)])
def test_bert_embeddings(dtype, H, with_ids, config):
    B, L = 3, 13
    tables = _tables(50, 20, 2, H, dtype)
    ids = torch.randint(0, 50, (B, L), device=DEVICE)
    types = torch.randint(0, 2, (B, L), device=DEVICE) if with_ids else None
    pos = (torch.arange(L, device=DEVICE) + 5)[None, :] if with_ids else None
    out = poisoned((B, L, H), dtype)
    bert_embeddings(ids, *tables, 1e-12, types, pos, out=out, config=config)
    ref = bert_embeddings_reference(ids, *[t.double() for t in tables], 1e-12, types, pos)
    stock = bert_embeddings_reference(ids, *tables, 1e-12, types, pos)
    assert_close(out, ref, dtype, stock, name="bert embeddings")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_real_sizes(dtype):
    B, L, H = 32, 512, 768
    tables = _tables(30522, 512, 2, H, dtype, "cuda")
    ids = torch.randint(0, 30522, (B, L), device="cuda")
    types = torch.randint(0, 2, (B, L), device="cuda")
    out = bert_embeddings(ids, *tables, 1e-12, types, out=poisoned((B, L, H), dtype, "cuda"))
    ref = bert_embeddings_reference(ids, *[t.double() for t in tables], 1e-12, types)
    assert_close(out, ref, dtype, bert_embeddings_reference(ids, *tables, 1e-12, types))
