"""`kernl.compiler.compile(..., task="seq2seq-lm")`: an encoder-decoder model (T5, BART) in, a
generation artifact out.

The artifact holds the model's description (`manifest.extra["seq2seq"]`, a Seq2SeqSpec), its
buckets (`manifest.extra["seq2seq_buckets"]`) and its weights under kernl's naming scheme; the
computation is the runtime's own encoder-decoder (kernl/runtime/generation/encoder_decoder.py),
so nothing read from the artifact is executed. Each (batch, source) bucket gets a manifest entry
and a program file that only records it (it passes `input_ids` through, so `kernl verify`'s
program checks cover it like any other). Validation runs the loaded runtime's greedy generate
against the eager model's for every (batch, source) bucket."""

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

import kernl
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
from kernl.artifacts.schema import PROGRAMS_DIR
from kernl.artifacts.seq2seq import Seq2SeqBuckets, check_seq2seq
from kernl.runtime.generation.seq2seq import Seq2SeqModel

from ...trace import load_model, resolve_dtype_device
from .buckets import as_seq2seq_buckets
from .describe import describe

TASK = "seq2seq-lm"
RUNTIME = "kernl.runtime.generation.encoder_decoder"
VALIDATE_TOKENS = 8


@dataclass
class Seq2SeqReport:
    path: Path
    task: str
    dtype: str
    device: str
    buckets: list[tuple[int, int]] = field(default_factory=list)
    artifact_bytes: int = 0
    seconds: float = 0.0

    def table(self) -> str:
        shapes = " ".join(f"{b}x{s}" for b, s in self.buckets)
        return (
            f"greedy ids identical to eager generate ({VALIDATE_TOKENS} tokens) for batch x "
            f"source buckets {shapes}\nartifact {self.path} "
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
) -> Seq2SeqReport:
    """Compile a T5 (v1.0, v1.1/flan) or BART model (a local folder, a model id in the local
    HF cache, or a PreTrainedModel) for buckets such as "batch=1,8 source=32:512 cache=128"
    into the artifact folder `out`."""
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    torch_dtype, dev = resolve_dtype_device(dtype, device)
    sb = as_seq2seq_buckets(buckets)
    check_destination(out)
    say("loading model")
    model, _, source = load_model(model_or_path, TASK, torch_dtype, dev)
    say("describing the encoder-decoder")
    spec, weights = describe(model, torch_dtype)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    manifest = _manifest(model, source, spec, sb, dtype_name, dev)
    described = {n: (list(t.shape), dtype_name) for n, t in weights.items()}
    check_seq2seq(manifest.extra, dtype_name, described, "the description")  # refuse early
    check_destination(out, needed_bytes=sum(t.numel() * t.element_size() for t in weights.values()))
    report = Seq2SeqReport(Path(out), TASK, dtype_name, str(dev))
    with ArtifactWriter(out) as writer:
        writer.write_weights(weights)
        say("validating every (batch, source) bucket against eager generate")
        runtime = Seq2SeqModel(manifest, weights, dev, capture="never")
        for b, s in sb.encoder_shapes():
            _validate(runtime, model, spec, b, s, min(VALIDATE_TOKENS, sb.cache_len))
            report.buckets.append((b, s))
        del runtime
        manifest.buckets = _write_programs(writer, sb)
        report.artifact_bytes = writer.size_bytes()
        writer.commit(manifest)
    report.seconds = time.perf_counter() - start
    return report


def _validate(runtime: Seq2SeqModel, model, spec, batch: int, source: int, tokens: int) -> None:
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
        ).cpu()
    got = runtime.generate(ids, mask, max_new_tokens=tokens, eos_token_id=[])
    if not torch.equal(ref, got):
        raise RuntimeError(
            f"bucket batch={batch} source={source}: kernl's greedy ids differ from eager "
            f"generate:\n kernl {got.tolist()}\n eager {ref.tolist()}"
        )


def _manifest(model, source, spec, sb: Seq2SeqBuckets, dtype: str, dev) -> Manifest:
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
        kernl_version=kernl.__version__,
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
            "seq2seq": spec.to_dict(),
            "seq2seq_buckets": sb.to_dict(),
            "runtime": RUNTIME,
            "kernl_ops": False,
        },
        **target,
    )


def _write_programs(writer: ArtifactWriter, sb: Seq2SeqBuckets) -> list[BucketEntry]:
    entries = []
    for b, s in sb.encoder_shapes():
        rel = f"{PROGRAMS_DIR}/encoder_b{b}_s{s}.msgpack"
        meta = {
            "stage": "encoder",
            "batch": b,
            "source": s,
            "cache_len": sb.cache_len,
            "runtime": RUNTIME,
        }
        program = Program(Bucket(b, s), 1, {"input_ids": 0}, {}, [0], [], meta)
        (writer.tmp / rel).write_bytes(msgpack.packb(program.to_dict(), use_bin_type=True))
        entries.append(BucketEntry(Bucket(b, s), rel, 0.0, None))
    return entries
