"""An error raised while a program runs names the bucket, the instruction and its op, with
the original error chained; an out-of-memory error stays one."""

from __future__ import annotations

import pytest
import torch

from kernl.artifacts.program import Instruction, Program
from kernl.artifacts.schema import Bucket
from kernl.runtime.executor import Executor, ProgramRunError


def _program() -> Program:
    """x [2, 3] + 1, then that times a [4, 5] weight: the shapes do not multiply."""
    return Program(
        bucket=Bucket(2, 3),
        num_values=4,
        inputs={"input_ids": 0},
        weights={1: "w"},
        outputs=[3],
        instructions=[
            Instruction("aten.add.Scalar", [{"v": 0}, 1], {}, [2]),
            Instruction("aten.mm.default", [{"v": 2}, {"v": 1}], {}, [3]),
        ],
    )


def _executor() -> Executor:
    return Executor(_program(), {"w": torch.ones(4, 5)}, torch.device("cpu"))


def test_a_failing_instruction_is_named_with_its_bucket():
    with pytest.raises(ProgramRunError) as info:
        _executor().run({"input_ids": torch.ones(2, 3)})
    message = str(info.value)
    assert "bucket b2_s3 (batch 2, seq 3), instruction 1 (aten.mm.default)" in message, message
    assert isinstance(info.value, RuntimeError)
    cause = info.value.__cause__
    assert isinstance(cause, RuntimeError) and str(cause) in message  # torch's own words


def test_an_out_of_memory_error_keeps_its_type():
    """A caller that catches torch.OutOfMemoryError (a server answering 503) still does."""
    executor = _executor()

    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    fn, args, kwargs, outs, frees = executor.steps[0]
    executor.steps[0] = (out_of_memory, args, kwargs, outs, frees)
    with pytest.raises(torch.OutOfMemoryError) as info:
        executor.run({"input_ids": torch.ones(2, 3)})
    assert isinstance(info.value, ProgramRunError)
    assert "instruction 0 (aten.add.Scalar)" in str(info.value)
    assert "Tried to allocate 2.00 GiB" in str(info.value)
