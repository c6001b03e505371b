"""What does a memset node cost inside a CUDA graph, against a kernel that writes the same
zeros? (issue 14)

At BERT-base's M = 4096 buckets cuBLAS zeroes a small workspace before FFN1's GEMM (its
256x128 "coopA" kernel), captured as a memset node: 0.8 µs of memset, then ~3.3 µs of idle
before the GEMM starts (H200, docs/performance.md, twelfth session), and those graphs take
~25 µs to launch against ~7 µs for the buckets without memsets (eighteenth session). This
bench isolates the node kind: twelve "layers" of a layer norm, a 4 KiB zeroing, then a GEMM
(M = 4096, 768 x 768, a cuBLAS kernel that needs no memset), captured four ways:

- `memset`: the zeroing as a memset node (cuMemsetD32Async under capture, as cuBLAS does);
- `fill`: the same zeros written by a kernel (`Tensor.zero_`);
- `none`: no zeroing;
- `cublas`: FFN1's real GEMM with its bias + tanh-GELU epilogue (cuBLAS's own memset).

Per variant: GPU µs per replay (CUDA events, median of 200), and the host's µs inside
`graph.replay()` (median of 200, the GPU idle before each). JSON lines.

    python benchmarks/diag_memset_nodes.py"""

from __future__ import annotations

import ctypes
import json
import statistics
import time

import torch
import torch.nn.functional as F

LAYERS, M, H, FFN = 12, 4096, 768, 3072


def main() -> None:
    cu = ctypes.CDLL("libcuda.so.1")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, H, dtype=torch.float16, device="cuda", generator=g)
    w = torch.randn(H, H, dtype=torch.float16, device="cuda", generator=g) / H**0.5
    w1 = torch.randn(FFN, H, dtype=torch.float16, device="cuda", generator=g) / H**0.5
    b1 = torch.randn(FFN, dtype=torch.float16, device="cuda", generator=g)
    gamma = torch.ones(H, dtype=torch.float16, device="cuda")
    scratch = torch.zeros(1024, dtype=torch.int32, device="cuda")

    def memset() -> None:
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        rc = cu.cuMemsetD32Async(ctypes.c_uint64(scratch.data_ptr()), 0, 1024, stream)
        assert rc == 0, rc

    def layers(zero, gemm):
        def run():
            h = x
            for _ in range(LAYERS):
                y = F.layer_norm(h, (H,), gamma)
                if zero is not None:
                    zero()
                h = gemm(y)
            return h

        return run

    square = lambda y: torch.mm(y, w.t())  # noqa: E731
    ffn1 = lambda y: torch._addmm_activation(b1, y, w1.t(), use_gelu=True)[:, :H]  # noqa: E731
    variants = {
        "memset": layers(memset, square),
        "fill": layers(scratch.zero_, square),
        "none": layers(None, square),
        "cublas": layers(None, ffn1),
    }
    graphs = {}
    for name, fn in variants.items():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graphs[name] = graph
    for graph in graphs.values():
        graph.replay()
    torch.cuda.synchronize()
    gpu = {n: [] for n in graphs}
    host = {n: [] for n in graphs}
    for _ in range(200):  # the variants take turns, so drift hits all alike
        for name, graph in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            t0 = time.perf_counter()
            graph.replay()
            host[name].append((time.perf_counter() - t0) * 1e6)
            end.record()
            torch.cuda.synchronize()
            gpu[name].append(start.elapsed_time(end) * 1e3)
    for name in graphs:
        row = dict(
            variant=name,
            gpu_us=statistics.median(gpu[name]),
            host_replay_us=statistics.median(host[name]),
        )
        print(json.dumps(row), flush=True)
    base = statistics.median(gpu["none"])
    for name in ("memset", "fill"):
        per = (statistics.median(gpu[name]) - base) / LAYERS
        print(json.dumps(dict(variant=name, gpu_us_per_zeroing=per)), flush=True)


if __name__ == "__main__":
    main()
