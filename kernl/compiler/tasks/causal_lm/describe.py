"""Turn a Hugging Face decoder-only model into kernl's description of it: a `DecoderSpec` and
its weights under one naming scheme, whatever the family.

WEIGHT NAMES (what kernl/runtime/generation/decoder.py reads):
    embed.weight [vocab, hidden]          pos_embed.weight [positions, hidden] (GPT-2)
    layers.{i}.attn_norm.{weight,bias}    layers.{i}.qkv.{weight,bias}  [(H + 2 KV) D, hidden]
    layers.{i}.o.{weight,bias}            layers.{i}.mlp_norm.{weight,bias}
    layers.{i}.post_attn_norm.weight, layers.{i}.post_mlp_norm.weight   (Gemma2's sandwich norms)
    layers.{i}.gate_up.weight [2 I, hidden], layers.{i}.down.weight      (gated MLP)
    layers.{i}.fc.{weight,bias}, layers.{i}.proj.{weight,bias}          (GPT-2 MLP)
    final_norm.{weight,bias}              lm_head.weight (absent when tied to embed)
    rope.inv_freq [D / 2] float32         (rotary models, taken from the model's own rotary
                                           module, so Llama-3 and linear scaling come as HF
                                           computes them; Gemma3's full-attention table)
    rope.local_inv_freq [D / 2] float32   (Gemma3's sliding-window layers' own table)
Linear weights are [out, in]; GPT-2's Conv1D weights ([in, out]) are transposed here once."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch

from kernl.artifacts.generation import DecoderSpec

from ...trace import UnsupportedModelError
from ..generation_config import (
    config_of,
    eos_token_ids,
    model_type_of,
    refuse_module_code_kernl_drops,
    refuse_unapplied_options,
)

# Qwen3: Qwen2 without QKV biases, with an RMSNorm over each query and key head; Phi-3: the
# projections fused in its checkpoints (qkv_proj, gate_up_proj); Gemma: scaled embeddings,
# RMSNorms by (1 + weight), a gated tanh-GELU MLP, head_dim its own config field; Gemma2: Gemma's
# with softcapped attention scores and logits, an RMSNorm of the attention and of the MLP
# outputs before their residual adds, query_pre_attn_scalar ** -0.5 as the attention scale, and
# a sliding window on every other layer (one rotary table for all); Gemma3's text decoder:
# Gemma2's layer without the attention softcap, with Qwen3's per-head q and k norms (by
# (1 + weight)) and a rotary table per layer type. Mistral, Phi-3, and Qwen2 and Qwen3 with
# use_sliding_window: a window on every layer, or on those layer_types names
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")
# The families whose RMSNorm scales by (1 + weight) in float32 (GemmaRMSNorm, Gemma2RMSNorm,
# Gemma3RMSNorm, its q_norm and k_norm included)
NORM_PLUS_ONE = ("gemma", "gemma2", "gemma3_text")
# The families with Gemma2's norms after attention and around the MLP: the norm before the MLP
# is `pre_feedforward_layernorm`, and `post_attention_layernorm` norms the attention output
SANDWICH_NORMS = ("gemma2", "gemma3_text")
# The options each family's modeling reads: a config key another family's would use (a Llama
# converted from Mistral keeping "sliding_window", a softcap copied over) is ignored by Hugging
# Face, and was applied by kernl, failing validation with a numeric mismatch (review).
# Gemma3's attention keeps attn_logit_softcapping from its config but never passes it to the
# attention function (Gemma3Attention.forward): its scores are not softcapped, whatever it says
ATTENTION_SOFTCAP = ("gemma2",)
FINAL_SOFTCAP = ("gemma2", "gemma3_text")
SLIDING_WINDOW = ("mistral", "phi3", "qwen2", "qwen3", "gemma2", "gemma3_text")
SUPPORTED = (*LLAMA_LIKE, "gpt2")
# Rotary variants whose frequencies do not depend on the sequence length.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
# Rotary variants that keep their original table up to a length (_short_context_table).
SHORT_CONTEXT_ROPE = ("dynamic", "longrope")
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


def check_model_type(model_or_path) -> None:
    """Refuse a model type kernl does not generate with from its config alone, before the
    buckets are read (a BertLMHeadModel, inferred as causal-lm, was first told that `seq` is no
    causal-lm axis). A config that cannot be read is left to load_model to explain."""
    model_type, archs = model_type_of(model_or_path)
    if model_type is None:
        return
    config = config_of(model_or_path)
    what = f"causal-lm: model type {model_type!r} ({', '.join(archs) or model_type})"
    if model_type in GEMMA_VARIANTS:
        raise UnsupportedModelError(
            f"{what} is not supported: kernl lacks {'; '.join(gemma_lacks(config))} "
            f"(kernl generates with {', '.join(SUPPORTED)})"
        )
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"{what} is not supported; kernl generates with {', '.join(SUPPORTED)}"
        )
    _refuse_bidirectional(config, model_type)


# Gemma3ForConditionalGeneration: Gemma3's text decoder (described, as gemma3_text) behind an
# image encoder kernl does not have
GEMMA_VARIANTS = ("gemma3",)


def gemma_lacks(config) -> list[str]:
    """What kernl lacks for a Gemma3ForConditionalGeneration config, as its refusal names it:
    the image encoder, and what its text config turns on that the text decoder's description
    refuses too."""
    lacks = [
        "an image encoder (Gemma3ForConditionalGeneration reads images; its text decoder "
        "alone, model type 'gemma3_text', is served)"
    ]
    text = config.get_text_config()
    if getattr(text, "use_bidirectional_attention", False):
        lacks.append("bidirectional attention (use_bidirectional_attention=True)")
    return lacks


def _refuse_bidirectional(config, model_type: str) -> None:
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            f"causal-lm: {model_type} with use_bidirectional_attention=True (every token "
            "attends to every other) is not supported; kernl generates with causal attention"
        )


# Kept in float32 whatever the model's dtype, as the reader expects (artifacts/generation.py
# expected_weights): bf16 would move the frequencies by up to 4e-3 of themselves
ROPE_FREQUENCIES = ("rope.inv_freq", "rope.local_inv_freq")


def describe(
    model: torch.nn.Module, cache_len: int, dtype: torch.dtype
) -> tuple[DecoderSpec, dict[str, torch.Tensor]]:
    """(spec, weights in `dtype`, the rotary frequencies (ROPE_FREQUENCIES) in float32).
    Raises UnsupportedModelError naming what kernl cannot serve."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    refuse_module_code_kernl_drops(model, "causal-lm")
    if model_type in LLAMA_LIKE:
        spec, weights = _describe_llama_like(model, cache_len)
    elif model_type == "gpt2":
        spec, weights = _describe_gpt2(model, cache_len)
    else:
        raise UnsupportedModelError(
            f"causal-lm: model type {model_type!r} ({type(model).__name__}) is not supported; "
            f"kernl generates with {', '.join(SUPPORTED)}"
        )
    weights = {
        k: v.detach().to(torch.float32 if k in ROPE_FREQUENCIES else dtype).contiguous()
        for k, v in weights.items()
    }
    return spec, weights


def _scales_in_its_forward(base, model_type: str) -> bool:
    """Whether Gemma's or Gemma2's model forward multiplies the embeddings by
    sqrt(hidden_size) itself (cast to their dtype), as transformers before 5.4 did: its
    modeling module has no scaled embedding class then (kernl left the scale out, and
    validation refused the model)."""
    if model_type not in ("gemma", "gemma2"):
        return False
    modeling = sys.modules.get(type(base).__module__)
    return modeling is not None and not any(
        name.endswith("ScaledWordEmbedding") for name in vars(modeling)
    )


def _token_ids(model) -> tuple[int | None, list[int]]:
    gen = getattr(model, "generation_config", None)
    cfg = model.config
    vocab = cfg.vocab_size
    ids_options = ("bad_words_ids", "suppress_tokens", "begin_suppress_tokens")
    refuse_unapplied_options(
        gen, "causal-lm", (*ids_options, "forced_bos_token_id", "forced_eos_token_id")
    )
    # Hugging Face's generate reads EOS and pad from the generation config alone (a model
    # without generation_config.json gets one made from config.json): an id config.json sets
    # and generation_config.json leaves out is not used (kernl stopped at it, 2026-12-05)
    ids = gen if gen is not None else cfg
    eos = eos_token_ids(getattr(ids, "eos_token_id", None), vocab, "causal-lm")
    pad = getattr(ids, "pad_token_id", None)
    pad = int(pad) if isinstance(pad, int) and 0 <= pad < vocab else None
    return pad, eos


def _activation(name: str, model_type: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise UnsupportedModelError(
            f"causal-lm: {model_type} with activation {name!r} is not supported "
            f"(kernl knows {', '.join(HF_ACTIVATIONS)})"
        )
    return HF_ACTIVATIONS[name]


def _mlp_activation(cfg, mlp, model_type: str) -> str:
    """The activation the MLP's module applies, named by the config key it was made from:
    which key a family reads (hidden_act, hidden_activation) differs between families and
    between transformers versions (Gemma's moved), and a key the family ignores must not
    count. Where the module's activation is none of Hugging Face's for those names, the
    config decides as before (Gemma2's hidden_activation, then hidden_act)."""
    names = [
        n
        for n in (getattr(cfg, "hidden_activation", None), getattr(cfg, "hidden_act", None))
        if isinstance(n, str)
    ]
    applied = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    if applied is not None:
        from transformers.activations import ACT2FN

        for name in names:
            made = ACT2FN[name] if name in ACT2FN else None
            if type(made) is type(applied) and repr(made) == repr(applied):
                return _activation(name, model_type)
    return _activation(names[0] if names else str(cfg.hidden_act), model_type)


def _refuse_a_window_only_the_cache_applies(cfg, model_type: str, cache_len: int) -> None:
    """A sliding_window in the config of a family whose attention never reads it (a Llama
    converted from Mistral keeps the key): Hugging Face's forward ignores it, but the KV cache
    its generate makes from the config keeps only the window's last slots, so its decode steps
    see a window its prefill did not, and its generate differs from its own forward. Served
    either way, kernl would differ from one of the two: refused by name where it can matter."""
    window = getattr(cfg, "sliding_window", None)
    if window and model_type not in SLIDING_WINDOW and window < cache_len:
        raise UnsupportedModelError(
            f"causal-lm: this {model_type} config sets sliding_window={window}, which "
            f"{model_type}'s attention ignores but Hugging Face's generate applies through its "
            "KV cache (its decode steps then see a window its prefill does not); remove "
            f"sliding_window from the config, or set it to at least the cache ({cache_len} "
            "slots)"
        )


def _refuse_no_layers(num_layers: int, model_type: str) -> None:
    if num_layers < 1:
        raise UnsupportedModelError(
            f"causal-lm: {model_type} with {num_layers} layers: kernl serves a decoder of at "
            "least one layer"
        )


def _describe_llama_like(model, cache_len: int) -> tuple[DecoderSpec, dict]:
    cfg = model.config
    mt = cfg.model_type
    base = model.model
    _refuse_no_layers(len(base.layers), mt)
    _refuse_a_window_only_the_cache_applies(cfg, mt, cache_len)
    _refuse_bidirectional(cfg, mt)
    window, sliding_layers = _sliding_window(cfg, len(base.layers))
    rope = _rotary_tables(base.rotary_emb, cfg, len(base.layers), cache_len)
    nh, kvh = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    attn0 = base.layers[0].self_attn
    qkv0, qkv_bias0 = _qkv(attn0)
    head_dim = qkv0.shape[0] // (nh + 2 * kvh)
    if nh % kvh:
        raise UnsupportedModelError(f"causal-lm: {nh} heads are not a multiple of {kvh} KV heads")
    if rope.inv_freq.numel() != head_dim // 2:
        raise UnsupportedModelError(
            f"causal-lm: {mt} rotates {2 * rope.inv_freq.numel()} of each head's {head_dim} "
            "dimensions (a partial rotary factor); kernl rotates whole heads"
        )
    qk_norm = hasattr(attn0, "q_norm")
    sandwich = mt in SANDWICH_NORMS
    mlp0 = base.layers[0].mlp
    weights: dict[str, torch.Tensor] = {"embed.weight": base.embed_tokens.weight}
    for i, layer in enumerate(base.layers):
        a, m, p = layer.self_attn, layer.mlp, f"layers.{i}."
        weights[p + "attn_norm.weight"] = layer.input_layernorm.weight
        weights[p + "qkv.weight"], qkv_bias = _qkv(a)
        if qkv_bias is not None:
            weights[p + "qkv.bias"] = qkv_bias
        if qk_norm:
            weights[p + "q_norm.weight"], weights[p + "k_norm.weight"] = (
                a.q_norm.weight,
                a.k_norm.weight,
            )
        weights[p + "o.weight"] = a.o_proj.weight
        if a.o_proj.bias is not None:
            weights[p + "o.bias"] = a.o_proj.bias
        if sandwich:
            weights[p + "post_attn_norm.weight"] = layer.post_attention_layernorm.weight
            weights[p + "mlp_norm.weight"] = layer.pre_feedforward_layernorm.weight
            weights[p + "post_mlp_norm.weight"] = layer.post_feedforward_layernorm.weight
        else:
            weights[p + "mlp_norm.weight"] = layer.post_attention_layernorm.weight
        weights[p + "gate_up.weight"], gate_up_bias = _gate_up(m)
        if gate_up_bias is not None:
            weights[p + "gate_up.bias"] = gate_up_bias
            weights[p + "down.bias"] = m.down_proj.bias
        weights[p + "down.weight"] = m.down_proj.weight
    weights["final_norm.weight"] = base.norm.weight
    tied = model.lm_head.weight.data_ptr() == base.embed_tokens.weight.data_ptr()
    if not tied:
        weights["lm_head.weight"] = model.lm_head.weight
    weights["rope.inv_freq"] = rope.inv_freq
    if rope.local_layers:
        weights["rope.local_inv_freq"] = rope.local_inv_freq
    norm = base.layers[0].input_layernorm
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    pad, eos = _token_ids(model)
    # Gemma's embedding module multiplies by its float32 `embed_scale` buffer cast to the
    # weight dtype; the runtime makes the same cast of the same float32 value
    embed_scale = getattr(base.embed_tokens, "embed_scale", None)
    if embed_scale is None and _scales_in_its_forward(base, mt):
        embed_scale = cfg.hidden_size**0.5
    spec = DecoderSpec(
        family="llama",
        model_type=mt,
        num_layers=len(base.layers),
        hidden_size=cfg.hidden_size,
        num_heads=nh,
        num_kv_heads=kvh,
        head_dim=head_dim,
        intermediate_size=_gate_up(mlp0)[0].shape[0] // 2,
        vocab_size=cfg.vocab_size,
        norm="rms",
        norm_eps=float(eps),
        mlp="gated",
        activation=_mlp_activation(cfg, mlp0, mt),
        positions="rope",
        max_positions=None,
        attention_scale=float(getattr(attn0, "scaling", head_dim**-0.5)),
        rope_attention_scaling=rope.scaling,
        qkv_bias=qkv_bias0 is not None,
        o_bias=attn0.o_proj.bias is not None,
        mlp_bias=_gate_up(mlp0)[1] is not None,
        tied_embeddings=tied,
        qk_norm=qk_norm,
        embed_scale=1.0 if embed_scale is None else float(embed_scale),
        norm_plus_one=mt in NORM_PLUS_ONE,
        attn_logit_softcap=(
            _softcap(cfg, "attn_logit_softcapping") if mt in ATTENTION_SOFTCAP else None
        ),
        final_logit_softcap=(
            _softcap(cfg, "final_logit_softcapping") if mt in FINAL_SOFTCAP else None
        ),
        sandwich_norms=sandwich,
        pad_token_id=pad,
        eos_token_ids=eos,
        sliding_window=window,
        sliding_layers=sliding_layers,
        rope_local_layers=rope.local_layers,
        rope_local_attention_scaling=rope.local_scaling,
    )
    return spec, weights


def _qkv(attn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[q; k; v] projection weight and bias (None without biases), fused or not."""
    if hasattr(attn, "qkv_proj"):  # Phi-3
        return attn.qkv_proj.weight, attn.qkv_proj.bias
    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    bias = None if attn.q_proj.bias is None else torch.cat([p.bias for p in parts])
    return torch.cat([p.weight for p in parts]), bias


def _gate_up(mlp) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[gate; up] projection weight and bias (None without biases), fused or not."""
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: gate first, as it chunks
        return mlp.gate_up_proj.weight, mlp.gate_up_proj.bias
    bias = None if mlp.gate_proj.bias is None else torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
    return torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), bias


def _softcap(cfg, name: str) -> float | None:
    """A Gemma2 softcap from the config (None or absent: none), refused unless finite and
    positive (tanh(x / cap) * cap)."""
    cap = getattr(cfg, name, None)
    if cap is None:
        return None
    cap = float(cap)
    if not (math.isfinite(cap) and cap > 0):
        raise UnsupportedModelError(
            f"causal-lm: {cfg.model_type} with {name}={cap} is not supported (a softcap is a "
            "finite positive number, or None for none)"
        )
    return cap


@dataclass
class _RotaryTables:
    """The rotary frequencies a model's layers use: one table for every layer, or (Gemma3) the
    full-attention layers' and, for `local_layers`, the sliding-window layers' own."""

    inv_freq: torch.Tensor
    scaling: float
    local_layers: list[int] = field(default_factory=list)
    local_inv_freq: torch.Tensor | None = None
    local_scaling: float = 1.0


def _rotary_tables(rotary, cfg, num_layers: int, cache_len: int) -> _RotaryTables:
    """The tables as the model's own rotary module computed them (so Llama-3 and linear scaling
    come as Hugging Face computes them). Gemma3RotaryEmbedding holds one per layer type
    (`{type}_inv_freq`, `{type}_attention_scaling`, `rope_type` a dict by type) and the model
    rotates each layer by its type's (Gemma3TextModel.forward); the others hold one table. A
    rope type whose frequencies change with the sequence length is taken where no position of
    the cache reaches the length at which they change (dynamic_rope_update's rules), else
    refused."""
    mt = cfg.model_type
    by_type = rotary.rope_type if isinstance(rotary.rope_type, dict) else None
    if by_type is None and rotary.rope_type in SHORT_CONTEXT_ROPE:
        return _short_context_table(rotary, cfg, cache_len)
    for rope_type in (by_type or {None: getattr(rotary, "rope_type", "default")}).values():
        if rope_type not in STATIC_ROPE:
            why = (
                "its frequencies change with the sequence length"
                if rope_type in SHORT_CONTEXT_ROPE
                else "kernl does not reproduce its tables"  # "proportional", newer types
            )
            raise UnsupportedModelError(
                f"causal-lm: {mt} with rope type {rope_type!r} is not supported ({why}); "
                f"kernl supports {', '.join(STATIC_ROPE)}"
            )
    if by_type is None:
        return _RotaryTables(rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0)))
    layer_types = list(cfg.layer_types)
    known = {"sliding_attention", "full_attention"}
    if len(layer_types) != num_layers or not set(layer_types) <= known:
        raise UnsupportedModelError(
            f"causal-lm: {mt} with layer_types {layer_types} is not supported; kernl knows "
            f"{sorted(known)}, one per layer ({num_layers})"
        )
    missing = sorted(set(layer_types) - set(by_type))
    if missing:  # Hugging Face's module made no table for them
        raise UnsupportedModelError(
            f"causal-lm: {mt} has no rope_parameters for its {missing} layers"
        )

    def table(layer_type: str) -> tuple[torch.Tensor, float]:
        return (
            getattr(rotary, f"{layer_type}_inv_freq"),
            float(getattr(rotary, f"{layer_type}_attention_scaling")),
        )

    # the table of the full-attention layers is the main one (the one every layer reads where
    # there is one); the sliding-window layers get theirs where it differs
    main_type = "full_attention" if "full_attention" in layer_types else "sliding_attention"
    inv_freq, scaling = table(main_type)
    tables = _RotaryTables(inv_freq, scaling)
    if main_type == "full_attention" and "sliding_attention" in layer_types:
        local, local_scaling = table("sliding_attention")
        if not (torch.equal(local, inv_freq) and local_scaling == scaling):
            tables.local_layers = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
            tables.local_inv_freq, tables.local_scaling = local, local_scaling
    return tables


def _short_context_table(rotary, cfg, cache_len: int) -> _RotaryTables:
    """Dynamic NTK and LongRoPE (Phi-3-128k, Phi-3.5) rotate with their original table until
    a sequence passes a length, then switch every position to another table: kernl takes the
    original table where the cache never reaches that length."""
    if rotary.rope_type == "longrope":
        params = cfg.rope_parameters or {}
        limit = params.get("original_max_position_embeddings")
        what = "original_max_position_embeddings"
    else:  # "dynamic": the module's original_max_seq_len is max_position_embeddings
        limit, what = getattr(rotary, "original_max_seq_len", None), "max_position_embeddings"
    if not isinstance(limit, int) or cache_len > limit:
        raise UnsupportedModelError(
            f"causal-lm: {cfg.model_type} with rope type {rotary.rope_type!r} changes its "
            f"frequencies for sequences longer than {what} ({limit}), and a cache of "
            f"{cache_len} slots reaches past it; kernl takes it with caches of at most {limit}"
        )
    if rotary.rope_type == "dynamic" and not torch.equal(rotary.inv_freq, rotary.original_inv_freq):
        # a table grown by an earlier, longer call: Hugging Face keeps it until a call shorter
        # than the limit (5.0: for good), and the model computes with it (LongRoPE picks its
        # table afresh at every call)
        raise UnsupportedModelError(
            f"causal-lm: {cfg.model_type}'s dynamic rotary table grew in an earlier call "
            f"longer than max_position_embeddings ({limit}), and Hugging Face keeps it until "
            "a shorter call: call the model once on a short input, or load it again, then "
            "compile"
        )
    return _RotaryTables(rotary.original_inv_freq, float(getattr(rotary, "attention_scaling", 1.0)))


def _sliding_window(cfg, num_layers: int) -> tuple[int | None, list[int]]:
    """(window, the layers it applies to) as Hugging Face's modeling reads the config: Mistral
    and Phi-3 window every layer whenever `sliding_window` is set (their modeling ignores
    layer_types); Qwen2, Qwen3, Gemma2 and Gemma3 window the "sliding_attention" layers of
    layer_types (Qwen2's and Qwen3's configs drop the window without use_sliding_window).
    (None, []) for none."""
    window = getattr(cfg, "sliding_window", None)
    mt = cfg.model_type
    if not window or mt not in SLIDING_WINDOW:  # Llama's and Gemma's modeling never read it
        return None, []
    layer_types = getattr(cfg, "layer_types", None)
    if mt in ("mistral", "phi3") or layer_types is None:
        if mt in ("qwen2", "qwen3") and not getattr(cfg, "use_sliding_window", False):
            return None, []
        return int(window), list(range(num_layers))
    known = {"sliding_attention", "full_attention"}
    if len(layer_types) != num_layers or not set(layer_types) <= known:
        raise UnsupportedModelError(
            f"causal-lm: {mt} with layer_types {list(layer_types)} is not supported; kernl "
            f"knows {sorted(known)}, one per layer ({num_layers})"
        )
    layers = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    return (int(window), layers) if layers else (None, [])


def _describe_gpt2(model, cache_len: int) -> tuple[DecoderSpec, dict]:
    cfg = model.config
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if getattr(cfg, flag, False):
            raise UnsupportedModelError(f"causal-lm: gpt2 with {flag}=True is not supported")
    if cache_len > cfg.n_positions:
        raise UnsupportedModelError(
            f"causal-lm: gpt2 has {cfg.n_positions} learned positions; a cache of {cache_len} "
            f"slots needs more (use cache<={cfg.n_positions}; without cache= in the buckets, "
            "the cache is twice the longest prompt bucket)"
        )
    t = model.transformer
    _refuse_no_layers(len(t.h), "gpt2")
    hidden, nh = cfg.n_embd, cfg.n_head
    weights: dict[str, torch.Tensor] = {
        "embed.weight": t.wte.weight,
        "pos_embed.weight": t.wpe.weight,
    }
    for i, block in enumerate(t.h):
        p = f"layers.{i}."
        # Conv1D computes x @ W + b with W [in, out]: store W^T, a linear weight.
        weights[p + "attn_norm.weight"], weights[p + "attn_norm.bias"] = (
            block.ln_1.weight,
            block.ln_1.bias,
        )
        weights[p + "qkv.weight"], weights[p + "qkv.bias"] = (
            block.attn.c_attn.weight.t(),
            block.attn.c_attn.bias,
        )
        weights[p + "o.weight"], weights[p + "o.bias"] = (
            block.attn.c_proj.weight.t(),
            block.attn.c_proj.bias,
        )
        weights[p + "mlp_norm.weight"], weights[p + "mlp_norm.bias"] = (
            block.ln_2.weight,
            block.ln_2.bias,
        )
        weights[p + "fc.weight"], weights[p + "fc.bias"] = (
            block.mlp.c_fc.weight.t(),
            block.mlp.c_fc.bias,
        )
        weights[p + "proj.weight"], weights[p + "proj.bias"] = (
            block.mlp.c_proj.weight.t(),
            block.mlp.c_proj.bias,
        )
    weights["final_norm.weight"], weights["final_norm.bias"] = t.ln_f.weight, t.ln_f.bias
    tied = model.lm_head.weight.data_ptr() == t.wte.weight.data_ptr()
    if not tied:
        weights["lm_head.weight"] = model.lm_head.weight
    head_dim = hidden // nh
    pad, eos = _token_ids(model)
    spec = DecoderSpec(
        family="gpt2",
        model_type="gpt2",
        num_layers=cfg.n_layer,
        hidden_size=hidden,
        num_heads=nh,
        num_kv_heads=nh,
        head_dim=head_dim,
        intermediate_size=t.h[0].mlp.c_fc.weight.shape[1],
        vocab_size=cfg.vocab_size,
        norm="layer",
        norm_eps=float(cfg.layer_norm_epsilon),
        mlp="plain",
        activation=_activation(cfg.activation_function, "gpt2"),
        positions="learned",
        max_positions=int(cfg.n_positions),
        attention_scale=head_dim**-0.5 if cfg.scale_attn_weights else 1.0,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tied_embeddings=tied,
        pad_token_id=pad,
        eos_token_ids=eos,
    )
    return spec, weights
