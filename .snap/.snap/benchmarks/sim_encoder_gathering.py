"""How the encoder replica's batching policy behaves under load, on any machine: kernl's real
request path (parse, gather, bucket plan, JSON answers) around a GPU-like stub whose calls
take GPU_MS(rows) and run one at a time (as on one CUDA stream), the host work of each
request running for real.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/sim_encoder_gathering.py

Two policies, each with no wait and a 2 ms wait for more:
  gather   kernl serve's: the batch forms when the model frees (gather.BatchGatherer)
  timer    Ray Serve's `@serve.batch`: the next batch forms while one runs, closing `wait`
           after its first request, then waits for the model
Loads: closed-loop clients (1, 16, 64, each sending its next request when answered) and
open-loop random arrivals (500, 2,000 and 5,000 requests/s for SECONDS). The stub's time,
0.45 ms + 0.045 ms per row, is BERT-base fp16 at 128 tokens on an H200 roughly (0.5 ms at
batch 1, 3.3 ms at 64). Prints one line per measurement."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving_common import StubEncoder  # noqa: E402

from kernl.serving.encoder import serve_batch_bytes  # noqa: E402
from kernl.serving.gather import BatchGatherer  # noqa: E402
from kernl.serving.loadgen import percentile  # noqa: E402
from kernl.serving.protocol import ModelLimits, parse_request  # noqa: E402

SECONDS = 2.0
MAX_ROWS = 64


def gpu_ms(rows: int) -> float:
    return 0.45 + 0.045 * rows


class GpuStub(StubEncoder):
    """A call holds the 'GPU' for gpu_ms(rows), releasing the GIL like a CUDA sync does."""

    gpu = threading.Lock()

    def __call__(self, input_ids, **kw):
        with self.gpu:
            time.sleep(gpu_ms(input_ids.shape[0]) / 1e3)
        return super().__call__(input_ids, **kw)


class TimerGatherer:
    """Ray Serve's `@serve.batch` loop (ray/serve/batching.py): wait for a first request,
    close the batch `wait_s` after it (or when full), hand it to a task that waits for the
    model, and form the next one at once."""

    def __init__(self, serve, executor, max_rows: int, wait_s: float):
        self.serve, self.executor = serve, executor
        self.max_rows, self.wait_s = max_rows, wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.model = asyncio.Semaphore(1)
        self.batches = self.requests = 0  # as BatchGatherer counts them
        self.task = None

    async def submit(self, item):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._form())
        return await future

    async def _form(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_rows:
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        batch.append(self.queue.get_nowait())
                    else:
                        batch.append(await asyncio.wait_for(self.queue.get(), left))
                except (asyncio.QueueEmpty, TimeoutError):
                    break
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch) -> None:
        async with self.model:
            self.batches += 1
            self.requests += len(batch)
            loop = asyncio.get_running_loop()
            answers = await loop.run_in_executor(self.executor, self.serve, [i for i, _ in batch])
            for (_, future), answer in zip(batch, answers):
                future.set_result(answer)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()


def measure(policy: str, wait_s: float, clients: int = 0, rate: float = 0.0) -> dict:
    model = GpuStub(128)
    limits = ModelLimits.from_manifest(model.manifest, max_rows=MAX_ROWS)
    rng = random.Random(0)
    bodies = [
        json.dumps(
            {
                "input_ids": [rng.randrange(5, 30522) for _ in range(128)],
                "outputs": ["pooler_output"],
            }
        ).encode()
        for _ in range(64)
    ]
    costs = {b: gpu_ms(b.batch) for b in model.buckets}

    def serve(requests):
        return serve_batch_bytes(model, requests, costs, {"replica": "sim"})

    async def main():
        executor = ThreadPoolExecutor(1)
        if policy == "gather":
            gather = BatchGatherer(serve, executor, MAX_ROWS, lambda r: len(r.rows), wait_s)
        else:
            gather = TimerGatherer(serve, executor, MAX_ROWS, wait_s)
        latencies: list[float] = []

        async def one(body: bytes) -> None:
            start = time.perf_counter()
            await gather.submit(parse_request(body, limits))
            latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        end = start + SECONDS
        if clients:

            async def client(k: int) -> None:
                n = 0
                while time.perf_counter() < end:
                    await one(bodies[(k + n) % len(bodies)])
                    n += 1

            await asyncio.gather(*(client(k) for k in range(clients)))
        else:
            tasks, arrival = [], start
            while time.perf_counter() < end:
                arrival += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
                tasks.append(asyncio.create_task(one(bodies[len(tasks) % len(bodies)])))
            # an overloaded policy's queue would take minutes to drain: count what finished
            await asyncio.wait(tasks, timeout=5.0)
        elapsed = time.perf_counter() - start
        await gather.close()
        executor.shutdown(wait=False, cancel_futures=True)
        return latencies, elapsed, gather.requests / max(gather.batches, 1)

    latencies, elapsed, per_batch = asyncio.run(main())
    return {
        "policy": policy,
        "wait_ms": wait_s * 1e3,
        "load": f"{clients} clients" if clients else f"{rate:.0f} req/s",
        "served_per_s": len(latencies) / elapsed,
        "p50_ms": 1e3 * percentile(latencies, 0.5),
        "p99_ms": 1e3 * percentile(latencies, 0.99),
        "requests_per_batch": per_batch,
    }


def main() -> None:
    for load in (
        {"clients": 1},
        {"clients": 16},
        {"clients": 64},
        {"rate": 500.0},
        {"rate": 2000.0},
        {"rate": 5000.0},
    ):
        for policy in ("gather", "timer"):
            for wait_s in (0.0, 0.002):
                print(json.dumps(measure(policy, wait_s, **load)), flush=True)


if __name__ == "__main__":
    main()
