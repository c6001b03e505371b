"""The JSON protocol of a generation server, without Ray or Starlette: parse and check a
request against the artifact's limits, shape the answer and the server-sent events. The
deployment (generation.py) and the in-process benchmark (benchmarks/bench_serving_direct.py,
on a GPU machine without Ray) share it.

Request (POST /, or /predict): a JSON object
    {"input_ids": [1, 15, 27], "max_new_tokens": 32}            token ids of one prompt
    {"text": "hello", "do_sample": true, "temperature": 0.8,     text, when the artifact
     "top_k": 40, "top_p": 0.9, "seed": 7, "eos_token_id": 2}    folder has tokenizer.json
    ... "stream": true                                           server-sent events

Every check happens on arrival (before the model is loaded, if need be), so a bad request
gets a 4xx naming the field and the limit, never reaches a batch, and the replica keeps
serving."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from kernl.artifacts.generation import MAX_EOS_IDS, GenerationBuckets
from kernl.artifacts.schema import Manifest, pick_size

from .protocol import (
    RequestError,
    Tokenize,
    check_text_lengths,
    load_json_object,
    tokenize_checked,
)

GENERATION_TASKS = ("causal-lm", "seq2seq-lm")  # served by generation.KernlGenerator
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
        "a token id, a list of token ids, or null (no EOS id, as generate's None)",
        lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))),
    ),
}
FIELDS = ("input_ids", "text", "stream", *_OPTIONS)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_servable(manifest: Manifest) -> None:
    """Refuse, naming the alternative, an artifact kernl serve has no deployment for."""
    if manifest.task == "speech-seq2seq":
        raise ValueError(
            "kernl serve does not serve speech-seq2seq (Whisper) artifacts yet: requests "
            "would carry audio features, which its JSON protocol does not take; load the "
            "artifact in-process with kernl.runtime.load(path).generate(input_features=...)"
        )


@dataclass(frozen=True)
class GenerationLimits:
    """What a generation request is checked against, from the manifest alone. For an
    encoder-decoder (T5, BART, mBART, Marian), `prompts` are the source (encoder) buckets and
    the decoder's cache, which starts at its start token, holds `cache_len` new tokens
    whatever the source's length."""

    vocab_size: int
    prompts: list[int]  # prompt (prefill) buckets; an encoder-decoder's source buckets
    cache_len: int  # KV cache slots per row
    eos_token_ids: list[int]
    batches: tuple[int, ...] = (1,)  # batch buckets: the most requests one call can hold
    encoder_decoder: bool = False
    # BART, mBART, Marian: the last token a call makes is forced to an EOS id, at the call's
    # max_new_tokens, so only requests of one budget share a call (SamplingKey.budget)
    forced_eos: bool = False

    def most_new_tokens(self, prompt_bucket: int) -> int:
        """The most new tokens a call can make after a prompt of this bucket."""
        return self.cache_len if self.encoder_decoder else self.cache_len - prompt_bucket + 1

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> GenerationLimits:
        if manifest.task == "seq2seq-lm":
            from kernl.artifacts.seq2seq import Seq2SeqBuckets

            spec = manifest.extra["seq2seq"]
            s2s = Seq2SeqBuckets.from_dict(manifest.extra["seq2seq_buckets"])
            return cls(
                vocab_size=int(spec["vocab_size"]),
                prompts=list(s2s.sources),
                cache_len=s2s.cache_len,
                eos_token_ids=list(spec.get("eos_token_ids") or []),
                batches=tuple(s2s.batches),
                encoder_decoder=True,
                forced_eos=spec.get("forced_eos_token_id") is not None,
            )
        decoder = manifest.extra["decoder"]
        buckets = GenerationBuckets.from_dict(manifest.extra["generation_buckets"])
        return cls(
            vocab_size=int(decoder["vocab_size"]),
            prompts=sorted(buckets.prompts),
            cache_len=buckets.cache_len,
            eos_token_ids=list(decoder.get("eos_token_ids") or []),
            batches=tuple(sorted(buckets.batches)),
        )


@dataclass(frozen=True)
class SamplingKey:
    """What one `generate` call fixes for all its rows, so what requests sharing a batch must
    have in common: greedy or sampled (one step graph each) and the EOS ids; where the model
    forces an EOS as a call's last token, max_new_tokens too (a shorter request in a longer
    call would end without it, unlike the request alone). Temperature, top-k, top-p and seed
    are per row (`Sampler`): requests that differ in them share a call."""

    do_sample: bool
    eos: tuple[int, ...]  # resolved: the request's ids, or the model's when it sent none
    budget: int | None = None  # max_new_tokens, where the model forces its last token


@dataclass(frozen=True)
class Sampler:
    """One request's sampling arguments (its row's, in a shared call)."""

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0


def generate_options(key: SamplingKey, samplers: list[Sampler]) -> dict:
    """The keyword arguments of generate()/stream() for requests of one key, one row each in
    this order: per-row sampler arguments, so that each row draws what its request would
    alone (a seed per row)."""
    options: dict = {"do_sample": key.do_sample, "eos_token_id": list(key.eos)}
    if key.do_sample:
        options |= {
            "temperature": [s.temperature for s in samplers],
            "top_k": [s.top_k for s in samplers],
            "top_p": [s.top_p for s in samplers],
            "seed": [s.seed for s in samplers],
        }
    return options


@dataclass(frozen=True)
class GenerationRequest:
    prompt: list[int]
    options: dict  # keyword arguments of generate()/stream(), as the client sent them
    stream: bool
    key: SamplingKey  # which batches it may join (see SamplingKey)
    sampler: Sampler = Sampler()  # its own row's sampling arguments

    @property
    def max_new_tokens(self) -> int:
        return self.options["max_new_tokens"]


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
    return GenerationRequest(
        prompt, options, stream, sampling_key(options, limits), sampler_of(options)
    )


def sampler_of(options: dict) -> Sampler:
    """A request's own sampling arguments (greedy requests keep the defaults). A sampled
    request without a seed gets one at random: two such requests for one prompt get two
    draws, as from any other server; a request that sends a seed gets the same answer each
    time, however it is batched."""
    if not options.get("do_sample", False):
        return Sampler()
    seed = options.get("seed")
    return Sampler(
        float(options.get("temperature", 1.0)),
        int(options.get("top_k", 50)),
        float(options.get("top_p", 1.0)),
        secrets.randbelow(2**63) if seed is None else int(seed),
    )


def sampling_key(options: dict, limits: GenerationLimits) -> SamplingKey:
    # absent: the model's EOS ids; null: none, as generate(eos_token_id=None) (it was the
    # model's, unlike the answer's promise to equal model.generate)
    eos = options.get("eos_token_id", limits.eos_token_ids)
    eos = [] if eos is None else ([eos] if _is_int(eos) else eos)
    eos = tuple(sorted(set(eos)))
    if len(eos) > MAX_EOS_IDS:  # the runtime's static EOS buffer; refused on arrival
        raise RequestError(
            422, f"'eos_token_id' holds {len(eos)} distinct ids; at most {MAX_EOS_IDS}"
        )
    budget = options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS) if limits.forced_eos else None
    return SamplingKey(bool(options.get("do_sample", False)), eos, budget)


def fits_together(requests, limits: GenerationLimits) -> bool:
    """Whether one `generate` call can hold these requests: the call's prompt bucket is that
    of the longest prompt, and the longest `max_new_tokens` must fit the KV cache after it
    (each request was checked alone on arrival, a short prompt's bucket may leave more
    room)."""
    bucket = pick_size(limits.prompts, max(len(r.prompt) for r in requests))
    most = max(r.max_new_tokens for r in requests)
    return bucket is not None and most <= limits.most_new_tokens(bucket)


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
    for name in ("temperature", "top_k", "top_p", "seed"):
        if isinstance(o[name], (list, tuple)):  # the runtime's per-row form, not a request's
            raise RequestError(422, f"'{name}' must be one number, got {o[name]!r}")
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
            1,
        )
    except (ValueError, ArithmeticError) as e:  # an int no float holds: OverflowError
        raise RequestError(422, str(e)) from None


def _check_fits(prompt: list[int], options: dict, limits: GenerationLimits) -> None:
    o = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, **options}
    bucket = pick_size(limits.prompts, len(prompt))
    what = "source" if limits.encoder_decoder else "prompt"
    if bucket is None:
        raise RequestError(
            413,
            f"the {what} has {len(prompt)} tokens, longer than every {what} bucket of this "
            f"artifact ({limits.prompts}); at most {limits.prompts[-1]}",
        )
    fit = limits.most_new_tokens(bucket)
    if o["max_new_tokens"] > fit:
        where = (
            f"the decoder cache of {limits.cache_len} slots"
            if limits.encoder_decoder
            else f"the KV cache of {limits.cache_len} slots after a prompt of {len(prompt)} "
            f"tokens (prompt bucket {bucket})"
        )
        raise RequestError(
            413,
            f"max_new_tokens {o['max_new_tokens']} does not fit {where}: at most {fit} new tokens",
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
        check_text_lengths([data["text"]], max(limits.prompts), True)
        ids = list(tokenize_checked(tokenize, [data["text"]])[0]["input_ids"])
        if not ids:
            raise RequestError(422, "'text' tokenizes to no tokens")
        where = "'text' tokenizes to ids that"  # a tokenizer.json of a larger vocabulary
    else:
        if "input_ids" not in data:
            raise RequestError(422, "missing field 'input_ids' (or 'text')")
        ids = data["input_ids"]
        if not isinstance(ids, list) or not ids or not all(map(_is_int, ids)):
            raise RequestError(
                422, "'input_ids' must be a non-empty list of integers (one prompt's token ids)"
            )
        where = "'input_ids'"
    # checked here, not by the model: an id past the table fails the whole batch it joins
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= limits.vocab_size:
        raise RequestError(
            422,
            f"{where} must lie in [0, {limits.vocab_size}) (the model's vocab_size), "
            f"got values in [{lo}, {hi}]",
        )
    return ids


def answer_body(
    request: GenerationRequest,
    ids: list[int],
    finish_reason: str,
    detokenize: Callable[[list[int]], str] | None = None,
    extra: dict | None = None,
) -> dict:
    """The JSON object answering a non-streamed request."""
    body = {"generated_ids": ids, "finish_reason": finish_reason}
    if detokenize is not None:
        body["text"] = detokenize(ids)
    body["prompt_tokens"] = len(request.prompt)
    return {**body, **(extra or {})}


def token_event(index: int, token: int, text: str | None = None) -> str:
    """One streamed token's event; `text`: what it adds to the answer's text (StreamedText)."""
    event = {"index": index, "token_id": token}
    if text is not None:
        event["text"] = text
    return sse_event(event)


class StreamedText:
    """The text of one streamed answer, piece by piece, so that the pieces of its events add
    up to the text of the same answer returned at once (`detokenize` of all its ids).

    A token decoded alone is not its share of the text: a SentencePiece tokenizer (Llama-2,
    Mistral, T5) drops the space a word token starts with, and a byte-level BPE one (GPT-2,
    Llama-3, Qwen2) splits a multi-byte character over tokens, each decoding to U+FFFD. So
    each token's piece is what it adds to the decoded text of a window of the ids before it
    (the ids since the token before the last piece, as vLLM's incremental detokenizer: one
    short decode per token, not the whole answer's), held back while the decoded text ends
    in U+FFFD (an incomplete character) and sent with the next token that completes it. The
    answer's last token (an EOS id, or its `max_new_tokens`-th) flushes: its piece is the
    rest of the whole answer's text."""

    def __init__(self, detokenize: Callable[[list[int]], str], request: GenerationRequest):
        self.detokenize = detokenize
        self.eos = frozenset(request.key.eos)
        self.budget = request.max_new_tokens
        self.ids: list[int] = []
        self.sent: list[str] = []  # the pieces handed out so far
        self.finished = False
        # ids[_start:_read] decode to text already sent; ids[_read:] to text not sent yet
        self._start = self._read = 0

    def add(self, token: int) -> str:
        """The text `token` adds (perhaps "", held back until a later token completes it)."""
        self.ids.append(token)
        if token in self.eos or len(self.ids) >= self.budget:  # the answer's last token
            return self.finish()
        before = self.detokenize(self.ids[self._start : self._read])
        now = self.detokenize(self.ids[self._start :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self._start, self._read = self._read, len(self.ids)
        return self._send(now[len(before) :])

    def finish(self) -> str:
        """The rest of the answer's text (once; "" after)."""
        if self.finished:
            return ""
        self.finished = True
        text, sent = self.detokenize(self.ids), "".join(self.sent)
        # A decoder whose text of a prefix is not a prefix of the whole (none of Hugging
        # Face's, but a tokenizer.json may hold anything) gets no piece that would repeat.
        return self._send(text[len(sent) :] if text.startswith(sent) else "")

    def _send(self, piece: str) -> str:
        self.sent.append(piece)
        return piece


def sse_event(body) -> str:
    """One server-sent event: `data: <JSON or the string as is>` and a blank line."""
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"
