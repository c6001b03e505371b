"""Run by test_shared_stats.py in a process of its own (Ray is started and stopped here, not
in the test process): requests counting things and being cancelled, as Ray Serve cancels a
request whose client left, while counts are sent from their `finally`. Prints one JSON line:
the count the actor holds and how long the snapshot took."""

import asyncio
import json
import sys
import time

import ray

from kernl.serving.replica import SharedStats

ROUNDS, REQUESTS, SENT_PER_REQUEST = 4, 40, 20


class Tally:
    def __init__(self):
        self.n = 0

    def add(self):
        self.n += 1

    def snapshot(self):
        return {"n": self.n}


@ray.remote(num_cpus=0)
class Server:
    def __init__(self):
        self.stats = SharedStats(Tally, "kernl-test-tally")
        self.started = 0

    async def request(self):
        self.started += 1
        self.stats.send("add")
        try:
            await asyncio.sleep(60)
        finally:  # where the replicas count a cancelled stream
            for _ in range(SENT_PER_REQUEST):
                self.stats.send("add")

    async def metrics(self):
        return await self.stats.snapshot()

    async def started_requests(self):
        return self.started


def wait_until_started(server, count: int) -> None:
    """Cancel only requests that run: one cancelled while still queued never counts at all
    (a loaded host once left one queued after half a second: 21 counts short)."""
    deadline = time.monotonic() + 60
    while ray.get(server.started_requests.remote()) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {ray.get(server.started_requests.remote())} of {count} ran")
        time.sleep(0.05)


if __name__ == "__main__":
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    server = Server.remote()
    for round_ in range(ROUNDS):
        refs = [server.request.remote() for _ in range(REQUESTS)]
        wait_until_started(server, (round_ + 1) * REQUESTS)
        time.sleep(0.1)
        for ref in refs:
            ray.cancel(ref)  # recursive, as Ray Serve's on a client's disconnect
            time.sleep(0.01)
    time.sleep(1.0)
    start = time.monotonic()
    try:
        n = ray.get(server.metrics.remote(), timeout=25)["n"]
    except Exception as e:
        n = f"{type(e).__name__}: {str(e)[:300]}"
    took = time.monotonic() - start
    print(
        json.dumps({"n": n, "expected": ROUNDS * REQUESTS * (1 + SENT_PER_REQUEST), "took_s": took})
    )
    ray.shutdown()
    sys.exit(0)
