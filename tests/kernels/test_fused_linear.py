import dataclasses

import pytest
import torch
from kernel_check import DEVICE, assert_close, poisoned

from kernl.kernels.fused_linear import (
    ACTIVATIONS,
    LinearConfig,
    fused_linear,
    fused_linear_reference,
    linear_configs,
)
from kernl.runtime import kernl_ops

SMALL = LinearConfig(16, 32, 32, 4, 4, 2)  # several tiles and K steps at test sizes


def _check(M, N, K, dtype, activation="none", bias=True, residual=False, config=SMALL, lead=()):
    x = torch.randn(*lead, M, K, dtype=dtype, device=DEVICE)
    w = torch.randn(N, K, dtype=dtype, device=DEVICE) / K**0.5
    b = torch.randn(N, dtype=dtype, device=DEVICE) if bias else None
    r = torch.randn(*lead, M, N, dtype=dtype, device=DEVICE) if residual else None
    out = poisoned((*lead, M, N), dtype)
    fused_linear(x, w, b, activation, r, out=out, config=config)
    ref = fused_linear_reference(
        x.double(),
        w.double(),
        None if b is None else b.double(),
        activation,
        None if r is None else r.double(),
    )
    stock = fused_linear_reference(x, w, b, activation, r)
    assert_close(
        out, ref, dtype, stock, name=f"linear {M, N, K} {activation} bias={bias} res={residual}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations(dtype, activation):
    _check(37, 45, 72, dtype, activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias,residual", [(False, False), (True, True), (False, True)])
def test_bias_residual(dtype, bias, residual):
    _check(33, 40, 48, dtype, "gelu", bias=bias, residual=residual, lead=(2,))


@pytest.mark.parametrize("M,N,K", [(1, 8, 8), (7, 96, 40), (64, 64, 96)])
def test_odd_shapes_default_config(M, N, K):
    _check(M, N, K, torch.float16, "relu", config=None)


@pytest.mark.parametrize("activation", ["none", "gelu", "tanh"])
@pytest.mark.parametrize("residual", [False, True])
def test_split_k_configs_run_the_split_k_kernel(activation, residual):
    """A `split_k` config (offered for few rows: a batch-1 query) runs skinny_linear_fused's
    kernel, rows of a 3-d input in several row blocks, every epilogue."""
    config = LinearConfig(16, 32, 32, 8, 4, 2, split_k=3)
    _check(9, 48, 96, torch.float32, activation, residual=residual, config=config, lead=(3,))


def test_tanh_saturates():
    # large |x| must give -1 and 1, not NaN from exp overflow
    x = torch.tensor([[-60.0, -9.0, 0.0, 9.0, 60.0, 1.0, -1.0, 1e-3]], device=DEVICE)
    out = fused_linear(x, torch.eye(8, device=DEVICE), None, "tanh", config=SMALL)
    torch.testing.assert_close(out, torch.tanh(x), atol=1e-6, rtol=0)


def test_gelu_tanh_saturates():
    # large |x| must give x / 0, not NaN from exp overflow
    x = torch.tensor([[-60.0, -9.0, 0.0, 9.0, 60.0, 1.0, -1.0, 3.0]], device=DEVICE)
    w = torch.eye(8, device=DEVICE)
    out = fused_linear(x, w, None, "gelu_tanh", config=SMALL)
    ref = fused_linear_reference(x.double(), w.double(), None, "gelu_tanh")
    assert_close(out, ref, torch.float32)


def test_runtime_entry():
    x = torch.randn(2, 5, 32, device=DEVICE)
    w = torch.randn(24, 32, device=DEVICE)
    cfg = dataclasses.asdict(linear_configs()[-1])
    out = kernl_ops.linear(x, w, None, None, "silu", impl="triton", config=cfg)
    assert_close(out, fused_linear_reference(x.double(), w.double(), None, "silu"), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(4096, 3072, 768), (1000, 768, 3072)])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_gpu_real_sizes(dtype, M, N, K, activation):
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    w = torch.randn(N, K, dtype=dtype, device="cuda") / K**0.5
    b = torch.randn(N, dtype=dtype, device="cuda")
    out = poisoned((M, N), dtype, "cuda")
    fused_linear(x, w, b, activation, out=out)
    ref = fused_linear_reference(x.double(), w.double(), b.double(), activation)
    assert_close(out, ref, dtype, fused_linear_reference(x, w, b, activation), name="gpu linear")
