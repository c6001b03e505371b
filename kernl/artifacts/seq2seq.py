"""What an encoder-decoder artifact (seq2seq-lm: T5, BART, mBART, Marian; speech-seq2seq:
Whisper) declares about its model and its buckets, as plain dataclasses, and the check of that
description as a whole.

They live in `manifest.extra` as msgpack maps (`seq2seq`, `seq2seq_buckets`, and for Whisper
`speech`, its generation config: prompt tokens, suppressed tokens): the runtime's
encoder-decoder (kernl/runtime/generation/encoder_decoder.py) reads them to know the shapes
and the variant of each block; nothing in them names code. `check_seq2seq` is what `verify`
and `load` both run: every field typed and in range, the buckets bounded, and every weight the
runtime reads present with the shape and dtype the description implies (and no other weight).
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .errors import ArtifactCorruptError, ArtifactUnsafeError
from .generation import MAX_DIM, MAX_EOS_IDS, MAX_LAYERS, _is_int, _is_real
from .limits import DEFAULT_LIMITS, ReadLimits
from .schema import NEWER_KERNL_HINT

FAMILIES = ("t5", "bart", "mbart", "marian", "whisper")
NORMS = ("rms", "layer")  # T5LayerNorm (no mean, no bias) / nn.LayerNorm
MLPS = ("plain", "gated")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")  # runtime ACTIVATIONS
POSITIONS = ("relative", "learned")


@dataclass(frozen=True)
class Seq2SeqSpec:
    """The encoder-decoder architecture, normalised over T5 (v1.0, v1.1/flan), BART, mBART
    (BART pre-norm with a final norm on each side), Marian (BART post-norm without the embedding
    norm; its sinusoidal position table is stored as a `pos_embed` of offset 0) and Whisper.

    Weights follow one naming scheme (WEIGHT NAMES in kernl/compiler/tasks/seq2seq/describe.py):
    `embed.weight` (shared by encoder and decoder), `{enc,dec}.rel_bias.weight` (relative),
    `{enc,dec}.pos_embed.weight` (learned, `position_offset` rows first),
    `{enc,dec}.embed_norm.*`, `enc.layers.{i}.{attn_norm,qkv,o,mlp_norm,fc|gate_up,proj|down}`,
    `dec.layers.{i}.` the same plus `{cross_norm,cross_q,cross_kv,cross_o}`,
    `{enc,dec}.final_norm.*`, `lm_head.weight` (absent when tied), `final_logits_bias`,
    `dec.embed.weight` (`decoder_embed`: the decoder's own token table)."""

    family: str  # one of FAMILIES
    model_type: str
    num_encoder_layers: int
    num_decoder_layers: int
    d_model: int
    num_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    norm: str  # "rms" (T5) or "layer" (BART)
    norm_eps: float
    pre_norm: bool  # T5: norm before each block; BART: after the residual add
    mlp: str  # "plain" (fc, act, proj) or "gated" (act(gate) * up, then down)
    activation: str
    positions: str  # "relative" (T5 buckets) or "learned" (BART, with an offset)
    attention_scale: float  # T5: 1.0 (no scaling); BART: head_dim ** -0.5
    decoder_start_token_id: int
    relative_buckets: int = 0
    relative_max_distance: int = 0
    max_positions: int = 0  # learned-position rows, the offset included
    position_offset: int = 0
    embed_scale: float = 1.0  # multiplies token embeddings (BART scale_embedding)
    embed_norm: bool = False  # BART's layernorm_embedding
    final_norm: bool = True  # T5's final_layer_norm of encoder and decoder
    biases: bool = False  # every linear and norm has a bias (BART)
    logits_scale: float = 1.0  # T5 with tied embeddings: d_model ** -0.5
    tied_embeddings: bool = True
    final_logits_bias: bool = False
    pad_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Whisper: the encoder reads log-mel features [B, num_mel_bins, 2 * source_positions]
    # through two convolutions (the second of stride 2); its position table has
    # `source_positions` rows (1500 for one 30 s window), the decoder's `max_positions`.
    num_mel_bins: int = 0
    source_positions: int = 0
    # Fields added after format v1's first seq2seq artifacts; their defaults keep those valid.
    # mBART-50: the first new token is forced to this id (the target language), as Hugging
    # Face's ForcedBOSTokenLogitsProcessor does; a call may name another.
    forced_bos_token_id: int | None = None
    # mBART, Marian, BART: the last token `max_new_tokens` allows is forced to this id
    # (ForcedEOSTokenLogitsProcessor).
    forced_eos_token_id: int | None = None
    # Marian with share_encoder_decoder_embeddings=False: the decoder reads its own token
    # table `dec.embed.weight` (the head falls back to it, not to `embed.weight`, when tied).
    decoder_embed: bool = False
    # Ids never generated (Marian's bad_words_ids [[pad]], single tokens only), except a
    # call's EOS ids, which Hugging Face's bad-words rule lets through.
    suppress_tokens: list[int] = field(default_factory=list)
    # "kernl": a decode step of <= 16 rows runs each linear on kernl's few-rows kernels (the
    # norm before it in the prologue, bias and residual in the epilogue), from the artifact's
    # kernel binaries; "kernl-linear": the same with torch's norms; "torch": plain torch ops
    # (the compiler keeps the fastest).
    decode_kernels: str = "torch"
    # The launch tile of those kernels (block_n, block_k, split_k, warps, stages); []: their
    # defaults.
    decode_tile: list[int] = field(default_factory=list)
    # Per call site and batch bucket, the launch config the compiler timed best there:
    # [batch, kernel, site, *config] (the kernel's config fields in order, SITE_TILES). A
    # linear without one takes `decode_tile`; the cross-attention runs on kernl's
    # decode_attention only at a batch that has a ("decode_attention", "cross") entry.
    decode_site_tiles: list[list] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Seq2SeqSpec:
        names = ("eos_token_ids", "suppress_tokens", "decode_tile")
        lists = {k: [int(x) for x in d.get(k, [])] for k in names}
        sites = [
            [int(t[0]), str(t[1]), str(t[2]), *map(int, t[3:])]
            for t in d.get("decode_site_tiles", [])
        ]
        return Seq2SeqSpec(**{**d, **lists, "decode_site_tiles": sites})

    @property
    def frames(self) -> int:
        """Whisper: mel frames of one input window (3000 for 30 s)."""
        return 2 * self.source_positions


MAX_PROMPT = 8  # decoder prompt tokens (Whisper: start, language, task, no-timestamps)
MAX_LANGUAGES = 512
MAX_SUPPRESS = 1 << 16
DETECT = -1  # a prompt slot that language detection fills (Whisper's forced ids [1, None])


def forced_ids_follow_prompt(forced, vocab: int) -> bool:
    """Whisper's forced ids as kernl builds a decoder prompt of them: [1, id], [2, id], ...
    (an id a token, or DETECT), leaving room for a language, a task and no-timestamps."""
    return len(forced) < MAX_PROMPT - 2 and all(
        isinstance(f, (list, tuple))
        and len(f) == 2
        and f[0] == i + 1
        and _is_int(f[1])
        and (f[1] == DETECT or 0 <= f[1] < vocab)
        for i, f in enumerate(forced)
    )


@dataclass(frozen=True)
class SpeechSpec:
    """Whisper's generation config, as Hugging Face's WhisperGenerationMixin reads it for one
    30 s window without timestamps: the decoder prompt is the start token, then the entries of
    `forced_decoder_ids` (positions 1, 2, ...; a token of DETECT asks for language detection)
    unless the caller names a language or task, then a language id (`lang_to_id`, e.g.
    "<|en|>"), a task id (`task_to_id`: transcribe, translate) and `no_timestamps_token_id`.
    `suppress_tokens` never come out; `begin_suppress_tokens` not as the first new token.
    `language_names` maps the language names Hugging Face also takes ("english", "castilian")
    to their `lang_to_id` keys (empty in artifacts written before it). `language` (one, or
    one per row) and `task` are the config's, taken when a call names neither, as Hugging
    Face's `generation_config.language`/`.task` are (None in artifacts written before them)."""

    lang_to_id: dict[str, int] = field(default_factory=dict)
    language_names: dict[str, str] = field(default_factory=dict)
    task_to_id: dict[str, int] = field(default_factory=dict)
    no_timestamps_token_id: int | None = None
    is_multilingual: bool | None = None
    forced_decoder_ids: list[list[int]] = field(default_factory=list)  # [position, id|DETECT]
    suppress_tokens: list[int] = field(default_factory=list)
    begin_suppress_tokens: list[int] = field(default_factory=list)
    language: str | list[str] | None = None
    task: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # Written only when set: a reader older than them refuses unknown speech fields, which
        # is right where they change the prompt, and needless everywhere else.
        for name in ("language", "task"):
            if d[name] is None:
                del d[name]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> SpeechSpec:
        return SpeechSpec(**d)


@dataclass(frozen=True)
class Seq2SeqBuckets:
    """Shapes an encoder-decoder artifact serves.

    batches: batch buckets; each owns static buffers: a decoder self-attention KV cache of
      `cache_len` slots per row and cross-attention keys/values for the longest source.
    sources: encoder buckets (source lengths); a source is padded on the right to the
      smallest that holds it.
    caches: decoder self-attention lengths; a decode step at slot `n` attends to the
      smallest length > n. The largest is `cache_len`, the most new tokens a call makes."""

    batches: list[int]
    sources: list[int]
    caches: list[int]

    @property
    def cache_len(self) -> int:
        return max(self.caches)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Seq2SeqBuckets:
        return Seq2SeqBuckets(
            *(sorted(int(x) for x in d[k]) for k in ("batches", "sources", "caches"))
        )

    def encoder_shapes(self) -> list[tuple[int, int]]:
        return [(b, s) for b in self.batches for s in self.sources]


@dataclass(frozen=True)
class Seq2SeqDescription:
    """A seq2seq-lm manifest's `extra`, parsed and checked."""

    spec: Seq2SeqSpec
    buckets: Seq2SeqBuckets
    speech: SpeechSpec | None = None


_INT_FIELDS = (
    "num_encoder_layers",
    "num_decoder_layers",
    "d_model",
    "num_heads",
    "head_dim",
    "ffn_dim",
    "vocab_size",
)
_SMALL_INT_FIELDS = (
    "relative_buckets",
    "relative_max_distance",
    "max_positions",
    "position_offset",
    "num_mel_bins",
    "source_positions",
)
DECODE_KERNELS = ("torch", "kernl", "kernl-linear")
_LINEAR_SITES = ("qkv", "o", "cross_q", "cross_o", "fc", "proj", "gate_up", "down")
# The call sites of a decode step a site tile may name, per kernel; after them the number of
# config fields: (block_n, block_k, split_k, warps, stages) for the linears, (BLOCK_N, warps,
# stages, splits) for decode attention.
SITE_TILES: dict[str, tuple[tuple[str, ...], int]] = {
    "norm_linear": (("qkv", "cross_q", "fc", "gate_up"), 5),
    "skinny_linear_fused": (_LINEAR_SITES, 5),
    "decode_attention": (("cross",), 4),
}


def _is_tile(t: list) -> bool:
    """(block_n, block_k, split_k, warps, stages) as Triton can launch them."""
    if len(t) != 5 or not all(_is_int(v) for v in t):
        return False
    block_n, block_k, split, warps, stages = t
    powers = (16, 32, 64, 128, 256)
    return (
        block_n in powers and block_k in powers and 0 <= split <= 64 and warps in (1, 2, 4, 8)
    ) and 1 <= stages <= 8


def _is_site_tile(t: Any) -> bool:
    """[batch <= 16, kernel, site, *config] as SITE_TILES describes it."""
    if not (isinstance(t, list) and len(t) >= 3 and _is_int(t[0]) and 1 <= t[0] <= 16):
        return False
    sites, width = SITE_TILES.get(t[1], ((), 0)) if isinstance(t[1], str) else ((), 0)
    config = t[3:]
    if t[2] not in sites or len(config) != width:
        return False
    if width == 5:
        return _is_tile(config)
    block_n, warps, stages, splits = config
    return (
        all(_is_int(v) for v in config)
        and block_n in (16, 32, 64, 128, 256)
        and warps in (1, 2, 4, 8)
        and 1 <= stages <= 8
        and 0 <= splits <= 1024
    )


_CHOICES = {
    "family": FAMILIES,
    "norm": NORMS,
    "mlp": MLPS,
    "activation": ACTIVATIONS,
    "positions": POSITIONS,
}
_BOOLS = (
    "pre_norm",
    "embed_norm",
    "final_norm",
    "biases",
    "tied_embeddings",
    "final_logits_bias",
    "decoder_embed",
)
_REALS = ("norm_eps", "attention_scale", "embed_scale", "logits_scale")


def _bad(where: str, what: str) -> ArtifactCorruptError:
    return ArtifactCorruptError(f"{where}: the seq2seq description is invalid: {what}")


def _check_spec(d: Any, where: str) -> Seq2SeqSpec:
    if not isinstance(d, dict):
        raise _bad(where, "extra.seq2seq is not a map")
    names = {f.name for f in fields(Seq2SeqSpec)}
    required = {
        f.name for f in fields(Seq2SeqSpec) if f.default is MISSING and f.default_factory is MISSING
    }
    missing = sorted(required - set(d))
    if missing:
        raise _bad(where, f"fields {missing} are missing")
    unknown = sorted(str(k) for k in d if k not in names)
    if unknown:
        raise _bad(where, f"unknown fields {unknown}{NEWER_KERNL_HINT}")
    if not isinstance(d["model_type"], str):
        raise _bad(where, f"seq2seq.model_type {d['model_type']!r} is not a string")
    for name in _INT_FIELDS:
        v = d[name]
        top = MAX_LAYERS if name.endswith("layers") else MAX_DIM
        if not (_is_int(v) and 0 < v <= top):
            raise _bad(where, f"seq2seq.{name} is {v!r}, not an integer in 1..{top}")
    for name in _SMALL_INT_FIELDS:
        v = d.get(name, 0)
        if not (_is_int(v) and 0 <= v <= MAX_DIM):
            raise _bad(where, f"seq2seq.{name} is {v!r}, not an integer in 0..{MAX_DIM}")
    for name, allowed in _CHOICES.items():
        if not isinstance(d[name], str) or d[name] not in allowed:
            raise _bad(
                where, f"seq2seq.{name} is {d[name]!r}, not one of {allowed}{NEWER_KERNL_HINT}"
            )
    for name in _REALS:
        if name in d and not _is_real(d[name]):
            raise _bad(where, f"seq2seq.{name} is {d[name]!r}, not a finite number")
    for name in _BOOLS:
        if name in d and not isinstance(d[name], bool):
            raise _bad(where, f"seq2seq.{name} is {d[name]!r}, not a boolean")
    tile = d.get("decode_tile", [])
    if not (isinstance(tile, list) and (tile == [] or _is_tile(tile))):
        raise _bad(where, f"seq2seq.decode_tile is {tile!r}, not [] or a launch tile")
    sites = d.get("decode_site_tiles", [])
    if not (isinstance(sites, list) and len(sites) <= 1024 and all(map(_is_site_tile, sites))):
        bad = (
            sites
            if not isinstance(sites, list)
            else next((t for t in sites if not _is_site_tile(t)), sites)
        )
        raise _bad(where, f"seq2seq.decode_site_tiles holds {bad!r}, not a site tile"[:300])
    if d.get("decode_kernels", "torch") not in DECODE_KERNELS:
        raise _bad(
            where, f"seq2seq.decode_kernels is {d['decode_kernels']!r}, not one of {DECODE_KERNELS}"
        )
    if d["num_heads"] * d["head_dim"] > MAX_DIM:
        raise _bad(where, f"{d['num_heads']} heads x {d['head_dim']} is more than {MAX_DIM}")
    if d["positions"] == "relative":
        if d.get("relative_buckets", 0) < 2 or d.get("relative_max_distance", 0) < 2:
            raise _bad(where, "relative positions need relative_buckets and max_distance >= 2")
    elif d.get("max_positions", 0) <= d.get("position_offset", 0):
        raise _bad(where, "learned positions need max_positions > position_offset")
    vocab = d["vocab_size"]
    for name in (
        "decoder_start_token_id",
        "pad_token_id",
        "forced_bos_token_id",
        "forced_eos_token_id",
    ):
        v = d.get(name)
        if not (
            (v is None and name != "decoder_start_token_id") or (_is_int(v) and 0 <= v < vocab)
        ):
            raise _bad(where, f"seq2seq.{name} is {v!r}, not a token id in [0, {vocab})")
    front_end = d.get("num_mel_bins", 0) > 0 and d.get("source_positions", 0) > 0
    if (d["family"] == "whisper") != front_end:
        raise _bad(where, "num_mel_bins and source_positions are set for family whisper only")
    eos = d.get("eos_token_ids", [])
    if not (
        isinstance(eos, list)
        and len(eos) <= MAX_EOS_IDS
        and all(_is_int(e) and 0 <= e < vocab for e in eos)
    ):
        raise _bad(where, f"seq2seq.eos_token_ids is {eos!r}, not at most {MAX_EOS_IDS} ids")
    if not _token_list(d.get("suppress_tokens", []), vocab, MAX_SUPPRESS):
        raise _bad(where, f"seq2seq.suppress_tokens is not a list of token ids in [0, {vocab})")
    # Whisper's prompt and suppressed tokens live in extra.speech, which its runtime reads.
    text_only = ("forced_bos_token_id", "forced_eos_token_id", "suppress_tokens")
    if d["family"] == "whisper" and any(d.get(k) for k in text_only):
        raise _bad(where, f"seq2seq.{'/'.join(text_only)} are not for family whisper")
    return Seq2SeqSpec.from_dict(d)


def _token_list(v: Any, vocab: int, top: int) -> bool:
    return isinstance(v, list) and len(v) <= top and all(_is_int(t) and 0 <= t < vocab for t in v)


def speech_with_names(extra: dict) -> Any:
    """extra.speech with the language names, which live beside it (extra.speech_language_names)
    so that a reader older than them, which refuses unknown speech fields, still reads the
    artifact (docs/reliability.md: additions under extra are ignored by older readers)."""
    speech, names = extra.get("speech"), extra.get("speech_language_names")
    if isinstance(speech, dict) and names is not None:
        return {**speech, "language_names": names}
    return speech


def _check_speech(d: Any, vocab: int, where: str) -> SpeechSpec:
    if not isinstance(d, dict):
        raise _bad(where, "extra.speech (Whisper's generation config) is not a map")
    unknown = sorted(str(k) for k in d if k not in {f.name for f in fields(SpeechSpec)})
    if unknown:
        raise _bad(where, f"unknown speech fields {unknown}")
    for name, allowed in (("lang_to_id", None), ("task_to_id", ("transcribe", "translate"))):
        v = d.get(name, {})
        if not (
            isinstance(v, dict)
            and len(v) <= MAX_LANGUAGES
            and all(isinstance(k, str) and len(k) <= 64 for k in v)
            and (allowed is None or set(v) <= set(allowed))
            and _token_list(list(v.values()), vocab, MAX_LANGUAGES)
        ):
            raise _bad(where, f"speech.{name} is not a map of names to token ids in [0, {vocab})")
    names = d.get("language_names", {})
    if not (
        isinstance(names, dict)
        and len(names) <= MAX_LANGUAGES
        and all(isinstance(k, str) and len(k) <= 64 for k in names)
        and all(isinstance(v, str) and v in d.get("lang_to_id", {}) for v in names.values())
    ):
        raise _bad(where, "speech language_names is not a map of names to lang_to_id keys")
    no_ts = d.get("no_timestamps_token_id")
    if no_ts is not None and not (_is_int(no_ts) and 0 <= no_ts < vocab):
        raise _bad(where, f"speech.no_timestamps_token_id is {no_ts!r}, not a token id")
    if d.get("is_multilingual") not in (None, True, False):
        raise _bad(where, "speech.is_multilingual is not a boolean or None")
    forced = d.get("forced_decoder_ids", [])
    if not (isinstance(forced, list) and forced_ids_follow_prompt(forced, vocab)):
        raise _bad(where, "speech.forced_decoder_ids is not a list of [1, id], [2, id], ...")
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        if not _token_list(d.get(name, []), vocab, MAX_SUPPRESS):
            raise _bad(where, f"speech.{name} is not a list of token ids in [0, {vocab})")
    language = d.get("language")
    if not (
        language is None
        or (isinstance(language, str) and len(language) <= 64)
        or (
            isinstance(language, list)
            and len(language) <= MAX_LANGUAGES
            and all(isinstance(x, str) and len(x) <= 64 for x in language)
        )
    ):
        raise _bad(where, "speech.language is not a language name or a list of them")
    if d.get("task") not in (None, *d.get("task_to_id", {})):
        raise _bad(where, f"speech.task is {d.get('task')!r}, not one of speech.task_to_id")
    return SpeechSpec.from_dict(d)


def _check_buckets(d: Any, where: str, limits: ReadLimits) -> Seq2SeqBuckets:
    if not isinstance(d, dict) or set(d) != {"batches", "sources", "caches"}:
        raise _bad(where, "extra.seq2seq_buckets is not a map of batches, sources and caches")
    for name, top in (
        ("batches", limits.max_batch),
        ("sources", limits.max_seq),
        ("caches", limits.max_seq),
    ):
        v = d[name]
        if not (isinstance(v, list) and v and all(_is_int(x) for x in v)):
            raise _bad(where, f"seq2seq_buckets.{name} is {v!r}, not a non-empty integer list")
        if len(set(v)) != len(v) or not all(0 < x <= top for x in v):
            raise _bad(where, f"seq2seq_buckets.{name} is {v!r}: distinct sizes in 1..{top}")
    buckets = Seq2SeqBuckets.from_dict(d)
    count = len(buckets.encoder_shapes()) + len(buckets.batches) * len(buckets.caches)
    if count > limits.max_buckets:
        raise ArtifactUnsafeError(
            f"{where}: {count} seq2seq buckets, more than the {limits.max_buckets} a reader accepts"
        )
    for b in buckets.batches:
        tokens = b * (buckets.cache_len + max(buckets.sources))
        if tokens > limits.max_bucket_tokens:
            raise ArtifactUnsafeError(
                f"{where}: batch {b} x (cache {buckets.cache_len} + source "
                f"{max(buckets.sources)}) is {tokens} tokens of static buffers, more than the "
                f"{limits.max_bucket_tokens} a reader allocates"
            )
    return buckets


def expected_weights(spec: Seq2SeqSpec, dtype: str) -> dict[str, tuple[list[int], str]]:
    """Every weight the runtime's encoder-decoder reads for `spec`: name -> (shape, dtype)."""
    h, f, v = spec.d_model, spec.ffn_dim, spec.vocab_size
    inner = spec.num_heads * spec.head_dim
    out: dict[str, tuple[list[int], str]] = {"embed.weight": ([v, h], dtype)}
    if spec.decoder_embed:
        out["dec.embed.weight"] = ([v, h], dtype)

    def linear(name: str, rows: int, cols: int) -> None:
        out[name + ".weight"] = ([rows, cols], dtype)
        if spec.biases:
            out[name + ".bias"] = ([rows], dtype)

    def norm(name: str) -> None:
        out[name + ".weight"] = ([h], dtype)
        if spec.norm == "layer":
            out[name + ".bias"] = ([h], dtype)

    if spec.family == "whisper":  # the convolutional front end and its own position table
        out["enc.conv1.weight"] = ([h, spec.num_mel_bins, 3], dtype)
        out["enc.conv2.weight"] = ([h, h, 3], dtype)
        out["enc.conv1.bias"] = out["enc.conv2.bias"] = ([h], dtype)
    for side, layers in (("enc", spec.num_encoder_layers), ("dec", spec.num_decoder_layers)):
        if spec.positions == "relative":
            out[f"{side}.rel_bias.weight"] = ([spec.relative_buckets, spec.num_heads], dtype)
        elif side == "enc" and spec.family == "whisper":
            out["enc.pos_embed.weight"] = ([spec.source_positions, h], dtype)
        else:
            out[f"{side}.pos_embed.weight"] = ([spec.max_positions, h], dtype)
        if spec.embed_norm:
            norm(f"{side}.embed_norm")
        if spec.final_norm:
            norm(f"{side}.final_norm")
        for n in range(layers):
            p = f"{side}.layers.{n}."
            norm(p + "attn_norm")
            linear(p + "qkv", 3 * inner, h)
            linear(p + "o", h, inner)
            if side == "dec":
                norm(p + "cross_norm")
                linear(p + "cross_q", inner, h)
                linear(p + "cross_kv", 2 * inner, h)
                linear(p + "cross_o", h, inner)
            norm(p + "mlp_norm")
            if spec.mlp == "gated":
                linear(p + "gate_up", 2 * f, h)
                linear(p + "down", h, f)
            else:
                linear(p + "fc", f, h)
                linear(p + "proj", h, f)
    if not spec.tied_embeddings:
        out["lm_head.weight"] = ([v, h], dtype)
    if spec.final_logits_bias:
        out["final_logits_bias"] = ([v], dtype)
    return out


def check_seq2seq(
    extra: dict[str, Any],
    dtype: str,
    weights: dict[str, tuple[list[int], str]],
    where: str,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> Seq2SeqDescription:
    """The seq2seq description of a manifest (`extra`) against itself, the limits and the
    weights file (`weights`: name -> (shape, dtype name), from its header). Raises
    ArtifactCorruptError (malformed, inconsistent) or ArtifactUnsafeError (over the limits)."""
    if not isinstance(extra, dict):
        raise _bad(where, "extra is not a map")
    spec = _check_spec(extra.get("seq2seq"), where)
    buckets = _check_buckets(extra.get("seq2seq_buckets"), where, limits)
    speech = None
    if spec.family == "whisper":
        speech = _check_speech(speech_with_names(extra), spec.vocab_size, where)
        if buckets.sources != [spec.source_positions]:
            raise _bad(where, f"a Whisper source is {spec.source_positions} encoder positions")
    elif "speech" in extra:
        raise _bad(where, f"extra.speech is for Whisper, not {spec.family}")
    if spec.positions == "learned":
        room = spec.max_positions - spec.position_offset
        longest = buckets.cache_len if speech else max(max(buckets.sources), buckets.cache_len)
        if room < longest:
            raise _bad(where, f"{room} learned positions cannot index {longest} tokens")
    expected = expected_weights(spec, dtype)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise _bad(where, f"weights {missing[:5]} are missing")
    extra_names = sorted(set(weights) - set(expected))
    if extra_names:
        raise _bad(where, f"weights {extra_names[:5]} are not part of the model")
    for name, (shape, dt) in expected.items():
        got = weights[name]
        if list(got[0]) != shape or got[1] != dt:
            raise _bad(where, f"weight {name} is {got[1]} {list(got[0])}, expected {dt} {shape}")
    return Seq2SeqDescription(spec, buckets, speech)


def seq2seq_memory(desc: Seq2SeqDescription, itemsize: int) -> tuple[int, int]:
    """(static buffers, activation pool) in bytes of an encoder-decoder artifact at load,
    following kernl/runtime/generation/seq2seq.py (`_State`, per batch bucket; one KV cache) and
    encoder_decoder.py (the largest encoder call's intermediates; an upper-side estimate).
    Whisper's cross-attention keys and values dominate: 2 x layers x batch x 1500 x d_model."""
    s, b = desc.spec, desc.buckets
    inner = s.num_heads * s.head_dim
    longest = max(b.sources)
    # one cache, the largest bucket's, whose storage every bucket views
    static = 2 * s.num_decoder_layers * max(b.batches) * inner * (b.cache_len + longest) * itemsize
    for batch in b.batches:
        static += sum(batch * source * 9 for source in b.sources)  # source ids, valid flags
        if desc.speech is not None:
            static += batch * s.num_mel_bins * s.frames * itemsize
        static += batch * b.cache_len * 8 + batch * MAX_PROMPT * 8  # generated ids, prompt
        static += batch * 5 * 8  # the sampler's per-row parameters
        # token masks over the vocabulary (suppressed, languages), per-row flags, scalars
        static += 4 * s.vocab_size + 64 * batch + 4096
    pool = 0
    for batch, source in b.encoder_shapes():
        per_position = 3 * inner + s.ffn_dim * (2 if s.mlp == "gated" else 1) + 4 * s.d_model
        act = batch * source * per_position * itemsize
        if desc.speech is None:  # the additive mask (and T5's relative bias) of every pair
            act += batch * s.num_heads * source * source * itemsize
        else:  # the front end's two convolutions over the mel frames
            act += 2 * batch * s.d_model * s.frames * itemsize
        pool = max(pool, act)
    decode = max(b.batches) * (s.vocab_size * 4 * 3 + 4 * s.ffn_dim * itemsize)
    return static, max(pool, decode)
