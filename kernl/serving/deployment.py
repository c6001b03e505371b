"""The Ray Serve deployment of `kernl serve`: one replica per model copy (per GPU), requests
gathered into batches when the model is free (gather.BatchGatherer, not `@serve.batch`, which
closes a batch on a timer while the previous one runs) and cut into the artifact's buckets by
batching.plan_groups.

Routes (all on the application's route prefix):
    POST /  or  /predict   token ids or text in, outputs out (protocol.py)
    GET  /ready            readiness: 200 once the answering replica has its model loaded,
                           503 {"ready": false, "status": "loading"} before (or "failed")
    GET  /health           the artifact, its buckets and the batching settings (503 until
                           the model is loaded, like /ready)
    GET  /metrics          replays, requests per replay, padding, per bucket and replica

A replica loads its model in the background: Ray Serve routes to it as soon as it is
constructed, so /ready and /health answer 503 during the load instead of leaving the caller
waiting, and a request that arrives meanwhile is checked at once and then waits for the model.
Before Ray Serve has deployed the application at all, its ingress (HAProxy or Ray's Python
proxy: ingress.py) answers every path with a plain-text 404 (and its own GET /-/healthz with
503): a readiness probe treats anything but a 200 from /ready as "not ready".

Use it through `kernl serve PATH` / `python -m kernl.serving PATH`, or as a Ray Serve
application builder: `serve run kernl.serving.deployment:build artifact=/path/to/x.kernl`."""

from __future__ import annotations

import os
import socket
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import ray
from ray import serve
from starlette.responses import Response

from kernl.artifacts import read_manifest

from .batching import measure_costs, token_costs
from .config import ServeConfig, config_from_args
from .device import replica_device
from .encoder import Replay, serve_batch_bytes
from .gather import BatchGatherer
from .generation_protocol import GENERATION_TASKS, GenerationLimits, check_servable
from .metrics import ReplayStats
from .pooling import POOLED, POOLING_MODES
from .protocol import (
    ModelLimits,
    ParsedRequest,
    RequestError,
    parse_off_loop,
    parse_request,
    prepare_answers,
)
from .replica import ENCODER_COUNTERS, Replica, SharedStats, artifact_identity
from .replica import json_response as _json
from .tokenizer import load_tokenizer


@serve.deployment
class KernlServer(Replica):
    POST_PATHS = ("/", "/predict")

    def __init__(self, config: ServeConfig, instance: str | None = None):
        # Only what the manifest says is read here (milliseconds): requests are checked from
        # the replica's first moment, and the model loads in the background (_load).
        self.config = config
        manifest = read_manifest(config.artifact)
        self.manifest = manifest
        self.max_batch_size = config.max_batch_size or max(b.batch for b in manifest.bucket_list())
        self.limits = ModelLimits.from_manifest(manifest, max_rows=self.max_batch_size)
        self.tokenize = load_tokenizer(config.artifact)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        # `instance`: this deployment's, drawn by application(): its own counters
        self.stats = SharedStats(
            ReplayStats, ENCODER_COUNTERS.format(app=config.app_name), instance
        )
        self.model = None
        self.costs: dict = {}
        # One thread loads and then runs the model, so the event loop keeps answering (503
        # while loading) and keeps queueing the next batch while a replay is in flight.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernl-replay")
        self.loading: Future = self.worker.submit(self._load)
        self.gather = BatchGatherer(
            self.serve_requests,
            self.worker,
            self.max_batch_size,
            rows_of=lambda request: len(request.rows),
            wait_s=config.wait_s(generation=False),
        )

    def _load(self) -> None:
        import kernl.runtime  # in the replica's process, after Ray has set its GPU

        device = replica_device(self.config.device)
        model = kernl.runtime.load(self.config.artifact, device=device)
        measure = self.config.plan_by == "time" or (self.config.plan_by is None and device != "cpu")
        self.costs = (
            measure_costs(model)
            if measure
            else token_costs(model.buckets, self.config.replay_cost_tokens)
        )
        prepare_answers([o.dtype for o in model.manifest.outputs])
        self.model = model  # last: a set model means a ready replica

    async def post(self, body: bytes) -> Response:
        return await self.predict(body)

    def count_bad(self) -> None:
        self.stats.send("record_requests", bad=1)

    async def predict(self, body: bytes) -> Response:
        try:
            parsed = await parse_off_loop(parse_request, body, self.limits, self.tokenize)
        except RequestError as e:
            self.count_bad()
            return _json({"error": str(e)}, status=e.status)
        try:
            await self.loaded()  # a request during the load waits for it
        except Exception as e:
            return _json({"error": f"model failed to load: {type(e).__name__}: {e}"}, status=503)
        try:
            result = await self.gather.submit(parsed)
        except Exception as e:  # a failed replay fails its batch; the replica keeps serving
            return _json({"error": f"model call failed: {type(e).__name__}: {e}"}, status=500)
        self.stats.send("record_requests", served=1)
        return Response(result, media_type="application/json")  # encoded on the worker thread

    def serve_requests(self, requests: list[ParsedRequest]) -> list[bytes]:
        """Every row of every request, grouped into buckets; one model call per group; the
        answers encoded to JSON bytes here, off the event loop."""

        def record(r: Replay) -> None:
            self.stats.send(
                "record_replay",
                r.requests,
                r.rows,
                r.tokens,
                r.bucket,
                r.bucket_tokens,
                self.replica,
            )

        try:
            return serve_batch_bytes(
                self.model, requests, self.costs, {"replica": self.replica}, record
            )
        except Exception:
            self.note_failed_call()  # on the worker thread: no other call runs
            raise

    def health(self) -> dict:
        m = self.model.manifest
        return {
            "status": "ok",
            "ready": True,
            "artifact": self.config.artifact_path(),
            **artifact_identity(m),
            "model_type": m.model_type,
            "task": m.task,
            "dtype": m.dtype,
            "device": str(self.model.device),
            "target": m.target,
            "gpu_name": m.gpu_name,
            "buckets": [[b.batch, b.seq] for b in sorted(self.model.buckets)],
            "inputs": self.model.input_names,
            "outputs": self.model.output_names,
            "text": self.tokenize is not None,
            "pooling": list(POOLING_MODES) if POOLED in self.model.output_names else [],
            "max_batch_size": self.max_batch_size,
            "batch_wait_ms": 1000 * self.gather.wait_s,
            "replica": self.replica,
            "replay_costs": {f"{b.batch}x{b.seq}": c for b, c in sorted(self.costs.items())},
        }


def application(config: ServeConfig, deployment=None):
    """The bound Ray Serve application for `config`: replicas, resources, request limits.
    A causal-LM or text encoder-decoder artifact is served by generation.KernlGenerator
    (Whisper's is refused: check_servable), anything else by
    KernlServer (`deployment`: a Ray Serve deployment of a subclass of that class instead,
    with the same options; benchmarks/bench_serving_ray_overhead.py puts a stub model behind
    the real routes, parsing and batching this way)."""
    manifest = read_manifest(config.artifact)
    check_servable(manifest)
    # One per deployment, shared by its replicas: the name of its counters (SharedStats), so
    # a new deployment's /metrics starts from zero.
    instance = uuid.uuid4().hex[:12]
    if config.gpus_per_replica is not None:
        gpus = config.gpus_per_replica
    else:
        gpus = float(replicas_need_gpus(config, manifest))
    if manifest.task in GENERATION_TASKS:
        from .generation import KernlGenerator

        # A replica holds one running batch and the next one gathering (each up to the
        # largest batch bucket): more would only queue inside the replica, where another
        # replica could have taken them.
        largest = max(GenerationLimits.from_manifest(manifest).batches)
        rows = min(config.max_batch_size or largest, largest)
        generator = deployment or KernlGenerator
        return generator.options(
            name="KernlGenerator",
            num_replicas=config.replicas,
            ray_actor_options={"num_gpus": gpus, "num_cpus": config.cpus_per_replica},
            max_ongoing_requests=max(2 * rows, 8),
            **draining(config),
        ).bind(config, instance)
    if config.max_batch_size is None:
        buckets = manifest.bucket_list()
        config = replace(config, max_batch_size=max(b.batch for b in buckets))
    # A replica holds one running batch and one filling: more ongoing requests than two
    # batches only queue inside the replica, where another replica could have taken them.
    # (Behind HAProxy, Ray queues a request past this limit in the replica HAProxy picked,
    # the one with the fewest open requests, instead of in its Python proxy.)
    max_rows = config.max_batch_size
    server = deployment or KernlServer
    return server.options(
        name="KernlServer",
        num_replicas=config.replicas,
        ray_actor_options={"num_gpus": gpus, "num_cpus": config.cpus_per_replica},
        max_ongoing_requests=max(2 * max_rows, 16),
        **draining(config),
    ).bind(config, instance)


def draining(config: ServeConfig) -> dict:
    """A stopping replica waits for its requests in flight, checking every `wait_loop_s` (at
    most config.drain_s; Ray's default wait, 2 s, would hold even an idle replica that long)."""
    return {
        "graceful_shutdown_timeout_s": config.drain_s,
        "graceful_shutdown_wait_loop_s": min(0.2, config.drain_s) or 0.01,
    }


def build(args: dict[str, str]):
    """Application builder for `serve run kernl.serving.deployment:build artifact=PATH
    [replicas=N max_batch_size=N batch_wait_ms=F join=true|false device=cpu|cuda ...]`: any
    ServeConfig field, each value parsed as its type (config.config_from_args)."""
    return application(config_from_args(args))


def replicas_need_gpus(config: ServeConfig, manifest) -> bool:
    """Whether each replica asks Ray for a GPU (unless `gpus_per_replica` says how much): the
    configured device, else none for an artifact compiled for the CPU (the runtime refuses it
    on a GPU), else one when the Ray cluster has GPUs.

    `serve run kernl.serving.deployment:build ...` calls this builder before it connects to
    Ray, so there is no cluster to ask (every replica was given no GPU, and Ray hid the GPUs
    from it). Connecting here (`ray.init(address="auto")`) would pre-empt `serve run`'s own
    `ray.init`, and the application would lose the `--address`, namespace and runtime
    environment (`--working-dir`, `--runtime-env`) it passes. So without a connected Ray the
    artifact decides: one compiled for CUDA with kernel binaries (which run on nothing else)
    asks for a GPU; one without binaries, which a CPU can run too, asks for one when this
    machine has a GPU. Not the driver's GPU alone: `serve run` often runs on a head node
    without GPUs, for GPU workers. `device=` or `gpus_per_replica=` overrides either."""
    if config.device is not None:
        return config.device == "cuda"
    if manifest.target == "cpu":
        return False
    if ray.is_initialized():
        return _cluster_has_gpus()
    import torch

    return bool(manifest.kernels) or torch.cuda.is_available()


def _cluster_has_gpus() -> bool:
    try:
        return ray.cluster_resources().get("GPU", 0) > 0
    except Exception:
        return False
