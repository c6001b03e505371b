import pytest
import torch
from kernel_check import DEVICE, assert_close, poisoned

from kernl.kernels.rope_cache_write import (
    RopeCacheWriteConfig,
    rope_cache_write,
    rope_cache_write_reference,
    rope_tables,
)


def _check(B, S, H, KV, D, dtype, rope, slot, slots, config, decode_2d=False, device=DEVICE):
    max_pos = S + 3 * B
    qkv = torch.randn(B, S, (H + 2 * KV) * D, dtype=dtype, device=device)
    # distinct positions per row, as left padding gives
    positions = torch.arange(S, device=device)[None] + 3 * torch.arange(B, device=device)[:, None]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
    cos, sin = rope_tables(inv_freq, max_pos, 0.9, dtype) if rope else (None, None)
    # caches full of other values: slots not written must keep them
    k_cache = torch.randn(B, KV, slots, D, dtype=dtype, device=device)
    v_cache = torch.randn(B, KV, slots, D, dtype=dtype, device=device)
    slot_t = torch.tensor([slot], device=device)
    k_ref, v_ref = k_cache.double(), v_cache.double()
    c64 = cos.double() if rope else None
    s64 = sin.double() if rope else None
    q_ref = rope_cache_write_reference(
        qkv.double(), positions, c64, s64, k_ref, v_ref, slot_t, num_heads=H, num_kv_heads=KV
    )
    q_stock = rope_cache_write_reference(
        qkv,
        positions,
        cos,
        sin,
        k_cache.clone(),
        v_cache.clone(),
        slot_t,
        num_heads=H,
        num_kv_heads=KV,
    )
    q_out = poisoned((B, S, H, D), dtype, device).transpose(1, 2)
    if decode_2d:
        args = (qkv[:, 0], positions[:, 0])
    else:
        args = (qkv, positions)
    q = rope_cache_write(
        *args,
        cos,
        sin,
        k_cache,
        v_cache,
        slot_t,
        num_heads=H,
        num_kv_heads=KV,
        q_out=q_out,
        config=config,
    )
    assert q.data_ptr() == q_out.data_ptr()
    assert_close(q, q_ref, dtype, q_stock, name="q")
    assert_close(k_cache, k_ref, dtype, name="k cache")
    assert_close(v_cache, v_ref, dtype, name="v cache")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B,S,H,KV,D,slot,slots",
    [(1, 1, 4, 2, 16, 5, 9), (3, 1, 6, 2, 12, 0, 4), (2, 5, 4, 4, 8, 0, 7), (2, 3, 8, 1, 16, 4, 7)],
    ids=["decode", "decode-half-6", "prefill", "block-at-slot-4-mqa"],
)
@pytest.mark.parametrize(
    "config", [RopeCacheWriteConfig(4, 1), RopeCacheWriteConfig(64, 2)], ids=["4-heads", "64-heads"]
)
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no-rope"])
def test_rope_cache_write(dtype, B, S, H, KV, D, slot, slots, config, rope):
    _check(B, S, H, KV, D, dtype, rope, slot, slots, config)


def test_decode_2d_input_and_default_q_layout():
    _check(2, 1, 4, 2, 16, torch.float32, True, 3, 6, None, decode_2d=True)
    qkv = torch.randn(2, 8 * 16, device=DEVICE)
    k = torch.zeros(2, 2, 4, 16, device=DEVICE)
    q = rope_cache_write(
        qkv,
        torch.tensor([1, 2], device=DEVICE),
        None,
        None,
        k,
        k.clone(),
        torch.tensor([0], device=DEVICE),
        num_heads=4,
        num_kv_heads=2,
    )
    assert q.shape == (2, 4, 1, 16) and q.is_contiguous()


def test_writes_past_the_last_slot_are_dropped():
    # a 3-token block at slot 5 of a 6-slot cache: slot 5 written, nothing beyond it
    _check(1, 3, 2, 1, 8, torch.float32, True, 5, 6, None)


def test_tables_match_hugging_face_convention():
    inv_freq = torch.tensor([1.0, 0.1, 0.01, 0.001])
    cos, sin = rope_tables(inv_freq, 50, 1.5)
    freqs = torch.arange(50.0)[:, None] * inv_freq[None]
    assert torch.allclose(cos[:, :4], 1.5 * freqs.cos()) and torch.equal(cos[:, :4], cos[:, 4:])
    assert torch.allclose(sin[:, 4:], 1.5 * freqs.sin())


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B,S", [(1, 1), (8, 1), (4, 128)], ids=["decode-b1", "decode-b8", "prefill"]
)
def test_gpu_llama1b_shapes(B, S):
    _check(B, S, 32, 8, 64, torch.bfloat16, True, 200, 2048, None, device="cuda")
