"""The input range checks as each graph's first nodes against the same checks launched by
every call before the replay (issue 14's host work), in one process on one artifact: two
models loaded from it, one each way (`CompiledModel._checks_in_graph`), GPU and CPU inputs.

    python benchmarks/ab_checks_in_graph.py /tmp/bench_bert_fusions_*/bert.kernl

Per shape: outputs equal bit for bit, a bad id refused by both, then 600 calls of each of the
four taking turns call by call (ms between CUDA events, host synchronised between calls:
medians, and the median of the paired ratios eager / in-graph), and the host's own time of a
call from an idle GPU to its return (µs, median of 300)."""

from __future__ import annotations

import os
import statistics
import sys

import torch

import kernl.runtime as rt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bert_fusions import (  # noqa: E402
    SHAPES,
    host_us,
    load_with,
    time_alternating,
    to_gpu,
    tokenizer_output,
)


def main(artifact: str) -> None:
    in_graph = rt.load(artifact)
    eager = load_with(artifact, _checks_in_graph=False)
    assert all(r.checks_in_graph for r in in_graph._runners.values())
    assert not any(r.checks_in_graph for r in eager._runners.values())
    print(
        "shape   in-graph/eager GPU-in ms   in-graph/eager CPU-in ms   paired eager/in-graph "
        "(GPU, CPU)   host µs in-graph/eager (GPU, CPU)"
    )
    with torch.inference_mode():
        for b, s in SHAPES:
            cpu = tokenizer_output(b, s)
            gpu = to_gpu(cpu)
            for x in (cpu, gpu):
                assert torch.equal(in_graph(**x)[0], eager(**x)[0])
                bad = {k: v.clone() for k, v in x.items()}
                bad["input_ids"][0, 1] = 10**6
                for m in (in_graph, eager):
                    try:
                        m(**bad)
                        raise AssertionError("a bad id was not refused")
                    except ValueError:
                        pass
            fns = {
                "graph_gpu": lambda: in_graph(**gpu),
                "eager_gpu": lambda: eager(**gpu),
                "graph_cpu": lambda: in_graph(**cpu),
                "eager_cpu": lambda: eager(**cpu),
            }
            turns = time_alternating(fns, 600)
            med = {k: statistics.median(v) for k, v in turns.items()}
            paired = {
                w: statistics.median(
                    e / g for e, g in zip(turns[f"eager_{w}"], turns[f"graph_{w}"])
                )
                for w in ("gpu", "cpu")
            }
            host = {k: host_us(fn, 300) for k, fn in fns.items()}
            print(
                f"{b}x{s:<5} {med['graph_gpu']:.3f} / {med['eager_gpu']:.3f}   "
                f"{med['graph_cpu']:.3f} / {med['eager_cpu']:.3f}   "
                f"{paired['gpu']:.3f}x, {paired['cpu']:.3f}x   "
                f"{host['graph_gpu']:.0f} / {host['eager_gpu']:.0f}, "
                f"{host['graph_cpu']:.0f} / {host['eager_cpu']:.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1])
