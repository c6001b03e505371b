"""The fused QKV projection + attention (kernels/qkv_attention.py) against float64: on the
interpreter in fp32 and fp16, on the GPU in fp16 and bf16 at BERT-base's sizes."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_check import DEVICE, assert_close, poisoned

from kernl.kernels.qkv_attention import (
    QKVAttentionConfig,
    qkv_attention,
    qkv_attention_reference,
    qkv_attention_refusal,
)


def _case(B, L, H, D, dtype, *, qkv_bias=True, padded=True, seed=0, masked=float("-inf")):
    g = torch.Generator().manual_seed(seed)
    C = H * D
    x = torch.randn(B, L, C, generator=g).to(DEVICE, dtype)
    w = (torch.randn(3 * C, C, generator=g) / C**0.5).to(DEVICE, dtype)
    b = torch.randn(3 * C, generator=g).to(DEVICE, dtype) if qkv_bias else None
    pad = None
    if padded:
        keep = torch.ones(B, L, dtype=torch.bool)
        keep[0, L // 2 :] = False  # a right-padded first row
        if B > 2:
            keep[2, :] = False  # a row with no visible key: zeros, not NaN
        pad = torch.zeros(B, L).masked_fill(~keep, masked).to(DEVICE)
    return x, w, b, pad


def _check(B, L, H, D, dtype, config, **kw):
    x, w, b, pad = _case(B, L, H, D, dtype, **kw)
    scale = 1 / math.sqrt(D)
    out = poisoned((B, L, H * D), dtype)
    qkv_attention(x, w, b, pad, out, num_heads=H, sm_scale=scale, config=config)
    ref = qkv_attention_reference(
        x.double(), w.double(), None if b is None else b.double(),
        None if pad is None else pad.double(), num_heads=H, sm_scale=scale,
    )  # fmt: skip
    stock = qkv_attention_reference(x, w, b, pad, num_heads=H, sm_scale=scale)
    assert_close(out, ref, dtype, stock, name=f"qkv_attention {B}x{L} H={H} D={D} {config}")


SMALL = QKVAttentionConfig(block_k=16, num_warps=4, num_stages=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qkv_attention_matches_float64(dtype):
    # 24 tokens in a block of 32 (rows past L read zeros, stores past it dropped), three K steps
    _check(3, 24, 2, 16, dtype, SMALL)
    _check(2, 16, 3, 16, dtype, SMALL, qkv_bias=False, padded=False)


def test_qkv_attention_takes_float32s_minimum_as_eager_does():
    # finfo.min, not -inf, on masked keys: the row with none visible averages v, as in eager
    # (times log2(e), float32's minimum overflowed to -inf and the row came out as zeros)
    _check(3, 24, 2, 16, torch.float32, SMALL, masked=torch.finfo(torch.float32).min)


def test_qkv_attention_wide_k_steps_and_full_block():
    _check(2, 32, 2, 32, torch.float16, QKVAttentionConfig(block_k=32, num_warps=4, num_stages=3))


def test_qkv_attention_refuses_what_it_cannot_take():
    x = torch.zeros(1, 200, 64)
    w = torch.zeros(192, 64)
    assert "longer than one block" in qkv_attention_refusal(x, w, 4)
    assert "power of two" in qkv_attention_refusal(torch.zeros(1, 8, 48), torch.zeros(144, 48), 2)
    assert "fused QKV weight" in qkv_attention_refusal(torch.zeros(1, 8, 64), w[:100], 4)
    assert qkv_attention_refusal(torch.zeros(1, 8, 64), w, 4) is None
    with pytest.raises(ValueError, match="longer than one block"):
        qkv_attention(x, w, None, None, torch.empty_like(x), num_heads=4, sm_scale=0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,L", [(32, 128), (8, 100), (4, 16)])
def test_gpu_qkv_attention_bert_base(dtype, B, L):
    if DEVICE != "cuda":
        pytest.skip("needs a GPU")
    for config in (QKVAttentionConfig(), QKVAttentionConfig(64, 4, 2)):
        _check(B, L, 12, 64, dtype, config)
