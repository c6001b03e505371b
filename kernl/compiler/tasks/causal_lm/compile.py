"""`kernl.compiler.compile(..., task="causal-lm")`: a decoder-only model in, a generation
artifact out.

The artifact holds the model's description (`manifest.extra["decoder"]`, a DecoderSpec), its
buckets (`manifest.extra["generation_buckets"]`) and its weights under kernl's naming scheme;
the computation is the runtime's own decoder (kernl/runtime/generation/decoder.py), so nothing
read from the artifact is ever executed. Each bucket still gets an entry and a program file
(`programs/prefill_b{B}_p{P}.msgpack`, `programs/decode_b{B}_kv{K}.msgpack`): an instruction-
free Program whose `meta` records the stage and shapes, so `kernl verify` and the manifest's
bucket list cover generation artifacts like any other. Validation runs the loaded runtime
(CUDA graphs included, on a GPU) against the eager model for every bucket."""

from __future__ import annotations

import dataclasses
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
from kernl.artifacts.generation import DecodeKernels, GenerationBuckets
from kernl.artifacts.generation_defaults import GENERATION_DEFAULTS_KEY
from kernl.artifacts.schema import PROGRAMS_DIR
from kernl.runtime.binaries import allow_jit
from kernl.runtime.generation import GenerativeModel

from ...plural import count
from ...report import artifact_bytes
from ...trace import load_model, resolve_dtype_device
from ...tune import write_binaries
from ...validate import ValidationError, resolve_tolerance
from ..generation_config import (
    beam_search_not_run,
    recorded_generation_defaults,
    say_beam_search_not_run,
)
from .buckets import as_generation_buckets
from .decode_kernels import DecodeTiming, choose_decode_kernels, record_decode_binaries
from .decode_tiles import TileTiming, tune_decode_tiles
from .describe import check_model_type, describe
from .validate import StageError, validate_generation

TASK = "causal-lm"
RUNTIME = "kernl.runtime.generation.decoder"


@dataclass
class CausalLMReport:
    path: Path
    task: str
    dtype: str
    device: str
    stages: list[StageError] = field(default_factory=list)
    artifact_bytes: int = 0
    seconds: float = 0.0
    atol: float = 0.0
    rtol: float = 0.0
    decode_kernels: DecodeKernels = field(default_factory=DecodeKernels)
    decode_timings: list[DecodeTiming] = field(default_factory=list)
    decode_buckets: list[str] = field(default_factory=list)  # "batch x cache", as timed
    tile_timings: list[TileTiming] = field(default_factory=list)
    num_binaries: int = 0

    def table(self) -> str:
        lines = [
            f"{'stage':>8}  {'batch':>5}  {'length':>6}  {'steps':>5}  {'max |err| vs eager':>18}  "
            f"{'max |logit|':>11}",
            f"{'-' * 8}  {'-' * 5}  {'-' * 6}  {'-' * 5}  {'-' * 18}  {'-' * 11}",
        ]
        for e in self.stages:
            lines.append(
                f"{e.stage:>8}  {e.batch:>5}  {e.size:>6}  {e.steps:>5}  "
                f"{_fmt(e.max_abs_error, '18.3g')}  {_fmt(e.reference_scale, '11.3g')}"
            )
        for e in self.stages:
            if e.against_float32:
                lines.append(
                    f"note: {e.stage} {e.batch}x{e.size} is beyond the tolerance against eager "
                    f"in {self.dtype} and as close to eager in float32 as eager in {self.dtype} "
                    f"is ({e.against_float32})"
                )
        unchecked = [e for e in self.stages if e.max_abs_error is None]
        if unchecked:
            names = ", ".join(f"{e.stage} {e.batch}x{e.size}" for e in unchecked)
            lines.append(
                f"warning: not validated, no step reaches them (a decode step attends to more "
                f"slots than the shortest prompt bucket holds): {names}"
            )
        if self.tile_timings:
            cached = sum(t.cached for t in self.tile_timings)
            failed = sum(t.error is not None for t in self.tile_timings)
            timed = len(self.tile_timings) - cached - failed
            lines.append(
                f"fused decode kernel tiles: {count(timed, 'config')} timed, {failed} failed, "
                f"{count(cached, 'site')} from the tuning cache"
            )
        if self.decode_timings:
            each = " + ".join(self.decode_buckets)
            lines.append(f"decode step timings, one step per decode bucket, ms ({each}):")
            lines += [f"  {t.describe()}" for t in self.decode_timings]
        lines.append(
            f"decode step kernels: {self.decode_kernels.describe()}; "
            f"{count(self.num_binaries, 'kernel binary', 'kernel binaries')}"
        )
        lines.append(
            f"artifact {self.path} ({self.artifact_bytes / 2**20:.1f} MiB), task {self.task}, "
            f"{self.dtype} on {self.device}, {count(len(self.stages), 'bucket')} in "
            f"{self.seconds:.1f} s "
            f"(tolerance: atol {self.atol} + rtol {self.rtol} x max|logit|)"
        )
        return "\n".join(lines)


def compile_causal_lm(
    model_or_path,
    buckets,
    out: str | os.PathLike,
    *,
    dtype: str = "fp16",
    device: str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    progress: Callable[[str], None] | None = None,
    kernels: bool = True,
    tune: bool = True,
    decode_kernels: DecodeKernels | dict | None = None,
) -> CausalLMReport:
    """Compile a Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma2 or GPT-2 model (a local
    folder, a model id in the local HF cache, or a PreTrainedModel) for generation buckets such as
    "batch=1,4,8 prompt=16:1024 cache=2048" into the artifact folder `out`.

    The decode step's kernels (`DecodeKernels`) are `decode_kernels` when given; otherwise, on
    a GPU in fp16/bf16 with `kernels` and `tune`, the fastest combination found by timing
    (tasks/causal_lm/decode_kernels.py); otherwise plain torch. Triton kernels the choice uses
    are stored as binaries, so the runtime compiles nothing."""
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    torch_dtype, dev = resolve_dtype_device(dtype, device)
    check_model_type(model_or_path)
    gb = as_generation_buckets(buckets)
    check_destination(out)
    atol, rtol = resolve_tolerance(torch_dtype, atol, rtol)

    say(f"loading model {model_or_path if isinstance(model_or_path, (str, Path)) else ''}")
    model, _, source = load_model(model_or_path, TASK, torch_dtype, dev)
    say("describing the decoder")
    spec, weights = describe(model, gb.cache_len, torch_dtype)
    beams = beam_search_not_run(
        getattr(getattr(model, "generation_config", None), "num_beams", None)
    )
    say_beam_search_not_run(beams, progress)
    defaults = recorded_generation_defaults(model)  # refused before any work
    check_destination(out, needed_bytes=sum(t.numel() * t.element_size() for t in weights.values()))
    report = CausalLMReport(Path(out), TASK, str(torch_dtype).removeprefix("torch."), str(dev))
    report.atol, report.rtol = atol, rtol
    manifest = _manifest(model, source, spec, gb, report.dtype, dev, atol, rtol)
    with ArtifactWriter(out) as writer:
        say("writing weights")
        writer.write_weights(weights)
        say(
            f"loading the runtime on {dev} (capturing graphs)"
            if dev.type == "cuda"
            else "loading the runtime"
        )
        # (the runtime takes the tensors, the dict is left empty: once the persistent step
        # stacks the fused q/k/v and gate/up, nothing keeps the unstacked ones, 9 GB for 8B)
        gen = GenerativeModel(manifest, weights, dev, capture="lazy")
        if decode_kernels is not None:
            chosen = (
                decode_kernels
                if isinstance(decode_kernels, DecodeKernels)
                else DecodeKernels.from_dict(decode_kernels)
            )
            unused = gen.decoder.kernels_that_do_not_apply(chosen)
            if unused:
                raise ValueError(
                    f"decode kernels: {spec.model_type}'s step would run these on torch, not "
                    f"as asked: {'; '.join(unused)}. Leave them out (or let the compiler "
                    "choose)."
                )
        elif kernels and tune and dev.type == "cuda" and torch_dtype != torch.float32:
            # (in fp32, Triton's dot products would round through TF32: plain torch stays)
            say("tuning the decode kernels' tiles per decode batch (attention: and kv length)")
            tiles, report.tile_timings = tune_decode_tiles(
                gen.decoder, gb.batches, say, kv_lengths=tuple(gb.kv_lengths)
            )
            report.decode_buckets = [f"{b}x{k}" for b, k in gen.buckets.decode_shapes()]
            each = " + ".join(report.decode_buckets)
            say(f"choosing the decode step's kernels by timing (ms: the sum, then {each})")
            chosen, report.decode_timings = choose_decode_kernels(gen, say, tiles=tiles)
        else:
            chosen = DecodeKernels()
        automatic = decode_kernels is None and chosen != DecodeKernels()
        chosen, stages = validated_choice(gen, model, chosen, automatic, atol, rtol, say)
        report.decode_kernels = chosen
        manifest.extra["decode_kernels"] = dataclasses.asdict(chosen)
        if dev.type == "cuda" and chosen != DecodeKernels():
            say("building kernel binaries")
            try:
                binaries = record_decode_binaries(gen)
            except Exception as e:
                raise RuntimeError(
                    f"recording the binaries of the decode step's kernels ({chosen}) failed: "
                    f"{type(e).__name__}: {e}. --no-tune (tune=False) keeps the plain torch step"
                ) from e
            manifest.kernels = write_binaries(writer, binaries)
            report.num_binaries = len(manifest.kernels)
        del gen
        manifest.buckets = _write_programs(writer, gb, stages)
        report.stages = stages
        # only now: the compile's own runtime (validation, timing) decodes as it is told
        manifest.extra[GENERATION_DEFAULTS_KEY] = defaults
        dest = writer.commit(manifest)
    report.artifact_bytes = artifact_bytes(dest)
    report.seconds = time.perf_counter() - start
    return report


def _fmt(x: float | None, spec: str) -> str:
    width = spec.split(".")[0]
    return f"{'-':>{width}}" if x is None else format(x, spec)


def validated_choice(
    gen: GenerativeModel,
    model,
    chosen: DecodeKernels,
    automatic: bool,
    atol: float,
    rtol: float,
    say: Callable[[str], None],
) -> tuple[DecodeKernels, list[StageError]]:
    """The decode kernels the artifact keeps and every bucket's errors against eager. Where
    the compiler chose kernl kernels itself (`automatic`) and they fail validation, the
    plain torch step is validated instead and kept, and the report says why: a kernel that
    computes wrongly on this GPU costs speed, never the build. Kernels the user forced fail
    the compile."""
    gen.decoder.kernels = chosen
    try:
        with allow_jit():  # the binaries are recorded later; the runtime never compiles
            return chosen, validate_generation(gen, model, atol, rtol, progress=say)
    except ValidationError as e:
        if not automatic:
            raise
        say(
            f"the chosen decode kernels ({chosen.describe()}) failed validation: {e}; "
            "keeping the plain torch decode step"
        )
    gen.decoder.kernels = DecodeKernels()
    gen._steps.clear()  # captured graphs hold the rejected kernels
    with allow_jit():
        return gen.decoder.kernels, validate_generation(gen, model, atol, rtol, progress=say)


def _manifest(model, source, spec, gb: GenerationBuckets, dtype: str, dev, atol, rtol) -> Manifest:
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
    return Manifest(
        format_version=FORMAT_VERSION,
        kernl_version=kernl_version,
        torch_version=torch.__version__,
        triton_version=triton.__version__,
        dtype=dtype,
        task=TASK,
        model_type=spec.model_type,
        model_source=source,
        model_config=json.loads(model.config.to_json_string(use_diff=False)),
        inputs=[
            InputSpec("input_ids", "int64", pad, "required"),
            InputSpec("attention_mask", "int64", 0, "ones"),
        ],
        outputs=[OutputSpec("sequences", "int64", 0, 1)],
        buckets=[],
        files={},
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        extra={
            "decoder": spec.to_dict(),
            "generation_buckets": gb.to_dict(),
            "runtime": RUNTIME,
            "atol": atol,
            "rtol": rtol,
            "kernl_ops": False,
        },
        **target,
    )


def _write_programs(
    writer: ArtifactWriter, gb: GenerationBuckets, stages: list[StageError]
) -> list[BucketEntry]:
    entries = []
    for e in stages:
        name = f"{e.stage}_b{e.batch}_{'p' if e.stage == 'prefill' else 'kv'}{e.size}"
        rel = f"{PROGRAMS_DIR}/{name}.msgpack"
        meta = {
            "stage": e.stage,
            "batch": e.batch,
            ("prompt" if e.stage == "prefill" else "kv_length"): e.size,
            "cache_len": gb.cache_len,
            "runtime": RUNTIME,
        }
        program = Program(Bucket(e.batch, e.size), 1, {}, {}, [], [], meta)
        (writer.tmp / rel).write_bytes(msgpack.packb(program.to_dict(), use_bin_type=True))
        entries.append(BucketEntry(Bucket(e.batch, e.size), rel, e.max_abs_error, None))
    return entries
