"""How many GPU kernels one call of a bucket's program launches: kernl ops (their Triton kernel
or the aten ops of their aten path) plus the aten instructions that launch (views, reshapes
that need no copy, and empty allocations launch nothing).

Counted by running the program on the meta device, which computes shapes and strides but no
data: the aten ops a CUDA run would dispatch are seen by a dispatch mode, and the Triton
launches of kernl's launchers go to a counting launcher (kernels/launch.py) instead of a GPU. A
reshape of a strided tensor therefore counts its copy exactly when a CUDA run would make one.
Composite ops that are one fused kernel on CUDA (scaled-dot-product attention) count one.
cuBLAS calls count one (a GEMM with a bias/GELU epilogue is one cuBLASLt launch)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from kernl.artifacts.program import Program
from kernl.kernels.launch import launching_with

from .plural import count

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
}
# aten ops that allocate or relabel memory without a kernel
_NO_KERNEL = {
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "_unsafe_view",
    "lift_fresh",
    "_reshape_alias",
    "resize_",
}
_SDPA = {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}


@dataclass(frozen=True)
class LaunchCount:
    """Kernel launches of one call of a program, by what launches them."""

    total: int
    by_source: dict[str, int] = field(default_factory=dict)  # e.g. "aten.clone", "triton"
    by_instruction: dict[str, int] = field(default_factory=dict)  # program op -> launches
    exact: bool = True  # False: some instruction could not be run on meta, counted as one

    def describe(self) -> str:
        top = ", ".join(
            f"{n} {k}" for k, n in sorted(self.by_source.items(), key=lambda kv: -kv[1])
        )
        launches = count(self.total, "kernel launch", "kernel launches")
        return f"{launches} per call{'' if self.exact else ' (about)'}: {top}"


def _short(func: Any) -> str:
    name = getattr(func, "_opname", None) or getattr(func, "__name__", str(func))
    return f"aten.{name}"


class _Count(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "_opname", "")
        if not (func.is_view or name in _NO_KERNEL):
            self.counts[_short(func)] += 1
        return func(*args, **(kwargs or {}))


class _FusedAttention(TorchFunctionMode):
    """SDPA is one kernel on CUDA (flash / memory-efficient / cuDNN) but decomposes into its
    math form on meta: count it once, and give its output the [B, L, H, D] storage the fused
    kernels write."""

    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SDPA:
            q, v = args[0], args[2]
            self.counts["aten.scaled_dot_product_attention"] += 1
            *lead, lq, _ = q.shape
            out = torch.empty(
                (*lead[:-1], lq, lead[-1], v.shape[-1]), dtype=q.dtype, device=q.device
            )
            return out.transpose(-3, -2)
        return func(*args, **(kwargs or {}))


def _meta(shape: list[int], dtype: str) -> torch.Tensor:
    return torch.empty(shape, dtype=_DTYPES.get(dtype, torch.float32), device="meta")


def count_launches(program: Program) -> LaunchCount:
    """Kernel launches of one call of `program` on a GPU, with the implementations its kernl
    instructions were tuned to (an instruction without `impl` runs its aten path)."""
    from kernl.runtime.executor import Executor, _bind

    values = {int(k): v for k, v in program.meta.get("values", {}).items()}
    weights = {name: _meta(*values[vid]) for vid, name in program.weights.items()}
    inputs = {name: _meta(*values[vid]) for name, vid in program.inputs.items()}
    executor = Executor(program, weights, torch.device("meta"))
    env = executor.initial_env(inputs)
    by_source: Counter = Counter()
    by_instruction: Counter = Counter()
    exact = True

    def triton_launch(kernel, grid, args, kwargs) -> None:
        by_source["triton"] += 1

    for (fn, args, kwargs, outs, _frees), ins in zip(executor.steps, program.instructions):
        step: Counter = Counter()
        try:
            with launching_with(triton_launch), _FusedAttention(step), _Count(step):
                before = by_source["triton"]
                result = fn(*_bind(args, env), **{k: _bind(v, env) for k, v in kwargs.items()})
                step["triton"] += by_source["triton"] - before
                by_source["triton"] = before
        except Exception:  # an op meta cannot run (data-dependent shapes): count it once
            exact = False
            step = Counter({ins.op: 1})
            result = [_meta(*values[o]) if o in values else None for o in outs]
            result = result if len(outs) > 1 else result[0]
        executor.store(env, outs, result)
        by_source.update(step)
        by_instruction[ins.op] += sum(step.values())
    by_source = Counter({k: v for k, v in by_source.items() if v})
    return LaunchCount(sum(by_source.values()), dict(by_source), dict(by_instruction), exact)
