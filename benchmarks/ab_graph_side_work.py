"""Each bucket graph's side work beside its path (kernl/runtime/graph_edges.py: the range
check's copy and event off the model's path) and cuBLAS's memset nodes as fill kernels
(kernl/runtime/memset_nodes.py), against the graphs as captured, in one process on one
artifact (issue 14).

    python benchmarks/ab_graph_side_work.py /tmp/bench_bert_fusions_*/bert.kernl

Three models loaded from the artifact: the graphs as captured; the check's copy off the path
(the default until 2026-12-04); that and the memsets as fills (the default since). Per shape:
outputs equal bit for bit; 600 replays of each bucket graph alone and 600 calls with GPU
inputs, the models taking turns call by call (ms between CUDA events, host synchronised
between calls: medians and the median of the paired ratios); the host's µs inside each
graph's `replay()` (median of the 600); then one profiled replay of each: kernels' busy time,
idle between them, memsets. (Moving the memsets beside the kernl kernel before them,
`_memsets_off_path`, measured slower on 2026-12-02 and is no longer compared.)"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bert_fusions import (  # noqa: E402
    SHAPES,
    load_with,
    time_alternating,
    to_gpu,
    tokenizer_output,
)
from diag_call_gaps import device_intervals  # noqa: E402

VARIANTS = {  # name -> CompiledModel's switches
    "captured": {"_side_work_off_path": False, "_memsets_as_kernels": False},
    "check": {"_side_work_off_path": True, "_memsets_as_kernels": False},
    "fills": {"_side_work_off_path": True, "_memsets_as_kernels": True},
}


def main(artifact: str) -> None:
    models = {name: load_with(artifact, **flags) for name, flags in VARIANTS.items()}
    for name, m in models.items():
        print(
            f"{name}: edges removed over {len(m.buckets)} graphs: {m.side_edges_removed}, "
            f"memsets as fills: {m.memsets_replaced}, error: {m.side_work_error}"
        )
    names = list(VARIANTS)
    print("shape   replay ms " + " / ".join(names) + ", paired vs captured;  call ms the same")
    runners = []
    with torch.inference_mode():
        for b, s in SHAPES:
            x = to_gpu(tokenizer_output(b, s))
            ref = models["captured"](**x)[0]
            for m in models.values():
                assert torch.equal(ref, m(**x)[0])
            rs = {n: m._runners[m.select_bucket(b, s)] for n, m in models.items()}
            runners.append(((b, s), rs))
            replays = time_alternating({n: r.graph.replay for n, r in rs.items()}, 600)
            calls = time_alternating({n: (lambda m=m: m(**x)) for n, m in models.items()}, 600)
            row = []
            for t in (replays, calls):
                med = [statistics.median(t[n]) for n in names]
                paired = [
                    statistics.median(a / e for a, e in zip(t["captured"], t[n])) for n in names[1:]
                ]
                row.append(
                    " / ".join(f"{m:.3f}" for m in med)
                    + ", "
                    + " / ".join(f"{p:.3f}x" for p in paired)
                )
            host = {n: [] for n in names}
            for _ in range(200):
                for n, r in rs.items():
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    r.graph.replay()
                    host[n].append((time.perf_counter() - t0) * 1e6)
            launch = " / ".join(f"{statistics.median(host[n]):.1f}" for n in names)
            print(f"{b}x{s:<5} {row[0]}   {row[1]}   replay() host µs {launch}", flush=True)
    for (b, s), rs in runners:  # profiles last: the profiler slows later launches
        for name, runner in rs.items():
            stats = []
            for ev in device_intervals(runner.graph.replay):
                busy = sum(d for _, _, d in ev)
                span = ev[-1][1] + ev[-1][2] - ev[0][1]
                memsets = sum(1 for e in ev if e[0].startswith("Memset"))
                stats.append((span, busy, memsets, len(ev)))
            span, busy, memsets, n = sorted(stats)[len(stats) // 2]
            print(
                f"{b}x{s} {name}: {n} device ops ({memsets} memsets), busy {busy:.1f} µs, "
                f"first start to last end {span:.1f} µs, idle {span - busy:.1f} µs",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1])
