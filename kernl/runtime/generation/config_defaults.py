"""A generation config's settings applied to the calls that leave them out, as Hugging Face's
generate applies its model's: the sampling settings (an instruct model's `do_sample=True,
temperature=0.6, top_p=0.9`), the length (`max_new_tokens`, else `max_length`), and the
refusal of the options kernl's generate does not apply (`num_return_sequences`, ...).

Two sources use it: a loaded artifact's own record of the config it was compiled with
(artifacts/generation_defaults.py: `takes_generation_defaults` on generate, stream and
open_batch), and kernl.optimize's model, which applies its live `generation_config` (edits
included) instead. `config` is any object with those attributes; a value left None is Hugging
Face's default."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from .hf_options import LENGTH_IS_A_BOUND, refuse_hf_options

# Hugging Face's values for a generation config's sampling keys left None
# (GenerationConfig._get_default_generation_params).
HF_SAMPLING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}

# The generation config's length keys, taken from the config at every call.
LENGTH_KEYS = frozenset({"max_new_tokens", "max_length"})

# Generation config settings that change what Hugging Face's generate returns, or when it stops,
# without an argument of the call. kernl's generate applies none of them: where the config sets
# one, a call that does not override it is refused (it was served otherwise: a tensor for
# return_dict_in_generate=True, one row a prompt for num_return_sequences=2, no stop at
# max_time). The compile passes them to HF's reference generate at their neutral values
# (compiler/tasks/generation_config.HF_GENERATE_AS_KERNL, which also holds prompt lookup: HF's
# ids are the same with it).
CONFIG_OPTIONS_NOT_APPLIED = (
    "return_dict_in_generate",
    "num_return_sequences",
    "max_time",
    "stop_strings",
    "dola_layers",
)


def config_sampling(
    method: Callable, config: Any, args: tuple, kwargs: dict, speech: bool = False
) -> dict:
    """The config's do_sample, temperature, top_k and top_p for the keys a call of `method`
    leaves out, as Hugging Face's generate takes them: an instruct model whose config says
    `do_sample=True, temperature=0.6, top_p=0.9` samples so unless the call says otherwise,
    and a call's `do_sample=True` samples with the config's temperature and top-k. A key left
    None there is HF's default. Whisper (`speech`) samples as HF's Whisper does, on a call's
    temperature above 0 alone: its config's do_sample and temperature are not read, its top_k
    and top_p are."""
    signature = inspect.signature(method)
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return {}  # the call itself is wrong: the method raises its own error
    given = set(bound) | set(kwargs)
    keys = ("top_k", "top_p") if speech else tuple(HF_SAMPLING_DEFAULTS)
    sampling = {}
    for key in keys:
        if key in given or key not in signature.parameters:
            continue
        value = getattr(config, key, None)
        sampling[key] = HF_SAMPLING_DEFAULTS[key] if value is None else value
    if speech or sampling.get("do_sample", bound.get("do_sample", False)):
        return sampling
    # greedy: the config's temperature etc. change nothing, and are not checked
    return {k: v for k, v in sampling.items() if k == "do_sample"}


def with_config_length(
    method: Callable, config: Any, speech: bool, *args: Any, **kwargs: Any
) -> Any:
    """`method` (generate, stream or open_batch) with the config's own length where the call
    gives none, as Hugging Face's generate takes it: a pipeline that finds a length there
    passes none (kernl's generate alone would stop at 20 new tokens). A length from the config
    is a bound, as in HF: past the KV cache it is cut to what fits, with a warning. As in HF
    (GenerationConfig.update applies a keyword even when it is None), a call's explicit
    `max_new_tokens=None` drops the config's max_new_tokens (its max_length, else 20 new
    tokens, then) and `max_length=None` its max_length. The config's max_new_tokens wins over
    a call's max_length, as HF's does (it warns); a call's max_new_tokens wins over both.
    transformers 5 leaves max_length None unless it is set: a config's 20 is a length.
    `open_batch` takes no max_length (its rows' prompts differ): the config's max_new_tokens
    alone. `speech` (Whisper, whose runtime default is the whole cache): HF's 20 where no
    length is given anywhere."""
    signature = inspect.signature(method)
    given = signature.bind_partial(*args, **kwargs).arguments
    if given.get("max_new_tokens") is not None:
        return method(*args, **kwargs)
    config_max_length = getattr(config, "max_length", None)
    if "max_length" not in signature.parameters:
        config_max_length = None
    if "max_new_tokens" not in given and getattr(config, "max_new_tokens", None) is not None:
        name, value = "max_new_tokens", config.max_new_tokens
    elif given.get("max_length") is not None:
        return method(*args, **kwargs)
    elif "max_length" not in given and config_max_length is not None:
        name, value = "max_length", config_max_length
    elif given.get("max_length") is None and speech:
        # no length anywhere (a config built from a WhisperConfig; a call's None drops the
        # config's): HF's GenerationConfig default of 20, which Whisper counts as new
        # tokens; kernl's Whisper alone runs to the cache (it ran to the cache here)
        name, value = "max_length", 20
    else:
        return method(*args, **kwargs)
    kwargs[name] = value
    source = "the generation config's" if getattr(config, name, None) == value else "HF's default"
    token = LENGTH_IS_A_BOUND.set(f"{source} {name}={value}")
    try:
        return method(*args, **kwargs)
    finally:
        LENGTH_IS_A_BOUND.reset(token)


def refuse_config_options_not_applied(
    method: Callable,
    config: Any,
    args: tuple,
    kwargs: dict,
    where: str = "model.generation_config",
    fix: str = "Set it back to its default on model.generation_config (None)",
) -> None:
    """Raise ValueError naming the settings of CONFIG_OPTIONS_NOT_APPLIED that `config`
    holds at other than their neutral value, where the call of `method` does not give them
    itself (a call's neutral value wins, as any call argument does in HF)."""
    try:
        bound = inspect.signature(method).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return  # the call itself is wrong: the method raises its own error
    given = set(bound) | set(kwargs)
    refused = [
        f"{key}={getattr(config, key)!r}"
        for key in CONFIG_OPTIONS_NOT_APPLIED
        if key not in given
        and getattr(config, key, None) is not None
        and not neutral(method, key, getattr(config, key))
    ]
    if refused:
        raise ValueError(
            f"{where} sets {', '.join(refused)}, which Hugging Face's generate applies and "
            f"kernl's {method.__name__}() does not: it returns the ids, one row a prompt, and "
            f"stops at max_new_tokens or an EOS id. {fix}, or pass the default to the call"
        )


def neutral(method: Callable, key: str, value: Any) -> bool:
    """Whether kernl's generate takes this Hugging Face option's value as a call's (num_beams=1:
    what kernl does anyway)."""
    try:
        refuse_hf_options(method.__name__, {key: value})
    except TypeError:
        return False
    return True


ARTIFACT_CONFIG = "the artifact's generation config (the model's, as compiled)"
ARTIFACT_FIX = "Compile again from a generation config without it"


def takes_generation_defaults(method: Callable) -> Callable:
    """Decorates a loaded model's generate, stream or open_batch: the generation config the
    artifact was compiled with (`self.generation_defaults`; None: none recorded, or applied
    by a caller, as kernl.optimize's model applies its live one) supplies what a call leaves
    out."""

    @functools.wraps(method)
    def with_defaults(self, *args: Any, **kwargs: Any) -> Any:
        config = getattr(self, "generation_defaults", None)
        if config is None:
            return method(self, *args, **kwargs)
        bound = method.__get__(self)  # the signature without self, and the method's name
        speech = getattr(self, "speech", None) is not None
        refuse_config_options_not_applied(
            bound, config, args, kwargs, ARTIFACT_CONFIG, ARTIFACT_FIX
        )
        kwargs.update(config_sampling(bound, config, args, kwargs, speech))
        return with_config_length(bound, config, speech, *args, **kwargs)

    return with_defaults
