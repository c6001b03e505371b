import pytest
import torch
from kernel_check import DEVICE, assert_close, poisoned

from kernl.kernels.skinny_linear_fused import (
    SkinnyLinearFusedConfig,
    new_counters,
    skinny_linear_fused,
    skinny_linear_fused_reference,
)


def _check(M, N, K, dtype, bias, residual, config, counters=None, in_place=False, device=DEVICE):
    x = torch.randn(M, K, dtype=dtype, device=device)
    w = torch.randn(N, K, dtype=dtype, device=device) / K**0.5
    b = torch.randn(N, dtype=dtype, device=device) if bias else None
    r = torch.randn(M, N, dtype=dtype, device=device) if residual else None
    d = [t.double() if t is not None else None for t in (x, w, b, r)]
    ref = skinny_linear_fused_reference(*d)
    stock = skinny_linear_fused_reference(x, w, b, r)
    out = r if in_place else poisoned((M, N), dtype, device)
    skinny_linear_fused(x, w, b, r, out=out, counters=counters, config=config)
    assert_close(out, ref, dtype, stock, name="skinny_linear_fused")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 45, 72), (3, 96, 200), (16, 70, 1032)])
@pytest.mark.parametrize(
    "config",
    [
        SkinnyLinearFusedConfig(32, 32, 0, 4, 2),
        SkinnyLinearFusedConfig(16, 64, 1, 4, 2),
        SkinnyLinearFusedConfig(16, 32, 3, 4, 2),
    ],
    ids=["auto-split", "one-split", "three-splits"],
)
@pytest.mark.parametrize("bias,residual", [(False, False), (True, True), (False, True)])
def test_skinny_linear_fused(dtype, M, N, K, config, bias, residual):
    _check(M, N, K, dtype, bias, residual, config)


def test_in_place_residual_and_reused_counters():
    # x += o_proj(att): out is the residual; one counters buffer serves consecutive launches
    counters = new_counters(DEVICE)
    config = SkinnyLinearFusedConfig(16, 32, 3, 4, 2)
    for M, N, K in [(4, 48, 96), (2, 80, 136), (4, 48, 96)]:
        _check(M, N, K, torch.float32, False, True, config, counters, in_place=True)
        assert int(counters.abs().sum()) == 0


def test_strided_rows_and_weight_slice():
    K, N = 64, 48
    x = torch.randn(4, 2 * K, device=DEVICE)[:, :K]
    w = torch.randn(2 * N, K, device=DEVICE)[N:]
    out = skinny_linear_fused(x, w, config=SkinnyLinearFusedConfig(16, 32, 2, 4, 2))
    assert_close(out, skinny_linear_fused_reference(x.double(), w.double()), torch.float32)


def _check_activation(M, N, K, dtype, activation, config, counters=None, device=DEVICE):
    x = torch.randn(M, K, dtype=dtype, device=device)
    w = torch.randn(N, K, dtype=dtype, device=device) / K**0.5
    b = torch.randn(N, dtype=dtype, device=device)
    ref = skinny_linear_fused_reference(x.double(), w.double(), b.double(), None, activation)
    stock = skinny_linear_fused_reference(x, w, b, None, activation)
    out = poisoned((M, N), dtype, device)
    skinny_linear_fused(x, w, b, out=out, counters=counters, config=config, activation=activation)
    assert_close(out, ref, dtype, stock, name=f"skinny_linear_fused {activation}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["gelu", "tanh", "gelu_tanh"])
@pytest.mark.parametrize(
    "M,config",
    [
        (5, SkinnyLinearFusedConfig(32, 32, 3, 4, 2)),
        (40, SkinnyLinearFusedConfig(32, 32, 3, 4, 2)),  # three row blocks of 16
        (40, SkinnyLinearFusedConfig(16, 32, 1, 4, 2, BLOCK_M=32)),  # two of 32, one split
        (70, SkinnyLinearFusedConfig(32, 64, 0, 4, 2, BLOCK_M=64)),
    ],
    ids=["one-block", "row-blocks", "one-split", "auto-split-64"],
)
def test_activation_epilogue_and_several_row_blocks(dtype, activation, M, config):
    """An encoder's linear (a batch-1 query's few tokens): activation(x @ W^T + b), the rows
    in several blocks of BLOCK_M, each output block reduced by its last split."""
    _check_activation(M, 48, 200, dtype, activation, config)


def test_counters_serve_every_row_block_and_are_left_zeroed():
    counters = new_counters(DEVICE)
    for M, config in ((40, SkinnyLinearFusedConfig(16, 32, 3, 4, 2)), (3, None)):
        _check_activation(M, 80, 136, torch.float32, "gelu", config, counters)
        assert int(counters.abs().sum()) == 0


def test_refusals_say_why():
    x, w = torch.randn(40, 256, device=DEVICE), torch.randn(48, 256, device=DEVICE)
    with pytest.raises(ValueError, match="BLOCK_M 24"):
        skinny_linear_fused(x, w, config=SkinnyLinearFusedConfig(BLOCK_M=24))
    with pytest.raises(ValueError, match="activation"):
        skinny_linear_fused(x, w, activation="swish")
    # a buffer smaller than the output blocks the kernel bumps (3 row blocks x 3 column blocks)
    small = torch.zeros(8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="counters"):
        skinny_linear_fused(x, w, counters=small, config=SkinnyLinearFusedConfig(16, 64, 2))
    with pytest.raises(ValueError, match="unit K strides"):
        skinny_linear_fused(x.t(), w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("N,K", [(2048, 2048), (2048, 8192)], ids=["o", "down"])
def test_gpu_llama1b_shapes(dtype, M, N, K):
    _check(M, N, K, dtype, False, True, None, new_counters("cuda"), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("M", [16, 128])
@pytest.mark.parametrize(
    "N,K,activation", [(2304, 768, "none"), (3072, 768, "gelu"), (768, 3072, "none")]
)
def test_gpu_bert_base_shapes(M, N, K, activation):
    """BERT-base's QKV, FFN1 (erf GELU) and FFN2 at a batch-1 call of 16 and 128 tokens."""
    for config in (
        SkinnyLinearFusedConfig(32, 128, 0, 4, 4),
        SkinnyLinearFusedConfig(64, 64, 4, 4, 4, 64),
    ):
        counters = new_counters("cuda")
        _check_activation(M, N, K, torch.float16, activation, config, counters, device="cuda")


@pytest.mark.gpu
def test_gpu_split_k_is_deterministic_and_leaves_counters_zeroed():
    # real concurrency: the last-arriving program must see every partial, every time
    x = torch.randn(8, 8192, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(2048, 8192, dtype=torch.bfloat16, device="cuda") / 8192**0.5
    counters = new_counters("cuda")
    config = SkinnyLinearFusedConfig(32, 128, 8, 4, 4)
    first = skinny_linear_fused(x, w, counters=counters, config=config)
    for _ in range(20):
        assert torch.equal(skinny_linear_fused(x, w, counters=counters, config=config), first)
    assert int(counters.abs().sum()) == 0
    ref = skinny_linear_fused_reference(x.double(), w.double())
    assert_close(first, ref, torch.bfloat16, skinny_linear_fused_reference(x, w))
