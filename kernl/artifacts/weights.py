"""The weights file onto the device in one pipelined pass.

safetensors' `load_file(device="cuda")` maps the file and copies tensor after tensor from
pageable memory: the 2.36 GB of a Llama-1B artifact took 0.8 s of a 2.1 s `load()` on an
H200 host, while the page cache alone can be read several times faster. Here reader threads
fill pinned staging chunks from the file (`pread` releases the GIL) while a copy stream
moves the chunks already read into the tensors, so reading, copying and the hashing `load()`
runs beside it overlap. Each tensor is allocated on its own, as `load_file` does: no two
weights share a storage (a program's `as_strided` on a weight, or dropping one, means what
it meant before).

The header must have been checked (`reader.check_safetensors_header`): tensors tile the data
exactly. Offsets come from that header, never from the library's own parse."""

from __future__ import annotations

import math
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .analysis import SAFETENSORS_DTYPES
from .opened import pread_into

CHUNK_BYTES = 32 << 20
# Chunks in flight: enough reader threads to approach the page cache's bandwidth, few enough
# that the pinned staging memory (STAGING x CHUNK_BYTES) costs little to allocate.
STAGING = 6


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    start: int  # byte offsets in the file's data section
    end: int


def layout(header: dict[str, Any]) -> list[_Tensor]:
    """The header's tensors in file order."""
    entries = sorted(
        (info["data_offsets"][0], name, info)
        for name, info in header.items()
        if name != "__metadata__"
    )
    return [
        _Tensor(
            name,
            SAFETENSORS_DTYPES[info["dtype"]],
            tuple(info["shape"]),
            start,
            info["data_offsets"][1],
        )
        for start, name, info in entries
    ]


def read_tensors(source: Path | int, header: dict[str, Any], device) -> dict[str, Any]:
    """Every tensor of the (checked) safetensors file at `source` (a path, or a descriptor
    read with pread: the one load() hashes), on `device`."""
    if not isinstance(source, int):
        fd = os.open(source, os.O_RDONLY)
        try:
            return read_tensors(fd, header, device)
        finally:
            os.close(fd)
    import torch

    device = torch.device(device)
    tensors = layout(header)
    out = {
        t.name: torch.empty(t.shape, dtype=getattr(torch, t.dtype), device=device) for t in tensors
    }
    # each tensor's bytes, the destination of its pieces
    targets = [out[t.name].view(-1).view(torch.uint8) for t in tensors]
    (header_len,) = struct.unpack("<Q", os.pread(source, 8, 0))
    data_at = 8 + header_len
    data_size = os.fstat(source).st_size - data_at
    if data_size > 0:
        _stream(source, data_at, data_size, tensors, targets, device)
    return out


def _stream(
    fd: int, data_at: int, data_size: int, tensors: list[_Tensor], targets: list, device
) -> None:
    """Chunk i of the data is read into staging slot i % STAGING by a pool thread; the main
    thread queues its pieces' copies on a side stream and, once slot k's copies are done,
    hands the slot to chunk i + STAGING."""
    import torch

    on_gpu = device.type == "cuda"
    chunk = min(CHUNK_BYTES, data_size)
    slots = min(STAGING, math.ceil(data_size / chunk))
    staging = [torch.empty(chunk, dtype=torch.uint8, pin_memory=on_gpu) for _ in range(slots)]
    views = [memoryview(s.numpy()) for s in staging]
    stream = torch.cuda.Stream(device) if on_gpu else None
    done = [torch.cuda.Event() if on_gpu else None for _ in range(slots)]
    count = math.ceil(data_size / chunk)

    def read(i: int) -> None:
        lo = i * chunk
        view = views[i % slots][: min(chunk, data_size - lo)]
        got = 0
        while got < len(view):  # pread: no shared position between the reader threads
            n = pread_into(fd, view[got:], data_at + lo + got)
            if not n:
                raise OSError(f"the weights file ended at byte {data_at + lo + got}")
            got += n

    with ThreadPoolExecutor(slots, thread_name_prefix="kernl-weights") as pool:
        reads: dict[int, Future] = {i: pool.submit(read, i) for i in range(slots)}
        first = 0  # tensors before it lie wholly in chunks already copied
        for i in range(count):
            reads.pop(i).result()
            k, lo, hi = i % slots, i * chunk, min((i + 1) * chunk, data_size)
            with torch.cuda.stream(stream) if on_gpu else nullcontext():
                while first < len(tensors) and tensors[first].end <= lo:
                    first += 1
                for t, target in zip(tensors[first:], targets[first:]):
                    if t.start >= hi:
                        break
                    a, b = max(t.start, lo), min(t.end, hi)
                    if a < b:
                        dst = target[a - t.start : b - t.start]
                        dst.copy_(staging[k][a - lo : b - lo], non_blocking=on_gpu)
                if on_gpu:
                    done[k].record(stream)
            if i + slots < count:
                if on_gpu:
                    done[k].synchronize()  # the slot's bytes are on the device: reuse it
                reads[i + slots] = pool.submit(read, i + slots)
    if on_gpu:
        torch.cuda.current_stream(device).wait_stream(stream)
        stream.synchronize()
        del staging, views
        # torch keeps freed pinned blocks cached for the life of the process: give the
        # staging memory back (torch.cuda.graph does before a capture, but a model loaded
        # with capture="lazy" or "never" may not capture for a long time)
        getattr(torch._C, "_host_emptyCache", lambda: None)()
