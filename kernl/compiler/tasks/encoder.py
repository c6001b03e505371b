"""The encoder room: one exported, rewritten, tuned and validated program per (batch, seq)
bucket (BERT family, sentence embeddings, classification heads)."""

from __future__ import annotations

import datetime
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import triton

from kernl._version import __version__ as kernl_version
from kernl.artifacts import FORMAT_VERSION, ArtifactWriter, BucketEntry, Manifest, check_destination
from kernl.artifacts.schema import (
    ORDERED_INPUTS_FORMAT_VERSION,
    POSITIONAL_INPUTS_KEY,
    Bucket,
)
from kernl.runtime.binaries import allow_jit

from ..buckets import as_buckets, check_buckets_fit
from ..lower import lower
from ..op_counts import count_ops
from ..passes import rewrite
from ..passes.attention_window import use_attention_windows
from ..passes.fold_constants import FoldBudget, fold_constants
from ..passes.split_k_counters import share_split_k_counters
from ..report import BucketReport, CompileReport, Progress, artifact_bytes
from ..trace import (
    FlatModel,
    example_inputs,
    export_bucket,
    load_model,
    model_signature,
    model_state,
    positional_order,
    refuse_a_model_that_changed_itself,
    resolve_dtype_device,
    usual_order,
)
from ..tune import TuneSession, record_binaries, tune_program, write_binaries
from ..tune_qkv_attention import tune_qkv_attention
from ..validate import (
    ValidationError,
    check_padding_is_neutral,
    resolve_tolerance,
    validate,
)


def compile_encoder(
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
) -> CompileReport:
    """See `kernl.compiler.compile`."""
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    torch_dtype, dev = resolve_dtype_device(dtype, device)
    if kernels and dev.type == "cpu" and torch_dtype == torch.bfloat16:
        raise ValueError(
            "bf16 on the CPU: kernl's kernels run through Triton's interpreter there, which "
            "computes bf16 wrongly (numpy has no bfloat16). Use fp32 or fp16 on the CPU "
            "(--dtype / dtype=), plain aten ops (--no-kernels / kernels=False: bf16 works), "
            "or compile on a GPU."
        )
    if dev.type == "cpu" and not torch.cuda.is_available():
        # kernl's kernels run through Triton's interpreter on the CPU; the variable must be
        # set before they are first imported (tune.py falls back to aten if it was too late).
        # Not in a process with a GPU (kernl.optimize in a notebook): every Triton kernel
        # made after it, torch.compile's too, would be interpreted.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    bucket_list = as_buckets(buckets)
    # before any heavy work
    check_destination(out, needed_bytes=_model_bytes(model_or_path, torch_dtype))

    say(
        f"loading model {model_or_path}"
        if isinstance(model_or_path, (str, Path))
        else f"preparing the {type(model_or_path).__name__} given"
    )
    model, task, source = load_model(model_or_path, task, torch_dtype, dev)
    if isinstance(model_or_path, (str, Path)) and getattr(model, "pooler", 0) is None:
        say(
            "the checkpoint holds no pooler: compiled without one, as "
            f"{type(model).__name__}(add_pooling_layer=False) (no pooler_output)"
        )
    check_buckets_fit(bucket_list, model.config)  # before tracing any bucket
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    check_destination(out, needed_bytes=int(weight_bytes * 1.2) + (1 << 20))
    state = model_state(model)  # a model that changes itself when run is refused
    signature = model_signature(model, dev)
    input_names = [s.name for s in signature.inputs]
    output_names = [s.name for s in signature.outputs]
    flat = FlatModel(model, input_names, output_names)
    atol, rtol = resolve_tolerance(torch_dtype, atol, rtol)
    check_padding_is_neutral(flat, signature.inputs, signature.outputs, dev, atol, rtol)

    report = CompileReport(Path(out), task, str(torch_dtype).removeprefix("torch."), str(dev))
    if signature.not_served:
        names = ", ".join(signature.not_served)
        say(
            f"not served: the model's {names} (not a tensor, as a decoder's cache): the "
            f"artifact returns {', '.join(s.name for s in signature.outputs)} only "
            "(use_cache=False on model.config compiles without it)"
        )
        report.not_served = list(signature.not_served)
    entries: list[BucketEntry] = []
    all_weights: dict[str, torch.Tensor] = {}
    programs: list = []
    binaries: dict = {}
    fold_budget = FoldBudget()  # the folded values' bytes, over all buckets
    session = TuneSession()  # buckets share tunings of equal shapes and known-bad configs
    with ArtifactWriter(out) as writer:
        for i, bucket in enumerate(bucket_list, 1):
            with _in_bucket(bucket):
                t0 = time.perf_counter()
                tag = f"[{i}/{len(bucket_list)}] bucket {bucket.batch}x{bucket.seq}"
                say(f"{tag}: export")
                ep = export_bucket(flat, bucket, model.config.vocab_size, dev)
                say(f"{tag}: lower")
                program, weights = lower(ep, bucket, input_names)
                for name, t in weights.items():
                    all_weights.setdefault(name, t)
                if kernels:
                    say(f"{tag}: rewrite")
                    program = rewrite(program, all_weights)
                    program = use_attention_windows(program, all_weights, dev)  # before the fold
                    program, folded = fold_constants(program, all_weights, dev, fold_budget)
                    if folded:
                        say(f"{tag}: {folded} input-independent values computed once, as weights")
                    say(f"{tag}: tune")
                    example = dict(
                        zip(
                            input_names,
                            example_inputs(input_names, bucket, model.config.vocab_size, dev),
                        )
                    )
                    records = tune_program(
                        program, all_weights, example, dev, benchmark=tune, session=session
                    )
                    # where the fused QKV + attention kernel timed faster than the two launches
                    tune_qkv_attention(
                        program, all_weights, example, dev, records, session, benchmark=tune
                    )
                    report.tuning[bucket] = records
                    share_split_k_counters(program, records)
                    report.compiled_ahead = session.compiled_ahead
                    report.compile_threads = session.compile_threads
                    if dev.type == "cuda":
                        say(f"{tag}: build kernel binaries")
                        binaries.update(record_binaries(program, all_weights, example, dev))
                say(f"{tag}: validate")
                compiling = f"while kernl compiled bucket {bucket.batch}x{bucket.seq}"
                with allow_jit():
                    try:
                        result = validate(flat, program, all_weights, dev, atol, rtol)
                    except ValidationError:  # a model that changed itself is named as such
                        refuse_a_model_that_changed_itself(model, state, compiling)
                        raise
                refuse_a_model_that_changed_itself(model, state, compiling)
                programs.append(program)
                rel = writer.write_program(program)
                seconds = time.perf_counter() - t0
                entries.append(BucketEntry(bucket, rel, result.max_abs_error, seconds))
                report.buckets.append(
                    BucketReport(bucket, seconds, result.max_abs_error, count_ops(program))
                )
                if result.against_float32:
                    say(
                        f"{tag}: beyond atol={atol}, rtol={rtol} from eager in {dtype}, and no less "
                        f"accurate than it against eager in float32 ({result.against_float32})"
                    )
                say(f"{tag}: done in {seconds:.1f}s, max |error| {result.max_abs_error:.3g}")
        say("writing weights")
        used = {n for p in programs for n in p.weights.values()}
        writer.write_weights({k: v for k, v in all_weights.items() if k in used})
        kernel_entries = write_binaries(writer, binaries)
        positional, version = _positional_extra(model, input_names)
        manifest = Manifest(
            format_version=version,
            kernl_version=kernl_version,
            torch_version=torch.__version__,
            triton_version=triton.__version__,
            dtype=report.dtype,
            task=task,
            model_type=getattr(model.config, "model_type", type(model).__name__),
            model_source=source,
            model_config=_plain_config(model.config),
            inputs=signature.inputs,
            outputs=signature.outputs,
            buckets=entries,
            files={},
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            kernels=kernel_entries,
            extra={"atol": atol, "rtol": rtol, "kernl_ops": kernels} | positional,
            **_target_info(dev),
        )
        dest = writer.commit(manifest)
    report.artifact_bytes = artifact_bytes(dest)
    report.seconds = time.perf_counter() - start
    return report


def _target_info(device: torch.device) -> dict:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return dict(
            target="cuda",
            gpu_name=torch.cuda.get_device_name(device),
            compute_capability=f"{major}.{minor}",
            cuda_version=torch.version.cuda,
        )
    return dict(target="cpu", gpu_name=None, compute_capability=None, cuda_version=None)


@contextmanager
def _in_bucket(bucket: Bucket):
    """A failure kernl did not foresee (a model's own IndexError while tuning, say) carries
    the bucket it came from: the CLI prints the note with the error."""
    try:
        yield
    except Exception as e:
        note = f"while compiling bucket {bucket.batch}x{bucket.seq}"
        # add_note is Python 3.11's; on 3.10 the CLI reads the same attribute
        e.__notes__ = [*getattr(e, "__notes__", ()), note]
        raise


# Bytes per element of the floating dtypes a checkpoint stores (safetensors' names): the
# weights the compile casts to its dtype. Integer tensors (position ids) keep their size.
_CHECKPOINT_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_CONFIG_FLOAT_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def _model_bytes(model_or_path, dtype: torch.dtype) -> int:
    """About what the artifact will need on disk, known before loading the model: its
    weights at the compile's `dtype` (+20%). A folder is counted once, in one format: its
    *.safetensors files if it has any (read from their headers: each tensor's size and
    dtype), else its pytorch_model*.bin files (a folder often holds both, or
    training_args.bin, which is no weight), scaled from the config's torch_dtype, fp32 where
    it names none. An estimate: a wrong one only moves the refusal to the exact check made
    once the model is loaded, before any tracing."""
    size = torch.empty((), dtype=dtype).element_size()
    if isinstance(model_or_path, torch.nn.Module):
        params = list(model_or_path.parameters())
        return int(
            sum(p.numel() * (size if p.is_floating_point() else p.element_size()) for p in params)
            * 1.2
        )
    folder = Path(str(model_or_path)).expanduser()
    if not folder.is_dir():
        return 0
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return int(sum(_safetensors_bytes(f, size) for f in safetensors) * 1.2)
    stored = _CONFIG_FLOAT_BYTES.get(_config_torch_dtype(folder), 4)
    binaries = sorted(folder.glob("pytorch_model*.bin"))
    return int(sum(f.stat().st_size for f in binaries) * size / stored * 1.2)


def _safetensors_bytes(path: Path, size: int) -> int:
    """A safetensors file's tensors, floating ones at `size` bytes an element: from its
    header alone (8 bytes of length, then JSON). Its size on disk where the header cannot be
    read: the reader of the weights says what is wrong with it."""
    import json
    import struct

    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 << 20:  # no header is this long: not a safetensors file
                raise ValueError(f"header of {length} bytes")
            header = json.loads(f.read(length))
        total = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            stored = _CHECKPOINT_FLOAT_BYTES.get(entry["dtype"])
            total += (end - start) * size // stored if stored else end - start
        return total
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        return path.stat().st_size


def _config_torch_dtype(folder: Path) -> str | None:
    """The config.json's torch_dtype (`dtype` in newer transformers), None where unreadable."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
        found = config.get("torch_dtype") or config.get("dtype")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def _positional_extra(model, input_names: list[str]) -> tuple[dict, int]:
    """The forward's positional order for the runtime (POSITIONAL_INPUTS_KEY), recorded even
    where it is the usual one (an artifact without it is then one from an older kernl), and
    the format version: 2 where the order is not the usual one (a version-1 reader ignores it
    and would read `model(ids, x)` in the usual order, wrongly)."""
    order = positional_order(model, input_names)
    if order is None or "input_ids" not in order:
        return {}, FORMAT_VERSION
    version = FORMAT_VERSION if usual_order(order, input_names) else ORDERED_INPUTS_FORMAT_VERSION
    return {POSITIONAL_INPUTS_KEY: order}, version


def _plain_config(config) -> dict:
    import json

    return json.loads(config.to_json_string(use_diff=False))
