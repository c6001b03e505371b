import pytest
import torch
from kernel_check import DEVICE, assert_close, poisoned

from kernl.kernels.lm_head_argmax import (
    MAX_ROWS,
    LmHeadArgmaxConfig,
    lm_head_argmax,
    lm_head_argmax_reference,
    new_workspace,
)

CONFIGS = [LmHeadArgmaxConfig(32, 64, 4, 2), LmHeadArgmaxConfig(16, 32, 4, 2)]


def _check(M, V, K, dtype, norm, config, workspace=None, device=DEVICE):
    x = torch.randn(M, K, dtype=dtype, device=device)
    w = torch.randn(V, K, dtype=dtype, device=device) / K**0.5
    g = (torch.rand(K, device=device) + 0.5).to(dtype) if norm else None
    logits = poisoned((M, V), dtype, device)
    ids, out = lm_head_argmax(
        x, w, norm_weight=g, eps=1e-5, logits_out=logits, workspace=workspace, config=config
    )
    assert out is logits
    ref_ids, ref = lm_head_argmax_reference(
        x.double(), w.double(), g.double() if norm else None, 1e-5
    )
    _, stock = lm_head_argmax_reference(x, w, g, 1e-5)
    assert_close(logits, ref, dtype, stock, name="logits")
    # exactly torch.argmax of the logits written, and the true argmax where it is clear
    assert torch.equal(ids, logits.argmax(-1)), (ids, logits.argmax(-1))
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05
    assert torch.equal(ids[clear], ref_ids[clear])
    return ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,V,K", [(1, 200, 72), (5, 333, 136), (16, 97, 200)])
@pytest.mark.parametrize("config", CONFIGS, ids=["32x64", "16x32"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "rms-folded"])
def test_lm_head_argmax(dtype, M, V, K, config, norm):
    _check(M, V, K, dtype, norm, config)


def test_ties_pick_the_first_index():
    # bit-equal logits within one block (7, 9) and across blocks (70, 140): the first wins
    K, V = 32, 150
    x = torch.randn(2, K, device=DEVICE)
    w = torch.randn(V, K, device=DEVICE) * 0.01
    w[[7, 9, 70, 140]] = x[0] / x[0].norm()
    w[[140, 33]] = x[1] / x[1].norm()  # row 1: 33 before 140
    ids, logits = lm_head_argmax(x, w, return_logits=True, config=LmHeadArgmaxConfig(16, 32, 4, 2))
    assert ids.tolist() == [7, 33]
    assert torch.equal(ids, logits.argmax(-1))


def test_all_negative_logits_with_a_tie():
    K, V = 32, 90
    x = torch.randn(2, K, device=DEVICE).abs()
    w = -torch.randn(V, K, device=DEVICE).abs() * 0.1
    w[[50, 5]] = -0.001  # the least negative logit of both rows, twice
    ids, logits = lm_head_argmax(x, w, return_logits=True, config=LmHeadArgmaxConfig(16, 32, 4, 2))
    assert (logits < 0).all()
    assert ids.tolist() == [5, 5]
    assert torch.equal(ids, logits.argmax(-1))


def test_without_logits_and_reused_workspace():
    ws = new_workspace(DEVICE)
    fresh = new_workspace(DEVICE)
    for M in (3, MAX_ROWS, 1):
        x = torch.randn(M, 64, device=DEVICE)
        w = torch.randn(120, 64, device=DEVICE)
        ids, logits = lm_head_argmax(x, w, workspace=ws, config=LmHeadArgmaxConfig(16, 32, 4, 2))
        assert logits is None
        assert torch.equal(ids, (x @ w.t()).argmax(-1))
        assert torch.equal(ws, fresh)  # left ready for the next launch


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 4, 16])
def test_gpu_llama1b_shapes(dtype, M):
    ws = new_workspace("cuda")
    for _ in range(3):  # the workspace is reused across launches, as in a decode loop
        _check(M, 128256, 2048, dtype, True, None, ws, "cuda")
