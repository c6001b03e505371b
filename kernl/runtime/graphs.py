"""CUDA-graph capture shared by the encoder runtime and the generation runtime.

Every graph of the process is warmed up and captured on one stream per device. cuBLAS keeps a
workspace per (handle, stream) for the life of the process, allocated through the caching
allocator: 32 MiB on Hopper (plus 1 MiB for cuBLASLt). Warming each bucket up on a fresh side
stream, as torch's own example does, left one such workspace per bucket behind: 20 buckets
held about 660 MiB that no graph used, more than the largest bucket's activations.

That workspace is also why a captured graph must not use the one cuBLAS keeps outside the
graph: torch.compile's CUDA-graph trees (Hugging Face's static-cache `generate`, any
`mode="reduce-overhead"` model) clear every cuBLAS workspace of the process before and after
each recording, which frees the block a kernl graph captured as its scratch; the next replay
wrote into memory someone else owned (an illegal memory access with a Llama-1B artifact). Like
those trees, kernl clears the workspaces around its own capture: the workspace a graph uses is
then allocated during capture, inside the model's private pool, and lives as long as the
graphs do, whatever anyone clears later.

While a graph is captured, nothing else may destroy a graph: torch (2.11) no longer collects
garbage before a capture, so Python's collector could run inside one and free a dropped
model's graphs there — `cudaGraphExecDestroy` during a capture invalidates it
(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED at whatever launch came next; seen in the compiler,
which builds and drops step graphs while it times the decode kernels). `capturing()` pauses
the collector on this thread's capture and captures in thread-local mode, so another thread
dropping its graphs cannot invalidate ours either."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")

_streams: dict[int, torch.cuda.Stream] = {}
_streams_lock = threading.Lock()


def capture_stream(device: torch.device | None = None) -> torch.cuda.Stream:
    """The one stream every kernl graph of `device` is warmed up and captured on."""
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    with _streams_lock:
        if index not in _streams:
            _streams[index] = torch.cuda.Stream(device=index)
        return _streams[index]


def capture_graph(
    fn: Callable[[], T],
    pool,
    *,
    warmups: int = 1,
    reset: Callable[[], None] | None = None,
    device: torch.device | None = None,
    edit: Callable[[torch.cuda.CUDAGraph], object] | None = None,
) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run `fn` `warmups` times (cuBLAS handles, lazy allocations), then capture it into
    `pool`. `reset` restores any state `fn` mutates before each run and before the capture.
    `edit` changes the captured graph before it is instantiated (graph_edges.py).
    Returns the graph and the tensors `fn` returned during capture (the graph's outputs)."""
    stream = capture_stream(device)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            if reset is not None:
                reset()
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    if reset is not None:
        reset()
    graph = torch.cuda.CUDAGraph(keep_graph=True) if edit else torch.cuda.CUDAGraph()
    _clear_cublas_workspaces()
    try:
        with capturing(graph, pool=pool, stream=stream):
            out = fn()
    finally:
        # The workspace allocated during capture belongs to the pool: out of cuBLAS's cache
        # with it, so no eager matmul on this stream ever writes into a graph's scratch.
        _clear_cublas_workspaces()
    if edit is not None:
        edit(graph)
        graph.instantiate()
    return graph, out


@contextmanager
def capturing(graph: torch.cuda.CUDAGraph, pool=None, stream=None) -> Iterator[None]:
    """`torch.cuda.graph(...)` that no garbage collection or other thread invalidates (see
    the module docstring)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            yield
    finally:
        if collecting:
            gc.enable()


def _clear_cublas_workspaces() -> None:
    torch._C._cuda_clearCublasWorkspaces()
