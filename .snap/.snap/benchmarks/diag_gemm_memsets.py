"""Which of BERT-base's GEMMs make cuBLAS add a memset to a CUDA graph, and what each costs
(issue 14: 12 memsets per call at 32x128 and 8x512, each followed by ~3 µs of idle GPU).

    python benchmarks/diag_gemm_memsets.py

For each GEMM of a BERT-base layer at M = 1024 and 4096 tokens (fp16), and each way kernl's
runtime can call it (F.linear with bias; torch._addmm_activation with the tanh-GELU epilogue,
whole or as two GEMMs of M/2 rows into one output; torch.mm without bias), one CUDA graph of
20 calls: µs per call (median of 10 replays) and the device ops per call the profiler sees
(kernels, memsets)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_bert_fusions import time_ms  # noqa: E402

GEMMS = {"qkv": (768, 2304), "o": (768, 768), "ffn1": (768, 3072), "ffn2": (3072, 768)}


def graph_of(fn, n: int = 20) -> torch.cuda.CUDAGraph:
    """n calls of fn in one graph, captured as kernl captures (cuBLAS's workspace allocated in
    the graph's own pool: a graph captured with torch.cuda.graph alone keeps using the cached
    workspace, which a later capture or a dropped graph frees under it)."""
    from kernl.runtime.graphs import capture_graph

    graph, _ = capture_graph(lambda: [fn() for _ in range(n)], None)
    return graph


def replay_us(graph: torch.cuda.CUDAGraph, n: int = 20) -> float:
    """µs per call: the median of 10 replays of the n calls."""
    return time_ms(graph.replay, 10, warm=1) * 1000 / n


def gelu_halves(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> None:
    half = x.shape[0] // 2
    for rows in (slice(0, half), slice(half, None)):
        torch._addmm_activation(b, x[rows], w.t(), use_gelu=True, out=y[rows])


def ops_of(g: torch.cuda.CUDAGraph, n: int = 20) -> Counter:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
    found = Counter()
    for e in prof.key_averages():
        if e.device_type.name == "CUDA":
            found[e.key[:60]] += e.count // n
    return found


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    torch.manual_seed(0)
    calls = []
    for m in (1024, 4096):
        for name, (k, n) in GEMMS.items():
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            w = torch.randn(n, k, dtype=torch.float16, device="cuda") / k**0.5
            b = torch.randn(n, dtype=torch.float16, device="cuda")
            ways = {
                "linear+bias": lambda x=x, w=w, b=b: F.linear(x, w, b),
                "mm": lambda x=x, w=w: torch.mm(x, w.t()),
            }
            if name == "ffn1":
                y = torch.empty(m, n, dtype=torch.float16, device="cuda")
                ways["addmm_act gelu"] = lambda x=x, w=w, b=b: torch._addmm_activation(
                    b, x, w.t(), use_gelu=True
                )
                # the same GEMM as two of M/2 rows written into the halves of one output
                # (contiguous row blocks: no copy): does cuBLASLt then pick a kernel without
                # the memset it adds at M = 4096?
                ways["addmm_act gelu 2x M/2"] = lambda x=x, w=w, b=b, y=y: gelu_halves(x, w, b, y)
            calls += [(m, name, way, fn) for way, fn in ways.items()]
    # Each graph is captured for its timing or its profile and dropped after it (a first
    # version, capturing with torch.cuda.graph alone and replaying every graph at the end, met
    # an illegal address: cuBLAS's cached workspace). The profiles come last: CUPTI stays
    # attached once started.
    times = [replay_us(graph_of(fn)) for *_, fn in calls]
    for (m, name, way, fn), us in zip(calls, times):
        ops = ops_of(graph_of(fn))
        memsets = sum(c for k, c in ops.items() if k.startswith("Memset"))
        kernels = "; ".join(f"{c}x {k}" for k, c in ops.items() if not k.startswith("Memset"))
        tflops = 2 * m * GEMMS[name][0] * GEMMS[name][1] / us / 1e6
        print(
            f"M={m:<5} {name:5} {way:15} {us:7.2f} µs {tflops:5.0f} TFLOP/s  "
            f"memsets {memsets}  {kernels}",
            flush=True,
        )


if __name__ == "__main__":
    main()
