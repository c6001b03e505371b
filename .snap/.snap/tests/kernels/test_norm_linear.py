import pytest
import torch
from kernel_check import DEVICE, assert_close, poisoned

from kernl.kernels.norm_linear import (
    NormLinearConfig,
    new_counters,
    norm_linear,
    norm_linear_reference,
)

CONFIGS = [
    NormLinearConfig(32, 64, 0, 4, 2),
    NormLinearConfig(16, 64, 1, 4, 2),
    NormLinearConfig(16, 32, 3, 4, 2),
]
CONFIG_IDS = ["auto-split", "one-split", "three-splits"]


def _inputs(M, N_w, K, dtype, norm, bias, device=DEVICE):
    # an offset mean, so LayerNorm's centring matters
    x = torch.randn(M, K, dtype=dtype, device=device) * 2 + 0.5
    g = (torch.rand(K, device=device) + 0.5).to(dtype)
    nb = torch.randn(K, dtype=dtype, device=device) if norm == "layer" else None
    # outputs of order 1: the absolute tolerance then means what it says near zero
    w = torch.randn(N_w, K, dtype=dtype, device=device) * 0.5 / K**0.5
    b = torch.randn(N_w, dtype=dtype, device=device) if bias else None
    return x, g, nb, w, b


def _check(M, N_w, K, dtype, norm, gated, bias, config, counters=None, device=DEVICE):
    x, g, nb, w, b = _inputs(M, N_w, K, dtype, norm, bias, device)
    N = N_w // 2 if gated else N_w
    out = poisoned((M, N), dtype, device)
    eps = 1e-5
    norm_linear(
        x, g, nb, w, b, eps=eps, norm=norm, gated=gated, out=out, counters=counters, config=config
    )
    d = [t.double() if t is not None else None for t in (x, g, nb, w, b)]
    ref = norm_linear_reference(*d, eps=eps, norm=norm, gated=gated)
    stock = norm_linear_reference(x, g, nb, w, b, eps=eps, norm=norm, gated=gated)
    assert_close(out, ref, dtype, stock, name=f"norm_linear {norm} gated={gated}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N_w,K", [(1, 45, 72), (5, 96, 200), (16, 70, 136)])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("norm,bias", [("rms", True), ("layer", False)])
def test_norm_linear(dtype, M, N_w, K, config, norm, bias):
    _check(M, N_w, K, dtype, norm, False, bias, config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,I,K", [(1, 40, 72), (16, 50, 200)])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_norm_linear_gated(dtype, M, I, K, config, norm):
    # the linear bias rides with LayerNorm here; the plain test covers the other pairings
    _check(M, 2 * I, K, dtype, norm, True, norm == "layer", config)


def test_counters_are_left_zeroed_and_reused():
    # the decoder allocates one counters buffer and passes it to every launch of a step
    counters = new_counters(DEVICE)
    for M, N_w, K, gated in [(3, 96, 104, False), (2, 64, 104, True), (3, 96, 104, False)]:
        _check(
            M,
            N_w,
            K,
            torch.float32,
            "rms",
            gated,
            False,
            NormLinearConfig(16, 32, 3, 4, 2),
            counters=counters,
        )
        assert int(counters.abs().sum()) == 0


def test_refuses_rms_bias_and_too_many_rows():
    x, g, _, w, _ = _inputs(17, 32, 64, torch.float32, "rms", False)
    with pytest.raises(AssertionError):
        norm_linear(x, g, None, w, eps=1e-6)
    with pytest.raises(AssertionError):
        norm_linear(x[:4], g, g, w, eps=1e-6, norm="rms")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("N_w,gated", [(3072, False), (16384, True)], ids=["qkv", "gate_up"])
def test_gpu_llama1b_shapes(dtype, M, N_w, gated):
    _check(M, N_w, 2048, dtype, "rms", gated, False, None, new_counters("cuda"), "cuda")


@pytest.mark.gpu
def test_gpu_split_k_is_deterministic_and_leaves_counters_zeroed():
    # real concurrency: the last-arriving program must see every partial and sum of squares
    x = torch.randn(8, 2048, dtype=torch.bfloat16, device="cuda")
    g = torch.rand(2048, device="cuda").to(torch.bfloat16) + 0.5
    w = torch.randn(16384, 2048, dtype=torch.bfloat16, device="cuda") / 2048**0.5
    counters = new_counters("cuda")
    config = NormLinearConfig(32, 128, 4, 4, 4)
    first = norm_linear(x, g, None, w, eps=1e-5, gated=True, counters=counters, config=config)
    for _ in range(20):
        again = norm_linear(x, g, None, w, eps=1e-5, gated=True, counters=counters, config=config)
        assert torch.equal(again, first)
    assert int(counters.abs().sum()) == 0
