"""`kernl serve` for causal-LM artifacts (manifest.task == "causal-lm"): generation over HTTP.

Request (POST /, or /predict): a JSON object
    {"input_ids": [1, 15, 27], "max_new_tokens": 32}            token ids of one prompt
    {"text": "hello", "do_sample": true, "temperature": 0.8,     text, when the artifact
     "top_k": 40, "top_p": 0.9, "seed": 7, "eos_token_id": 2}    folder has tokenizer.json
    ... "stream": true                                           server-sent events
Answer without "stream": {"generated_ids": [...], "text": "...", "finish_reason": "eos" |
"length", "prompt_tokens": n, "replica": "..."} ("text" only with a tokenizer). With
"stream": true, `text/event-stream`: one `data: {"index": k, "token_id": t[, "text": "..."]}`
event per generated token, then `data: [DONE]` (OpenAI's convention); a model failure after
the first event ends the stream with `data: {"error": "..."}` and no [DONE].

Concurrency: one request at a time per replica (an asyncio lock taken in arrival order), each
generated alone in the batch-1 bucket; the answers equal `model.generate` on that prompt.
A streaming client that disconnects stops its generation at the next step (the runtime's
stream iterator is closed, which releases the model); a non-streaming request runs to its end.

Every check happens on arrival (before the model is loaded, if need be), so a bad request
gets a 4xx naming the field and the limit, and the replica keeps serving."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from kernl.artifacts import read_manifest
from kernl.artifacts.generation import GenerationBuckets
from kernl.artifacts.schema import Manifest, pick_size

from .config import ServeConfig
from .metrics import GenerationStats
from .protocol import RequestError, Tokenize, load_json_object
from .tokenizer import load_detokenizer, load_tokenizer

DEFAULT_MAX_NEW_TOKENS = 20  # the runtime's (and Hugging Face's) default
# name -> (what the value must be, the check); ranges are the runtime's check_options.
_OPTIONS: dict[str, tuple[str, Callable]] = {
    "max_new_tokens": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "do_sample": ("true or false", lambda v: isinstance(v, bool)),
    "temperature": ("a number", lambda v: _is_number(v)),
    "top_k": ("an integer (0: off)", lambda v: _is_int(v)),
    "top_p": ("a number in (0, 1]", lambda v: _is_number(v)),
    "seed": ("an integer in [0, 2**63)", lambda v: _is_int(v)),
    "eos_token_id": (
        "a token id, a list of token ids, or null",
        lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))),
    ),
}
FIELDS = ("input_ids", "text", "stream", *_OPTIONS)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class GenerationLimits:
    """What a generation request is checked against, from the manifest alone."""

    vocab_size: int
    prompts: list[int]  # prompt (prefill) buckets
    cache_len: int  # KV cache slots per row
    eos_token_ids: list[int]

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> GenerationLimits:
        decoder = manifest.extra["decoder"]
        buckets = GenerationBuckets.from_dict(manifest.extra["generation_buckets"])
        return cls(
            vocab_size=int(decoder["vocab_size"]),
            prompts=sorted(buckets.prompts),
            cache_len=buckets.cache_len,
            eos_token_ids=list(decoder.get("eos_token_ids") or []),
        )


@dataclass(frozen=True)
class GenerationRequest:
    prompt: list[int]
    options: dict  # keyword arguments of generate()/stream()
    stream: bool


def parse_generation_request(
    body: bytes, limits: GenerationLimits, tokenize: Tokenize | None = None
) -> GenerationRequest:
    """Parse and check a generation request; RequestError 400 (not JSON), 413 (a prompt
    longer than every prompt bucket, or more new tokens than the KV cache holds after it) or
    422 (unknown, missing or mistyped fields, values out of range)."""
    data = load_json_object(body)
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RequestError(
            422, f"unknown field(s) {unknown}; a generation request takes {list(FIELDS)}"
        )
    prompt = _prompt(data, limits, tokenize)
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(422, f"'stream' must be true or false, got {stream!r}")
    options = {}
    for name, (what, ok) in _OPTIONS.items():
        if name in data:
            if not ok(data[name]):
                raise RequestError(422, f"'{name}' must be {what}, got {data[name]!r}")
            options[name] = data[name]
    _check_ranges(options, limits)
    _check_fits(prompt, options, limits)
    options.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    return GenerationRequest(prompt, options, stream)


def _check_ranges(options: dict, limits: GenerationLimits) -> None:
    """The runtime's own range checks, before the model is loaded, where the runtime exports
    them (check_options); otherwise its generate()/stream() raise the same ValueError at call
    time, which the server answers with the same 422."""
    try:
        from kernl.runtime.generation.model import check_options
    except ImportError:
        return
    defaults = {
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
        "do_sample": False,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
        "eos_token_id": None,
        "seed": 0,
    }
    o = {**defaults, **options}
    try:
        check_options(
            o["max_new_tokens"],
            o["do_sample"],
            o["temperature"],
            o["top_k"],
            o["top_p"],
            o["eos_token_id"],
            None,
            o["seed"],
            limits.vocab_size,
        )
    except ValueError as e:
        raise RequestError(422, str(e)) from None


def _check_fits(prompt: list[int], options: dict, limits: GenerationLimits) -> None:
    o = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, **options}
    bucket = pick_size(limits.prompts, len(prompt))
    if bucket is None:
        raise RequestError(
            413,
            f"the prompt has {len(prompt)} tokens, longer than every prompt bucket of this "
            f"artifact ({limits.prompts}); at most {limits.prompts[-1]}",
        )
    fit = limits.cache_len - bucket + 1
    if o["max_new_tokens"] > fit:
        raise RequestError(
            413,
            f"max_new_tokens {o['max_new_tokens']} does not fit the KV cache of "
            f"{limits.cache_len} slots after a prompt of {len(prompt)} tokens (prompt bucket "
            f"{bucket}): at most {fit} new tokens",
        )


def _prompt(data: dict, limits: GenerationLimits, tokenize: Tokenize | None) -> list[int]:
    if "text" in data:
        if "input_ids" in data:
            raise RequestError(422, "send either 'text' or 'input_ids', not both")
        if tokenize is None:
            raise RequestError(
                422,
                "this artifact carries no tokenizer (tokenizer.json next to "
                "manifest.msgpack, and the `tokenizers` package): send 'input_ids' instead",
            )
        if not isinstance(data["text"], str) or not data["text"]:
            raise RequestError(422, "'text' must be a non-empty string (one prompt)")
        ids = tokenize([data["text"]])[0]["input_ids"]
        if not ids:
            raise RequestError(422, "'text' tokenizes to no tokens")
        return list(ids)
    if "input_ids" not in data:
        raise RequestError(422, "missing field 'input_ids' (or 'text')")
    ids = data["input_ids"]
    if not isinstance(ids, list) or not ids or not all(map(_is_int, ids)):
        raise RequestError(
            422, "'input_ids' must be a non-empty list of integers (one prompt's token ids)"
        )
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= limits.vocab_size:
        raise RequestError(
            422,
            f"'input_ids' must lie in [0, {limits.vocab_size}) (the model's vocab_size), "
            f"got values in [{lo}, {hi}]",
        )
    return ids


def _json(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def _event(body) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


_METRICS_NAMESPACE = "kernl"


def _stats_actor(app_name: str):
    actor = ray.remote(num_cpus=0)(GenerationStats)
    return actor.options(
        name=f"kernl-generation-metrics-{app_name}",
        namespace=_METRICS_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
    ).remote()


@serve.deployment
class KernlGenerator:
    """One replica: one GenerativeModel, one request at a time (see the module docstring)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.manifest = read_manifest(config.artifact)
        self.limits = GenerationLimits.from_manifest(self.manifest)
        self.tokenize = load_tokenizer(config.artifact)
        self.detokenize = load_detokenizer(config.artifact)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.stats = _stats_actor(config.app_name)
        self.model = None
        # One thread loads the model and then runs every call into it: the runtime's stream
        # iterator is always advanced and closed from this thread.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernl-generate")
        self.loading: Future = self.worker.submit(self._load)
        self.turn = asyncio.Lock()  # one request at a time, in arrival order

    def _load(self) -> None:
        import kernl.runtime

        device = self.config.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = kernl.runtime.load(self.config.artifact, device=device)

    def _load_state(self) -> tuple[str, str | None]:
        if not self.loading.done():
            return "loading", None
        error = self.loading.exception()
        if error is not None:
            return "failed", f"{type(error).__name__}: {error}"
        return "ready", None

    def check_health(self) -> None:
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
                return _json(body, status=503)
            if path == "/ready":
                return _json({"ready": True, "status": "ok", "replica": self.replica})
            return _json(self.health())
        if path == "/metrics" and request.method == "GET":
            return _json(await self.stats.snapshot.remote())
        if path in ("/", "/predict", "/generate") and request.method == "POST":
            return await self.generate(await request.body())
        return _json(
            {
                "error": f"no route {request.method} {path}; use POST / (or /predict, /generate), "
                "GET /ready, GET /health, GET /metrics"
            },
            status=404 if request.method in ("GET", "POST") else 405,
        )

    async def generate(self, body: bytes) -> Response:
        try:
            parsed = parse_generation_request(body, self.limits, self.tokenize)
        except RequestError as e:
            self.stats.record_bad.remote()
            return _json({"error": str(e)}, status=e.status)
        try:
            await asyncio.wrap_future(self.loading)
        except Exception as e:
            return _json({"error": f"model failed to load: {type(e).__name__}: {e}"}, status=503)
        if parsed.stream:
            try:
                # Checks the arguments now (ValueError), starts nothing: the iterator takes
                # the model only at its first step, under self.turn (_events).
                steps = self.model.stream([parsed.prompt], **parsed.options)
            except (ValueError, TypeError) as e:
                self.stats.record_bad.remote()
                return _json({"error": str(e)}, status=422)
            return StreamingResponse(self._events(steps), media_type="text/event-stream")
        loop = asyncio.get_running_loop()
        async with self.turn:
            try:
                out = await loop.run_in_executor(self.worker, self._generate, parsed)
            except (ValueError, TypeError) as e:
                self.stats.record_bad.remote()
                return _json({"error": str(e)}, status=422)
            except Exception as e:
                self.stats.record.remote("failed", 0, self.replica, False)
                return _json({"error": f"model call failed: {type(e).__name__}: {e}"}, 500)
        self.stats.record.remote("done", len(out), self.replica, False)
        return _json(self._answer(parsed, out))

    def _generate(self, parsed: GenerationRequest) -> list[int]:
        out = self.model.generate([parsed.prompt], **parsed.options)
        return out[0, len(parsed.prompt) :].tolist()

    def _answer(self, parsed: GenerationRequest, ids: list[int]) -> dict:
        eos = parsed.options.get("eos_token_id", self.limits.eos_token_ids)
        eos = {eos} if _is_int(eos) else set(eos or [])
        body = {
            "generated_ids": ids,
            "finish_reason": "eos" if ids and ids[-1] in eos else "length",
            "prompt_tokens": len(parsed.prompt),
            "replica": self.replica,
        }
        if self.detokenize is not None:
            body["text"] = self.detokenize(ids)
        return body

    async def _events(self, steps) -> AsyncIterator[str]:
        """Server-sent events, one per step. If the client leaves, Ray Serve cancels this
        generator at its next await or yield: `finally` then closes the runtime's iterator
        (on the worker thread, after the step in flight) and frees the turn."""
        loop = asyncio.get_running_loop()
        n, outcome = 0, "cancelled"
        async with self.turn:
            try:
                while True:
                    ids = await loop.run_in_executor(self.worker, next, steps, None)
                    if ids is None:
                        break
                    token = int(ids[0])
                    event = {"index": n, "token_id": token}
                    if self.detokenize is not None:
                        event["text"] = self.detokenize([token])
                    n += 1
                    yield _event(event)
                outcome = "done"
                yield _event("[DONE]")
            except Exception as e:  # not CancelledError/GeneratorExit: those are the client leaving
                outcome = "failed"
                yield _event({"error": f"model call failed: {type(e).__name__}: {e}"})
            finally:
                self.worker.submit(steps.close)  # queued before any later request's step
                self.stats.record.remote(outcome, n, self.replica, True)

    def health(self) -> dict:
        m = self.manifest
        return {
            "status": "ok",
            "ready": True,
            "artifact": os.path.abspath(self.config.artifact),
            "model_type": m.model_type,
            "task": m.task,
            "dtype": m.dtype,
            "device": str(self.model.device),
            "target": m.target,
            "gpu_name": m.gpu_name,
            "vocab_size": self.limits.vocab_size,
            "prompt_buckets": self.limits.prompts,
            "cache_len": self.limits.cache_len,
            "text": self.tokenize is not None,
            "concurrency": "one request at a time per replica",
            "replica": self.replica,
        }
