"""Which of an encoder program's kernels launch dependent on the kernel before them
(programmatic dependent launch, Hopper and later; the kernels' side is kernels/pdl.py).

In a captured encoder graph every kernel waits for the one before it to finish and flush
before its launch starts: BERT-base's graphs idle ~0.5 µs at each of their ~100 kernel
boundaries (H200, 2026-12-04, benchmarks/diag_call_gaps.py), 47-50 µs a call at every shape.
A kernel launched with programmatic stream serialization is captured behind a programmatic
edge: its programs may launch as soon as the kernel before has no program left to start,
and wait (griddepcontrol.wait, its first instruction) for that kernel's writes to be
visible. kernl's own kernels after a GEMM (the layer norms, the attention) take it; cuBLAS's
GEMMs, which never wait that way, keep their plain edges.

Run after tuning, on the instructions the tuner gave kernl's kernel and a config: `pdl`
is a launch mode, not a tuning candidate, so the tuning cache stays what it was."""

from __future__ import annotations

import torch

from kernl.artifacts.program import Program

# the ops whose kernels begin with pdl_start(USE_PDL) and whose config dataclass has `pdl`
DEPENDENT_OPS = ("kernl.layer_norm", "kernl.attention")


def takes_dependent_launch(device: torch.device) -> bool:
    """Whether kernels on `device` can launch dependent on the kernel before (sm_90+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def launch_dependent(program: Program) -> int:
    """Sets `pdl` on the config of every tuned kernl layer norm and attention of `program`
    (in place); returns how many. Instructions left to aten or to the kernel's default
    config (untimed compiles) stay as they are."""
    count = 0
    for ins in program.instructions:
        if ins.op not in DEPENDENT_OPS or ins.kwargs.get("impl") != "triton":
            continue
        config = ins.kwargs.get("config")
        if not config:
            continue
        pairs = dict(config)
        pairs["pdl"] = True
        ins.kwargs["config"] = [[k, v] for k, v in sorted(pairs.items())]
        count += 1
    return count
