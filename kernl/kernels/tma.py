"""A TMA tensor descriptor's host side, as kernl's launchers pass it: `TensorDesc(base, block)`.

Hopper's tensor memory accelerator copies a whole tile between global and shared memory from
a 128-byte descriptor (`CUtensorMap`) that names the tensor (address, shape, strides) and the
tile (`block_shape`). A kernel taking descriptors leaves address arithmetic and bounds to the
copy engine: loads past an edge read zeros and stores past it are dropped.

Triton's JIT takes its own `TensorDescriptor` (made here on the JIT path only, so importing
this module imports no Triton); a loaded artifact's binaries encode the `CUtensorMap` with the
CUDA driver at launch (kernl/runtime/binaries.py). Both see the same fields."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorDesc:
    """`base` with its last axis contiguous, 16-byte aligned start and row strides; each
    load or store moves one `block_shape` tile."""

    base: torch.Tensor
    block_shape: tuple[int, ...]
    # for a Gluon kernel: its descriptor names the shared-memory layout of a tile, Gluon's
    # default (NVMMA, swizzled for the tensor cores) for this block and dtype
    gluon: bool = False

    def __post_init__(self) -> None:
        t = self.base
        if t.dim() != len(self.block_shape) or not 1 <= t.dim() <= 5:
            raise ValueError(f"a {t.dim()}-d tensor with a {len(self.block_shape)}-d block")
        refusal = _tma_refusal(t)
        if refusal:
            raise ValueError(refusal)

    @property
    def shape(self) -> list[int]:
        return list(self.base.shape)

    @property
    def strides(self) -> list[int]:
        return list(self.base.stride())

    def to_triton(self):
        """Triton's own descriptor, for its JIT and interpreter (Gluon's, for a Gluon kernel)."""
        if self.gluon:
            from triton.experimental.gluon import language as gl
            from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDesc

            dtypes = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}
            block = list(self.block_shape)
            layout = gl.NVMMASharedLayout.get_default_for(block, dtypes[self.base.dtype])
            return GluonDesc(self.base, self.shape, self.strides, block, layout)
        from triton.tools.tensor_descriptor import TensorDescriptor

        return TensorDescriptor(self.base, self.shape, self.strides, list(self.block_shape))


def _tma_refusal(t: torch.Tensor) -> str | None:
    """Why TMA cannot copy tiles of `t`, or None."""
    size = t.element_size()
    if t.stride(-1) != 1 or any(s * size % 16 for s in t.stride()[:-1]):
        return f"strides {t.stride()} are not TMA's (16-byte rows, last axis 1)"
    if t.device.type == "cuda" and t.data_ptr() % 16:
        return "a TMA tensor must start 16-byte aligned"
    return None


def tma_usable(*tensors: torch.Tensor) -> bool:
    """Whether every tensor can be a `TensorDesc` base (contiguous last axis, aligned)."""
    return all(_tma_refusal(t) is None for t in tensors)
