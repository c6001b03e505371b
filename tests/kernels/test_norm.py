import pytest
import torch
from kernel_check import DEVICE, assert_close, poisoned

from kernl.kernels.norm import (
    NormConfig,
    layer_norm,
    layer_norm_reference,
    rms_norm,
    rms_norm_reference,
)
from kernl.runtime import kernl_ops

KERNELS = {
    "layer_norm": (layer_norm, layer_norm_reference),
    "rms_norm": (rms_norm, rms_norm_reference),
}


def _inputs(M, N, dtype, bias, residual):
    # a large common offset checks the variance is taken from centred values
    x = torch.randn(M, N, dtype=dtype, device=DEVICE) * 2 + 3
    w = torch.randn(N, dtype=dtype, device=DEVICE)
    b = torch.randn(N, dtype=dtype, device=DEVICE) if bias else None
    r = torch.randn(M, N, dtype=dtype, device=DEVICE) if residual else None
    return x, w, b, r


def _d(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("M,N", [(37, 96), (5, 77), (3, 1000)])
@pytest.mark.parametrize("bias,residual", [(True, False), (False, True), (True, True)])
def test_norm(dtype, kind, M, N, bias, residual):
    fn, ref_fn = KERNELS[kind]
    x, w, b, r = _inputs(M, N, dtype, bias, residual)
    out, sum_out = poisoned((M, N), dtype), poisoned((M, N), dtype)
    y, s = fn(x, w, b, 1e-5, r, return_sum=True, out=out, sum_out=sum_out, config=NormConfig(4, 4))
    ref = ref_fn(x.double(), w.double(), _d(b), 1e-5, _d(r))
    stock = ref_fn(x, w, b, 1e-5, r)
    assert_close(y, ref, dtype, stock, name=f"{kind} {M, N}")
    if residual:
        assert_close(s, x.double() + r.double(), dtype, x + r, name="residual sum")


@pytest.mark.parametrize("config", [NormConfig(), NormConfig(1, 4), NormConfig(16, 8)])
def test_configs_and_3d_input(config):
    x, w, b, r = _inputs(2 * 13, 64, torch.float32, True, True)
    x, r = x.view(2, 13, 64), r.view(2, 13, 64)
    y = layer_norm(x, w, b, 1e-12, r, config=config)
    assert_close(
        y,
        layer_norm_reference(x.double(), w.double(), b.double(), 1e-12, r.double()),
        torch.float32,
    )


def test_runtime_entry():
    x, w, b, r = _inputs(9, 40, torch.float32, True, True)
    y = kernl_ops.layer_norm(x, w, b, 1e-5, r, impl="triton", config={"BLOCK_M": 2, "num_warps": 4})
    assert_close(
        y, layer_norm_reference(x.double(), w.double(), b.double(), 1e-5, r.double()), torch.float32
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("N", [768, 4096, 8192])
def test_gpu_real_sizes(dtype, kind, N):
    fn, ref_fn = KERNELS[kind]
    x, w, b, r = _inputs(4099, N, dtype, True, True)
    y, s = fn(x, w, b, 1e-5, r, return_sum=True, out=poisoned(x.shape, dtype, "cuda"))
    ref = ref_fn(x.double(), w.double(), b.double(), 1e-5, r.double())
    assert_close(y, ref, dtype, ref_fn(x, w, b, 1e-5, r), name=f"gpu {kind}")
    assert_close(s, x.double() + r.double(), dtype, x + r, name="gpu residual sum")
