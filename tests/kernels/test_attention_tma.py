"""The TMA attention kernel (attention_tma.py): q, k, v and out tiles through descriptors, a
persistent grid walking (batch, head, query block) tiles, one key block or streamed blocks.
On the CPU (Triton's interpreter) the grid is a few programs per two "SMs", so each program
walks several tiles; outputs start as NaN, so a tile left unwritten shows."""

import math

import pytest
import torch
from kernel_check import DEVICE, assert_close, poisoned
from test_attention import _run

from kernl.kernels import attention_tma
from kernl.kernels.attention import (
    AttentionConfig,
    attention,
    attention_configs,
    attention_reference,
)
from kernl.runtime import kernl_ops

DTYPES = [torch.float32, torch.float16]


def _config(block_m, block_n, per_sm=2, warps=4, stages=2):
    return AttentionConfig(block_m, block_n, warps, stages, False, per_sm, tma=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "Lq,Lk,block_m,block_n",
    [(32, 32, 16, 32), (37, 29, 16, 32), (40, 70, 16, 32), (16, 64, 16, 16)],
    ids=["one-block", "ragged-one-block", "streamed-ragged", "streamed-even"],
)
def test_heads_in_their_own_rows(dtype, Lq, Lk, block_m, block_n):
    # contiguous [B, H, L, D]: each head its own rows; 37 queries leave a partial query block
    # (its store must stop at the batch's last row), 29 / 70 keys a masked key tail
    _run(2, 3, 3, Lq, Lk, 32, dtype, _config(block_m, block_n))


def _qkv_views(B, L, H, D, dtype):
    qkv = torch.randn(B, L, 3, H, D, dtype=dtype, device=DEVICE)
    return [qkv[:, :, i].transpose(1, 2) for i in range(3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,block_n", [(24, 32), (48, 16)], ids=["one-block", "streamed"])
def test_fused_qkv_views_padding_mask_and_merged_heads_out(dtype, L, block_n):
    # as kernl_ops.attention runs it in an encoder: q/k/v views of one QKV projection, a
    # padding mask one row for all queries (a row with every key masked gives zeros), the
    # output written as [B, L, H, D] and seen as [B, H, L, D]
    B, H, D = 3, 2, 32
    q, k, v = _qkv_views(B, L, H, D, dtype)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool, device=DEVICE)
    mask[1, ..., 17:] = False
    mask[2] = False
    cfg = {**_config(16, block_n).__dict__}
    out = kernl_ops.attention(q, k, v, mask, 1 / math.sqrt(D), False, impl="triton", config=cfg)
    assert not out.is_contiguous()
    ref = attention_reference(q.double(), k.double(), v.double(), key_padding_mask=mask[:, 0, 0])
    stock = attention_reference(q, k, v, key_padding_mask=mask[:, 0, 0])
    assert_close(out, ref, dtype, stock, name="tma attention, fused QKV")
    assert (out[2] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_n", [32, 16])
def test_full_bias_and_key_padding_mask(dtype, block_n):
    B, H, Lq, Lk = 2, 2, 17, 23
    bias = torch.randn(1, H, Lq, Lk, dtype=dtype, device=DEVICE)
    mask = torch.rand(B, Lk, device=DEVICE) > 0.3
    _run(B, H, H, Lq, Lk, 32, dtype, _config(16, block_n), bias=bias, key_padding_mask=mask)


@pytest.mark.parametrize("H,H_kv", [(4, 2), (4, 1)])
@pytest.mark.parametrize("block_n", [32, 16])
def test_gqa_with_kv_lens(H, H_kv, block_n):
    kv_lens = torch.tensor([30, 7, 0], device=DEVICE)  # the last row sees nothing: zeros
    out = _run(3, H, H_kv, 9, 30, 32, torch.float16, _config(16, block_n), kv_lens=kv_lens)
    assert (out[2] == 0).all()


def test_gqa_in_row_layout():
    # [B, L, H, D] q and [B, L, H_kv, D] k / v, heads side by side in a row
    B, L, H, H_kv, D = 2, 20, 4, 2, 16
    q = torch.randn(B, L, H, D, device=DEVICE).transpose(1, 2)
    k = torch.randn(B, L, H_kv, D, device=DEVICE).transpose(1, 2)
    v = torch.randn(B, L, H_kv, D, device=DEVICE).transpose(1, 2)
    out = poisoned((B, L, H, D), torch.float32).transpose(1, 2)
    attention(q, k, v, out=out, config=_config(16, 32))
    ref = attention_reference(q.double(), k.double(), v.double())
    assert_close(out, ref, torch.float32, attention_reference(q, k, v), name="tma gqa in row")


def test_refuses_what_it_cannot_do():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="not causal"):
        attention(q, q, q, causal=True, config=_config(16, 16))
    odd = torch.randn(1, 2, 8, 24, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 24"):
        attention(odd, odd, odd, config=_config(16, 16))
    # the head dim not contiguous: [B, L, D, H] seen as [B, H, L, D]
    scattered = torch.randn(2, 8, 16, 2, device=DEVICE).permute(0, 3, 1, 2)
    with pytest.raises(ValueError, match="heads side by side"):
        attention(scattered, scattered, scattered, config=_config(16, 16))
    with pytest.raises(ValueError, match="at most 256 rows"):
        attention(q, q, q, config=_config(16, 512))


def test_configs_offered_for_half_precision_encoder_calls_only():
    def qkv(n, dtype=torch.float16):
        return [t.to("meta") for t in _qkv_views(1, n, 2, 64, torch.float32)], dtype

    def tma(n, dtype=torch.float16, causal=False):
        (q, k, v), _ = qkv(n)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        return [c for c in attention_configs(k, causal, q, v) if c.tma]

    one = tma(128)
    assert one and {c.BLOCK_N for c in one} == {128}
    assert {c.BLOCK_N for c in tma(512)} <= {64, 128} and tma(512)
    assert all(c.BLOCK_M <= 64 for c in tma(16))  # query blocks no wider than needed
    assert tma(128, causal=True) == [] and tma(128, torch.float32) == []
    k = torch.empty(1, 2, 128, 64, device="meta")
    assert not [c for c in attention_configs(k) if c.tma]  # q and v not given


def test_persistent_grid_is_programs_per_sm_times_sms(monkeypatch):
    grids = []
    monkeypatch.setattr(
        attention_tma, "launch_kernel", lambda kernel, grid, *a, **kw: grids.append(grid)
    )
    q = torch.randn(4, 3, 16, 16, device="cpu")
    cfg = dict(sm_scale=0.25, bias=None, kv_lens=None, block_m=16, block_n=16)
    cfg |= dict(num_warps=4, num_stages=2)
    attention_tma.tma_attention(q, q, q, q.clone(), programs_per_sm=3, **cfg)
    attention_tma.tma_attention(q, q, q, q.clone(), programs_per_sm=50, **cfg)
    # 2 "SMs" on the CPU: 6 programs; never more programs than the 12 tiles
    assert grids == [(6,), (12,)]


def _bert_tma_configs():
    found = []
    for keys in (128, 512):
        q, k, v = (t.to("meta", torch.float16) for t in _qkv_views(1, keys, 12, 64, torch.float32))
        found += [(keys, c) for c in attention_configs(k, False, q, v) if c.tma]
    return found


@pytest.mark.gpu
@pytest.mark.parametrize("keys,config", _bert_tma_configs(), ids=str)
def test_gpu_bert_shapes_every_config(keys, config):
    # BERT-base at 8 or 32 x keys: q/k/v views of one QKV projection, right-padded rows
    B, H, D = 32 if keys == 128 else 8, 12, 64
    q, k, v = (t.cuda() for t in _qkv_views(B, keys, H, D, torch.float16))
    lens = torch.randint(1, keys + 1, (B,), device="cuda")
    keep = torch.arange(keys, device="cuda")[None, :] < lens[:, None]
    bias = torch.zeros(B, 1, 1, keys, device="cuda").masked_fill(
        ~keep[:, None, None, :], float("-inf")
    )
    out = poisoned((B, keys, H, D), torch.float16, "cuda").transpose(1, 2)
    attention(q, k, v, bias=bias, out=out, config=config)
    ref = attention_reference(q.double(), k.double(), v.double(), bias=bias.double())
    stock = attention_reference(q, k, v, bias=bias.half())
    assert_close(out, ref, torch.float16, stock, name=f"gpu tma attention {keys} {config}")


@pytest.mark.gpu
@pytest.mark.parametrize("block_n", [64, 128])
def test_gpu_bf16_contiguous_heads_full_bias(block_n):
    bias = torch.randn(4, 12, 100, 300, dtype=torch.bfloat16, device="cuda")
    _run(4, 12, 12, 100, 300, 64, torch.bfloat16, _config(128, block_n, 1, 8, 3), bias=bias)
    _run(4, 12, 4, 100, 100, 128, torch.bfloat16, _config(64, 128), bias=None)
