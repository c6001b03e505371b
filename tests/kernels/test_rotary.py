import pytest
import torch
from kernel_check import DEVICE, assert_close

from kernl.kernels.rotary import RotaryConfig, rotary, rotary_refusal


def _eager(x, cos, sin, dtype):
    """transformers' apply_rotary_pos_emb as ModernBERT writes it: in float32, cast back."""
    xf = x.float()
    x1, x2 = xf[..., : x.shape[-1] // 2], xf[..., x.shape[-1] // 2 :]
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(dtype)


def _tables(L, D, dtype, device=DEVICE):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
    freqs = torch.arange(L, dtype=torch.float32, device=device)[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[None, None], emb.sin().to(dtype)[None, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [16, 24])  # 24: a half of 12, not a power of two
@pytest.mark.parametrize("config", [RotaryConfig(), RotaryConfig(4, 1)])
def test_rotary_of_heads_of_a_fused_projection(dtype, D, config):
    """x as ModernBERT's q: a strided [B, H, L, D] view of a [B, L, 3, H, D] projection."""
    B, L, H = 2, 13, 3
    qkv = torch.randn(B, L, 3, H, D, dtype=dtype, device=DEVICE)
    x = qkv.unbind(2)[0].transpose(1, 2)
    cos, sin = _tables(L, D, dtype)
    out = rotary(x, cos, sin, config=config)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    ref = _eager(x.double(), cos.double(), sin.double(), torch.float64)
    assert_close(out, ref, dtype, _eager(x, cos, sin, dtype), name="rotary")


def test_rotary_output_dtype_batch_cos_and_fewer_dims():
    """float32 result of fp16 x (the pattern without its cast back); cos per batch row; x of
    three dims (no head axis)."""
    x = torch.randn(2, 5, 8, dtype=torch.float16, device=DEVICE)
    cos = torch.randn(2, 5, 8, device=DEVICE)
    sin = torch.randn(1, 5, 8, device=DEVICE)
    out = rotary(x, cos, sin, torch.float32)
    assert out.dtype == torch.float32
    ref = _eager(x.double(), cos.double(), sin.double(), torch.float64)
    assert_close(out, ref, torch.float32, name="rotary")


def test_rotary_refuses_what_it_cannot_compute():
    x = torch.zeros(2, 3, 4, 6)
    assert rotary_refusal(x, torch.zeros(4, 6), torch.zeros(4, 6)) is None
    assert "odd" in rotary_refusal(torch.zeros(2, 5), torch.zeros(5), torch.zeros(5))
    assert "beyond" in rotary_refusal(x[:1], torch.zeros(2, 3, 4, 6), torch.zeros(4, 6))
    assert "broadcast" in rotary_refusal(x, torch.zeros(3, 6), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="dims"):
        rotary(torch.zeros(1, 2, 3, 4, 6), torch.zeros(6), torch.zeros(6))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_rotary_at_modernbert_base(dtype):
    B, L, H, D = 32, 512, 12, 64
    qkv = torch.randn(B, L, 3, H, D, dtype=dtype, device="cuda")
    x = qkv.unbind(2)[1].transpose(1, 2)
    cos, sin = _tables(L, D, dtype, "cuda")
    for config in (RotaryConfig(), RotaryConfig(64, 4)):
        out = rotary(x, cos, sin, config=config)
        ref = _eager(x.double(), cos.double(), sin.double(), torch.float64)
        assert_close(out, ref, dtype, _eager(x, cos, sin, dtype), name="rotary")
