"""Where one call of a compiled BERT artifact spends its GPU time, by kernel (issue 14): the
torch profiler (CUPTI traces the kernels inside CUDA graphs) over ten calls per shape, GPU
inputs as `bench_bert_fusions.py` gives them; kernels grouped by name, heaviest first.

    python benchmarks/profile_bert_kernels.py /tmp/bench_bert_fusions_*/bert.kernl 32x128 8x128

Per shape: kernel ms per call, kernels per call, then each name's ms, count and µs per launch.
Kernel names are cut at 100 characters; kernl's own kernels carry their Triton names."""

from __future__ import annotations

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import kernl.runtime as rt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bert_fusions import inputs  # noqa: E402


def main() -> None:
    artifact, shapes = sys.argv[1], sys.argv[2:] or ["32x128"]
    model = rt.load(artifact)
    for shape in shapes:
        batch, seq = map(int, shape.split("x"))
        x = inputs(batch, seq)
        with torch.inference_mode():
            for _ in range(5):
                model(**x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    model(**x)
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        total = sum(e.self_device_time_total for e in events) / 10
        count = sum(e.count for e in events) // 10
        print(f"== {shape}: {total / 1000:.3f} ms of kernel time per call, {count} kernels")
        for e in sorted(events, key=lambda e: -e.self_device_time_total):
            per_call = e.self_device_time_total / 10
            n = max(e.count // 10, 1)
            print(f"  {per_call / 1000:7.3f} ms  x{n:3d}  {per_call / n:7.2f} us  {e.key[:100]}")


if __name__ == "__main__":
    main()
