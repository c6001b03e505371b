"""A small load generator for `kernl serve` (standard library only): N clients, each sending
its next request as soon as the last one is answered, for a fixed count or time.

    python -m kernl.serving.loadgen http://127.0.0.1:8000/ --clients 16 --seq 128 \\
        --requests 50 --outputs pooler_output

Prints one JSON line: clients, requests, sequences/s, p50/p99 latency in ms, errors."""

from __future__ import annotations

import argparse
import http.client
import json
import random
import threading
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlparse


@dataclass
class LoadResult:
    clients: int
    requests: int
    errors: int
    seconds: float
    sequences_per_s: float
    p50_ms: float
    p99_ms: float
    tokens_per_s: float = 0.0  # generation (max_new_tokens set): new tokens generated per s


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_load(
    url: str,
    clients: int,
    requests_per_client: int,
    seq: int,
    vocab: int = 1000,
    outputs: list[str] | None = None,
    warmup: int = 2,
    timeout: float = 120.0,
    max_new_tokens: int | None = None,
) -> LoadResult:
    """Each client sends `warmup` untimed requests, then `requests_per_client` timed ones of
    one sequence of `seq` random token ids; all clients start together. With
    `max_new_tokens`, the server is a generation server: each request asks for that many new
    tokens (greedy, returned at the end) and tokens/s counts the ids that came back."""
    target = urlparse(url)
    path = target.path or "/"
    latencies: list[float] = []
    errors = [0]
    tokens = [0]
    lock = threading.Lock()
    start_line = threading.Barrier(clients + 1, timeout=600)

    def body(rng: random.Random) -> bytes:
        request = {"input_ids": [rng.randrange(5, vocab) for _ in range(seq)]}
        if outputs:
            request["outputs"] = outputs
        if max_new_tokens is not None:
            request["max_new_tokens"] = max_new_tokens
        return json.dumps(request).encode()

    def client(k: int) -> None:
        rng = random.Random(k)
        conn = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=timeout)
        mine: list[float] = []
        bad = new = 0
        for i in range(warmup + requests_per_client):
            if i == warmup:
                start_line.wait()
            data = body(rng)
            t0 = time.perf_counter()
            conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            answer = resp.read()
            if i >= warmup:
                mine.append(time.perf_counter() - t0)
                bad += resp.status != 200
                if max_new_tokens is not None and resp.status == 200:
                    new += len(json.loads(answer)["generated_ids"])
        conn.close()
        with lock:
            latencies.extend(mine)
            errors[0] += bad
            tokens[0] += new

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    start_line.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    n = len(latencies)
    return LoadResult(
        clients=clients,
        requests=n,
        errors=errors[0],
        seconds=seconds,
        sequences_per_s=n / seconds,
        p50_ms=1000 * percentile(latencies, 0.5),
        p99_ms=1000 * percentile(latencies, 0.99),
        tokens_per_s=tokens[0] / seconds,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernl.serving.loadgen")
    p.add_argument("url")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--requests", type=int, default=50, help="timed requests per client")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1000, help="token ids are drawn below this")
    p.add_argument("--outputs", nargs="*", default=None, help="outputs to ask for")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="a generation server: new tokens per request (tokens/s is reported)",
    )
    args = p.parse_args(argv)
    result = run_load(
        args.url,
        args.clients,
        args.requests,
        args.seq,
        args.vocab,
        args.outputs,
        max_new_tokens=args.max_new_tokens,
    )
    print(json.dumps(asdict(result)))
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
