"""Hugging Face generate's keyword arguments as kernl's generate, stream and open_batch take
them: the neutral values taken silently (code written for HF passes them), the rest refused
with what kernl does instead; and the flag that a call's length came from a generation config
(a bound, cut to the cache). A leaf of runtime/generation: the models (model.py) and the
generation config's application (config_defaults.py) both read it."""

from __future__ import annotations

import contextvars
from typing import Any

import torch

# Set while a call's length came from a generation config (kernl.optimize's live one, or the
# one a loaded artifact recorded), not the caller: a bound, as Hugging Face's max_length is,
# so a config's 4096 (Llama-2-chat's) is cut to what the KV cache holds after the prompt,
# with a warning, instead of refused.
LENGTH_IS_A_BOUND: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kernl_length_is_a_bound", default=None
)


# Hugging Face generate arguments that change nothing here, whatever their value: kernl always
# decodes over its static KV cache (HF's ids are the same with use_cache=False, only slower),
# and HF reads bos_token_id only to make a prompt where no input_ids are given (kernl's generate
# always has them).
IGNORED_HF_OPTIONS = frozenset({"use_cache", "bos_token_id"})
# Arguments of Hugging Face's generate that kernl's do not take: the value that changes
# nothing (taken silently, as code written for HF passes it) and where to go instead.
_HF_OPTIONS = {
    "return_segments": (
        False,
        "generate returns the ids only (Hugging Face's automatic-speech-recognition pipeline "
        "passes it for return_language=True, which kernl does not serve; language= sets one)",
    ),
    "num_beams": (
        1,
        "beam search is not supported: generate decodes greedily, or samples. Hugging Face's "
        "automatic-speech-recognition pipeline passes num_beams=5 unless told otherwise: give "
        'it generate_kwargs={"num_beams": 1}',
    ),
    "num_return_sequences": (1, "repeat the prompt in the batch, with a seed per row"),
    "synced_gpus": (False, "kernl runs one model on one GPU"),
    "streamer": (None, "model.stream(...) yields each step's new ids as they come"),
    "output_scores": (False, "model.stream(..., output_logits=True) yields each step's logits"),
    "output_logits": (False, "model.stream(..., output_logits=True) yields each step's logits"),
    "return_dict_in_generate": (False, "generate returns the ids (model.stream for logits)"),
    "decoder_input_ids": (
        None,
        "the decoder starts from the model's decoder start token; a decoder prompt is not "
        "supported (forced_bos_token_id= sets the first new token of a text model)",
    ),
    "encoder_outputs": (
        None,
        "the compiled encoder runs inside generate: pass the source's input_ids and attention_mask",
    ),
    "decoder_attention_mask": (
        None,
        "the decoder starts from the model's decoder start token, every position attended",
    ),
    "generation_config": (
        None,
        "pass its settings as arguments (max_new_tokens, do_sample, temperature, top_k, "
        "top_p, eos_token_id, pad_token_id); the model's own EOS and pad ids are the defaults",
    ),
    "output_attentions": (False, "generate returns the ids; the kernels keep no attention weights"),
    "output_hidden_states": (False, "generate returns the ids (model.stream for logits)"),
    "cache_implementation": (None, "kernl always decodes over its static KV cache"),
    "cache_config": (None, "kernl always decodes over its static KV cache, sized at compile"),
    "compile_config": (None, "the model was compiled ahead of time, by kernl-compile"),
    "length_penalty": (1.0, "beam search is not supported: generate decodes greedily, or samples"),
    "early_stopping": (
        False,
        "beam search is not supported: generate decodes greedily, or samples",
    ),
    "num_beam_groups": (1, "beam search is not supported: generate decodes greedily, or samples"),
    "diversity_penalty": (
        0.0,
        "beam search is not supported: generate decodes greedily, or samples",
    ),
}


# Options of Hugging Face's generate that change which tokens come out, with the value that
# changes nothing (None, HF's unset, changes nothing either). kernl decodes greedily or samples
# with temperature, top-k and top-p: a call passing one of these is refused, and a model whose
# generation config sets one is refused at compile (compiler/tasks/generation_config.py).
IDS_CHANGING_OPTIONS = {
    "penalty_alpha": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": 0,
    "exponential_decay_length_penalty": None,
    "sequence_bias": None,
    "force_words_ids": None,
    "constraints": None,
    "guidance_scale": 1.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": 0.0,
    "top_h": None,
    "watermarking_config": None,
    "token_healing": False,  # HF rewrites the prompt's last tokens (with a tokenizer)
}
# Also refused per call (their empty values pass). _FROM_THE_CONFIG: some tasks apply them
# from the model's generation config (Marian's bad_words_ids, Whisper's suppressed tokens),
# and a call cannot change them: any value given is refused, as HF would take even None.
_FROM_THE_CONFIG = {
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_eos_token_id",
}
_CALL_OPTIONS_NOT_TAKEN = {
    **IDS_CHANGING_OPTIONS,
    "logits_processor": None,
    "prefix_allowed_tokens_fn": None,
    "stopping_criteria": None,
    "stop_strings": None,
    "max_time": None,
    "assistant_model": None,
    "prompt_lookup_num_tokens": None,
    "forced_bos_token_id": None,  # a seq2seq model's generate takes it
    "forced_decoder_ids": None,
    "dola_layers": None,
    "remove_invalid_values": False,
    "renormalize_logits": False,
    "token_healing": False,
    "negative_prompt_ids": None,
    "negative_prompt_attention_mask": None,
    "custom_generate": None,
    "tokenizer": None,
    "assistant_tokenizer": None,
    "num_assistant_tokens": None,
    "num_assistant_tokens_schedule": None,
    "assistant_confidence_threshold": None,
    "assistant_early_exit": None,
    "assistant_lookbehind": None,
    "target_lookbehind": None,
    "max_matching_ngram_size": None,
}
_NOT_APPLIED = (
    "kernl does not take it: generate decodes greedily, or samples with temperature, top_k "
    "and top_p, until max_new_tokens or an EOS id (what a model's generation config sets, "
    "kernl applies or refuses at compile)"
)


def refuse_hf_options(method: str, options: dict) -> None:
    """Hugging Face generate arguments passed to kernl's `method`: their neutral values are
    taken, anything else is a TypeError saying what kernl does instead."""
    for name, value in options.items():
        if name in IGNORED_HF_OPTIONS:
            continue
        if name in _FROM_THE_CONFIG:
            # Hugging Face takes any value given, None and [] included (they turn it off)
            raise TypeError(
                f"{method}() does not take {name}: kernl applies the model's generation config's "
                f"{name} (as compiled), and a call cannot change it"
            )
        if name in _CALL_OPTIONS_NOT_TAKEN and name not in _HF_OPTIONS:
            neutral, instead = _CALL_OPTIONS_NOT_TAKEN[name], _NOT_APPLIED
            if value is None or _empty(value) or _same_number(value, neutral):
                continue
        elif name not in _HF_OPTIONS:
            raise TypeError(f"{method}() got an unexpected keyword argument {name!r}")
        else:
            neutral, instead = _HF_OPTIONS[name]
        if value is neutral or (
            type(value) in (bool, int) and type(neutral) is bool and value == neutral
        ):
            continue  # output_scores=0 as HF takes it
        if type(value) is not bool and _same_number(value, neutral):
            continue
        raise TypeError(f"{method}() does not take {name}={shown_value(value)}: {instead}")


def shown_value(value: Any) -> str:
    """An argument as an error message shows it (a tensor by its shape, not its values)."""
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)}>"
    items = value.values() if isinstance(value, dict) else value
    if isinstance(value, (tuple, list, dict)) and any(isinstance(v, torch.Tensor) for v in items):
        return f"<{type(value).__name__} of tensors>"  # encoder_outputs: not their values
    return repr(value)


def _empty(value: Any) -> bool:
    return isinstance(value, (list, tuple, dict)) and not value


def _same_number(value: Any, neutral: Any) -> bool:
    numbers = (int, float)
    return type(value) in numbers and type(neutral) in numbers and value == neutral
