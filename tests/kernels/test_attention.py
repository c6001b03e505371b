import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from kernel_check import DEVICE, assert_close, poisoned

from kernl.kernels.attention import (
    AttentionConfig,
    attention,
    attention_configs,
    attention_reference,
)
from kernl.runtime import kernl_ops

DTYPES = [torch.float32, torch.float16]


def _run(B, H, H_kv, Lq, Lk, D, dtype, config=None, **kw):
    q = torch.randn(B, H, Lq, D, dtype=dtype, device=DEVICE)
    k = torch.randn(B, H_kv, Lk, D, dtype=dtype, device=DEVICE)
    v = torch.randn(B, H_kv, Lk, D, dtype=dtype, device=DEVICE)
    out = poisoned(q.shape, dtype)
    attention(q, k, v, out=out, config=config, **kw)
    kw64 = {
        n: (t.double() if torch.is_tensor(t) and t.is_floating_point() else t)
        for n, t in kw.items()
    }
    ref = attention_reference(q.double(), k.double(), v.double(), **kw64)
    stock = attention_reference(q, k, v, **kw)
    assert_close(out, ref, dtype, stock, name=f"attention {B, H, H_kv, Lq, Lk, D} {sorted(kw)}")
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 64, 80])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention(dtype, D, causal):
    _run(2, 3, 3, 37, 37, D, dtype, causal=causal)


@pytest.mark.parametrize("D", [96, 128])
def test_large_head_dims(D):
    _run(1, 2, 2, 19, 23, D, torch.float32, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk", [(5, 37), (40, 33), (16, 16)])
def test_small_blocks_causal_bottom_right(dtype, Lq, Lk):
    # 16x16 tiles: several full blocks, diagonal blocks and a ragged tail; Lq > Lk leaves the
    # first rows with no visible key (zeros)
    _run(2, 2, 2, Lq, Lk, 32, dtype, causal=True, config=AttentionConfig(16, 16, 4, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,H_kv", [(4, 2), (4, 1)])
def test_gqa_mqa_with_kv_lens(dtype, H, H_kv):
    kv_lens = torch.tensor([37, 20, 0], device=DEVICE)  # the last row sees nothing: zeros
    out = _run(3, H, H_kv, 5, 37, 32, dtype, causal=True, kv_lens=kv_lens)
    assert (out[2] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_one_query_kv_lens(dtype):
    kv_lens = torch.tensor([1, 33, 17], device=DEVICE)
    _run(3, 4, 2, 1, 33, 64, dtype, kv_lens=kv_lens, config=AttentionConfig(16, 16, 4, 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_key_padding_mask_and_bias(dtype):
    B, H, Lq, Lk = 3, 2, 17, 33
    mask = torch.rand(B, Lk, device=DEVICE) > 0.3
    mask[1] = False  # a fully padded row must give zeros, not NaN
    bias = torch.randn(1, H, Lq, Lk, dtype=dtype, device=DEVICE)
    out = _run(B, H, H, Lq, Lk, 32, dtype, bias=bias, key_padding_mask=mask)
    assert (out[1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_bias_causal(dtype):
    bias = torch.randn(2, 1, 1, 29, dtype=dtype, device=DEVICE)  # ALiBi-like broadcast, stride 0
    _run(2, 2, 2, 29, 29, 64, dtype, causal=True, bias=bias, sm_scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [None, AttentionConfig(16, 16, 4, 2)])
def test_padding_bias_one_row_for_all_queries(dtype, config):
    # BERT's mask: [B, 1, 1, Lk] of 0 / -inf (right padding, holes, a fully masked row),
    # read as one row per key block; Lk = 37 leaves a ragged tail block
    B, H, L = 3, 2, 37
    keep = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    keep[0, 30:] = False
    keep[1, ::3] = False
    keep[2] = False
    bias = torch.zeros(B, 1, 1, L, dtype=dtype, device=DEVICE)
    bias = bias.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = _run(B, H, H, L, L, 64, dtype, config=config, bias=bias)
    assert (out[2] == 0).all()


def eager_mask_bias(B, Lq, L, dtype, per_key=True):
    """Hugging Face's eager mask: finfo(dtype).min on masked keys (not -inf), with holes and
    a row whose keys are all masked: eager adds the same minimum to each of its scores and
    averages v over every key."""
    keep = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    keep[0, L // 2 :] = False
    keep[1] = False
    lowest = torch.finfo(dtype).min
    bias = torch.zeros(B, 1, 1 if per_key else Lq, L, dtype=dtype, device=DEVICE)
    return bias.masked_fill(~keep[:, None, None, :], lowest)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_key", [True, False])
@pytest.mark.parametrize("config", [None, AttentionConfig(16, 16, 4, 2)])
def test_a_mask_of_the_dtypes_minimum_is_served_as_eager(dtype, per_key, config):
    # float32's minimum times log2(e) overflowed to -inf: the all-masked row came out as
    # zeros (MegatronBERT, MPNet, RoFormer in fp32 and bf16, review)
    B, H, L = 2, 2, 37
    bias = eager_mask_bias(B, L, L, dtype, per_key)
    out = _run(B, H, H, L, L, 32, dtype, config=config, bias=bias)
    assert out[1].abs().amax() > 0.01


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_query_reads_its_bias_row(dtype):
    # Lq == 1: the bias [B, H, 1, Lk] is one row per head, read as such
    bias = torch.randn(2, 3, 1, 41, dtype=dtype, device=DEVICE)
    _run(2, 3, 3, 1, 41, 32, dtype, bias=bias, config=AttentionConfig(16, 16, 4, 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_qkv_strided_views(dtype):
    B, L, H, D = 2, 21, 3, 64
    qkv = torch.randn(B, L, 3, H, D, dtype=dtype, device=DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # views, no copies
    assert not q.is_contiguous()
    out = poisoned((B, H, L, D), dtype)
    attention(q, k, v, out=out)
    ref = attention_reference(q.double(), k.double(), v.double())
    assert_close(out, ref, dtype, attention_reference(q, k, v), name="fused qkv views")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "window,config",
    [
        (4, AttentionConfig(16, 16, 4, 2)),
        (20, AttentionConfig(16, 32, 4, 2)),
        (0, None),
        (70, None),
        (2**31 - 1, AttentionConfig(16, 16, 4, 2)),  # past int32 in the block range: clamped
    ],
)
def test_sliding_window_with_a_padding_bias(dtype, window, config):
    """ModernBERT's local layers: query i sees key j where |i - j| <= window, and no padded
    key; the key blocks outside every row's window are never loaded (a window of 0: itself
    only; wider than the keys: everything)."""
    B, H, L = 2, 2, 53
    keep = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    keep[1, 40:] = False
    bias = torch.zeros(B, 1, 1, L, dtype=dtype, device=DEVICE)
    bias = bias.masked_fill(~keep[:, None, None, :], float("-inf"))
    _run(B, H, H, L, L, 32, dtype, config=config, bias=bias, window=window)


def test_only_the_flash_kernel_is_offered_and_takes_a_window():
    q = k = v = torch.randn(1, 2, 300, 64, device=DEVICE)
    configs = attention_configs(k, False, q, v, window=64)
    assert configs and not any(c.programs_per_sm or c.tma or c.wgmma for c in configs)
    short = AttentionConfig(16, 256, 4, 2, False, 4)
    with pytest.raises(ValueError, match="no sliding window"):
        attention(q, k, v, window=8, config=short)


def test_runtime_entry_bool_mask():
    B, H, L, D = 2, 2, 19, 32
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE) for _ in range(3))
    mask = torch.rand(B, 1, 1, L, device=DEVICE) > 0.2
    cfg = dataclasses.asdict(attention_configs()[-1])
    out = kernl_ops.attention(q, k, v, mask, 1 / math.sqrt(D), False, impl="triton", config=cfg)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    assert_close(out, ref, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_real_sizes(dtype, D, causal):
    B, H, L = 2, 8, 1031
    q, k, v = (torch.randn(B, H, L, D, dtype=dtype, device="cuda") for _ in range(3))
    out = poisoned(q.shape, dtype, "cuda")
    attention(q, k, v, causal=causal, out=out)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
    stock = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert_close(out, ref, dtype, stock, name="gpu attention")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [AttentionConfig(128, 64, 8, 3), AttentionConfig(64, 128, 4, 2)])
def test_gpu_modernbert_local_window(dtype, config):
    """ModernBERT-base's local layers at 2048 tokens: a window of 64 and a padding bias."""
    B, H, L, D = 2, 12, 2048, 64
    q, k, v = (torch.randn(B, H, L, D, dtype=dtype, device="cuda") for _ in range(3))
    keep = torch.ones(B, L, dtype=torch.bool, device="cuda")
    keep[1, 1500:] = False
    bias = torch.zeros(B, 1, 1, L, dtype=torch.float32, device="cuda")
    bias = bias.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = poisoned(q.shape, dtype, "cuda")
    attention(q, k, v, bias=bias, window=64, out=out, config=config)
    ref = attention_reference(q.double(), k.double(), v.double(), bias=bias.double(), window=64)
    stock = attention_reference(q, k, v, bias=bias.to(dtype), window=64)
    assert_close(out, ref, dtype, stock, name="gpu windowed attention")


# the configs the compiler chose at BERT-base's shapes (2026-12-02), and the warp-specialised
# one; every config compiles for sm_90 in test_compile_for_hopper.py (each one here is a
# compile of its own, on the device's time)
BERT_CONFIGS = [
    AttentionConfig(128, 32, 4, 4),
    AttentionConfig(64, 64, 4, 3),
    AttentionConfig(64, 128, 4, 2),
    AttentionConfig(128, 128, 8, 3, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", BERT_CONFIGS, ids=str)
def test_gpu_bert_padding_bias(dtype, config):
    assert config in attention_configs()
    # BERT-base at 8x512 with right-padded rows: the bias is one row for every query
    B, H, L, D = 8, 12, 512, 64
    q, k, v = (torch.randn(B, H, L, D, dtype=dtype, device="cuda") for _ in range(3))
    keep = (
        torch.arange(L, device="cuda")[None, :]
        < torch.tensor([512, 300, 7, 129] * 2, device="cuda")[:, None]
    )
    bias = torch.zeros(B, 1, 1, L, dtype=dtype, device="cuda").masked_fill(
        ~keep[:, None, None, :], float("-inf")
    )
    out = poisoned(q.shape, dtype, "cuda")
    attention(q, k, v, bias=bias, out=out, config=config)
    ref = attention_reference(q.double(), k.double(), v.double(), bias=bias.double())
    assert_close(out, ref, dtype, attention_reference(q, k, v, bias=bias), name="gpu bert bias")


def test_runtime_entry_window_both_impls():
    """kernl.attention's window on the kernel and on its aten path (SDPA with the band)."""
    B, H, L, D = 2, 2, 29, 32
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE) for _ in range(3))
    mask = torch.rand(B, 1, 1, L, device=DEVICE) > 0.2
    mask[:, :, :, :3] = True
    cfg = dataclasses.asdict(AttentionConfig(16, 16, 4, 2))
    tri = kernl_ops.attention(q, k, v, mask, 0.2, False, impl="triton", config=cfg, window=5)
    ref = kernl_ops.attention(q, k, v, mask, 0.2, False, impl="aten", window=5)
    rows = torch.arange(L, device=DEVICE)
    band = (rows[None, :] - rows[:, None]).abs() <= 5
    full = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask & band, scale=0.2
    )
    visible = (mask & band).any(-1, keepdim=True).expand(B, H, L, D)  # rows with some key
    assert_close(tri[visible].view(-1), full[visible].view(-1), torch.float32)
    assert_close(ref[visible].view(-1), full[visible].view(-1), torch.float32)


def _one_of_each_kernel(configs):
    # the first config of each kernel the tuner may pick (flash, warp-specialised, short-key,
    # TMA, Gluon): each is a compile on the device's time
    seen, out = set(), []
    for c in configs:
        kind = (c.warp_specialize, c.programs_per_sm > 0, c.tma, c.wgmma)
        if kind not in seen:
            seen.add(kind)
            out.append(c)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("L", [128, 512])
def test_gpu_a_mask_of_bf16s_minimum_is_served_as_eager_by_every_kernel(L):
    """bf16's finfo.min times log2(e) overflows as float32's does: every kernel the tuner may
    pick keeps the all-masked row an average of v, as eager."""
    B, H, D, dtype = 2, 12, 64, torch.bfloat16
    q, k, v = (torch.randn(B, H, L, D, dtype=dtype, device="cuda") for _ in range(3))
    bias = eager_mask_bias(B, L, L, dtype)
    ref = attention_reference(q.double(), k.double(), v.double(), bias=bias.double())
    stock = attention_reference(q, k, v, bias=bias)
    for config in _one_of_each_kernel(attention_configs(k, q=q, v=v)):
        out = poisoned(q.shape, dtype, "cuda")
        attention(q, k, v, bias=bias, out=out, config=config)
        assert_close(out, ref, dtype, stock, name=f"gpu finfo.min bias {config}")
