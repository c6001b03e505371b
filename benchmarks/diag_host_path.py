"""Where a BERT artifact's call spends host time before its graph replay starts (issue 14):
per shape (GPU inputs), the host µs from the call's entry to `graph.replay()`, split by step
(the inputs' checks, the bucket, the device/launcher context, the copy in), the replay's
own launch, and the host µs after it; the GPU waits through the steps before the replay.
Two models of the artifact: "lean" (`CompiledModel._lean_call`, the default since
2026-12-03) and "full" (every call under the launcher context, as before), first taking
turns call by call (µs from the call to the GPU done, and the median paired ratio), then
the ways of writing the inputs into a block, then the two models' steps apart.

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


def load(artifact: str, lean: bool):
    from kernl.runtime.model import CompiledModel

    before = CompiledModel._lean_call
    CompiledModel._lean_call = lean
    try:
        return rt.load(artifact)
    finally:
        CompiledModel._lean_call = before


def paired(models: dict, rounds: int = 400) -> None:
    """Per shape, the call of each model in turn (the order alternating), host synchronised
    between calls: µs from the call to the GPU done, medians and the median paired ratio."""
    names = list(models)
    for batch, seq in SHAPES:
        feed = inputs(batch, seq)
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(rounds + 10):
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                torch.cuda.synchronize()
                t0 = time.perf_counter_ns()
                models[name](**feed)
                torch.cuda.synchronize()
                if i >= 10:
                    times[name].append((time.perf_counter_ns() - t0) / 1000)
        a, b = names
        ratio = statistics.median(x / y for x, y in zip(times[b], times[a]))
        row = {n: round(statistics.median(v), 1) for n, v in times.items()}
        row[f"{b}/{a}"] = round(ratio, 4)
        print(json.dumps({"shape": f"{batch}x{seq}", "call_to_done_us": row}), flush=True)


def steps(model, label: str) -> None:
    """The host's steps of one model's calls (wrappers on its methods and graphs)."""
    for name in ("_check_inputs", "select_bucket", "_copy_in_device"):
        timed_method(model, name)
    call_context = model._call_context

    class _TimedContext:
        def __init__(self, runner):
            self.cm = call_context(runner)

        def __enter__(self):
            mark("context>")
            self.cm.__enter__()
            mark("context<")

        def __exit__(self, *exc):
            return self.cm.__exit__(*exc)

    model._call_context = _TimedContext
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
        spans_of: dict[str, list[float]] = {}
        for i in range(310):
            torch.cuda.synchronize()
            marks.clear()
            mark("call>")
            model(**feed)
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
                spans_of.setdefault(k, []).append(v / 1000)
        med = {k: round(statistics.median(v), 1) for k, v in spans_of.items()}
        print(json.dumps({"model": label, "shape": f"{batch}x{seq}", "median_us": med}), flush=True)


def copy_ways(model) -> None:
    """The copy in alone, per way of writing three GPU inputs into a bucket's block: host µs
    of the call that queues it (GPU idle before each), medians of 300."""
    from kernl.runtime.model import _stackable_rows

    for batch, seq in SHAPES:
        feed = inputs(batch, seq)
        runner = model._runners[model.select_bucket(batch, seq)]
        (block, _), names = runner.blocks[0], runner.block_names[0]
        srcs = [feed.get(n) for n in names]
        if any(src is None for src in srcs):
            continue
        rows = list(block.unbind(0))
        view = block[0 : len(srcs)]
        ways = {
            "stackable_rows": lambda: _stackable_rows(runner, block, names, srcs, batch, seq),
            "stack_into_view": lambda: torch.stack(srcs, out=view),
            "stack_into_fresh_view": lambda: torch.stack(srcs, out=block[0 : len(srcs)]),
            "foreach_copy": lambda: torch._foreach_copy_(rows, srcs),
            "copy_per_row": lambda: [r.copy_(src) for r, src in zip(rows, srcs)],
        }
        row = {}
        for name, way in ways.items():
            times = []
            for i in range(310):
                torch.cuda.synchronize()
                t0 = time.perf_counter_ns()
                way()
                if i >= 10:
                    times.append((time.perf_counter_ns() - t0) / 1000)
            row[name] = round(statistics.median(times), 1)
        torch.cuda.synchronize()
        runner.filled.clear()  # its rows hold this call's inputs now, no default
        print(json.dumps({"shape": f"{batch}x{seq}", "copy_in_host_us": row}), flush=True)


def main(artifact: str) -> None:
    models = {"full": load(artifact, lean=False), "lean": load(artifact, lean=True)}
    for label, model in models.items():  # both ways give the same outputs
        feed = inputs(8, 128)
        out = model(**feed)["last_hidden_state"]
        if label == "full":
            want = out.clone()
        else:
            print(json.dumps({"outputs_equal_bitwise": bool(torch.equal(out, want))}))
    paired(models)
    copy_ways(models["lean"])
    for label, model in models.items():
        steps(model, label)


if __name__ == "__main__":
    main(sys.argv[1])
