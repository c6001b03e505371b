"""The seq2seq-lm bucket syntax: `"batch=1,8 source=32:512 cache=128"`.

batch   batch buckets; each gets static buffers (decoder KV cache, cross-attention K/V).
source  encoder buckets (source lengths); a source is padded on the right to the smallest.
cache   decoder self-attention lengths; the largest is the most new tokens one call makes.
        With several (e.g. `cache=32:256`) a decode step attends only to the smallest
        length that holds the tokens so far. Default: 128.

Each axis takes the same items as the encoder buckets: numbers and power-of-two ranges lo:hi,
within the limits a reader of artifacts enforces (checked here, before the model is loaded).

speech-seq2seq (Whisper): `"batch=1,8 cache=448"`. The source is fixed: one 30 s window of
3000 mel frames, 1500 encoder positions; cache counts the decoder prompt (start, language,
task, no-timestamps) with the new tokens: at least the longest prompt the model takes (4 tokens
for a multilingual model; checked once it is loaded), at most its max_target_positions."""

from __future__ import annotations

from kernl.artifacts.seq2seq import Seq2SeqBuckets, SpeechSpec
from kernl.artifacts.speech_prompt import longest_decoder_prompt
from kernl.runtime.generation.encoder_decoder import relative_distance_limit

from ...buckets import (
    BucketLimitError,
    BucketSyntaxError,
    check_axis,
    check_count,
    check_tokens,
    dict_axes,
    parse_axes,
    position_limit,
)

AXES = ("batch", "source", "cache")
EXAMPLE = "batch=1,8 source=32:512 cache=128"
DEFAULT_CACHE = 128


def parse_seq2seq_buckets(spec: str) -> Seq2SeqBuckets:
    axes = parse_axes(spec, AXES, ("batch", "source"), EXAMPLE, "seq2seq-lm")
    return checked(
        Seq2SeqBuckets(axes["batch"], axes["source"], axes.get("cache", [DEFAULT_CACHE]))
    )


SPEECH_AXES = ("batch", "cache")
SPEECH_EXAMPLE = "batch=1,8 cache=448"


def parse_speech_buckets(spec: str, source_positions: int) -> Seq2SeqBuckets:
    axes = parse_axes(spec, SPEECH_AXES, ("batch",), SPEECH_EXAMPLE, "speech-seq2seq")
    return checked(
        Seq2SeqBuckets(axes["batch"], [source_positions], axes.get("cache", [DEFAULT_CACHE]))
    )


def checked(b: Seq2SeqBuckets) -> Seq2SeqBuckets:
    """Refuse buckets a reader would refuse to load (kernl.artifacts.DEFAULT_LIMITS)."""
    check_axis("batch", b.batches)
    check_axis("source", b.sources)
    check_axis("cache", b.caches)
    check_count(len(b.encoder_shapes()) + len(b.batches) * len(b.caches), "seq2seq buckets")
    for batch in b.batches:
        check_tokens(
            batch * (b.cache_len + max(b.sources)),
            f"batch {batch} x (cache {b.cache_len} + source {max(b.sources)})",
        )
    return b


def as_seq2seq_buckets(spec, source_positions: int | None = None) -> Seq2SeqBuckets:
    """Accept the string syntax, a Seq2SeqBuckets, or a dict of its fields; with
    `source_positions` (Whisper), the speech-seq2seq syntax."""
    if isinstance(spec, str):
        if source_positions is not None:
            return parse_speech_buckets(spec, source_positions)
        return parse_seq2seq_buckets(spec)
    if isinstance(spec, Seq2SeqBuckets):
        spec = spec.to_dict()
    if isinstance(spec, dict):
        if source_positions is not None and not {"source", "sources"} & set(spec):
            spec = {**spec, ("sources" if "batches" in spec else "source"): [1]}
        axes = dict_axes(spec, AXES, ("batches", "sources", "caches"), "seq2seq-lm")
        if source_positions is not None:  # Whisper's source is fixed, as in the string syntax
            axes["source"] = [source_positions]
        return checked(
            Seq2SeqBuckets(axes["batch"], axes["source"], axes.get("cache") or [DEFAULT_CACHE])
        )
    raise BucketSyntaxError(
        f'seq2seq-lm buckets must be a string like "{EXAMPLE}", not {type(spec).__name__}'
    )


def seq2seq_position_limit(config, speech: bool) -> int | None:
    """The most tokens an encoder-decoder's position tables index: Whisper's decoder table
    (max_target_positions; its encoder's is the fixed source), the learned tables of BART,
    mBART and Marian (max_position_embeddings); None for T5's relative positions."""
    if speech:  # a text model given the speech task is refused by name later (describe)
        limit = getattr(config, "max_target_positions", None)
        return None if limit is None else int(limit)
    return position_limit(config)


def check_positions(b: Seq2SeqBuckets, spec, config, speech: bool) -> None:
    """Refuse buckets longer than the model's position tables (`spec`, the buckets as given,
    is named in the error), before anything is described or traced."""
    if not speech:
        check_relative_positions(b, spec, config)
    limit = seq2seq_position_limit(config, speech)
    if limit is None:
        return
    longest = b.cache_len if speech else max(max(b.sources), b.cache_len)
    if longest <= limit:
        return
    table = "max_target_positions" if speech else "max_position_embeddings"
    axes = "cache" if speech else "source and cache"
    default = (
        f" (cache defaults to {DEFAULT_CACHE})"
        if isinstance(spec, str) and "cache" not in spec and b.cache_len == longest
        else ""
    )
    raise BucketLimitError(
        f"buckets {spec!r} need {longest} positions{default}, more than the model's {limit} "
        f"(config {table}={limit}); use {axes} <= {limit}"
    )


def check_relative_positions(b: Seq2SeqBuckets, spec, config) -> None:
    """Refuse buckets that reach distances T5's relative positions give no bucket: with
    relative_attention_max_distance at most the exact buckets (num_buckets // 4 for the
    encoder, num_buckets // 2 for the decoder) the buckets fall below 0 past some distance,
    where Hugging Face's T5 fails (IndexError) and kernl has nothing to reproduce. The encoder
    runs over the whole source bucket (padding included), the decoder over the cache."""
    nb = getattr(config, "relative_attention_num_buckets", None)
    md = getattr(config, "relative_attention_max_distance", None)
    if not isinstance(nb, int) or not isinstance(md, int):
        return  # no relative positions (BART, mBART, Marian)
    for side, bidirectional, axis, longest in (
        ("encoder", True, "source", max(b.sources)),
        ("decoder", False, "cache", b.cache_len),
    ):
        limit = relative_distance_limit(bidirectional, nb, md)
        if limit is not None and longest > limit:
            exact = (nb // 2 if bidirectional else nb) // 2
            raise BucketLimitError(
                f"buckets {spec!r}: this T5's relative_attention_max_distance={md} is not above "
                f"its {side}'s {exact} exact buckets (relative_attention_num_buckets={nb}), so "
                f"{side} distances from {limit} on have no position bucket (Hugging Face's T5 "
                f"fails on them with an IndexError); {axis} {longest} reaches them: use "
                f"{axis} <= {limit}"
            )


def check_speech_prompt(b: Seq2SeqBuckets, spec, speech: SpeechSpec, start: int) -> None:
    """Refuse a Whisper cache too short for its decoder prompt and one new token: every call
    (or every call that names a language) would be refused at the runtime, and validation
    could not run."""
    longest = longest_decoder_prompt(speech, start)
    if b.cache_len >= longest:
        return
    raise BucketLimitError(
        f"buckets {spec!r}: cache {b.cache_len} is too short for this model's decoder prompt "
        f"of up to {longest} tokens (<|startoftranscript|>, then the language, task and "
        f"<|notimestamps|> tokens it takes) and a new token; use cache >= {longest}"
    )
