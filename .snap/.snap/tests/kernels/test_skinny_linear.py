import pytest
import torch
from kernel_check import DEVICE, assert_close, poisoned

from kernl.kernels.skinny_linear import (
    SkinnyLinearConfig,
    skinny_linear,
    skinny_linear_reference,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 45, 72), (3, 96, 200), (16, 70, 1032)])
@pytest.mark.parametrize(
    "config",
    [
        SkinnyLinearConfig(32, 32, 0, 4, 2),
        SkinnyLinearConfig(16, 64, 1, 4, 2),
        SkinnyLinearConfig(16, 32, 3, 4, 2),
    ],
    ids=["auto-split", "one-split", "three-splits"],
)
@pytest.mark.parametrize("bias,residual", [(False, False), (True, True), (False, True)])
def test_skinny_linear(dtype, M, N, K, config, bias, residual):
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    w = torch.randn(N, K, dtype=dtype, device=DEVICE) / K**0.5
    b = torch.randn(N, dtype=dtype, device=DEVICE) if bias else None
    r = torch.randn(M, N, dtype=dtype, device=DEVICE) if residual else None
    out = poisoned((M, N), dtype)
    skinny_linear(x, w, b, r, out=out, config=config)
    d = [t.double() if t is not None else None for t in (x, w, b, r)]
    ref = skinny_linear_reference(*d)
    assert_close(out, ref, dtype, skinny_linear_reference(x, w, b, r), name="skinny linear")


def test_skinny_linear_strided_rows_and_weight_slice():
    # rows of a wider buffer, and the lower half of a stacked weight (as the decoder passes)
    K, N = 64, 48
    buf = torch.randn(4, 2 * K, device=DEVICE)
    x = buf[:, :K]
    stacked = torch.randn(2 * N, K, device=DEVICE)
    w = stacked[N:]
    out = skinny_linear(x, w, config=SkinnyLinearConfig(16, 32, 2, 4, 2))
    assert_close(out, skinny_linear_reference(x.double(), w.double()), torch.float32)


def test_skinny_linear_refuses_too_many_rows():
    with pytest.raises(AssertionError):
        skinny_linear(torch.randn(17, 64, device=DEVICE), torch.randn(8, 64, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 3072, 2048), (8, 2048, 8192), (4, 128256, 2048)])
def test_gpu_decode_sizes(dtype, M, N, K):
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    w = torch.randn(N, K, dtype=dtype, device="cuda") / K**0.5
    r = torch.randn(M, N, dtype=dtype, device="cuda")
    out = poisoned((M, N), dtype, "cuda")
    skinny_linear(x, w, None, r, out=out)
    ref = skinny_linear_reference(x.double(), w.double(), None, r.double())
    assert_close(out, ref, dtype, skinny_linear_reference(x, w, None, r), name="gpu skinny")
