"""Run by test_shared_stats.py in a process of its own (Ray is started and stopped here, not
in the test process): a deployment's counters (SharedStats) as the replicas of two
deployments of one application and `kernl serve`'s stop see them. Prints one JSON line."""

import json
import sys
import time

import ray

from kernl.serving.replica import (
    ENCODER_COUNTERS,
    METRICS_NAMESPACE,
    SharedStats,
    stop_counters,
)


class Tally:
    def __init__(self):
        self.n = 0

    def add(self):
        self.n += 1

    def snapshot(self):
        return {"n": self.n}


def counts(stats: SharedStats) -> int:
    return ray.get(stats.actor.snapshot.remote(), timeout=30)["n"]


def alive(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=METRICS_NAMESPACE)
    except ValueError:
        return False
    return True


def gone_within(name: str, seconds: float) -> float | None:
    """How long until the actor `name` is gone (None: not within `seconds`)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if not alive(name):
            return time.monotonic() - start
        time.sleep(0.1)
    return None


if __name__ == "__main__":
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    family = ENCODER_COUNTERS.format(app="kernl-test-app")
    result = {}
    # deployment 1: two replicas share one actor
    first = [SharedStats(Tally, family, "one", window_s=0, retire_idle_s=2.0) for _ in range(2)]
    for stats in first:
        for _ in range(3):
            stats.send("add")
    time.sleep(0.5)
    result["first"] = counts(first[0])
    # deployment 2 of the same application: from zero, while deployment 1 still counts
    second = [SharedStats(Tally, family, "two", window_s=0, retire_idle_s=2.0) for _ in range(2)]
    result["second_at_start"] = counts(second[1])
    second[0].send("add")
    first[0].send("add")  # a replica of deployment 1, still draining
    time.sleep(0.5)
    result["second"] = counts(second[1])
    result["first_draining"] = counts(first[1])
    # deployment 1's actor, asked to retire by deployment 2's, exits once idle for 2 s
    result["first_gone_after_s"] = gone_within(first[0].name, 30)
    result["second_alive"] = alive(second[0].name)
    # `kernl serve` stopping the application: every deployment's actor goes
    stop_counters("kernl-test-app")
    result["second_gone_after_s"] = gone_within(second[0].name, 30)
    print(json.dumps(result))
    ray.shutdown()
    sys.exit(0)
