"""Load a Hugging Face model and export one static-shape graph per bucket."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import linecache
import logging
import os
import pickle
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kernl.artifacts.schema import Bucket, InputSpec, OutputSpec

from .plural import first_few

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPES.update({"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32})

TASKS = {
    "base": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "masked-lm": "AutoModelForMaskedLM",
    "question-answering": "AutoModelForQuestionAnswering",
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}
_ARCH_SUFFIX = {
    "ForSequenceClassification": "sequence-classification",
    "ForTokenClassification": "token-classification",
    "ForMaskedLM": "masked-lm",
    "ForQuestionAnswering": "question-answering",
    # Decoder-only generation heads (Llama/Mistral/Qwen2 ...ForCausalLM, GPT2LMHeadModel).
    "ForCausalLM": "causal-lm",
    "LMHeadModel": "causal-lm",
    # Encoder-decoder generation heads (T5ForConditionalGeneration, BartForConditionalGeneration).
    "ForConditionalGeneration": "seq2seq-lm",
    "ForSeq2SeqLM": "seq2seq-lm",  # peft's PeftModelForSeq2SeqLM (refused by name later)
    "MTModel": "seq2seq-lm",  # MarianMTModel
}
# Inputs kernl serves, in the order programs take them, with their padding and defaults.
_INPUTS = {
    "input_ids": ("required", None),
    "attention_mask": ("ones", 0),
    "token_type_ids": ("zeros", 0),
}


# Every task a compile takes: speech-seq2seq (Whisper) has no Auto class of its own.
ALL_TASKS = (*TASKS, "speech-seq2seq")
SEQ2SEQ_TASKS = ("seq2seq-lm", "speech-seq2seq")
# Tasks whose runtime model generates (.generate()/.stream()): no bucketed forward to call.
GENERATION_TASKS = ("causal-lm", *SEQ2SEQ_TASKS)


class UnsupportedModelError(ValueError):
    pass


def _refuse_composed_encoder_decoder(config) -> None:
    """transformers' EncoderDecoderModel (bert2bert) and its speech and vision kin: two models
    of any families joined. Inferred as an encoder ("base") they were refused as a model "of
    characters or bytes, as CANINE" (its config has no vocab_size), which said nothing of why."""
    model_type = getattr(config, "model_type", None)
    if model_type in ("encoder-decoder", "speech-encoder-decoder", "vision-encoder-decoder"):
        raise UnsupportedModelError(
            f"a composed {type(config).__name__} (model type {model_type!r}: two models "
            "joined, as bert2bert) is not supported; kernl's encoder-decoder generation "
            "supports t5, mt5, bart, mbart, marian and whisper, and it compiles the encoder "
            "alone as an encoder (model.encoder, task 'base')"
        )


def task_of(config, model: torch.nn.Module | None = None) -> str:
    _refuse_composed_encoder_decoder(config)
    names = list(getattr(config, "architectures", None) or [])
    if model is not None:
        own, _ = _class_task(model)
        if own == _UNKNOWN_HEAD:
            # a head no task names (BertForPreTraining): compiled as it is, under "base", not
            # under the task its checkpoint's architectures name (bert-base's ForMaskedLM)
            return "base"
        if own is not None:
            return own
    for name in names:
        _refuse_multiple_choice(name)  # else "base": its encoder compiled, the head dropped
        for suffix, task in _ARCH_SUFFIX.items():
            if name.endswith(suffix):
                return task
    if model is None:
        _refuse_unknown_head(names)
    return "base"


_UNKNOWN_HEAD = "<a head kernl has no task for>"


def _class_task(model: torch.nn.Module) -> tuple[str | None, str]:
    """The task the model object's class is, and the class of its MRO that says so: the first
    one named as a head (a user's `MyLlama(LlamaForCausalLM)` is causal-lm, whatever its own
    name; _UNKNOWN_HEAD for a head no task names, `BertForPreTraining`), else the first named
    as a bare model (`BertModel`, a user's subclass of it: "base"; not `LlamaPreTrainedModel`,
    the base of custom heads); None where no class says (a wrapper module: the config's
    architectures decide)."""
    mro = type(model).__mro__
    for klass in mro:
        name = klass.__name__
        _refuse_multiple_choice(name)
        own = next((t for suffix, t in _ARCH_SUFFIX.items() if name.endswith(suffix)), None)
        if own is not None:
            return own, name
        if _is_head(name):
            return _UNKNOWN_HEAD, name
    for klass in mro:
        name = klass.__name__
        # BertModel from AutoModel of a masked-LM checkpoint (architectures names the head):
        # the object given is the encoder alone
        if name.endswith("Model") and not name.endswith("PreTrainedModel") and "For" not in name:
            return "base", name
    return None, type(model).__name__


def _refuse_unknown_head(names: list[str]) -> None:
    """A checkpoint whose architecture is a head kernl has no task for (ElectraForPreTraining,
    what ELECTRA's discriminators ship; BertForPreTraining, ...): loaded by task, it would be
    compiled as its encoder with the head dropped, unlike the same model given as an object
    (compiled as it is). Said, with both ways on."""
    for name in names:
        if _is_head(name):
            raise UnsupportedModelError(
                f"{name}: kernl has no task for this head (tasks: {', '.join(ALL_TASKS)}). "
                "`--task base` compiles its encoder alone, the head dropped; to compile the "
                f"head too, load the model yourself (transformers.{name}.from_pretrained) and "
                "pass it to kernl.compiler.compile or kernl.optimize, which compile a model "
                "object as it is"
            )


def _is_head(name: str) -> bool:
    return bool(re.search(r"For[A-Z]", name)) or name.endswith(("HeadModel", "HeadsModel"))


def _refuse_multiple_choice(name: str) -> None:
    if name.endswith("ForMultipleChoice"):
        raise UnsupportedModelError(
            f"{name}: multiple-choice heads (ids of shape [batch, choices, seq]) are not "
            f"supported; tasks: {', '.join(ALL_TASKS)}"
        )


def check_task(task: str, model: torch.nn.Module | None = None) -> None:
    """Raise UnsupportedModelError for a task kernl does not know, or one that contradicts the
    class of the model object given (a BertModel compiled as masked-lm would be labelled
    masked-lm and serve hidden states)."""
    if task not in ALL_TASKS:
        raise UnsupportedModelError(f"unknown task {task!r}; choose from {', '.join(ALL_TASKS)}")
    if model is None:
        return
    own, name = _class_task(model)
    if own == "seq2seq-lm" and task in ("seq2seq-lm", "speech-seq2seq"):
        return  # WhisperForConditionalGeneration too (its loading runs the text task's checks)
    config = getattr(model, "config", None)
    if own == "seq2seq-lm" and getattr(config, "model_type", None) == "whisper":
        own = "speech-seq2seq"  # the hint names Whisper's own task (seq2seq-lm is refused)
    if own == _UNKNOWN_HEAD and task != "base":
        # BertForPreTraining given as an object: compiled as it is, its outputs its own, which
        # a label such as masked-lm would misname (and the runtime would read as that task's)
        raise UnsupportedModelError(
            f"task {task!r} does not match the model given, a {type(model).__name__}: kernl "
            f"has no task for its head ({name}), and compiles a model object of it as it is, "
            "under task 'base' (pass task='base' or none)"
        )
    if own not in (None, _UNKNOWN_HEAD) and own != task:
        raise UnsupportedModelError(
            f"task {task!r} does not match the model given, a {type(model).__name__} (task "
            f"{own!r}): pass task={own!r}, or the model class of the task you want"
        )


def package_of(obj: Any) -> str:
    """The top-level package of an object's class ("peft", "sentence_transformers")."""
    return type(obj).__module__.split(".")[0]


def refuse_wrapper(model: Any) -> None:
    """A sentence-transformers pipeline is a torch module with a `.config` (its transformer's),
    so it passed every early check and failed after the compile began ("forward takes no
    input_ids"): said first, with what to pass instead."""
    if package_of(model) == "sentence_transformers":
        raise UnsupportedModelError(
            f"{type(model).__name__} is a sentence-transformers pipeline (tokenizer, Hugging "
            "Face model, pooling); kernl compiles the Hugging Face model inside it: "
            "`kernl.optimize(st[0].auto_model)` (or kernl-compile on the folder holding its "
            "config.json), then pool its last_hidden_state as the pipeline's modules do"
        )
    peft_wrappers = ("PeftModel", "PeftMixedModel")
    if package_of(model) == "peft" and type(model).__name__ in peft_wrappers:
        # peft's task-less wrappers: their forward takes *args, which the compile cannot trace
        # by name (the task wrappers, PeftModelForSequenceClassification..., compile as they are)
        raise UnsupportedModelError(
            f"a peft {type(model).__name__} (no task_type): pass "
            "`peft_model.merge_and_unload()` (adapters folded into the weights: what a causal "
            "LM or encoder-decoder needs, and faster), or for an encoder the model it wraps, "
            "`peft_model.get_base_model()` (its adapters run as they are)"
        )


def task_from_source(model_or_path) -> str | None:
    """The task of a model or model folder from its config's `architectures`, without loading
    weights. A folder whose config cannot be read raises UnsupportedModelError saying why
    (before the buckets are read: an unknown model type was "unknown axis 'prompt' for an
    encoder")."""
    if isinstance(model_or_path, torch.nn.Module):
        config = getattr(model_or_path, "config", None)
        return task_of(config, model_or_path) if config is not None else None
    return task_of(read_config(model_or_path)[0])


def resolve_dtype_device(dtype: str, device: str | None) -> tuple[torch.dtype, torch.device]:
    """The compile options --dtype and --device, checked; the device defaults to cuda if
    there is a GPU."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of fp16, bf16, fp32; got {dtype!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU")
    return DTYPES[dtype], dev


def unwrap_compiled(model):
    """The module torch.compile wrapped (its OptimizedModule's forward takes *args, and kernl
    traces the model itself), or `model` as it is."""
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(inner, torch.nn.Module):
        return inner
    return model


def load_model(model_or_path, task: str | None, dtype: torch.dtype, device: torch.device):
    """Returns (model in eval mode on device and dtype, task, source description)."""
    import transformers

    if isinstance(model_or_path, torch.nn.Module):
        model = unwrap_compiled(model_or_path)
        source = type(model).__name__
        task = task or task_of(model.config, model)
        check_task(task, model)
    else:
        config, source = read_config(model_or_path)
        names = list(getattr(config, "architectures", None) or [])
        # "base" by default, where no name says a task or a bare model: no name, or a user's
        # own class (`MyClassifier(BertForSequenceClassification)` saves its own name), whose
        # head was dropped with only transformers' table of unexpected weights
        guessed = task is None and not any(
            name.endswith(("Model", *_ARCH_SUFFIX)) for name in names
        )
        task = task or task_of(config)
        check_task(task)
        model = load_from_folder(source, config, task, dtype, transformers, guessed)
    if task not in TASKS:
        raise UnsupportedModelError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    model = model.to(device=device, dtype=dtype).eval()
    return model, task, source


def read_config(model_or_path) -> tuple[object, str]:
    """(the model's transformers config, its source: a local folder as an absolute path, a
    model id as given), without loading weights; UnsupportedModelError saying why it cannot
    be read (a file, no config.json, a model type this transformers lacks, ...)."""
    import transformers

    source = str(model_or_path)
    local = Path(source).expanduser()
    if local.is_file():
        raise UnsupportedModelError(
            f"{local} is a file: MODEL is a Hugging Face model folder (the one holding "
            "config.json), a model id of the local cache, or a model object"
        )
    if not source.strip():
        raise UnsupportedModelError("the model path is empty")
    if local.exists() and not (local / "config.json").is_file():
        raise UnsupportedModelError(f"{local} has no config.json: not a Hugging Face model folder")
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise UnsupportedModelError(f"cannot find model {source!r}: no such folder")
    if local.is_dir():
        # A local folder is recorded (manifest model_source) as an absolute path, so that
        # `kernl bench` run from another directory reloads this model, not another ./name.
        # A hub-style id stays as given.
        source = os.path.abspath(local)
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    except ValueError as e:
        model_type = _unknown_model_type(local / "config.json" if local.is_dir() else None, e)
        if model_type is None:
            raise
        # transformers' own message advises installing it from git, over several paragraphs
        raise UnsupportedModelError(
            f"{source}: model type {model_type!r} is not known to the installed transformers "
            f"{transformers.__version__}, through which kernl loads models: use a "
            "transformers version that has it, or another checkpoint"
        ) from None
    except OSError as e:
        if local.is_dir():  # the folder has a config.json (checked above): it is unreadable
            raise UnsupportedModelError(
                f"cannot read {local / 'config.json'}: {e}{_json_error(local / 'config.json')}"
            ) from e
        raise UnsupportedModelError(
            f"cannot find model {source!r}: not a local folder with config.json, and not in "
            "the local Hugging Face cache. kernl never downloads: download the model on a "
            "machine with network access and give its folder"
        ) from None
    return config, source


def _unknown_model_type(path: Path | None, error: ValueError) -> str | None:
    """The config's model_type where transformers has no configuration class for it, else
    None (the ValueError is about something else). A model of the Hugging Face cache has no
    path here: its type is read from transformers' message."""
    import transformers

    model_type = None
    if path is not None:
        try:
            model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, OSError, AttributeError):
            return None
    else:
        found = re.search(r"model type `([^`]+)`", str(error))
        model_type = found and found.group(1)
    if not isinstance(model_type, str) or model_type in transformers.CONFIG_MAPPING:
        return None
    return model_type


def _not_json(source: str) -> str:
    """(the folder's .json files that are not JSON), or ''."""
    folder = Path(source)
    bad = (
        [p.name for p in sorted(folder.glob("*.json")) if _json_error(p)] if folder.is_dir() else []
    )
    return f" ({', '.join(bad)})" if bad else ""


def _json_error(path: Path) -> str:
    """Where `path` stops being JSON (transformers' message does not say), or ''."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f" ({e})"
    return ""


def load_from_folder(
    source: str,
    config,
    task: str,
    dtype: torch.dtype,
    transformers,
    guessed: bool = False,
    auto=None,
):
    """The model of `task` from a folder (or the local Hugging Face cache), with every weight
    from the checkpoint. A head the checkpoint lacks (BertModel's pooler in a question-answering
    checkpoint) would be initialised at random and its outputs served as if they meant
    something: refused, naming the weights. `guessed`: the task is "base" only because the
    config names no architecture; weights the encoder leaves unused are then a head that would
    be dropped in silence (an old classifier checkpoint): refused too, asking for --task."""
    from safetensors import SafetensorError

    # Whisper's: AutoModelForSpeechSeq2Seq; an encoder the config names as its own bare
    # class (T5EncoderModel): that class, where AutoModel built T5Model and found its
    # decoder's weights missing
    auto = auto or _bare_class(config, task, transformers) or getattr(transformers, TASKS[task])
    kw = dict(local_files_only=True, dtype=dtype, output_loading_info=True)
    try:
        model, info = _from_pretrained(auto, source, kw)
        if _only_the_pooler(model, task, info.get("missing_keys") or []):
            # A checkpoint saved without a pooler (BertModel(add_pooling_layer=False), a
            # token classifier or a RoBERTa classifier compiled as base): the encoder without
            # one, pooler_output None as that model gives, rather than a random pooler
            model, info = _from_pretrained(type(model), source, kw, add_pooling_layer=False)
    except json.JSONDecodeError as e:  # a ValueError too: a weights index that is not JSON
        raise UnsupportedModelError(
            f"cannot read the checkpoint of {source}: a JSON file of it is not JSON"
            f"{_not_json(source)}: {e}"
        ) from None
    except ValueError as e:  # no class of this head for this config
        raise UnsupportedModelError(f"{task}: {e}") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        # A truncated or damaged weights file, a checkpoint whose tensors do not fit the
        # config, an unreadable file: the user's model, not a bug of kernl.
        raise UnsupportedModelError(
            f"cannot read the checkpoint of {source}: {type(e).__name__}: {e}"
        ) from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "not named"
        raise UnsupportedModelError(
            f"{source}: {len(missing)} weights of {type(model).__name__} ({task}) are not in "
            f"the checkpoint (its architectures: {archs}): {first_few(missing)}. They would be random. "
            f"Compile the checkpoint's own head (--task; kernl compiles {', '.join(ALL_TASKS)}), "
            "or load the model yourself and pass it to kernl.compiler.compile or kernl.optimize"
        )
    unused = _head_keys(model, info.get("unexpected_keys") or [])
    if guessed and unused:
        archs = getattr(config, "architectures", None)
        named = (
            f"names no architecture kernl knows ({', '.join(archs)})"
            if archs
            else "names no architecture"
        )
        raise UnsupportedModelError(
            f"{source}: its config.json {named}, so kernl took the model as its "
            f"encoder alone (task 'base'), which leaves {len(unused)} weights of the checkpoint "
            f"unused: {first_few(unused)}. That is a head, which would be dropped. Give --task: the "
            f"checkpoint's head ({', '.join(t for t in ALL_TASKS if t != 'base')}), or base to "
            "compile the encoder alone"
        )
    return model


def _from_pretrained(cls, source: str, kw: dict, **model_kw):
    """`cls.from_pretrained` with SDPA attention, or the model's own where it has none."""
    try:
        return cls.from_pretrained(source, attn_implementation="sdpa", **kw, **model_kw)
    except ValueError as e:
        if "scaled_dot_product_attention" not in str(e) and "sdpa" not in str(e):
            raise
        # no SDPA path in this model class (MPNet, DeBERTa-v2): trace its own attention
        return cls.from_pretrained(source, attn_implementation="eager", **kw, **model_kw)


def _only_the_pooler(model: torch.nn.Module, task: str, missing: list[str]) -> bool:
    """Whether the checkpoint lacks the pooler of a bare encoder and nothing else, and the
    model class can be built without one."""
    if task != "base" or not missing or getattr(model, "pooler", None) is None:
        return False
    if "add_pooling_layer" not in inspect.signature(type(model).__init__).parameters:
        return False
    prefix = getattr(model, "base_model_prefix", "") or ""
    return all(k.removeprefix(f"{prefix}.").startswith("pooler.") for k in missing)


def _bare_class(config, task: str, transformers):
    """For task "base", the bare model class the config's architectures names, where
    transformers has it (`T5EncoderModel`, `BertModel`), else None (AutoModel's)."""
    if task != "base":
        return None
    for name in getattr(config, "architectures", None) or []:
        bare = name.endswith("Model") and not name.endswith(tuple(_ARCH_SUFFIX))
        if bare and "For" not in name and isinstance(getattr(transformers, name, None), type):
            return getattr(transformers, name)
    return None


def _head_keys(model: torch.nn.Module, unexpected: list[str]) -> list[str]:
    """The checkpoint's weights the loaded model leaves unused that lie outside its own
    modules: a head (`classifier.weight`, `cls.predictions.*`, `qa_outputs.*`), not a stale
    buffer of the model itself (an old GPT-2's `h.0.attn.masked_bias`)."""
    children = {name for name, _ in model.named_children()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    heads = []
    for key in unexpected:
        parts = key.split(".")
        if parts[0] == prefix and len(parts) > 1:
            parts = parts[1:]
        if parts[0] not in children:
            heads.append(key)
    return sorted(heads)


@dataclass
class ModelSignature:
    inputs: list[InputSpec]
    outputs: list[OutputSpec]
    # outputs that are neither tensors nor None, which the artifact leaves out (a decoder
    # BERT's `cache`, as use_cache is on): said at compile, never dropped in silence
    not_served: list[str] = field(default_factory=list)


def positional_order(model: torch.nn.Module, served: list[str]) -> list[str] | None:
    """The forward's positional parameters up to the last input the artifact serves: RoCBert
    takes (input_ids, input_shape_ids, input_pronunciation_ids, attention_mask, ...), LayoutLM
    (input_ids, bbox, ...), BERT the usual (input_ids, attention_mask, token_type_ids). The
    runtime reads a call's positional inputs in this order (its fixed one gave RoCBert's shape
    ids to the attention mask, silently). None where the forward's signature cannot be read
    or takes none of them positionally."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.kind in kinds]
    at = [names.index(n) for n in served if n in names]
    if not at:
        return None
    return names[: max(at) + 1]


def usual_order(order: list[str], served: list[str]) -> bool:
    """Whether `order` is Hugging Face's usual one for the inputs served."""
    return order == [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in served]


class FlatModel(torch.nn.Module):
    """Positional tensors in, a tuple of tensors out: what export and programs need."""

    def __init__(self, model: torch.nn.Module, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.output_names = output_names

    def forward(self, *args: torch.Tensor):
        out = self.model(**dict(zip(self.input_names, args)), return_dict=True)
        return tuple(out[name] for name in self.output_names)


def example_inputs(
    names: list[str], bucket: Bucket, vocab_size: int, device, generator=None, pad_rows=True
) -> list[torch.Tensor]:
    """Random ids and an attention mask with ragged lengths (row 0 full)."""
    b, s = bucket.batch, bucket.seq
    g = generator or torch.Generator().manual_seed(0)
    out = []
    for name in names:
        if name == "input_ids":
            out.append(torch.randint(1, max(2, vocab_size), (b, s), generator=g))
        elif name == "attention_mask":
            lengths = (
                torch.randint(1, s + 1, (b,), generator=g) if pad_rows else torch.full((b,), s)
            )
            lengths[0] = s
            out.append((torch.arange(s)[None, :] < lengths[:, None]).long())
        else:
            out.append(torch.zeros(b, s, dtype=torch.long))
    return [t.to(device) for t in out]


# How kernl calls an encoder and what it serves: said where a model (a user's wrapper) does not
# take the call or return a mapping
_SERVED_AS = (
    "{0}.forward does not take return_dict or return a mapping: kernl calls an encoder as "
    "model(input_ids=..., attention_mask=..., return_dict=True) and serves the tensors of the "
    "mapping it returns (a Hugging Face ModelOutput or a dict); a wrapper of yours must take "
    "return_dict (it may ignore it) and return a dict of tensors, e.g. "
    "{{'sentence_embedding': pooled}}"
)


def _fails_on_token_ids(model, bucket: Bucket, e: Exception) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{type(model).__name__} fails on [batch, seq] token ids ({bucket.batch}x"
        f"{bucket.seq}, one of two small shapes kernl runs it at to find its "
        f"outputs' axes): {type(e).__name__}: {e}. kernl compiles encoders called "
        f"as model(input_ids[, attention_mask, token_type_ids]) at any length "
        f"(a model that takes some lengths only is not supported); tasks: "
        f"{', '.join(ALL_TASKS)}"
    )


def model_signature(model: torch.nn.Module, device) -> ModelSignature:
    params = inspect.signature(model.forward).parameters
    names = [n for n in _INPUTS if n in params]
    if getattr(model.config, "type_vocab_size", None) is None and "token_type_ids" in names:
        # GPT-2 (and CTRL, XLNet) take token types without a table of their own: GPT-2 looks
        # them up in its word embeddings, so the zeros served by default added wte[0] to every
        # position, which eager called without token types never does; and no table bounds
        # them, so the artifact's reader refuses the input.
        names.remove("token_type_ids")
    if "input_ids" not in names:
        raise UnsupportedModelError(f"{type(model).__name__}.forward takes no input_ids")
    pad = getattr(model.config, "pad_token_id", None)
    pad = int(pad) if isinstance(pad, int) else 0
    inputs = [
        InputSpec(n, "int64", pad if n == "input_ids" else _INPUTS[n][1], _INPUTS[n][0])
        for n in names
    ]
    _refuse_block_sparse(model)
    _refuse_composed_encoder_decoder(model.config)
    vocab = getattr(model.config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise UnsupportedModelError(
            f"{type(model.config).__name__} has no vocab_size: kernl compiles encoders whose "
            "input_ids index a vocabulary (a model of characters or bytes, as CANINE, is not "
            "supported)"
        )
    # Find which output axes follow batch and sequence by probing two shapes. A feed-forward
    # in chunks (BERT's chunk_size_feed_forward) takes lengths that are multiples of the chunk.
    chunk = feed_forward_chunk(model.config)
    seq_a, seq_b = 7 * chunk, 5 * chunk
    probes = []
    state = model_state(model)
    with torch.no_grad():
        for bucket in (Bucket(2, seq_a), Bucket(3, seq_b)):
            args = example_inputs(names, bucket, vocab, device)
            try:
                out = model(**dict(zip(names, args)), return_dict=True)
            except TypeError as e:
                if "return_dict" not in str(e):
                    raise _fails_on_token_ids(model, bucket, e) from e
                # a user's wrapper (mean pooling): it is called as kernl says, but not with
                # the keyword the message did not name
                raise UnsupportedModelError(_SERVED_AS.format(type(model).__name__)) from e
            except Exception as e:  # e.g. a multiple-choice head, which wants 3-D ids
                raise _fails_on_token_ids(model, bucket, e) from e
            if not isinstance(out, Mapping):
                raise UnsupportedModelError(
                    _SERVED_AS.format(type(model).__name__)
                    + f" ({type(model).__name__} returned a {type(out).__name__})"
                )
            probes.append((bucket, {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}))
            refuse_a_model_that_changed_itself(
                model, state, f"when kernl ran it on a {bucket.batch}x{bucket.seq} input"
            )
    # Tuples of tensors (the config's output_hidden_states, output_attentions) are not served:
    # refused here, not dropped (a caller's out.hidden_states[-2] then met None)
    tuples = sorted(k for k, v in out.items() if isinstance(v, (tuple, list)))
    if tuples:
        raise UnsupportedModelError(
            f"the model returns {', '.join(tuples)} (a tuple per layer, from its config's "
            "output_hidden_states / output_attentions), which kernl does not serve: set them "
            "False on model.config (or in config.json) to compile its other outputs"
        )
    outputs = []
    for name, t in probes[0][1].items():
        other = probes[1][1][name]
        axes_b = [i for i in range(t.dim()) if t.shape[i] == 2 and other.shape[i] == 3]
        axes_s = [i for i in range(t.dim()) if t.shape[i] == seq_a and other.shape[i] == seq_b]
        if axes_b != [0] or len(axes_s) > 1:
            raise UnsupportedModelError(f"output {name!r} has no leading batch axis")
        dtype = str(t.dtype).removeprefix("torch.")
        outputs.append(OutputSpec(name, dtype, 0, axes_s[0] if axes_s else None))
    not_served = sorted(k for k, v in out.items() if v is not None and k not in probes[1][1])
    if "attention_mask" in names and _masks_its_own_padding(model, names, pad, vocab, device):
        # its forward derives a mask when given none (DPR: input_ids != pad_token_id), which a
        # default of ones would not: the caller gives it, or is told to
        inputs = [
            InputSpec(
                i.name,
                i.dtype,
                i.pad_value,
                "required" if i.name == "attention_mask" else i.default,
            )
            for i in inputs
        ]
    return ModelSignature(inputs, outputs, not_served)


def _masks_its_own_padding(
    model: torch.nn.Module, names: list[str], pad: int, vocab: int, device
) -> bool:
    """Whether the model called without an attention mask computes what it computes with the
    mask of its non-pad tokens rather than with a mask of ones. Measured on a row whose second
    half is pad tokens: which of the two the maskless call is nearer (in the compile's dtype,
    where the two masked calls differ by much more than rounding)."""
    seq = 8 * feed_forward_chunk(model.config)
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))
    ids[ids == pad] = (pad + 1) % vocab
    ids[1, seq // 2 :] = pad
    ids = ids.to(device)
    rest = {n: torch.zeros_like(ids) for n in names if n not in ("input_ids", "attention_mask")}
    calls = [None, torch.ones_like(ids), (ids != pad).long()]
    outs = []
    with torch.no_grad():
        for mask in calls:
            try:
                outs.append(model(input_ids=ids, attention_mask=mask, **rest, return_dict=True))
            except Exception:
                if mask is None:
                    return True  # it cannot run without one
                raise
    tensors = [[v[1].double() for v in o.values() if isinstance(v, torch.Tensor)] for o in outs]

    def distance(a, b) -> float:
        return max((x - y).abs().max().item() for x, y in zip(a, b))

    return distance(tensors[0], tensors[1]) > distance(tensors[0], tensors[2])


def feed_forward_chunk(config) -> int:
    """The length a call's sequence must be a multiple of: BERT's chunk_size_feed_forward
    runs the feed-forward in chunks of it (0: none, 1 here)."""
    chunk = getattr(config, "chunk_size_feed_forward", 0)
    return chunk if isinstance(chunk, int) and chunk > 0 else 1


def _refuse_block_sparse(model: torch.nn.Module) -> None:
    """BigBird's block-sparse attention: Hugging Face's model switches itself to full
    attention, for good, the first time it meets an input too short for its blocks (kernl's
    probes are such inputs), so what kernl traced and validated was full attention at every
    bucket, silently (1.5e-2 from a fresh model's block-sparse outputs)."""
    config = model.config
    if getattr(config, "attention_type", None) != "block_sparse":
        return
    blocks, size = getattr(config, "num_random_blocks", 3), getattr(config, "block_size", 64)
    raise UnsupportedModelError(
        f"{type(model).__name__} uses block-sparse attention, which kernl does not compile "
        "(and which the model itself switches to full attention, for good, on any input of up "
        f"to {(5 + 2 * blocks) * size} tokens). Set config.attention_type = 'original_full' "
        "(in config.json, or on model.config before loading) to compile it with full "
        "attention: Hugging Face's outputs for inputs up to that length"
    )


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """What a forward could switch in a model: which module object sits at each name, the
    public string and bool attributes of each (an attention_type, a flag), and its config's
    plain settings."""
    state: dict[str, Any] = {}
    for name, module in model.named_modules():
        state[name or "(the model)"] = (type(module).__name__, id(module))
        for key, value in vars(module).items():
            if type(value) in (str, bool) and not key.startswith("_") and key != "training":
                state[f"{name}.{key}" if name else key] = value
    config = getattr(model, "config", None)
    for key, value in vars(config).items() if config is not None else ():
        if key in _SETTLED_ON_FIRST_CALL:
            continue
        if type(value) in (str, bool, int, float) and not key.startswith("_"):
            state[f"config.{key}"] = repr(value) if type(value) is float else value  # NaN
    return state


# config settings a model's first forward settles once, without changing what it computes:
# transformers 5.0's ModernBERT sets reference_compile None -> False (whether it would
# torch.compile its own layers; kernl traces them either way), and was refused as changed
_SETTLED_ON_FIRST_CALL = frozenset({"reference_compile"})


def _change(key: str, before: Any, after: Any) -> str:
    if isinstance(before, tuple) and isinstance(after, tuple):
        if before[0] == after[0]:
            return f"{key}: replaced by another {after[0]}"
        return f"{key}: a {before[0]} became a {after[0]}"
    return f"{key}: {before!r} -> {after!r}"


def refuse_a_model_that_changed_itself(
    model: torch.nn.Module, before: dict[str, Any], when: str
) -> None:
    """kernl traces and validates the model as it is at each step; a model whose forward
    replaced its modules or switched its modes would be compiled as another function than
    the one given (and the object given is no longer the model it was)."""
    after = model_state(model)
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    if not changed:
        return
    shown = "; ".join(_change(k, before.get(k), after.get(k)) for k in changed[:3])
    more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
    raise UnsupportedModelError(
        f"{type(model).__name__} changed itself {when} ({shown}{more}): kernl compiles the "
        "model as one fixed function per bucket, and this one is not"
    )


@contextlib.contextmanager
def generated_source_forgotten() -> Iterator[None]:
    """torch.fx keeps the Python source of every graph module it generates (the exports, the
    passes' rewrites) in a module-level cache and in linecache, for tracebacks, and never
    drops it: ~1 MiB per compile of a 12-layer model, for good, in a process that compiles
    again and again (kernl.optimize in a notebook or a server). What this block added is
    dropped when it ends; the compiled code stays valid (only its source lines are gone)."""
    loader = getattr(torch.fx.graph_module, "_loader", None)
    cache = getattr(loader, "eval_cache", None)
    if not isinstance(cache, dict):  # another torch: nothing known to drop
        yield
        return
    before = set(cache)
    try:
        yield
    finally:
        for key in [k for k in list(cache) if k not in before]:
            cache.pop(key, None)
            linecache.cache.pop(key, None)


def export_bucket(flat: FlatModel, bucket: Bucket, vocab_size: int, device):
    args = tuple(example_inputs(flat.input_names, bucket, vocab_size, device))
    # On a data-dependent branch, export prints the partial graph to sys.stderr and a logger
    # warns: 100+ lines on the user's terminal before kernl's one-line refusal. What export
    # writes to sys.stderr is held back, and written out unless it was that graph.
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    held = io.StringIO()
    data_dependent = False
    try:
        with torch.no_grad(), contextlib.redirect_stderr(held):
            return torch.export.export(flat, args, strict=False)
    except RuntimeError as e:
        if type(e).__name__ != "GuardOnDataDependentSymNode":
            raise
        data_dependent = True
        raise UnsupportedModelError(_data_dependent_branch(flat.model, str(e))) from e
    finally:
        shapes_log.setLevel(level)
        if not data_dependent and held.getvalue() and sys.stderr is not None:
            sys.stderr.write(held.getvalue())


def _data_dependent_branch(model: torch.nn.Module, message: str) -> str:
    """What to tell the user when export met an `if` on a value the inputs compute."""
    calls = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s+(.+)', message)
    where = ""
    if calls:
        path, line, function, code = calls[-1]
        where = f" ({Path(path).name}:{line}, in {function}: `{code.strip()}`)"
    hint = ""
    if "dynamic" in where and "rope" in where.lower():
        hint = (
            " Dynamic RoPE recomputes its frequencies from each call's length: within the "
            "model's original context length it is the default RoPE, so a config.json whose "
            "rope type is 'default' gives the same outputs at every bucket up to that length."
        )
    return (
        f"{type(model).__name__} branches on a value computed from its inputs{where}; kernl "
        f"compiles one fixed program per bucket and cannot hold such a branch.{hint}"
    )
