"""`kernl.optimize(model, buckets=...)`: the notebook's one line on top of the artifact.

It is the same compile and the same artifact as `kernl-compile`, kept in a cache folder keyed
by everything the artifact depends on, so the second run of a notebook loads in seconds:

    key = sha256(weights digest, config (and the generation config of a generating task),
                 model class, task, buckets, dtype, compile options, GPU name + compute
                 capability (or "cpu"), kernl format/kernl/torch/triton/transformers versions)
    $KERNL_CACHE_DIR/models/<model_type>-<task>-<dtype>-<key[:32]>/   (default ~/.cache/kernl)

- Weights digest: sha256 of every parameter and buffer's bytes (name, dtype and shape
  included), one hash per distinct tensor on a thread pool (hashlib releases the GIL), GPU
  tensors copied to the host in 64 MiB chunks. sha256 rather than blake2b: OpenSSL's runs
  on the CPU's SHA instructions, twice blake2b's speed on the 2-core machine this was
  written on (512 MiB in 0.85 s vs 1.9 s, under load). A cheaper device-side checksum (a
  weighted sum) was rejected: a collision would silently serve another model's weights, and
  a cache hit reads and sha256-verifies the whole artifact anyway, which costs as much.
- Concurrency: one compile per key at a time (an flock on `<entry>.lock`; a second caller
  waits, then loads the first one's entry). Correctness does not rest on the lock: each
  compile writes into its own build folder beside the entry and moves the finished artifact
  in with one rename; a build folder is never loaded, and those of dead processes are removed
  (a pid is judged only within its host and PID namespace; any build untouched for a week goes
  too). A cache that cannot be written (a read-only mount) still serves its entries; a miss
  there is a CacheNotWritableError saying where to point KERNL_CACHE_DIR.
- A cache entry that fails verification at load (any ArtifactError but DeviceMemoryError, a
  device short of free memory now) is moved aside and recompiled.
- The original model is not modified: compile() casts/moves the model it is given in place
  (`model.to(...)`: new tensors for parameters and buffers) and switches it to eval mode.
  optimize keeps the model's own tensors and puts them back afterwards, with every module's
  `training` flag and the RNG state (with gradients on tensors to cast, it compiles a deep
  copy instead). A model already in the target dtype and device is not cast at all; one in
  another is cast during the compile (do not use it from another thread meanwhile). The
  returned model holds its own weights, read from the artifact: nothing is shared.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from kernl._version import __version__ as kernl_version
from kernl.artifacts import (
    FORMAT_VERSION,
    ArtifactDestinationError,
    ArtifactError,
    DeviceMemoryError,
    check_destination,
)
from kernl.artifacts.seq2seq import Seq2SeqBuckets
from kernl.artifacts.signing import trusted_keys_from_env
from kernl.artifacts.writer import (
    carry_kept_files,
    clean_stale,
    make_deletable,
    owner_is_gone,
    owner_tag,
    remove_left_over,
    signals_held,
    swap_into,
)
from kernl.runtime.generation.config_defaults import (
    HF_SAMPLING_DEFAULTS,
    LENGTH_KEYS,
    config_sampling,
    neutral,
    refuse_config_options_not_applied,
    with_config_length,
)
from kernl.runtime.generation.hf_options import (
    _HF_OPTIONS,
    IDS_CHANGING_OPTIONS,
    IGNORED_HF_OPTIONS,
)

from . import api
from .buckets import as_buckets, check_buckets_fit, position_limit
from .caller_model import modules_over_the_same_tensors, named_tensors, untouched
from .code_digest import code_digest, tensor_bytes_digest
from .tasks.causal_lm.buckets import as_generation_buckets
from .tasks.generation_config import beam_search_not_run
from .tasks.seq2seq import is_speech_model
from .tasks.seq2seq.buckets import as_seq2seq_buckets, check_positions, seq2seq_position_limit
from .trace import (
    DTYPES,
    GENERATION_TASKS,
    SEQ2SEQ_TASKS,
    check_task,
    refuse_wrapper,
    task_of,
    unwrap_compiled,
)
from .tune import (
    NoCacheFolderError,
    cache_root,
    cache_root_of,
)  # kernl's cache folder, one rule for both caches

# Default buckets when none are given (see default_buckets).
DEFAULT_BATCHES = (1, 8, 32)
DEFAULT_MAX_SEQ = 512  # longer defaults cost compile time and memory most notebooks never use
DEFAULT_MIN_SEQ = 16
DEFAULT_CACHE_LEN = 1024  # causal LMs: KV-cache length; prompts go up to half of it
# Encoder-decoders: every batch bucket holds static cross-attention keys/values for the longest
# source and a self-attention cache, so batch 32 would reserve memory few notebooks use.
DEFAULT_SEQ2SEQ_BATCHES = (1, 8)
# Text seq2seq: the most new tokens one call makes (Hugging Face's own default is 20; summaries
# and translations seldom pass 256). Whisper's cache is its max_target_positions instead.
DEFAULT_SEQ2SEQ_CACHE = 256


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_HASH_CHUNK = 64 << 20  # bytes of a GPU tensor copied to the host at a time
# torch.export is not thread-safe (two exports in one process at once fail with "Trying to pop
# empty mode stack" or fake tensors in the program), nor is a forward of the model during one:
# one compile, or one look at a model's outputs (_output_class), per process at a time; other
# threads' optimize and compile calls wait here (cache hits only for that look).
_COMPILE_LOCK = api.COMPILE_LOCK


# -- the returned model ------------------------------------------------------------------------


class OptimizedModel:
    """A loaded kernl artifact, called like the Hugging Face model it came from.

    Encoders: `model(**tokenizer_output)`, `model(ids)`, `model(ids, mask)` return the original
    model's output class (e.g. BaseModelOutputWithPoolingAndCrossAttentions) with the same
    field names; `return_dict=False` returns a tuple, as in Hugging Face. Causal LMs:
    `.generate(...)` and `.stream(...)` (kernl.runtime.generation.GenerativeModel); encoder-
    decoders likewise (Seq2SeqModel for T5/BART/mBART/Marian, SpeechSeq2SeqModel for Whisper).
    Their `generation_config` is a copy of the original's; an edit of it applies from the next
    generate/stream call as an argument of that call, or is refused there by name where the
    compiled artifact cannot follow it (_config_edits). Everything else (buckets, manifest,
    device) is the runtime model's (`.runtime`)."""

    def __init__(
        self,
        runtime: Any,
        *,
        artifact: Path,
        cache_hit: bool,
        buckets: str,
        config: Any,
        output_class: type | None,
        generation_config: Any = None,
        described: dict[str, Any] | None = None,
    ):
        self.runtime = runtime
        # what pipelines read of the model's class (_HF_DESCRIPTION): fill-mask's check of a
        # missing mask token, a pipeline's repr, were AttributeErrors naming kernl
        for name, value in (described or {}).items():
            setattr(self, name, value)
        self.artifact = artifact  # the cache entry it was loaded from
        self.cache_hit = cache_hit  # True: loaded from the cache, nothing was compiled
        self.buckets_spec = buckets
        self.config = config  # a copy of the original model's config
        self._output_class = output_class
        self._beams_said = False
        if generation_config is not None:
            # a copy of the original's, for code that reads it (HF's text-generation
            # pipeline) and code that edits it as HF's idioms do (Whisper's .language): the
            # artifact holds the config as compiled, so generate/stream compare the copy with
            # this snapshot at each call (_with_generation_config)
            self.generation_config = generation_config
            self._compiled_generation_config = copy.deepcopy(_settings(generation_config))
            # this model applies the live config (edits too), not the artifact's record of it
            runtime.generation_defaults = None

    def __call__(self, *args: Any, return_dict: bool | None = None, **inputs: Any) -> Any:
        if not callable(self.runtime):
            raise TypeError(
                "this kernl model generates text: call model.generate(...) or "
                "model.stream(...) (a forward call returning logits is not compiled for "
                "generation models)"
            )
        for flag in ("output_hidden_states", "output_attentions"):
            # the call's own False wins, as in HF (its True the runtime refuses by name)
            if inputs.get(flag) is None and getattr(self.config, flag, False):
                raise ValueError(
                    f"model.config.{flag} is True, set after kernl.optimize: the compiled "
                    "model returns its outputs without the per-layer tuple, which kernl does "
                    f"not serve; set it back to False (it was ignored)"
                )
        out = self.runtime(*args, **inputs)
        if self._output_class is not None:
            out = self._output_class(**out)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return out if return_dict else out.to_tuple()

    # What code written for a Hugging Face model also calls (pipelines: forward, to, eval,
    # dtype, can_generate): served where a compiled model can, refused clearly where not.
    training = False

    def forward(self, *args: Any, **inputs: Any) -> Any:
        return self(*args, **inputs)

    def eval(self) -> OptimizedModel:
        return self  # always: an artifact serves inference only

    def train(self, mode: bool = True) -> OptimizedModel:
        if mode:
            raise RuntimeError("a kernl model serves inference only: it cannot be trained")
        return self

    def to(self, *args: Any, **kwargs: Any) -> OptimizedModel:
        """Itself, where the device and dtype asked for are its own (as a pipeline asks);
        anything else needs another compile."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        own_device = torch.device(self.runtime.device)
        if device is not None and (device.type, device.index or 0) != (
            own_device.type,
            own_device.index or 0,
        ):
            raise ValueError(
                f"this kernl model was compiled for {own_device}: kernl.optimize(model, "
                f"device={str(device)!r}) compiles one for {device}"
            )
        if dtype is not None and dtype != self.dtype:
            raise ValueError(
                f"this kernl model was compiled in {self.dtype}: kernl.optimize(model, "
                f"dtype={dtype}) compiles one in {dtype}"
            )
        return self

    # torch.nn.Module's shorthands for to(): the same answers
    def cpu(self) -> OptimizedModel:
        return self.to("cpu")

    def cuda(self, device: int | str | torch.device | None = None) -> OptimizedModel:
        if isinstance(device, int):
            device = f"cuda:{device}"
        return self.to(device or "cuda")

    def float(self) -> OptimizedModel:
        return self.to(torch.float32)

    def half(self) -> OptimizedModel:
        return self.to(torch.float16)

    def bfloat16(self) -> OptimizedModel:
        return self.to(torch.bfloat16)

    def double(self) -> OptimizedModel:
        return self.to(torch.float64)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.runtime.manifest.dtype)

    @property
    def name_or_path(self) -> str:
        return getattr(self.config, "_name_or_path", "")

    def can_generate(self) -> bool:
        return hasattr(self.runtime, "generate")

    def __getattr__(self, name: str) -> Any:
        # generate, stream, buckets, manifest, device, ...: the runtime model's own.
        if name == "runtime":  # not set yet (a half-built object): no recursion
            raise AttributeError(name)
        try:
            attr = getattr(self.runtime, name)
        except AttributeError:
            raise AttributeError(
                f"'OptimizedModel' object has no attribute {name!r} (a kernl model is called "
                "like the original, or serves .generate / .stream; the original model stays "
                "yours to use for anything else)"
            ) from None
        if name in _GENERATING and "generation_config" in vars(self):
            return functools.partial(self._with_generation_config, attr)
        return attr

    def _with_generation_config(self, method: Callable, *args: Any, **kwargs: Any) -> Any:
        """`method` (generate, stream or open_batch) with what the generation config holds
        now: its edits since kernl.optimize (_config_edits), its sampling settings
        (config_sampling) and its length (with_config_length)."""
        config = self.generation_config
        compiled = self._compiled_generation_config
        beams = beam_search_not_run(compiled.get("num_beams"))  # an edit of it is refused
        if beams is not None and not self._beams_said:
            warnings.warn(beams, stacklevel=3)  # once a model: said, not refused
            self._beams_said = True
        skip = LENGTH_KEYS | HF_SAMPLING_DEFAULTS.keys()  # taken from the config at each call
        kwargs.update(_config_edits(method, compiled, config, args, kwargs, skip))
        refuse_config_options_not_applied(method, config, args, kwargs)
        speech = getattr(self.runtime.manifest, "task", None) == "speech-seq2seq"
        kwargs.update(config_sampling(method, config, args, kwargs, speech))
        return with_config_length(method, config, speech, *args, **kwargs)

    def __reduce__(self):
        raise TypeError(
            "a kernl model cannot be pickled or copied (it holds the loaded artifact's "
            "device buffers, and on a GPU its CUDA graphs): "
            "kernl.optimize(..., save_to=path) writes its artifact, kernl.runtime.load(path) "
            "loads it"
        )

    def __deepcopy__(self, memo: dict) -> OptimizedModel:
        self.__reduce__()  # raises

    def __repr__(self) -> str:
        where = "cache hit" if self.cache_hit else "compiled"
        return f"OptimizedModel({self.runtime!r}, {where}: {self.artifact})"


# The runtime's methods that take the generation config's settings (_with_generation_config).
_GENERATING = ("generate", "stream", "open_batch")


def _settings(config: Any) -> dict[str, Any]:
    """A generation config's settings: its public attributes, without the version stamp."""
    if not hasattr(config, "__dict__"):
        raise TypeError(
            f"model.generation_config must be a transformers GenerationConfig, got "
            f"{type(config).__name__}"
        )
    return {
        k: v
        for k, v in vars(config).items()
        if not k.startswith("_") and k != "transformers_version"
    }


def _as_lists(v: Any) -> Any:
    """Tuples as lists, nested too: [1, 2] set as (1, 2) is no edit."""
    if isinstance(v, (list, tuple)):
        return [_as_lists(x) for x in v]
    if isinstance(v, dict):
        return {k: _as_lists(x) for k, x in v.items()}
    return v


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(_as_lists(a) == _as_lists(b))
    except (RuntimeError, TypeError, ValueError):  # tensors or arrays of several values
        return a is b


def _config_edits(
    method: Callable,
    compiled: dict[str, Any],
    config: Any,
    args: tuple,
    kwargs: dict,
    taken_elsewhere: Any = frozenset(),
) -> dict[str, Any]:
    """The keyword arguments that apply the generation config's edits since kernl.optimize to
    one call of `method`, as Hugging Face's generate would apply them (the artifact holds the
    config as compiled, and an edit was silently ignored). An edited key that `method` takes
    as an argument is passed as one, unless the call passes it (the call wins, as in HF); a
    Hugging Face option kernl takes at its neutral value only (num_beams=1) changes nothing
    there. Any other edit (what the artifact compiled in: bad_words_ids, suppress_tokens,
    forced EOS, Whisper's language tables) raises a ValueError naming
    the keys. `taken_elsewhere`: keys the caller takes from the config at every call, edited
    or not (the length keys: with_config_length; the sampling keys: config_sampling)."""
    now = _settings(config)
    edited = [
        k for k in sorted(now.keys() | compiled.keys()) if not _same(now.get(k), compiled.get(k))
    ]
    if not edited:
        return {}
    signature = inspect.signature(method)
    taken = {
        name
        for name, p in signature.parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return {}  # the call itself is wrong: the method raises its own error
    given = set(bound) | set(kwargs)
    applied: dict[str, Any] = {}
    refused: list[str] = []
    for key in edited:
        if key in given:
            continue
        if key in taken_elsewhere:
            continue
        value = now.get(key)
        if key in taken:
            applied[key] = value
        elif key in IGNORED_HF_OPTIONS:
            continue  # changes nothing given input_ids and a KV cache, as in HF
        elif key in _HF_OPTIONS and (value is None or neutral(method, key, value)):
            continue  # None in a config is HF's default, their neutral value (a fresh config)
        elif key in IDS_CHANGING_OPTIONS and neutral(method, key, value):
            # the compile refused any other value: compiled and edited both change nothing
            continue
        else:
            refused.append(key)
    if refused:
        shown = ", ".join(f"{k}={now.get(k)!r}" for k in refused)
        raise ValueError(
            f"model.generation_config was edited after kernl.optimize ({shown}), and the "
            "compiled model cannot apply it: the artifact holds the generation config as "
            "compiled. Undo it, or set it on the original model's generation_config and run "
            "kernl.optimize again (a new cache entry; that compile applies it where the "
            "artifact can hold it, says it is not applied (num_beams), or refuses it)"
        )
    if applied.get("eos_token_id", 0) is None:
        applied["eos_token_id"] = []  # no EOS, as HF's None (Whisper's None differs: speech.py)
    if "pad_token_id" in applied and applied["pad_token_id"] is None:
        # HF's None pad is the first EOS id of the call
        eos = bound.get("eos_token_id", applied.get("eos_token_id", now.get("eos_token_id")))
        applied["pad_token_id"] = _first_id(eos)
    return applied


def _first_id(eos: Any) -> int | None:
    if isinstance(eos, int) and not isinstance(eos, bool):
        return eos
    if isinstance(eos, (list, tuple)) and eos and isinstance(eos[0], int):
        return eos[0]
    return None


# -- the one function --------------------------------------------------------------------------


def optimize(
    model: torch.nn.Module,
    buckets: Any = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    task: str | None = None,
    save_to: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | Callable[[str], None] = True,
    atol: float | None = None,
    rtol: float | None = None,
    kernels: bool = True,
    tune: bool = True,
) -> OptimizedModel:
    """Compile a Hugging Face model object (or load it from kernl's cache) and return it ready
    to serve, called like the original.

    buckets: as `kernl-compile --buckets` ("batch=1,8 seq=16:512"; causal LMs "batch=1,4
      prompt=16:1024 cache=2048"; encoder-decoders "batch=1,8 source=32:512 cache=128",
      Whisper "batch=1,8 cache=448"). Omitted: see `default_buckets` (the choice is printed).
    dtype: "fp32", "fp16" or "bf16" (or the torch dtype); default the model's own. device: default the device of
      the model's parameters. The compile works on new module objects over the model's
      tensors (kernl/compiler/caller_model.py): another dtype or device casts copies, never
      the caller's modules.
    task: as `kernl-compile --task`; default from the model's class.
    save_to: also copy the artifact to this folder, for `kernl.runtime.load` in production.
    cache_dir: default $KERNL_CACHE_DIR or ~/.cache/kernl: compiled models go in its `models/`
      folder, the tuner's timings in `tuning/`.
    progress: True prints progress (a tqdm bar when tqdm is installed, plain lines otherwise),
      False prints nothing, or a function taking each message.
    atol, rtol, kernels, tune: as in `kernl.compiler.compile`.

    A call outside the buckets raises the runtime's ValueError, which names the buckets."""
    with _progress_printer(progress) as say:
        return _optimize(
            model,
            buckets,
            dtype=dtype,
            device=device,
            task=task,
            save_to=save_to,
            cache_dir=cache_dir,
            say=say,
            atol=atol,
            rtol=rtol,
            kernels=kernels,
            tune=tune,
        )


def _optimize(
    model, buckets, *, dtype, device, task, save_to, cache_dir, say, atol, rtol, kernels, tune
) -> OptimizedModel:
    import kernl.runtime

    if unwrap_compiled(model) is not model:
        say("torch.compile's wrapper given: kernl compiles the model it wraps")
        model = unwrap_compiled(model)
    if isinstance(buckets, Iterator):  # read twice (the cache key, then the compile)
        buckets = list(buckets)
    refuse_wrapper(model)
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None:
        raise TypeError(
            f"kernl.optimize takes a Hugging Face model object (a PreTrainedModel with a "
            f".config), not {type(model).__name__}; for a model folder use kernl-compile"
        )
    if task is None:
        task = task_of(config, model)
        if task == "seq2seq-lm" and is_speech_model(model):
            task = "speech-seq2seq"  # WhisperForConditionalGeneration, as compile() infers it
    check_task(task, model)
    if trusted_keys_from_env():
        # load() would refuse every cache entry (they are not signed) and each call would
        # compile again, after the whole compile
        raise RuntimeError(
            "KERNL_TRUSTED_KEYS is set, so kernl.runtime.load accepts only artifacts signed by "
            "those keys, and kernl.optimize's cache entries are not signed: unset it for "
            "kernl.optimize, or compile with kernl-compile --sign and serve with "
            "kernl.runtime.load"
        )
    model_dtype, model_device = _dtype_device_of(model)
    if dtype is None and model_dtype not in _DTYPE_NAMES:  # a dtype given casts it anyway
        raise ValueError(
            f"the model's weights are {model_dtype}; kernl compiles fp32, fp16 or bf16 "
            "(pass dtype=)"
        )
    dtype = _dtype_name(dtype) if dtype is not None else _DTYPE_NAMES[model_dtype]
    target = torch.device(device) if device is not None else model_device
    if target.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {str(target)!r}")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={str(target)!r} was asked for but torch sees no CUDA GPU")
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    # "" is unset, as for KERNL_CACHE_DIR (not the working directory); a relative folder
    # is taken absolute, so model.artifact still names it after a chdir
    given = cache_dir is not None and str(cache_dir) != ""
    try:
        root = (Path(cache_dir).expanduser() if given else cache_root()).absolute()
    except NoCacheFolderError as e:  # as an unwritable cache folder is said
        raise CacheNotWritableError(str(e)) from None
    if save_to is not None:
        check_destination(save_to)  # before the compile, not after it
        _check_apart_from_cache(Path(save_to).expanduser(), root)
    if buckets is None:
        buckets = default_buckets(config, task)
        say(f"buckets not given; chose {buckets!r} from the config (pass buckets= to change)")
    canonical = _canonical_buckets(buckets, task, config)

    say("hashing the weights")
    t0 = time.perf_counter()
    digest = weights_digest(model)
    say(f"weights hashed in {time.perf_counter() - t0:.1f}s")
    key = cache_key(
        weights=digest,
        code=code_digest(model),
        config=config,
        model_class=type(model).__name__,
        task=task,
        buckets=canonical,
        dtype=dtype,
        device=target,
        options={"atol": atol, "rtol": rtol, "kernels": kernels, "tune": tune},
        generation_config=(
            getattr(model, "generation_config", None) if task in GENERATION_TASKS else None
        ),
    )
    models = root / "models"
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        # ENOENT: a parent that refuses new folders (under /proc, a detached mount)
        # EEXIST: a file where the folder should be
        refused = (
            errno.EACCES,
            errno.EPERM,
            errno.EROFS,
            errno.ENOTDIR,
            errno.ENOENT,
            errno.EEXIST,
        )
        if e.errno not in refused:
            raise
        raise CacheNotWritableError(
            f"the cache folder {models} cannot be created ({e.strerror}): point "
            "KERNL_CACHE_DIR (or cache_dir=) at a writable folder"
        ) from e
    entry = models / f"{getattr(config, 'model_type', 'model')}-{task}-{dtype}-{key[:32]}"
    output_class = _output_class(model, target) if task not in GENERATION_TASKS else None

    cache_hit = True
    with _entry_lock(entry, say) as writable:
        if writable:
            _remove_dead_builds(models)
        if writable and entry.is_symlink() and not entry.exists():
            _remove(entry)  # a dangling link: the rename of a new entry failed on it for good
        runtime = _load_entry(entry, target, say, writable) if entry.exists() else None
        if runtime is None:
            if not writable:
                raise CacheNotWritableError(
                    f"{type(model).__name__} ({task}, {dtype} on {target}) is not in the "
                    f"cache and the cache folder {models} cannot be written: point "
                    "KERNL_CACHE_DIR (or cache_dir=) at a writable folder, or compile it into "
                    "this cache where it can be written"
                )
            cache_hit = False
            say(
                f"compiling {type(model).__name__} ({task}, {dtype} on {target}) into the "
                f"cache: {entry}"
            )
            with cache_root_of(root):  # the tuner's cache goes under cache_dir= too
                _compile_entry(
                    model,
                    buckets,
                    entry,
                    dtype=dtype,
                    device=target,
                    task=task,
                    say=say,
                    compile_options=dict(atol=atol, rtol=rtol, kernels=kernels, tune=tune),
                )
            runtime = kernl.runtime.load(entry, device=target)
    if save_to is not None:
        copy_artifact(entry, save_to)
        say(f"saved the artifact to {save_to} (kernl.runtime.load({str(save_to)!r}))")
    return OptimizedModel(
        runtime,
        artifact=entry,
        cache_hit=cache_hit,
        buckets=buckets,
        config=copy.deepcopy(config),
        output_class=output_class,
        generation_config=(
            copy.deepcopy(getattr(model, "generation_config", None))
            if task in GENERATION_TASKS
            else None
        ),
        described=_described(model),
    )


# Plain descriptions of a Hugging Face model (its class attributes) that pipelines read
_HF_DESCRIPTION = ("base_model_prefix", "main_input_name", "input_modalities", "output_modalities")


def _described(model: Any) -> dict[str, Any]:
    """The original model's _HF_DESCRIPTION attributes that hold strings (or tuples of them)."""
    found = {}
    for name in _HF_DESCRIPTION:
        value = getattr(model, name, None)
        strings = value if isinstance(value, (tuple, list)) else (value,)
        if value is not None and all(isinstance(v, str) for v in strings):
            found[name] = value
    return found


# -- defaults ----------------------------------------------------------------------------------


def default_buckets(config: Any, task: str) -> str:
    """Buckets for a model whose caller gave none.

    Encoders: batch 1, 8, 32 and sequence lengths 16, 32, 64, ... up to the model's position
    table, at most 512 (`position_limit`; models without a position table: 512).
    Causal LMs: batch 1, prompts 16, 32, ... up to half the KV cache, and a KV cache of 1024
    tokens or the model's max_position_embeddings (n_positions for GPT-2) if smaller.
    Text encoder-decoders (T5, BART, mBART, Marian): batch 1, 8, sources 16, 32, ... up to 512
    and a cache of 256 new tokens, both at most the model's learned positions
    (max_position_embeddings; T5's relative positions have no limit).
    Whisper: batch 1, 8 and a cache of max_target_positions (448): the prompt and every token
    its generate makes by default (the source is fixed, one 30 s window)."""
    batches = ",".join(map(str, DEFAULT_SEQ2SEQ_BATCHES))
    if task == "speech-seq2seq":
        return f"batch={batches} cache={seq2seq_position_limit(config, True)}"
    if task == "seq2seq-lm":
        limit = seq2seq_position_limit(config, False)
        longest = min(limit, DEFAULT_MAX_SEQ) if limit is not None else DEFAULT_MAX_SEQ
        cache = min(limit, DEFAULT_SEQ2SEQ_CACHE) if limit is not None else DEFAULT_SEQ2SEQ_CACHE
        return f"batch={batches} source={_range_to(longest)} cache={cache}"
    if task == "causal-lm":
        limit = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        cache = min(DEFAULT_CACHE_LEN, limit) if isinstance(limit, int) else DEFAULT_CACHE_LEN
        prompt = max(1, cache // 2)
        return f"batch=1 prompt={_range_to(prompt)} cache={cache}"
    limit = position_limit(config)
    longest = min(limit, DEFAULT_MAX_SEQ) if limit is not None else DEFAULT_MAX_SEQ
    return f"batch={','.join(map(str, DEFAULT_BATCHES))} seq={_range_to(longest)}"


def _range_to(longest: int) -> str:
    """Lengths 16, 32, ... up to `longest` in the bucket syntax (just `longest` below 16)."""
    return f"{DEFAULT_MIN_SEQ}:{longest}" if longest > DEFAULT_MIN_SEQ else str(longest)


def _canonical_buckets(buckets: Any, task: str, config: Any) -> Any:
    """The buckets as plain data, so that two spellings of the same set share a cache entry.
    Parses (and refuses) them before any hashing or compiling."""
    if task == "causal-lm":
        return as_generation_buckets(buckets).to_dict()
    if task in SEQ2SEQ_TASKS:
        return _canonical_seq2seq_buckets(buckets, task, config)
    bucket_list = as_buckets(buckets)
    check_buckets_fit(bucket_list, config)
    return [[b.batch, b.seq] for b in bucket_list]


def _canonical_seq2seq_buckets(buckets: Any, task: str, config: Any) -> dict[str, list[int]]:
    """Parsed with the task's own parser (its errors name the task's axes), then checked against
    the position tables here, before hashing: compile would refuse them only after loading."""
    speech = task == "speech-seq2seq"
    source_positions = int(config.max_source_positions) if speech else None
    parsed = as_seq2seq_buckets(buckets, source_positions).to_dict()
    if speech:  # compile fixes Whisper's source to one window whatever a dict says
        parsed["sources"] = [source_positions]
    check_positions(Seq2SeqBuckets.from_dict(parsed), buckets, config, speech)
    return parsed


def _dtype_name(dtype: str | torch.dtype) -> str:
    """The name ("fp32", "fp16" or "bf16") of any spelling compile() takes, or of a torch
    dtype: one cache key per precision."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    if isinstance(dtype, str) and dtype in DTYPES:
        return _DTYPE_NAMES[DTYPES[dtype]]
    raise ValueError(f"dtype must be fp32, fp16 or bf16 (or that torch dtype), got {dtype!r}")


def _dtype_device_of(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype holding most of the model's floating-point weights, and their one device."""
    by_dtype: dict[torch.dtype, int] = {}
    devices = set()
    for t in named_tensors(model).values():
        devices.add(t.device)
        if t.dtype.is_floating_point:
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel()
    if len(devices) > 1:
        raise ValueError(
            f"the model's weights are spread over {sorted(map(str, devices))}; kernl compiles "
            "a model on one device (move it there first, or pass device=)"
        )
    if devices and next(iter(devices)).type == "meta":
        raise ValueError("the model's weights are on the meta device (not loaded)")
    dtype = max(by_dtype, key=by_dtype.get) if by_dtype else torch.float32
    return dtype, next(iter(devices)) if devices else torch.device("cpu")


# -- the cache key -----------------------------------------------------------------------------


def _tensor_bytes_digest(t: torch.Tensor) -> bytes:
    # the code digest hashes the tensors a forward reads besides weights the same way
    return tensor_bytes_digest(t, _HASH_CHUNK)


def weights_digest(model: torch.nn.Module, threads: int | None = None) -> str:
    """sha256 over every parameter and buffer: name, dtype, shape and bytes. Each distinct
    tensor is hashed once (tied weights share a digest), on `threads` threads (default: up
    to 8); hashlib releases the GIL while hashing, so they run in parallel."""
    tensors = named_tensors(model)
    unique: dict[tuple, torch.Tensor] = {}
    ident = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        k = (str(t.device), ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        ident[name] = k
        unique.setdefault(k, t)
    workers = threads or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = dict(zip(unique, pool.map(_tensor_bytes_digest, unique.values())))
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(digests[ident[name]])
    return h.hexdigest()


def cache_key(
    *,
    weights: str,
    config: Any,
    code: str = "",
    model_class: str,
    task: str,
    buckets: Any,
    dtype: str,
    device: torch.device,
    options: dict[str, Any],
    generation_config: Any = None,
) -> str:
    """sha256 (hex) of everything a compiled artifact depends on: weights, config, the
    model's code and non-tensor state (`code`, code_digest.py), buckets, dtype, task, target
    GPU, versions and kernl's own source (kernl_source_digest); for generation,
    the generation config too (its EOS, pad, forced and suppressed ids go into the artifact:
    a notebook that switches mBART's target language must not get the last one's entry)."""
    import transformers
    import triton

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        target = f"cuda|{torch.cuda.get_device_name(device)}|{major}.{minor}|{torch.version.cuda}"
    else:
        target = device.type
    config_dict = json.loads(config.to_json_string(use_diff=False))
    config_dict.pop("_name_or_path", None)  # where it was loaded from changes nothing compiled
    # not in the JSON, yet it picks the attention code traced: an eager BERT's fully masked
    # row averages its keys, an SDPA BERT's is zeros (an SDPA entry served an eager model)
    config_dict["_attn_implementation"] = getattr(config, "_attn_implementation", None)
    if generation_config is not None:
        config_dict["generation_config"] = json.loads(
            generation_config.to_json_string(use_diff=False)
        )
    parts = {
        "weights": weights,
        "code": code,
        "config": config_dict,
        "model_class": model_class,
        "task": task,
        "buckets": buckets,
        "dtype": dtype,
        "target": target,
        "options": options,
        "versions": {
            "format": FORMAT_VERSION,
            "kernl": kernl_version,
            "kernl_source": kernl_source_digest(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "transformers": transformers.__version__,
        },
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@functools.cache
def kernl_source_digest() -> str:
    """sha256 (hex) of the kernl package's Python files (their paths and bytes, ~10 ms once a
    process). kernl's version string does not change with each fix, so an entry compiled by an
    older kernl was a cache hit after an upgrade: a RoCBert entry from before its positional
    order was recorded kept serving its mask as shape ids (review 2026-12-07)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError:  # gone since the walk (an upgrade in progress): its name still counts
            digest.update(b"\0unreadable")
    return digest.hexdigest()


# -- compiling without touching the caller's model ---------------------------------------------


def _compile_entry(
    model: torch.nn.Module,
    buckets: Any,
    entry: Path,
    *,
    dtype: str,
    device: torch.device,
    task: str,
    say: Callable[[str], None],
    compile_options: dict[str, Any],
) -> None:
    """Compile into a build folder of our own beside `entry`, then move the artifact in with
    one rename: a reader never sees a half-written entry, and of two processes compiling the
    same key (without the lock: another machine on a shared disk) one rename wins and the
    other's result is dropped."""
    try:
        build = Path(tempfile.mkdtemp(prefix=f".build-{owner_tag()}-", dir=entry.parent))
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise CacheNotWritableError(
            f"the cache folder {entry.parent} cannot be written ({e.strerror}), so "
            f"{entry.name} cannot be compiled there: point KERNL_CACHE_DIR (or cache_dir=) at "
            "a writable folder"
        ) from e
    try:
        # compile() works on new module objects over the model's tensors (caller_model.py):
        # given the caller's, another thread still serving the model eagerly got fp16
        # outputs, or torch errors from the export's hooks on its modules (2026-12-05)
        with _COMPILE_LOCK, _out_of_space_named(entry):
            api.compile(
                model,
                buckets,
                build / "artifact",
                dtype=dtype,
                device=str(device),
                task=task,
                progress=say,
                **compile_options,
            )
        _install(build / "artifact", entry)
    finally:
        _remove(build)


@contextlib.contextmanager
def _out_of_space_named(entry: Path) -> Iterator[None]:
    """A full disk (or quota) under the cache, said as the cache's: the writer's own message
    named the build folder's hidden paths, which the user never chose, and not the setting
    that moves the cache."""
    try:
        yield
    except ArtifactDestinationError as e:
        cause = e.__cause__
        full = isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
        if not (full or str(e).startswith("not enough free space")):
            raise
        if not full:  # the writer's check up front: "...: the artifact needs about N MiB, ..."
            why = str(e).partition(": ")[2]
        else:
            why = "the file system is full" if cause.errno == errno.ENOSPC else "quota used up"
        raise ArtifactDestinationError(
            f"the kernl cache {entry.parent} has no room for this model's artifact ({why}): "
            "free space there, or point KERNL_CACHE_DIR (or cache_dir=) at a disk with room. "
            "The cache is as it was."
        ) from e


def _install(built: Path, entry: Path) -> bool:
    """Move a finished artifact into place. False when another compile got there first (its
    entry is kept; ours is dropped by the caller)."""
    try:
        os.rename(built, entry)
    except OSError:
        if entry.exists():
            return False
        raise
    _fsync_dir(entry.parent)
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CacheNotWritableError(PermissionError):
    """The cache folder cannot be written (a read-only mount, another user's folder) and the
    entry asked for is missing or damaged there."""


def _load_entry(
    entry: Path, device: torch.device, say: Callable[[str], None], writable: bool = True
) -> Any | None:
    """The cached artifact loaded (and sha256-verified) on `device`, or None when it fails
    verification: it is then moved aside (and deleted) so a fresh compile can take its place.
    In a cache that cannot be written the failure is raised instead: nothing can replace it."""
    import kernl.runtime

    try:
        runtime = kernl.runtime.load(entry, device=device)
    except DeviceMemoryError:
        raise  # the entry is sound, the device short of room now: kept for the next call
    except ArtifactError as e:
        if not writable:
            raise CacheNotWritableError(
                f"cache entry {entry} failed verification ({type(e).__name__}: {e}) and the "
                f"cache folder {entry.parent} cannot be written, so it cannot be recompiled "
                "there: point KERNL_CACHE_DIR (or cache_dir=) at a writable folder"
            ) from e
        say(f"cache entry {entry} failed verification ({type(e).__name__}: {e}); recompiling")
        aside = entry.with_name(f".corrupt-{owner_tag()}-{entry.name}")
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.rename(entry, aside)
        _remove(aside)
        return None
    say(f"cache hit: loaded {entry} (no compile)")
    return runtime


def _remove(path: Path) -> None:
    """A folder with what it holds, or a file (a damaged entry can be either); never raises."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _remove_dead_builds(models: Path, now: float | None = None) -> None:
    """Build and corrupt folders left by processes that died (`owner_is_gone`: those of this
    host and PID namespace whose process is gone, and any untouched for a week)."""
    now = time.time() if now is None else now
    for p in models.iterdir():
        m = re.match(r"^\.(?:build|corrupt)-(.+?@\d+)-", p.name)
        if m and owner_is_gone(p, m.group(1), now):
            _remove(p)


@contextlib.contextmanager
def _entry_lock(entry: Path, say: Callable[[str], None]) -> Iterator[bool]:
    """One compile per cache entry at a time across processes and threads (flock on a file
    opened per call). Where flock is missing (Windows) nothing is locked: the atomic rename
    still keeps the cache consistent, at the cost of duplicate compiles. Yields whether the
    cache folder can be written: a read-only one (a mount baked into an image) still serves
    its entries, which need no lock to read (each was installed by one rename)."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    try:
        f = _open_lock(entry.with_name(entry.name + ".lock"))
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        yield False
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another compile of the same model ({entry.name}){_holder(f)}")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without flock (NFS without its lock daemon)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            yield _writable(entry.parent)  # unlocked, as on Windows: the rename still holds
            return
        with contextlib.suppress(OSError):  # who holds it, for the next waiter's message
            f.truncate(0)
            f.write(f"{owner_tag()} {time.time():.0f}\n".encode())
            f.flush()
        try:
            # a lock file left writable in a folder that is not (chmod 555 after a compile):
            # the build folder and the renames need the folder itself
            yield _writable(entry.parent)
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _holder(f) -> str:
    """ ", held by host~ns@pid since HH:MM:SS" from the lock file (its holder writes it once
    locked; an older kernl's lock file is empty: "")."""
    try:
        f.seek(0)
        tag, _, since = f.read(512).decode("utf-8", "replace").strip().partition(" ")
        when = time.strftime("%H:%M:%S", time.localtime(float(since)))
    except (OSError, ValueError, OverflowError):
        return ""
    return f", held by process {tag} since {when}" if tag else ""


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _open_lock(path: Path):
    return open(path, "a+b")


def _check_apart_from_cache(save_to: Path, root: Path) -> None:
    """Refuse a save_to= that is the cache folder or holds it, before the compile: a new
    folder passes check_destination, then the compile fills it with the cache, and the copy
    would have to replace the cache (check_destination refuses that, after the compile)."""
    dest, cache = save_to.resolve(), root.resolve()
    if dest == cache or dest in cache.parents:
        raise ValueError(
            f"save_to={str(save_to)!r} is the cache folder {str(root)!r} or holds it: the "
            "artifact is copied out of the cache, so give save_to= a folder of its own"
        )


def copy_artifact(source: Path, destination: str | os.PathLike) -> Path:
    """Copy an artifact folder to `destination` atomically (a temporary copy beside it, then
    renames). Refuses a destination that exists and is not a kernl artifact, as compile does,
    or one this user could not replace (writer.check_replaceable)."""
    dest = check_destination(destination, keep_parent=True)
    clean_stale(dest)  # copies (and compiles) to it that were killed, GBs each
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.copy-{owner_tag()}-", dir=dest.parent))
    try:
        shutil.copytree(source, tmp / "artifact")
        if dest.exists():
            _swap_in(tmp, dest)
        else:
            try:
                with signals_held():
                    os.rename(tmp / "artifact", dest)
            except OSError as e:
                # another process put its artifact there since the check: replaced, as any
                # previous one is (the writer's commit does the same)
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not dest.exists():
                    raise
                _swap_in(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        # tmp holds the previous artifact after a swap: a copy this user cannot delete is
        # named in a warning rather than left hidden
        remove_left_over(
            tmp,
            f"the temporary folder of the copy to {dest} (after a swap, the artifact it replaced)",
        )
    return dest


def _swap_in(tmp: Path, dest: Path) -> None:
    """Swap tmp/artifact with the artifact at `dest` (the previous one ends in tmp)."""
    carry_kept_files(dest, tmp / "artifact")  # a tokenizer.json put beside it stays
    # moved into tmp, another folder: that rewrites its `..`, which takes write permission on
    # it (the user's own write-protected artifact is theirs to replace)
    make_deletable(dest, top_only=True)
    with signals_held():  # whole or not done: Ctrl-C waits for it
        swap_into(tmp / "artifact", dest, tmp / "previous")  # the replaced one ends in tmp


# -- the output class --------------------------------------------------------------------------


def _output_class(model: torch.nn.Module, device: torch.device) -> type | None:
    """The Hugging Face output class of `model`, from one forward pass on two tokens (no
    weights are changed; training flags and the RNG state are put back). The pass runs on
    new module objects over the same tensors where they can be made: a forward that changes
    its model (BigBird switches to full attention for good on a short input) then changes
    the copy, not the caller's model, even when the compile refuses it."""
    from transformers.utils import ModelOutput as HFModelOutput

    from .trace import feed_forward_chunk

    # two tokens, or a multiple of a chunked feed-forward's chunk (BERT's
    # chunk_size_feed_forward=4 failed on two: the runtime's dict came back, not the class)
    length = 2 * feed_forward_chunk(getattr(model, "config", None))
    ids = torch.ones(
        1, length, dtype=torch.long, device=next(iter(named_tensors(model).values())).device
    )
    try:
        # under the compile lock: another thread's torch.export of this model tracks the
        # modules its forward enters, and this forward's would land in its stack ("Unexpected
        # key _export_root...", seen once in CI, 2026-12-04)
        with _COMPILE_LOCK, untouched(model, device), torch.no_grad():
            subject = modules_over_the_same_tensors(model) or model
            subject.eval()
            out = subject(input_ids=ids, return_dict=True)
    except Exception:  # the runtime's own ModelOutput (a dict with attributes) then
        return None
    return type(out) if isinstance(out, HFModelOutput) else None


# -- progress ----------------------------------------------------------------------------------


class _Printer:
    """Compile progress for a notebook or a terminal: a tqdm bar over the buckets when tqdm is
    installed (tqdm.auto: a widget in Jupyter), one timestamped line per message otherwise."""

    _STEP = re.compile(r"^\[(\d+)/(\d+)\]")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.bar = None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._tqdm = None
        else:
            self._tqdm = tqdm

    def __call__(self, msg: str) -> None:
        step = self._STEP.match(msg)
        if step is not None and self._tqdm is not None:
            done, total = int(step.group(1)) - 1, int(step.group(2))
            if self.bar is None:
                self.bar = self._tqdm(total=total, desc="kernl", unit="bucket", file=sys.stderr)
            self.bar.n = done + 1 if ": done in" in msg else done
            self.bar.set_postfix_str(msg[step.end() :].strip(), refresh=True)
            return
        line = f"[{time.perf_counter() - self.start:6.1f}s] kernl: {msg}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _progress_printer(progress: bool | Callable[[str], None]) -> Iterator[Callable[[str], None]]:
    if callable(progress):
        yield progress
        return
    if not progress:
        yield lambda _msg: None
        return
    printer = _Printer()
    try:
        yield printer
    finally:
        printer.close()
