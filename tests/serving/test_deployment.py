"""The Ray Serve application builder (`serve run kernl.serving.deployment:build ...`): typed
arguments, unknown ones refused, batch size defaulting to the largest bucket batch."""

import asyncio
import json
import threading

import pytest

pytest.importorskip("ray", reason="kernl serve's deployment needs Ray Serve (kernl[serve])")

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

    def __init__(self, counters, name):
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
        health = await server(_get("/health"))
        assert health.status_code == 200 and json.loads(health.body)["status"] == "ok"

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


@pytest.mark.parametrize(
    "method, path, status, allow",
    [
        ("GET", "/", 405, "POST"),  # was 404: the route is there, for POST
        ("GET", "/predict", 405, "POST"),
        ("PUT", "/predict/", 405, "POST"),
        ("POST", "/ready", 405, "GET"),
        ("DELETE", "/metrics", 405, "GET"),
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
