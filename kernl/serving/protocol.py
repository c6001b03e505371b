"""The HTTP JSON protocol of `kernl serve`: parse and check a request body, shape a response.

Request (POST /, or /predict):
    {"input_ids": [101, 7592, 102]}                      one sequence
    {"input_ids": [[101, 7592, 102], [101, 102]],        several, of any lengths
     "attention_mask": [[1, 1, 1], [1, 1]],              optional, same lengths
     "token_type_ids": ...,                              optional, same lengths
     "outputs": ["pooler_output"],                       optional: which outputs to return
     "encoding": "base64"}                               optional: "json" (default) or "base64"
    {"input_ids": ..., "pooling": "mean", "normalize": true}   a sentence embedding per
                                                         sequence (serving/pooling.py)
    {"text": "hello world"} or {"text": [...]}           when the artifact has tokenizer.json
    {"text": [...], "text_pair": [...]}                  sentence pairs (a cross-encoder's
                                                         query and passage), as HF's
                                                         tokenizer(text, text_pair)
Response:
    {"outputs": {"last_hidden_state": [...], ...}, "replica": "...",
     "replays": [{"bucket": "4x16", "requests": 3, "rows": 5}]}
  An output holds one value per sequence (sliced to the sequence's length), or the value
  alone when the request sent one sequence as a flat list. "replays": the replays that
  served the request's sequences (several when they were cut into more than one bucket),
  each with its bucket and how many requests and sequences shared it. A value is nested JSON numbers, or
  with "encoding": "base64" {"dtype": "float16", "shape": [768], "data": "<base64>"}: the
  tensor's raw little-endian bytes in C order, the same values bit for bit.

Every check happens on arrival, before a request joins a batch, so a bad request fails
alone with a 4xx and a message, and never takes a batch down with it."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kernl.artifacts.schema import Bucket, InputSpec, Manifest

from .batching import Row
from .pooling import SENTENCE_EMBEDDING, Pooling, PoolingError, parse_pooling


class RequestError(Exception):
    """A request the server refuses: `status` is the HTTP status (4xx), str() the message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# JSON nested deeper than this is refused before parsing: a request is at most an object of
# lists of lists, and Python's json module recurses once per level (RecursionError at ~1000).
MAX_JSON_DEPTH = 32


@dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against: the artifact's inputs, outputs and buckets, and the
    ranges its embeddings can index (None: not recorded, then any int64 that is not negative)."""

    inputs: list[InputSpec]
    output_names: list[str]
    buckets: list[Bucket]
    vocab_size: int | None
    max_rows: int  # sequences per request: the batcher's --max-batch-size
    type_vocab_size: int | None = None  # rows of the token-type embedding (BERT: 2)

    @classmethod
    def from_manifest(cls, manifest: Manifest, max_rows: int) -> ModelLimits:
        """The limits of an artifact, from its manifest alone (no weights, no device)."""
        config = manifest.model_config
        return cls(
            inputs=list(manifest.inputs),
            output_names=[o.name for o in manifest.outputs],
            buckets=manifest.bucket_list(),
            vocab_size=_config_int(config, "vocab_size"),
            max_rows=max_rows,
            type_vocab_size=_config_int(config, "type_vocab_size"),
        )

    @property
    def max_seq(self) -> int:
        return max(b.seq for b in self.buckets)

    def bucket_names(self) -> str:
        return ", ".join(f"{b.batch}x{b.seq}" for b in sorted(self.buckets))


@dataclass(frozen=True)
class ParsedRequest:
    rows: list[Row]
    single: bool  # one flat sequence was sent: answer with values, not lists of them
    outputs: list[str]  # the outputs to return
    encoding: str = "json"  # how output values are spelled: ENCODINGS
    pooling: Pooling | None = None  # how SENTENCE_EMBEDDING is made, where it is asked for


ENCODINGS = ("json", "base64")
# A text or a pair of texts (one sequence: HF's `tokenizer(text, text_pair)`) per sequence.
Tokenize = Callable[[list[str] | list[tuple[str, str]]], list[dict[str, list[int]]]]
MAX_BODY_BYTES = 8 << 20


def parse_request(
    body: bytes, limits: ModelLimits, tokenize: Tokenize | None = None
) -> ParsedRequest:
    """Parse a request body; raise RequestError (400 malformed, 413 too large for every
    bucket, 422 wrong fields or values) with a message that says what to change."""
    data = load_json_object(body)
    input_names = [s.name for s in limits.inputs]
    allowed = set(input_names) | {"text", "text_pair", "outputs", "encoding"}
    allowed |= {"pooling", "normalize"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RequestError(
            422,
            f"unknown field(s) {unknown}; this model takes {input_names}, "
            f"'text' and 'text_pair' (with a tokenizer), 'outputs', 'encoding', 'pooling' "
            "and 'normalize'",
        )
    try:
        pooling = parse_pooling(data, limits.output_names)
    except PoolingError as e:
        raise RequestError(422, str(e)) from None
    outputs = _parse_outputs(data.get("outputs"), limits.output_names, pooling)
    encoding = data.get("encoding", "json")
    if encoding not in ENCODINGS:
        raise RequestError(422, f"'encoding' must be one of {list(ENCODINGS)}")
    if "text" in data:
        rows, single = _rows_from_text(data, input_names, tokenize, limits)
    elif "text_pair" in data:
        raise RequestError(422, "'text_pair' is the second text of each 'text': send both")
    elif "input_ids" in data:
        rows, single = _rows_from_ids(data, input_names, limits)
    else:
        raise RequestError(422, "missing field 'input_ids' (or 'text')")
    _check_rows(rows, limits)
    return ParsedRequest(rows, single, outputs, encoding, pooling)


# A body over this is parsed on a worker thread, so that the event loop (other requests'
# answers, /ready) never waits through a big body's parse: 2 M one-token rows are 1.6 s of
# JSON before their refusal (review). A smaller one, every usual request, is parsed inline,
# where a thread's hop would add to its latency.
INLINE_PARSE_BYTES = 64 << 10


async def parse_off_loop(parse: Callable[..., Any], body: bytes, *args: Any) -> Any:
    """`parse(body, *args)`, on a worker thread where the body is over INLINE_PARSE_BYTES."""
    if len(body) <= INLINE_PARSE_BYTES:
        return parse(body, *args)
    return await asyncio.to_thread(parse, body, *args)


def load_json_object(body: bytes) -> dict:
    """The request body as a JSON object; RequestError 413 (over MAX_BODY_BYTES), 400 (not
    JSON, nested too deeply) or 422 (JSON but not an object)."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body over {MAX_BODY_BYTES} bytes")
    _check_depth(body)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:  # a nesting _check_depth could not see (e.g. escaped brackets)
        raise RequestError(400, "request body nests JSON too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(422, 'request body must be a JSON object, e.g. {"input_ids": [...]}')
    return data


def _check_depth(body: bytes) -> None:
    """Refuse bodies whose brackets nest deeper than MAX_JSON_DEPTH, without parsing them.

    Brackets inside JSON strings do not count (a prompt of code or markdown holds many): a
    quote opens or closes a string unless an odd run of backslashes precedes it, which is
    JSON's own rule, so up to the body's first syntax error (where the parser stops) the
    depth counted is the parser's. Vector code, not a Python loop: an 8 MiB body of brackets
    takes 0.3 s on 2 shared cores."""
    if len(body.translate(None, _NOT_BRACKETS)) <= MAX_JSON_DEPTH:
        return
    if _depth(body) > MAX_JSON_DEPTH:
        raise RequestError(
            400,
            f"request body nests JSON deeper than {MAX_JSON_DEPTH} levels "
            "(a request is an object of lists of lists)",
        )


def _depth(body: bytes) -> int:
    """The deepest the brackets outside strings nest in `body`."""
    chars = np.frombuffer(body, dtype=np.uint8)
    opens = (chars == ord("[")) | (chars == ord("{"))
    steps = opens.astype(np.int8) * 2 - 1  # +1 an opening bracket, -1 a closing one
    brackets = opens | (chars == ord("]")) | (chars == ord("}"))
    quotes = np.flatnonzero(chars == ord('"'))
    if len(quotes):
        quotes = _unescaped(quotes, np.flatnonzero(chars == ord("\\")))
        inside = np.zeros(len(chars), dtype=np.int8)  # +1 at a string's start, -1 at its end
        inside[quotes[0::2]] = 1
        inside[quotes[1::2]] = -1
        brackets &= np.cumsum(inside, dtype=np.int8) == 0
    steps = steps[brackets]
    return max(0, int(np.cumsum(steps, dtype=np.int32).max())) if len(steps) else 0


def _unescaped(quotes: np.ndarray, backslashes: np.ndarray) -> np.ndarray:
    """The quotes (byte offsets) an even run of backslashes, or none, precedes."""
    if not len(quotes) or not len(backslashes):
        return quotes
    breaks = np.flatnonzero(np.diff(backslashes) != 1)
    run_start = backslashes[np.r_[0, breaks + 1]]
    run_end = backslashes[np.r_[breaks, len(backslashes) - 1]]
    k = np.minimum(np.searchsorted(run_end, quotes - 1), len(run_end) - 1)
    run = np.where(run_end[k] == quotes - 1, run_end[k] - run_start[k] + 1, 0)
    return quotes[run % 2 == 0]


_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def _parse_outputs(value, names: list[str], pooling: Pooling | None) -> list[str]:
    """The outputs to return: all the model's by default, the sentence embedding alone with
    'pooling'."""
    if value is None:
        return [SENTENCE_EMBEDDING] if pooling else list(names)
    if pooling:
        names = [*names, SENTENCE_EMBEDDING]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise RequestError(422, f"'outputs' must be a non-empty list of names among {names}")
    if SENTENCE_EMBEDDING in value and not pooling:
        raise RequestError(
            422, f'{SENTENCE_EMBEDDING!r} is made by \'pooling\' ("mean" or "cls"): add it'
        )
    unknown = [v for v in value if v not in names]
    if unknown:
        raise RequestError(422, f"unknown output(s) {unknown}; this model returns {names}")
    if pooling and SENTENCE_EMBEDDING not in value:
        raise RequestError(422, f"'pooling' makes {SENTENCE_EMBEDDING!r}: add it to 'outputs'")
    return list(dict.fromkeys(value))


def _rows_from_ids(
    data: dict, input_names: list[str], limits: ModelLimits
) -> tuple[list[Row], bool]:
    ids = data["input_ids"]
    single = isinstance(ids, list) and bool(ids) and not isinstance(ids[0], list)
    _check_count(1 if single or not isinstance(ids, list) else len(ids), limits)
    columns: dict[str, list[list[int]]] = {}
    for name in input_names:
        if name not in data:
            continue
        value = data[name]
        if single:
            value = [value]
        columns[name] = _int_matrix(name, value)
    n = len(columns["input_ids"])
    rows = []
    for k in range(n):
        inputs = {}
        for name, column in columns.items():
            if len(column) != n:
                raise RequestError(
                    422, f"'{name}' has {len(column)} sequences, 'input_ids' has {n}"
                )
            if len(column[k]) != len(columns["input_ids"][k]):
                raise RequestError(
                    422,
                    f"sequence {k}: '{name}' has {len(column[k])} values, "
                    f"'input_ids' has {len(columns['input_ids'][k])}",
                )
            inputs[name] = tuple(column[k])
        rows.append(Row(inputs))
    return rows, single


def _int_matrix(name: str, value) -> list[list[int]]:
    shape_error = RequestError(
        422, f"'{name}' must be a list of integers or a list of such lists (one per sequence)"
    )
    if not isinstance(value, list) or not value:
        raise shape_error
    for row in value:
        if not isinstance(row, list):
            raise shape_error
        if not row:
            raise RequestError(422, f"'{name}' holds an empty sequence")
        # bool is an int in Python; JSON true/false in token ids is a caller's mistake. JSON
        # numbers parse to exactly int or float, so the type test is exact (and runs in C).
        if set(map(type, row)) != {int}:
            raise RequestError(422, f"'{name}' must hold integers only")
    return value


def _rows_from_text(
    data: dict, input_names: list[str], tokenize, limits: ModelLimits
) -> tuple[list[Row], bool]:
    if tokenize is None:
        raise RequestError(
            422,
            "this artifact carries no tokenizer (tokenizer.json next to manifest.msgpack, "
            "and the `tokenizers` package): send 'input_ids' instead of 'text'",
        )
    if "input_ids" in data:
        raise RequestError(422, "send either 'text' or 'input_ids', not both")
    given = sorted(n for n in data if n in input_names)
    if given:  # the tokenizer makes them: a client's would be dropped without a word
        raise RequestError(
            422, f"{given} come from the tokenizer with 'text': send them with 'input_ids'"
        )
    text = data["text"]
    single = isinstance(text, str)
    texts = [text] if single else text
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise RequestError(422, "'text' must be a string or a non-empty list of strings")
    _check_count(len(texts), limits)
    inputs: list[str] | list[tuple[str, str]] = texts
    if "text_pair" in data:
        pairs = _text_pairs(data["text_pair"], single, len(texts))
        joined = [a + b for a, b in zip(texts, pairs)]
        check_text_lengths(joined, limits.max_seq, single, "with its 'text_pair'")
        inputs = list(zip(texts, pairs))
    else:
        check_text_lengths(texts, limits.max_seq, single)
    rows = []
    for i, encoded in enumerate(tokenize_checked(tokenize, inputs)):
        if not encoded.get("input_ids"):  # "" with a tokenizer that adds no special tokens
            where = f"'text'[{i}]" if not single else "'text'"
            raise RequestError(422, f"{where} gives no tokens")
        rows.append(Row({k: tuple(v) for k, v in encoded.items() if k in input_names}))
    return rows, single


def _text_pairs(pairs: Any, single: bool, n: int) -> list[str]:
    """'text_pair' as one string per 'text': a string beside a string, a list of strings of
    the same length beside a list (HF's tokenizer(text, text_pair) takes the same)."""
    if single:
        if not isinstance(pairs, str):
            raise RequestError(422, "'text_pair' must be a string when 'text' is one")
        return [pairs]
    if not isinstance(pairs, list) or not all(isinstance(t, str) for t in pairs):
        raise RequestError(422, "'text_pair' must be a list of strings when 'text' is a list")
    if len(pairs) != n:
        raise RequestError(
            422, f"'text_pair' has {len(pairs)} strings and 'text' {n}: one pair per text"
        )
    return pairs


def tokenize_checked(tokenize: Tokenize, texts: list[str] | list[tuple[str, str]]) -> list[dict]:
    """tokenize(texts), with what a tokenizer cannot take answered 422 rather than 500: JSON
    may carry a lone surrogate ("\\ud800"), which is no Unicode text and which the
    `tokenizers` package rejects with a TypeError."""
    for i, item in enumerate(texts):
        for field, text in zip(("text", "text_pair"), (item,) if isinstance(item, str) else item):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                where = f"'{field}'[{i}]" if len(texts) > 1 else f"'{field}'"
                raise RequestError(
                    422, f"{where} is not valid Unicode: a lone surrogate at character {e.start}"
                ) from None
    try:
        return tokenize(texts)
    except (TypeError, ValueError) as e:
        raise RequestError(422, f"the tokenizer refused 'text': {e}") from None


# A token is rarely more than a few characters long: a text over this many characters a token
# of the longest bucket cannot fit it, and tokenizing it held the replica's event loop (and its
# /ready) for seconds: 5 s for a text of 2.8 M tokens (review).
MAX_CHARS_PER_TOKEN = 100


def check_text_lengths(texts: list[str], max_tokens: int, single: bool, joined: str = "") -> None:
    """Refuse (413), before tokenizing, a text that no bucket of `max_tokens` could hold (the
    tokenizer never truncates: serving/tokenizer.py). `joined` names what each text was
    joined with (a pair's second text)."""
    most = max_tokens * MAX_CHARS_PER_TOKEN
    for i, text in enumerate(texts):
        if len(text) > most:
            where = "'text'" if single else f"'text'[{i}]"
            where += f" {joined}" if joined else ""
            raise RequestError(
                413,
                f"{where} has {len(text)} characters: at most {most} are taken ({max_tokens} "
                f"tokens, the longest bucket, at {MAX_CHARS_PER_TOKEN} characters a token)",
            )


def _check_count(n: int, limits: ModelLimits) -> None:
    """Before any row is built or any text tokenized: 2 M one-token rows took 5.6 s to
    build, then were refused here (review)."""
    if n > limits.max_rows:
        raise RequestError(
            413,
            f"{n} sequences in one request; at most {limits.max_rows} "
            f"(the server's --max-batch-size)",
        )


def _check_rows(rows: Sequence[Row], limits: ModelLimits) -> None:  # counted as they came
    max_seq = limits.max_seq  # a row fits a bucket of one row alone iff it fits the longest
    required = [s.name for s in limits.inputs if s.default == "required"]
    for k, row in enumerate(rows):
        missing = [name for name in required if name not in row.inputs]
        if missing:  # a model that masks its pad tokens itself when given no mask (DPR)
            raise RequestError(422, f"sequence {k} lacks {missing[0]!r}, which this model requires")
        if row.length > max_seq:
            raise RequestError(
                413,
                f"sequence {k} has {row.length} tokens, longer than every bucket of this "
                f"artifact (batch x seq: {limits.bucket_names()})",
            )
        for name, values in row.inputs.items():
            lo, hi = min(values), max(values)
            allowed = _allowed_range(name, limits)
            if lo < allowed.low or hi > allowed.high:
                raise RequestError(
                    422,
                    f"sequence {k}: '{name}' must lie in {allowed.text}, "
                    f"got values in [{lo}, {hi}]",
                )


@dataclass(frozen=True)
class _Range:
    low: int
    high: int  # inclusive
    text: str  # how the message spells it, with the reason


def _allowed_range(name: str, limits: ModelLimits) -> _Range:
    """The values an input may take: an index into an embedding must have a row to read (an
    out-of-range id is an out-of-bounds read on the GPU, and fails the whole batch), a mask is
    0 or 1, and anything else must fit the int64 tensors the runtime copies it into."""
    if name == "attention_mask":
        return _Range(0, 1, "{0, 1} (1: a real token, 0: padding)")
    size = {"input_ids": limits.vocab_size, "token_type_ids": limits.type_vocab_size}.get(name)
    what = {"input_ids": "vocab_size", "token_type_ids": "type_vocab_size"}.get(name)
    if size is not None:
        return _Range(0, size - 1, f"[0, {size}) (the model's {what})")
    if what is not None:  # an index, size not recorded: not negative, and an int64
        return _Range(0, INT64_MAX, f"[0, 2**63) (int64; the model's {what} is not recorded)")
    return _Range(INT64_MIN, INT64_MAX, "[-2**63, 2**63) (int64)")


def _config_int(config: dict, key: str) -> int | None:
    v = config.get(key)
    # bool is an int in Python; a config saying `true` records no size.
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def response_body(per_row: Sequence[dict], request: ParsedRequest, extra: dict) -> dict:
    """The JSON object answering one request, from its rows' outputs (CPU tensors)."""
    as_value = _as_base64 if request.encoding == "base64" else _as_json
    outputs = {}
    for name in request.outputs:
        values = [as_value(r[name]) for r in per_row]
        outputs[name] = values[0] if request.single else values
    return {"outputs": outputs, **extra}


def response_bytes(per_row: Sequence[dict], request: ParsedRequest, extra: dict) -> bytes:
    """`json.dumps(response_body(...)).encode()`, byte for byte, without building the lists:
    what the server sends. A float16 or bfloat16 output is spelled through a table of the
    JSON text of all 65,536 values (float.__repr__ of each, as json.dumps writes it), so a
    768-value pooler output costs a table lookup and a join, not 768 float reprs."""
    fields = []
    for name in request.outputs:
        values = [_value_text(r[name], request.encoding) for r in per_row]
        value = values[0] if request.single else "[" + ", ".join(values) + "]"
        fields.append(f"{json.dumps(name)}: {value}")
    text = '{"outputs": {' + ", ".join(fields) + "}"
    rest = json.dumps(extra)
    text += "}" if rest == "{}" else ", " + rest[1:]
    return text.encode()


def _value_text(t: torch.Tensor, encoding: str) -> str:
    if encoding == "base64":
        return json.dumps(_as_base64(t))
    table = _half_table(t.dtype)
    if table is None:
        return json.dumps(_as_json(t))
    bits = t.view(torch.int16).numpy().view(np.uint16)
    return _join(table[bits].tolist()) if bits.ndim else table[bits]


def _join(value) -> str:
    """Nested lists of JSON texts as json.dumps lays out lists: `[a, b]`."""
    if isinstance(value, str):
        return value
    if value and isinstance(value[0], str):
        return "[" + ", ".join(value) + "]"
    return "[" + ", ".join(map(_join, value)) + "]"


def prepare_answers(output_dtypes: Sequence[str]) -> None:
    """Build the text tables of the outputs' dtypes (manifest names: "float16", ...) now, at a
    replica's load, rather than in the first request (about 30 ms each)."""
    for name in output_dtypes:
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            _half_table(dtype)


@functools.cache
def _half_table(dtype: torch.dtype) -> np.ndarray | None:
    """For a 16-bit float dtype, the JSON text of each bit pattern (indexed by the pattern as
    uint16), as _as_json spells it; None for other dtypes. Built once, in about 30 ms."""
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    patterns = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16))
    values = patterns.view(dtype).tolist()
    texts = [repr(v) if math.isfinite(v) else json.dumps(str(v)) for v in values]
    return np.array(texts, dtype=object)


def _as_base64(t: torch.Tensor) -> dict:
    """The tensor's raw bytes (C order, the host's byte order: little-endian on x86-64 and
    aarch64), its dtype as torch names it and its shape."""
    t = t.contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "data": base64.b64encode(data).decode("ascii"),
    }


def _as_json(t):
    if not t.is_floating_point() or bool(t.isfinite().all()):
        return t.tolist()
    # JSON has no NaN or infinity: spell them as strings rather than emit invalid JSON.
    return _plain(t.tolist())


def _plain(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
