"""The short-key attention kernel (attention_short.py): every key in one block, a persistent
grid walking (batch, head, query block) tiles. On the CPU the grid is two programs per "SM"
(two SMs), so every case here walks several tiles per program."""

import math

import pytest
import torch
from kernel_check import DEVICE, assert_close, poisoned
from test_attention import (  # the flash kernel's checks: the same functions, a config apart
    _run,
    eager_mask_bias,
)

from kernl.kernels import attention_short
from kernl.kernels.attention import (
    AttentionConfig,
    attention,
    attention_configs,
    attention_reference,
)
from kernl.runtime import kernl_ops

DTYPES = [torch.float32, torch.float16]


def _config(block_m, block_n, per_sm=2, warps=4, stages=2):
    return AttentionConfig(block_m, block_n, warps, stages, False, per_sm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "Lq,Lk,block_m,block_n", [(16, 16, 16, 16), (37, 37, 16, 64), (32, 32, 32, 32)]
)
def test_self_attention_walks_tiles(dtype, Lq, Lk, block_m, block_n):
    # 2 x 3 heads x query blocks > the 4 programs: each program computes several tiles;
    # 37 keys in a 64-wide block leave a masked tail, 37 queries a partial query block
    _run(2, 3, 3, Lq, Lk, 64, dtype, _config(block_m, block_n))


@pytest.mark.parametrize("D", [32, 80])
def test_head_dims_padded(D):
    _run(2, 2, 2, 20, 20, D, torch.float32, _config(16, 32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_bias_one_row_for_all_queries(dtype):
    # BERT's mask: [B, 1, 1, Lk] of 0 / -inf with holes and a fully masked row (zeros out)
    B, H, L = 3, 2, 32
    keep = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    keep[0, 20:] = False
    keep[1, ::3] = False
    keep[2] = False
    bias = torch.zeros(B, 1, 1, L, dtype=dtype, device=DEVICE)
    bias = bias.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = _run(B, H, H, L, L, 64, dtype, _config(16, 32), bias=bias)
    assert (out[2] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_key", [True, False])
def test_a_mask_of_the_dtypes_minimum_is_served_as_eager(dtype, per_key):
    B, H, L = 2, 2, 32
    bias = eager_mask_bias(B, L, L, dtype, per_key)
    out = _run(B, H, H, L, L, 64, dtype, _config(16, 32), bias=bias)
    assert out[1].abs().amax() > 0.01  # the mean of v, not zeros


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_bias_and_key_padding_mask(dtype):
    B, H, Lq, Lk = 2, 2, 17, 23
    bias = torch.randn(1, H, Lq, Lk, dtype=dtype, device=DEVICE)
    mask = torch.rand(B, Lk, device=DEVICE) > 0.3
    _run(B, H, H, Lq, Lk, 32, dtype, _config(16, 32), bias=bias, key_padding_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,H_kv", [(4, 2), (4, 1)])
def test_gqa_with_kv_lens(dtype, H, H_kv):
    kv_lens = torch.tensor([30, 7, 0], device=DEVICE)  # the last row sees nothing: zeros
    out = _run(3, H, H_kv, 9, 30, 32, dtype, _config(16, 32), kv_lens=kv_lens)
    assert (out[2] == 0).all()


def test_fused_qkv_strided_views_and_merged_heads_out():
    # as kernl_ops.attention runs it in an encoder: q/k/v views of one QKV projection, the
    # output written as [B, L, H, D] and seen as [B, H, L, D]
    B, L, H, D = 2, 24, 3, 64
    qkv = torch.randn(B, L, 3, H, D, device=DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool, device=DEVICE)
    mask[1, ..., 17:] = False
    cfg = {**_config(16, 32).__dict__}
    out = kernl_ops.attention(q, k, v, mask, 1 / math.sqrt(D), False, impl="triton", config=cfg)
    assert not out.is_contiguous()
    ref = attention_reference(q.double(), k.double(), v.double(), key_padding_mask=mask[:, 0, 0])
    assert_close(out, ref, torch.float32)


def test_refuses_what_it_cannot_do():
    q = torch.randn(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="not causal"):
        attention(q, q, q, causal=True, config=_config(16, 16))
    k = torch.randn(1, 1, 40, 16, device=DEVICE)
    with pytest.raises(ValueError, match="40 keys > 32"):
        attention(q, k, k, config=_config(16, 32))


def test_configs_join_where_the_keys_fit_one_block():
    base = attention_configs()
    assert all(c.programs_per_sm == 0 for c in base)

    def keys(n):
        return torch.empty(1, 1, n, 64, device="meta")

    short = [c for c in attention_configs(keys(128)) if c.programs_per_sm]
    assert short and {c.BLOCK_N for c in short} == {128}
    assert all(c.BLOCK_M <= 128 for c in short)
    assert {c.BLOCK_M for c in attention_configs(keys(16)) if c.programs_per_sm} == {16}
    assert {c.BLOCK_N for c in attention_configs(keys(200)) if c.programs_per_sm} == {256}
    assert attention_configs(keys(512)) == base
    assert attention_configs(keys(128), causal=True) == base


def test_persistent_grid_is_programs_per_sm_times_sms(monkeypatch):
    grids = []
    monkeypatch.setattr(
        attention_short, "launch_kernel", lambda kernel, grid, *a, **kw: grids.append(grid)
    )
    q = torch.randn(4, 3, 16, 16, device="cpu")
    cfg = dict(sm_scale=0.25, bias=None, kv_lens=None, block_m=16, block_n=16)
    cfg |= dict(num_warps=4, num_stages=2)
    attention_short.short_attention(q, q, q, q.clone(), programs_per_sm=3, **cfg)
    attention_short.short_attention(q, q, q, q.clone(), programs_per_sm=50, **cfg)
    # 2 "SMs" on the CPU: 6 programs; never more programs than the 12 tiles
    assert grids == [(6,), (12,)]


def _bert_short_configs():
    found = []
    for keys in (16, 128):
        k = torch.empty(1, 1, keys, 64, device="meta")
        found += [(keys, c) for c in attention_configs(k) if c.programs_per_sm]
    return found


@pytest.mark.gpu
@pytest.mark.parametrize("keys,config", _bert_short_configs(), ids=str)
def test_gpu_bert_shapes_every_config(keys, config):
    # BERT-base at 32 x keys: q/k/v views of one QKV projection, right-padded rows
    B, H, D = 32, 12, 64
    qkv = torch.randn(B, keys, 3, H, D, dtype=torch.float16, device="cuda")
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    lens = torch.randint(1, keys + 1, (B,), device="cuda")
    keep = torch.arange(keys, device="cuda")[None, :] < lens[:, None]
    bias = torch.zeros(B, 1, 1, keys, device="cuda").masked_fill(
        ~keep[:, None, None, :], float("-inf")
    )
    out = poisoned((B, H, keys, D), torch.float16, "cuda")
    attention(q, k, v, bias=bias, out=out, config=config)
    ref = attention_reference(q.double(), k.double(), v.double(), bias=bias.double())
    stock = attention_reference(q, k, v, bias=bias.half())
    assert_close(out, ref, torch.float16, stock, name=f"gpu short attention {keys} {config}")


@pytest.mark.gpu
def test_gpu_bf16_full_bias():
    _run(4, 12, 12, 100, 100, 64, torch.bfloat16, _config(64, 128), bias=None)
    bias = torch.randn(4, 12, 100, 100, dtype=torch.bfloat16, device="cuda")
    _run(4, 12, 12, 100, 100, 64, torch.bfloat16, _config(64, 128), bias=bias)
