"""A small load generator for `kernl serve` (standard library only): N clients, each sending
its next request as soon as the last one is answered, for a fixed count or time.

    python -m kernl.serving.loadgen http://127.0.0.1:8000/ --clients 16 --seq 128 \\
        --requests 50 --outputs pooler_output

Prints one JSON line: clients, requests, errors (and the first one's reason), sequences/s and
p50/p99 latency in ms of the answered requests (200); exits 1 when a request failed, 2 when no
timed request could start (the server unreachable, or its warm-up requests refused)."""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlparse


@dataclass
class LoadResult:
    clients: int
    requests: int  # timed requests sent
    errors: int  # of those, the ones not answered 200 (a 4xx/5xx, or no answer)
    seconds: float
    sequences_per_s: float  # answered (200) requests only, as the latencies and tokens/s
    p50_ms: float | None  # None (JSON null) where no request was answered
    p99_ms: float | None
    tokens_per_s: float = 0.0  # generation (max_new_tokens set): new tokens generated per s
    first_error: str | None = None  # what went wrong first, when errors


class LoadError(RuntimeError):
    """No timed request could run: a client failed during its warm-up."""


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
    tokens (greedy, returned at the end) and tokens/s counts the ids that came back.

    A timed request answered with another status than 200, or not at all, counts in `errors`
    (the first reason in `first_error`), not in the latencies, sequences/s or tokens/s. A
    client whose warm-up fails stops every client at once: LoadError (no timed request ran).
    ValueError for arguments that cannot make a request (`vocab` must be above 5, `url` an
    http:// URL with a host and a valid port)."""
    if vocab <= 5:  # ids are drawn from [5, vocab): below 5 are a BERT vocabulary's specials
        raise ValueError(
            f"vocab must be above 5 (token ids are drawn from [5, vocab)), got {vocab}"
        )
    for name, value in (("clients", clients), ("requests", requests_per_client), ("seq", seq)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    host, port, path = parse_url(url)
    latencies: list[float] = []
    errors: list[str] = []  # one reason per failed timed request
    warmup_failures: list[str] = []
    tokens = [0]
    lock = threading.Lock()
    start_line = threading.Barrier(clients + 1)

    def body(rng: random.Random) -> bytes:
        request = {"input_ids": [rng.randrange(5, vocab) for _ in range(seq)]}
        if max_new_tokens is None:
            # every encoder kernl serves takes it (DPR-style artifacts require it)
            # (every request was refused: "lacks 'attention_mask', which this model requires")
            request["attention_mask"] = [1] * seq
        if outputs:
            request["outputs"] = outputs
        if max_new_tokens is not None:
            request["max_new_tokens"] = max_new_tokens
        return json.dumps(request).encode()

    def send(conn: http.client.HTTPConnection, data: bytes) -> tuple[int, bytes]:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()

    def client(k: int) -> None:
        rng = random.Random(k)
        conn = None
        try:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
            for _ in range(warmup):
                status, answer = send(conn, body(rng))
                if status != 200:
                    raise LoadError(f"HTTP {status}: {answer[:300].decode(errors='replace')}")
        except Exception as e:  # the others must not wait for this one at the start line
            with lock:
                warmup_failures.append(f"client {k}, warm-up: {type(e).__name__}: {e}")
            start_line.abort()
            if conn is not None:
                conn.close()
            return
        try:
            start_line.wait()
        except threading.BrokenBarrierError:  # another client failed its warm-up
            conn.close()
            return
        mine: list[float] = []
        failed: list[str] = []
        new = 0
        try:
            for _ in range(requests_per_client):
                data = body(rng)
                t0 = time.perf_counter()
                try:
                    status, answer = send(conn, data)
                    took = time.perf_counter() - t0
                    if status != 200:
                        failed.append(f"HTTP {status}: {answer[:300].decode(errors='replace')}")
                        continue
                    if max_new_tokens is not None:
                        generated = len(json.loads(answer)["generated_ids"])
                except (OSError, http.client.HTTPException) as e:
                    failed.append(f"{type(e).__name__}: {e}")
                    conn.close()  # the next request opens a new connection
                    continue
                except Exception as e:  # an answer without generated_ids, ...: an error too
                    failed.append(f"{type(e).__name__}: {e}")
                    continue
                mine.append(took)
                if max_new_tokens is not None:
                    new += generated
        finally:  # whatever stopped this client, what it measured counts
            conn.close()
            with lock:
                latencies.extend(mine)
                errors.extend(failed)
                tokens[0] += new

    # Daemons: Ctrl-C ends the run at once, not after every request in flight has answered
    # or timed out (`timeout` each).
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    try:
        start_line.wait()
    except threading.BrokenBarrierError:
        for t in threads:
            t.join()
        raise LoadError(
            f"{len(warmup_failures)} of {clients} client(s) failed before the timed requests; "
            f"first: {warmup_failures[0]}"
        ) from None
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    n = len(latencies)
    return LoadResult(
        clients=clients,
        requests=n + len(errors),
        errors=len(errors),
        seconds=seconds,
        sequences_per_s=n / seconds,
        # null in the JSON where nothing was answered: NaN is no JSON (jq and strict parsers
        # refuse the line)
        p50_ms=1000 * percentile(latencies, 0.5) if latencies else None,
        p99_ms=1000 * percentile(latencies, 0.99) if latencies else None,
        tokens_per_s=tokens[0] / seconds,
        first_error=errors[0] if errors else None,
    )


def parse_url(url: str) -> tuple[str, int, str]:
    """(host, port, path and query) of an http:// URL; ValueError naming what is wrong (a
    client thread that failed on it left the others waiting at the start line forever)."""
    target = urlparse(url)
    if target.scheme == "https":
        raise ValueError(f"{url!r}: https is not supported; the load generator speaks plain HTTP")
    if target.scheme != "http" or not target.hostname:
        raise ValueError(
            f"{url!r}: expected an http:// URL with a host, e.g. http://127.0.0.1:8000/"
        )
    try:
        port = target.port
    except ValueError:  # "Port out of range 0-65535", "Port could not be cast to integer"
        raise ValueError(f"{url!r}: the port must be an integer in [1, 65535]") from None
    if port == 0:
        raise ValueError(f"{url!r}: the port must be an integer in [1, 65535]")
    path = target.path or "/"
    if target.query:
        path += "?" + target.query
    return target.hostname, port or 80, path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kernl.serving.loadgen",
        description="Closed-loop load on a kernl server: each client sends one request, waits "
        "for its answer, sends the next; prints latency percentiles and throughput as JSON.",
    )
    p.add_argument("url", help="the server's POST endpoint, e.g. http://127.0.0.1:8000/")
    p.add_argument("--clients", type=int, default=1, help="concurrent clients (default 1)")
    p.add_argument(
        "--requests", type=int, default=50, help="timed requests per client (default 50)"
    )
    p.add_argument(
        "--seq",
        type=int,
        default=128,
        help="token ids per request: a generation server's prompt length (default 128)",
    )
    p.add_argument(
        "--vocab", type=int, default=1000, help="token ids are drawn below this (default 1000)"
    )
    p.add_argument("--outputs", nargs="*", default=None, help="outputs to ask for (default all)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="a generation server: new tokens per request (tokens/s is reported)",
    )
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds one request may take (default 120)"
    )
    args = p.parse_args(argv)
    try:
        result = run_load(
            args.url,
            args.clients,
            args.requests,
            args.seq,
            args.vocab,
            args.outputs,
            max_new_tokens=args.max_new_tokens,
            timeout=args.timeout,
        )
    except ValueError as e:
        p.error(str(e))  # exit 2
    except LoadError as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loadgen: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(asdict(result), allow_nan=False))
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
