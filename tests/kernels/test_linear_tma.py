"""The persistent TMA linear (kernels/linear_tma.py): against float64 on the interpreter (fp32,
fp16) and on the GPU at BERT-base's sizes, through Triton's JIT and through a loaded
artifact's binaries (the CUtensorMap encoded by kernl, not by Triton), inside a CUDA graph."""

from __future__ import annotations

import itertools

import pytest
import torch
from kernel_check import DEVICE, assert_close, poisoned

from kernl.kernels.fused_linear import (
    LinearConfig,
    fused_linear,
    fused_linear_reference,
    linear_configs,
    tma_linear_configs,
)
from kernl.kernels.tma import TensorDesc, tma_usable

# several tiles per program (the interpreter runs 3 programs), several K steps, ragged edges
SMALL = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2, tma=True)
MODES = [  # (warp_specialize, flatten, split_epilogue)
    (False, False, False),
    (False, True, True),
    (True, False, False),
]


def _check(M, N, K, dtype, activation, bias, residual, config, lead=()):
    x = torch.randn(*lead, M, K, dtype=dtype, device=DEVICE)
    w = torch.randn(N, K, dtype=dtype, device=DEVICE) / K**0.5
    b = torch.randn(N, dtype=dtype, device=DEVICE) if bias else None
    r = torch.randn(*lead, M, N, dtype=dtype, device=DEVICE) if residual else None
    out = poisoned((*lead, M, N), dtype)
    fused_linear(x, w, b, activation, r, out=out, config=config)
    ref = fused_linear_reference(
        x.double(), w.double(), None if b is None else b.double(), activation,
        None if r is None else r.double(),
    )  # fmt: skip
    stock = fused_linear_reference(x, w, b, activation, r)
    name = f"tma linear {M, N, K} {activation} bias={bias} res={residual} {config}"
    assert_close(out, ref, dtype, stock, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_tma_linear_matches_float64(dtype, mode):
    ws, flatten, split = mode
    config = LinearConfig(**SMALL, warp_specialize=ws, flatten=flatten, split_epilogue=split)
    # 130 rows and 200 deep: partial tiles at the bottom edge and in the last K step
    _check(130, 72, 200, dtype, "gelu", bias=True, residual=False, config=config)
    _check(64, 40, 48, dtype, "none", bias=False, residual=True, config=config, lead=(2,))


@pytest.mark.parametrize("activation,bias,residual", [("relu", True, True), ("silu", False, False)])
def test_tma_linear_epilogues(activation, bias, residual):
    config = LinearConfig(**SMALL, split_epilogue=True)
    _check(96, 64, 64, torch.float16, activation, bias, residual, config)


def test_tensor_desc_refuses_what_tma_cannot_copy():
    x = torch.randn(8, 24, dtype=torch.float16)
    TensorDesc(x[:, :20], (8, 8))  # rows of 48 bytes, 16-byte aligned
    with pytest.raises(ValueError, match="strides"):
        TensorDesc(torch.randn(8, 20, dtype=torch.float16), (8, 8))  # rows of 40 bytes
    assert tma_usable(x) and not tma_usable(x.t())
    with pytest.raises(ValueError, match="block"):
        TensorDesc(x, (8,))


def test_tma_configs_stay_out_of_the_tuning_space():
    # measured slower than cuBLAS at every BERT-base GEMM (fused_linear.linear_configs)
    assert not any(c.tma for c in linear_configs())
    configs = tma_linear_configs()
    assert all(c.tma for c in configs)
    assert all(c.num_warps == 8 for c in configs if c.warp_specialize)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", tma_linear_configs(), ids=str)
def test_gpu_tma_linear_bert_sizes(dtype, config):
    for (M, N, K), act in (((4096, 3072, 768), "gelu"), ((1000, 768, 3072), "none")):
        _check(M, N, K, dtype, act, bias=True, residual=act == "none", config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(itertools.product((False, True), (False, True))))
def test_gpu_tma_binaries_in_a_graph_equal_the_jit(mode):
    """Recorded at build time, launched from the cubin with kernl's own CUtensorMap, inside
    a CUDA graph: bit for bit what Triton's JIT and launcher computed."""
    from kernl.kernels.launch import launching_with
    from kernl.runtime import binaries as b

    flatten, split = mode
    # a tile that fits shared memory in every mode (see fused_linear._TMA)
    config = LinearConfig(128, 128, 64, 8, 8, 4, False, True, flatten, split)
    M, N, K = 1000, 768, 3072
    x = torch.randn(M, K, dtype=torch.float16, device="cuda")
    w = torch.randn(N, K, dtype=torch.float16, device="cuda") / K**0.5
    bias = torch.randn(N, dtype=torch.float16, device="cuda")
    r = torch.randn(M, N, dtype=torch.float16, device="cuda")
    found = {}
    with b.allow_jit(lambda key, kernel: found.setdefault(key, kernel)):
        want = fused_linear(x, w, bias, "gelu", r, config=config)
    kb = b.KernelBinaries(torch.device("cuda"))
    for key, kernel in found.items():
        spec, cubin = b.spec_from_compiled(key, kernel)
        assert any(t.startswith("nvTmaDesc:") for _, t in spec.arg_types), spec.arg_types
        kb.add(spec, cubin)
    out = poisoned((M, N), torch.float16, "cuda")
    graph = torch.cuda.CUDAGraph()
    with launching_with(kb):
        fused_linear(x, w, bias, "gelu", r, out=out, config=config)  # eager, from the binary
        torch.cuda.synchronize()
        assert torch.equal(out, want)
        out.fill_(float("nan"))
        with torch.cuda.graph(graph):
            fused_linear(x, w, bias, "gelu", r, out=out, config=config)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_a_descriptor_parameter_as_a_binary_stores_it():
    """What kernl stores for a tensordesc parameter (and what a launch reads back), on the
    CPU; the launch itself is test_gpu_tma_binaries_in_a_graph_equal_the_jit."""
    from kernl.runtime import binaries as b

    meta = dict(swizzle=3, elem_size=2, elem_type=6, block_size=[128, 64], fp4_padded=False)
    assert b.tma_arg_types("x_desc", "tensordesc<fp16[128, 64]>", meta) == [
        ["x_desc", "nvTmaDesc:3:2:6:128x64"],
        ["x_desc.shape.0", "i32"],
        ["x_desc.shape.1", "i32"],
        ["x_desc.strides.0", "i64"],
        ["x_desc.strides.1", "i64"],
    ]
    with pytest.raises(b.MissingBinaryError, match="not lowered to TMA"):
        b.tma_arg_types("x_desc", "tensordesc<fp16[128, 64]>", None)
    with pytest.raises(b.MissingBinaryError, match="does not match"):
        b.tma_arg_types("x_desc", "tensordesc<fp16[8, 128, 64]>", meta)
    desc = TensorDesc(torch.empty(300, 64, dtype=torch.float16), (128, 64))
    assert b._bound_value({"x_desc": desc}, "x_desc.shape.0") == 300
    assert b._bound_value({"x_desc": desc}, "x_desc.strides.0") == 64
    assert b._spec(desc) == "desc<float16[128, 64]>"
