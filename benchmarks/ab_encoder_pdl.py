"""Programmatic dependent launch of the encoder's layer norms and attentions
(kernl/compiler/launch_dependent.py) and the range check's reduction beside the model
(`CompiledModel._checks_beside_model`), each on and off, in one process on one artifact
compiled with PDL configs (issue 14).

    python benchmarks/ab_encoder_pdl.py /tmp/bench_bert_fusions_*/bert.kernl

Four models loaded from the artifact: neither (the PDL binaries launched plainly, their
griddepcontrol.wait returning at once; the check's reduction before the model), PDL alone,
the check beside alone, both (the default). Per shape: outputs equal bit for bit; 600 calls
with GPU inputs and 600 replays of each bucket graph alone, the models taking turns call by
call (ms between CUDA events, host synchronised between calls: medians, and the median of
the paired ratios against "neither"); then one profiled replay of each: kernels' busy time
and the idle between them (under PDL a kernel's profiled time includes its wait, so busy
grows where idle shrinks: the span is the figure)."""

from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bert_fusions import SHAPES, time_alternating, to_gpu, tokenizer_output  # noqa: E402
from diag_call_gaps import device_intervals  # noqa: E402

VARIANTS = {  # name -> (binaries launched dependent, the checks beside the model)
    "neither": (False, False),
    "pdl": (True, False),
    "beside": (False, True),
    "both": (True, True),
}


def load(artifact: str, dependent: bool, beside: bool):
    import kernl.runtime
    from kernl.runtime.binaries import KernelBinaries
    from kernl.runtime.model import CompiledModel

    before = KernelBinaries.launch_dependent, CompiledModel._checks_beside_model
    KernelBinaries.launch_dependent, CompiledModel._checks_beside_model = dependent, beside
    try:
        return kernl.runtime.load(artifact)
    finally:
        KernelBinaries.launch_dependent, CompiledModel._checks_beside_model = before


def main(artifact: str) -> None:
    models = {name: load(artifact, *flags) for name, flags in VARIANTS.items()}
    names = list(VARIANTS)
    program = next(iter(models["both"]._runners.values())).executor.program
    pdl = sum(
        1
        for ins in program.instructions
        if ins.kwargs.get("config") and dict(ins.kwargs["config"]).get("pdl")
    )
    print(f"{program.bucket.batch}x{program.bucket.seq}: {pdl} kernels with PDL configs")
    print("shape   call ms " + " / ".join(names) + ", paired vs neither;   replay ms the same")
    runners = []
    with torch.inference_mode():
        for b, s in SHAPES:
            x = to_gpu(tokenizer_output(b, s))
            ref = models["neither"](**x)[0]
            for m in models.values():
                assert torch.equal(ref, m(**x)[0])
            rs = {n: m._runners[m.select_bucket(b, s)] for n, m in models.items()}
            runners.append(((b, s), rs))
            calls = time_alternating({n: (lambda m=m: m(**x)) for n, m in models.items()}, 600)
            replays = time_alternating({n: r.graph.replay for n, r in rs.items()}, 600)
            row = []
            for t in (calls, replays):
                med = [statistics.median(t[n]) for n in names]
                paired = [
                    statistics.median(a / e for a, e in zip(t["neither"], t[n])) for n in names[1:]
                ]
                row.append(
                    " / ".join(f"{m:.3f}" for m in med)
                    + ", "
                    + " / ".join(f"{p:.3f}x" for p in paired)
                )
            print(f"{b}x{s:<5} {row[0]};   {row[1]}", flush=True)
    for (b, s), rs in runners:  # profiles last: the profiler slows later launches
        for name, runner in rs.items():
            stats = []
            for ev in device_intervals(runner.graph.replay):
                busy = sum(d for _, _, d in ev)
                span = ev[-1][1] + ev[-1][2] - ev[0][1]
                stats.append((span, busy, len(ev)))
            span, busy, n = sorted(stats)[len(stats) // 2]
            print(
                f"{b}x{s} {name}: {n} device ops, busy {busy:.1f} µs, first start to last "
                f"end {span:.1f} µs, idle {span - busy:.1f} µs",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1])
