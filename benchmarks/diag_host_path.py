"""Where a BERT artifact's call spends host time before its graph replay starts (issue 14):
per shape (GPU inputs), the host µs from the call's entry to `graph.replay()`, split by step
(the inputs' checks, the bucket, the device/launcher context, the copy in), the replay's
own launch, and the host µs after it; the GPU waits through the steps before the replay.

    python benchmarks/diag_host_path.py /tmp/bench_bert_fusions_*/bert.kernl

Each step is timed by a wrapper (perf_counter_ns, ~0.2 µs each); medians of 300 calls,
host synchronised between calls, so every call starts with an idle GPU as a lone request's
does."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

import kernl.runtime as rt
from kernl.runtime import model as model_module

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bert_fusions import SHAPES, inputs  # noqa: E402

marks: list[tuple[str, int]] = []


def mark(name: str) -> None:
    marks.append((name, time.perf_counter_ns()))


def timed_method(obj, name: str) -> None:
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        mark(f"{name}>")
        try:
            return fn(*args, **kwargs)
        finally:
            mark(f"{name}<")

    setattr(obj, name, wrapper)


def main(artifact: str) -> None:
    model = rt.load(artifact)
    for name in ("_check_inputs", "select_bucket", "_copy_in_device"):
        timed_method(model, name)
    running_with = model_module.running_with

    class _TimedContext:
        def __init__(self, *args):
            self.cm = running_with(*args)

        def __enter__(self):
            mark("context>")
            self.cm.__enter__()
            mark("context<")

        def __exit__(self, *exc):
            return self.cm.__exit__(*exc)

    model_module.running_with = _TimedContext
    for runner in model._runners.values():
        if runner.graph is None:
            continue
        replay = runner.graph.replay

        def timed_replay(replay=replay):
            mark("replay>")
            replay()
            mark("replay<")

        runner.graph.replay = timed_replay
    for batch, seq in SHAPES:
        feed = inputs(batch, seq)
        steps: dict[str, list[float]] = {}
        for i in range(310):
            torch.cuda.synchronize()
            marks.clear()
            mark("call>")
            out = model(**feed)
            mark("call<")
            torch.cuda.synchronize()
            mark("done")
            if i < 10:
                continue
            t = dict(marks)
            spans = {
                "check_inputs": t["_check_inputs<"] - t["_check_inputs>"],
                "select_bucket": t["select_bucket<"] - t["select_bucket>"],
                "context": t["context<"] - t["context>"],
                "copy_in": t["_copy_in_device<"] - t["_copy_in_device>"],
                "before_replay": t["replay>"] - t["call>"],
                "replay_launch": t["replay<"] - t["replay>"],
                "after_replay": t["call<"] - t["replay<"],
                "call_to_done": t["done"] - t["call>"],
            }
            for k, v in spans.items():
                steps.setdefault(k, []).append(v / 1000)
        del out
        med = {k: round(statistics.median(v), 1) for k, v in steps.items()}
        print(json.dumps({"shape": f"{batch}x{seq}", "median_us": med}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
