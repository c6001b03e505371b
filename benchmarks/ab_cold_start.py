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
pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(70)
print(text.getvalue())
text = io.StringIO()
pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(40)
print(text.getvalue())
"""


# One fresh process per variant of load(), the phases of its load() timed without a profiler:
# what each change of the cold start saves, measured against its alternative in one run.
# Variants: "now" (load() as shipped), "warmup_every" (a warm-up before every capture, as
# until 2026-12-02), "triton_first" (Triton imported and the kernels made before the clock
# starts), "triton_in_load" (the same inside load()'s clock: load() as until 2026-12-03, when
# the kernel modules imported Triton and load() imported them; since, kernels/jit.py makes a
# kernel only where Triton's JIT is used). Measured and dropped: a thread importing them from
# the start of load() (36d71ea, 2026-12-02: it slowed the artifact check, which needs the
# interpreter as much, by more than it saved) and the weights read on a thread during the
# check (5881b37, 2026-12-03: no faster). "warm_process": a load() without captures and a
# call per bucket before the clock, the bound on what warming inside load() could save.
# Measured and dropped too: cuBLAS's first use of each GEMM shape on a thread started before
# the artifact check or after it (6ebfbab, 2026-12-03: load() 0.664 s against 0.668 / 0.646).
PHASES = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import kernl.runtime as rt
t2 = time.perf_counter()
from kernl.runtime import model as model_module
from kernl.runtime.executor import Executor
variant = sys.argv[2]
if variant == "warmup_every":
    model_module.CompiledModel._warmup_every_capture = True
def with_triton():
    import triton
    import kernl.kernels.attention, kernl.kernels.bert_embeddings, kernl.kernels.norm
    from kernl.kernels import fused_linear, jit
    jit.made(fused_linear.JIT_FUNCTIONS[0])  # makes every kernel imported
if variant == "triton_first":
    with_triton()
if variant == "warm_process":
    # what a second load() in this process no longer pays (cuBLAS's first use of each GEMM
    # shape and its kernels loaded lazily, the allocator, the CUDA context): an upper bound
    # on any warming that load() could overlap with its own work
    warm = rt.load(sys.argv[1], capture="never", verify=False)
    for b in warm.buckets:
        ids = torch.zeros((b.batch, b.seq), dtype=torch.long, device="cuda")
        warm(input_ids=ids, attention_mask=torch.ones_like(ids))
    torch.cuda.synchronize()
    del warm
    torch.cuda.empty_cache()
if variant == "triton_in_load":
    _load = rt.load
    def load_with_triton(*args, **kwargs):
        with_triton()
        return _load(*args, **kwargs)
    rt.load = load_with_triton
phases = {}
def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
    return wrapper
rt._free_memory = timed("cuda_init", rt._free_memory)
rt.check_artifact = timed("check", rt.check_artifact)
rt.read_weights = timed("weights", rt.read_weights)
rt._load_binaries = timed("binaries", rt._load_binaries)
model_module.capture_graph = timed("captures", model_module.capture_graph)
Executor.run = timed("executor_runs", Executor.run)
t3 = time.perf_counter()
model = rt.load(sys.argv[1])
torch.cuda.synchronize()
t4 = time.perf_counter()
sums = []
gen = torch.Generator().manual_seed(0)
for b in model.buckets:
    ids = torch.randint(0, 1000, (b.batch, b.seq), generator=gen).cuda()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    sums.append(float(out["last_hidden_state"].double().sum()))
torch.cuda.synchronize()
t5 = time.perf_counter()
row = {"variant": variant, "import_torch_s": t1 - t0, "import_kernl_s": t2 - t1,
       "load_s": t4 - t3, "calls_s": t5 - t4,
       "shared_bench_s": (t2 - t1) + (t4 - t3) + (t5 - t4)}
row.update({k + "_s": v for k, v in phases.items()})
row["triton_imported"] = "triton" in sys.modules
row["outputs"] = sums
print(json.dumps(row))
"""
VARIANTS = ("now", "warmup_every", "triton_first", "triton_in_load", "warm_process")


def phases(artifact: str, env: dict, runs: int, variants: tuple[str, ...] = VARIANTS) -> None:
    """`runs` fresh processes per variant, the variants taking turns; the medians of each
    phase per variant, and whether every variant's outputs equal the first's bit for bit."""
    found: dict[str, list[dict]] = {v: [] for v in variants}
    for turn in range(runs):
        # each variant in turn goes first: with a fixed order, the first of each round imported
        # kernl in 0.20 s against the others' 0.11-0.13 s, all three rounds (H200, 2026-12-03,
        # cause not found), a cost that must not land on one variant
        for variant in variants[turn % len(variants) :] + variants[: turn % len(variants)]:
            out = subprocess.run(
                [sys.executable, "-c", PHASES, artifact, variant],
                capture_output=True,
                text=True,
                env=env,
            )
            if out.returncode:
                print(f"{variant}: the child failed:\n{out.stderr[-2000:]}", flush=True)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            found[variant].append(row)
            print(
                json.dumps(
                    {
                        k: round(v, 4) if isinstance(v, float) else v
                        for k, v in row.items()
                        if k != "outputs"
                    }
                ),
                flush=True,
            )
    reference = next((rows[0]["outputs"] for rows in found.values() if rows), None)
    for variant, rows in found.items():
        if not rows:
            continue
        keys = [k for k in rows[0] if k.endswith("_s")]
        med = {k: round(statistics.median(r.get(k, 0.0) for r in rows), 3) for k in keys}
        same = all(r["outputs"] == reference for r in rows)
        print(
            json.dumps(
                {
                    "variant": variant,
                    "runs": len(rows),
                    "median": med,
                    "outputs_equal_bitwise": same,
                    "triton_imported": sorted({r.get("triton_imported") for r in rows}),
                }
            ),
            flush=True,
        )


def profiled(artifact: str, env: dict) -> None:
    """One more fresh process, its phases apart (torch's import, kernl's, the CUDA context,
    load, the calls) and load() under cProfile: where a slow cold start goes."""
    out = subprocess.run(
        [sys.executable, "-c", PROFILED, artifact], capture_output=True, text=True, env=env
    )
    print(out.stdout[-40000:], out.stderr[-2000:] if out.returncode else "", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="then one profiled process")
    parser.add_argument(
        "--phases", action="store_true", help="the load() variants' phases instead (PHASES)"
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, for --phases (default: all of {', '.join(VARIANTS)})",
    )
    parser.add_argument(
        "--pycache",
        metavar="DIR",
        help="the children read and write their bytecode under DIR (PYTHONPYCACHEPREFIX), "
        "filled by one untimed child first: a cold start with the bytecode an installed "
        "package has, where the environment otherwise compiles every module from source",
    )
    args = parser.parse_args()
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    if args.pycache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = args.pycache
        out = subprocess.run(
            [sys.executable, "-c", PHASES, args.artifact, variants[0]],
            capture_output=True,
            text=True,
            env=env,
        )
        if out.returncode:
            sys.exit(f"the child filling {args.pycache} failed:\n{out.stderr[-2000:]}")
    print(
        json.dumps(
            {
                "dont_write_bytecode": env.get("PYTHONDONTWRITEBYTECODE"),
                "pycache_prefix": env.get("PYTHONPYCACHEPREFIX"),
            }
        ),
        flush=True,
    )
    if args.profile:
        profiled(args.artifact, env)
    if args.phases:
        phases(args.artifact, env, args.runs, variants)
        return
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
