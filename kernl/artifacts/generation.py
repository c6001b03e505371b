"""What a causal-LM artifact declares about its model, its buckets and the kernels of its
decode step, as plain dataclasses, and the check of that description as a whole.

All live in `manifest.extra` as msgpack maps: the runtime's decoder
(kernl/runtime/generation/decoder.py) reads them to know the shapes and the variant of each
block; nothing in them names code. `check_generation` is what `verify` and `load` both run:
every field typed and in range, the buckets bounded, and every weight the decoder reads
present with the shape and dtype the description implies (and no other weight), so that a
description and weights that disagree are refused before anything is allocated."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, NamedTuple

from .errors import ArtifactCorruptError, ArtifactUnsafeError
from .limits import DEFAULT_LIMITS, ReadLimits
from .schema import NEWER_KERNL_HINT

FAMILIES = ("llama", "gpt2")
NORMS = ("rms", "layer")
MLPS = ("gated", "plain")
# The runtime maps these names to functions (generation/decoder.py ACTIVATIONS).
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
POSITIONS = ("rope", "learned")
MAX_EOS_IDS = 8  # the runtime's static EOS buffer (generation/state.py MAX_EOS_IDS)


@dataclass(frozen=True)
class DecoderSpec:
    """The decoder-only architecture, normalised over the supported families.

    Weights follow one naming scheme whatever the family (see WEIGHT NAMES in
    kernl/compiler/tasks/causal_lm/describe.py): `embed`, `pos_embed` (learned positions),
    `layers.{i}.{attn_norm,qkv,o,mlp_norm,gate_up,down,fc,proj}.{weight,bias}`,
    `layers.{i}.{post_attn_norm,post_mlp_norm}.weight` (Gemma2's sandwich norms),
    `final_norm.{weight,bias}`, `lm_head.weight` (absent when tied to `embed`),
    `rope.inv_freq` (float32) for rotary models, and `rope.local_inv_freq` (float32) where
    `rope_local_layers` is set."""

    family: str  # "llama" (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma2, Gemma3) or "gpt2"
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    norm: str  # "rms" or "layer"
    norm_eps: float
    mlp: str  # "gated" (act(gate) * up, then down) or "plain" (fc, act, proj)
    activation: str  # a name from the runtime decoder's ACTIVATIONS
    positions: str  # "rope" or "learned"
    max_positions: int | None  # learned-position table size, None when unbounded
    attention_scale: float
    rope_attention_scaling: float = 1.0  # multiplies cos and sin (HF's attention_scaling)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tied_embeddings: bool = False
    # Qwen3: an RMSNorm over each query and key head (`layers.{i}.{q,k}_norm.weight`, [head_dim])
    # after the QKV projection, before the rotary embedding
    qk_norm: bool = False
    # Gemma: the token embeddings times this scale, the scale first rounded to the model dtype
    # (sqrt(hidden): 55.4256 becomes 55.5 in bf16, as Hugging Face computes it)
    embed_scale: float = 1.0
    # Gemma: every RMSNorm scales by (1 + weight), the weight as stored, in float32 with the
    # normalised row, rounded to the model dtype once after the scale (Llama's rounds before)
    norm_plus_one: bool = False
    # Gemma2: the attention scores (after the scale) become tanh(s / cap) * cap before the mask
    # and the softmax; None: no softcapping
    attn_logit_softcap: float | None = None
    # Gemma2: the logits become tanh(logits / cap) * cap after lm_head; None: no softcapping
    final_logit_softcap: float | None = None
    # Gemma2: an RMSNorm of the attention output before its residual add
    # (`layers.{i}.post_attn_norm.weight`) and of the MLP output before its own
    # (`layers.{i}.post_mlp_norm.weight`), both [hidden]; mlp_norm is the one before the MLP
    sandwich_norms: bool = False
    pad_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Mistral, Phi-3 (every layer), Qwen2/Qwen3 with use_sliding_window and Gemma2 (the
    # sliding_attention layers of layer_types): the layers in `sliding_layers` let the query at
    # cache slot i attend to the slots j with i - j < sliding_window only, as Hugging Face's
    # sliding_window_overlay (kv_idx > q_idx - window) does; None: every layer sees the cache
    sliding_window: int | None = None
    sliding_layers: list[int] = field(default_factory=list)
    # Gemma3: its sliding-window layers rotate with their own table (rope_theta 10000) and its
    # full-attention layers with another (1e6, linear scaling in 4B and up): the layers listed
    # here rotate by `rope.local_inv_freq` with this cos/sin scaling, the others by
    # `rope.inv_freq` and rope_attention_scaling. Empty: one table for every layer
    rope_local_layers: list[int] = field(default_factory=list)
    rope_local_attention_scaling: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> DecoderSpec:
        known = {f.name for f in fields(DecoderSpec)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"decoder description has unknown fields {unknown}")
        lists = {
            k: [int(x) for x in d.get(k, [])]
            for k in ("eos_token_ids", "sliding_layers", "rope_local_layers")
        }
        return DecoderSpec(**{**d, **lists})


@dataclass(frozen=True)
class GenerationBuckets:
    """Shapes a causal-LM artifact serves.

    batches: batch buckets; each has a static KV cache of `cache_len` slots per row (all but
      the smallest views of one storage, the largest's: runtime/generation/state.py).
    prompts: prefill buckets (prompt lengths); a prompt is left-padded to the smallest that
      holds it, so the prefill fills slots [0, prompt) of the cache.
    kv_lengths: decode buckets (attended cache lengths); a decode step with `n` filled slots
      runs the graph of the smallest length > n, so short contexts do not read the full
      cache. The largest equals `cache_len`."""

    batches: list[int]
    prompts: list[int]
    kv_lengths: list[int]

    @property
    def cache_len(self) -> int:
        return max(self.kv_lengths)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> GenerationBuckets:
        return GenerationBuckets(
            batches=sorted(int(x) for x in d["batches"]),
            prompts=sorted(int(x) for x in d["prompts"]),
            kv_lengths=sorted(int(x) for x in d["kv_lengths"]),
        )

    def prefill_shapes(self) -> list[tuple[int, int]]:
        return [(b, p) for b in self.batches for p in self.prompts]

    def decode_shapes(self) -> list[tuple[int, int]]:
        return [(b, k) for b in self.batches for k in self.kv_lengths]


# Each piece's implementations, plain torch first (the default).
DECODE_KERNEL_CHOICES: dict[str, tuple[str, ...]] = {
    "attention": ("torch", "sdpa", "triton"),
    "norm": ("torch", "triton", "fused"),
    "gated_mlp": ("torch", "triton"),
    "linear": ("torch", "triton", "fused"),
    "rope": ("torch", "triton", "fused"),
    "lm_head": ("torch", "triton"),
    "step": ("pieces", "persistent"),
}


# The persistent step's config (kernl.kernels.decode_step.DecodeStepConfig) as a manifest
# stores it, field by field, and the values each field may take: the reader checks them here,
# without importing the kernel.
_POW2 = lambda lo, hi: lambda v: lo <= v <= hi and v & (v - 1) == 0  # noqa: E731
_RANGE = lambda lo, hi: lambda v: lo <= v <= hi  # noqa: E731
STEP_CONFIG_FIELDS: dict[str, Any] = {
    "BLOCK_K": _POW2(16, 1024),
    "QKV_N": _POW2(16, 256),
    "O_N": _POW2(16, 256),
    "UP_N": _POW2(16, 256),
    "DOWN_N": _POW2(16, 256),
    "LM_N": _POW2(16, 512),
    "SPLIT_QKV": _RANGE(1, 32),
    "SPLIT_O": _RANGE(1, 32),
    "SPLIT_UP": _RANGE(1, 32),
    "SPLIT_DOWN": _RANGE(1, 32),
    "ATT_SPLITS": _POW2(1, 128),
    "ATT_BLOCK": _POW2(16, 256),
    "num_warps": _POW2(1, 16),
    "num_stages": _RANGE(1, 8),
    "programs_per_sm": _RANGE(1, 8),
    "flatten": _RANGE(0, 1),
    "o_waits_group": _RANGE(0, 1),
    "att_fill": _RANGE(0, 1),
    "DOWN_BLOCK_K": lambda v: v == 0 or _POW2(16, 1024)(v),
    "up_ahead_k": _RANGE(0, 1 << 16),
    "att_waits_qkv": _RANGE(0, 1),
    "QKV_PAIRS": _RANGE(0, 256),
}


def check_step_config(pairs: tuple) -> None:
    """ValueError unless `pairs` ((name, int), ...) names each field of STEP_CONFIG_FIELDS at
    most once, with a value it allows (0 or 1 for a flag)."""
    seen = set()
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(f"DecodeKernels.step_config holds {pair!r}, not a (name, value)")
        name, value = pair
        ok = name in STEP_CONFIG_FIELDS and name not in seen and isinstance(value, int)
        if not ok or not STEP_CONFIG_FIELDS[name](int(value)):
            raise ValueError(f"DecodeKernels.step_config: {name!r}={value!r} is not allowed")
        seen.add(name)


def _checked_pairs(pairs: Any) -> tuple:
    """A step config's (name, value) pairs as tuples (a manifest or a user's dict holds lists),
    at most 32 of them, each checked (check_step_config); else ValueError."""
    if isinstance(pairs, list):
        pairs = tuple(tuple(p) if isinstance(p, list) else p for p in pairs)
    if not isinstance(pairs, tuple) or len(pairs) > 32:
        raise ValueError("DecodeKernels.step_config must be a tuple of (name, value) pairs")
    check_step_config(pairs)
    return pairs


def _checked_step_buckets(entries: Any) -> tuple:
    """DecodeKernels.step_buckets as tuples (a manifest holds lists), or ValueError: at most
    256 entries of (batch 1..16, cache slots 1..2**20, config pairs), no bucket twice."""
    if not isinstance(entries, (list, tuple)) or len(entries) > 256:
        raise ValueError("DecodeKernels.step_buckets must be a list of at most 256 entries")
    out, seen = [], set()
    for e in entries:
        ok = isinstance(e, (list, tuple)) and len(e) == 3 and isinstance(e[2], (list, tuple))
        if not ok or not all(isinstance(x, int) and not isinstance(x, bool) for x in e[:2]):
            raise ValueError(f"DecodeKernels.step_buckets holds {e!r}, not (batch, cache, pairs)")
        batch, cache = int(e[0]), int(e[1])
        if not (1 <= batch <= 16 and 1 <= cache <= 1 << 20) or (batch, cache) in seen:
            raise ValueError(f"DecodeKernels.step_buckets: bucket {batch}x{cache} not allowed")
        seen.add((batch, cache))
        out.append((batch, cache, _checked_pairs(list(e[2]))))
    return tuple(out)


# The kernels whose launch config the compiler tunes per decode batch (<= 16 rows), and the
# call sites of a decode step they run at (generation/decoder.py).
DECODE_TILE_KERNELS: dict[str, tuple[str, ...]] = {
    "norm_linear": ("qkv", "up"),  # the norm folded in (norm "fused")
    "skinny_linear_fused": ("qkv", "up", "o", "down"),  # qkv, up: after a norm of their own
    "gated_mlp": ("up",),  # gate/up + SiLU·mul after a norm of its own (gated_mlp "triton")
    "lm_head_argmax": ("lm_head",),
    "decode_attention": ("attn",),
}
# The kernels without a split-K: their tiles take split_k 0.
UNSPLIT_TILE_KERNELS = ("lm_head_argmax", "gated_mlp")
# The kernels that read the KV cache: their tiles are per cache length too.
CACHE_TILE_KERNELS = ("decode_attention",)
MAX_TILE_CACHE = 1 << 20


class DecodeTile(NamedTuple):
    """The launch config the compiler measured best for one kernel at one call site of the
    decode steps of one batch bucket and, for a kernel that reads the KV cache, one cache
    length (`cache`, a decode bucket's kv length; 0: every length, as for the kernels that do
    not read the cache, and every tile written before the field existed). Field for field the
    kernel's own config dataclass: split_k 0 is the kernel's automatic split; lm_head_argmax
    and gated_mlp have no split and take 0 (gated_mlp's decode tiles are BLOCK_M 16, GROUP_M
    1); decode_attention's split_k is its number of chunks and it has no K tile (block_k 0).
    A NamedTuple so that DecodeKernels stays hashable and `asdict` leaves it whole; stored as
    a list in the manifest."""

    batch: int
    kernel: str
    site: str
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    cache: int = 0

    def check(self) -> None:
        """ValueError unless every field is in the range the kernels accept."""
        ints = (self.batch, self.block_n, self.block_k, self.split_k, self.num_warps)
        ints += (self.num_stages, self.cache)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            raise ValueError(f"DecodeTile fields must be ints: {self}")
        if self.site not in DECODE_TILE_KERNELS.get(self.kernel, ()):
            raise ValueError(f"DecodeTile: no call site {self.site!r} for kernel {self.kernel!r}")
        pow2 = lambda v, hi: 16 <= v <= hi and v & (v - 1) == 0  # noqa: E731
        attention = self.kernel == "decode_attention"
        ok = 1 <= self.batch <= 16 and pow2(self.block_n, 1024)
        ok = ok and (self.block_k == 0 if attention else pow2(self.block_k, 1024))
        ok = ok and self.num_warps in (1, 2, 4, 8, 16) and 1 <= self.num_stages <= 8
        ok = ok and 0 <= self.split_k <= 64 and 0 <= self.cache <= MAX_TILE_CACHE
        ok = ok and (self.kernel in CACHE_TILE_KERNELS or self.cache == 0)
        if not ok or (self.kernel in UNSPLIT_TILE_KERNELS and self.split_k != 0):
            raise ValueError(f"DecodeTile out of range: {self}")


@dataclass(frozen=True)
class DecodeKernels:
    """The implementation of each replaceable piece of a decode step.
    attention: "torch" (baddbmm + softmax + bmm), "sdpa" (F.scaled_dot_product_attention
    with GQA and a boolean mask) or "triton" (kernl.kernels.decode_attention);
    norm: "torch", "triton" (kernl.kernels.norm) or "fused" (folded into the next linear:
    kernl.kernels.norm_linear, with the gated MLP's SiLU*up in its epilogue); gated_mlp:
    "torch" or "triton" (kernl.kernels.gated_mlp; used where the MLP is gated SiLU without
    bias); linear: "torch", "triton" (kernl.kernels.skinny_linear, split-K and a reduce
    kernel) or "fused" (kernl.kernels.skinny_linear_fused, reduced in the same launch, bias and
    residual in its epilogue), for batches of <= 16 rows; rope: "torch", "triton"
    (kernl.kernels.rope_cache_write: rotary and the KV-cache write in one kernel) or "fused"
    (with norm "fused": in the QKV projection's epilogue, kernl.kernels.norm_linear_rope;
    otherwise as "triton"); lm_head:
    "torch" or "triton" (kernl.kernels.lm_head_argmax: the greedy step's logits and argmax
    in one pass). Manifests written before rope and lm_head existed read as "torch".
    step: "pieces" (the pieces above, one kernel or more each) or "persistent" (the whole step
    of a Llama-family decoder in one persistent kernel, kernl.kernels.decode_step, for
    batches of <= 16 rows; the pieces still serve what it does not). Manifests written before
    it existed read as "pieces". step_config: the persistent step's launch config the
    compiler measured best, as (field, value) pairs of DecodeStepConfig (empty: its default).
    step_buckets: where not empty, the decode buckets the persistent step serves, each
    (batch, cache slots, config pairs) with its own config; the pieces serve the others
    (the compiler keeps the persistent step where it timed faster, bucket by bucket).
    tiles: the launch configs the compiler measured best per decode batch (`DecodeTile`;
    decode attention's per cache length too); a kernel with no tile for its batch and site
    (and cache length) runs its default config.
    pdl: launch the fused kernels with programmatic dependent launch (Hopper and later; each
    waits for the previous kernel's writes before reading, so the next one's launch overlaps
    this one's tail); kept by the compiler only where it timed faster and computed the same.
    prefetch (with pdl only): the weight-streaming kernels first ask L2 for their first weight
    lines, before they wait for the previous kernel; kept on the same terms."""

    attention: str = "torch"
    norm: str = "torch"
    gated_mlp: str = "torch"
    linear: str = "torch"
    rope: str = "torch"
    lm_head: str = "torch"
    step: str = "pieces"
    step_config: tuple[tuple[str, int], ...] = ()
    step_buckets: tuple[tuple[int, int, tuple[tuple[str, int], ...]], ...] = ()
    tiles: tuple[DecodeTile, ...] = ()
    pdl: bool = False
    prefetch: bool = False

    def __post_init__(self):
        for name, allowed in DECODE_KERNEL_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"DecodeKernels.{name} must be one of {allowed}")
        if not isinstance(self.pdl, bool) or not isinstance(self.prefetch, bool):
            raise ValueError("DecodeKernels.pdl and .prefetch must be bools")
        if self.prefetch and not self.pdl:
            raise ValueError("DecodeKernels.prefetch needs pdl (it runs before the PDL wait)")
        object.__setattr__(self, "step_config", _checked_pairs(self.step_config))
        object.__setattr__(self, "step_buckets", _checked_step_buckets(self.step_buckets))
        if not isinstance(self.tiles, tuple) or len(self.tiles) > 1024:
            raise ValueError("DecodeKernels.tiles must be a tuple of at most 1024 DecodeTile")
        seen = set()
        for t in self.tiles:
            if not isinstance(t, DecodeTile):
                raise ValueError(f"DecodeKernels.tiles holds a {type(t).__name__}")
            t.check()
            key = (*t[:3], t.cache)
            if key in seen:
                raise ValueError(f"DecodeKernels.tiles: two tiles for {key}")
            seen.add(key)

    def describe(self) -> str:
        pieces = " ".join(f"{name}={getattr(self, name)}" for name in DECODE_KERNEL_CHOICES)
        flags = [f for f in ("pdl", "prefetch") if getattr(self, f)]
        if self.step_config:
            flags.append("step_config=" + ",".join(f"{k}={v}" for k, v in self.step_config))
        if self.step_buckets:
            flags.append("step_buckets=" + ",".join(f"{b}x{c}" for b, c, _ in self.step_buckets))
        if self.tiles:
            flags.append(f"tiles={len(self.tiles)}")
        return " ".join([pieces, *flags])

    def step_config_for(self, batch: int, cache: int) -> tuple[tuple[str, int], ...] | None:
        """The config pairs the persistent step runs a `batch`-row step over a `cache`-slot
        cache on, or None where the pieces serve it."""
        if self.step != "persistent":
            return None
        if not self.step_buckets:
            return self.step_config
        for b, c, pairs in self.step_buckets:
            if (b, c) == (batch, cache):
                return pairs
        return None

    def tile(self, batch: int, kernel: str, site: str, cache: int = 0) -> DecodeTile | None:
        """The tuned launch config of `kernel` at `site` for a `batch`-row step over a
        `cache`-slot KV cache (0: the kernels that do not read it), if any: the tile of that
        cache length, else the one of every length."""
        found = None
        for t in self.tiles:
            if t[:3] == (batch, kernel, site) and t.cache in (cache, 0):
                if t.cache == cache:
                    return t
                found = t
        return found

    @staticmethod
    def from_dict(d: dict | None) -> DecodeKernels:
        d = dict(d or {})
        tiles = d.pop("tiles", ())
        if not isinstance(tiles, (list, tuple)):
            raise ValueError("DecodeKernels.tiles must be a list")
        # a manifest stores each tile as a list (msgpack); a tile made in-process stays whole
        parsed = tuple(
            t
            if isinstance(t, DecodeTile)
            else DecodeTile(*t)
            if isinstance(t, (list, tuple))
            else DecodeTile(**t)
            for t in tiles
        )
        return DecodeKernels(**d, tiles=parsed)


# -- the check that verify and load share ----------------------------------------------------


@dataclass(frozen=True)
class GenerationDescription:
    """A causal-LM manifest's `extra`, parsed and checked."""

    decoder: DecoderSpec
    buckets: GenerationBuckets
    kernels: DecodeKernels


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_INT_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
)
_CHOICES = {
    "family": FAMILIES,
    "norm": NORMS,
    "mlp": MLPS,
    "activation": ACTIVATIONS,
    "positions": POSITIONS,
}
_BOOLS = (
    "qkv_bias",
    "o_bias",
    "mlp_bias",
    "tied_embeddings",
    "qk_norm",
    "norm_plus_one",
    "sandwich_norms",
)
# tanh(s / cap) * cap: a cap of 0 divides by zero, a negative one flips the sign
_SOFTCAPS = ("attn_logit_softcap", "final_logit_softcap")
# Far above any real decoder (Llama-3 405B: 126 layers, hidden 16384, 128k vocabulary) and
# far below sizes whose products overflow what a reader should compute with.
MAX_DIM = 1 << 20
MAX_LAYERS = 4096
MAX_WINDOW = 1 << 31  # a window as long as any cache a reader allows masks nothing


def _check_decoder(d: Any, where: str) -> DecoderSpec:
    def bad(what: str) -> ArtifactCorruptError:
        return ArtifactCorruptError(f"{where}: the causal-LM description is invalid: {what}")

    if not isinstance(d, dict):
        raise bad("extra.decoder is not a map")
    required = {
        f.name for f in fields(DecoderSpec) if f.default is MISSING and f.default_factory is MISSING
    }
    missing = sorted(required - set(d))
    if missing:
        raise bad(f"decoder fields {missing} are missing")
    unknown = sorted(k for k in d if k not in {f.name for f in fields(DecoderSpec)})
    if unknown:
        raise bad(f"decoder has unknown fields {unknown}{NEWER_KERNL_HINT}")
    if not isinstance(d["model_type"], str):
        raise bad(f"decoder.model_type {d['model_type']!r} is not a string")
    for name in _INT_FIELDS:
        v = d[name]
        top = MAX_LAYERS if name == "num_layers" else MAX_DIM
        if not (_is_int(v) and 0 < v <= top):
            raise bad(f"decoder.{name} is {v!r}, not an integer in 1..{top}")
    for name, allowed in _CHOICES.items():
        if d[name] not in allowed or not isinstance(d[name], str):
            raise bad(f"decoder.{name} is {d[name]!r}, not one of {allowed}{NEWER_KERNL_HINT}")
    reals = ("norm_eps", "attention_scale", "rope_attention_scaling", "embed_scale")
    for name in (*reals, "rope_local_attention_scaling"):
        if name in d and not _is_real(d[name]):
            raise bad(f"decoder.{name} is {d[name]!r}, not a finite number")
    for name in _BOOLS:
        if name in d and not isinstance(d[name], bool):
            raise bad(f"decoder.{name} is {d[name]!r}, not a boolean")
    for name in _SOFTCAPS:
        cap = d.get(name)
        if not (cap is None or (_is_real(cap) and cap > 0)):
            raise bad(f"decoder.{name} is {cap!r}, not null or a finite positive number")
    vocab = d["vocab_size"]
    mp = d["max_positions"]
    if not (mp is None or (_is_int(mp) and 0 < mp <= MAX_DIM)):
        raise bad(f"decoder.max_positions is {mp!r}, not null or an integer in 1..{MAX_DIM}")
    if d["positions"] == "learned" and mp is None:
        raise bad("decoder.positions is 'learned' without max_positions")
    if d["num_heads"] % d["num_kv_heads"]:
        raise bad(f"{d['num_heads']} heads are not a multiple of {d['num_kv_heads']} KV heads")
    if d.get("qk_norm") and (d["norm"] != "rms" or d["family"] != "llama"):
        raise bad("decoder.qk_norm is set on a model without RMSNorm or of another family")
    if d.get("norm_plus_one") and d["norm"] != "rms":
        raise bad("decoder.norm_plus_one is set on a model without RMSNorm")
    if d.get("sandwich_norms") and (d["norm"] != "rms" or d["family"] != "llama"):
        raise bad("decoder.sandwich_norms is set on a model without RMSNorm or of another family")
    if d["positions"] == "rope" and d["head_dim"] % 2:
        raise bad(f"rotary positions need an even head_dim, not {d['head_dim']}")
    _check_window(d, bad)
    local = d.get("rope_local_layers", [])
    n = d["num_layers"]
    if not (
        isinstance(local, list)
        and all(_is_int(i) and 0 <= i < n for i in local)
        and local == sorted(set(local))
    ):
        raise bad(
            f"decoder.rope_local_layers is {local!r}, not distinct layers in [0, {n}) in order"
        )
    if local and d["positions"] != "rope":
        raise bad("decoder.rope_local_layers is set on a model without rotary positions")
    pad = d.get("pad_token_id")
    if not (pad is None or (_is_int(pad) and 0 <= pad < vocab)):
        raise bad(f"decoder.pad_token_id is {pad!r}, not null or a token id in [0, {vocab})")
    eos = d.get("eos_token_ids", [])
    if not (
        isinstance(eos, list)
        and len(eos) <= MAX_EOS_IDS
        and all(_is_int(e) and 0 <= e < vocab for e in eos)
    ):
        raise bad(
            f"decoder.eos_token_ids is {eos!r}, not at most {MAX_EOS_IDS} ids in [0, {vocab})"
        )
    return DecoderSpec.from_dict(d)


def _check_window(d: dict, bad) -> None:
    """A window is a positive length applied to distinct layers, in order; one without the
    other is not what describe writes."""
    window, layers = d.get("sliding_window"), d.get("sliding_layers", [])
    if not (window is None or (_is_int(window) and 0 < window <= MAX_WINDOW)):
        raise bad(
            f"decoder.sliding_window is {window!r}, not null or an integer in 1..{MAX_WINDOW}"
        )
    n = d["num_layers"]
    if not (
        isinstance(layers, list)
        and all(_is_int(i) and 0 <= i < n for i in layers)
        and layers == sorted(set(layers))
    ):
        raise bad(f"decoder.sliding_layers is {layers!r}, not distinct layers in [0, {n}) in order")
    if (window is None) != (not layers):
        raise bad(
            f"decoder.sliding_window is {window!r} with sliding_layers {layers!r}: a window "
            "needs the layers it applies to, and layers need a window"
        )
    if window is not None and d["family"] != "llama":
        raise bad("decoder.sliding_window is set on a model of another family")


def _check_buckets(d: Any, where: str, limits: ReadLimits) -> GenerationBuckets:
    def bad(what: str) -> ArtifactCorruptError:
        return ArtifactCorruptError(f"{where}: the causal-LM description is invalid: {what}")

    if not isinstance(d, dict) or set(d) != {"batches", "prompts", "kv_lengths"}:
        raise bad("extra.generation_buckets is not a map of batches, prompts and kv_lengths")
    for name, top in (
        ("batches", limits.max_batch),
        ("prompts", limits.max_seq),
        ("kv_lengths", limits.max_seq),
    ):
        v = d[name]
        if not (isinstance(v, list) and v and all(_is_int(x) for x in v)):
            raise bad(f"generation_buckets.{name} is {v!r}, not a non-empty list of integers")
        if len(set(v)) != len(v) or not all(0 < x <= top for x in v):
            raise bad(f"generation_buckets.{name} is {v!r}: sizes must be distinct, in 1..{top}")
    buckets = GenerationBuckets.from_dict(d)
    if max(buckets.prompts) > buckets.cache_len:
        raise bad(
            f"the longest prompt ({max(buckets.prompts)}) does not fit the cache "
            f"({buckets.cache_len})"
        )
    count = len(buckets.prefill_shapes()) + len(buckets.decode_shapes())
    if count > limits.max_buckets:
        raise ArtifactUnsafeError(
            f"{where}: {count} generation buckets, more than the {limits.max_buckets} a reader "
            "accepts (each is a graph and static buffers)"
        )
    for b in buckets.batches:
        if b * buckets.cache_len > limits.max_bucket_tokens:
            raise ArtifactUnsafeError(
                f"{where}: batch {b} x a cache of {buckets.cache_len} slots is "
                f"{b * buckets.cache_len} tokens of static buffers, more than the "
                f"{limits.max_bucket_tokens} a reader allocates"
            )
    return buckets


def expected_weights(spec: DecoderSpec, dtype: str) -> dict[str, tuple[list[int], str]]:
    """Every weight the runtime's decoder reads for `spec`: name -> (shape, dtype name)."""
    h, d, i, v = spec.hidden_size, spec.head_dim, spec.intermediate_size, spec.vocab_size
    nh, kvh = spec.num_heads, spec.num_kv_heads
    layer_norm = spec.norm == "layer"
    out: dict[str, tuple[list[int], str]] = {"embed.weight": ([v, h], dtype)}
    if spec.positions == "learned":
        out["pos_embed.weight"] = ([spec.max_positions, h], dtype)
    else:
        out["rope.inv_freq"] = ([d // 2], "float32")
        if spec.rope_local_layers:
            out["rope.local_inv_freq"] = ([d // 2], "float32")
    for n in range(spec.num_layers):
        p = f"layers.{n}."
        out[p + "attn_norm.weight"] = out[p + "mlp_norm.weight"] = ([h], dtype)
        if layer_norm:
            out[p + "attn_norm.bias"] = out[p + "mlp_norm.bias"] = ([h], dtype)
        out[p + "qkv.weight"] = ([(nh + 2 * kvh) * d, h], dtype)
        if spec.qkv_bias:
            out[p + "qkv.bias"] = ([(nh + 2 * kvh) * d], dtype)
        if spec.qk_norm:
            out[p + "q_norm.weight"] = out[p + "k_norm.weight"] = ([d], dtype)
        if spec.sandwich_norms:
            out[p + "post_attn_norm.weight"] = out[p + "post_mlp_norm.weight"] = ([h], dtype)
        out[p + "o.weight"] = ([h, nh * d], dtype)
        if spec.o_bias:
            out[p + "o.bias"] = ([h], dtype)
        up, down = ("gate_up", "down") if spec.mlp == "gated" else ("fc", "proj")
        rows = 2 * i if spec.mlp == "gated" else i
        out[p + up + ".weight"] = ([rows, h], dtype)
        out[p + down + ".weight"] = ([h, i], dtype)
        if spec.mlp_bias:
            out[p + up + ".bias"] = ([rows], dtype)
            out[p + down + ".bias"] = ([h], dtype)
    out["final_norm.weight"] = ([h], dtype)
    if layer_norm:
        out["final_norm.bias"] = ([h], dtype)
    if not spec.tied_embeddings:
        out["lm_head.weight"] = ([v, h], dtype)
    return out


def check_generation(
    extra: dict[str, Any],
    dtype: str,
    weights: dict[str, tuple[list[int], str]],
    where: str,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> GenerationDescription:
    """The causal-LM description of a manifest (`extra`) against itself, the limits and the
    weights file (`weights`: name -> (shape, dtype name), from its header). Raises
    ArtifactCorruptError (malformed, inconsistent) or ArtifactUnsafeError (over the limits)."""
    decoder = _check_decoder(extra.get("decoder"), where)
    buckets = _check_buckets(extra.get("generation_buckets"), where, limits)
    try:
        kernels = DecodeKernels.from_dict(extra.get("decode_kernels"))
    except (TypeError, ValueError, AttributeError) as e:
        raise ArtifactCorruptError(
            f"{where}: the causal-LM description is invalid: decode_kernels: {e}"
        ) from None
    for b, c, _ in kernels.step_buckets:
        if b not in buckets.batches or c not in buckets.kv_lengths:
            raise ArtifactCorruptError(
                f"{where}: the causal-LM description is invalid: decode_kernels: the persistent "
                f"step at {b}x{c}, not a decode bucket of {buckets.batches} x {buckets.kv_lengths}"
            )
    for t in kernels.tiles:
        if t.cache and t.cache not in buckets.kv_lengths:
            raise ArtifactCorruptError(
                f"{where}: the causal-LM description is invalid: decode_kernels: a tile for a "
                f"{t.cache}-slot cache, not one of the kv lengths {buckets.kv_lengths}"
            )
    if decoder.positions == "learned" and decoder.max_positions < buckets.cache_len:
        raise ArtifactCorruptError(
            f"{where}: the causal-LM description is invalid: {decoder.max_positions} learned "
            f"positions cannot index a cache of {buckets.cache_len} slots"
        )
    expected = expected_weights(decoder, dtype)
    for name, (shape, dt) in expected.items():
        if name not in weights:
            raise ArtifactCorruptError(
                f"{where}: the decoder reads weight {name!r}, absent from the weights"
            )
        if list(weights[name][0]) != shape or weights[name][1] != dt:
            raise ArtifactCorruptError(
                f"{where}: weight {name!r} is {weights[name][1]} {list(weights[name][0])}; the "
                f"causal-LM description needs {dt} {shape}"
            )
    extra_names = sorted(set(weights) - set(expected))
    if extra_names:
        raise ArtifactCorruptError(
            f"{where}: weights {extra_names[:5]} are not part of the causal-LM description"
        )
    return GenerationDescription(decoder, buckets, kernels)


# The runtime's prefill runs an attention it cannot hand to SDPA (Gemma2's softcap) in blocks
# of queries whose float32 scores fit this many bytes (runtime/generation/decoder.py), so that
# neither the prefill nor the CUDA graph that keeps its peak grows with batch x length².
PREFILL_SCORE_BYTES = 512 << 20
# The torch decode step rotates with a [D, D] matrix per position (one bmm a layer) where a
# table of them fits this many bytes, else elementwise over the cos and sin tables as Hugging
# Face does (runtime/generation/decoder.py: Gemma3's two tables at 32768 positions and
# head_dim 256 were 8 GiB).
ROPE_MATRIX_BYTES = 256 << 20


def rope_matrices_fit(head_dim: int, positions: int, itemsize: int) -> bool:
    """Whether the torch decode step's table of [D, D] rotary matrices, one per position,
    stays within ROPE_MATRIX_BYTES (else the step rotates elementwise)."""
    return positions * head_dim * head_dim * itemsize <= ROPE_MATRIX_BYTES


def generation_memory(desc: GenerationDescription, itemsize: int) -> tuple[int, int]:
    """(static buffers, activation pool) in bytes of a causal-LM artifact at load, following
    kernl/runtime/generation/state.py (per batch bucket) and generation/decoder.py (the
    largest prefill's intermediates; an upper-side estimate of what it holds at once)."""
    s, b = desc.decoder, desc.buckets
    cache = b.cache_len
    static = 0
    if (
        s.positions == "rope"
        and desc.kernels.rope == "torch"
        and rope_matrices_fit(s.head_dim, cache, itemsize)
    ):
        # the torch step's rotary: a [D, D] matrix per position (the kernels' steps and every
        # prefill rotate with [positions, D] cos and sin tables)
        tables = 2 if s.rope_local_layers else 1  # Gemma3's: one per layer type
        static += tables * cache * s.head_dim * s.head_dim * itemsize
    # the smallest bucket's KV cache, and one the others share (runtime/generation/state.py)
    for batch in {min(b.batches), max(b.batches)}:
        static += 2 * s.num_layers * batch * s.num_kv_heads * cache * s.head_dim * itemsize
    for batch in b.batches:
        static += batch * cache * (8 + 1)  # generated ids (int64) and the valid-slot mask
        static += batch * 5 * 8  # the sampler's per-row parameters
        static += sum(batch * p * 9 for p in b.prompts)  # prompt ids and valid flags
    qkv = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    pool = 0
    for batch, prompt in b.prefill_shapes():
        # per token, the larger of a layer's two phases (decoder.prefill drops the attention's
        # intermediates before the MLP's): the residual stream, its norm and the output
        # projection's sums; q/k/v, their rotated copies and the GQA-expanded k, v; the
        # attention and its reshaped copy; or the MLP's gate/up, activation and product
        attention = 4 * s.hidden_size + qkv + 3 * (s.num_heads + s.num_kv_heads) * s.head_dim
        attention += 4 * s.num_heads * s.head_dim
        mlp = 4 * s.hidden_size + (4 if s.mlp == "gated" else 2) * s.intermediate_size
        tables = 4 * s.head_dim * (2 if s.rope_local_layers else 1)  # cos and sin rows
        act = batch * prompt * (max(attention, mlp) + tables) * itemsize
        # the boolean masks while they are made ([S, S] parts; the valid pairs, with the
        # diagonal; the windowed layers' own) and SDPA's additive one with its negation: no
        # scores (its memory-efficient kernels take the mask)
        window = s.sliding_window is not None
        act += 3 * prompt * prompt + batch * prompt * prompt * (2 + 2 * window + itemsize)
        if s.attn_logit_softcap is not None:  # no SDPA: scores a block of queries at a time
            full = batch * s.num_heads * prompt * prompt * 4
            block = min(full, max(PREFILL_SCORE_BYTES, batch * s.num_heads * prompt * 4))
            act += block + 3 * block * itemsize // 4  # float32 probabilities; three copies
        act += batch * s.vocab_size * 4
        pool = max(pool, act)
    window_masks = s.sliding_window is not None  # the windowed layers' slot mask a step
    for batch, kv in b.decode_shapes():
        pool = max(
            pool,
            batch * (s.num_heads * kv * 4 + s.vocab_size * 4 + 3 * s.intermediate_size * itemsize)
            + window_masks * batch * kv * (itemsize + 1),  # and torch's bias of it
        )
    return static, pool
