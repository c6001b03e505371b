"""BERT-base fp16 end to end on a GPU: compile time (cold and with a warm tuning cache),
cold start over 20 buckets, GPU memory, and latency against eager and torch.compile.
Prints markdown tables for docs/performance.md and writes them (and JSON) under --out.

    python benchmarks/bench_bert_e2e.py --out $OUT --peers eager,reduce-overhead
    python benchmarks/bench_bert_e2e.py --out $OUT --peers max-autotune --skip-kernl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = [(1, 16), (1, 128), (8, 128), (32, 128), (8, 512)]
BUCKETS5 = [(b, s) for b, s in SHAPES]
BUCKETS20 = "batch=1,2,4,8,32 seq=16,32,128,512"


def cuda_time_ms(fn, warmup=20, iters=200) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def make_inputs(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (b, s), generator=g).cuda()
    return dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids)
    )


COLD = """
import sys, time, torch
t0 = time.perf_counter()
import kernl.runtime
m = kernl.runtime.load(sys.argv[1])
t1 = time.perf_counter()
for b in (1, 2, 4, 8, 32):
    for s in (16, 32, 128, 512):
        m(input_ids=torch.randint(1000, 30000, (b, s), device="cuda"))
torch.cuda.synchronize()
t2 = time.perf_counter()
w = sum(t.numel() * t.element_size() for t in m.weights.values())
print(f"cold start: import+load {t1 - t0:.2f} s, first calls at 20 buckets {t2 - t1:.2f} s, "
      f"total {t2 - t0:.2f} s; GPU memory after: allocated {torch.cuda.memory_allocated() / 2**20:.0f} MiB, "
      f"reserved {torch.cuda.memory_reserved() / 2**20:.0f} MiB, of which weights {w / 2**20:.0f} MiB; "
      f"{len(m.manifest.kernels)} kernel binaries")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench"))
    ap.add_argument("--peers", default="eager,reduce-overhead")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--skip-kernl", action="store_true")
    ap.add_argument("--no-cold", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from transformers import BertConfig, BertModel

    import kernl
    import kernl.compiler
    import kernl.runtime

    work = Path(tempfile.mkdtemp())
    os.environ.setdefault("KERNL_CACHE_DIR", str(work / "cache"))
    torch.manual_seed(0)
    BertModel(BertConfig()).save_pretrained(work / "bert-base")
    log = []

    def note(line: str) -> None:
        print(line, flush=True)
        log.append(line)

    arts = {}
    if not args.skip_kernl:
        for name, kernels in (("kernl", True), ("kernl-aten", False)):
            t0 = time.perf_counter()
            report = kernl.compiler.compile(
                str(work / "bert-base"),
                BUCKETS5,
                work / f"{name}.kernl",
                dtype="fp16",
                device="cuda",
                kernels=kernels,
            )
            note(f"{name}: compile of 5 buckets {time.perf_counter() - t0:.1f} s")
            arts[name] = work / f"{name}.kernl"
            if kernels:
                print(report.table())
                (out / "compile_report.txt").write_text(report.table())
                t0 = time.perf_counter()
                kernl.compiler.compile(
                    str(work / "bert-base"),
                    BUCKETS5,
                    work / "again.kernl",
                    dtype="fp16",
                    device="cuda",
                )
                note(
                    f"{name}: recompile of 5 buckets with a warm tuning cache {time.perf_counter() - t0:.1f} s"
                )
        if not args.no_cold:
            t0 = time.perf_counter()
            kernl.compiler.compile(
                str(work / "bert-base"), BUCKETS20, work / "k20.kernl", dtype="fp16", device="cuda"
            )
            note(f"kernl: compile of 20 buckets (5 already tuned) {time.perf_counter() - t0:.1f} s")
            cold = subprocess.run(
                [sys.executable, "-c", COLD, str(work / "k20.kernl")],
                capture_output=True,
                text=True,
            )
            note(cold.stdout.strip() or cold.stderr[-3000:])

    eager = BertModel.from_pretrained(work / "bert-base", dtype=torch.float16).cuda().eval()
    rows: dict = {s: {} for s in SHAPES}
    for name, path in arts.items():
        model = kernl.runtime.load(path)
        for b, s in SHAPES:
            x = make_inputs(b, s)
            with torch.no_grad():
                ref = eager(**x).last_hidden_state.float()
            err = (model(**x).last_hidden_state.float() - ref).abs().max().item()
            t = cuda_time_ms(lambda: model(**x), iters=args.iters)
            rows[(b, s)][name] = statistics.median(t)
            rows[(b, s)][name + " err"] = err
            graph = model._runners[model.select_bucket(b, s)].graph
            replay = statistics.median(cuda_time_ms(graph.replay, iters=args.iters))
            rows[(b, s)][name + " replay"] = replay
            note(
                f"{name} {b}x{s}: median {statistics.median(t):.3f} ms, max |err| vs eager {err:.3g}"
            )
    peers = [p for p in args.peers.split(",") if p]
    for peer in peers:
        for b, s in SHAPES:
            x = make_inputs(b, s)
            setup = 0.0
            if peer == "eager":
                fn = lambda: eager(**x)  # noqa: E731
            else:
                torch._dynamo.reset()
                compiled = torch.compile(eager, mode=peer, dynamic=False)
                t1 = time.perf_counter()
                with torch.no_grad():
                    for _ in range(3):
                        compiled(**x)
                torch.cuda.synchronize()
                setup = time.perf_counter() - t1
                fn = lambda: compiled(**x)  # noqa: E731
            with torch.no_grad():
                t = cuda_time_ms(fn, iters=args.iters)
            rows[(b, s)][peer] = statistics.median(t)
            note(
                f"{peer} {b}x{s}: median {statistics.median(t):.3f} ms (compile/warm-up {setup:.1f} s)"
            )
    cols = [c for c in ("kernl", "kernl-aten", *peers) if c in rows[SHAPES[0]]]
    table = [
        f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, kernl {kernl.__version__}",
        "",
        "| batch x seq | " + " | ".join(f"{c} (ms)" for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for (b, s), r in rows.items():
        table.append(f"| {b}x{s} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    note("\n".join(table))
    (out / "bert_e2e.md").write_text("\n".join(log) + "\n")
    (out / "bert_e2e.json").write_text(
        json.dumps({f"{b}x{s}": r for (b, s), r in rows.items()}, indent=1)
    )


if __name__ == "__main__":
    main()
