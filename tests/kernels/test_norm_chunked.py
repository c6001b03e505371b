"""The chunked norm (norm_chunked.py): rows whose width is not a power of two held in two to
four power-of-two chunks, against float64 references, with a masked last chunk, several rows
per program and a partial last row block; outputs start as NaN."""

import pytest
import torch
from kernel_check import assert_close, poisoned
from test_norm import KERNELS, _d, _inputs

from kernl.kernels.norm import NormConfig, layer_norm, norm_configs
from kernl.kernels.norm_chunked import chunk_width


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize(
    "M,N,chunk", [(37, 96, 32), (5, 77, 32), (9, 200, 64), (6, 384, 128), (3, 768, 256)]
)
@pytest.mark.parametrize("bias,residual", [(True, False), (False, True), (True, True)])
def test_chunked_norm(dtype, kind, M, N, chunk, bias, residual):
    # 96 = 3 chunks of 32; 77 and 200 leave a masked last chunk (3 of 32, 4 of 64)
    fn, ref_fn = KERNELS[kind]
    x, w, b, r = _inputs(M, N, dtype, bias, residual)
    out, sum_out = poisoned((M, N), dtype), poisoned((M, N), dtype)
    config = NormConfig(4, 4, chunk)
    y, s = fn(x, w, b, 1e-5, r, return_sum=True, out=out, sum_out=sum_out, config=config)
    ref = ref_fn(x.double(), w.double(), _d(b), 1e-5, _d(r))
    assert_close(y, ref, dtype, ref_fn(x, w, b, 1e-5, r), name=f"chunked {kind} {M, N}")
    if residual:
        assert_close(s, x.double() + r.double(), dtype, x + r, name="residual sum")
    else:
        assert s is x


def test_chunk_width_and_configs():
    assert [chunk_width(n) for n in (768, 384, 1536, 1000, 1024, 4096, 48)] == [
        256,
        128,
        512,
        256,
        0,
        0,
        0,
    ]
    assert not any(c.chunk for c in norm_configs())
    assert not any(c.chunk for c in norm_configs(torch.empty(4, 1024, device="meta")))
    chunked = [c for c in norm_configs(torch.empty(4, 768, device="meta")) if c.chunk]
    assert chunked and {c.chunk for c in chunked} == {256}


def test_refuses_a_chunk_that_does_not_fit():
    x, w, b, r = _inputs(4, 768, torch.float32, True, True)
    for chunk in (128, 1024, 200):  # 6 chunks, 1 chunk, not a power of two
        with pytest.raises(ValueError, match="chunks of"):
            layer_norm(x, w, b, 1e-5, r, config=NormConfig(1, 4, chunk))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("N", [384, 768, 1536])
@pytest.mark.parametrize("block_m,warps", [(1, 2), (2, 4), (8, 8)])
def test_gpu_real_sizes(dtype, kind, N, block_m, warps):
    fn, ref_fn = KERNELS[kind]
    x, w, b, r = _inputs(4099, N, dtype, True, True)
    config = NormConfig(block_m, warps, chunk_width(N))
    out = poisoned(x.shape, dtype, "cuda")
    y, s = fn(x, w, b, 1e-5, r, return_sum=True, out=out, config=config)
    ref = ref_fn(x.double(), w.double(), b.double(), 1e-5, r.double())
    assert_close(y, ref, dtype, ref_fn(x, w, b, 1e-5, r), name=f"gpu chunked {kind}")
    assert_close(s, x.double() + r.double(), dtype, x + r, name="gpu residual sum")
