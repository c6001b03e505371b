"""What both `kernl serve` replicas share (the encoder's KernlServer, the causal LM's
KernlGenerator): the model loads on the replica's worker thread while the replica already
answers, readiness and health say so (503 until loaded, "failed" if the load raised, and
Ray Serve's health check replaces a failed replica), and one router for the GET endpoints."""

from __future__ import annotations

import json
import os
from concurrent.futures import Future

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


class Replica:
    """A subclass sets `config`, `replica`, `stats` and `loading` (the load's Future), and
    gives POST_PATHS, `post(body)` and `health()`."""

    POST_PATHS: tuple[str, ...] = ("/",)
    loading: Future

    def _load_state(self) -> tuple[str, str | None]:
        """("loading" | "failed" | "ready", the load's error if it failed)."""
        if not self.loading.done():
            return "loading", None
        error = self.loading.exception()
        if error is not None:
            return "failed", f"{type(error).__name__}: {error}"
        return "ready", None

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
            return json_response(await self.stats.snapshot.remote())
        if path in self.POST_PATHS and request.method == "POST":
            return await self.post(await request.body())
        posts = " (or " + ", ".join(self.POST_PATHS[1:]) + ")" if len(self.POST_PATHS) > 1 else ""
        return json_response(
            {
                "error": f"no route {request.method} {path}; use POST /{posts}, "
                "GET /ready, GET /health, GET /metrics"
            },
            status=404 if request.method in ("GET", "POST") else 405,
        )

    async def post(self, body: bytes) -> Response:
        raise NotImplementedError

    def health(self) -> dict:
        raise NotImplementedError
