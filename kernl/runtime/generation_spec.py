"""What a causal-LM artifact declares about its model, its buckets and the kernels of its
decode step, as plain dataclasses.

All live in `manifest.extra` as msgpack maps: the runtime's decoder (generation_decoder.py)
reads them to know the shapes and the variant of each block; nothing in them names code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class DecoderSpec:
    """The decoder-only architecture, normalised over the supported families.

    Weights follow one naming scheme whatever the family (see WEIGHT NAMES in
    kernl/compiler/causal_lm_describe.py): `embed`, `pos_embed` (learned positions),
    `layers.{i}.{attn_norm,qkv,o,mlp_norm,gate_up,down,fc,proj}.{weight,bias}`,
    `final_norm.{weight,bias}`, `lm_head.weight` (absent when tied to `embed`), and
    `rope.inv_freq` (float32) for rotary models."""

    family: str  # "llama" (Llama, Mistral, Qwen2) or "gpt2"
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
    activation: str  # a name from generation_decoder.ACTIVATIONS
    positions: str  # "rope" or "learned"
    max_positions: int | None  # learned-position table size, None when unbounded
    attention_scale: float
    rope_attention_scaling: float = 1.0  # multiplies cos and sin (HF's attention_scaling)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tied_embeddings: bool = False
    pad_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> DecoderSpec:
        known = {f.name for f in fields(DecoderSpec)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"decoder description has unknown fields {unknown}")
        return DecoderSpec(**{**d, "eos_token_ids": [int(x) for x in d.get("eos_token_ids", [])]})


@dataclass(frozen=True)
class GenerationBuckets:
    """Shapes a causal-LM artifact serves.

    batches: batch buckets; each owns one static KV cache of `cache_len` slots per row.
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
    "norm": ("torch", "triton"),
    "gated_mlp": ("torch", "triton"),
    "linear": ("torch", "triton"),
}


@dataclass(frozen=True)
class DecodeKernels:
    """The implementation of each replaceable piece of a decode step.
    attention: "torch" (baddbmm + softmax + bmm), "sdpa" (F.scaled_dot_product_attention
    with GQA and a boolean mask) or "triton" (kernl.kernels.decode_attention);
    norm: "torch" or "triton" (kernl.kernels.norm); gated_mlp: "torch" or "triton"
    (kernl.kernels.gated_mlp; used where the MLP is gated SiLU without bias); linear:
    "torch" or "triton" (kernl.kernels.skinny_linear, split-K, for batches of <= 16 rows)."""

    attention: str = "torch"
    norm: str = "torch"
    gated_mlp: str = "torch"
    linear: str = "torch"

    def __post_init__(self):
        for name, allowed in DECODE_KERNEL_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"DecodeKernels.{name} must be one of {allowed}")

    def describe(self) -> str:
        return " ".join(f"{name}={getattr(self, name)}" for name in DECODE_KERNEL_CHOICES)

    @staticmethod
    def from_dict(d: dict | None) -> DecodeKernels:
        return DecodeKernels(**(d or {}))
