"""What both `kernl serve` replicas share (the encoder's KernlServer, the causal LM's
KernlGenerator): the model loads on the replica's worker thread while the replica already
answers, readiness and health say so (503 until loaded, "failed" if the load raised, and
Ray Serve's health check replaces a failed replica), one router for the GET endpoints, and
the replica's calls to the application's shared counters."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from starlette.requests import Request
from starlette.responses import Response


def json_response(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def replica_device(configured: str | None) -> str:
    """The configured device, else CUDA where the replica has a GPU (read in the replica's
    process, after Ray has set its visible GPUs)."""
    if configured is not None:
        return configured
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


GET_PATHS = ("/ready", "/health", "/metrics")
METRICS_NAMESPACE = "kernl"
COUNTS_WINDOW_S = 0.01  # how long a replica's counts gather before one actor call


class SharedStats:
    """A replica's calls to the application's counters (one detached Ray actor per
    application, created by whichever replica comes first, so GET /metrics shows the whole
    application whichever replica answers).

    Every call leaves from a thread of its own. An actor call made while a request is served
    is that request's child in Ray, and Ray Serve cancels a request whose client left with
    `ray.cancel`, which is recursive: a counter cancelled before it reached the actor left a
    gap in the actor's ordered queue, and every later call to it (GET /metrics included)
    waited 30 s and failed. Sent from one thread, a replica's calls also reach the actor in
    the order they were made.

    The counts of a window (`window_s`, from the first count after the sender was idle) go
    together in one actor call: an actor call costs the replica more host time than a
    request's own JSON (without the counters, a replica on 2 cores served 12-26% more
    requests/s; one call per count made while the previous was sending still took 13% of a
    loaded replica's CPU), so a loaded replica makes one call per window whatever its request
    rate. A count reaches the actor at most a window late; a snapshot (GET /metrics) queues
    behind the sends before it, so it sees every count made before it was asked for."""

    def __init__(self, counters: type, name: str, window_s: float = COUNTS_WINDOW_S):
        import ray

        actor = ray.remote(num_cpus=0)(_counting_in_batches(counters))
        self.actor = actor.options(
            name=name, namespace=METRICS_NAMESPACE, get_if_exists=True, lifetime="detached"
        ).remote()
        self.sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernl-metrics")
        self._pending: list[tuple[str, tuple, dict]] = []
        self._lock = threading.Lock()
        self._sending = False
        self.window_s = window_s

    def send(self, method: str, *args, **kwargs) -> None:
        """Counts something; returns at once (the count is not waited for)."""
        with self._lock:
            self._pending.append((method, args, kwargs))
            if self._sending:
                return  # the sender picks it up before it stops
            self._sending = True
        self.sender.submit(self._send_pending)

    def _send_pending(self) -> None:
        if self.window_s > 0:
            time.sleep(self.window_s)  # the counts of the window join this call
        with self._lock:
            calls, self._pending = self._pending, []
            # A count from now on submits the next send, which runs after this one: the
            # actor gets the calls in order, and a snapshot asked for meanwhile is not kept
            # waiting behind a loop that a busy replica would never let end.
            self._sending = False
        if calls:
            self.actor.apply_calls.remote(calls)

    async def snapshot(self) -> dict:
        ref = await asyncio.wrap_future(self.sender.submit(self.actor.snapshot.remote))
        return await ref


def _counting_in_batches(counters: type) -> type:
    """`counters` with `apply_calls([(method, args, kwargs), ...])`: one actor call for
    several counts."""

    class Counting(counters):
        def apply_calls(self, calls: list) -> None:
            for method, args, kwargs in calls:
                getattr(self, method)(*args, **kwargs)

    Counting.__name__ = Counting.__qualname__ = counters.__name__
    return Counting


class Replica:
    """A subclass sets `config`, `replica`, `stats` and `loading` (the load's Future), and
    gives POST_PATHS, `post(body)` and `health()`."""

    POST_PATHS: tuple[str, ...] = ("/",)
    loading: Future
    stats: SharedStats

    def _load_state(self) -> tuple[str, str | None]:
        """("loading" | "failed" | "ready", the load's error if it failed)."""
        if not self.loading.done():
            return "loading", None
        error = self.loading.exception()
        if error is not None:
            return "failed", f"{type(error).__name__}: {error}"
        return "ready", None

    async def loaded(self) -> None:
        """Returns once the model is loaded (a request during the load waits for it); raises
        the load's error. A finished load costs no trip through the event loop: wrapping the
        done future cost every request 12 us and a wake-up of the loop from another thread."""
        if not self.loading.done():
            await asyncio.wrap_future(self.loading)
        self.loading.result()

    def check_health(self) -> None:
        """Ray Serve's periodic replica check: a replica whose model failed to load is
        replaced, rather than kept answering 503."""
        state, error = self._load_state()
        if state == "failed":
            raise RuntimeError(f"kernl: loading {self.config.artifact} failed: {error}")

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        prefix = (request.scope.get("root_path") or "").rstrip("/")
        if prefix and path.startswith(prefix):
            path = path[len(prefix) :] or "/"
        if path in ("/health", "/ready") and request.method == "GET":
            state, error = self._load_state()
            if state != "ready":
                body = {
                    "ready": False,
                    "status": state,
                    "replica": self.replica,
                    "artifact": os.path.abspath(self.config.artifact),
                }
                if error:
                    body["error"] = error
                return json_response(body, status=503)
            if path == "/ready":
                return json_response({"ready": True, "status": "ok", "replica": self.replica})
            return json_response(self.health())
        if path == "/metrics" and request.method == "GET":
            try:
                return json_response(await self.stats.snapshot())
            except Exception as e:  # the counters' actor is Ray's: it may be unreachable
                error = f"metrics unavailable: {type(e).__name__}: {e}"
                return json_response({"error": error, "replica": self.replica}, status=503)
        if path in self.POST_PATHS and request.method == "POST":
            return await self.post(await request.body())
        return self.no_route(request.method, path)

    def no_route(self, method: str, path: str) -> Response:
        """404 for a path no route has; 405 with an `Allow` header (RFC 9110) for a route
        asked with another method (GET / included: POST-only)."""
        posts = " (or " + ", ".join(self.POST_PATHS[1:]) + ")" if len(self.POST_PATHS) > 1 else ""
        body = {
            "error": f"no route {method} {path}; use POST /{posts}, "
            "GET /ready, GET /health, GET /metrics"
        }
        allowed = "POST" if path in self.POST_PATHS else "GET" if path in GET_PATHS else None
        if allowed is None:
            return json_response(body, status=404)
        response = json_response(body, status=405)
        response.headers["Allow"] = allowed
        return response

    async def post(self, body: bytes) -> Response:
        raise NotImplementedError

    def health(self) -> dict:
        raise NotImplementedError
