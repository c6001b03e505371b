"""Where a BERT artifact's call time goes beyond its kernels' own time (issue 14): per shape,
the whole call (GPU inputs), the bucket's graph replay alone, and from one profiled call the
kernels' busy time, the idle time between them inside the replay, and the kernels by name.

    python benchmarks/diag_call_gaps.py /tmp/bench_bert_fusions_*/bert.kernl

All timings first, then the profiles (the profiler leaves CUPTI attached: pytorch#144455).
Medians of 200 calls between CUDA events, host synchronised between calls."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import defaultdict

import torch

import kernl.runtime as rt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bert_fusions import SHAPES, inputs, time_ms  # noqa: E402


def device_intervals(fn, calls: int = 5) -> list[list[tuple[str, float, float]]]:
    """Per call, (name, start µs, duration µs) of every kernel, memcpy and memset it ran."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    for _ in range(calls):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            prof.export_chrome_trace(f.name)
            trace = json.load(open(f.name))
        ev = [
            (e["name"], float(e["ts"]), float(e["dur"]))
            for e in trace["traceEvents"]
            if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
        ]
        out.append(sorted(ev, key=lambda e: e[1]))
    return out


def main(artifact: str) -> None:
    compiled = rt.load(artifact)
    runners = {}
    rows = []
    with torch.inference_mode():
        for b, s in SHAPES:
            x = inputs(b, s)
            runner = compiled._runners[compiled.select_bucket(b, s)]
            compiled(**x)
            runners[(b, s)] = (x, runner)
            call = time_ms(lambda: compiled(**x), 200)
            replay = time_ms(lambda: runner.graph.replay(), 200)
            two = time_ms(lambda: (runner.graph.replay(), runner.graph.replay()), 200)
            rows.append((b, s, call, replay, two - replay))
        print("shape   call ms  replay ms  2nd replay back-to-back ms  call - replay ms")
        for b, s, call, replay, second in rows:
            print(f"{b}x{s:<5} {call:8.3f} {replay:9.3f} {second:12.3f} {call - replay:14.3f}")
        for (b, s), (_, runner) in runners.items():
            calls = device_intervals(lambda: runner.graph.replay())
            stats = []
            for ev in calls:
                busy = sum(d for _, _, d in ev)
                span = ev[-1][1] + ev[-1][2] - ev[0][1]
                stats.append((len(ev), busy, span))
            stats.sort(key=lambda t: t[2])
            n, busy, span = stats[len(stats) // 2]
            print(
                f"\n{b}x{s}: {n} device ops, busy {busy:.1f} µs, first start to last end "
                f"{span:.1f} µs, idle between them {span - busy:.1f} µs "
                f"({(span - busy) / max(n - 1, 1):.2f} µs per boundary; median of 5 replays)"
            )
            ev = calls[0]
            for i, (name, _, _) in enumerate(ev):
                if name.startswith("Memset"):  # whose is it: the ops around the first one
                    around = [e[0][:70] for e in ev[max(i - 1, 0) : i + 3]]
                    print("  around the first memset: " + " | ".join(around))
                    break
            by_name: dict[str, list[float]] = defaultdict(list)
            gaps_after: dict[str, list[float]] = defaultdict(list)
            for i, (name, ts, dur) in enumerate(ev):
                by_name[name[:90]].append(dur)
                if i + 1 < len(ev):
                    gaps_after[name[:60]].append(ev[i + 1][1] - ts - dur)
            for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:14]:
                print(f"  {sum(durs):8.1f} µs {len(durs):4d}x  {name}")
            print("  idle after, by kernel (µs total, count):")
            for name, g in sorted(gaps_after.items(), key=lambda kv: -sum(kv[1]))[:8]:
                print(f"  {sum(g):8.1f} µs {len(g):4d}x  {name}")


if __name__ == "__main__":
    main(sys.argv[1])
