"""Turn a Hugging Face encoder-decoder (T5 v1.0, T5 v1.1/flan-T5, BART, mBART, Marian, Whisper)
into kernl's
description of it: a `Seq2SeqSpec` (for Whisper also a `SpeechSpec`, its generation config) and
its weights under one naming scheme.

WEIGHT NAMES (what kernl/runtime/generation/encoder_decoder.py reads):
    embed.weight [vocab, d_model]         (shared by encoder and decoder)
    dec.embed.weight [vocab, d_model]     (Marian with share_encoder_decoder_embeddings=False)
    {enc,dec}.rel_bias.weight [buckets, heads]     (T5: layer 0's relative attention bias)
    {enc,dec}.pos_embed.weight [positions + offset, d_model]   (BART/mBART: offset 2;
                                          Marian: its sinusoidal table, offset 0)
    {enc,dec}.embed_norm.{weight,bias}    (BART's and mBART's layernorm_embedding)
    {enc,dec}.layers.{i}.attn_norm, .qkv [3 inner, d_model], .o, .mlp_norm,
        .fc / .proj (plain FFN) or .gate_up [2 ffn, d_model] / .down (gated FFN)
    dec.layers.{i}.cross_norm, .cross_q, .cross_kv [2 inner, d_model], .cross_o
    {enc,dec}.final_norm.weight           (T5; mBART and Whisper: also .bias)
    lm_head.weight (absent when tied to embed)      final_logits_bias [vocab] (BART family)
    enc.conv{1,2}.{weight,bias}           (Whisper's front end; enc.pos_embed has 1500 rows)
Linear weights are [out, in]; `.bias` entries exist for BART and Whisper (whose key projections
have none: a zero bias stands in, which adds exactly nothing)."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from kernl.artifacts.seq2seq import DETECT, MAX_PROMPT, Seq2SeqSpec, SpeechSpec

from ...trace import UnsupportedModelError
from ..generation_config import (
    HF_GENERATE_AS_KERNL,
    eos_token_ids,
    model_type_of,
    refuse_module_code_kernl_drops,
    refuse_unapplied_options,
)

SUPPORTED = ("t5", "mt5", "bart", "mbart", "marian", "whisper")
HF_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}


def check_model_type(model_or_path) -> None:
    """Refuse a model type kernl does not generate with from its config alone, before the
    weights load (an mT5-XL's or a Pegasus's took their whole load to be refused). A config
    that cannot be read is left to load_model to explain."""
    model_type, archs = model_type_of(model_or_path)
    if model_type is not None and model_type not in SUPPORTED:
        _refuse_type(model_type, archs)


def _refuse_type(model_type: str, architectures=None) -> None:
    archs = ", ".join(architectures or []) or model_type
    raise UnsupportedModelError(
        f"seq2seq: model type {model_type!r} ({archs}) is not supported; kernl's "
        f"encoder-decoder generation supports {', '.join(SUPPORTED)}"
    )


def describe(
    model: torch.nn.Module, dtype: torch.dtype
) -> tuple[Seq2SeqSpec, dict[str, torch.Tensor]]:
    """(spec, weights in `dtype`). Raises UnsupportedModelError naming what kernl cannot
    serve."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    refuse_module_code_kernl_drops(
        model, "speech-seq2seq" if model_type == "whisper" else "seq2seq"
    )
    if model_type in ("t5", "mt5"):  # mT5: T5 v1.1's layers, its own head scaling
        spec, weights = _t5(model, model_type)
    elif model_type in ("bart", "mbart", "marian"):
        spec, weights = _bart(model, model_type)
    elif model_type == "whisper":
        spec, weights = _whisper(model)
    else:
        _refuse_type(model_type, [type(model).__name__])
    return spec, {k: v.detach().to(dtype).contiguous().clone() for k, v in weights.items()}


def _activation(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported")
    return HF_ACTIVATIONS[name]


def _token_ids(model, forcing: bool = True) -> dict:
    """Start, pad and EOS ids; with `forcing` (text models) also forced BOS/EOS ids and
    single-token bad_words_ids, which kernl's seq2seq generate applies as HF does (every one
    is kept, EOS ids included: each request lets its own EOS ids through, seq2seq.py
    `_State.exempt_eos`)."""
    cfg, gen = model.config, getattr(model, "generation_config", None)
    vocab = cfg.vocab_size
    # Hugging Face's generate reads these from the generation config alone (one made from
    # config.json where the folder has no generation_config.json): an id config.json sets and
    # generation_config.json leaves out is not used; the start id falls back to the BOS id.
    ids = gen if gen is not None else cfg
    eos = eos_token_ids(getattr(ids, "eos_token_id", None), cfg.vocab_size, "seq2seq")
    pad = getattr(ids, "pad_token_id", None)
    names = ("decoder_start_token_id", "bos_token_id")
    starts = [n for n in names if getattr(ids, n, None) is not None]
    if not starts:
        raise UnsupportedModelError("the model declares no decoder_start_token_id")
    out = dict(
        decoder_start_token_id=_start_token_id(getattr(ids, starts[0]), starts[0], vocab),
        pad_token_id=int(pad) if pad is not None and 0 <= pad < vocab else None,
        eos_token_ids=eos,
    )
    forced = {n: getattr(gen, n, None) for n in ("forced_bos_token_id", "forced_eos_token_id")}
    bad = getattr(gen, "bad_words_ids", None) or []
    if forcing:  # text models (Whisper's own options are checked in speech_spec)
        refuse_unapplied_options(gen, "seq2seq", ("suppress_tokens", "begin_suppress_tokens"))
    if not forcing:
        for name, value in [*forced.items(), ("bad_words_ids", bad)]:
            if value:
                raise UnsupportedModelError(f"generation_config.{name} is not supported here")
        return out
    for name, value in forced.items():
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if value is not None and not (isinstance(value, int) and 0 <= value < vocab):
            raise UnsupportedModelError(
                f"generation_config.{name}={value!r}: kernl forces one token id in [0, {vocab})"
            )
        out[name] = value
    if any(not isinstance(w, list) or len(w) != 1 for w in bad):
        raise UnsupportedModelError(
            f"generation_config.bad_words_ids {bad!r}: kernl suppresses single tokens only"
        )
    out["suppress_tokens"] = sorted({int(w[0]) for w in bad if 0 <= w[0] < vocab})
    return out


def _start_token_id(start, name: str, vocab: int) -> int:
    """The decoder start id, read from the generation config's `name`. Hugging Face's generate
    also takes a list of one start id per row (its length must then be the batch's); kernl
    starts every row alike, so a list is taken where all its ids are one id ([2] is 2 for any
    batch) and refused otherwise."""
    given = start
    if isinstance(start, (list, tuple)) and len(start) > 0 and len(set(start)) == 1:
        start = start[0]
    if isinstance(start, bool) or not isinstance(start, numbers.Integral) or not 0 <= start < vocab:
        raise UnsupportedModelError(
            f"generation_config.{name}={given!r}: kernl starts every row of the decoder with "
            f"one token id in [0, {vocab}) (one list of different start ids per row is not "
            "supported)"
        )
    return int(start)


def _untied_head(model) -> bool:
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    return head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed)


def _probe_hugging_face_generate(model) -> None:
    """A T5 with more decoder than encoder layers: kernl's decoder runs it, but validation
    compares with Hugging Face's generate, which in transformers 5.2x sizes its cache from
    num_layers and fails ("IndexError ... not foreseen by kernl"). Two tokens tell whether
    this transformers can: if not, the refusal says why."""
    cfg = model.config
    ids = torch.tensor([[1, 1]], device=next(model.parameters()).device)
    try:
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                max_new_tokens=2,
                do_sample=False,
                num_beams=1,
                **HF_GENERATE_AS_KERNL,
            )
    except Exception as e:  # noqa: BLE001 - whatever it is, kernl cannot validate against it
        raise UnsupportedModelError(
            f"seq2seq: a T5 with more decoder layers ({cfg.num_decoder_layers}) than encoder "
            f"layers ({cfg.num_layers}): Hugging Face's own generate fails on it here "
            f"({type(e).__name__}: {str(e)[:80]}), so kernl cannot validate its ids"
        ) from None


def _decoder_output_scale(model) -> float:
    """The factor T5's head applies to the decoder's output before its projection: d_model^-0.5
    or 1, depending on the model type, the config and the transformers version (T5 scales
    when its embeddings are tied or `scale_decoder_outputs` says so; transformers 5.2x's mT5
    never does). Greedy ids cannot tell the two apart (validation compares ids), while
    sampling and streamed logits can: so it is read from one forward of two tokens, the
    logits against the head of the last hidden state (in the head's dtype: no fp32 copy of
    an mT5-XXL's 4 GB head). Where that forward overflows (a T5 in fp16), the config's rule."""
    cfg = model.config
    d = cfg.d_model
    head = model.get_output_embeddings().weight
    ids = torch.tensor([[1, 2]], device=head.device)
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids, output_hidden_states=True)
        h, logits = out.decoder_hidden_states[-1], out.logits.float()
        errors = {
            f: float((logits - F.linear(h * f, head).float()).abs().max()) for f in (1.0, d**-0.5)
        }
    scale = float(logits.abs().max())
    if not all(math.isfinite(e) for e in [*errors.values(), scale]):
        return d**-0.5 if getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings) else 1.0
    best = min(errors, key=errors.get)
    if errors[best] > 1e-2 * max(scale, 1e-6):
        raise UnsupportedModelError(
            f"seq2seq: {type(model).__name__}'s logits are not its head applied to the "
            "decoder's output (scaled by 1 or d_model^-0.5); kernl cannot reproduce them"
        )
    return best


def _t5(model, model_type: str = "t5"):
    cfg = model.config
    if cfg.num_decoder_layers > cfg.num_layers:
        _probe_hugging_face_generate(model)
    for side, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
        if not _same(stack.embed_tokens.weight, model.shared.weight):
            # kernl's T5 reads one table for both sides (validation then failed on "greedy
            # ids differ", saying nothing of why)
            raise UnsupportedModelError(
                f"this T5's {side}.embed_tokens is not its shared embedding table "
                f"(model.shared), and kernl's T5 reads one table for both sides: tie them "
                f"(model.{side}.embed_tokens = model.shared) where they should be one, as a "
                "checkpoint loaded with from_pretrained has them"
            )
    gated = bool(cfg.is_gated_act)
    untied = _untied_head(model)
    spec = Seq2SeqSpec(
        family="t5",
        model_type=model_type,
        num_encoder_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        d_model=cfg.d_model,
        num_heads=cfg.num_heads,
        head_dim=cfg.d_kv,
        ffn_dim=cfg.d_ff,
        vocab_size=cfg.vocab_size,
        norm="rms",
        norm_eps=float(cfg.layer_norm_epsilon),
        pre_norm=True,
        mlp="gated" if gated else "plain",
        activation=_activation(cfg.dense_act_fn),
        positions="relative",
        attention_scale=1.0,
        relative_buckets=cfg.relative_attention_num_buckets,
        relative_max_distance=cfg.relative_attention_max_distance,
        final_norm=True,
        logits_scale=_decoder_output_scale(model),
        tied_embeddings=not untied,
        **_token_ids(model),
    )
    w = {"embed.weight": model.shared.weight}
    for side, stack in (("enc", model.encoder), ("dec", model.decoder)):
        w[f"{side}.rel_bias.weight"] = (
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        )
        w[f"{side}.final_norm.weight"] = stack.final_layer_norm.weight
        for i, block in enumerate(stack.block):
            p = f"{side}.layers.{i}."
            sa = block.layer[0].SelfAttention
            w[p + "attn_norm.weight"] = block.layer[0].layer_norm.weight
            w[p + "qkv.weight"] = torch.cat([sa.q.weight, sa.k.weight, sa.v.weight])
            w[p + "o.weight"] = sa.o.weight
            if side == "dec":
                ca = block.layer[1].EncDecAttention
                w[p + "cross_norm.weight"] = block.layer[1].layer_norm.weight
                w[p + "cross_q.weight"] = ca.q.weight
                w[p + "cross_kv.weight"] = torch.cat([ca.k.weight, ca.v.weight])
                w[p + "cross_o.weight"] = ca.o.weight
            ff = block.layer[-1]
            w[p + "mlp_norm.weight"] = ff.layer_norm.weight
            if gated:
                d = ff.DenseReluDense
                w[p + "gate_up.weight"] = torch.cat([d.wi_0.weight, d.wi_1.weight])
                w[p + "down.weight"] = d.wo.weight
            else:
                w[p + "fc.weight"] = ff.DenseReluDense.wi.weight
                w[p + "proj.weight"] = ff.DenseReluDense.wo.weight
    if untied:
        w["lm_head.weight"] = model.lm_head.weight
    return spec, w


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() or (a.shape == b.shape and torch.equal(a, b))


def _bart(model, family: str):
    """BART (post-norm, layernorm_embedding), mBART (pre-norm, layernorm_embedding and a final
    layer_norm per side) and Marian (post-norm, neither; sinusoidal positions): one layout."""
    cfg = model.config
    # (fairseq's normalize_before and add_final_layer_norm, which old BART configs carry, are
    # read by no transformers BART: HF's is post-norm whatever they say, and so is kernl's;
    # refusing them refused models HF runs)
    if cfg.encoder_attention_heads != cfg.decoder_attention_heads:
        raise UnsupportedModelError(
            f"{family} with different encoder and decoder head counts "
            f"({cfg.encoder_attention_heads} and {cfg.decoder_attention_heads}) is not supported"
        )
    if cfg.encoder_ffn_dim != cfg.decoder_ffn_dim:
        raise UnsupportedModelError(
            f"{family} with different encoder and decoder widths (feed-forward "
            f"{cfg.encoder_ffn_dim} and {cfg.decoder_ffn_dim}) is not supported"
        )
    dec_vocab = getattr(cfg, "decoder_vocab_size", None)
    if family == "marian" and dec_vocab is not None and dec_vocab != cfg.vocab_size:
        raise UnsupportedModelError(
            f"Marian with decoder_vocab_size {dec_vocab} != vocab_size {cfg.vocab_size} "
            "(separate target vocabulary) is not supported"
        )
    m = model.model
    enc_embed, dec_embed = m.encoder.embed_tokens.weight, m.decoder.embed_tokens.weight
    decoder_embed = not _same(enc_embed, dec_embed)
    untied = not _same(model.lm_head.weight, dec_embed)
    heads = cfg.encoder_attention_heads
    pos = m.encoder.embed_positions
    mbart = family == "mbart"
    # Marian's table is sinusoidal (no offset); BART's and mBART's learned (offset 2).
    offset = int(getattr(pos, "offset", 0))
    spec = Seq2SeqSpec(
        family=family,
        model_type=family,
        num_encoder_layers=cfg.encoder_layers,
        num_decoder_layers=cfg.decoder_layers,
        d_model=cfg.d_model,
        num_heads=heads,
        head_dim=cfg.d_model // heads,
        ffn_dim=cfg.encoder_ffn_dim,
        vocab_size=cfg.vocab_size,
        norm="layer",
        norm_eps=float(m.encoder.layers[0].self_attn_layer_norm.eps),
        pre_norm=mbart,
        mlp="plain",
        activation=_activation(cfg.activation_function),
        positions="learned",
        attention_scale=(cfg.d_model // heads) ** -0.5,
        max_positions=pos.weight.shape[0],
        position_offset=offset,
        embed_scale=math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0,
        embed_norm=family != "marian",
        final_norm=mbart,
        biases=True,
        tied_embeddings=not untied,
        final_logits_bias=True,
        decoder_embed=decoder_embed,
        **_token_ids(model),
    )
    w = {"embed.weight": enc_embed, "final_logits_bias": model.final_logits_bias[0]}
    if decoder_embed:
        w["dec.embed.weight"] = dec_embed

    def lin(p: str, mod) -> None:
        w[p + ".weight"], w[p + ".bias"] = mod.weight, mod.bias

    for side, stack in (("enc", m.encoder), ("dec", m.decoder)):
        w[f"{side}.pos_embed.weight"] = stack.embed_positions.weight
        if spec.embed_norm:
            lin(f"{side}.embed_norm", stack.layernorm_embedding)
        if spec.final_norm:
            lin(f"{side}.final_norm", stack.layer_norm)
        for i, layer in enumerate(stack.layers):
            p = f"{side}.layers.{i}."
            sa = layer.self_attn
            w[p + "qkv.weight"] = torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight])
            w[p + "qkv.bias"] = torch.cat([sa.q_proj.bias, sa.k_proj.bias, sa.v_proj.bias])
            lin(p + "o", sa.out_proj)
            lin(p + "attn_norm", layer.self_attn_layer_norm)
            if side == "dec":
                ca = layer.encoder_attn
                lin(p + "cross_q", ca.q_proj)
                w[p + "cross_kv.weight"] = torch.cat([ca.k_proj.weight, ca.v_proj.weight])
                w[p + "cross_kv.bias"] = torch.cat([ca.k_proj.bias, ca.v_proj.bias])
                lin(p + "cross_o", ca.out_proj)
                lin(p + "cross_norm", layer.encoder_attn_layer_norm)
            lin(p + "fc", layer.fc1)
            lin(p + "proj", layer.fc2)
            lin(p + "mlp_norm", layer.final_layer_norm)
    if untied:
        w["lm_head.weight"] = model.lm_head.weight
    return spec, w


def _whisper(model):
    cfg = model.config
    if (
        cfg.encoder_attention_heads != cfg.decoder_attention_heads
        or cfg.encoder_ffn_dim != cfg.decoder_ffn_dim
    ):
        raise UnsupportedModelError(
            "Whisper with different encoder and decoder widths is not supported"
        )
    m = model.model
    enc, dec = m.encoder, m.decoder
    if enc.embed_positions.weight.shape[0] != cfg.max_source_positions:
        raise UnsupportedModelError(
            "Whisper's encoder position table must match max_source_positions"
        )
    heads = cfg.encoder_attention_heads
    untied = _untied_head(model)
    spec = Seq2SeqSpec(
        family="whisper",
        model_type="whisper",
        num_encoder_layers=cfg.encoder_layers,
        num_decoder_layers=cfg.decoder_layers,
        d_model=cfg.d_model,
        num_heads=heads,
        head_dim=cfg.d_model // heads,
        ffn_dim=cfg.encoder_ffn_dim,
        vocab_size=cfg.vocab_size,
        norm="layer",
        norm_eps=float(enc.layer_norm.eps),
        pre_norm=True,
        mlp="plain",
        activation=_activation(cfg.activation_function),
        positions="learned",
        attention_scale=(cfg.d_model // heads) ** -0.5,
        max_positions=cfg.max_target_positions,
        final_norm=True,  # the encoder's and the decoder's layer_norm
        biases=True,
        tied_embeddings=not untied,
        num_mel_bins=cfg.num_mel_bins,
        source_positions=cfg.max_source_positions,
        **_token_ids(model, forcing=False),
    )
    w = {"embed.weight": dec.embed_tokens.weight}

    def lin(p: str, mod) -> None:
        w[p + ".weight"] = mod.weight
        w[p + ".bias"] = mod.bias if mod.bias is not None else torch.zeros_like(mod.weight[:, 0])

    lin("enc.conv1", enc.conv1)
    lin("enc.conv2", enc.conv2)
    for side, stack in (("enc", enc), ("dec", dec)):
        w[f"{side}.pos_embed.weight"] = stack.embed_positions.weight
        lin(f"{side}.final_norm", stack.layer_norm)
        for i, layer in enumerate(stack.layers):
            p = f"{side}.layers.{i}."
            attns = [("", "qkv", layer.self_attn)]
            if side == "dec":
                attns.append(("cross_", "cross_kv", layer.encoder_attn))
                lin(p + "cross_norm", layer.encoder_attn_layer_norm)
            for prefix, fused, a in attns:
                k_bias = torch.zeros_like(a.k_proj.weight[:, 0])  # Whisper's k_proj has no bias
                parts = [a.k_proj, a.v_proj] if prefix else [a.q_proj, a.k_proj, a.v_proj]
                w[p + fused + ".weight"] = torch.cat([x.weight for x in parts])
                w[p + fused + ".bias"] = torch.cat(
                    [k_bias if x is a.k_proj else x.bias for x in parts]
                )
                if prefix:
                    lin(p + "cross_q", a.q_proj)
                lin(p + prefix + "o", a.out_proj)
            lin(p + "attn_norm", layer.self_attn_layer_norm)
            lin(p + "fc", layer.fc1)
            lin(p + "proj", layer.fc2)
            lin(p + "mlp_norm", layer.final_layer_norm)
    if untied:
        w["lm_head.weight"] = model.proj_out.weight
    return spec, w


def speech_spec(model) -> SpeechSpec:
    """Whisper's generation config (falling back to the model config's forced_decoder_ids, as
    Hugging Face does). Refuses options kernl's generate does not apply."""
    gen, cfg = model.generation_config, model.config
    forced = getattr(gen, "forced_decoder_ids", None) or getattr(cfg, "forced_decoder_ids", None)
    forced = [[int(i), DETECT if t is None else int(t)] for i, t in (forced or [])]
    if [i for i, _ in forced] != list(range(1, len(forced) + 1)) or len(forced) > MAX_PROMPT - 3:
        raise UnsupportedModelError(
            f"forced_decoder_ids {forced} do not follow Whisper's prompt pattern (positions 1, 2, "
            f"..., at most {MAX_PROMPT - 3})"
        )
    refuse_unapplied_options(gen, "speech-seq2seq")
    for name, default in (
        ("num_beams", 1),
        ("length_penalty", 1.0),
        # HF's default generate would then predict timestamps; kernl's refuses them
        ("return_timestamps", False),
    ):
        value = getattr(gen, name, None)
        if value is not None and value != default:
            raise UnsupportedModelError(
                f"generation_config.{name}={value!r} is not supported by kernl's generate: "
                "reset it on model.generation_config (or in generation_config.json) first"
            )
    no_ts = getattr(gen, "no_timestamps_token_id", None)
    lang_to_id = {str(k): int(v) for k, v in (getattr(gen, "lang_to_id", None) or {}).items()}
    language = getattr(gen, "language", None)
    if language is not None and not isinstance(language, str):
        # Hugging Face takes a list for a batch of that many rows only; the artifact serves
        # every batch of its buckets (validation ran each, and the first other one failed)
        raise UnsupportedModelError(
            f"generation_config.language={list(language)!r} names a language per row of a "
            f"batch of {len(language)}, and kernl's artifact serves every batch size of its "
            "buckets: set one language (or None: detected) on model.generation_config, and "
            "pass language=[...] per call"
        )
    task = getattr(gen, "task", None)
    return SpeechSpec(
        lang_to_id=lang_to_id,
        language_names=_language_names(lang_to_id),
        task_to_id={str(k): int(v) for k, v in (getattr(gen, "task_to_id", None) or {}).items()},
        no_timestamps_token_id=None if no_ts is None else int(no_ts),
        is_multilingual=getattr(gen, "is_multilingual", None),
        forced_decoder_ids=forced,
        # ids past the vocabulary suppress nothing in Hugging Face (torch.isin never meets
        # them); kept, the artifact's reader refused them as a corrupt description
        suppress_tokens=_in_vocab(gen.suppress_tokens, cfg.vocab_size),
        begin_suppress_tokens=_in_vocab(gen.begin_suppress_tokens, cfg.vocab_size),
        language=language,
        task=None if task is None else str(task),
    )


def _in_vocab(ids, vocab: int) -> list[int]:
    return [int(t) for t in (ids or []) if 0 <= int(t) < vocab]


def _language_names(lang_to_id: dict[str, int]) -> dict[str, str]:
    """The language names (and aliases) Hugging Face's Whisper generate takes for a language
    token of this model: "english" -> "<|en|>"."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    named = {name: f"<|{code}|>" for name, code in TO_LANGUAGE_CODE.items()}
    return {name: key for name, key in named.items() if key in lang_to_id}
