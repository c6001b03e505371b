"""The Ray Serve deployment of `kernl serve`: one replica per model copy (per GPU), requests
batched by `@serve.batch` and cut into the artifact's buckets by batching.plan_groups.

Routes (all on the application's route prefix):
    POST /  or  /predict   token ids or text in, outputs out (protocol.py)
    GET  /health           the artifact, its buckets and the batching settings
    GET  /metrics          replays, requests per replay, padding, per bucket and replica

Use it through `kernl serve PATH` / `python -m kernl.serving PATH`, or as a Ray Serve
application builder: `serve run kernl.serving.deployment:build artifact=/path/to/x.kernl`."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from kernl.artifacts import read_manifest

from .batching import measure_costs, plan_groups, run_group, token_costs
from .config import ServeConfig
from .metrics import ReplayStats
from .protocol import ModelLimits, ParsedRequest, RequestError, parse_request, response_body
from .tokenizer import load_tokenizer

# Ray Serve's own default batch size, replaced per replica by the configured one.
_PLACEHOLDER_BATCH = 8
_METRICS_NAMESPACE = "kernl"


def _stats_actor(app_name: str):
    """The application's shared counters, created by whichever replica comes first."""
    actor = ray.remote(num_cpus=0)(ReplayStats)
    return actor.options(
        name=f"kernl-metrics-{app_name}", namespace=_METRICS_NAMESPACE, get_if_exists=True,
        lifetime="detached",
    ).remote()  # fmt: skip


def _json(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


@serve.deployment
class KernlServer:
    def __init__(self, config: ServeConfig):
        import kernl.runtime  # in the replica's process, after Ray has set its GPU

        self.config = config
        device = config.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = kernl.runtime.load(config.artifact, device=device)
        manifest = self.model.manifest
        self.max_batch_size = config.max_batch_size or max(b.batch for b in self.model.buckets)
        self.limits = ModelLimits(
            inputs=manifest.inputs, output_names=self.model.output_names,
            buckets=list(self.model.buckets), vocab_size=_vocab_size(manifest.model_config),
            max_rows=self.max_batch_size,
        )  # fmt: skip
        self.tokenize = load_tokenizer(config.artifact)
        measure = config.plan_by == "time" or (config.plan_by is None and device != "cpu")
        self.costs = (
            measure_costs(self.model) if measure
            else token_costs(self.model.buckets, config.replay_cost_tokens)
        )  # fmt: skip
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.stats = _stats_actor(config.app_name)
        # One thread runs the model, so the event loop keeps queueing the next batch while a
        # replay is in flight.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernl-replay")
        self.handle_batch.set_max_batch_size(self.max_batch_size)
        self.handle_batch.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        prefix = (request.scope.get("root_path") or "").rstrip("/")
        if prefix and path.startswith(prefix):
            path = path[len(prefix) :] or "/"
        if path == "/health" and request.method == "GET":
            return _json(self.health())
        if path == "/metrics" and request.method == "GET":
            return _json(await self.stats.snapshot.remote())
        if path in ("/", "/predict") and request.method == "POST":
            return await self.predict(await request.body())
        return _json(
            {"error": f"no route {request.method} {path}; use POST / (or /predict), "
             "GET /health, GET /metrics"},
            status=404 if request.method in ("GET", "POST") else 405,
        )  # fmt: skip

    async def predict(self, body: bytes) -> Response:
        try:
            parsed = parse_request(body, self.limits, self.tokenize)
        except RequestError as e:
            self.stats.record_requests.remote(bad=1)
            return _json({"error": str(e)}, status=e.status)
        try:
            result = await self.handle_batch(parsed)
        except Exception as e:  # a failed replay fails its batch; the replica keeps serving
            return _json({"error": f"model call failed: {type(e).__name__}: {e}"}, status=500)
        self.stats.record_requests.remote(served=1)
        return _json(result)

    @serve.batch(
        max_batch_size=_PLACEHOLDER_BATCH,
        batch_size_fn=lambda requests: sum(len(r.rows) for r in requests),
    )
    async def handle_batch(self, requests: list[ParsedRequest]) -> list[dict]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.worker, self.serve_requests, requests)

    def serve_requests(self, requests: list[ParsedRequest]) -> list[dict]:
        """Every row of every request, grouped into buckets; one model call per group."""
        rows = [(i, row) for i, r in enumerate(requests) for row in r.rows]
        groups = plan_groups([row.length for _, row in rows], self.model.buckets, self.costs)
        per_row: list[dict | None] = [None] * len(rows)
        replays: list[list[dict]] = [[] for _ in requests]
        for group in groups:
            members = [rows[k] for k in group.rows]
            outputs = run_group(self.model, [row for _, row in members])
            for k, out in zip(group.rows, outputs):
                per_row[k] = out
            served = sorted({i for i, _ in members})
            note = {"bucket": f"{group.bucket.batch}x{group.bucket.seq}",
                    "requests": len(served), "rows": len(members)}  # fmt: skip
            for i in served:
                replays[i].append(note)
            self.stats.record_replay.remote(
                len(served), len(members), sum(row.length for _, row in members),
                note["bucket"], group.bucket.tokens, self.replica,
            )  # fmt: skip
        results, k = [], 0
        for i, request in enumerate(requests):
            mine = per_row[k : k + len(request.rows)]
            k += len(request.rows)
            extra = {"replica": self.replica, "replays": replays[i]}
            results.append(response_body(mine, request, extra))
        return results

    def health(self) -> dict:
        m = self.model.manifest
        return {
            "status": "ok",
            "artifact": os.path.abspath(self.config.artifact),
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
            "max_batch_size": self.max_batch_size,
            "batch_wait_ms": self.config.batch_wait_ms,
            "replica": self.replica,
            "replay_costs": {f"{b.batch}x{b.seq}": c for b, c in sorted(self.costs.items())},
        }


def application(config: ServeConfig):
    """The bound Ray Serve application for `config`: replicas, resources, request limits."""
    if config.max_batch_size is None:
        buckets = read_manifest(config.artifact).bucket_list()
        config = replace(config, max_batch_size=max(b.batch for b in buckets))
    on_gpu = config.device == "cuda" or (config.device is None and _cluster_has_gpus())
    gpus = config.gpus_per_replica if config.gpus_per_replica is not None else float(on_gpu)
    # A replica holds one running batch and one filling: more ongoing requests than two
    # batches only queue inside the replica, where another replica could have taken them.
    max_rows = config.max_batch_size
    return KernlServer.options(
        name="KernlServer", num_replicas=config.replicas,
        ray_actor_options={"num_gpus": gpus, "num_cpus": config.cpus_per_replica},
        max_ongoing_requests=max(2 * max_rows, 16),
    ).bind(config)  # fmt: skip


def build(args: dict[str, str]):
    """Application builder for `serve run kernl.serving.deployment:build artifact=PATH
    [replicas=N max_batch_size=N batch_wait_ms=F device=cpu|cuda]`."""
    kinds = {"replicas": int, "max_batch_size": int, "batch_wait_ms": float,
             "gpus_per_replica": float, "cpus_per_replica": float, "replay_cost_tokens": int,
             "plan_by": str}  # fmt: skip
    fields = set(asdict(ServeConfig(artifact="")).keys())
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; known: {sorted(fields)}")
    return application(ServeConfig(**{k: kinds.get(k, str)(v) for k, v in args.items()}))


def _cluster_has_gpus() -> bool:
    try:
        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    except Exception:
        return False


def _vocab_size(config: dict) -> int | None:
    v = config.get("vocab_size")
    return v if isinstance(v, int) else None
