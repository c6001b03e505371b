"""`kernl serve` for causal-LM and text encoder-decoder artifacts (manifest.task "causal-lm"
or "seq2seq-lm": T5, BART, mBART, Marian): generation over HTTP on Ray Serve; for an
encoder-decoder the prompt is the source and the answer the new tokens after the decoder's
start token. The request format and its checks are generation_protocol.py; the batching
policy is generation_batcher.py.

Answer without "stream": {"generated_ids": [...], "text": "...", "finish_reason": "eos" |
"length", "prompt_tokens": n, "replica": "...", "batch": {"index": i, "requests": k},
"queue_ms": w} ("text" only with a tokenizer; "batch": which batch of this replica served it
and how many requests it had served by then, itself included: those it opened with and
those that joined it before this answer). With "stream": true, `text/event-stream`: one
`data: {"index": k, "token_id": t[, "text": "..."]}` event per generated token, then
`data: [DONE]` (OpenAI's convention); a model failure after the first event ends the stream
with `data: {"error": "..."}` and no [DONE]. The events' "text" pieces add up to the answer's
"text" (generation_protocol.StreamedText): a piece is what its token adds to the decoded text
("" while a character is incomplete); should the stream end before the token taken as its
last, a `data: {"text": "..."}` event before [DONE] carries the rest.

Concurrency: requests waiting when a batch starts (or arriving within --batch-wait-ms of an
idle replica) share one `generate` call when their sampling arguments match, up to the
largest batch bucket; each gets its own row's tokens, equal to `model.generate` on its prompt
alone. A request arriving during a batch joins it at its next step in a free row (the
default, where the runtime offers `open_batch`: not an encoder-decoder's), or with
--no-join waits for it to end (generation_batcher.py). A client that disconnects has its row
ignored; a batch whose rows are all abandoned stops at the next readback of its ids.

Every check happens on arrival (before the model is loaded, if need be), so a bad request
gets a 4xx naming the field and the limit, and the replica keeps serving."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor

from ray import serve
from starlette.responses import Response, StreamingResponse

from kernl.artifacts import read_manifest

from .config import ServeConfig
from .device import replica_device
from .generation_batcher import BatchPolicy, BatchRecord, GenerationBatcher
from .generation_protocol import (  # noqa: F401  (re-exported: the names tests and users know)
    DEFAULT_MAX_NEW_TOKENS,
    FIELDS,
    GenerationLimits,
    GenerationRequest,
    StreamedText,
    answer_body,
    parse_generation_request,
    sse_event,
    token_event,
)
from .metrics import GenerationStats
from .protocol import RequestError, parse_off_loop
from .replica import GENERATION_COUNTERS, Replica, SharedStats, artifact_identity
from .replica import json_response as _json
from .tokenizer import load_detokenizer, load_tokenizer


@serve.deployment
class KernlGenerator(Replica):
    """One replica: one loaded generative model (a causal LM's GenerativeModel or a text
    encoder-decoder's Seq2SeqModel), requests batched by a GenerationBatcher."""

    POST_PATHS = ("/", "/predict", "/generate")

    def __init__(self, config: ServeConfig, instance: str | None = None):
        self.config = config
        self.manifest = read_manifest(config.artifact)
        self.limits = GenerationLimits.from_manifest(self.manifest)
        largest = max(self.limits.batches)
        self.policy = BatchPolicy(
            max_requests=min(config.max_batch_size or largest, largest),
            window_s=config.wait_s(generation=True),
            join=config.join,
        )
        self.tokenize = load_tokenizer(config.artifact)
        self.detokenize = load_detokenizer(config.artifact)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        # `instance`: this deployment's, drawn by deployment.application(): its own counters
        family = GENERATION_COUNTERS.format(app=config.app_name)
        self.stats = SharedStats(GenerationStats, family, instance)
        self.model = None
        self.batcher: GenerationBatcher | None = None  # once the model is loaded
        # One thread loads the model and then runs every call into it: the runtime's stream
        # iterator is always created, advanced and closed on this thread.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernl-generate")
        self.loading: Future = self.worker.submit(self._load)

    def _load(self) -> None:
        import kernl.runtime

        device = replica_device(self.config.device)
        model = kernl.runtime.load(self.config.artifact, device=device)
        # a request's own fields and the server's defaults decide its decoding
        # (docs/deployment.md), not the generation config the artifact recorded
        model.generation_defaults = None
        self.model = model

    def _batcher(self) -> GenerationBatcher:
        if self.batcher is None:  # on the event loop's thread: no race
            self.batcher = GenerationBatcher(
                self.model, self.limits, self.policy, self.worker, self._record_batch
            )
        return self.batcher

    def _record_batch(self, record: BatchRecord) -> None:
        if record.error is not None:  # between two batches: no other call runs
            self.note_failed_call()
        self.stats.send(
            "record_batch",
            record.requests,
            record.steps,
            record.abandoned,
            max(record.waits_s),
            self.replica,
            joined=record.joined,
        )

    async def post(self, body: bytes) -> Response:
        return await self.generate(body)

    def count_bad(self) -> None:
        self.stats.send("record_bad")

    async def generate(self, body: bytes) -> Response:
        try:
            parsed = await parse_off_loop(
                parse_generation_request, body, self.limits, self.tokenize
            )
        except RequestError as e:
            self.count_bad()
            return _json({"error": str(e)}, status=e.status)
        try:
            await self.loaded()  # a request during the load waits for it
        except Exception as e:
            return _json({"error": f"model failed to load: {type(e).__name__}: {e}"}, status=503)
        if parsed.stream:
            return StreamingResponse(self._events(parsed), media_type="text/event-stream")
        ticket = self._batcher().submit(parsed)
        try:
            ids = await ticket.result()
        except asyncio.CancelledError:  # the client left: its row is ignored from now on
            ticket.cancel()
            self.stats.send("record", "cancelled", ticket.produced, self.replica, False)
            raise
        except Exception as e:
            self.stats.send("record", "failed", 0, self.replica, False)
            return _json({"error": f"model call failed: {type(e).__name__}: {e}"}, 500)
        self.stats.send("record", "done", len(ids), self.replica, False)
        extra = {
            "replica": self.replica,
            "batch": {"index": ticket.batch_index, "requests": ticket.batch_requests},
            "queue_ms": 1000 * ticket.wait_s,
        }
        return _json(answer_body(parsed, ids, ticket.finish_reason, self.detokenize, extra))

    async def _events(self, parsed: GenerationRequest) -> AsyncIterator[str]:
        """Server-sent events, one per token of the request's row. The request joins the
        batcher when the response starts (a client gone before that never reaches it). If the
        client leaves, Ray Serve cancels this generator at its next await or yield: `finally`
        then marks the ticket abandoned (its row is ignored; a batch of abandoned rows
        stops)."""
        ticket = self._batcher().submit(parsed)
        text = StreamedText(self.detokenize, parsed) if self.detokenize is not None else None
        n, outcome = 0, "cancelled"
        try:
            async for token in ticket.tokens():
                yield token_event(n, token, None if text is None else text.add(token))
                n += 1
            outcome = "done"
            rest = "" if text is None else text.finish()
            if rest:  # the stream ended before the token StreamedText takes as its last
                yield sse_event({"text": rest})
            yield sse_event("[DONE]")
        except Exception as e:  # not CancelledError/GeneratorExit: those are the client leaving
            outcome = "failed"
            yield sse_event({"error": f"model call failed: {type(e).__name__}: {e}"})
        finally:
            if outcome == "cancelled":
                ticket.cancel()
            self.stats.send("record", outcome, n, self.replica, True)

    def _joins(self) -> bool:
        """Whether requests join a running batch (an encoder-decoder's runtime cannot)."""
        return self.policy.join and hasattr(self.model, "open_batch")

    def health(self) -> dict:
        m = self.manifest
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
            "vocab_size": self.limits.vocab_size,
            "prompt_buckets": self.limits.prompts,  # an encoder-decoder's source buckets
            "encoder_decoder": self.limits.encoder_decoder,
            "cache_len": self.limits.cache_len,
            "text": self.tokenize is not None,
            "concurrency": "requests waiting when a batch starts share it (same greedy or "
            "sampled mode and EOS ids, up to max_batch_size); "
            + (
                "later ones join it at its next step in a free row, in arrival order"
                if self._joins()
                else "later ones wait for it to end"
            ),
            "join_running_batch": self._joins(),
            "max_batch_size": self.policy.max_requests,
            "batch_wait_ms": 1000 * self.policy.window_s,
            "replica": self.replica,
        }
