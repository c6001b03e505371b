import pytest
import torch
from kernel_check import DEVICE, assert_close, poisoned

from kernl.kernels.rotary import rotary, rotary_reference


def _cache(max_pos, rot, dtype, device=DEVICE):
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float64, device=device) / rot))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64, device=device), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D,rot", [(64, 64), (80, 32), (32, 16)])
@pytest.mark.parametrize("H,H_kv", [(4, 4), (6, 2)])
def test_rotary(dtype, D, rot, H, H_kv):
    B, L = 2, 11
    q = torch.randn(B, H, L, D, dtype=dtype, device=DEVICE)
    k = torch.randn(B, H_kv, L, D, dtype=dtype, device=DEVICE)
    cos, sin = _cache(64, rot, dtype)
    pos = torch.randint(0, 64, (B, L), device=DEVICE)  # per-token, e.g. left padding / decode
    oq, ok = poisoned(q.shape, dtype), poisoned(k.shape, dtype)
    rotary(q, k, cos, sin, pos, out_q=oq, out_k=ok)
    rq, rk = rotary_reference(q.double(), k.double(), cos.double(), sin.double(), pos)
    sq, sk = rotary_reference(q, k, cos, sin, pos)
    assert_close(oq, rq, dtype, sq, name="rotary q")
    assert_close(ok, rk, dtype, sk, name="rotary k")


def test_rotary_in_place_on_fused_qkv_view():
    B, L, H, D = 2, 7, 3, 32
    qkv = torch.randn(B, L, 3, H, D, device=DEVICE)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    cos, sin = _cache(16, D, torch.float32)
    pos = torch.arange(L, device=DEVICE)[None, :] + 3
    rq, rk = rotary_reference(q.double(), k.double(), cos.double(), sin.double(), pos.expand(B, L))
    rotary(q, k, cos, sin, pos, out_q=q, out_k=k)
    assert_close(q, rq, torch.float32)
    assert_close(k, rk, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_real_sizes(dtype):
    B, H, H_kv, L, D = 4, 32, 8, 2048, 128
    q = torch.randn(B, H, L, D, dtype=dtype, device="cuda")
    k = torch.randn(B, H_kv, L, D, dtype=dtype, device="cuda")
    cos, sin = _cache(4096, D, dtype, "cuda")
    pos = torch.randint(0, 4096, (B, L), device="cuda")
    oq, ok = rotary(q, k, cos, sin, pos)
    rq, rk = rotary_reference(q.double(), k.double(), cos.double(), sin.double(), pos)
    sq, sk = rotary_reference(q, k, cos, sin, pos)
    assert_close(oq, rq, dtype, sq)
    assert_close(ok, rk, dtype, sk)
