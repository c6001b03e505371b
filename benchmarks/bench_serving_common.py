"""Shared by the serving benchmarks (bench_serving_direct.py on the GPU,
bench_serving_ray_overhead.py on the CPU): kernl's encoder request path in one process
without Ray (the deployment's own BatchGatherer), and a stub BERT-base-shaped encoder that
prices the request path's host work alone (host_cost); `run_clients`, threads of this process
as concurrent clients (bench_serving_e2e.py, bench_serving_gen_e2e.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch

from kernl.artifacts.schema import Bucket, InputSpec, OutputSpec
from kernl.serving.encoder import serve_batch_bytes
from kernl.serving.gather import BatchGatherer
from kernl.serving.protocol import ModelLimits, parse_request


def encoder_path(
    model,
    limits: ModelLimits,
    bodies: list[bytes],
    clients: int,
    seconds: float,
    max_rows: int,
    wait_s: float,
    costs: dict | None = None,
    warmup: int = 2,
) -> tuple[list[float], float, float]:
    """kernl's encoder request path in one process: `clients` asyncio tasks each send
    requests (JSON bytes, cycling through `bodies`) one after another for `seconds`, after
    `warmup` untimed ones each (`costs`: the bucket planner's prices, default tokens); a request is parsed and checked, gathered, served by
    encoder.serve_batch_bytes on the worker thread, which also encodes its answer to JSON
    bytes, as in the deployment. Returns (latencies in s, measured seconds, requests per model batch)."""

    async def main():
        worker = ThreadPoolExecutor(1)
        gather = BatchGatherer(
            lambda requests: serve_batch_bytes(model, requests, costs, {"replica": "bench"}),
            worker,
            max_rows,
            rows_of=lambda request: len(request.rows),
            wait_s=wait_s,
        )
        latencies: list[float] = []
        end = [float("inf")]

        async def one(body: bytes) -> bytes:
            parsed = parse_request(body, limits)
            return await gather.submit(parsed)  # the answer's bytes, as the server sends them

        async def client(k: int, timed: bool) -> None:
            n = 0
            while (timed and time.perf_counter() < end[0]) or (not timed and n < warmup):
                t = time.perf_counter()
                await one(bodies[(k + n) % len(bodies)])
                if timed:
                    latencies.append(time.perf_counter() - t)
                n += 1

        await asyncio.gather(*(client(k, False) for k in range(clients)))
        gather.batches = gather.requests = 0
        start = time.perf_counter()
        end[0] = start + seconds
        await asyncio.gather(*(client(k, True) for k in range(clients)))
        elapsed = time.perf_counter() - start
        per_batch = gather.requests / max(gather.batches, 1)
        await gather.close()
        worker.shutdown()
        return latencies, elapsed, per_batch

    return asyncio.run(main())


class StubEncoder:
    """A BERT-shaped encoder of fixed outputs (random fp16 last_hidden_state and pooler_output
    of the real shapes, no computation): kernl's request path around it costs host time
    alone."""

    def __init__(self, seq: int = 128, hidden: int = 768, batches=(1, 2, 4, 8, 16, 32, 64)):
        self.buckets = [Bucket(b, seq) for b in batches]
        self.device = torch.device("cpu")
        self.manifest = SimpleNamespace(
            inputs=[
                InputSpec("input_ids", "int64", 0, "required"),
                InputSpec("attention_mask", "int64", 0, "ones"),
                InputSpec("token_type_ids", "int64", 0, "zeros"),
            ],
            outputs=[
                OutputSpec("last_hidden_state", "float16", 0, 1),
                OutputSpec("pooler_output", "float16", 0, None),
            ],
            model_config={"vocab_size": 30522, "type_vocab_size": 2},
            bucket_list=lambda: list(self.buckets),
        )
        g = torch.Generator().manual_seed(0)
        largest = max(batches)
        self.hidden = torch.randn(largest, seq, hidden, generator=g).half()
        self.pooled = torch.randn(largest, hidden, generator=g).half()

    def __call__(self, input_ids, **_):
        b = input_ids.shape[0]
        return {"last_hidden_state": self.hidden[:b], "pooler_output": self.pooled[:b]}


def host_cost(
    requests: int = 16, seq: int = 128, repeats: int = 20, encoding: str = "json", outputs=None
) -> dict:
    """Host microseconds per request of a batch of `requests` one-sequence requests of `seq`
    tokens served by a StubEncoder: parse each body, serve_batch_bytes (plan, inputs, call,
    answers encoded as the server sends them). Medians over `repeats` batches."""
    model = StubEncoder(seq)
    limits = ModelLimits.from_manifest(model.manifest, max_rows=64)
    g = torch.Generator().manual_seed(2)
    bodies = []
    for _ in range(requests):
        body = {"input_ids": torch.randint(5, 30522, (seq,), generator=g).tolist()}
        if outputs:
            body["outputs"] = outputs
        if encoding != "json":
            body["encoding"] = encoding
        bodies.append(json.dumps(body).encode())
    parse_s, serve_s, sizes = [], [], 0
    for k in range(repeats + 1):  # the first: warm-up (the fp16 text table is built there)
        t = time.perf_counter()
        parsed = [parse_request(b, limits) for b in bodies]
        t1 = time.perf_counter()
        answers = serve_batch_bytes(model, parsed, None, {"replica": "bench"})
        t2 = time.perf_counter()
        if k:
            parse_s.append(t1 - t)
            serve_s.append(t2 - t1)
        sizes = sum(len(a) for a in answers)
    median = lambda xs: sorted(xs)[len(xs) // 2] * 1e6 / requests  # noqa: E731
    return {
        "outputs": outputs or "all",
        "encoding": encoding,
        "parse_us": median(parse_s),
        "serve_and_encode_us": median(serve_s),
        "total_us": median(parse_s) + median(serve_s),
        "answer_bytes": sizes // requests,
    }


def run_clients(client: Callable[[int], None], clients: int) -> float:
    """Runs client(k) for k < clients on as many threads at once; the wall seconds."""
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - start
