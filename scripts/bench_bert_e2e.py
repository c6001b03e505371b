"""BERT-base fp16 end to end on a GPU: compile, cold start, memory, latency vs eager and
torch.compile. Writes a markdown table (and JSON) for docs/performance.md.

    python scripts/bench_bert_e2e.py --out /tmp/bench [--peers eager,reduce-overhead,max-autotune]
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
BUCKETS = "batch=1,2,4,8,32 seq=16,32,128,512"  # 20 buckets holding every shape above


def cuda_time_ms(fn, warmup=10, iters=100) -> list[float]:
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


def inputs(b, s, vocab=30522, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (b, s), generator=g).cuda()
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
        ids = torch.randint(1000, 30000, (b, s), device="cuda")
        m(input_ids=ids)
torch.cuda.synchronize()
t2 = time.perf_counter()
print(f"COLD import+load {t1 - t0:.3f} s, 20 first calls {t2 - t1:.3f} s, total {t2 - t0:.3f} s, "
      f"memory allocated {torch.cuda.memory_allocated() / 2**20:.0f} MiB, reserved "
      f"{torch.cuda.memory_reserved() / 2**20:.0f} MiB, weights "
      f"{sum(t.numel() * t.element_size() for t in m.weights.values()) / 2**20:.0f} MiB")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench"))
    ap.add_argument("--peers", default="eager,reduce-overhead")
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from transformers import BertConfig, BertModel

    import kernl
    import kernl.compiler
    import kernl.runtime

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp())
    BertModel(BertConfig()).save_pretrained(work / "bert-base")
    t0 = time.perf_counter()
    report = kernl.compiler.compile(
        str(work / "bert-base"), BUCKETS, work / "bert.kernl", dtype="fp16", device="cuda",
        progress=lambda m: print(f"[{time.perf_counter() - t0:6.1f}s] {m}", flush=True),
    )  # fmt: skip
    compile_s = time.perf_counter() - t0
    print(report.table())
    cold = subprocess.run([sys.executable, "-c", COLD, str(work / "bert.kernl")],
                          capture_output=True, text=True)  # fmt: skip
    print(cold.stdout, cold.stderr[-3000:])

    model = kernl.runtime.load(work / "bert.kernl")
    eager = BertModel.from_pretrained(work / "bert-base", dtype=torch.float16).cuda().eval()
    rows = {}
    for b, s in SHAPES:
        x = inputs(b, s)
        with torch.no_grad():
            ref = eager(**x).last_hidden_state
        got = model(**x).last_hidden_state
        err = (got.float() - ref.float()).abs().max().item()
        t = cuda_time_ms(lambda: model(**x), iters=args.iters)
        rows[(b, s)] = {"kernl": statistics.median(t), "kernl_err": err}
        print(
            f"kernl {b}x{s}: {statistics.median(t):.3f} ms, max |err| vs eager fp16 {err:.3g}",
            flush=True,
        )
    for peer in args.peers.split(","):
        for b, s in SHAPES:
            x = inputs(b, s)
            if peer == "eager":
                fn = lambda: eager(**x)  # noqa: E731
                setup = 0.0
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
            rows[(b, s)][peer + "_setup_s"] = setup
            print(
                f"{peer} {b}x{s}: {statistics.median(t):.3f} ms (setup {setup:.1f} s)", flush=True
            )
    peers = args.peers.split(",")
    lines = [
        f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"kernl {kernl.__version__}, compile of {len(report.buckets)} buckets {compile_s:.1f} s",
        "",
        "| batch x seq | kernl (ms) | "
        + " | ".join(f"{p} (ms)" for p in peers)
        + " | kernl speedup vs best peer | max abs err vs eager fp16 |",
        "|---|---|" + "---|" * len(peers) + "---|---|",
    ]
    for (b, s), r in rows.items():
        best = min(r[p] for p in peers)
        lines.append(
            f"| {b}x{s} | {r['kernl']:.3f} | "
            + " | ".join(f"{r[p]:.3f}" for p in peers)
            + f" | {best / r['kernl']:.2f}x | {r['kernl_err']:.3g} |"
        )
    table = "\n".join(lines)
    print(table)
    (out / "bert_e2e.md").write_text(table + "\n\n" + cold.stdout)
    (out / "bert_e2e.json").write_text(
        json.dumps({f"{b}x{s}": r for (b, s), r in rows.items()}, indent=1)
    )


if __name__ == "__main__":
    main()
