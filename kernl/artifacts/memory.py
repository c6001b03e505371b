"""The memory plan of an artifact: what loading it will allocate on the device, computed from
the manifest, the weights header and the programs before anything is allocated.

    weights         every tensor of weights.safetensors (loaded once)
    static buffers  encoders: each bucket's input buffers and the outputs its graph keeps;
                    causal LM: each batch bucket's KV cache, generated-ids, prompt and
                    sampler buffers, and the rotary table
    pool            the activations of the largest bucket (every bucket's graph draws on one
                    pool, and they run one at a time); for a causal LM an estimate of the
                    largest prefill's
    slack           what the caching allocator keeps beyond that peak (POOL_SLACK, FIXED_SLACK)

It is an estimate on the upper side (the caching allocator rounds, cuBLAS keeps workspaces);
its use is to refuse an artifact that asks for more than the limits or the free memory of the
device, with the figure, before a single tensor exists."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ArtifactUnsafeError, DeviceMemoryError
from .limits import DEFAULT_LIMITS, ReadLimits


def gib(n: int) -> str:
    """A byte count for a message: GiB above one, MiB or KiB below."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


# What the caching allocator keeps beyond the live peak: blocks of the graphs' shared pool
# that captures of other shapes cannot reuse, cuBLAS's workspaces, rounding. Measured after a
# generation at every bucket (H100, 2026-12-06; tests/generation/test_gpu_memory_plan.py and
# benchmarks/bench_llama8b.py): what stayed reserved past the weights and static buffers was
# 1.36x the pool (Gemma2-shaped, 2.3 GiB pool, 0.83 GiB over the plan without this slack) and
# 1.57x (Llama-3-8B-shaped, 0.58 GiB pool, 0.33 GiB over).
POOL_SLACK = 0.5
FIXED_SLACK = 256 << 20


@dataclass(frozen=True)
class MemoryPlan:
    weights: int
    static_buffers: int
    pool: int

    @property
    def slack(self) -> int:
        return int(self.pool * POOL_SLACK) + FIXED_SLACK

    @property
    def total(self) -> int:
        return self.weights + self.static_buffers + self.pool + self.slack

    def describe(self) -> str:
        return (
            f"{gib(self.total)} (weights {gib(self.weights)}, static buffers "
            f"{gib(self.static_buffers)}, activation pool {gib(self.pool)}, allocator slack "
            f"{gib(self.slack)})"
        )

    def check(
        self, where: str, limits: ReadLimits = DEFAULT_LIMITS, free_bytes: int | None = None
    ) -> None:
        """Refuse a plan over `limits.max_memory_bytes`, or over `free_bytes` (the device's
        free memory, which the runtime passes in) when given."""
        if self.total > limits.max_memory_bytes:
            raise ArtifactUnsafeError(
                f"{where}: loading this artifact needs {self.describe()}, more than the "
                f"{gib(limits.max_memory_bytes)} a reader accepts"
            )
        if free_bytes is not None and self.total > free_bytes:
            raise DeviceMemoryError(
                f"{where}: loading this artifact needs {self.describe()}; the device has "
                f"{gib(free_bytes)} free"
            )
