import pytest
import torch
from kernel_check import DEVICE, assert_close, poisoned

from kernl.kernels.decode_attention import (
    DecodeAttentionConfig,
    decode_attention,
    decode_attention_configs,
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", decode_attention_configs(), ids=str)
def test_decode_attention_every_config_on_a_generation_cache(dtype, config):
    # as the decoder calls it: a 160-slot cache of which the 100-slot bucket is read, the valid
    # length (slot + 1 = 37) one expanded int64 scalar, and the valid-slot mask; the many
    # chunks past the valid length, and the slots past it, hold NaN: none of them may be read
    B, H, H_kv, D, slots, Lk, valid_len = 2, 8, 2, 64, 160, 100, 37
    cache = torch.randn(2, B, H_kv, slots, D, dtype=dtype, device=DEVICE)
    cache[:, :, :, valid_len:] = float("nan")
    k, v = cache[0, :, :, :Lk], cache[1, :, :, :Lk]
    q = torch.randn(B, H + H_kv, D, dtype=dtype, device=DEVICE)[:, :H].unsqueeze(2)
    kv_valid = torch.zeros(B, slots, dtype=torch.bool, device=DEVICE)
    kv_valid[0, :valid_len] = True
    kv_valid[1, 5:valid_len] = True  # a left-padded prompt
    slot = torch.tensor([valid_len - 1], device=DEVICE)
    lens, mask = (slot + 1).expand(B), kv_valid[:, :Lk]
    out = poisoned(q.shape, dtype)
    decode_attention(q, k, v, kv_lens=lens, kv_mask=mask, out=out, config=config)
    finite = lambda t: t.double().nan_to_num(0.0)  # noqa: E731 - the reference masks after q @ k
    ref = decode_attention_reference(q.double(), finite(k), finite(v), kv_lens=lens, kv_mask=mask)
    stock = decode_attention_reference(q, k.nan_to_num(0.0), v.nan_to_num(0.0), kv_mask=mask)
    assert_close(out, ref, dtype, stock, name=f"decode attention {config}")


@pytest.mark.parametrize("config", decode_attention_configs(), ids=str)
def test_decode_attention_sliding_window_mask(config):
    # a sliding-window layer as the decoder calls it: the slot mask is the valid slots within
    # the window of the current slot (j > slot - window), so whole chunks at the start of the
    # cache are masked and one is cut mid-way; the slots left out hold large finite values
    # (earlier tokens' keys and values) that would dominate the output if any were attended
    B, H, H_kv, D, Lk, slot, window = 2, 8, 2, 32, 100, 90, 21
    k = torch.randn(B, H_kv, Lk, D, device=DEVICE)
    v = torch.randn(B, H_kv, Lk, D, device=DEVICE)
    k[:, :, : slot - window + 1] *= 50.0
    v[:, :, : slot - window + 1] = 1e4
    q = torch.randn(B, H, 1, D, device=DEVICE)
    kv_valid = torch.zeros(B, Lk, dtype=torch.bool, device=DEVICE)
    kv_valid[0, : slot + 1] = True
    kv_valid[1, 75 : slot + 1] = True  # left padding reaching into the window
    ends = torch.arange(Lk, device=DEVICE) + window
    slot_t = torch.tensor([slot], device=DEVICE)
    mask = kv_valid & (ends > slot_t)
    assert mask[0].sum() == window and mask[1].sum() == slot + 1 - 75
    lens = (slot_t + 1).expand(B)
    out = decode_attention(q, k, v, kv_lens=lens, kv_mask=mask, config=config)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), kv_lens=lens, kv_mask=mask)
    assert out.abs().max() < 100  # nothing from the slots before the window
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("config", decode_attention_configs()[::3], ids=str)
def test_decode_attention_window_reads_no_slot_before_it(config):
    """`window`: each row's query (slot kv_len - 1) sees the slots j > kv_len - 1 - window and
    reads none before them: NaNs there (in keys and values) stay out of the output, whole
    chunks before the window and the part of a key block that straddles its start. Rows of
    different lengths, one shorter than the window, one with a left-padding mask inside it."""
    B, H, H_kv, D, Lk, window = 3, 8, 2, 32, 100, 21
    k = torch.randn(B, H_kv, Lk, D, device=DEVICE)
    v = torch.randn(B, H_kv, Lk, D, device=DEVICE)
    lens = torch.tensor([91, 12, 100], device=DEVICE)
    before = torch.arange(Lk, device=DEVICE)[None, :] <= lens[:, None] - 1 - window  # [B, Lk]
    k_nan = k.masked_fill(before[:, None, :, None], float("nan"))
    v_nan = v.masked_fill(before[:, None, :, None], float("nan"))
    mask = torch.ones(B, Lk, dtype=torch.bool, device=DEVICE)
    mask[2, :85] = False  # row 2: its real tokens start inside the window
    q = torch.randn(B, H, 1, D, device=DEVICE)
    out = decode_attention(
        q, k_nan, v_nan, kv_lens=lens, kv_mask=mask, window=window, config=config
    )
    ref = decode_attention_reference(
        q.double(), k.double(), v.double(), kv_lens=lens, kv_mask=mask, window=window
    )
    assert_close(out, ref, torch.float32)
    whole = decode_attention_reference(q.double(), k.double(), v.double(), kv_lens=lens)
    assert (ref[0] - whole[0]).abs().max() > 1e-3  # the window changes row 0's output


@pytest.mark.parametrize("config", [None, DecodeAttentionConfig(16, 2, 2, 64)], ids=str)
def test_decode_attention_window_chunks_cover_every_row_s_window(config):
    """The chunks split the window's slots from each row's first key block of it, not the
    whole cache: rows whose windows start at different blocks, one row shorter than the window,
    and more chunks than the window has key blocks, each row against the reference."""
    B, H, D, Lk, window = 4, 4, 32, 300, 50
    q = torch.randn(B, H, 1, D, device=DEVICE)
    k = torch.randn(B, 1, Lk, D, device=DEVICE)
    v = torch.randn(B, 1, Lk, D, device=DEVICE)
    lens = torch.tensor([300, 40, 117, 64], device=DEVICE)
    out = decode_attention(q, k, v, kv_lens=lens, window=window, config=config)
    ref = decode_attention_reference(
        q.double(), k.double(), v.double(), kv_lens=lens, window=window
    )
    assert_close(out, ref, torch.float32)


def test_decode_attention_window_longer_than_the_cache_masks_nothing():
    B, H, D, Lk = 2, 4, 32, 40
    q = torch.randn(B, H, 1, D, device=DEVICE)
    k = torch.randn(B, 1, Lk, D, device=DEVICE)
    v = torch.randn(B, 1, Lk, D, device=DEVICE)
    lens = torch.tensor([40, 17], device=DEVICE)
    config = DecodeAttentionConfig(16, 2, 2, 3)
    out = decode_attention(q, k, v, kv_lens=lens, window=2**40, config=config)
    assert_close(out, decode_attention_reference(q, k, v, kv_lens=lens), torch.float32)
    with pytest.raises(ValueError, match="window"):
        decode_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="softcap"):
        decode_attention(q, k, v, softcap=float("inf"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", [None, DecodeAttentionConfig(16, 4, 2, 5)])
def test_decode_attention_softcap(dtype, config):
    """Gemma2's softcap on the scaled scores: scores up to ~±40 capped at 5 change the
    softmax far beyond rounding (checked against the uncapped output)."""
    B, H, H_kv, D, Lk = 3, 8, 4, 64, 77
    q = 3 * torch.randn(B, H, 1, D, dtype=dtype, device=DEVICE)
    k = torch.randn(B, H_kv, Lk, D, dtype=dtype, device=DEVICE)
    v = torch.randn(B, H_kv, Lk, D, dtype=dtype, device=DEVICE)
    lens = torch.tensor([77, 5, 60], device=DEVICE)
    mask = torch.ones(B, Lk, dtype=torch.bool, device=DEVICE)
    mask[2, :30] = False
    out = poisoned(q.shape, dtype)
    kw = dict(kv_lens=lens, kv_mask=mask, sm_scale=0.125)
    decode_attention(q, k, v, out=out, config=config, softcap=5.0, **kw)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), softcap=5.0, **kw)
    stock = decode_attention_reference(q, k, v, softcap=5.0, **kw)
    assert_close(out, ref, dtype, stock, name="decode attention softcap")
    uncapped = decode_attention_reference(q.double(), k.double(), v.double(), **kw)
    assert (ref - uncapped).abs().max() > 0.1


def test_decode_attention_mask_alone_or_with_lengths_keeps_nan_past_the_length_out():
    # Without lengths the kernel reads keys up to the bucket's end (the decoder passes the
    # lengths too: this is what they save), but a masked slot's value is never loaded: NaN
    # an earlier request left there stays out either way.
    B, H, D, Lk = 1, 4, 32, 64
    k = torch.randn(B, 1, Lk, D, device=DEVICE)
    v = torch.randn(B, 1, Lk, D, device=DEVICE)
    k[:, :, 40:] = float("nan")
    v[:, :, 40:] = float("nan")
    q = torch.randn(B, H, 1, D, device=DEVICE)
    mask = torch.arange(Lk, device=DEVICE)[None] < 40
    config = DecodeAttentionConfig(16, 2, 2, 4)
    lens = torch.tensor([40], device=DEVICE, dtype=torch.int32)
    ref = decode_attention_reference(
        q.double(), k.nan_to_num(0.0).double(), v.nan_to_num(0.0).double(), kv_lens=lens
    )
    assert_close(decode_attention(q, k, v, kv_mask=mask, config=config), ref, torch.float32)
    out = decode_attention(q, k, v, kv_mask=mask, kv_lens=lens, config=config)
    assert_close(out, ref, torch.float32)


def test_decode_attention_masked_slots_with_nan_leave_the_output_as_without():
    """Slots the mask leaves out (left padding, a joiner's slots before its prompt) may hold
    NaN an earlier request left: no weight is 0 x NaN, the output is as with finite values."""
    B, H, H_kv, Lk, D = 3, 8, 2, 70, 32
    k = torch.randn(B, H_kv, Lk, D, device=DEVICE)
    v = torch.randn(B, H_kv, Lk, D, device=DEVICE)
    q = torch.randn(B, H, 1, D, device=DEVICE)
    mask = torch.ones(B, Lk, dtype=torch.bool, device=DEVICE)
    mask[0, :17] = False
    mask[1, 20:45] = False
    mask[2, 1::2] = False
    hidden = ~mask[:, None, :, None]
    config = DecodeAttentionConfig(16, 4, 2, 3)
    clean = decode_attention(q, k, v, kv_mask=mask, config=config)
    nan = float("nan")
    out = decode_attention(
        q, k.masked_fill(hidden, nan), v.masked_fill(hidden, nan), kv_mask=mask, config=config
    )
    assert torch.isfinite(out).all()
    assert torch.equal(out, clean)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Lk", [1000, 16384])
@pytest.mark.parametrize("config", [None, *decode_attention_configs()[-10::3]], ids=str)
def test_gpu_decode_real_sizes(dtype, Lk, config):
    B, H, H_kv, D = 4, 32, 8, 128
    q = torch.randn(B, H, 1, D, dtype=dtype, device="cuda")
    k = torch.randn(B, H_kv, Lk, D, dtype=dtype, device="cuda")
    v = torch.randn(B, H_kv, Lk, D, dtype=dtype, device="cuda")
    kv_lens = torch.tensor([Lk, Lk // 2, 1, Lk - 7], device="cuda")
    out = poisoned(q.shape, dtype, "cuda")
    decode_attention(q, k, v, kv_lens=kv_lens, out=out, config=config)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), kv_lens=kv_lens)
    stock = decode_attention_reference(q, k, v, kv_lens=kv_lens)
    assert_close(out, ref, dtype, stock, name=f"gpu decode {config}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_window_and_softcap(dtype):
    """Mistral's 4096-slot window over a 16384-slot cache (the chunks before it read nothing:
    NaNs there stay out), and Gemma2's softcap of 50, at Llama-8B's head shape."""
    B, H, H_kv, D, Lk = 4, 32, 8, 128, 16384
    q = torch.randn(B, H, 1, D, dtype=dtype, device="cuda")
    k = torch.randn(B, H_kv, Lk, D, dtype=dtype, device="cuda")
    v = torch.randn(B, H_kv, Lk, D, dtype=dtype, device="cuda")
    lens = torch.tensor([Lk, 9000, 100, 4097], device="cuda")
    before = torch.arange(Lk, device="cuda")[None, :] <= lens[:, None] - 1 - 4096
    k_nan = k.masked_fill(before[:, None, :, None], float("nan"))
    v_nan = v.masked_fill(before[:, None, :, None], float("nan"))
    for window, softcap in ((4096, None), (None, 50.0), (4096, 50.0)):
        kw = dict(kv_lens=lens, window=window, softcap=softcap)
        out = decode_attention(q * 8, k_nan if window else k, v_nan if window else v, **kw)
        ref = decode_attention_reference((q * 8).double(), k.double(), v.double(), **kw)
        stock = decode_attention_reference(q * 8, k, v, **kw)
        assert_close(out, ref, dtype, stock, name=f"window {window} softcap {softcap}")
