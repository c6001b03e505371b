"""An existing BERT-base fp16 artifact against torch.compile(mode="reduce-overhead"), interleaved
in one process: kernl with inputs on the GPU, reduce-overhead, kernl with inputs on the CPU,
three rounds per shape, the median of each (200 calls between CUDA events, host synchronised
between calls); then 600 calls of each taking turns call by call, with the median of the
paired ratios (r-o's call over the kernl call next to it), which a drift of the host's speed
between rounds does not move. Quicker than bench_bert_fusions.py when an artifact already
exists (no compile, no profiler); the device's host speed moves between runs, so compare
within one run only.

    python benchmarks/bench_bert_artifact_vs_ro.py /tmp/bench_bert_fusions_*/bert.kernl

The reference model is BertModel(BertConfig()) with random weights (seed 0), fp16: timing
only (bench_bert_fusions.py checks accuracy)."""

from __future__ import annotations

import os
import statistics
import sys

import torch
import transformers as T

import kernl.runtime as rt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bert_fusions import (  # noqa: E402
    SHAPES,
    time_alternating,
    time_ms,
    to_gpu,
    tokenizer_output,
)


def main(artifact: str) -> None:
    compiled = rt.load(artifact)
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig()).eval().half().cuda()
    print("shape  kernl GPU-in ms  r-o ms  kernl CPU-in ms  vs r-o (GPU in / CPU in)  rounds")
    for b, s in SHAPES:
        cpu = tokenizer_output(b, s)
        gpu = to_gpu(cpu)
        torch._dynamo.reset()
        ro = torch.compile(model, mode="reduce-overhead", dynamic=False)
        rounds: dict[str, list[float]] = {"gpu": [], "ro": [], "cpu": []}
        with torch.inference_mode():
            for _ in range(3):
                ro(**gpu)
            for _ in range(3):
                rounds["gpu"].append(time_ms(lambda: compiled(**gpu), 200))
                rounds["ro"].append(time_ms(lambda: ro(**gpu), 200))
                rounds["cpu"].append(time_ms(lambda: compiled(**cpu), 200))
            turns = time_alternating(
                {
                    "gpu": lambda: compiled(**gpu),
                    "ro": lambda: ro(**gpu),
                    "cpu": lambda: compiled(**cpu),
                },
                600,
            )
        med = {k: statistics.median(v) for k, v in rounds.items()}
        paired = {
            k: statistics.median(r / t for r, t in zip(turns["ro"], turns[k]))
            for k in ("gpu", "cpu")
        }
        turn_med = {k: statistics.median(v) for k, v in turns.items()}
        print(
            f"{b}x{s:<5} {med['gpu']:10.3f} {med['ro']:10.3f} {med['cpu']:12.3f}   "
            f"{med['ro'] / med['gpu']:.2f}x / {med['ro'] / med['cpu']:.2f}x   "
            f"{ {k: [round(x, 3) for x in v] for k, v in rounds.items()} }\n"
            f"        taking turns: kernl GPU-in {turn_med['gpu']:.3f}, r-o {turn_med['ro']:.3f}, "
            f"kernl CPU-in {turn_med['cpu']:.3f} ms; paired r-o / kernl "
            f"{paired['gpu']:.2f}x / {paired['cpu']:.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1])
