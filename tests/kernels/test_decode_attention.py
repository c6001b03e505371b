import pytest
import torch
from kernel_check import DEVICE, assert_close, poisoned

from kernl.kernels.decode_attention import (
    DecodeAttentionConfig,
    decode_attention,
    decode_attention_reference,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H,H_kv,D", [(4, 4, 64), (8, 2, 80), (4, 1, 32)])
@pytest.mark.parametrize("config", [None, DecodeAttentionConfig(16, 4, 2, 5)])
def test_decode_attention(dtype, H, H_kv, D, config):
    B, Lk = 3, 77
    q = torch.randn(B, H, 1, D, dtype=dtype, device=DEVICE)
    k = torch.randn(B, H_kv, Lk, D, dtype=dtype, device=DEVICE)
    v = torch.randn(B, H_kv, Lk, D, dtype=dtype, device=DEVICE)
    kv_lens = torch.tensor([77, 0, 30], device=DEVICE)  # row 1 has an empty cache: zeros
    out = poisoned(q.shape, dtype)
    decode_attention(q, k, v, kv_lens=kv_lens, out=out, config=config)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), kv_lens=kv_lens)
    stock = decode_attention_reference(q, k, v, kv_lens=kv_lens)
    assert_close(out, ref, dtype, stock, name="decode attention")
    assert (out[1] == 0).all()


def test_decode_attention_strided_cache_no_lens():
    # a static cache [B, Lmax, H_kv, D] viewed as [B, H_kv, Lmax, D]
    B, H, H_kv, Lk, D = 2, 4, 2, 50, 32
    cache = torch.randn(2, B, Lk, H_kv, D, device=DEVICE)
    k, v = cache[0].transpose(1, 2), cache[1].transpose(1, 2)
    q = torch.randn(B, H, 1, D, device=DEVICE)
    out = decode_attention(q, k, v, sm_scale=0.2, config=DecodeAttentionConfig(16, 4, 2, 3))
    ref = decode_attention_reference(q.double(), k.double(), v.double(), sm_scale=0.2)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_kv_mask(dtype):
    # a generation cache: left-padded prompts, slots past the current one not yet written
    B, H, H_kv, Lk, D = 4, 8, 2, 70, 64
    cache = torch.randn(2, 1, B, H_kv, 96, D, dtype=dtype, device=DEVICE)  # 96 slots, 70 used
    k, v = cache[0, 0, :, :, :Lk], cache[1, 0, :, :, :Lk]
    q = torch.randn(B, H, 1, D, dtype=dtype, device=DEVICE)
    valid = torch.zeros(B, 96, dtype=torch.bool, device=DEVICE)
    valid[0, :Lk] = True
    valid[1, 13:61] = True  # left padding and a short row
    valid[2, 69] = True  # one real slot, the last
    # row 3: nothing to attend to: zeros
    kv_mask = valid[:, :Lk]
    out = poisoned(q.shape, dtype)
    config = DecodeAttentionConfig(16, 4, 2, 3)
    decode_attention(q, k, v, kv_mask=kv_mask, out=out, config=config)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), kv_mask=kv_mask)
    stock = decode_attention_reference(q, k, v, kv_mask=kv_mask)
    assert_close(out, ref, dtype, stock, name="decode attention, kv mask")
    assert (out[3] == 0).all()
    # with lengths too: both apply
    lens = torch.tensor([40, 70, 70, 70], device=DEVICE)
    decode_attention(q, k, v, kv_mask=kv_mask, kv_lens=lens, out=out, config=config)
    ref = decode_attention_reference(
        q.double(), k.double(), v.double(), kv_mask=kv_mask, kv_lens=lens
    )
    assert_close(out, ref, dtype, stock=None, name="decode attention, kv mask and lengths")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Lk", [1000, 16384])
def test_gpu_decode_real_sizes(dtype, Lk):
    B, H, H_kv, D = 4, 32, 8, 128
    q = torch.randn(B, H, 1, D, dtype=dtype, device="cuda")
    k = torch.randn(B, H_kv, Lk, D, dtype=dtype, device="cuda")
    v = torch.randn(B, H_kv, Lk, D, dtype=dtype, device="cuda")
    kv_lens = torch.tensor([Lk, Lk // 2, 1, Lk - 7], device="cuda")
    out = poisoned(q.shape, dtype, "cuda")
    decode_attention(q, k, v, kv_lens=kv_lens, out=out)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), kv_lens=kv_lens)
    stock = decode_attention_reference(q, k, v, kv_lens=kv_lens)
    assert_close(out, ref, dtype, stock, name="gpu decode")
