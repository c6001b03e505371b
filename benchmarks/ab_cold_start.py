"""An encoder artifact's cold start in fresh processes (issue 14's "import + load + first call
at 9 buckets" ≤ 1 s), its range checks in the graphs or launched by each call, alternating.

    python benchmarks/ab_cold_start.py /tmp/bench_bert_fusions_*/bert.kernl [--runs 3]

Each process times `import kernl.runtime` (torch's import included), `load()` (hashes
verified, every graph captured) and one call of GPU inputs (input_ids and attention_mask, as
the shared benchmark calls) at each bucket's shape; one JSON line per process, then the
medians per mode. The shared benchmark measured 8.0 s for this on 2026-12-02
against 0.95 s in the issue, with nothing to say which phase it was."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch, kernl.runtime
from kernl.runtime.model import CompiledModel
t1 = time.perf_counter()
CompiledModel._checks_in_graph = sys.argv[2] == "graph"
model = kernl.runtime.load(sys.argv[1])
torch.cuda.synchronize()
t2 = time.perf_counter()
for b in model.buckets:
    ids = torch.randint(0, 1000, (b.batch, b.seq), device="cuda")
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
torch.cuda.synchronize()
t3 = time.perf_counter()
print(json.dumps({"mode": sys.argv[2], "import_s": t1 - t0, "load_s": t2 - t1,
                  "calls_s": t3 - t2, "total_s": t3 - t0, "buckets": len(model.buckets)}))
"""


PROFILED = """
import cProfile, io, json, pstats, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import kernl.runtime
t2 = time.perf_counter()
torch.zeros(1, device="cuda"); torch.cuda.synchronize()
t3 = time.perf_counter()
before = set(sys.modules)
prof = cProfile.Profile()
prof.enable()
model = kernl.runtime.load(sys.argv[1])
torch.cuda.synchronize()
prof.disable()
heavy = ("torch._dynamo", "sympy", "torch._inductor", "triton", "kernl.kernels")
print("imported by load():", len(set(sys.modules) - before), "modules, of them",
      [m for m in heavy if m in sys.modules and m not in before])
t4 = time.perf_counter()
for b in model.buckets:
    ids = torch.randint(0, 1000, (b.batch, b.seq), device="cuda")
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
torch.cuda.synchronize()
t5 = time.perf_counter()
print(json.dumps({"import_torch_s": t1 - t0, "import_kernl_s": t2 - t1, "cuda_context_s": t3 - t2,
                  "load_s": t4 - t3, "calls_s": t5 - t4}))
text = io.StringIO()
pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
print(text.getvalue())
text = io.StringIO()
pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
print(text.getvalue())
"""


def profiled(artifact: str, env: dict) -> None:
    """One more fresh process, its phases apart (torch's import, kernl's, the CUDA context,
    load, the calls) and load() under cProfile: where a slow cold start goes."""
    out = subprocess.run(
        [sys.executable, "-c", PROFILED, artifact], capture_output=True, text=True, env=env
    )
    print(out.stdout[-20000:], out.stderr[-2000:] if out.returncode else "", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="then one profiled process")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    if args.profile:
        profiled(args.artifact, env)
    found: dict[str, list[dict]] = {"graph": [], "call": []}
    for _ in range(args.runs):
        for mode in found:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, args.artifact, mode],
                capture_output=True,
                text=True,
                env=env,
            )
            if out.returncode:
                sys.exit(f"{mode}: the child failed:\n{out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            found[mode].append(row)
            print(json.dumps(row), flush=True)
    for mode, rows in found.items():
        med = {
            k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0] if k[-2:] == "_s"
        }
        print(json.dumps({"mode": mode, "median": med}), flush=True)


if __name__ == "__main__":
    main()
