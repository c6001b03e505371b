"""What both `kernl serve` replicas share (the encoder's KernlServer, the causal LM's
KernlGenerator): the model loads on the replica's worker thread while the replica already
answers, readiness and health say so (503 until loaded, "failed" if the load raised, and
Ray Serve's health check replaces a failed replica), one router for the GET endpoints, and
the replica's calls to the application's shared counters."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from starlette.requests import Request
from starlette.responses import Response

from kernl.artifacts.schema import MANIFEST_CHECKSUM_KEY

from .device import cuda_context_error
from .protocol import MAX_BODY_BYTES, RequestError


def artifact_identity(manifest) -> dict:
    """Which build a replica serves, for /health: the manifest's own checksum (it covers every
    file's hash) and the compile's time. After a blue/green swap of a linked artifact folder,
    the path alone did not tell the old build from the new one."""
    checksum = manifest.extra.get(MANIFEST_CHECKSUM_KEY)
    return {
        "artifact_id": checksum[:16] if isinstance(checksum, str) else None,
        "artifact_created_at": manifest.created_at,
    }


def json_response(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


# Ray Serve counts a request against the replica's max_ongoing_requests from its headers on:
# a body read without a deadline let 8 clients that stalled mid-upload (16 on an encoder) hold
# every slot, /ready included, for as long as they kept their sockets open (review).
BODY_DEADLINE_S = 15.0


async def read_body(
    request: Request, limit: int = MAX_BODY_BYTES, deadline_s: float | None = None
) -> bytes:
    """The request body, read as it arrives: RequestError 413 as soon as it passes `limit`
    (a declared Content-Length over it before any byte is read: a 1 GB upload was buffered
    whole, 1.5 GB of the replica's memory, before its 413), 408 when it has not all come
    within `deadline_s` (BODY_DEADLINE_S by default)."""
    deadline_s = BODY_DEADLINE_S if deadline_s is None else deadline_s
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body over {limit} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), deadline_s)
    except asyncio.TimeoutError:  # TimeoutError from 3.11 on, not on 3.10
        raise RequestError(
            408, f"request body not received within {deadline_s:g} s ({size} bytes came)"
        ) from None
    return b"".join(chunks)


GET_PATHS = ("/ready", "/health", "/metrics")
METRICS_NAMESPACE = "kernl"
COUNTS_WINDOW_S = 0.01  # how long a replica's counts gather before one actor call
# The counters actors' names, per application (format with app=...), "@<deployment>" added.
ENCODER_COUNTERS = "kernl-metrics-{app}"
GENERATION_COUNTERS = "kernl-generation-metrics-{app}"
# A deployment's counters actor, once a newer deployment of its application has started,
# exits after this long without a call: its replicas are then gone.
RETIRE_IDLE_S = 60.0


class SharedStats:
    """A replica's calls to the application's counters (one detached Ray actor per
    deployment of the application, created by whichever of its replicas comes first, so GET
    /metrics shows the whole application whichever replica answers).

    The actor is named `<family>@<instance>`: `instance` is drawn once per deployment
    (deployment.application(), and passed to every replica), so a new deployment starts
    from zero however many replicas start at once (Ray's get_if_exists makes one actor of
    that name), while the replicas of the one it replaces keep theirs as they drain. Named
    per application alone, the actor outlived the application, and the next `kernl serve`
    on a long-lived cluster showed the previous run's counts (of another artifact, maybe, and
    counted by an older kernl's class). The new actor asks its predecessors in the family to
    retire (each exits after RETIRE_IDLE_S without a call), and `kernl serve` kills its
    application's actors when it stops (stop_counters).

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

    def __init__(
        self,
        counters: type,
        family: str,
        instance: str | None = None,
        window_s: float = COUNTS_WINDOW_S,
        retire_idle_s: float = RETIRE_IDLE_S,
    ):
        import ray

        actor = ray.remote(num_cpus=0)(_counting_in_batches(counters))
        self.name = family if instance is None else f"{family}@{instance}"
        self.actor = actor.options(
            name=self.name, namespace=METRICS_NAMESPACE, get_if_exists=True, lifetime="detached"
        ).remote(family if instance is not None else None, self.name, retire_idle_s)
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
    several counts; and `retire()`, which ends the actor once its replicas have stopped
    calling it. Constructed with a `family` (SharedStats), it asks the earlier deployments'
    actors of that family to retire."""

    class Counting(counters):
        def __init__(
            self,
            family: str | None = None,
            name: str | None = None,
            retire_idle_s: float = RETIRE_IDLE_S,
        ):
            # the base named, not super(): Ray's copy of this class in the actor's process is
            # not the class that super()'s cell holds
            counters.__init__(self)
            self._last_call = time.monotonic()
            self._retiring = False
            if family is not None:  # off the constructor: the replicas' calls need not wait
                args = (family, name, retire_idle_s)
                threading.Thread(target=_retire_earlier, args=args, daemon=True).start()

        def apply_calls(self, calls: list) -> None:
            self._last_call = time.monotonic()
            for method, args, kwargs in calls:
                getattr(self, method)(*args, **kwargs)

        def snapshot(self) -> dict:
            self._last_call = time.monotonic()
            return counters.snapshot(self)

        def retire(self, idle_s: float = RETIRE_IDLE_S) -> None:
            """A newer deployment of the application runs: exit once no call has come for
            `idle_s` (the replicas of this one still draining keep counting until then)."""
            if not self._retiring:
                self._retiring = True
                threading.Thread(target=self._exit_when_idle, args=(idle_s,), daemon=True).start()

        def _exit_when_idle(self, idle_s: float) -> None:
            while (idle := time.monotonic() - self._last_call) < idle_s:
                time.sleep(idle_s - idle)
            _exit_actor()

    Counting.__name__ = Counting.__qualname__ = counters.__name__
    return Counting


def _exit_actor() -> None:
    import ray

    ray.kill(ray.get_runtime_context().current_actor)


def counters_of(entries: list[dict], families: list[str], keep: str | None = None) -> list[str]:
    """The names among `entries` (ray.util.list_named_actors(all_namespaces=True)) of the
    counters actors of `families`, every deployment's but `keep`."""
    return [
        e["name"]
        for e in entries
        if e["namespace"] == METRICS_NAMESPACE
        and e["name"] != keep
        and any(_in_family(e["name"], family) for family in families)
    ]


def _in_family(name: str, family: str) -> bool:
    instance = name[len(family) + 1 :]
    return name.startswith(family + "@") and bool(instance) and "@" not in instance


def _retire_earlier(family: str, keep: str, idle_s: float) -> None:
    import ray

    try:
        for name in counters_of(ray.util.list_named_actors(all_namespaces=True), [family], keep):
            ray.get_actor(name, namespace=METRICS_NAMESPACE).retire.remote(idle_s)
    except Exception:  # an earlier actor left behind costs a little memory, not correctness
        pass


def stop_counters(app_name: str) -> None:
    """Kill the counters actors of every deployment of application `app_name` (`kernl serve`,
    once it has deleted the application: they are detached, so they outlive it)."""
    import ray

    families = [ENCODER_COUNTERS.format(app=app_name), GENERATION_COUNTERS.format(app=app_name)]
    for name in counters_of(ray.util.list_named_actors(all_namespaces=True), families):
        try:
            ray.kill(ray.get_actor(name, namespace=METRICS_NAMESPACE))
        except ValueError:  # gone meanwhile
            pass


class Replica:
    """A subclass sets `config`, `replica`, `stats` and `loading` (the load's Future), and
    gives POST_PATHS, `post(body)` and `health()`."""

    POST_PATHS: tuple[str, ...] = ("/",)
    loading: Future
    stats: SharedStats
    device_error: str | None = None  # set by note_failed_call

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
        """Ray Serve's periodic replica check: a replica whose model failed to load, or whose
        GPU a failed kernel left unusable, is replaced, rather than kept answering 503 or
        500 to every request."""
        state, error = self._load_state()
        if state == "failed":
            raise RuntimeError(f"kernl: loading {self.config.artifact} failed: {error}")
        if self.device_error is not None:
            raise RuntimeError(
                f"kernl: this replica's GPU can run nothing more: {self.device_error}"
            )

    def note_failed_call(self) -> None:
        """A model call failed: if its GPU's context is now unusable (cuda_context_error),
        the next health check fails, and Ray Serve replaces the replica, rather than keeping
        one that answers every request with a 500."""
        if self.device_error is None:
            self.device_error = cuda_context_error(getattr(self.model, "device", None))

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        prefix = (request.scope.get("root_path") or "").rstrip("/")
        if prefix and path.startswith(prefix):
            path = path[len(prefix) :] or "/"
        # HEAD wherever GET is served (RFC 9110): probes and load balancers use it; the
        # server sends the headers and status alone
        method = "GET" if request.method == "HEAD" else request.method
        if path in ("/health", "/ready") and method == "GET":
            state, error = self._load_state()
            if state != "ready":
                body = {
                    "ready": False,
                    "status": state,
                    "replica": self.replica,
                    "artifact": self.config.artifact_path(),
                }
                if error:
                    body["error"] = error
                return json_response(body, status=503)
            if path == "/ready":
                return json_response({"ready": True, "status": "ok", "replica": self.replica})
            return json_response(self.health())
        if path == "/metrics" and method == "GET":
            try:
                return json_response(await self.stats.snapshot())
            except Exception as e:  # the counters' actor is Ray's: it may be unreachable
                error = f"metrics unavailable: {type(e).__name__}: {e}"
                return json_response({"error": error, "replica": self.replica}, status=503)
        if path in self.POST_PATHS and request.method == "POST":
            try:
                body = await read_body(request)
            except RequestError as e:
                self.count_bad()
                return json_response({"error": str(e)}, status=e.status)
            return await self.post(body)
        return self.no_route(request.method, path)

    def no_route(self, method: str, path: str) -> Response:
        """404 for a path no route has; 405 with an `Allow` header (RFC 9110) for a route
        asked with another method (GET / included: POST-only)."""
        posts = " (or " + ", ".join(self.POST_PATHS[1:]) + ")" if len(self.POST_PATHS) > 1 else ""
        body = {
            "error": f"no route {method} {path}; use POST /{posts}, "
            "GET /ready, GET /health, GET /metrics"
        }
        allowed = "POST" if path in self.POST_PATHS else "GET, HEAD" if path in GET_PATHS else None
        if allowed is None:
            return json_response(body, status=404)
        response = json_response(body, status=405)
        response.headers["Allow"] = allowed
        return response

    async def post(self, body: bytes) -> Response:
        raise NotImplementedError

    def count_bad(self) -> None:
        """Count a refused request in the replica's metrics."""
        raise NotImplementedError

    def health(self) -> dict:
        raise NotImplementedError
