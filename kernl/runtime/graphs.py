"""CUDA-graph capture shared by the encoder runtime and the generation runtime.

Every graph of the process is warmed up and captured on one stream per device. cuBLAS keeps a
workspace per (handle, stream) for the life of the process, allocated through the caching
allocator: 32 MiB on Hopper (plus 1 MiB for cuBLASLt). Warming each bucket up on a fresh side
stream, as torch's own example does, left one such workspace per bucket behind: 20 buckets
held about 660 MiB that no graph used, more than the largest bucket's activations."""

from __future__ import annotations

import threading
from collections.abc import Callable
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
) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run `fn` `warmups` times (cuBLAS handles, lazy allocations), then capture it into
    `pool`. `reset` restores any state `fn` mutates before each run and before the capture.
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
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        out = fn()
    return graph, out
