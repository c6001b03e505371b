"""compiler/launch_dependent.py: after tuning, the encoder's tuned layer norms and attentions
launch dependent on the kernel before them (PDL) on Hopper and later; nothing else changes,
and a program's configs still read back as the kernels' config dataclasses."""

from __future__ import annotations

import pytest
import torch

from kernl.artifacts.program import Instruction, Program
from kernl.artifacts.schema import Bucket
from kernl.compiler.launch_dependent import launch_dependent, takes_dependent_launch
from kernl.kernels import attention as attention_kernel
from kernl.kernels import norm
from kernl.runtime.kernl_ops import _typed


def _program() -> Program:
    norm_config = [["BLOCK_M", 2], ["num_warps", 4]]
    att_config = [["BLOCK_M", 64], ["BLOCK_N", 128], ["programs_per_sm", 2], ["tma", True]]
    lin_config = [["BLOCK_M", 64], ["BLOCK_N", 64]]
    ins = [
        Instruction("kernl.linear", [], {"impl": "aten", "config": None}, [1]),
        Instruction("kernl.attention", [], {"impl": "triton", "config": att_config}, [2]),
        Instruction("kernl.linear", [], {"impl": "triton", "config": lin_config}, [3]),
        Instruction("kernl.layer_norm", [], {"impl": "triton", "config": norm_config}, [4]),
        Instruction("kernl.layer_norm", [], {"impl": "aten", "config": None}, [5]),
        Instruction("kernl.layer_norm", [], {"impl": "triton", "config": None}, [6]),
        Instruction("aten.add.Tensor", [], {}, [7]),
    ]
    return Program(Bucket(1, 16), 8, {}, {}, [7], ins)


def test_tuned_norms_and_attentions_launch_dependent_and_nothing_else_changes():
    program = _program()
    before = [(i.op, dict(i.kwargs)) for i in program.instructions]
    assert launch_dependent(program) == 2
    after = program.instructions
    assert dict(after[1].kwargs["config"])["pdl"] is True
    assert dict(after[3].kwargs["config"])["pdl"] is True
    # the tuned values stay; the pairs stay sorted plain msgpack data
    assert dict(after[3].kwargs["config"]) == {"BLOCK_M": 2, "num_warps": 4, "pdl": True}
    assert after[1].kwargs["config"] == sorted(after[1].kwargs["config"])
    # aten, another kernel, a default config (an untimed compile) and aten ops: unchanged
    for i in (0, 2, 4, 5, 6):
        assert (after[i].op, after[i].kwargs) == before[i]
    # the runtime reads them back as the kernels' configs
    cfg = _typed(norm, after[3].kwargs["config"])
    assert cfg == norm.NormConfig(2, 4, pdl=True)
    att = _typed(attention_kernel, after[1].kwargs["config"])
    assert att.pdl and att.tma and att.programs_per_sm == 2 and att.BLOCK_N == 128
    # a second pass finds them set already and sets nothing else
    assert launch_dependent(program) == 2
    assert dict(after[3].kwargs["config"]) == {"BLOCK_M": 2, "num_warps": 4, "pdl": True}


def test_only_hopper_and_later_take_dependent_launches(monkeypatch):
    assert not takes_dependent_launch(torch.device("cpu"))
    for major, takes in ((8, False), (9, True), (10, True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d, m=major: (m, 0))
        assert takes_dependent_launch(torch.device("cuda", 0)) is takes


@pytest.mark.parametrize("pdl", [False, True])
def test_configs_without_pdl_read_as_before(pdl):
    """Artifacts built before the field: their configs lack `pdl` and mean no PDL."""
    assert norm.NormConfig(**{"BLOCK_M": 2, "num_warps": 4}).pdl is False
    cfg = attention_kernel.AttentionConfig(**{"BLOCK_M": 64, "pdl": pdl})
    assert cfg.pdl is pdl
