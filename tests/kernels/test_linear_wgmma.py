"""The Gluon linear (linear_wgmma.py). No interpreter runs Gluon, so on the CPU it is compiled
for sm_90 and its main loop read from the PTX; on a GPU every config runs BERT-base's GEMMs
and ragged shapes against a float64 reference, into NaN-filled outputs."""

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
from kernl.kernels.linear_wgmma import (
    WGMMA_LINEAR_CONFIGS,
    _wgmma_linear_kernel,
    wgmma_linear_refusal,
)

SM90_SHARED = 232448  # bytes of shared memory one program may take on an H100 / H200


def _compile(bm, bn, bk, warps, stages, activation="gelu", residual=False):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernl.kernels.jit import made

    def desc(block):
        layout = gl.NVMMASharedLayout.get_default_for(block, gl.float16)
        return f"tensordesc<fp16[{block[0]},{block[1]}],{layout!r}>"

    signature = {"x_desc": desc([bm, bk]), "w_desc": desc([bn, bk]), "out_desc": desc([bm, bn])}
    signature |= {"Bias": "*fp16", "Residual": "*fp16"}
    signature |= dict.fromkeys(("M", "N", "K", "stride_rm"), "i32")
    constants = dict(GROUP_M=8, ACTIVATION=activation, HAS_BIAS=True, HAS_RESIDUAL=residual)
    constants |= dict(STAGES=stages, num_warps=warps)
    signature |= dict.fromkeys(constants, "constexpr")
    src = GluonASTSource(made(_wgmma_linear_kernel), signature, constants)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def _loop_events(ptx: str) -> list[str]:
    """The wgmma issues and waits, and the barrier waits, in program order."""
    events = []
    for line in ptx.splitlines():
        t = line.strip()
        if t.startswith("wgmma.mma_async"):
            event = "mma"
        elif t.startswith("wgmma.wait_group"):
            event = "wait" + t.split()[-1].rstrip(";")
        else:
            continue
        if not events or events[-1] != event:
            events.append(event)
    return events


def one_group_stays_in_flight(config):
    from kernl.runtime.binaries import spec_from_compiled

    bm, bn, bk, warps, stages = config
    compiled = _compile(*config)
    shared = compiled.metadata.shared
    # two programs an SM for the 4-warp tiles: the point of the kernel
    limit = SM90_SHARED // 2 - 1024 if warps == 4 else SM90_SHARED
    assert shared <= limit, (config, shared)
    events = _loop_events(compiled.asm["ptx"])
    assert ["mma", "wait1"] == events[:2] or "wait1" in events, events
    assert "cp.async.bulk.tensor" in compiled.asm["ptx"]
    # a loaded artifact can store and launch it: every descriptor a CUtensorMap
    spec, _ = spec_from_compiled("key", compiled)
    types = dict(spec.arg_types)
    assert all(types[d].startswith("nvTmaDesc:") for d in ("x_desc", "w_desc", "out_desc"))


def every_activation_and_the_residual_compile():
    for activation in ("none", "relu", "gelu_tanh", "silu"):
        _compile(128, 128, 64, 4, 3, activation=activation)
    _compile(128, 128, 64, 4, 3, activation="none", residual=True)


def main() -> int:
    """The sm_90 compile checks (see kernel_check.assert_checks_pass_in_a_compiling_process)."""
    checks = [(one_group_stays_in_flight, (c,)) for c in WGMMA_LINEAR_CONFIGS]
    return run_checks(checks + [(every_activation_and_the_residual_compile, ())])


def test_compiles_for_sm90_with_one_dot_in_flight():
    assert_checks_pass_in_a_compiling_process(__file__)


def test_refusals_say_why():
    x = torch.empty(4, 64, dtype=torch.float16)
    assert "Hopper" in wgmma_linear_refusal(x, x)  # CPU tensors
    if _hopper():
        full = torch.empty(4, 64, device="cuda")
        assert "fp16 or bf16" in wgmma_linear_refusal(full, full)
        odd = torch.empty(4, 60, dtype=torch.float16, device="cuda")
        assert "multiples of 8" in wgmma_linear_refusal(odd, odd)


def test_a_wgmma_config_refuses_cpu_tensors():
    x = torch.zeros(4, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="Hopper"):
        fused_linear(x, x, config=LinearConfig(128, 128, 64, 8, 4, 3, wgmma=True))


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


BERT_GEMMS = [(3072, 768, "gelu"), (2304, 768, "none"), (768, 768, "none"), (768, 3072, "none")]


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="Hopper only")
@pytest.mark.parametrize("config", WGMMA_LINEAR_CONFIGS, ids=str)
@pytest.mark.parametrize("gemm", BERT_GEMMS, ids=str)
def test_gpu_bert_base_gemms(gemm, config):
    N, K, activation = gemm
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1000, K, dtype=torch.float16, device="cuda", generator=g)  # a partial tile
    w = torch.randn(N, K, dtype=torch.float16, device="cuda", generator=g) / K**0.5
    b = torch.randn(N, dtype=torch.float16, device="cuda", generator=g)
    out = poisoned((1000, N), torch.float16, "cuda")
    bm, bn, bk, warps, stages = config
    fused_linear(x, w, b, activation, out=out,
                 config=LinearConfig(bm, bn, bk, 8, warps, stages, wgmma=True))  # fmt: skip
    ref = fused_linear_reference(x.double(), w.double(), b.double(), activation)
    stock = fused_linear_reference(x, w, b, activation)
    assert_close(out, ref, torch.float16, stock, name=f"wgmma linear {gemm} {config}")


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="Hopper only")
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "silu"])
def test_gpu_bf16_ragged_with_residual(activation):
    # K not a multiple of BLOCK_K (TMA reads zeros past it), N not of BLOCK_N, 3-d input
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(3, 77, 200, dtype=torch.bfloat16, device="cuda", generator=g)
    w = torch.randn(136, 200, dtype=torch.bfloat16, device="cuda", generator=g) / 200**0.5
    b = torch.randn(136, dtype=torch.bfloat16, device="cuda", generator=g)
    r = torch.randn(3, 77, 136, dtype=torch.bfloat16, device="cuda", generator=g)
    out = poisoned((3, 77, 136), torch.bfloat16, "cuda")
    config = LinearConfig(128, 128, 64, 8, 4, 3, wgmma=True)
    fused_linear(x, w, b, activation, r, out=out, config=config)
    ref = fused_linear_reference(x.double(), w.double(), b.double(), activation, r.double())
    assert_close(out, ref, torch.bfloat16, name=f"wgmma linear bf16 {activation}")


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="Hopper only")
def test_gpu_binaries_in_a_graph_equal_the_jit():
    """Recorded as the compiler records it, launched from the cubin with kernl's own
    CUtensorMaps inside a CUDA graph: bit for bit what Gluon's JIT computed."""
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(512, 768, dtype=torch.float16, device="cuda", generator=g)
    w = torch.randn(3072, 768, dtype=torch.float16, device="cuda", generator=g) / 768**0.5
    bias = torch.randn(3072, dtype=torch.float16, device="cuda", generator=g)
    config = LinearConfig(128, 128, 64, 8, 4, 3, wgmma=True)
    assert_binaries_in_a_graph_equal_the_jit(
        lambda out=None: fused_linear(x, w, bias, "gelu", out=out, config=config), 3
    )


if __name__ == "__main__":
    sys.exit(main())
