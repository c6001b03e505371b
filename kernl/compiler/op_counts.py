"""How many instructions a bucket's program holds, and how many of them are kernl ops served
by Triton kernels: one count, shared by the compile summary and `kernl inspect`, so the two
never disagree."""

from __future__ import annotations

from dataclasses import dataclass

from kernl.artifacts.program import Program

from .plural import count


@dataclass(frozen=True)
class OpCounts:
    instructions: int  # every instruction of the program
    kernl_ops: int  # instructions that are kernl ops (kernl.*)
    on_triton: int  # kernl ops whose chosen implementation is a Triton kernel
    launches: int | None = None  # GPU kernels one call launches (launch_counts.py); None: unknown

    @property
    def aten_ops(self) -> int:
        return self.instructions - self.kernl_ops

    def describe(self) -> str:
        return (
            f"{count(self.instructions, 'instruction')}: {count(self.kernl_ops, 'kernl op')} "
            f"({self.on_triton} on Triton kernels, {self.kernl_ops - self.on_triton} on aten), "
            f"{count(self.aten_ops, 'aten op')}"
            + (
                ""
                if self.launches is None
                else f"; {count(self.launches, 'kernel launch', 'kernel launches')} per call"
            )
        )


def count_ops(program: Program) -> OpCounts:
    # A kernl op without an `impl` runs its aten implementation (the runtime's default).
    kernl_ops = [ins for ins in program.instructions if ins.op.startswith("kernl.")]
    on_triton = sum(str(ins.kwargs.get("impl", "aten")) == "triton" for ins in kernl_ops)
    return OpCounts(len(program.instructions), len(kernl_ops), on_triton, _launches(program))


def _launches(program: Program) -> int | None:
    """STYLE rule 15: kernels per call, counted like milliseconds. A program the meta-device
    count cannot run (a reader's report must not fail on it) has None."""
    from .launch_counts import count_launches

    try:
        return count_launches(program).total
    except Exception:
        return None
