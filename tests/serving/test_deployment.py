"""The Ray Serve application builder (`serve run kernl.serving.deployment:build ...`): typed
arguments, unknown ones refused, batch size defaulting to the largest bucket batch."""

import asyncio
import json
import threading
import time

import pytest

pytest.importorskip("ray", reason="kernl serve's deployment needs Ray Serve (kernl[serve])")

from kernl.artifacts import read_manifest  # noqa: E402
from kernl.artifacts.schema import KernelBinary  # noqa: E402
from kernl.serving.config import ServeConfig  # noqa: E402
from kernl.serving.deployment import build  # noqa: E402


def test_builder_types_arguments_and_defaults_batch_size(tiny_artifact):
    app = build(
        {"artifact": str(tiny_artifact), "replicas": "2", "batch_wait_ms": "3.5", "device": "cpu"}
    )
    deployment = app._bound_deployment
    config = app._bound_deployment.init_args[0]
    assert deployment.num_replicas == 2
    assert config.batch_wait_ms == 3.5 and config.max_batch_size == 8
    assert deployment.ray_actor_options["num_gpus"] == 0
    assert deployment.max_ongoing_requests == 16


def test_builder_parses_booleans_and_integers(tiny_artifact):
    """`serve run ... join=false port=8001`: join was left on ("false" is a true string) and
    port a string (a TypeError)."""
    app = build({"artifact": str(tiny_artifact), "join": "false", "port": "8001"})
    config = app._bound_deployment.init_args[0]
    assert config.join is False and config.port == 8001
    with pytest.raises(ValueError, match="join='off': expected true or false"):
        build({"artifact": str(tiny_artifact), "join": "off"})


def _num_gpus(app) -> float:
    return app._bound_deployment.ray_actor_options["num_gpus"]


@pytest.fixture
def built_for(monkeypatch, tiny_artifact):
    """Makes the builder read the tiny artifact's manifest as if compiled for `target`."""
    from dataclasses import replace

    import kernl.serving.deployment as dep

    def make(target: str, kernels: bool):
        manifest = dep.read_manifest(tiny_artifact)
        binary = KernelBinary(name="k", file="k.cubin", function="k", num_warps=4, shared_mem=0)
        fake = replace(manifest, target=target, kernels=[binary] if kernels else [])
        monkeypatch.setattr(dep, "read_manifest", lambda path: fake)

    return make


@pytest.mark.parametrize("kernels", [True, False])
def test_serve_run_gives_a_cuda_artifact_a_gpu_before_ray_is_initialised(
    built_for, tiny_artifact, monkeypatch, kernels
):
    """`serve run kernl.serving.deployment:build artifact=...` calls the builder before
    ray.init: every replica was given 0 GPUs (Ray then hid the GPUs from it) even on a GPU
    cluster. An artifact with kernel binaries asks for a GPU whatever the driver has; one
    without binaries follows the driver's GPU."""
    import ray
    import torch

    built_for("cuda", kernels)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only head node
    assert _num_gpus(build({"artifact": str(tiny_artifact)})) == float(kernels)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _num_gpus(build({"artifact": str(tiny_artifact)})) == 1.0
    # the configuration still decides when it says
    assert _num_gpus(build({"artifact": str(tiny_artifact), "device": "cpu"})) == 0.0
    assert _num_gpus(build({"artifact": str(tiny_artifact), "gpus_per_replica": "0.5"})) == 0.5


@pytest.mark.parametrize("gpus", [0.0, 8.0])
def test_a_connected_cluster_decides_for_a_cuda_artifact(
    built_for, tiny_artifact, monkeypatch, gpus
):
    import ray

    built_for("cuda", kernels=True)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": gpus})
    assert _num_gpus(build({"artifact": str(tiny_artifact)})) == float(gpus > 0)


def test_a_cpu_artifact_asks_for_no_gpu_on_a_gpu_cluster(built_for, tiny_artifact, monkeypatch):
    """The runtime refuses an artifact compiled for the CPU on a GPU: a replica given one
    loaded it on CUDA and failed."""
    import ray
    import torch

    built_for("cpu", kernels=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for initialised in (True, False):
        monkeypatch.setattr(ray, "is_initialized", lambda: initialised)
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
        assert _num_gpus(build({"artifact": str(tiny_artifact)})) == 0.0
    assert _num_gpus(build({"artifact": str(tiny_artifact), "device": "cuda"})) == 1.0


def test_each_deployment_counts_in_an_actor_of_its_own(tiny_artifact, monkeypatch):
    """The replicas' counters actor was named per application and detached: it outlived
    the application, and a new deployment of it (the next `kernl serve` on a long-lived
    cluster) showed the previous one's counts. Each deployment now has its own, shared by
    its replicas (named alike, made once by Ray's get_if_exists)."""
    from types import SimpleNamespace

    import ray

    import kernl.serving.deployment as dep

    made = []

    class Remote:  # ray.remote(num_cpus=0)(cls), without a cluster
        def __init__(self, cls):
            pass

        def options(self, **options):
            made.append(options)
            return SimpleNamespace(remote=lambda *args: SimpleNamespace())

    monkeypatch.setattr(ray, "remote", lambda **_: Remote)
    monkeypatch.setattr(dep.KernlServer.func_or_class, "_load", lambda self: None)
    config = ServeConfig(artifact=str(tiny_artifact), device="cpu", plan_by="tokens")
    for _ in range(2):  # two deployments of the application "kernl", two replicas each
        bound = dep.application(config)._bound_deployment
        for _ in range(2):
            replica = bound.func_or_class(*bound.init_args, **bound.init_kwargs)
            replica.worker.shutdown(wait=True)
    first, first_too, second, second_too = [o["name"] for o in made]
    assert first == first_too and second == second_too  # one actor per deployment
    assert first != second  # a new deployment counts from zero
    assert first.startswith("kernl-metrics-kernl@") and second.startswith("kernl-metrics-kernl@")
    assert all(o["get_if_exists"] and o["lifetime"] == "detached" for o in made)


def test_counters_actors_of_an_application_are_told_apart_by_name():
    from kernl.serving.replica import counters_of

    entries = [
        {"namespace": "kernl", "name": "kernl-metrics-kernl@aaa"},
        {"namespace": "kernl", "name": "kernl-metrics-kernl@bbb"},
        {"namespace": "kernl", "name": "kernl-generation-metrics-kernl@ccc"},
        {"namespace": "kernl", "name": "kernl-metrics-kernl-2@ddd"},  # application kernl-2
        {"namespace": "kernl", "name": "kernl-metrics-kernl@x@eee"},  # application kernl@x
        {"namespace": "kernl", "name": "kernl-metrics-kernl@"},
        {"namespace": "other", "name": "kernl-metrics-kernl@fff"},
    ]
    family = "kernl-metrics-kernl"
    assert counters_of(entries, [family]) == [
        "kernl-metrics-kernl@aaa",
        "kernl-metrics-kernl@bbb",
    ]
    assert counters_of(entries, [family], keep="kernl-metrics-kernl@bbb") == [
        "kernl-metrics-kernl@aaa"
    ]
    both = [family, "kernl-generation-metrics-kernl"]
    assert len(counters_of(entries, both)) == 3
    assert counters_of(entries, ["kernl-metrics-kernl@x"]) == ["kernl-metrics-kernl@x@eee"]


def test_a_retired_counters_actor_waits_until_its_replicas_stop_calling(monkeypatch):
    import time

    import kernl.serving.replica as replica
    from kernl.serving.metrics import ReplayStats

    exited = threading.Event()
    monkeypatch.setattr(replica, "_exit_actor", exited.set)
    counters = replica._counting_in_batches(ReplayStats)()
    counters.retire(0.3)
    counters.retire(0.3)  # asked again by another deployment: one wait
    deadline = time.monotonic() + 0.9
    while time.monotonic() < deadline:  # a replica still draining: counting, snapshots
        counters.apply_calls([("record_requests", (), {"served": 1})])
        assert counters.snapshot()["requests"] >= 1
        assert not exited.is_set()
        time.sleep(0.05)
    assert exited.wait(10)


def test_builder_refuses_unknown_arguments(tiny_artifact):
    with pytest.raises(ValueError, match="unknown argument"):
        build({"artifact": str(tiny_artifact), "replica": "2"})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"replicas": 0},
        {"max_batch_size": 0},
        {"batch_wait_ms": -1},
        {"device": "tpu"},
        {"plan_by": "guess"},
    ],
)
def test_config_refuses_bad_values(kwargs):
    with pytest.raises(ValueError):
        ServeConfig(artifact="x", **kwargs)


class _Stats:
    """Stands in for the replica's SharedStats (a Ray actor of shared counters)."""

    def __init__(self, counters, family, instance=None):
        self.sent = []

    def send(self, method, *args, **kwargs):
        self.sent.append(method)

    async def snapshot(self):
        return {}


def _get(path, method="GET"):
    from starlette.requests import Request

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "headers": [],
        "query_string": b"",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
    }
    return Request(scope)


def test_replica_answers_503_while_its_model_loads(tiny_artifact, monkeypatch):
    """The replica is constructed at once and loads in the background: /ready and /health
    say 503 "loading" until the model is there (Ray Serve routes to a constructed replica,
    so a blocking load left callers hanging, and before the deploy its proxy said 404)."""
    import kernl.runtime
    import kernl.serving.deployment as dep

    release = threading.Event()
    real_load = kernl.runtime.load

    def slow_load(*args, **kwargs):
        assert release.wait(60)  # the test opens the gate; never reached on a passing run
        return real_load(*args, **kwargs)

    monkeypatch.setattr(kernl.runtime, "load", slow_load)
    monkeypatch.setattr(dep, "SharedStats", _Stats)
    config = ServeConfig(artifact=str(tiny_artifact), device="cpu", plan_by="tokens")
    server = dep.KernlServer.func_or_class(config)

    async def scenario():
        for path in ("/ready", "/health"):
            answer = await server(_get(path))
            body = json.loads(answer.body)
            assert answer.status_code == 503 and body["status"] == "loading", body
            assert body["ready"] is False
        # A bad request is refused at once, model or not.
        bad = await server.predict(b'{"input_ids": [1, 2], "token_type_ids": [0, 9]}')
        assert bad.status_code == 422
        # A good one waits for the model, then is served.
        pending = asyncio.ensure_future(server.predict(b'{"input_ids": [5, 6, 7]}'))
        await asyncio.sleep(0)
        assert not pending.done()
        release.set()
        answer = await asyncio.wait_for(pending, 60)
        assert answer.status_code == 200, answer.body
        ready = await server(_get("/ready"))
        assert ready.status_code == 200 and json.loads(ready.body)["ready"] is True
        for path in ("/ready", "/health"):  # HEAD wherever GET is (RFC 9110): probes use it
            assert (await server(_get(path, "HEAD"))).status_code == 200
        health = await server(_get("/health"))
        assert health.status_code == 200 and json.loads(health.body)["status"] == "ok"
        # which build it serves, not only the path (a linked folder swapped blue/green)
        manifest = read_manifest(tiny_artifact)
        body = json.loads(health.body)
        assert body["artifact_id"] == manifest.extra["manifest_sha256"][:16]
        assert body["artifact_created_at"] == manifest.created_at

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        server.worker.shutdown(wait=True)
    server.check_health()  # loaded: healthy


def test_a_failed_load_is_reported_and_fails_the_health_check(tiny_artifact, monkeypatch):
    import kernl.runtime
    import kernl.serving.deployment as dep

    def broken_load(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(kernl.runtime, "load", broken_load)
    monkeypatch.setattr(dep, "SharedStats", _Stats)
    server = dep.KernlServer.func_or_class(ServeConfig(artifact=str(tiny_artifact), device="cpu"))
    server.worker.shutdown(wait=True)  # the load has run (and failed)

    async def scenario():
        ready = await server(_get("/ready"))
        assert ready.status_code == 503
        assert json.loads(ready.body)["status"] == "failed"
        assert "CUDA out of memory" in json.loads(ready.body)["error"]
        answer = await server.predict(b'{"input_ids": [5, 6, 7]}')
        assert answer.status_code == 503 and b"failed to load" in answer.body

    asyncio.run(scenario())
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        server.check_health()  # Ray Serve replaces the replica


STICKY = "CUDA error: an illegal memory access was encountered"


def _sticky_cuda(monkeypatch, sticky: bool) -> list:
    """torch.cuda.synchronize as after a kernel's illegal address (`sticky`: every later
    CUDA call fails with it) or as on a usable GPU; returns the devices it was asked for."""
    import torch

    asked = []

    def synchronize(device=None):
        asked.append(device)
        if sticky:
            raise RuntimeError(STICKY)

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    return asked


@pytest.mark.parametrize("sticky", [True, False])
def test_a_replica_whose_gpu_a_kernel_broke_fails_its_health_check(
    tiny_artifact, monkeypatch, sticky
):
    """After a sticky CUDA error every batch failed with a 500, and Ray Serve kept the
    replica: its health check only looked at the load. A failed call now asks the device;
    one whose context is broken fails the health check (Ray Serve replaces the replica),
    one that failed for another reason does not."""
    import torch

    import kernl.serving.deployment as dep

    monkeypatch.setattr(dep, "SharedStats", _Stats)
    config = ServeConfig(artifact=str(tiny_artifact), device="cpu", plan_by="tokens")
    server = dep.KernlServer.func_or_class(config)
    server.loading.result(timeout=120)
    asked = _sticky_cuda(monkeypatch, sticky)

    def failing(*args, **kwargs):
        raise RuntimeError(STICKY if sticky else "a bug, not the GPU")

    monkeypatch.setattr(dep, "serve_batch_bytes", failing)
    try:
        server.model.device = torch.device("cuda", 0)  # as a replica on a GPU sees it
        answer = asyncio.run(server.predict(b'{"input_ids": [5, 6, 7]}'))
        assert answer.status_code == 500, answer.body
    finally:
        server.worker.shutdown(wait=True)
    assert asked == [torch.device("cuda", 0)]
    if sticky:
        with pytest.raises(RuntimeError, match="GPU can run nothing more: CUDA error: an ill"):
            server.check_health()
    else:
        server.check_health()


def test_a_failed_call_on_the_cpu_asks_no_gpu(tiny_artifact, monkeypatch):
    import kernl.serving.deployment as dep

    monkeypatch.setattr(dep, "SharedStats", _Stats)
    server = dep.KernlServer.func_or_class(
        ServeConfig(artifact=str(tiny_artifact), device="cpu", plan_by="tokens")
    )
    server.loading.result(timeout=120)
    asked = _sticky_cuda(monkeypatch, sticky=True)
    monkeypatch.setattr(dep, "serve_batch_bytes", lambda *a, **k: 1 / 0)
    try:
        answer = asyncio.run(server.predict(b'{"input_ids": [5, 6, 7]}'))
    finally:
        server.worker.shutdown(wait=True)
    assert answer.status_code == 500 and asked == []
    server.check_health()


def test_a_generation_replica_whose_gpu_a_kernel_broke_fails_its_health_check(monkeypatch):
    from concurrent.futures import Future
    from types import SimpleNamespace

    import torch

    from kernl.serving.generation import KernlGenerator
    from kernl.serving.generation_batcher import BatchRecord

    generator = KernlGenerator.func_or_class.__new__(KernlGenerator.func_or_class)
    generator.config, generator.replica = ServeConfig(artifact="x"), "r"
    generator.stats = _Stats(None, "family")
    generator.model = SimpleNamespace(device=torch.device("cuda", 0))
    generator.loading = Future()
    generator.loading.set_result(None)
    asked = _sticky_cuda(monkeypatch, sticky=True)
    generator._record_batch(BatchRecord(0, 1, "generate", waits_s=[0.0]))  # served
    assert asked == []
    generator.check_health()
    generator._record_batch(BatchRecord(1, 1, "generate", waits_s=[0.0], error=STICKY))
    with pytest.raises(RuntimeError, match="GPU can run nothing more"):
        generator.check_health()


@pytest.mark.parametrize(
    "method, path, status, allow",
    [
        ("GET", "/", 405, "POST"),  # was 404: the route is there, for POST
        ("GET", "/predict", 405, "POST"),
        ("PUT", "/predict/", 405, "POST"),
        ("POST", "/ready", 405, "GET, HEAD"),
        ("DELETE", "/metrics", 405, "GET, HEAD"),
        ("HEAD", "/predict", 405, "POST"),
        ("GET", "/nope", 404, None),
        ("DELETE", "/nope", 404, None),
    ],
)
def test_a_wrong_method_gets_405_with_allow_and_an_unknown_path_404(method, path, status, allow):
    """RFC 9110: a 405 names the methods the route takes in `Allow`."""
    from concurrent.futures import Future

    from kernl.serving.replica import Replica

    class Routes(Replica):
        POST_PATHS = ("/", "/predict")
        replica = "test"
        config = ServeConfig(artifact="x")

    server = Routes()
    server.loading = Future()
    answer = asyncio.run(server(_get(path, method)))
    assert answer.status_code == status, answer.body
    assert answer.headers.get("Allow") == allow
    assert "use POST /" in json.loads(answer.body)["error"]


def _post(chunks, content_length=None, stall=False):
    """A POST whose body arrives in `chunks`, then (`stall`) nothing more, never ending."""
    from starlette.requests import Request

    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    scope = dict(_get("/").scope, method="POST", headers=headers)
    pending = list(chunks)

    async def receive():
        if pending:
            return {"type": "http.request", "body": pending.pop(0), "more_body": True}
        if stall:
            await asyncio.Event().wait()  # a client that went quiet mid-upload
        return {"type": "http.request", "body": b"", "more_body": False}

    return Request(scope, receive)


def test_a_body_is_cut_off_when_it_stalls_or_passes_the_limit():
    """Ray Serve counts a request against the replica's slots from its headers: a body read
    with no deadline let clients that stalled mid-upload hold every slot (/ready included),
    and a body was buffered whole before its size was checked (review)."""
    from kernl.serving.protocol import RequestError
    from kernl.serving.replica import read_body

    async def scenario():
        body = await read_body(_post([b'{"input_ids"', b": [1, 2]}"]), limit=100)
        assert body == b'{"input_ids": [1, 2]}'
        with pytest.raises(RequestError) as refused:
            await read_body(_post([b"x" * 60, b"x" * 60]), limit=100)
        assert refused.value.status == 413
        never_read = _post([], content_length=10**9, stall=True)  # refused from its header
        with pytest.raises(RequestError) as refused:
            await asyncio.wait_for(read_body(never_read, limit=100), 5)
        assert refused.value.status == 413
        start = time.monotonic()
        with pytest.raises(RequestError) as refused:
            await read_body(_post([b'{"input_'], stall=True), limit=100, deadline_s=0.2)
        assert refused.value.status == 408 and "8 bytes came" in str(refused.value)
        assert time.monotonic() - start < 5

    asyncio.run(scenario())


def test_the_replica_answers_a_stalled_upload_with_408(tiny_artifact, monkeypatch):
    import kernl.serving.deployment as dep
    import kernl.serving.replica as replica

    monkeypatch.setattr(dep, "SharedStats", _Stats)
    monkeypatch.setattr(replica, "BODY_DEADLINE_S", 0.2)
    config = ServeConfig(artifact=str(tiny_artifact), device="cpu", plan_by="tokens")
    server = dep.KernlServer.func_or_class(config)

    async def scenario():
        await server.loaded()
        answer = await server(_post([b'{"input_ids": [5,'], stall=True))
        assert answer.status_code == 408, answer.body
        assert "not received within" in json.loads(answer.body)["error"]
        answer = await server(_post([b'{"input_ids": [5, 6, 7]}']))
        assert answer.status_code == 200, answer.body

    try:
        asyncio.run(scenario())
    finally:
        server.worker.shutdown(wait=True)
    assert server.stats.sent.count("record_requests") >= 2  # the refusal counted as bad
