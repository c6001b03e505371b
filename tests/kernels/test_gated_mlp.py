import pytest
import torch
from kernel_check import DEVICE, assert_close, poisoned

from kernl.kernels.gated_mlp import GatedMLPConfig, gated_mlp, gated_mlp_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", [(37, 45, 72), (5, 96, 40)])
@pytest.mark.parametrize("config", [GatedMLPConfig(16, 32, 32, 4, 4, 2), None])
def test_gated_mlp(dtype, M, N, K, config):
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    wg = torch.randn(N, K, dtype=dtype, device=DEVICE) / K**0.5
    wu = torch.randn(N, K, dtype=dtype, device=DEVICE) / K**0.5
    out = poisoned((M, N), dtype)
    gated_mlp(x, wg, wu, out=out, config=config)
    ref = gated_mlp_reference(x.double(), wg.double(), wu.double())
    assert_close(out, ref, dtype, gated_mlp_reference(x, wg, wu), name="gated mlp")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_real_sizes(dtype):
    M, N, K = 2048, 11008, 4096
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    wg, wu = (torch.randn(N, K, dtype=dtype, device="cuda") / K**0.5 for _ in range(2))
    out = poisoned((M, N), dtype, "cuda")
    gated_mlp(x, wg, wu, out=out)
    ref = gated_mlp_reference(x.double(), wg.double(), wu.double())
    assert_close(out, ref, dtype, gated_mlp_reference(x, wg, wu), name="gpu gated mlp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_gated_mlp_with_biases_and_a_gelu(dtype, activation):
    """ModernBERT's GEGLU: one projection's halves with their biases, GELU on the first."""
    M, N, K = 19, 40, 64
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    w = torch.randn(2 * N, K, dtype=dtype, device=DEVICE) / K**0.5
    b = torch.randn(2 * N, dtype=dtype, device=DEVICE) * 0.1
    args = (w[:N], w[N:])
    kw = dict(bias_gate=b[:N], bias_up=b[N:], activation=activation)
    out = gated_mlp(x, *args, **kw, out=poisoned((M, N), dtype), config=GatedMLPConfig(16, 32, 32))
    ref = gated_mlp_reference(x.double(), *(t.double() for t in args), b[:N].double(),
                              b[N:].double(), activation)  # fmt: skip
    assert_close(out, ref, dtype, gated_mlp_reference(x, *args, **kw), name="geglu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_geglu_at_modernbert_base(dtype):
    M, N, K = 4096, 1152, 768
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    w = torch.randn(2 * N, K, dtype=dtype, device="cuda") / K**0.5
    out = gated_mlp(x, w[:N], w[N:], activation="gelu")
    ref = gated_mlp_reference(x.double(), w[:N].double(), w[N:].double(), activation="gelu")
    stock = gated_mlp_reference(x, w[:N], w[N:], activation="gelu")
    assert_close(out, ref, dtype, stock, name="gpu geglu")
