"""Where kernl's in-process encoder request path spends the host's time (issue 17): the path
of bench_serving_direct.py (parse, gather, serve_batch_bytes, JSON answers; no Ray) at C
concurrent clients, first unprofiled (sequences/s, requests per model batch), then under
yappi's CPU clock on every thread, printing the functions that take the most CPU time, by
own time and by inclusive time, and each thread's CPU total.

    PYTHONPATH=$PWD python3 benchmarks/profile_serving_path.py [--clients 16] [--seconds 3] \\
        [--switch-intervals 1,0.2]
    PYTHONPATH=$PWD TRITON_INTERPRET=1 .venv/bin/python benchmarks/profile_serving_path.py --tiny

BERT-base fp16 (random, seed 0) compiled with --no-tune for `batch=1,8,16,64 seq=128`
(--tiny: a one-layer fp32 BERT on the CPU, a check that the script runs). yappi is not part
of kernl's dependencies: on the GPU machine it travels as a wheel (benchmarks/README.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--clients", type=int, default=16)
p.add_argument("--seconds", type=float, default=3.0)
p.add_argument("--top", type=int, default=35)
p.add_argument("--tiny", action="store_true")
p.add_argument(
    "--switch-intervals",
    default="",
    help="also run unprofiled at these sys.setswitchinterval values (ms, comma-separated): "
    "how long a thread waiting for the GIL waits for the one holding it",
)
ARGS = p.parse_args()
if ARGS.tiny:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import yappi  # noqa: E402

import kernl.compiler  # noqa: E402
import kernl.runtime  # noqa: E402
from kernl.serving.batching import measure_costs  # noqa: E402
from kernl.serving.protocol import ModelLimits  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving_common import encoder_path  # noqa: E402

if ARGS.tiny:
    CONFIG = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)
    BUCKETS, SEQ, DTYPE, DEVICE = "batch=1,4,16 seq=8", 8, "fp32", "cpu"
else:
    CONFIG, BUCKETS, SEQ, DTYPE, DEVICE = {}, "batch=1,8,16,64 seq=128", 128, "fp16", "cuda"


def main() -> None:
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(**CONFIG)).eval()
    work = Path(tempfile.mkdtemp())
    kernl.compiler.compile(
        bert, BUCKETS, work / "bert.kernl", dtype=DTYPE, device=DEVICE, tune=False
    )
    model = kernl.runtime.load(work / "bert.kernl", device=DEVICE)
    largest = max(b.batch for b in model.buckets)
    limits = ModelLimits.from_manifest(model.manifest, max_rows=largest)
    costs = measure_costs(model) if DEVICE == "cuda" else None
    g = torch.Generator().manual_seed(2)
    vocab = model.manifest.model_config["vocab_size"]
    bodies = [
        json.dumps(
            {
                "input_ids": torch.randint(5, vocab, (SEQ,), generator=g).tolist(),
                "outputs": ["pooler_output"],
            }
        ).encode()
        for _ in range(64)
    ]

    def run() -> dict:
        lat, secs, per_batch = encoder_path(
            model, limits, bodies, ARGS.clients, ARGS.seconds, largest, 0.0, costs
        )
        lat.sort()
        return {
            "clients": ARGS.clients,
            "sequences_per_s": round(len(lat) / secs),
            "p50_ms": round(1e3 * lat[len(lat) // 2], 3),
            "requests_per_batch": round(per_batch, 2),
        }

    print(json.dumps({"unprofiled": run()}), flush=True)
    default = sys.getswitchinterval()
    for ms in filter(None, ARGS.switch_intervals.split(",")):
        sys.setswitchinterval(float(ms) / 1e3)
        print(json.dumps({"switch_interval_ms": float(ms), "unprofiled": run()}), flush=True)
    sys.setswitchinterval(default)
    yappi.set_clock_type("cpu")
    yappi.start(profile_threads=True)
    t = time.perf_counter()
    profiled = run()
    yappi.stop()
    print(json.dumps({"profiled": profiled, "wall_s": round(time.perf_counter() - t, 2)}))
    stats = yappi.get_func_stats()
    requests = profiled["sequences_per_s"] * ARGS.seconds
    for key in ("tsub", "ttot"):
        print(f"\n== top {ARGS.top} by {key} (CPU s; us per request at {requests:.0f} requests)")
        stats.sort(key, "desc")
        for f in list(stats)[: ARGS.top]:
            where = f"{Path(f.module).name}:{f.lineno} {f.name}"
            value = getattr(f, key)
            print(f"{value:8.3f} s {1e6 * value / max(requests, 1):8.1f} us  {f.ncall:9d}  {where}")
    print("\n== threads (CPU s)")
    for th in yappi.get_thread_stats():
        print(f"{th.ttot:8.3f} s  {th.name} {th.id}")


if __name__ == "__main__":
    main()
