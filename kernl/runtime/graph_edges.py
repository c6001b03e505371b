"""Side work off a captured graph's critical path (issue 14): an encoder bucket's graph is a
chain, every node waiting for the one captured before it, so two kinds of side work each
hold the next kernel back:

- cuBLAS zeroes a workspace before some GEMMs (BERT-base's FFN1 at M = 4096: one memset a
  layer, 0.8 µs, then ~3.3 µs of idle before the GEMM starts, measured on an H200). The
  memset only has to finish before its GEMM: when the node before it is one of kernl's own
  kernels (a layer norm, which never touches cuBLAS's workspace) and the node after it is
  not, the memset can start with that kernel instead of after it.
- The range check's results go to pinned host memory (a device-to-host copy, then the event
  the caller waits on). Nothing in the model reads them: the model can start once the ids
  are clamped, with the copy and its event beside it.

`side_work_edges` plans the new edges on a plain description of the graph (tested on the
CPU); `take_side_work_off_path` reads a captured graph's nodes through the CUDA driver
(ctypes, as `binaries.py` launches kernels) and applies the plan before the graph is
instantiated. Every node still follows everything it followed, except that a memset no
longer follows the kernl kernel it now runs beside, and the model no longer follows the
check's copy and event: no data dependency changes.

`CompiledModel._side_work_off_path` (on) moves the check's copy; `_memsets_off_path` (off)
the memsets, which measured slower moved (H200, 2026-12-02, docs/performance.md)."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence

from .binaries import _check, _cuda

# CUgraphNodeType
KERNEL, MEMCPY, MEMSET, EVENT_RECORD = 0, 1, 2, 7

Edge = tuple[int, int]


def side_work_edges(
    kinds: Mapping[int, int],
    deps: Mapping[int, Sequence[int]],
    functions: Mapping[int, int | None],
    ours: set[int],
    events: Mapping[int, int],
    side_events: set[int],
    memsets: bool = True,
) -> tuple[list[Edge], list[Edge]]:
    """(edges to remove, edges to add), each edge (from node, to node).

    `kinds`: each node's CUgraphNodeType; `deps`: each node's predecessors; `functions`: a
    kernel node's CUfunction (None where the driver gives none); `ours`: kernl's own
    CUfunctions; `events`: an event-record node's CUevent; `side_events`: the events that
    mark side work (the range check's). A memset whose only predecessor is one of kernl's
    kernels and whose successors are other kernels (cuBLAS's) gets that kernel's
    predecessors instead, and its successors wait for the kernel themselves. A copy followed
    only by records of side events: the nodes after those records wait for the copy's
    predecessors instead. `memsets=False` leaves the memsets where they are (on an H200 they
    slowed BERT-base's 32x128 graph by 1.3-1.6% when moved, 2026-12-02)."""
    succ: dict[int, list[int]] = {n: [] for n in kinds}
    for node, before in deps.items():
        for p in before:
            succ[p].append(node)
    remove: list[Edge] = []
    add: list[Edge] = []

    def link(a: int, b: int) -> None:
        if a not in deps.get(b, ()) and (a, b) not in add:
            add.append((a, b))

    for node, kind in kinds.items():
        before = list(deps.get(node, ()))
        if kind == MEMSET and memsets and len(before) == 1:
            (kernel,) = before
            if kinds[kernel] != KERNEL or functions.get(kernel) not in ours:
                continue
            # cuBLAS's own memset comes right before its own kernel; one before a kernl kernel
            # (a zeroed buffer of the model's) may be ordered against the kernel before it
            if not succ[node] or any(
                kinds[s] != KERNEL or functions.get(s) in ours for s in succ[node]
            ):
                continue
            remove.append((kernel, node))
            for p in deps.get(kernel, ()):
                link(p, node)
            for s in succ[node]:
                link(kernel, s)
        elif kind == MEMCPY and before and succ[node]:
            if any(events.get(e) not in side_events for e in succ[node]):
                continue
            for event in succ[node]:
                for s in succ[event]:
                    remove.append((event, s))
                    for p in before:
                        link(p, s)
    return remove, add


class _Driver:
    """The graph calls of the CUDA driver, through ctypes: CUDA 12.3's edge-data versions
    where the driver has them (CUDA 13 has no others), else the first ones."""

    def __init__(self):
        cu = _cuda()
        self.cu = cu
        self.v2 = hasattr(cu, "cuGraphNodeGetDependencies_v2")

    def nodes(self, graph: int) -> list[int]:
        n = ctypes.c_size_t(0)
        g = ctypes.c_void_p(graph)
        _check(self.cu.cuGraphGetNodes(g, None, ctypes.byref(n)), "cuGraphGetNodes")
        out = (ctypes.c_void_p * n.value)()
        _check(self.cu.cuGraphGetNodes(g, out, ctypes.byref(n)), "cuGraphGetNodes")
        return [int(x or 0) for x in out[: n.value]]

    def kind(self, node: int) -> int:
        t = ctypes.c_int(0)
        _check(self.cu.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(t)), "type")
        return t.value

    def deps(self, node: int) -> list[int]:
        n = ctypes.c_size_t(0)
        if not self.v2:
            get = self.cu.cuGraphNodeGetDependencies
            _check(get(ctypes.c_void_p(node), None, ctypes.byref(n)), "dependencies")
            if n.value == 0:
                return []
            out = (ctypes.c_void_p * n.value)()
            _check(get(ctypes.c_void_p(node), out, ctypes.byref(n)), "dependencies")
            return [int(x or 0) for x in out[: n.value]]
        get = self.cu.cuGraphNodeGetDependencies_v2
        _check(get(ctypes.c_void_p(node), None, None, ctypes.byref(n)), "dependencies")
        if n.value == 0:  # a root: the driver refuses a second query with arrays and no room
            return []
        out = (ctypes.c_void_p * n.value)()
        # the edges' data too (8 bytes each): a query that would drop a non-default edge
        # (a programmatic launch's) fails rather than lose it
        data = (ctypes.c_uint8 * (8 * n.value))()
        _check(get(ctypes.c_void_p(node), out, data, ctypes.byref(n)), "dependencies")
        return [int(x or 0) for x in out[: n.value]]

    def function(self, node: int) -> int | None:
        """A kernel node's CUfunction: the first field of CUDA_KERNEL_NODE_PARAMS (v1 and
        v2); None for a kernel launched by CUkernel alone."""
        params = (ctypes.c_uint64 * 32)()  # larger than either struct
        get = getattr(self.cu, "cuGraphKernelNodeGetParams_v2", None)
        get = get or self.cu.cuGraphKernelNodeGetParams
        if get(ctypes.c_void_p(node), params) != 0:
            return None
        return int(params[0]) or None

    def event(self, node: int) -> int | None:
        """An event-record node's CUevent."""
        e = ctypes.c_void_p()
        get = self.cu.cuGraphEventRecordNodeGetEvent
        return int(e.value or 0) if get(ctypes.c_void_p(node), ctypes.byref(e)) == 0 else None

    def edges(self, graph: int, edges: list[Edge], remove: bool) -> None:
        if not edges:
            return
        n = len(edges)
        a = (ctypes.c_void_p * n)(*[e[0] for e in edges])
        b = (ctypes.c_void_p * n)(*[e[1] for e in edges])
        name = "cuGraphRemoveDependencies" if remove else "cuGraphAddDependencies"
        fn = getattr(self.cu, name + "_v2") if self.v2 else getattr(self.cu, name)
        extra = (None,) if self.v2 else ()
        _check(fn(ctypes.c_void_p(graph), a, b, *extra, ctypes.c_size_t(n)), name)


def take_side_work_off_path(
    graph, ours: set[int], side_events: set[int], memsets: bool = True
) -> int:
    """Applies `side_work_edges` to a captured, not yet instantiated `torch.cuda.CUDAGraph`
    (made with `keep_graph=True`); returns the number of edges it removed."""
    driver = _Driver()
    raw = graph.raw_cuda_graph()
    nodes = driver.nodes(raw)
    kinds = {n: driver.kind(n) for n in nodes}
    deps = {n: driver.deps(n) for n in nodes}
    functions = {n: driver.function(n) for n in nodes if kinds[n] == KERNEL}
    events = {n: driver.event(n) for n in nodes if kinds[n] == EVENT_RECORD}
    remove, add = side_work_edges(kinds, deps, functions, ours, events, side_events, memsets)
    # added first: a node never loses its last dependency on the path, even for a moment
    driver.edges(raw, add, remove=False)
    driver.edges(raw, remove, remove=True)
    return len(remove)
