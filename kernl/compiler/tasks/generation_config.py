"""What the generating tasks (causal_lm/, seq2seq/) take from a model's generation config: the
EOS ids, as the artifact can hold them, and the refusal of the options kernl's generate does
not apply."""

from __future__ import annotations

import warnings
from dataclasses import fields

from kernl.artifacts.errors import ArtifactCorruptError
from kernl.artifacts.generation import MAX_EOS_IDS
from kernl.artifacts.generation_defaults import GenerationDefaults
from kernl.runtime.generation.hf_options import IDS_CHANGING_OPTIONS
from kernl.runtime.generation.model import check_options

from ..code_digest import inert_transformers_hook, own_forward
from ..plural import first_few
from ..trace import UnsupportedModelError, package_of


def config_of(model_or_path):
    """A model's config, or a folder's config.json read alone, before any weight loads; None
    where it cannot be read (load_model explains)."""
    import torch

    config = getattr(model_or_path, "config", None)
    if config is None and not isinstance(model_or_path, torch.nn.Module):
        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(
                str(model_or_path), local_files_only=True
            )
        except (OSError, ValueError):
            return None
    return config


def model_type_of(model_or_path) -> tuple[str | None, list[str]]:
    """(model type, architectures) from a model's config or a folder's config.json alone,
    before any weight loads; (None, []) where the config cannot be read (load_model explains)."""
    config = config_of(model_or_path)
    return getattr(config, "model_type", None), list(getattr(config, "architectures", None) or [])


def eos_token_ids(eos, vocab: int, task: str) -> list[int]:
    """`eos` (one id, a list of ids or None, as a config or generation config holds it) as
    distinct ids in [0, vocab), in order. Raises UnsupportedModelError, before anything is
    traced, for more ids than the runtime's EOS buffer holds: the artifact's reader refuses
    them, so the compile would otherwise fail only when it writes the artifact."""
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    ids = list(dict.fromkeys(int(e) for e in eos if 0 <= int(e) < vocab))
    if len(ids) > MAX_EOS_IDS:
        raise UnsupportedModelError(
            f"{task}: the model stops at {len(ids)} EOS ids ({ids}); kernl stops at "
            f"{MAX_EOS_IDS} at most. Set model.generation_config.eos_token_id to the ones "
            "you need before compiling."
        )
    return ids


# Options of Hugging Face's generate that change which tokens come out, with the value that
# changes nothing: the runtime refuses them per call, the compile in a generation config. A
# model whose generation config sets one would get other ids from kernl than from its own
# generate, silently (a text seq2seq model's compile found it only when validation's inputs
# happened to trigger the option). Beam search (num_beams) is not here: kernl never runs it,
# and says so (beam_search_not_run, README).
NEUTRAL = IDS_CHANGING_OPTIONS


# What the compile passes to Hugging Face's own generate, where it is the reference: the
# generation config's settings that change the form of HF's output, or end or search it
# otherwise than kernl's generate does, at their neutral values. Set on a checkpoint's config,
# they failed the compile (a ModelOutput where ids were expected; max_time's cut as a false
# validation error; stop_strings without a tokenizer); kernl.optimize's model refuses them per
# call instead (optimize._CONFIG_OPTIONS_NOT_APPLIED).
HF_GENERATE_AS_KERNL = dict(
    return_dict_in_generate=False,
    num_return_sequences=1,
    max_time=None,
    stop_strings=None,
    dola_layers=None,
    prompt_lookup_num_tokens=None,
)


def recorded_generation_defaults(model) -> dict:
    """The model's generation config as the artifact records it (GenerationDefaults): the
    settings a loaded artifact's generate takes where a call leaves them out, as Hugging
    Face's generate takes them from its model. Refused here where the record could not hold
    one (a value outside what HF's generate takes)."""
    gen = getattr(model, "generation_config", None)
    names = [f.name for f in fields(GenerationDefaults)]
    found = {k: _plain(getattr(gen, k, None)) for k in names} if gen is not None else {}
    found = {k: v for k, v in found.items() if v is not None}
    try:
        GenerationDefaults.from_dict(found, "the generation config")
        if found.get("do_sample"):  # what every call that leaves them out samples with
            check_options(
                1, True, *(found.get(k) for k in ("temperature", "top_k", "top_p")),
                None, None, 0, vocab=1, rows=1,
            )  # fmt: skip
    except (ArtifactCorruptError, ValueError) as e:
        raise UnsupportedModelError(
            f"the model's generation config, which a loaded artifact's generate follows where "
            f"a call leaves a setting out: {e}. Set it on model.generation_config (or in "
            "generation_config.json) to a value kernl's sampler takes, or to None"
        ) from None
    return found


def _plain(value):
    """A config value as msgpack holds it: tuples as lists."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def beam_search_not_run(beams: int | None) -> str | None:
    """What to say where the generation config asks for beam search (`beams`: its num_beams),
    which kernl never runs (it decodes greedily, or samples): Marian, BART and mBART
    checkpoints set num_beams to 4-6, and their ids from kernl then differ from Hugging
    Face's generate. Said at compile and by kernl.optimize's model, not refused: those
    checkpoints serve as they are, greedy."""
    if beams is None or beams == 1:
        return None
    return (
        f"the generation config's num_beams={beams} is not applied: kernl decodes greedily "
        f"(or samples with do_sample=True) where Hugging Face's generate runs a {beams}-beam "
        "search, so their ids differ; set model.generation_config.num_beams = 1 (or in "
        "generation_config.json) to compare like with like"
    )


def say_beam_search_not_run(message: str | None, progress) -> None:
    """beam_search_not_run's `message` to the compile's progress, or, where the caller gave
    none (compile() from Python), as a warning: it went nowhere, and the ids that differ from
    Hugging Face's beam search came without a word."""
    if message is None:
        return
    if progress is not None:
        progress(message)
    else:
        warnings.warn(message, stacklevel=4)


def refuse_unapplied_options(gen, task: str, also: tuple[str, ...] = ()) -> None:
    """Raise UnsupportedModelError naming every option of the generation config `gen` (and the
    ids options in `also`, which this task does not apply) set to anything but its neutral
    value. The way out is explicit: reset them on model.generation_config (or in the folder's
    generation_config.json) to compile the model as kernl decodes it."""
    if gen is None:
        return
    neutral = {**NEUTRAL, **dict.fromkeys(also)}
    bad = []
    for name, value in neutral.items():
        given = getattr(gen, name, None)
        if given is not None and given != value and given not in ([], {}):
            bad.append(f"{name}={given!r}")
    if bad:
        raise UnsupportedModelError(
            f"{task}: the model's generation config sets {', '.join(bad)}, which kernl's "
            "generate does not apply (it decodes greedily, or samples with temperature, top-k "
            "and top-p): its ids would differ from Hugging Face's generate. To compile it as "
            "kernl decodes, reset them on model.generation_config (or in the folder's "
            "generation_config.json) first."
        )


def refuse_module_code_kernl_drops(model, task: str) -> None:
    """Raise UnsupportedModelError naming the forward hooks, pre-hooks and per-module
    `forward` replacements of `model` (and torch's global module hooks): a generation task
    rebuilds the model from its weights and runs its own decoder, so none of them would run.
    A hook acting only on one-token decode steps passed validation (which compares one
    full-sequence forward) and then changed the ids in silence (2026-12-05)."""
    from torch.nn.modules import module as torch_module

    if package_of(model) == "peft":
        raise UnsupportedModelError(
            f"{task}: a peft {type(model).__name__}: kernl rebuilds the model from its weights "
            "and runs its own decoder. Fold adapters such as LoRA into the weights first: "
            "kernl.optimize(peft_model.merge_and_unload()); prompt learning (prompt, prefix "
            "or p-tuning) cannot be compiled"
        )
    adapters = [name for name, module in model.named_modules() if _live_adapter(module)]
    if adapters:
        # kernl reads each linear's `.weight`, which is a peft layer's base weight: the
        # adapter was dropped, and in bf16 a small one passed validation (2026-12-06)
        raise UnsupportedModelError(
            f"{task}: peft adapters (LoRA, DoRA, IA3...) not merged into the weights on {first_few(adapters)}: kernl "
            "rebuilds the model from its weights and runs its own decoder, so they would not "
            "run. Merge them first (peft_model.merge_and_unload(), or merge_adapter())"
        )
    found = []
    for name, module in model.named_modules():
        where = name or "the model"
        tables = (module._forward_hooks, module._forward_pre_hooks)
        hooks = sum(not inert_transformers_hook(h) for t in tables for h in t.values())
        if hooks:
            found.append(f"{where} ({hooks} forward hook{'s' if hooks > 1 else ''})")
        # accelerate's device-moving wrapper (dispatch_model, with its `_hf_hook`) computes
        # what the module does
        replaced = "forward" in vars(module) and not own_forward(module, vars(module)["forward"])
        if replaced and not hasattr(module, "_hf_hook"):
            found.append(f"{where} (a replaced forward)")
    hooks = len(torch_module._global_forward_hooks) + len(torch_module._global_forward_pre_hooks)
    if hooks:
        found.append(f"torch's global module hooks ({hooks})")
    if found:
        raise UnsupportedModelError(
            f"{task}: {first_few(found)}: kernl rebuilds the model from its weights and runs its own "
            "decoder, so that code would not run and the ids could differ from the model's "
            "own generate. Remove the hooks (handle.remove()) or restore the module's forward "
            "before compiling."
        )


def _live_adapter(module) -> bool:
    """A peft tuner layer (LoRA and its kin: a `base_layer` and `active_adapters`) whose
    active adapters change its output: enabled and not all merged into the base weight."""
    if package_of(module) != "peft" or not hasattr(module, "base_layer"):
        return False
    if getattr(module, "disable_adapters", False):
        return bool(getattr(module, "merged", False))  # peft unmerges on the disabled call
    active = getattr(module, "active_adapters", None) or []
    if isinstance(active, str):
        active = [active]
    available = getattr(module, "_get_available_adapters", None)
    if callable(available):  # the model-wide active adapter may not be on this layer at all
        try:
            active = [a for a in active if a in available()]
        except Exception:  # noqa: BLE001 - another peft version: every active one counts
            pass
    merged = set(getattr(module, "merged_adapters", None) or [])
    return not set(active) <= merged
