"""Does a large encoder call gain from running as two half-batches on two streams of one graph
(issue 14: 32x128 and 8x512 are bound by cuBLAS's GEMMs, whose last wave leaves SMs idle:
at M = 4096, O and FFN2 make ~96 tiles of 128x256 for 132 SMs, QKV ~2.2 waves)?

    python benchmarks/bench_split_batch.py          # JSON to $OUT/bench_split_batch.json

One process, BERT-base fp16 (random, seed 0) compiled for "batch=4,8,16,32 seq=128,512".
Per large shape, graphs of the same artifact's executors, timed taking turns (medians of 300
replays between CUDA events):
- whole: the bucket's own graph, as a call replays it;
- split2-serial: the half bucket's program twice, one stream (what smaller GEMMs cost alone);
- split2 / split4: the half (quarter) bucket's program on two (four) streams forked inside
  the graph and joined at its end: one half's norms and attention beside the other's GEMMs,
  and each GEMM's last wave beside the other stream's kernels.
Every variant's last_hidden_state is compared with the whole graph's (max |diff|).
Then the same question for cuBLAS alone: 12 layers of BERT-base's four GEMMs at M = 4096,
one stream against two streams of M = 2048."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BUCKETS = "batch=4,8,16,32 seq=128,512"
CASES = [((32, 128), [(16, 2), (8, 4)]), ((8, 512), [(4, 2)])]  # (shape, [(part batch, parts)])


def time_turns(graphs: dict[str, torch.cuda.CUDAGraph], iters: int = 300) -> dict[str, float]:
    """Median ms of one replay per name, the graphs taking turns replay by replay."""
    from bench_bert_fusions import time_alternating

    times = time_alternating({name: g.replay for name, g in graphs.items()}, iters)
    return {name: statistics.median(t) for name, t in times.items()}


def forked(parts: list, streams: list[torch.cuda.Stream] | None):
    """A function running each of `parts` (callables) on its own stream (forked from and joined
    to the current one), or all on the current stream when `streams` is None."""

    def run():
        if streams is None:
            return [p() for p in parts]
        main = torch.cuda.current_stream()
        outs = [None] * len(parts)
        for i, (p, s) in enumerate(zip(parts, streams)):
            if i == 0:
                outs[0] = p()
                continue
            s.wait_stream(main)
            with torch.cuda.stream(s):
                outs[i] = p()
        for s in streams[1:]:
            main.wait_stream(s)
        return outs

    return run


def split_graphs(model, big: tuple[int, int], part: tuple[int, int], pieces: int, streams):
    from kernl.runtime.binaries import running_with
    from kernl.runtime.graphs import capture_graph

    runner = model._runners[model.select_bucket(*big)]
    small = model._runners[model.select_bucket(*part)]
    assert (small.bucket.batch, small.bucket.seq) == part, small.bucket
    rows = part[0]
    chunks = [
        {name: t[i * rows : (i + 1) * rows] for name, t in runner.static_inputs.items()}
        for i in range(pieces)
    ]
    parts = [lambda c=c: small.executor.run(c) for c in chunks]
    out = {}
    for name, st in (("serial", None), ("streams", streams[:pieces])):
        with running_with(model._binaries, model.device):
            graph, outs = capture_graph(
                forked(parts, st), model._pool, device=model.device, edit=model._graph_edit
            )
        out[name] = (graph, outs)
    return runner, out


def gemm_chain(m: int, streams: int) -> torch.cuda.CUDAGraph:
    """12 layers of BERT-base's QKV, O, FFN1 and FFN2 GEMMs (fp16, cuBLAS) at `m` rows, in
    `streams` independent row blocks on as many streams."""
    from kernl.runtime.graphs import capture_graph

    torch.manual_seed(0)
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5 for k, n in shapes]
    rows = m // streams
    xs = [torch.randn(rows, 3072, device="cuda", dtype=torch.float16) for _ in range(streams)]

    def chain(x):
        def run():
            y = x
            for _ in range(12):
                for w in ws:
                    y = torch.nn.functional.linear(y[:, : w.shape[1]], w)
            return y

        return run

    side = [torch.cuda.Stream() for _ in range(streams)]
    graph, _ = capture_graph(
        forked([chain(x) for x in xs], side if streams > 1 else None), None, device=None
    )
    return graph


def main() -> None:
    import transformers

    import kernl.compiler
    import kernl.runtime

    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "buckets": BUCKETS,
        "shapes": [],
    }
    work = tempfile.mkdtemp(prefix="bench_split_batch_")
    os.environ["KERNL_CACHE_DIR"] = f"{work}/cache"
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig()).eval().save_pretrained(f"{work}/bert")
    t0 = time.perf_counter()
    kernl.compiler.compile(
        f"{work}/bert", BUCKETS, f"{work}/bert.kernl", dtype="fp16", device="cuda"
    )
    result["compile_s"] = round(time.perf_counter() - t0, 1)
    print(f"compile {result['compile_s']} s", flush=True)
    model = kernl.runtime.load(f"{work}/bert.kernl")
    streams = [torch.cuda.Stream() for _ in range(4)]
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for big, parts in CASES:
            ids = torch.randint(0, 30000, big, generator=g).cuda()
            model(input_ids=ids)  # fills the bucket's static inputs
            runner = model._runners[model.select_bucket(*big)]
            graphs = {"whole": runner.graph}
            outs = {"whole": lambda: runner.static_outputs[0]}
            for part, pieces in parts:
                _, made = split_graphs(model, big, (part, big[1]), pieces, streams)
                for kind, (graph, o) in made.items():
                    name = f"split{pieces}-{kind}"
                    graphs[name] = graph
                    outs[name] = lambda o=o: torch.cat([p[0] for p in o])
            for graph in graphs.values():
                graph.replay()
            torch.cuda.synchronize()
            ref = outs["whole"]().float()
            diffs = {n: float((f().float() - ref).abs().max()) for n, f in outs.items()}
            ms = time_turns(graphs)
            row = {"shape": f"{big[0]}x{big[1]}", "ms": ms, "max_abs_diff": diffs}
            result["shapes"].append(row)
            for name in graphs:
                print(
                    f"{big[0]}x{big[1]:<4} {name:16s} {ms[name]:.4f} ms "
                    f"({ms['whole'] / ms[name]:.3f}x)  max|diff| {diffs[name]:.2e}",
                    flush=True,
                )
    chains = {f"gemms-{s}stream": gemm_chain(4096, s) for s in (1, 2)}
    result["gemm_chain_ms"] = time_turns(chains)
    for name, t in result["gemm_chain_ms"].items():
        print(f"4096 rows {name:16s} {t:.4f} ms", flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "bench_split_batch.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
