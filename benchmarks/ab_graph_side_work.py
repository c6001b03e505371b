"""Each bucket graph's side work beside its path (kernl/runtime/graph_edges.py: cuBLAS's
memsets started with the kernl kernel before them, the range check's copy and event off the
model's path) against the graphs as captured, in one process on one artifact (issue 14).

    python benchmarks/ab_graph_side_work.py /tmp/bench_bert_fusions_*/bert.kernl

Two models loaded from the artifact, `CompiledModel._side_work_off_path` off and on. Per
shape: outputs equal bit for bit; 600 replays of each bucket graph alone and 600 calls with
GPU inputs, the two models taking turns call by call (ms between CUDA events, host
synchronised between calls: medians and the median of the paired ratios); then one
profiled replay of each: kernels' busy time, idle between them, memsets."""

from __future__ import annotations

import os
import statistics
import sys

import torch

import kernl.runtime as rt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bert_fusions import (  # noqa: E402
    SHAPES,
    load_with,
    time_alternating,
    to_gpu,
    tokenizer_output,
)
from diag_call_gaps import device_intervals  # noqa: E402


def main(artifact: str) -> None:
    as_captured = rt.load(artifact)
    edited = load_with(artifact, _side_work_off_path=True)
    print(f"edges removed over {len(edited.buckets)} graphs: {edited.side_edges_removed}")
    print("shape   replay ms captured / edited, paired   call ms captured / edited, paired")
    runners = []
    with torch.inference_mode():
        for b, s in SHAPES:
            x = to_gpu(tokenizer_output(b, s))
            assert torch.equal(as_captured(**x)[0], edited(**x)[0])
            r0 = as_captured._runners[as_captured.select_bucket(b, s)]
            r1 = edited._runners[edited.select_bucket(b, s)]
            runners.append(((b, s), r0, r1))
            replays = time_alternating({"0": r0.graph.replay, "1": r1.graph.replay}, 600)
            calls = time_alternating({"0": lambda: as_captured(**x), "1": lambda: edited(**x)}, 600)
            row = []
            for t in (replays, calls):
                med = [statistics.median(t[k]) for k in "01"]
                paired = statistics.median(a / e for a, e in zip(t["0"], t["1"]))
                row.append(f"{med[0]:.3f} / {med[1]:.3f}, {paired:.3f}x")
            print(f"{b}x{s:<5} {row[0]}   {row[1]}", flush=True)
    for (b, s), r0, r1 in runners:  # profiles last: the profiler slows later launches
        for name, runner in (("captured", r0), ("edited", r1)):
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
