"""cuBLAS's first use of each GEMM shape of an artifact, on a thread while load() checks the
artifact and reads its weights, rather than inside the graph captures that follow.

A cold load() spends most of its time in the captures (0.45 of 0.97 s for BERT-base's 9
buckets, H200, 2026-12-03), and a profile put a large share of them in cuBLAS's `linear`
calls (366 of them, 0.5 ms each under cProfile, 2026-12-03): each new shape costs cuBLASLt a
heuristic query and loads its kernels lazily, process-wide. Running each distinct GEMM once,
on zeros, on a thread of its own while the artifact is checked and the weights stream in
moves that work off the path (torch releases the interpreter inside its ops, and the
weights' read mostly waits on the disk). The thread is joined before the first capture:
nothing launches beside a capture. Started after the check only, it saved 0.25 s of the
captures but 0.08 s of load(): its 30-odd first uses outlasted the weights' read.

Only the programs' `kernl.linear` instructions left on aten are warmed, each as the executor
will call it (same dtype, bias, epilogue). The programs are read once their hashes match,
before the check's analysis of them, so nothing here trusts their shapes: a GEMM whose
operands exceed WARM_BYTES_MAX is skipped, at most WARM_GEMMS_MAX are run, on zeros, and a
failure is kept in `error`, never raised (the check then says what is wrong)."""

from __future__ import annotations

import inspect
import math
import threading
from dataclasses import dataclass

import torch

from kernl.artifacts.program import Program

from . import kernl_ops

WARM_BYTES_MAX = 128 * 1024 * 1024  # x, weight and output of one GEMM
WARM_GEMMS_MAX = 256  # distinct GEMMs warmed at most (BERT-base's 9 buckets have 30-odd)


@dataclass(frozen=True)
class Gemm:
    rows: int
    in_features: int
    out_features: int
    dtype: str
    bias: bool
    activation: str


def _value_id(arg) -> int | None:
    return arg["v"] if isinstance(arg, dict) and set(arg) == {"v"} else None


def artifact_gemms(programs: list[Program]) -> list[Gemm]:
    """The distinct GEMMs that the programs' aten linears run, largest first."""
    signature = inspect.signature(kernl_ops.linear)
    found: set[Gemm] = set()
    for program in programs:
        values = program.meta.get("values") if isinstance(program.meta, dict) else None
        if not isinstance(values, dict):
            continue
        for ins in program.instructions:
            if ins.op != "kernl.linear" or ins.kwargs.get("impl", "aten") != "aten":
                continue
            try:
                bound = signature.bind(*ins.args, **ins.kwargs).arguments
            except TypeError:
                continue
            x, w = _value_id(bound.get("x")), _value_id(bound.get("weight"))
            x_info, w_info = values.get(x, values.get(str(x))), values.get(w, values.get(str(w)))
            if not (x_info and w_info and len(w_info[0]) == 2 and len(x_info[0]) >= 1):
                continue
            shape, dtype = x_info[0], x_info[1]
            if not all(isinstance(d, int) and d > 0 for d in (*shape, *w_info[0])):
                continue
            found.add(
                Gemm(
                    rows=math.prod(shape[:-1]),
                    in_features=shape[-1],
                    out_features=w_info[0][0],
                    dtype=str(dtype),
                    bias=bound.get("bias") is not None,
                    activation=str(bound.get("activation", "none")),
                )
            )
    return sorted(found, key=lambda g: -g.rows * g.out_features)[:WARM_GEMMS_MAX]


_streams: dict[int, torch.cuda.Stream] = {}


def _stream(device: torch.device) -> torch.cuda.Stream:
    """One warming stream per device for the process: cuBLAS keeps a workspace per (handle,
    stream) for good, so a stream per load() would leave one behind at every load."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _streams:
        _streams[index] = torch.cuda.Stream(index)
    return _streams[index]


def _warm(gemms: list[Gemm], device: torch.device) -> None:
    with torch.cuda.device(device), torch.inference_mode():
        stream = _stream(device)
        with torch.cuda.stream(stream):
            for g in gemms:
                dtype = getattr(torch, g.dtype, None)
                if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                    continue
                size = torch.empty((), dtype=dtype).element_size()
                elements = g.rows * g.in_features + g.out_features * (g.in_features + g.rows)
                if elements * size > WARM_BYTES_MAX:
                    continue
                x = torch.zeros(g.rows, g.in_features, dtype=dtype, device=device)
                w = torch.zeros(g.out_features, g.in_features, dtype=dtype, device=device)
                b = torch.zeros(g.out_features, dtype=dtype, device=device) if g.bias else None
                kernl_ops.linear(x, w, b, activation=g.activation, impl="aten")
                del x, w, b
        stream.synchronize()


class GemmWarming:
    """`artifact_gemms(programs)` run once each on a thread of their own; `join()` before
    anything is captured. A failure here is not the load's: the captures meet it again."""

    def __init__(self, programs: list[Program], device: torch.device):
        self.gemms = artifact_gemms(programs)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(device,), daemon=True)
        self._thread.start()

    def _run(self, device: torch.device) -> None:
        try:
            _warm(self.gemms, device)
        except BaseException as e:  # reported in `error`, never raised: warming is optional
            self.error = e

    def join(self) -> None:
        self._thread.join()
