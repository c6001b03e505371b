"""Serving measured in one process, without Ray or HTTP (the GPU machine has no Ray): kernl's
request path against direct model calls, for BERT-base fp16 and a Llama-1B-shaped bf16
causal LM. Ray Serve's own overhead is measured apart on the CPU
(benchmarks/bench_serving_ray_overhead.py); the two add up to `kernl serve`'s cost.

    PYTHONPATH=$PWD OUT=/tmp/out python3 benchmarks/bench_serving_direct.py          # GPU
    PYTHONPATH=$PWD TRITON_INTERPRET=1 .venv/bin/python benchmarks/bench_serving_direct.py \\
        --tiny                                                                        # CPU check
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_serving_direct.py --host     # host cost

Encoder: BERT-base (random weights, BertConfig(), seed 0) compiled with --no-tune for
`batch=1,2,4,8,16,32,64 seq=128`.
  direct  model(input_ids=[C, 128]) with the outputs copied to the CPU: C sequences per call.
  path    C concurrent clients (asyncio tasks, C = 1, 16, 64), each sending one 128-token
          request after another as JSON bytes: parsed and checked (protocol.parse_request),
          gathered (the deployment's gather.BatchGatherer: up to 64 rows, the batch formed
          when the worker frees; at 16 clients also with a 2 ms wait for more), served on a
          worker thread by encoder.serve_batch_bytes (bucket plan priced by each bucket's
          measured call, one call per group, each answer encoded there to the JSON bytes the
          server sends). This is the deployment's code minus Ray and Starlette.
Generation: Llama-3.2-1B shape (random, seed 0) compiled with --no-tune for
`batch=1,4,8,16 prompt=128 cache=512`; prompts of 128 random ids, NEW new tokens, greedy.
  direct  model.generate(C prompts), C = 1 and 16 (the largest bucket: the reference for
          16 and 64 clients); also model.stream of 16 prompts.
  path    C clients (1, 16, 64) sending requests back to back through
          generation_protocol.parse_generation_request -> GenerationBatcher -> JSON answer,
          with later requests joining the running batch (the default) and, at 16 and 64
          clients, without (they wait for it to end); also 16 streaming clients (per-step
          delivery: ids read back every step).
  late    a batch of 15 requests runs; a 16th arrives halfway through: its queueing and
          latency against a request alone, joining the running batch and not joining it.
Host: `--host` runs neither and prices the encoder request path's host work alone, on any
machine: 16 one-sequence requests of 128 tokens parsed and served by serve_batch_bytes with a
stub model returning random fp16 tensors of BERT-base's shapes (bench_serving_common.host_cost),
for the pooler output, every output and last_hidden_state, as JSON and as base64: microseconds
per request, printed as JSON lines.
Prints a table and writes $OUT/serving_direct.json (OUT defaults to the current folder).
Run time on an H200: two compiles without tuning (about a minute each, not measured yet)
and about 2 minutes of measurements (5 s per configuration, --seconds); under 7 minutes."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a check)")
    p.add_argument("--seconds", type=float, default=None, help="per measured configuration")
    p.add_argument("--skip-bert", action="store_true")
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--new", type=int, default=None, help="new tokens per generation request")
    p.add_argument("--host", action="store_true", help="host cost per request, stub model")
    return p.parse_args()


ARGS = parse_args()
if ARGS.tiny:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import triton  # noqa: E402

import kernl  # noqa: E402
import kernl.compiler  # noqa: E402
import kernl.runtime  # noqa: E402
from kernl.serving.batching import measure_costs  # noqa: E402
from kernl.serving.generation_batcher import BatchPolicy, GenerationBatcher  # noqa: E402
from kernl.serving.generation_protocol import (  # noqa: E402
    GenerationLimits,
    answer_body,
    parse_generation_request,
    sse_event,
    token_event,
)
from kernl.serving.loadgen import percentile  # noqa: E402
from kernl.serving.protocol import ModelLimits  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving_common import encoder_path  # noqa: E402
from shapes import llama_1b_config  # noqa: E402

DEVICE = "cpu" if ARGS.tiny else "cuda"
if ARGS.tiny:
    # Intra-op threads on a machine shared by other jobs made direct calls from the main
    # thread 10-100x slower than the same calls from the worker thread (oversubscription).
    torch.set_num_threads(1)
CLIENTS = (1, 16, 64)
SECONDS = ARGS.seconds or (1.5 if ARGS.tiny else 5.0)
ENCODER_WAIT_S = 0.0  # kernl serve's default for an encoder: the batch forms when the model frees
GEN_WINDOW_S = 0.002

if ARGS.tiny:
    # Small enough for Triton's interpreter, whose time grows with every program instance.
    BERT_CONFIG = dict(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=120,
        max_position_embeddings=64,
    )
    BERT_BUCKETS, SEQ = "batch=1,4,16 seq=8", 8  # 64 clients: four calls of 16
    LLAMA_BUCKETS, PROMPT, NEW = "batch=1,4,16 prompt=16 cache=64", 16, ARGS.new or 8
    DTYPE_BERT = DTYPE_LLAMA = "fp32"
else:
    BERT_CONFIG = {}
    BERT_BUCKETS, SEQ = "batch=1,2,4,8,16,32,64 seq=128", 128
    LLAMA_BUCKETS, PROMPT, NEW = "batch=1,4,8,16 prompt=128 cache=512", 128, ARGS.new or 128
    DTYPE_BERT, DTYPE_LLAMA = "fp16", "bf16"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def stats(latencies: list[float], seconds: float, units: int, unit: str) -> dict:
    """p50/p99 latency in ms and `units` per second (sequences, requests or tokens)."""
    return {
        "requests": len(latencies),
        "seconds": seconds,
        f"{unit}_per_s": units / seconds,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


def time_calls(fn, seconds: float, min_calls: int = 3 if ARGS.tiny else 5) -> list[float]:
    fn()  # warm-up
    sync()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < min_calls:
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return times


# -- encoder ----------------------------------------------------------------------------------


def bert_artifact(work: Path, results: dict) -> Path:
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**BERT_CONFIG)).eval()
    path = work / "bert.kernl"
    t = time.perf_counter()
    options = dict(dtype=DTYPE_BERT, device=DEVICE, tune=False)
    try:
        kernl.compiler.compile(model, BERT_BUCKETS, path, **options)
    except AssertionError as e:  # validation against eager failed: record it, time it anyway
        results["bert_validation_failure"] = str(e)
        log(f"BERT VALIDATION FAILED (timed anyway): {e}")
        kernl.compiler.compile(model, BERT_BUCKETS, path, atol=1e9, **options)
    log(f"BERT compiled for {BERT_BUCKETS} in {time.perf_counter() - t:.0f} s (no tuning)")
    return path


def bench_bert(work: Path, results: dict) -> None:
    model = kernl.runtime.load(bert_artifact(work, results), device=DEVICE)
    vocab = model.manifest.model_config["vocab_size"]
    g = torch.Generator().manual_seed(1)
    largest = max(b.batch for b in model.buckets)
    out: dict = {"buckets": BERT_BUCKETS, "direct": [], "path": []}

    for c in CLIENTS:
        # c sequences: one call of c rows, or several of the largest bucket when c exceeds it
        rows = min(c, largest)
        inputs = [torch.randint(5, vocab, (rows, SEQ), generator=g) for _ in range(-(-c // rows))]

        def call(inputs=inputs):
            return [model(input_ids=ids)["pooler_output"].cpu() for ids in inputs]

        times = time_calls(call, SECONDS / 2)
        row = {
            "batch": c,
            "calls": len(inputs),
            **stats(times, sum(times), c * len(times), "sequences"),
        }
        out["direct"].append(row)
        log(f"BERT direct, {c} sequences: {row}")

    limits = ModelLimits.from_manifest(model.manifest, max_rows=largest)  # as the deployment
    # The planner's prices as the deployment sets them: each bucket's call measured on CUDA
    # (kernl serve --plan-by time, its default there), tokens on the CPU.
    costs = measure_costs(model) if DEVICE == "cuda" else None

    rng = torch.Generator().manual_seed(2)
    bodies = [
        json.dumps(
            {
                "input_ids": torch.randint(5, vocab, (SEQ,), generator=rng).tolist(),
                "outputs": ["pooler_output"],
            }
        ).encode()
        for _ in range(64)
    ]

    def run(clients: int, wait_s: float = ENCODER_WAIT_S) -> dict:
        latencies, seconds, per_batch = encoder_path(
            model, limits, bodies, clients, SECONDS, largest, wait_s, costs
        )
        row = {"clients": clients, **stats(latencies, seconds, len(latencies), "sequences")}
        row["requests_per_batch"] = per_batch
        return row

    for c in CLIENTS:
        row = run(c)
        direct = next(d for d in out["direct"] if d["batch"] == c)
        row["p50_over_direct_batch"] = row["p50_ms"] / direct["p50_ms"]
        row["throughput_vs_direct"] = row["sequences_per_s"] / direct["sequences_per_s"]
        out["path"].append(row)
        log(f"BERT path {c} clients: {row}")
    # A wait for more is paid by every batch that is not full (16 clients never fill 64
    # rows); without it (the default), batches form from what queued during the last call.
    row = run(16, 0.002)
    direct = next(d for d in out["direct"] if d["batch"] == 16)
    row["p50_over_direct_batch"] = row["p50_ms"] / direct["p50_ms"]
    row["throughput_vs_direct"] = row["sequences_per_s"] / direct["sequences_per_s"]
    out["path_wait_2ms_16"] = row
    log(f"BERT path 16 clients, --batch-wait-ms 2: {row}")
    results["bert"] = out


# -- generation -------------------------------------------------------------------------------


def llama_model():
    import transformers as tf

    if ARGS.tiny:
        cfg = tf.LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            vocab_size=97,
            initializer_range=0.2,
        )
    else:
        cfg = llama_1b_config()
    cfg.pad_token_id = cfg.eos_token_id = cfg.bos_token_id = None  # no EOS: NEW tokens each
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = tf.LlamaForCausalLM(cfg)
    if not ARGS.tiny:
        model = model.to(torch.bfloat16)
    return model.eval()


def bench_llama(work: Path, results: dict) -> None:
    path = work / "llama.kernl"
    t = time.perf_counter()
    hf = llama_model()
    options = dict(dtype=DTYPE_LLAMA, device=DEVICE, task="causal-lm", tune=False)
    try:
        kernl.compiler.compile(hf, LLAMA_BUCKETS, path, **options)
    except AssertionError as e:  # validation against eager failed: record it, time it anyway
        results["llama_validation_failure"] = str(e)
        log(f"LLAMA VALIDATION FAILED (timed anyway): {e}")
        kernl.compiler.compile(hf, LLAMA_BUCKETS, path, atol=1e9, **options)
    del hf
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    log(f"Llama compiled for {LLAMA_BUCKETS} in {time.perf_counter() - t:.0f} s (no tuning)")
    model = kernl.runtime.load(path, device=DEVICE)
    limits = GenerationLimits.from_manifest(model.manifest)
    vocab = limits.vocab_size
    largest = max(limits.batches)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, vocab, (PROMPT,), generator=g).tolist() for _ in range(64)]
    out: dict = {"buckets": LLAMA_BUCKETS, "prompt": PROMPT, "new_tokens": NEW, "direct": []}

    for b in (1, largest):
        call = lambda b=b: model.generate(prompts[:b], max_new_tokens=NEW)  # noqa: E731
        times = time_calls(call, SECONDS / 2, min_calls=3)
        row = {"batch": b, **stats(times, sum(times), b * NEW * len(times), "tokens")}
        out["direct"].append(row)
        log(f"Llama direct generate batch {b}: {row}")
    times = time_calls(lambda: list(model.stream(prompts[:largest], max_new_tokens=NEW)), 1.0, 3)
    row = {"batch": largest, **stats(times, sum(times), largest * NEW * len(times), "tokens")}
    out["direct_stream"] = row
    log(f"Llama direct stream batch {largest} (ids read back every step): {row}")

    def body(k: int, stream: bool) -> bytes:
        request = {"input_ids": prompts[k % 64], "max_new_tokens": NEW, "stream": stream}
        return json.dumps(request).encode()

    async def run(clients: int, stream: bool, join: bool) -> dict:
        records = []
        batcher = GenerationBatcher(
            model, limits, BatchPolicy(largest, GEN_WINDOW_S, join=join), on_batch=records.append
        )
        latencies: list[float] = []
        first_token: list[float] = []
        tokens = [0]
        end = [float("inf")]

        async def one(k: int, timed: bool) -> None:
            t = time.perf_counter()
            parsed = parse_generation_request(body(k, stream), limits)
            ticket = batcher.submit(parsed)
            if stream:
                events = []
                async for token in ticket.tokens():
                    if not events and timed:
                        first_token.append(time.perf_counter() - t)
                    events.append(token_event(len(events), token, None))
                events.append(sse_event("[DONE]"))
                n = len(events) - 1
            else:
                ids = await ticket.result()
                extra = {"batch": {"index": ticket.batch_index, "requests": ticket.batch_requests}}
                json.dumps(answer_body(parsed, ids, ticket.finish_reason, None, extra))
                n = len(ids)
            if timed:
                latencies.append(time.perf_counter() - t)
                tokens[0] += n

        async def client(k: int, timed: bool) -> None:
            n = 0
            while (timed and time.perf_counter() < end[0]) or (not timed and n < 1):
                await one(k + n, timed)
                n += 1

        await asyncio.gather(*(client(k, False) for k in range(clients)))  # warm-up
        records.clear()
        start = time.perf_counter()
        end[0] = start + SECONDS
        await asyncio.gather(*(client(k, True) for k in range(clients)))
        seconds = time.perf_counter() - start
        row = {"clients": clients, "stream": stream}
        row.update(stats(latencies, seconds, tokens[0], "tokens"))
        row["requests_per_batch"] = sum(r.requests for r in records) / max(len(records), 1)
        row["batch_modes"] = sorted({r.mode for r in records})
        if first_token:
            row["first_token_p50_ms"] = 1000 * percentile(first_token, 0.5)
        return row

    out["path"] = []
    # join: later requests join a running batch (the default); without, they wait for it
    for clients, stream, join in [
        (1, False, True),
        (16, False, True),
        (16, False, False),
        (64, False, True),
        (64, False, False),
        (16, True, True),
    ]:
        row = asyncio.run(run(clients, stream, join))
        row["join"] = join
        ref = next(d for d in out["direct"] if d["batch"] == min(clients, largest))
        row["tokens_per_s_vs_direct"] = row["tokens_per_s"] / ref["tokens_per_s"]
        out["path"].append(row)
        log(f"Llama path {clients} clients{' streaming' if stream else ''} join={join}: {row}")

    async def late(join: bool) -> dict:
        """`largest - 1` requests start a batch; one more arrives about halfway through it
        (half a batch's latency after it started): it joins the running batch in its free
        row (`join`), or waits for it to end."""
        records = []
        batcher = GenerationBatcher(
            model, limits, BatchPolicy(largest, 0.0, join=join), on_batch=records.append
        )
        # a batch's duration as the batcher runs it: the 16-client path's p50 latency
        half = next(p for p in out["path"] if p["clients"] == 16 and not p["join"])["p50_ms"] / 2000
        first = [
            batcher.submit(parse_generation_request(body(k, False), limits))
            for k in range(largest - 1)
        ]
        running = asyncio.gather(*(t.result() for t in first))
        while first[0].started is None:  # the batcher's task takes them at its next turn
            await asyncio.sleep(0)
        await asyncio.sleep(half)
        t = time.perf_counter()
        ticket = batcher.submit(parse_generation_request(body(63, False), limits))
        await ticket.result()
        latency = time.perf_counter() - t
        await running
        while not records:  # a batch is reported after its call, maybe after its answers
            await asyncio.sleep(0.001)
        alone = next(d for d in out["direct"] if d["batch"] == 1)["p50_ms"]
        offset = ticket.arrived - first[0].started
        return {
            # False: the running batch had ended before it arrived (a short batch, a late
            # timer): then this row measures nothing about the policy
            "arrived_mid_batch": offset < records[0].seconds,
            "arrived_after_batch_start_ms": 1000 * offset,
            "running_batch_ms": 1000 * records[0].seconds,
            "queue_ms": 1000 * ticket.wait_s,
            "latency_ms": 1000 * latency,
            "alone_direct_ms": alone,
            "latency_over_alone": 1000 * latency / alone,
            "joined_running_batch": ticket.batch_index == first[0].batch_index,
            "batch_modes": sorted({r.mode for r in records}),
        }

    for join in (True, False):
        name = "late_arrival" if join else "late_arrival_no_join"
        out[name] = asyncio.run(late(join))
        log(f"Llama {name.replace('_', ' ')}: {out[name]}")
    results["llama"] = out


def table(results: dict) -> str:
    lines = []
    bert = results.get("bert")
    if bert:
        lines += [
            f"BERT {DTYPE_BERT} {BERT_BUCKETS}: in-process request path vs direct model(...)",
            f"{'clients':>7} | {'direct seq/s':>12} {'p50 ms':>8} {'p99 ms':>8} | "
            f"{'path seq/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'req/batch':>9} | "
            f"{'p50 / direct':>12}",
        ]
        for d, p in zip(bert["direct"], bert["path"]):
            lines.append(
                f"{p['clients']:>7} | {d['sequences_per_s']:>12.0f} {d['p50_ms']:>8.2f} "
                f"{d['p99_ms']:>8.2f} | {p['sequences_per_s']:>10.0f} {p['p50_ms']:>8.2f} "
                f"{p['p99_ms']:>8.2f} {p['requests_per_batch']:>9.1f} | "
                f"{p['p50_over_direct_batch']:>11.2f}x"
            )
        p = bert["path_wait_2ms_16"]
        lines.append(
            f"16 clients, --batch-wait-ms 2: {p['sequences_per_s']:.0f} seq/s, p50 "
            f"{p['p50_ms']:.2f} ms, p99 {p['p99_ms']:.2f} ms, {p['requests_per_batch']:.1f} "
            f"req/batch, p50 {p['p50_over_direct_batch']:.2f}x direct"
        )
    llama = results.get("llama")
    if llama:
        lines += [
            "",
            f"Llama-1B shape {DTYPE_LLAMA} {LLAMA_BUCKETS}, prompt {PROMPT}, {NEW} new tokens",
            "direct generate: "
            + ", ".join(
                f"batch {d['batch']} {d['tokens_per_s']:.0f} tok/s p50 {d['p50_ms']:.1f} ms"
                for d in llama["direct"]
            )
            + f"; stream batch {llama['direct_stream']['batch']} "
            f"{llama['direct_stream']['tokens_per_s']:.0f} tok/s",
            f"{'clients':>7} {'stream':>6} {'join':>5} | {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'req/batch':>9} | {'tok/s vs direct':>15}",
        ]
        for p in llama["path"]:
            lines.append(
                f"{p['clients']:>7} {str(p['stream']):>6} {str(p['join']):>5} | "
                f"{p['tokens_per_s']:>8.0f} "
                f"{p['p50_ms']:>8.1f} {p['p99_ms']:>8.1f} {p['requests_per_batch']:>9.1f} | "
                f"{p['tokens_per_s_vs_direct']:>14.2f}x"
            )
        for name in ("late_arrival", "late_arrival_no_join"):
            la = llama[name]
            lines.append(
                f"{name.replace('_', ' ')} ({la['arrived_after_batch_start_ms']:.0f} ms into a "
                f"{la['running_batch_ms']:.0f} ms batch): queued "
                f"{la['queue_ms']:.0f} ms, answered in {la['latency_ms']:.0f} ms vs "
                f"{la['alone_direct_ms']:.0f} ms alone ({la['latency_over_alone']:.2f}x), "
                f"joined the running batch: {la['joined_running_batch']}"
                + ("" if la["arrived_mid_batch"] else "; NOT mid-batch: the batch had ended")
            )
    return "\n".join(lines)


def host_costs() -> int:
    from bench_serving_common import host_cost

    for encoding in ("json", "base64"):
        for outputs in (["pooler_output"], None, ["last_hidden_state"]):
            print(json.dumps(host_cost(encoding=encoding, outputs=outputs)), flush=True)
    return 0


def main() -> int:
    if ARGS.host:
        return host_costs()
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "kernl": getattr(kernl, "__version__", "?"),
        "tiny": ARGS.tiny,
        "seconds_per_config": SECONDS,
    }
    log(f"{results}")
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as work:
        if not ARGS.skip_bert:
            bench_bert(Path(work), results)
            (out_dir / "serving_direct.json").write_text(json.dumps(results, indent=1))
        if not ARGS.skip_llama:
            bench_llama(Path(work), results)
    results["total_s"] = time.perf_counter() - T0
    (out_dir / "serving_direct.json").write_text(json.dumps(results, indent=1))
    print(table(results), flush=True)
    log(f"done; {out_dir / 'serving_direct.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
