"""The persistent Gluon attention (kernels/attention_wgmma_persistent.py): compiled for sm_90
on the CPU (no interpreter runs Gluon), run against float64 on a Hopper GPU."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from kernel_check import (
    assert_checks_pass_in_a_compiling_process,
    assert_close,
    poisoned,
    run_checks,
)
from test_attention_wgmma import _desc, _hopper, _loop_schedule, _ptxas_log, _qkv_views

from kernl.kernels.attention import attention_reference
from kernl.kernels.attention_wgmma_persistent import (
    _persistent_wgmma_attention_kernel,
    persistent_wgmma_attention,
)

CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2)]  # BLOCK_M, BLOCK_N, warps, stages


def _compile(block_m, block_n, warps, stages, masked=False, lazy=False, max_registers=0):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernl.kernels.jit import made

    signature = {"q_desc": _desc(block_m), "k_desc": _desc(block_n), "v_desc": _desc(block_n)}
    signature |= {"o_desc": _desc(block_m), "Bias": "*fp32", "qk_scale": "fp32"}
    names = ("Lq", "Lk", "batch", "num_heads", "group_size")
    names += ("stride_biasb", "stride_biash", "stride_biasn")
    signature |= dict.fromkeys(names, "i32")
    constants = dict(HEAD_DIM=64, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages)
    constants |= dict(Q_IN_ROW=True, KV_IN_ROW=True, O_IN_ROW=True, HAS_BIAS=True)
    constants |= dict(MASKED=masked, LAZY=lazy, num_warps=warps)
    signature |= dict.fromkeys(constants, "constexpr")
    src = GluonASTSource(made(_persistent_wgmma_attention_kernel), signature, constants)
    options = {"num_warps": warps} | ({"maxnreg": max_registers} if max_registers else {})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compiles_with_every_wgmma_waited_for_and_asynchronous(config, masked, lazy):
    compiled = _compile(*config, masked=masked, lazy=lazy)
    assert compiled.metadata.shared <= 232448
    ptx = compiled.asm["ptx"]
    # the serial key loop: each wgmma waited for as it is issued
    schedule = _loop_schedule(ptx)
    assert all(schedule[i + 1] == "wait0" for i, e in enumerate(schedule[:-1]) if e == "mma")
    # queries, keys and values by TMA, the output stored by TMA too
    assert ptx.count("cp.async.bulk.tensor.3d.shared::cluster.global") >= 4, ptx
    assert "cp.async.bulk.tensor.3d.global.shared::cta" in ptx
    assert "C7514" not in _ptxas_log(ptx)


def three_programs_an_sm_fit_without_spilling():
    # ptxas's own choice is ~225 registers a thread at 64x64 (two 4-warp programs an SM)
    log = _ptxas_log(_compile(64, 64, 4, 2, max_registers=168).asm["ptx"])
    assert "Used 168 registers" in log, log
    assert "0 bytes spill stores" in log, log


def main() -> int:
    """The sm_90 compile checks (see kernel_check.assert_checks_pass_in_a_compiling_process)."""
    checks = [
        (compiles_with_every_wgmma_waited_for_and_asynchronous, (c, False, False)) for c in CONFIGS
    ]
    checks += [
        (compiles_with_every_wgmma_waited_for_and_asynchronous, ((64, 64, 4, 2), True, True))
    ]
    return run_checks(checks + [(three_programs_an_sm_fit_without_spilling, ())])


def test_compiles_for_sm90():
    assert_checks_pass_in_a_compiling_process(__file__)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="Hopper only")
@pytest.mark.parametrize("programs_per_sm", [1, 3])
@pytest.mark.parametrize("max_registers", [0, 168])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("shape", [(8, 512), (3, 300)], ids=str)
def test_gpu_against_float64(shape, config, programs_per_sm, max_registers):
    # 8x512: BERT's case; 3x300: a partial query block and a masked key tail. One program an
    # SM walks several tiles each: its key stream crosses from tile to tile.
    B, L = shape
    H, D = 12, 64
    q, k, v = _qkv_views(B, L, H, D, torch.float16)
    lens = torch.randint(1, L + 1, (B,), device="cuda")
    keep = torch.arange(L, device="cuda")[None, :] < lens[:, None]
    bias = torch.zeros(B, 1, 1, L, device="cuda").masked_fill(~keep[:, None, None], float("-inf"))
    out = poisoned((B, L, H, D), torch.float16, "cuda").transpose(1, 2)
    bm, bn, warps, stages = config
    persistent_wgmma_attention(q, k, v, out, sm_scale=1 / math.sqrt(D), bias=bias, block_m=bm,
                               block_n=bn, num_warps=warps, num_stages=stages,
                               programs_per_sm=programs_per_sm,
                               max_registers=max_registers)  # fmt: skip
    ref = attention_reference(q.double(), k.double(), v.double(), bias=bias.double())
    stock = attention_reference(q, k, v, bias=bias.half())
    assert_close(out, ref, torch.float16, stock, name=f"persistent {shape} {config}")


if __name__ == "__main__":
    sys.exit(main())
