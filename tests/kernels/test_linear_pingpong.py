"""The warp-specialised Gluon linear (linear_pingpong.py). No interpreter runs Gluon: on the
CPU it is compiled for sm_90 (three partitions in 12 warps, within an SM's shared memory, its
descriptors launchable from a binary); on a GPU it runs BERT-base's GEMMs with several tiles
per consumer (their turns), ragged bf16 shapes with one tile, and its binary in a graph."""

import sys

import pytest
import torch
from kernel_check import (
    assert_binaries_in_a_graph_equal_the_jit,
    assert_checks_pass_in_a_compiling_process,
    assert_close,
    poisoned,
    run_checks,
)

from kernl.kernels.fused_linear import LinearConfig, fused_linear, fused_linear_reference
from kernl.kernels.linear_pingpong import MAXNREG, PINGPONG_CONFIGS, _pingpong_linear_kernel

SM90_SHARED = 232448


def _compile(bm, bn, bk, stages, activation="gelu"):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernl.kernels.jit import made

    def desc(block):
        layout = gl.NVMMASharedLayout.get_default_for(block, gl.float16)
        return f"tensordesc<fp16[{block[0]},{block[1]}],{layout!r}>"

    signature = {"x_desc": desc([bm, bk]), "w_desc": desc([bn, bk]), "out_desc": desc([bm, bn])}
    signature |= {"Bias": "*fp16", "M": "i32", "N": "i32", "K": "i32"}
    constants = dict(GROUP_M=8, ACTIVATION=activation, HAS_BIAS=True, STAGES=stages, num_warps=4)
    signature |= dict.fromkeys(constants, "constexpr")
    src = GluonASTSource(made(_pingpong_linear_kernel), signature, constants)
    options = {"num_warps": 4, "maxnreg": MAXNREG}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def three_partitions_fit_an_sm(config):
    from kernl.runtime.binaries import spec_from_compiled

    compiled = _compile(*config)
    assert compiled.metadata.shared <= SM90_SHARED, (config, compiled.metadata.shared)
    assert compiled.metadata.num_warps == 12  # two consumer warp groups and the producer's
    ptx = compiled.asm["ptx"]
    assert "setmaxnreg" in ptx and "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    spec, _ = spec_from_compiled("key", compiled)
    types = dict(spec.arg_types)
    assert all(types[d].startswith("nvTmaDesc:") for d in ("x_desc", "w_desc", "out_desc"))
    assert spec.num_warps == 12  # the binary launches 384 threads


def every_activation_compiles():
    for activation in ("none", "relu", "gelu_tanh", "silu"):
        _compile(*PINGPONG_CONFIGS[0], activation=activation)


def main() -> int:
    """The sm_90 compile checks (see kernel_check.assert_checks_pass_in_a_compiling_process)."""
    checks = [(three_partitions_fit_an_sm, (c,)) for c in PINGPONG_CONFIGS]
    return run_checks(checks + [(every_activation_compiles, ())])


def test_compiles_for_sm90_in_three_partitions():
    assert_checks_pass_in_a_compiling_process(__file__)


def test_refuses_cpu_tensors_and_a_residual():
    x = torch.zeros(4, 64, dtype=torch.float16)
    config = LinearConfig(128, 128, 64, 8, 4, 4, pingpong=True)
    with pytest.raises(ValueError, match="Hopper"):
        fused_linear(x, x, config=config)
    with pytest.raises(ValueError, match="residual"):
        fused_linear(x, x, residual=x, config=config)


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


BERT_GEMMS = [(3072, 768, "gelu"), (2304, 768, "none"), (768, 768, "none"), (768, 3072, "none")]


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="Hopper only")
@pytest.mark.parametrize("config", PINGPONG_CONFIGS, ids=str)
@pytest.mark.parametrize("gemm", BERT_GEMMS, ids=str)
@pytest.mark.parametrize("rows", [4096, 1000])
def test_gpu_bert_base_gemms(gemm, config, rows):
    # 4096 rows: up to 6 tiles a program at FFN1, 3 per consumer; 1000: a partial row block
    N, K, activation = gemm
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, K, dtype=torch.float16, device="cuda", generator=g)
    w = torch.randn(N, K, dtype=torch.float16, device="cuda", generator=g) / K**0.5
    b = torch.randn(N, dtype=torch.float16, device="cuda", generator=g)
    out = poisoned((rows, N), torch.float16, "cuda")
    bm, bn, bk, stages = config
    fused_linear(x, w, b, activation, out=out,
                 config=LinearConfig(bm, bn, bk, 8, 4, stages, pingpong=True))  # fmt: skip
    ref = fused_linear_reference(x.double(), w.double(), b.double(), activation)
    stock = fused_linear_reference(x, w, b, activation)
    assert_close(out, ref, torch.float16, stock, name=f"pingpong linear {gemm} {config} {rows}")


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="Hopper only")
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "silu"])
def test_gpu_bf16_ragged_one_tile(activation):
    # one output tile (consumer 1 has none), K past its last full block, a 3-d input
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(3, 37, 200, dtype=torch.bfloat16, device="cuda", generator=g)
    w = torch.randn(104, 200, dtype=torch.bfloat16, device="cuda", generator=g) / 200**0.5
    b = torch.randn(104, dtype=torch.bfloat16, device="cuda", generator=g)
    out = poisoned((3, 37, 104), torch.bfloat16, "cuda")
    config = LinearConfig(128, 128, 64, 8, 4, 4, pingpong=True)
    fused_linear(x, w, b, activation, out=out, config=config)
    ref = fused_linear_reference(x.double(), w.double(), b.double(), activation)
    assert_close(out, ref, torch.bfloat16, name=f"pingpong linear bf16 {activation}")


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="Hopper only")
def test_gpu_binaries_in_a_graph_equal_the_jit():
    """Recorded as the compiler records it, launched from the cubin (384 threads, kernl's own
    CUtensorMaps) inside a CUDA graph: bit for bit what Gluon's JIT computed."""
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(2048, 768, dtype=torch.float16, device="cuda", generator=g)
    w = torch.randn(3072, 768, dtype=torch.float16, device="cuda", generator=g) / 768**0.5
    bias = torch.randn(3072, dtype=torch.float16, device="cuda", generator=g)
    config = LinearConfig(128, 128, 64, 8, 4, 4, pingpong=True)
    assert_binaries_in_a_graph_equal_the_jit(
        lambda out=None: fused_linear(x, w, bias, "gelu", out=out, config=config), 3
    )


if __name__ == "__main__":
    sys.exit(main())
