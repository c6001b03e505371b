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
@pytest.mark.parametrize("config", [NormConfig(4, 4), NormConfig(4, 4, 1, 2)])
def test_norm(dtype, kind, M, N, bias, residual, config):
    fn, ref_fn = KERNELS[kind]
    x, w, b, r = _inputs(M, N, dtype, bias, residual)
    out, sum_out = poisoned((M, N), dtype), poisoned((M, N), dtype)
    y, s = fn(x, w, b, 1e-5, r, return_sum=True, out=out, sum_out=sum_out, config=config)
    ref = ref_fn(x.double(), w.double(), _d(b), 1e-5, _d(r))
    stock = ref_fn(x, w, b, 1e-5, r)
    assert_close(y, ref, dtype, stock, name=f"{kind} {M, N}")
    if residual:
        assert_close(s, x.double() + r.double(), dtype, x + r, name="residual sum")


# persistent grids: the interpreter's 2 "SMs" give a program several row blocks to walk
PERSISTENT = [NormConfig(2, 4, programs_per_sm=1, num_stages=2), NormConfig(1, 4, 2, 1)]


@pytest.mark.parametrize("config", [NormConfig(), NormConfig(1, 4), NormConfig(16, 8), *PERSISTENT])
def test_configs_and_3d_input(config):
    x, w, b, r = _inputs(2 * 13, 64, torch.float32, True, True)
    x, r = x.view(2, 13, 64), r.view(2, 13, 64)
    y = layer_norm(x, w, b, 1e-12, r, config=config)
    assert_close(
        y,
        layer_norm_reference(x.double(), w.double(), b.double(), 1e-12, r.double()),
        torch.float32,
    )


def test_a_broadcast_row_residual_is_read_in_place(monkeypatch):
    """A residual of row stride 0 (one row for all, as a bias) is read as it is, not copied."""
    x, w, b, _ = _inputs(11, 64, torch.float32, True, False)
    row = torch.randn(64, device=DEVICE)
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t: pytest.fail("copied"))
    y = layer_norm(x, w, b, 1e-5, row.expand(11, 64), config=NormConfig(2, 4))
    want = layer_norm_reference(x.double(), w.double(), b.double(), 1e-5, row.double())
    assert_close(y, want, torch.float32)


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
@pytest.mark.parametrize("config", [None, NormConfig(2, 4, 4, 2)])
def test_gpu_real_sizes(dtype, kind, N, config):
    fn, ref_fn = KERNELS[kind]
    x, w, b, r = _inputs(4099, N, dtype, True, True)
    y, s = fn(
        x, w, b, 1e-5, r, return_sum=True, out=poisoned(x.shape, dtype, "cuda"), config=config
    )
    ref = ref_fn(x.double(), w.double(), b.double(), 1e-5, r.double())
    assert_close(y, ref, dtype, ref_fn(x, w, b, 1e-5, r), name=f"gpu {kind}")
    assert_close(s, x.double() + r.double(), dtype, x + r, name="gpu residual sum")
