"""`kernl.compiler.compile(..., task="seq2seq-lm")`: an encoder-decoder model (T5, BART, mBART,
Marian) in, a generation artifact out; `task="speech-seq2seq"`: the same for Whisper (log-mel
features in).

The artifact holds the model's description (`manifest.extra["seq2seq"]`, a Seq2SeqSpec), its
buckets (`manifest.extra["seq2seq_buckets"]`) and its weights under kernl's naming scheme; the
computation is the runtime's own encoder-decoder (kernl/runtime/generation/encoder_decoder.py),
so nothing read from the artifact is executed. Each (batch, source) bucket gets a manifest entry
and a program file that only records it (it passes `input_ids` through, so `kernl verify`'s
program checks cover it like any other). Validation runs the loaded runtime's greedy generate
against the eager model's for every (batch, source) bucket; for Whisper, the greedy ids it
generates (language detection and suppressed tokens included) against the eager model's argmax
over the same prefix, in one teacher-forced forward per batch bucket (Whisper's own generate
can loop forever on a random model that emits timestamp tokens)."""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import torch
import triton

from kernl._version import __version__ as kernl_version
from kernl.artifacts import (
    FORMAT_VERSION,
    ArtifactWriter,
    Bucket,
    BucketEntry,
    InputSpec,
    Manifest,
    OutputSpec,
    Program,
    check_destination,
)
from kernl.artifacts.generation_defaults import GENERATION_DEFAULTS_KEY
from kernl.artifacts.schema import PROGRAMS_DIR
from kernl.artifacts.seq2seq import DETECT, Seq2SeqBuckets, check_seq2seq
from kernl.runtime.generation import open_seq2seq
from kernl.runtime.generation.seq2seq import Seq2SeqModel

from ...inspect_report import greedy_agreement
from ...plural import count
from ...report import artifact_bytes
from ...trace import (
    UnsupportedModelError,
    check_task,
    load_from_folder,
    load_model,
    read_config,
    resolve_dtype_device,
)
from ...tune import write_binaries
from ...validate import ValidationError
from ..generation_config import (
    HF_GENERATE_AS_KERNL,
    beam_search_not_run,
    recorded_generation_defaults,
    say_beam_search_not_run,
)
from .buckets import as_seq2seq_buckets, check_positions, check_speech_prompt
from .decode_kernels import (
    FEW_ROWS,
    choose_decode_kernels,
    recording_decode_binaries,
    with_decode_kernels,
)
from .describe import check_model_type, describe, speech_spec

TASK = "seq2seq-lm"
SPEECH_TASK = "speech-seq2seq"
RUNTIME = "kernl.runtime.generation.encoder_decoder"
VALIDATE_TOKENS = 8
# Validation in reduced precision: how far below eager's best logit (a fraction of the step's
# largest |logit|) kernl's greedy pick may be. A tiny bf16 Whisper differs from HF bf16 by
# 1.3% of that scale (HF bf16 from HF fp32 by 1.5%), and errors grow with depth (32 layers);
# a wrong implementation is off by the whole scale, so the bar stays far from what it catches.
NEAR_ARGMAX = {torch.bfloat16: 0.05, torch.float16: 0.02}


@dataclass
class Seq2SeqReport:
    path: Path
    task: str
    dtype: str
    device: str
    buckets: list[tuple[int, int]] = field(default_factory=list)
    # new ids compared per row at each bucket, as validation ran them: the cache (and for
    # Whisper its decoder prompt) can leave fewer than VALIDATE_TOKENS
    tokens: list[int] = field(default_factory=list)
    artifact_bytes: int = 0
    seconds: float = 0.0
    decode: str = "decode step on torch"
    num_binaries: int = 0

    def table(self) -> str:
        shapes = " ".join(f"{b}x{s}" for b, s in self.buckets)
        n = min(self.tokens, default=0)
        return (
            f"greedy ids against eager generate ({greedy_agreement(self.dtype, n)}) for "
            f"batch x source buckets {shapes}\n{self.decode}; "
            f"{count(self.num_binaries, 'kernel binary', 'kernel binaries')}"
            f"\nartifact {self.path} "
            f"({self.artifact_bytes / 2**20:.1f} MiB), task {self.task}, {self.dtype} on "
            f"{self.device}, in {self.seconds:.1f} s"
        )


def compile_seq2seq(
    model_or_path,
    buckets,
    out: str | os.PathLike,
    *,
    dtype: str = "fp16",
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
    task: str = TASK,
    kernels: bool = True,
) -> Seq2SeqReport:
    """Compile a T5 (v1.0, v1.1/flan), BART, mBART or Marian model (a local folder, a model id
    in the local HF cache, or a PreTrainedModel) for buckets such as "batch=1,8 source=32:512
    cache=128" into the artifact folder `out`; with task="speech-seq2seq" a Whisper model for
    buckets such as "batch=1,8 cache=448" (the source is one 30 s window). On a GPU in
    fp16/bf16 the decode step runs on kernl's few-rows kernels where timing shows them faster
    (decode_kernels.py); kernels=False keeps plain torch."""
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    speech = task == SPEECH_TASK
    torch_dtype, dev = resolve_dtype_device(dtype, device)
    sb = as_seq2seq_buckets(buckets, 0 if speech else None)  # Whisper's source: set below
    check_destination(out)
    check_model_type(model_or_path)
    say(f"loading model {model_or_path if isinstance(model_or_path, (str, Path)) else ''}")
    if speech:
        _check_speech_head(model_or_path)
    # load_model knows the text task only (it is checked against that: Whisper's model class
    # is a ...ForConditionalGeneration)
    model, _, source = load_model(
        _speech_model(model_or_path, torch_dtype) if speech else model_or_path,
        TASK,
        torch_dtype,
        dev,
    )
    check_positions(sb, buckets, model.config, speech)  # else "the description is invalid"
    if not isinstance(model_or_path, torch.nn.Module):  # Whisper's was loaded above
        local = Path(model_or_path).expanduser()
        source = os.path.abspath(local) if local.is_dir() else str(model_or_path)
    say("describing the encoder-decoder")
    spec, weights = describe(model, torch_dtype)
    beams = beam_search_not_run(
        getattr(getattr(model, "generation_config", None), "num_beams", None)
    )
    if not speech:  # Whisper's is refused (speech_spec)
        say_beam_search_not_run(beams, progress)
    defaults = recorded_generation_defaults(model)  # refused before any work
    if speech != (spec.family == "whisper"):
        raise UnsupportedModelError(
            f"{spec.model_type} is compiled with --task "
            f"{SPEECH_TASK if spec.family == 'whisper' else TASK}, not {task}"
        )
    if (
        spec.family == "t5"
        and torch_dtype == torch.float16
        and "wo" in (getattr(model, "_keep_in_fp32_modules", None) or [])
    ):
        # said, not refused: below fp16's range the two agree; past it neither is fp32's
        say(
            "T5 in fp16: kernl computes as the model cast to fp16 (`model.half()`: every "
            "weight in fp16, Hugging Face's clamps), not as from_pretrained(dtype=float16), "
            "which keeps each feed-forward's `wo` and the residual after it in float32; "
            "a T5 whose activations pass fp16's range (t5-large, flan-t5-xl and up) is "
            "best compiled in bf16"
        )
    if speech:
        sb = Seq2SeqBuckets(sb.batches, [spec.source_positions], sb.caches)
        check_speech_prompt(sb, buckets, speech_spec(model), spec.decoder_start_token_id)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    manifest = _manifest(model, source, spec, sb, dtype_name, dev, speech)
    described = {n: (list(t.shape), dtype_name) for n, t in weights.items()}
    check_seq2seq(manifest.extra, dtype_name, described, "the description")  # refuse early
    check_destination(out, needed_bytes=sum(t.numel() * t.element_size() for t in weights.values()))
    report = Seq2SeqReport(Path(out), task, dtype_name, str(dev))
    reduced = torch_dtype in (torch.float16, torch.bfloat16)
    automatic = False  # kernl kernels the compiler chose by timing (not forced)
    if kernels and dev.type == "cuda" and reduced and min(sb.batches) <= FEW_ROWS:
        say("timing the decode step on torch and on kernl's kernels")
        choice = choose_decode_kernels(manifest, weights, dev, say)
        manifest = with_decode_kernels(manifest, choice.kernels, choice.tile, choice.site_tiles)
        # what the choice wrote goes through the reader's check before anything is written: an
        # entry the reader refuses fails the compile here, not every later load()
        check_seq2seq(manifest.extra, dtype_name, described, "the decode-kernel choice")
        report.decode = choice.describe()
        automatic = choice.kernels != "torch"
    with ArtifactWriter(out) as writer:
        writer.write_weights(weights)
        say("validating every (batch, source) bucket against eager generate")

        def validate(runtime: Seq2SeqModel) -> None:
            report.buckets.clear()
            report.tokens.clear()
            for b, s in sb.encoder_shapes():
                if speech:
                    n = _validate_speech(runtime, model, b, VALIDATE_TOKENS)
                else:
                    n = _validate(runtime, model, spec, b, s, min(VALIDATE_TOKENS, sb.cache_len))
                report.buckets.append((b, s))
                report.tokens.append(n)

        manifest, binaries, fallback = validated_runtime(
            manifest, weights, dev, validate, automatic, say
        )
        if fallback:
            report.decode = fallback
        if binaries is not None:
            manifest.kernels = write_binaries(writer, binaries)
            report.num_binaries = len(manifest.kernels)
        manifest.buckets = _write_programs(
            writer, sb, manifest.inputs[0].name, dict(zip(report.buckets, report.tokens))
        )
        # only now: the compile's own runtime (validation, timing) decodes as it is told
        manifest.extra[GENERATION_DEFAULTS_KEY] = defaults
        dest = writer.commit(manifest)
    report.artifact_bytes = artifact_bytes(dest)
    report.seconds = time.perf_counter() - start
    return report


def validated_runtime(
    manifest: Manifest,
    weights: dict[str, torch.Tensor],
    dev: torch.device,
    validate: Callable[[Seq2SeqModel], None],
    automatic: bool,
    say: Callable[[str], None],
) -> tuple[Manifest, dict | None, str]:
    """Validate the artifact's decode step against eager, recording its kernl kernels'
    binaries on the way: (manifest, binaries or None, "" or why it fell back). Where the
    compiler chose kernl's kernels itself (`automatic`) and they fail validation, the plain
    torch step is validated instead and kept: a kernel that computes wrongly on this GPU
    costs speed, never the build. Kernels the user forced fail the compile."""
    runtime = open_seq2seq(manifest, weights, dev, capture="never")
    try:
        if runtime.model.kernels:
            return manifest, recording_decode_binaries(runtime, lambda: validate(runtime)), ""
        validate(runtime)
        return manifest, None, ""
    except ValidationError as e:
        if not automatic:
            raise
        why = f"the chosen decode step failed validation ({e}); decode step on torch"
        say(why)
    manifest = with_decode_kernels(manifest, "torch")
    validate(open_seq2seq(manifest, weights, dev, capture="never"))
    return manifest, None, why


def _validate(runtime: Seq2SeqModel, model, spec, batch: int, source: int, tokens: int) -> int:
    """kernl's greedy ids against eager generate's (`tokens` new ids per row); returns how
    many new ids per row were compared."""
    g = torch.Generator().manual_seed(batch * 1000 + source)
    ids = torch.randint(0, spec.vocab_size, (batch, source), generator=g)
    mask = torch.ones_like(ids)
    mask[0, max(1, source // 2) :] = 0  # one row padded
    dev = next(model.parameters()).device
    with torch.no_grad():
        ref = model.generate(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=None,
            decoder_start_token_id=spec.decoder_start_token_id,
            pad_token_id=0,
            **HF_GENERATE_AS_KERNL,
        ).cpu()
    got = runtime.generate(ids, mask, max_new_tokens=tokens, eos_token_id=[])
    compared = got.shape[1] - 1  # past the decoder start
    if torch.equal(ref, got):
        return compared
    param = next(model.parameters())
    if param.dtype in NEAR_ARGMAX:  # reduced precision: two near-equal logits may swap places
        with torch.no_grad():
            logits = (
                model(
                    input_ids=ids.to(dev),
                    attention_mask=mask.to(dev),
                    decoder_input_ids=got[:, :-1].to(dev),
                )
                .logits.float()
                .cpu()
            )
        if _near_argmax(logits, got[:, 1:], param.dtype):
            return compared
    raise ValidationError(
        f"bucket batch={batch} source={source}: kernl's greedy ids differ from eager "
        f"generate:\n kernl {got.tolist()}\n eager {ref.tolist()}"
    )


def _check_speech_head(model_or_path) -> None:
    """Refuse a model object whose class is not a generation head (a WhisperModel: the
    encoder-decoder without its head) naming the task the caller asked for: load_model checks
    the model against the text task, and its refusal named seq2seq-lm, which nobody passed."""
    if not isinstance(model_or_path, torch.nn.Module):
        return  # a folder or model id loads through AutoModelForSpeechSeq2Seq
    try:
        check_task(TASK, model_or_path)
    except UnsupportedModelError:
        raise UnsupportedModelError(
            f"task {SPEECH_TASK!r} does not match the model given, a "
            f"{type(model_or_path).__name__}: {SPEECH_TASK} compiles a speech-to-text model "
            "with its language-model head, such as WhisperForConditionalGeneration "
            "(transformers.AutoModelForSpeechSeq2Seq loads one)"
        ) from None


def _speech_model(model_or_path, dtype: torch.dtype):
    """A Whisper folder or model id loads through AutoModelForSpeechSeq2Seq (load_model knows
    the text tasks' auto classes only), as the text tasks' folders load: in the compile's
    dtype (not the config's: an fp32 checkpoint whose config says float16 was rounded), and
    refused where a weight is missing from the checkpoint (it was random) or the checkpoint
    cannot be read."""
    if isinstance(model_or_path, torch.nn.Module):
        return model_or_path
    import transformers

    config, source = read_config(model_or_path)
    try:
        return load_from_folder(
            source,
            config,
            SPEECH_TASK,
            dtype,
            transformers,
            auto=transformers.AutoModelForSpeechSeq2Seq,
        )
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{SPEECH_TASK}: {e}") from None


def _validate_speech(runtime, model, batch: int, tokens: int) -> int:
    """kernl's greedy ids (language detected where the config leaves it open) against the
    eager model's logits after the same prefix, with the same suppressed tokens: in fp32 each
    id is eager's argmax; in fp16/bf16, where two near-equal logits may swap places, each id's
    eager logit is within NEAR_ARGMAX of the step's largest |logit| from eager's best. Returns
    how many ids past the decoder prompt each row was compared on."""
    spec, speech = runtime.spec, runtime.speech
    g = torch.Generator().manual_seed(batch)
    feats = torch.randn(batch, spec.num_mel_bins, spec.frames, generator=g) * 0.5
    greedy = (False, (1.0, 50, 1.0, 0), [], None, None, None, None)
    # as many of `tokens` as the cache leaves after the decoder prompt (the runtime's count)
    room = runtime._speech_plan(feats, None, *greedy).max_new_tokens
    plan = runtime._speech_plan(feats, min(tokens, room), *greedy)
    got = runtime._generate(plan)
    param = next(model.parameters())
    start = torch.full((batch, 1), spec.decoder_start_token_id, dtype=torch.int64)
    with torch.no_grad():
        logits = (
            model(
                input_features=feats.to(param.device, param.dtype),
                decoder_input_ids=torch.cat([start, got[:, :-1]], dim=1).to(param.device),
            )
            .logits.float()
            .cpu()
        )

    def check(scores: torch.Tensor, ids: torch.Tensor, what: str) -> None:
        if not _near_argmax(scores, ids, param.dtype):
            raise ValidationError(
                f"bucket batch={batch}: kernl's {what} differ from eager's:\n kernl "
                f"{ids.tolist()}\n eager {scores.argmax(-1).tolist()}"
            )

    p = plan.prompt_len
    if speech.lang_to_id and bool((plan.prompt[:batch, 1] == DETECT).any()):
        lang = torch.full((spec.vocab_size,), float("-inf"))
        lang[list(speech.lang_to_id.values())] = 0.0
        check(logits[:, 0] + lang, got[:, 0], "detected languages")
    new = logits[:, p - 1 :]
    new[..., speech.suppress_tokens] = float("-inf")
    new[:, 0, speech.begin_suppress_tokens] = float("-inf")
    check(new, got[:, p - 1 :], "greedy ids")
    return got.shape[1] - (p - 1)


def _near_argmax(scores: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every id is the argmax of its scores (fp32), or within NEAR_ARGMAX of the
    largest |score| below the best one (fp16, bf16)."""
    near = NEAR_ARGMAX.get(dtype)
    if near is None:
        return torch.equal(scores.argmax(-1), ids)
    gap = scores.max(-1).values - scores.gather(-1, ids[..., None])[..., 0]
    return bool((gap <= near * scores.abs().amax(-1)).all())


def _manifest(
    model, source, spec, sb: Seq2SeqBuckets, dtype: str, dev, speech: bool = False
) -> Manifest:
    target = dict(target="cpu", gpu_name=None, compute_capability=None, cuda_version=None)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        target = dict(
            target="cuda",
            gpu_name=torch.cuda.get_device_name(dev),
            compute_capability=f"{major}.{minor}",
            cuda_version=torch.version.cuda,
        )
    pad = spec.pad_token_id if spec.pad_token_id is not None else 0
    inputs = [
        InputSpec("input_ids", "int64", pad, "required"),
        InputSpec("attention_mask", "int64", 0, "ones"),
    ]
    extra = {"seq2seq": spec.to_dict(), "seq2seq_buckets": sb.to_dict()}
    if speech:
        # The log-mel features (float [batch, num_mel_bins, frames]) are described by
        # extra.seq2seq; the manifest's input list holds integer inputs: the decoder prompt.
        inputs = [InputSpec("decoder_input_ids", "int64", pad, "required")]
        extra["speech"] = speech_spec(model).to_dict()
        # beside extra.speech: a reader older than them refuses unknown speech fields
        extra["speech_language_names"] = extra["speech"].pop("language_names")
    return Manifest(
        format_version=FORMAT_VERSION,
        kernl_version=kernl_version,
        torch_version=torch.__version__,
        triton_version=triton.__version__,
        dtype=dtype,
        task=SPEECH_TASK if speech else TASK,
        model_type=spec.model_type,
        model_source=source,
        model_config=json.loads(model.config.to_json_string(use_diff=False)),
        inputs=inputs,
        outputs=[OutputSpec("sequences", "int64", 0, 1)],
        buckets=[],
        files={},
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        extra={**extra, "runtime": RUNTIME, "kernl_ops": False},
        **target,
    )


def _write_programs(
    writer: ArtifactWriter, sb: Seq2SeqBuckets, name: str, tokens: dict[tuple[int, int], int]
) -> list[BucketEntry]:
    entries = []
    for b, s in sb.encoder_shapes():
        rel = f"{PROGRAMS_DIR}/encoder_b{b}_s{s}.msgpack"
        meta = {
            "stage": "encoder",
            "batch": b,
            "source": s,
            "cache_len": sb.cache_len,
            "runtime": RUNTIME,
            # what `kernl inspect` states validation compared (no error figure exists)
            "validated_tokens": tokens[(b, s)],
        }
        program = Program(Bucket(b, s), 1, {name: 0}, {}, [0], [], meta)
        (writer.tmp / rel).write_bytes(msgpack.packb(program.to_dict(), use_bin_type=True))
        # validation compares ids: no error figure to record (inspect shows none)
        entries.append(BucketEntry(Bucket(b, s), rel, None, None))
    return entries
