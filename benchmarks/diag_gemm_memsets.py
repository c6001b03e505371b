"""Which of BERT-base's GEMMs make cuBLAS add a memset to a CUDA graph, and what each costs
(issue 14: 12 memsets per call at 32x128 and 8x512, each followed by ~3 µs of idle GPU).

    python benchmarks/diag_gemm_memsets.py

For each GEMM of a BERT-base layer at M = 1024 and 4096 tokens (fp16), and each way kernl's
runtime can call it (F.linear with bias; torch._addmm_activation with the tanh-GELU epilogue,
whole or as two GEMMs of M/2 rows into one output; torch.mm without bias): µs per call (bench_utils' median_ms, CUDA-graph replays) and the device
ops per call the profiler sees in a graph of 20 calls (kernels, memsets)."""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from bench_utils import median_ms

GEMMS = {"qkv": (768, 2304), "o": (768, 768), "ffn1": (768, 3072), "ffn2": (3072, 768)}


def graph_of(fn, n: int = 20) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    return g


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
    # Profiled graphs are captured right before their profile and dropped after it: replaying
    # graphs captured before later ones crashed in the profiler (an illegal address,
    # 2026-12-02). The profiles come last: CUPTI stays attached once started.
    times = []
    for *_, fn in calls:
        times.append(1000 * median_ms(fn))
        torch.cuda.synchronize()
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
