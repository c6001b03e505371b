"""`kernl.compiler.compile`: model in, artifact out. The task picks the room that compiles
it (kernl/compiler/tasks/: encoder, causal_lm); signing wraps any of them."""

from __future__ import annotations

import os
import threading

import torch

from .caller_model import left_as_it_was
from .report import BucketReport, CompileReport, Progress
from .trace import (
    generated_source_forgotten,
    refuse_wrapper,
    resolve_dtype_device,
    task_from_source,
    unwrap_compiled,
)

__all__ = ["BucketReport", "CompileReport", "OptionNotApplicableError", "Progress", "compile"]


class OptionNotApplicableError(ValueError):
    """An option the compile of this task has no use for, given explicitly (`option`: its
    keyword name) and refused rather than ignored."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


# torch.export is not thread-safe: compiles on two threads at once both failed ("ProxyTorchDispatch
# Mode slot already occupied") and could leave sys.stderr on one's held-back buffer. One compile
# per process at a time; kernl.optimize holds the same lock around its look at the model.
COMPILE_LOCK = threading.RLock()


@generated_source_forgotten()
def compile(
    model_or_path,
    buckets,
    out: str | os.PathLike,
    *,
    dtype: str = "fp16",
    device: str | None = None,
    task: str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    progress: Progress | None = None,
    kernels: bool = True,
    tune: bool = True,
    sign_key: str | os.PathLike | None = None,
) -> CompileReport:
    """Compile a Hugging Face model (a local folder, a model id in the local HF cache, or a
    PreTrainedModel) for `buckets` (e.g. "batch=1,8 seq=16:512") into the artifact folder
    `out`. Returns a report; raises with a message naming the bucket or op on failure.
    kernels=False keeps plain aten ops (no rewrite, no tuning, no binaries).

    Without `task`, the task follows the config's `architectures` (…ForCausalLM and
    …LMHeadModel: causal-lm; WhisperForConditionalGeneration: speech-seq2seq; other
    …ForConditionalGeneration: seq2seq-lm). Refused before any
    work: bf16 through kernl's kernels on the CPU, buckets longer than the model's position
    table, and atol/rtol for seq2seq-lm and speech-seq2seq (their validation compares greedy
    ids); there tune=False keeps the plain torch decode step, as kernels=False does.

    A model object is left as it was: the compile casts, moves and traces new module objects
    over its tensors (kernl/compiler/caller_model.py), and puts back its training flags and
    the RNG state. Compiles on several threads run one after the other (torch.export is not
    thread-safe)."""
    # a model object's (torch.compile's wrapper looked through): before its buckets meet a
    # guessed task
    refuse_wrapper(unwrap_compiled(model_or_path))
    options = dict(
        dtype=dtype,
        device=device,
        task=task,
        atol=atol,
        rtol=rtol,
        progress=progress,
        kernels=kernels,
        tune=tune,
        sign_key=sign_key,
    )
    with COMPILE_LOCK:
        return _compile_one(model_or_path, buckets, out, options)


def _compile_one(model_or_path, buckets, out, options: dict) -> CompileReport:
    dtype, device, task, progress = (options[k] for k in ("dtype", "device", "task", "progress"))
    if not isinstance(model_or_path, torch.nn.Module):
        return _compile_signed(model_or_path, buckets, out, **options)
    torch_dtype, dev = resolve_dtype_device(dtype, device)
    say = progress or (lambda _msg: None)
    model = unwrap_compiled(model_or_path)
    generating = task or task_from_source(model)
    if generating in ("causal-lm", "seq2seq-lm", "speech-seq2seq"):
        # the hooks a generation task refuses, before the model is compiled in place for them
        # (left_as_it_was said "compiling the model itself", then the compile refused)
        from .tasks.generation_config import refuse_module_code_kernl_drops

        whisper = getattr(getattr(model, "config", None), "model_type", None) == "whisper"
        label = "causal-lm" if generating == "causal-lm" else "seq2seq"  # as describe says it
        refuse_module_code_kernl_drops(model, "speech-seq2seq" if whisper else label)
    with left_as_it_was(model, torch_dtype, dev, say) as subject:
        return _compile_signed(subject, buckets, out, **options)


def _compile_signed(model_or_path, buckets, out, *, sign_key, **options) -> CompileReport:
    from .tokenizer_file import artifact_tokenizer, check_kept_tokenizer, model_tokenizer

    progress = options.get("progress")
    say = progress or (lambda _msg: None)
    key = None
    if sign_key is not None:
        # sign_key: an Ed25519 private key file (PEM); the finished artifact's manifest is
        # signed with it (kernl/artifacts/signing.py) for deployments that pin the public key
        from kernl.artifacts.signing import load_private_key

        key = load_private_key(sign_key)  # a bad key file fails before any compiling
    tokenizer = None
    if isinstance(model_or_path, (str, os.PathLike)):
        tokenizer = model_tokenizer(os.fspath(model_or_path), progress)
        if tokenizer is not None:
            check_kept_tokenizer(out, tokenizer)
            say(
                "tokenizer.json: the model folder's goes into the artifact (hashed, and signed "
                "with it) for kernl serve's text requests"
            )
    if tokenizer is None:  # a model object, or a folder without one: the artifact's stays
        # (a kept tokenizer is signed only where this key signed the artifact it comes from)
        tokenizer = artifact_tokenizer(out, model_or_path, key)
        if tokenizer is not None:
            say("tokenizer.json: the one the artifact there carries stays (hashed, signed)")
    if tokenizer is not None:
        from kernl.artifacts.schema import TOKENIZER_FILE
        from kernl.artifacts.writer import including_files

        with including_files({TOKENIZER_FILE: tokenizer}):
            return _compile_keyed(model_or_path, buckets, out, key, **options)
    return _compile_keyed(model_or_path, buckets, out, key, **options)


def _compile_keyed(model_or_path, buckets, out, key, **options) -> CompileReport:
    if key is not None:
        # signed before it replaces what `out` held: a failed signature leaves that
        from kernl.artifacts.writer import signing_commits

        with signing_commits(key):
            return _compile(model_or_path, buckets, out, **options)
    return _compile(model_or_path, buckets, out, **options)


def _compile(
    model_or_path,
    buckets,
    out: str | os.PathLike,
    *,
    dtype: str,
    device: str | None,
    task: str | None,
    atol: float | None,
    rtol: float | None,
    progress: Progress | None,
    kernels: bool,
    tune: bool,
) -> CompileReport:
    given_task = task
    if task is None:
        task = task_from_source(model_or_path)
        if task == "seq2seq-lm":  # WhisperForConditionalGeneration: speech in, text out
            from .tasks.seq2seq import is_speech_model

            task = "speech-seq2seq" if is_speech_model(model_or_path) else task
    if task == "causal-lm":
        # Decoder-only generation has its own buckets (prompt, cache) and programs.
        from .tasks.causal_lm import compile_causal_lm

        return compile_causal_lm(
            model_or_path,
            buckets,
            out,
            dtype=dtype,
            device=device,
            atol=atol,
            rtol=rtol,
            progress=progress,
            kernels=kernels,
            tune=tune,
        )
    if task in ("seq2seq-lm", "speech-seq2seq"):
        # Encoder-decoder generation: buckets (batch, source, cache), the runtime's own model.
        from .tasks.seq2seq import compile_seq2seq

        for name, value in (("atol", atol), ("rtol", rtol)):
            if value is not None:  # dropped without a word, a caller believed it was applied
                raise OptionNotApplicableError(
                    name,
                    f"{name} does not apply to task {task}: its validation compares kernl's "
                    "greedy ids with eager generate's, with no tolerance; leave it unset",
                )
        # The only tuning here is timing the decode step against kernl's kernels: without
        # it, the plain torch step (as causal-lm's --no-tune).
        return compile_seq2seq(
            model_or_path,
            buckets,
            out,
            dtype=dtype,
            device=device,
            progress=progress,
            task=task,
            kernels=kernels and tune,
        )
    from .tasks.encoder import compile_encoder

    return compile_encoder(
        model_or_path,
        buckets,
        out,
        dtype=dtype,
        device=device,
        # as given: the encoder's loader infers it again, knowing then whether it was a guess
        # (a config naming no architecture, whose head weights must not be dropped unsaid)
        task=given_task,
        atol=atol,
        rtol=rtol,
        progress=progress,
        kernels=kernels,
        tune=tune,
    )
