"""kernl ops (runtime/kernl_ops.py) beyond their kernels: attention writes the layout the heads
merge wants, and the aten path of a linear puts relu / tanh-GELU into cuBLASLt's epilogue."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kernl.kernels.fused_linear import fused_linear_reference
from kernl.runtime import kernl_ops


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.seen.append(func._opname)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_triton_attention_output_is_bhld_viewed_and_equal_to_aten(dtype, atol, with_mask):
    B, H, L, D = 2, 3, 7, 16
    qkv = torch.randn(B, L, 3 * H * D, dtype=dtype)
    # q, k, v as the program has them: views of a fused QKV output, any strides
    q, k, v = (t.view(B, L, H, D).transpose(1, 2) for t in qkv.split(H * D, -1))
    mask = torch.rand(B, 1, 1, L) > 0.3 if with_mask else None
    if mask is not None:
        mask[..., 0] = True
    got = kernl_ops.attention(q, k, v, mask, None, False, impl="triton")
    want = kernl_ops.attention(q, k, v, mask, None, False, impl="aten")
    torch.testing.assert_close(got, want, atol=atol, rtol=atol)
    merged = got.transpose(1, 2)
    assert merged.is_contiguous()  # so reshape(B, L, H * D) is a view: no copy kernel
    assert merged.reshape(B, L, H * D).data_ptr() == got.data_ptr()


@pytest.mark.parametrize(
    "activation, dtype, op",
    [
        ("gelu_tanh", torch.float16, "_addmm_activation"),
        ("relu", torch.float16, "_addmm_activation"),
        ("gelu", torch.float16, "addmm"),
        ("relu", torch.float32, "_addmm_activation"),
        # fp32: cuBLASLt's GELU was 13x stock PyTorch's error on the H200
        ("gelu_tanh", torch.float32, "addmm"),
    ],
)
def test_aten_linear_routes_epilogue_activations_to_cublaslt(activation, dtype, op):
    # meta stands in for CUDA: same dispatch, no GPU needed
    x, w, b = (torch.empty(s, device="meta", dtype=dtype) for s in ([2, 5, 8], [16, 8], [16]))
    with _Ops() as ops:
        y = kernl_ops.linear(x, w, b, activation=activation, impl="aten")
    assert y.shape == (2, 5, 16) and ops.seen[0] == op
    assert len(ops.seen) == (1 if op == "_addmm_activation" else 2)


def test_aten_linear_on_the_cpu_keeps_the_exact_functions():
    # the CPU's _addmm_activation computes the erf GELU, so the CPU never takes that path
    x, w, b = torch.randn(4, 8), torch.randn(16, 8), torch.randn(16)
    y = kernl_ops.linear(x, w, b, activation="gelu_tanh", impl="aten")
    torch.testing.assert_close(y, F.gelu(F.linear(x, w, b), approximate="tanh"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 64, 4096])  # M=1: cuBLASLt's conditions fail, torch falls back
@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
def test_gpu_cublaslt_epilogue_computes_the_named_activation(dtype, M, activation):
    torch.manual_seed(0)
    x = torch.randn(M, 768, dtype=dtype, device="cuda")
    w = torch.randn(3072, 768, dtype=dtype, device="cuda") * 0.02
    b = torch.randn(3072, dtype=dtype, device="cuda") * 0.02
    r = torch.randn(M, 3072, dtype=dtype, device="cuda")
    for residual in (None, r):
        got = kernl_ops.linear(x, w, b, residual, activation=activation, impl="aten")
        ref64 = F.linear(x.double(), w.double(), b.double())
        ref64 = F.relu(ref64) if activation == "relu" else F.gelu(ref64, approximate="tanh")
        ref64 = ref64 if residual is None else ref64 + residual.double()
        stock = fused_linear_reference(x, w, b, activation, residual)  # two aten ops
        err = (got.double() - ref64).abs().max().item()
        stock_err = (stock.double() - ref64).abs().max().item()
        assert err <= 2 * stock_err + 1e-6, (dtype, M, activation, err, stock_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mask_to_bias_is_one_elementwise_op(dtype):
    mask = torch.tensor([[[[True, False, True, False]]], [[[False, False, True, True]]]])
    with _Ops() as ops:
        bias = kernl_ops.mask_to_bias(mask, dtype)
    want = torch.where(mask, 0.0, float("-inf")).to(dtype)
    assert bias.dtype == dtype and torch.equal(bias, want)
    assert [op for op in ops.seen if op != "empty"] == ["log"]  # one launch on a GPU


def test_mask_to_bias_refuses_a_mask_that_is_not_boolean():
    with pytest.raises(TypeError, match="boolean"):
        kernl_ops.mask_to_bias(torch.tensor([[1, 0, 2]]), torch.float32)
