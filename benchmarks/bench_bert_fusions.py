"""BERT-base fp16 on one GPU: kernl vs torch.compile(mode="reduce-overhead") vs eager, and the
kernels each launches per call (issue 14: a GEMM that stays on cuBLAS must still lose its
neighbours: the residual adds, the GELU, the copies).

    python benchmarks/bench_bert_fusions.py                  # JSON to $OUT/bench_bert_fusions.json
    python benchmarks/bench_bert_fusions.py --shapes 32x128 --no-peers   # quicker

One process: BertModel(BertConfig()) with random weights (seed 0) is saved, compiled with
kernl for the buckets "batch=1,8,32 seq=16,128,512" (the compile time is reported), then each
shape is timed through kernl.runtime.load(...), eager (SDPA attention) and torch.compile
reduce-overhead (dynamic=False, recompiled per shape). Each is timed twice on the same inputs
(input_ids, token_type_ids, attention_mask): on the GPU, and as a tokenizer's output on the CPU
(int64 CPU tensors) copied in by each implementation as users call it: kernl takes the CPU
tensors itself (range check on the host, one copy from pinned memory), eager and
reduce-overhead get `{k: v.cuda() for k, v in x.items()}`. A time is the
median of >= 100 single calls, each between two CUDA events with the host synchronised in
between, so it is the latency a caller sees (kernl's input checks and copy-in included).
"host us" is the host's time in one call (perf_counter, GPU idle at the start): for kernl,
checks, copy-in, replay launch, output copies and, for GPU inputs, the wait for the range
check that was queued before the replay.

Kernels per call: "static" is what the compile summary prints (compiler/launch_counts.py, from
the program), "profiled" counts the kernels CUPTI sees inside ten calls (torch profiler; kernels
of CUDA graphs included), for kernl and reduce-overhead, after every timing (the profiler
leaves CUPTI attached, which slows later CUDA API calls). Accuracy: max |diff| of
last_hidden_state against eager fp16 (the bar is about 0.01) and, for scale, eager fp16's own
max |diff| against eager fp32. The tuner's choices per bucket (which linears stayed on cuBLAS,
which GELUs became cuBLASLt's tanh epilogue) are printed with the compile summary.
Runs in about 5 minutes on an H200 (compile 70-130 s, torch.compile ~20 s per shape, timing
~1 min); a plain script, not collected by pytest."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [(1, 16), (1, 128), (8, 128), (32, 128), (8, 512)]
BUCKETS = "batch=1,8,32 seq=16,128,512"


def time_ms(fn: Callable[[], object], iters: int, warm: int = 10) -> float:
    """Median latency of one call: CUDA events around it, host synchronised between calls."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_alternating(fns: dict[str, Callable[[], object]], iters: int, warm: int = 10):
    """Per name, the latency of each of `iters` single calls (ms, CUDA events, host synchronised
    between calls), the implementations taking turns call by call: a drift of the host's
    speed, which moves a block of one implementation's calls against the next block's, falls
    on all of them alike."""
    for fn in fns.values():
        for _ in range(warm):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    return times


def host_us(fn: Callable[[], object], iters: int, warm: int = 10) -> float:
    """Median host time of one call, from an idle GPU to the call's return."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def kernels_per_call(fn: Callable[[], object], calls: int = 10) -> tuple[int, float]:
    """(kernels, kernel milliseconds) per call as the profiler sees them (CUPTI traces kernels
    replayed from CUDA graphs too)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    count = sum(e.count for e in events) // calls
    kernel_ms = sum(e.self_device_time_total for e in events) / calls / 1000
    return count, kernel_ms


def tokenizer_output(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """What `tokenizer(texts, return_tensors="pt")` returns for BERT on texts of `seq` tokens:
    int64 CPU tensors (random ids, seed 1)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 30000, (batch, seq), generator=g)
    return dict(
        input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids)
    )


def inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """The same inputs on the GPU (the same keys: torch.compile does not recompile between the
    two kinds)."""
    return to_gpu(tokenizer_output(batch, seq))


def load_with(artifact: str, **flags: bool):
    """`kernl.runtime.load(artifact)` with CompiledModel's class-wide switches set for this
    load only (`_checks_in_graph=False`, `_side_work_off_path=True`): one model each way in
    one process, for a same-run comparison."""
    import kernl.runtime
    from kernl.runtime.model import CompiledModel

    before = {name: getattr(CompiledModel, name) for name in flags}
    for name, value in flags.items():
        setattr(CompiledModel, name, value)
    try:
        return kernl.runtime.load(artifact)
    finally:
        for name, value in before.items():
            setattr(CompiledModel, name, value)


def to_gpu(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """How a user hands a tokenizer's output to a model on the GPU."""
    return {k: v.cuda() for k, v in x.items()}


def tuning_summary(records) -> str:
    """How the tuner served each kernl op of a bucket, e.g. "kernl.linear: 37 aten, 12 aten
    (gelu as gelu_tanh)"."""
    by_op: dict[str, Counter] = {}
    for r in records:
        how = r.impl + (" (gelu as gelu_tanh)" if r.approximation else "")
        by_op.setdefault(r.op, Counter())[how] += 1
    return "; ".join(
        f"{op}: " + ", ".join(f"{n} {how}" for how, n in c.most_common())
        for op, c in sorted(by_op.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(f"{b}x{s}" for b, s in SHAPES))
    parser.add_argument("--buckets", default=BUCKETS)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--no-peers", action="store_true", help="skip torch.compile")
    parser.add_argument(
        "--compile-only", action="store_true", help="compile the artifact for later stages, stop"
    )
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    assert args.iters >= 100, "medians over at least 100 calls"

    import transformers
    import triton

    import kernl.compiler
    import kernl.runtime

    t_start = time.perf_counter()
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "buckets": args.buckets,
        "shapes": [],
    }
    work = tempfile.mkdtemp(prefix="bench_bert_fusions_")
    # A cold compile, whatever an earlier run left in the tuning cache.
    os.environ["KERNL_CACHE_DIR"] = f"{work}/cache"
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig()).eval()
    model.save_pretrained(f"{work}/bert")
    del model

    t0 = time.perf_counter()
    report = kernl.compiler.compile(
        f"{work}/bert", args.buckets, f"{work}/bert.kernl", dtype="fp16", device="cuda"
    )
    result["compile_s"] = time.perf_counter() - t0
    print(report.table())
    records = [r for rs in report.tuning.values() for r in rs]
    result["tuning_candidates_timed"] = sum(getattr(r, "timed", 0) for r in records)
    result["tuning_configs_skipped"] = sum(len(r.errors) for r in records)
    static = {}
    for b in report.buckets:
        static[(b.bucket.batch, b.bucket.seq)] = b.counts.launches
        choices = tuning_summary(report.tuning.get(b.bucket, []))
        print(f"  {b.bucket.batch}x{b.bucket.seq}: {b.counts.launches} kernels/call; {choices}")
        result.setdefault("compile_buckets", []).append(
            {
                "bucket": f"{b.bucket.batch}x{b.bucket.seq}",
                "kernels_per_call": b.counts.launches,
                "max_abs_error_vs_eager": b.max_abs_error,
                "seconds": b.seconds,
                "choices": choices,
            }
        )
    if args.compile_only:
        print(f"compile {result['compile_s']:.1f} s: {work}/bert.kernl")
        return

    km = kernl.runtime.load(f"{work}/bert.kernl")
    eager = (
        transformers.BertModel.from_pretrained(
            f"{work}/bert", dtype=torch.float16, attn_implementation="sdpa"
        )
        .cuda()
        .eval()
    )
    eager32 = transformers.BertModel.from_pretrained(f"{work}/bert").cuda().eval()

    rows = {}
    with torch.inference_mode():
        for shape in shapes:
            x = inputs(*shape)
            ref16 = eager(**x).last_hidden_state.float()
            ref32 = eager32(**x).last_hidden_state.float()
            got = km(**x)["last_hidden_state"].float()
            cpu = tokenizer_output(*shape)
            from_cpu = km(**cpu)["last_hidden_state"]
            from_gpu = km(**to_gpu(cpu))["last_hidden_state"]
            rows[shape] = {
                "shape": f"{shape[0]}x{shape[1]}",
                "kernl_ms": time_ms(lambda: km(**x), args.iters),
                "eager_ms": time_ms(lambda: eager(**x), args.iters),
                "kernl_ms_cpu_inputs": time_ms(lambda: km(**cpu), args.iters),
                "eager_ms_cpu_inputs": time_ms(lambda: eager(**to_gpu(cpu)), args.iters),
                "kernl_host_us": host_us(lambda: km(**x), args.iters),
                "kernl_host_us_cpu_inputs": host_us(lambda: km(**cpu), args.iters),
                # the same call with the inputs on the CPU or the GPU: expected 0
                "kernl_cpu_vs_gpu_inputs_max_abs": (from_cpu - from_gpu).abs().max().item(),
                "kernl_max_abs_vs_eager16": (got - ref16).abs().max().item(),
                "kernl_max_abs_vs_eager32": (got - ref32).abs().max().item(),
                "eager16_max_abs_vs_eager32": (ref16 - ref32).abs().max().item(),
                "kernl_kernels_static": static.get(shape),
            }
    del eager32
    peers = {}  # shape -> its reduce-overhead model, profiled once every timing is done
    if not args.no_peers:
        torch._dynamo.reset()
        # Every shape's compiled model traces the same forward, and dynamo's limit of 8
        # entries per frame counts them all: the fifth shape (8x512) fell back to eager in
        # the 2026-12-02 run (4.79 ms "reduce-overhead", a 2.57x that was no comparison).
        torch._dynamo.config.recompile_limit = 64
        for shape in shapes:
            x = inputs(*shape)
            # one compiled model per shape (dynamic=False: each specialises on its shape),
            # kept for the profiles at the end
            compiled = torch.compile(eager, mode="reduce-overhead", dynamic=False)
            peers[shape] = compiled
            with torch.inference_mode():
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                t0 = time.perf_counter()
                compiled(**x)
                torch.cuda.synchronize()
                row = rows[shape]
                # no new graph: dynamo gave up on this shape and the "peer" is eager
                row["reduce_overhead_compiled"] = (
                    torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
                )
                row["reduce_overhead_compile_s"] = time.perf_counter() - t0
                row["reduce_overhead_ms"] = time_ms(lambda: compiled(**x), args.iters)
                cpu = tokenizer_output(*shape)
                compiled(**to_gpu(cpu))  # same shapes and dtypes: no recompile
                row["reduce_overhead_ms_cpu_inputs"] = time_ms(
                    lambda: compiled(**to_gpu(cpu)), args.iters
                )
                row["reduce_overhead_host_us"] = host_us(lambda: compiled(**x), args.iters)
                row["speedup_vs_reduce_overhead"] = row["reduce_overhead_ms"] / row["kernl_ms"]
                row["speedup_vs_reduce_overhead_cpu_inputs"] = (
                    row["reduce_overhead_ms_cpu_inputs"] / row["kernl_ms_cpu_inputs"]
                )
    # Profiles last: the torch profiler leaves CUPTI attached to the process after it ends
    # (kineto does not tear it down; pytorch/pytorch#144455), which slows every later CUDA
    # API call, most of all eager's hundreds of launches. No time above is taken after one.
    with torch.inference_mode():
        for shape in shapes:
            x, row = inputs(*shape), rows[shape]
            row["kernl_kernels_profiled"], row["kernl_kernel_ms"] = kernels_per_call(
                lambda: km(**x)
            )
            if shape in peers:
                n, ms = kernels_per_call(lambda: peers[shape](**x))
                row["reduce_overhead_kernels_profiled"], row["reduce_overhead_kernel_ms"] = n, ms
    torch._dynamo.reset()

    head = (
        f"{'shape':>7} {'kernl ms':>9} {'r-o ms':>8} {'eager ms':>9} {'vs r-o':>7} "
        f"{'kernels static/prof':>19} {'r-o kernels':>11} {'kernel ms k/r-o':>15} "
        f"{'|d| vs eager16':>14} {'eager16 vs 32':>13}"
    )
    print("inputs on the GPU")
    print(head)
    for row in rows.values():
        ro = row.get("reduce_overhead_ms")
        print(
            f"{row['shape']:>7} {row['kernl_ms']:9.3f} {ro if ro is not None else float('nan'):8.3f} "
            f"{row['eager_ms']:9.3f} {row.get('speedup_vs_reduce_overhead', float('nan')):6.2f}x "
            f"{str(row['kernl_kernels_static']):>9}/{row['kernl_kernels_profiled']:<9} "
            f"{str(row.get('reduce_overhead_kernels_profiled', '-')):>11} "
            f"{row['kernl_kernel_ms']:7.3f}/{row.get('reduce_overhead_kernel_ms', float('nan')):<7.3f} "
            f"{row['kernl_max_abs_vs_eager16']:14.4f} {row['eager16_max_abs_vs_eager32']:13.4f}"
        )
    print("inputs from the CPU (a tokenizer's output, copied in by each); host us per call")
    print(
        f"{'shape':>7} {'kernl ms':>9} {'r-o ms':>8} {'eager ms':>9} {'vs r-o':>7} "
        f"{'kernl host us gpu/cpu in':>24} {'r-o host us':>11}"
    )
    nan = float("nan")
    for row in rows.values():
        print(
            f"{row['shape']:>7} {row['kernl_ms_cpu_inputs']:9.3f} "
            f"{row.get('reduce_overhead_ms_cpu_inputs', nan):8.3f} "
            f"{row['eager_ms_cpu_inputs']:9.3f} "
            f"{row.get('speedup_vs_reduce_overhead_cpu_inputs', nan):6.2f}x "
            f"{row['kernl_host_us']:11.1f}/{row['kernl_host_us_cpu_inputs']:<12.1f} "
            f"{row.get('reduce_overhead_host_us', nan):11.1f}"
        )
    eager_peers = [r["shape"] for r in rows.values() if r.get("reduce_overhead_compiled") is False]
    if eager_peers:
        print(f"WARNING: torch.compile did not compile {eager_peers}: their r-o column is eager")
    result["shapes"] = list(rows.values())
    result["total_s"] = time.perf_counter() - t_start
    print(f"compile {result['compile_s']:.1f} s; whole run {result['total_s']:.0f} s")
    out = os.environ.get("OUT")
    if out:
        path = os.path.join(out, "bench_bert_fusions.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
