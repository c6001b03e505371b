"""cuBLAS's memsets as kernels in a captured graph (issue 14).

Before some GEMMs cuBLAS zeroes a few KB of its workspace with cudaMemsetAsync, which a
capture records as a memset node: at BERT-base's M = 4096 buckets, one before FFN1's GEMM in
every layer. On an H200 (2026-12-04, benchmarks/diag_memset_nodes.py) twelve such nodes
between a layer norm and a GEMM cost 2.98 µs of GPU time each, against 1.06 µs for a kernel
writing the same zeros, and the graph took 16.8 µs to launch against 3.1 µs: a memset node
leaves the kernel pipeline (the GPU waits on both sides of it) and the launch cannot batch it
with the kernels. So each memset node of one row becomes a kernel node writing the same
values: torch's own fill kernel, captured into a scratch graph over the same bytes (seen
through `__cuda_array_interface__`, nothing allocated), its node's parameters copied into
the model's graph with the memset's dependencies and dependents, the memset node removed.
The driver calls go through ctypes (graph_edges.py's `_Driver`); the plan is plain data,
tested on the CPU."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .binaries import _check
from .graph_edges import KERNEL, MEMSET, _Driver
from .graphs import capture_stream, capturing

# element size -> (torch dtype, __cuda_array_interface__ typestr)
_ELEMENTS = {1: (torch.uint8, "|u1"), 2: (torch.int16, "<i2"), 4: (torch.int32, "<i4")}


class _MemsetParams(ctypes.Structure):
    """CUDA_MEMSET_NODE_PARAMS."""

    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("pitch", ctypes.c_size_t),
        ("value", ctypes.c_uint),
        ("elementSize", ctypes.c_uint),
        ("width", ctypes.c_size_t),
        ("height", ctypes.c_size_t),
    ]


@dataclass(frozen=True)
class Fill:
    """One memset node to replace: `count` elements of `size` bytes at `dst` set to `value`
    (as the memset's unsigned bits), after `before`, ahead of `after`."""

    node: int
    dst: int
    size: int
    count: int
    value: int
    before: tuple[int, ...]
    after: tuple[int, ...]

    def signed_value(self) -> int:
        """The value as the fill's dtype holds it (uint8, int16 or int32)."""
        bits = 8 * self.size
        value = self.value & ((1 << bits) - 1)
        if self.size > 1 and value >= 1 << (bits - 1):
            value -= 1 << bits
        return value


def planned_fills(
    kinds: Mapping[int, int], deps: Mapping[int, Sequence[int]], memsets: Mapping[int, tuple]
) -> list[Fill]:
    """The memset nodes a fill kernel can replace: one row (height 1) of 1-, 2- or 4-byte
    elements. `memsets`: node -> (dst, pitch, value, element size, width, height)."""
    succ: dict[int, list[int]] = {n: [] for n in kinds}
    for node, before in deps.items():
        for p in before:
            succ[p].append(node)
    fills = []
    for node, kind in kinds.items():
        if kind != MEMSET or node not in memsets:
            continue
        dst, _, value, size, width, height = memsets[node]
        if height != 1 or size not in _ELEMENTS or width == 0:
            continue
        fills.append(Fill(node, dst, size, width, value, tuple(deps[node]), tuple(succ[node])))
    return fills


class _Array:
    """`count` elements at a device address, for `torch.as_tensor` (no copy, no ownership)."""

    def __init__(self, dst: int, count: int, typestr: str):
        self.__cuda_array_interface__ = {
            "shape": (count,),
            "typestr": typestr,
            "data": (dst, False),
            "version": 3,
        }


def _memset_params(driver: _Driver, node: int) -> tuple:
    p = _MemsetParams()
    _check(driver.cu.cuGraphMemsetNodeGetParams(ctypes.c_void_p(node), ctypes.byref(p)), "memset")
    return (p.dst, p.pitch, p.value, p.elementSize, p.width, p.height)


def _kernel_nodes_in_order(driver: _Driver, graph: int) -> list[int] | None:
    """A captured chain's nodes, first to last; None if any is not a kernel."""
    nodes = driver.nodes(graph)
    deps = {n: driver.deps(n) for n in nodes}
    if any(driver.kind(n) != KERNEL for n in nodes):
        return None
    order, placed = [], set()
    while len(order) < len(nodes):
        ready = [n for n in nodes if n not in placed and all(d in placed for d in deps[n])]
        if not ready:
            return None
        order += ready
        placed.update(ready)
    return order


def memsets_as_kernels(graph: torch.cuda.CUDAGraph, device: torch.device) -> int:
    """Replaces the one-row memset nodes of a captured, not yet instantiated graph (made with
    `keep_graph=True`) by fill kernels; returns how many. Raises (OSError, RuntimeError) on a
    driver that refuses a call; the graph then holds, for each memset, the memset or its fill
    or both, each ordered as the memset was."""
    driver = _Driver()
    raw = graph.raw_cuda_graph()
    nodes = driver.nodes(raw)
    kinds = {n: driver.kind(n) for n in nodes}
    if MEMSET not in kinds.values():
        return 0
    deps = {n: driver.deps(n) for n in nodes}
    memsets = {n: _memset_params(driver, n) for n in nodes if kinds[n] == MEMSET}
    fills = planned_fills(kinds, deps, memsets)
    if not fills:
        return 0
    scratch = torch.cuda.CUDAGraph(keep_graph=True)
    with capturing(scratch, stream=capture_stream(device)):
        for f in fills:
            dtype, typestr = _ELEMENTS[f.size]
            view = torch.as_tensor(_Array(f.dst, f.count, typestr), device=device)
            if view.dtype != dtype or view.data_ptr() != f.dst:  # not the memset's bytes
                raise RuntimeError(f"a {view.dtype} view at {view.data_ptr():#x}")
            view.fill_(f.signed_value())
    kernels = _kernel_nodes_in_order(driver, scratch.raw_cuda_graph())
    if kernels is None or len(kernels) != len(fills):
        scratch.reset()
        return 0
    add = getattr(driver.cu, "cuGraphAddKernelNode_v2", None)
    get = getattr(driver.cu, "cuGraphKernelNodeGetParams_v2", None)
    if add is None or get is None:  # the pair must agree on the struct
        add, get = driver.cu.cuGraphAddKernelNode, driver.cu.cuGraphKernelNodeGetParams
    try:
        for f, kernel in zip(fills, kernels):
            params = (ctypes.c_uint64 * 32)()  # larger than either struct version
            _check(get(ctypes.c_void_p(kernel), params), "cuGraphKernelNodeGetParams")
            new = ctypes.c_void_p()
            before = (ctypes.c_void_p * max(len(f.before), 1))(*f.before)
            _check(
                add(
                    ctypes.byref(new),
                    ctypes.c_void_p(raw),
                    before,
                    ctypes.c_size_t(len(f.before)),
                    params,
                ),  # fmt: skip
                "cuGraphAddKernelNode",
            )
            try:
                driver.edges(raw, [(new.value, s) for s in f.after], remove=False)
            except (OSError, RuntimeError):
                # a fill not ordered before every dependent could zero what a GEMM reads
                driver.cu.cuGraphDestroyNode(new)
                raise
            # from here the fill is ordered as the memset is: a failure leaves both, each
            # writing the same values where it did
            _check(driver.cu.cuGraphDestroyNode(ctypes.c_void_p(f.node)), "cuGraphDestroyNode")
    finally:
        scratch.reset()  # the model's graph holds copies of the fills' parameters
    return len(fills)
