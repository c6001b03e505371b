"""`kernl inspect`: what an artifact holds, as a readable report or as JSON.

Reads the manifest and every bucket's program (no hashes, no weights, no device): the model,
task, dtype, the GPU and toolchain it was built for, each bucket's validation error, the
kernels each program uses with their chosen implementation and config, and file sizes.

It checks no hashes (`kernl verify` does): a manifest is shown as it is, so the report never
trusts what it shows. Values of an unexpected type are shown with repr, the JSON form holds
only JSON types, and the text form escapes control characters (terminal escapes, newlines)
in every string it takes from the artifact."""

from __future__ import annotations

import dataclasses
import numbers
import os
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kernl.artifacts import read_manifest, read_program
from kernl.artifacts.generation import DecodeKernels
from kernl.artifacts.generation_defaults import GENERATION_DEFAULTS_KEY
from kernl.artifacts.program import Program
from kernl.artifacts.schema import Manifest, is_safe_relative_path
from kernl.artifacts.signing import SIGNATURE_FILE

from .op_counts import count_ops
from .plural import count

# Program meta that is bookkeeping of the compiler (value shapes), not worth a report line.
_QUIET_META = ("values",)


@dataclass
class KernelChoice:
    """How many instructions of one kernl op took one implementation and config."""

    op: str
    impl: str
    config: dict[str, Any] | None
    count: int


@dataclass
class BucketInfo:
    batch: int
    seq: int
    program: str
    program_bytes: int | None
    max_abs_error: float | None
    compile_seconds: float | None
    instructions: int
    op_counts: dict[str, int]
    kernel_choices: list[KernelChoice] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    kernl_ops: int = 0  # op_counts.count_ops: the figures of the compile summary
    on_triton: int = 0
    stage: str | None = None  # causal-lm: "prefill" (seq = prompt) or "decode" (seq = KV length)

    @property
    def name(self) -> str:
        return f"{self.batch}x{self.seq}"


@dataclass
class InspectReport:
    path: str
    format_version: int
    created_at: str
    model_type: str
    model_source: str
    architectures: list[str]
    task: str
    dtype: str
    target: str
    gpu_name: str | None
    compute_capability: str | None
    versions: dict[str, str | None]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    tolerance: dict[str, Any]
    buckets: list[BucketInfo]
    kernels: list[dict[str, Any]]
    file_bytes: dict[str, int | None]
    decode_kernels: dict[str, str] | None = None  # generation: the decode step's choice
    # encoder-decoders: their buckets' axes (batches, sources, caches), Whisper's input shape
    seq2seq: dict[str, Any] | None = None
    # generating artifacts: the generation config a call's left-out settings come from (None:
    # not recorded, an artifact compiled before 2026-12-07)
    generation_defaults: dict[str, Any] | None = None

    @property
    def total_bytes(self) -> int:
        return sum(v for v in self.file_bytes.values() if v is not None)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON types only (bytes and other msgpack leftovers as their repr)."""
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        for b, info in zip(d["buckets"], self.buckets):
            b["name"] = info.name
        return _jsonable(d)


def _jsonable(x: Any) -> Any:
    if x is None or isinstance(x, (str, bool, int, float)):
        return x
    if isinstance(x, dict):
        return {
            k if isinstance(k, (str, int, float, bool)) or k is None else repr(k): _jsonable(v)
            for k, v in x.items()
        }
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return repr(x)


def _escape(text: str) -> str:
    """`text` with control and format characters (ESC, newline, bidi overrides ...) written as
    Python escapes, so a string from an artifact cannot drive the terminal or forge lines."""
    return "".join(
        c.encode("unicode_escape").decode("ascii")
        if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")
        else c
        for c in text
    )


def _printable(x: Any) -> Any:
    """A copy of `x` (a report, or anything in one) with every string escaped."""
    if isinstance(x, str):
        return _escape(x)
    if isinstance(x, (bytes, bytearray)):
        return repr(x)
    if isinstance(x, dict):
        return {_printable(k): _printable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_printable(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_printable(v) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(
            x, **{f.name: _printable(getattr(x, f.name)) for f in dataclasses.fields(x)}
        )
    return x


def _size(root: Path, rel: str) -> int | None:
    if not is_safe_relative_path(rel):
        return None
    try:
        return os.stat(root / rel).st_size
    except OSError:
        return None


def _decode_config(config: Any) -> dict[str, Any] | None:
    # Programs store a config as [[name, value], ...] (plain msgpack); a dict is accepted too.
    if config is None:
        return None
    if isinstance(config, dict):
        return dict(config)
    try:
        return {str(k): v for k, v in config}
    except (TypeError, ValueError):
        return {"raw": config}


def kernel_choices(program: Program) -> list[KernelChoice]:
    counts: Counter = Counter()
    configs: dict[tuple, dict[str, Any] | None] = {}
    for ins in program.instructions:
        if not ins.op.startswith("kernl."):
            continue
        impl = str(ins.kwargs.get("impl", "aten"))
        config = _decode_config(ins.kwargs.get("config"))
        key = (ins.op, impl, repr(sorted(config.items())) if config else None)
        counts[key] += 1
        configs[key] = config
    return [
        KernelChoice(op, impl, configs[(op, impl, c)], n)
        for (op, impl, c), n in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1]))
    ]


def _bucket_info(root: Path, manifest: Manifest) -> list[BucketInfo]:
    infos = []
    for entry in manifest.buckets:
        program = read_program(root, entry.program)
        ops = Counter(ins.op for ins in program.instructions)
        counts = count_ops(program)
        stage = program.meta.get("stage") if manifest.task == "causal-lm" else None
        infos.append(
            BucketInfo(
                batch=entry.bucket.batch,
                seq=entry.bucket.seq,
                program=entry.program,
                program_bytes=_size(root, entry.program),
                max_abs_error=entry.max_abs_error,
                compile_seconds=entry.compile_seconds,
                instructions=len(program.instructions),
                op_counts=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
                kernel_choices=kernel_choices(program),
                meta={k: v for k, v in program.meta.items() if k not in _QUIET_META},
                kernl_ops=counts.kernl_ops,
                on_triton=counts.on_triton,
                stage=stage if isinstance(stage, str) else None,
            )
        )
    return infos


def inspect_artifact(path: str | os.PathLike) -> InspectReport:
    """Read an artifact's manifest and programs into a report. Raises ArtifactError if the
    manifest or a program cannot be read."""
    root = Path(path).expanduser()  # as read_manifest reads it: its files were "missing"
    m = read_manifest(root)
    files = {"manifest.msgpack": _size(root, "manifest.msgpack")}
    if (root / SIGNATURE_FILE).is_file():  # as the compile summary counts it
        files[SIGNATURE_FILE] = _size(root, SIGNATURE_FILE)
    files.update({rel: _size(root, rel) for rel in sorted(m.files)})
    kernels = [
        {
            "name": k.name,
            "function": k.function,
            "num_warps": k.num_warps,
            "shared_mem": k.shared_mem,
            "file": k.file,
            "bytes": _size(root, k.file),
            "meta": {key: v for key, v in k.meta.items() if key != "arg_types"},
        }
        for k in m.kernels
    ]
    return InspectReport(
        path=str(root),
        format_version=m.format_version,
        created_at=m.created_at,
        model_type=m.model_type,
        model_source=m.model_source,
        architectures=_names(m.model_config.get("architectures")),
        task=m.task,
        dtype=m.dtype,
        target=m.target,
        gpu_name=m.gpu_name,
        compute_capability=m.compute_capability,
        versions={
            "kernl": m.kernl_version,
            "torch": m.torch_version,
            "triton": m.triton_version,
            "cuda": m.cuda_version,
        },
        inputs=[asdict(s) for s in m.inputs],
        outputs=[asdict(s) for s in m.outputs],
        tolerance={k: m.extra[k] for k in ("atol", "rtol") if k in m.extra},
        buckets=_bucket_info(root, m),
        kernels=kernels,
        file_bytes=files,
        decode_kernels=_decode_kernels(m),
        seq2seq=_seq2seq_shapes(m),
        generation_defaults=(
            m.extra.get(GENERATION_DEFAULTS_KEY)
            if isinstance(m.extra.get(GENERATION_DEFAULTS_KEY), dict)
            else None
        ),
    )


def _seq2seq_shapes(m) -> dict[str, Any] | None:
    """An encoder-decoder's bucket axes and, for Whisper, its features' shape: what its
    instruction-free programs do not show (None for other tasks)."""
    if m.task not in ("seq2seq-lm", "speech-seq2seq"):
        return None
    buckets = m.extra.get("seq2seq_buckets")
    spec = m.extra.get("seq2seq")
    out = (
        {k: buckets.get(k) for k in ("batches", "sources", "caches")}
        if isinstance(buckets, dict)
        else {}
    )
    if m.task == "speech-seq2seq" and isinstance(spec, dict):
        out["num_mel_bins"] = spec.get("num_mel_bins")
        positions = spec.get("source_positions")
        out["frames"] = 2 * positions if _is_number(positions) else positions
    return out


def _decode_kernels(m) -> dict[str, str] | None:
    if m.task in ("seq2seq-lm", "speech-seq2seq"):  # the encoder-decoder's choice and tile
        spec = m.extra.get("seq2seq") if isinstance(m.extra.get("seq2seq"), dict) else {}
        tile = spec.get("decode_tile") or "default"
        out = {"kernels": str(spec.get("decode_kernels", "torch")), "tile": str(tile)}
        sites = spec.get("decode_site_tiles")
        if sites and isinstance(sites, list):  # "batch kernel site [config]", one per site
            out["site tiles"] = "; ".join(
                f"{t[0]} {t[1]} {t[2]} {t[3:]}" if isinstance(t, list) and len(t) > 3 else repr(t)
                for t in sites
            )
        return out
    if m.task != "causal-lm":
        return None
    choice = m.extra.get("decode_kernels")
    try:
        return asdict(DecodeKernels.from_dict(choice))
    except (TypeError, ValueError):
        return {"invalid": repr(choice)}


def _mib(n: int | None) -> str:
    if n is None:
        return "missing"
    if n < 1 << 20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _fmt(x: float | None, spec: str) -> str:
    """`x` formatted with `spec` if it is a number; None (not recorded, or not validated) as
    "-"; anything else (a manifest edited by hand holds what it holds) as its repr; all in the
    same width."""
    if _is_number(x):
        return format(x, spec)
    width = "".join(c for c in spec.split(".")[0] if c.isdigit())
    return format("-" if x is None else repr(x), f">{width}" if width else "")


def _number(x: Any) -> str:
    return format(x, "g") if _is_number(x) else repr(x)


def _config_text(config: dict[str, Any] | None) -> str:
    return "default config" if not config else " ".join(f"{k}={v}" for k, v in config.items())


def render_text(r: InspectReport) -> str:
    """The report as aligned text for a terminal (strings from the artifact escaped)."""
    r = _printable(r)
    target = "cpu"
    if r.target == "cuda":
        target = f"cuda: {r.gpu_name} (compute capability {r.compute_capability})"
    arch = f" ({', '.join(r.architectures)})" if r.architectures else ""
    versions = ", ".join(f"{k} {v}" for k, v in r.versions.items() if v)
    ins = ", ".join(
        f"{s['name']} ({s['dtype']}, pad {s['pad_value']}, {s['default']})" for s in r.inputs
    )
    outs = ", ".join(f"{s['name']} ({s['dtype']})" for s in r.outputs)
    tol = ", ".join(f"{k} {_number(v)}" for k, v in r.tolerance.items()) or "not recorded"
    lines = [
        f"artifact    {r.path}  (format v{r.format_version}, created {r.created_at or '?'})",
        f"model       {r.model_type}{arch} from {r.model_source}",
        f"task        {r.task}",
        f"dtype       {r.dtype}",
        f"built for   {target}",
        f"versions    {versions}",
        f"inputs      {ins}",
        f"outputs     {outs}",
        f"validation  {tol}",
    ]
    if r.task == "causal-lm":
        lines += ["", *_generation_lines(r), "", *_file_lines(r)]
        return "\n".join(lines)
    if r.seq2seq is not None:
        lines = [*lines[:6], *_seq2seq_lines(r), "", *_file_lines(r)]
        return "\n".join(lines)
    if r.decode_kernels is not None:  # an encoder-decoder: its decode step's choice
        lines += ["", "decode step " + " ".join(f"{k}={v}" for k, v in r.decode_kernels.items())]
    lines += [
        "",
        f"{'bucket':>9}  {'max |err| vs eager':>18}  {'compile s':>9}  {'instructions':>12}  "
        f"{'kernl ops':>9}  {'on Triton':>9}  {'program':>10}",
    ]
    for b in r.buckets:
        lines.append(
            f"{b.name:>9}  {_fmt(b.max_abs_error, '18.3g')}  {_fmt(b.compile_seconds, '9.1f')}  "
            f"{b.instructions:12d}  {b.kernl_ops:9d}  {b.on_triton:9d}  {_mib(b.program_bytes):>10}"
        )
    lines += ["", *_kernel_lines(r), "", *_op_count_lines(r), "", *_file_lines(r)]
    return "\n".join(lines)


def _generation_lines(r: InspectReport) -> list[str]:
    """A causal-LM artifact: its programs hold no instructions (the runtime's own decoder runs
    every bucket, from the manifest's description), so show what it does hold: prefill and
    decode buckets, the KV-cache length and the decode step's kernels."""
    caches = sorted(
        {b.meta["cache_len"] for b in r.buckets if isinstance(b.meta.get("cache_len"), int)}
    )
    runtime = sorted({str(b.meta["runtime"]) for b in r.buckets if "runtime" in b.meta})
    lines = [
        f"generation  the runtime's decoder ({', '.join(runtime) or 'kernl.runtime'}) runs every "
        "bucket from the manifest's description; its programs are instruction-free records",
        f"KV cache    {', '.join(map(str, caches)) or '?'} slots per sequence, allocated once "
        "per batch bucket at load",
    ]
    if r.decode_kernels is not None:
        step = " ".join(f"{k}={v}" for k, v in r.decode_kernels.items())
        lines.append(f"decode step {step}")
    lines.append(_decode_binaries(r))
    lines.append(_decoding_line(r))
    prefill = [b for b in r.buckets if b.stage == "prefill"]
    decode = [b for b in r.buckets if b.stage == "decode"]
    other = [b for b in r.buckets if b.stage not in ("prefill", "decode")]
    groups = [("prefill", "prompt", prefill), ("decode", "KV length", decode), ("?", "seq", other)]
    lengths = [f"{what} {b.seq}" for _, what, group in groups for b in group]
    length_w = _width(lengths, 14)  # "KV length 32768" is 15
    lines += [
        "",
        f"{'stage':>8}  {'batch':>5}  {'length':>{length_w}}  {'max |err| vs eager':>18}  "
        f"{'program':>10}",
    ]
    for stage, what, group in groups:
        for b in group:
            lines.append(
                f"{stage:>8}  {b.batch:5d}  {what + ' ' + str(b.seq):>{length_w}}  "
                f"{_fmt(b.max_abs_error, '18.3g')}  {_mib(b.program_bytes):>10}"
            )
    lines.append(
        f"{len(prefill)} prefill bucket(s) (batch x prompt length), {len(decode)} "
        "decode bucket(s) (batch x KV length a step attends to)"
    )
    lines += _binary_lines(r)
    return lines


def greedy_agreement(dtype: str, tokens: int | None = None) -> str:
    """How an encoder-decoder's validation compared kernl's greedy ids with eager's, worded
    once for the compile summary and `kernl inspect`: in reduced precision two near-equal
    logits may swap places, so an id is only required near eager's argmax."""
    near = "equal" if dtype == "float32" else "each within a small margin of the argmax"
    if tokens is None:  # an artifact from before the count was recorded
        return f"{dtype}: {near}"
    return f"{dtype}: {near}, {tokens} new token{'' if tokens == 1 else 's'} per row"


def _seq2seq_lines(r: InspectReport) -> list[str]:
    """An encoder-decoder artifact (T5, BART, Whisper): like a causal LM's, its programs are
    instruction-free records; show its inputs, bucket axes, how it was validated and the
    decode step's kernels."""
    shapes = r.seq2seq or {}

    def axis(name: str) -> str:
        values = shapes.get(name)
        return ", ".join(map(_number, values)) if isinstance(values, list) else "?"

    if r.task == "speech-seq2seq":
        mels, frames = (_number(shapes.get(k)) for k in ("num_mel_bins", "frames"))
        inputs = f"input_features (float, [batch, {mels}, {frames}]: one 30 s window)"
        sources = f"one window ({axis('sources')} encoder positions)"
        cache = "decoder prompt and new tokens"
    else:
        inputs = "input_ids, attention_mask (int64, [batch, source length])"
        sources = axis("sources")
        cache = "new tokens after the decoder start"
    counts = [b.meta.get("validated_tokens") for b in r.buckets]
    tokens = min(counts) if counts and all(_is_int(n) for n in counts) else None
    lines = [
        f"inputs      {inputs}",
        f"outputs     {', '.join(s['name'] for s in r.outputs) or '?'} (the generated ids)",
        f"validation  greedy ids against eager generate at every (batch, source) bucket "
        f"({greedy_agreement(r.dtype, tokens)}); no error figure is recorded",
        "",
        "generation  the runtime's encoder-decoder runs every bucket from the manifest's "
        "description; its programs are instruction-free records",
        f"batch       {axis('batches')}",
        f"source      {sources}",
        f"cache       {axis('caches')} (a decode step attends to the smallest that holds the "
        f"tokens so far; the largest bounds the {cache})",
    ]
    if r.decode_kernels is not None:
        lines.append("decode step " + " ".join(f"{k}={v}" for k, v in r.decode_kernels.items()))
    lines.append(_decode_binaries(r))
    lines.append(_decoding_line(r))
    lines += _binary_lines(r)
    return lines


def _decoding_line(r: InspectReport) -> str:
    """Where generate's settings come from when a call leaves them out."""
    d = r.generation_defaults
    if d is None:
        return "decoding    from each call's arguments alone (greedy, 20 new tokens unless told)"
    if not d:
        return "decoding    Hugging Face's defaults where a call leaves them out (none recorded)"
    shown = ", ".join(f"{k}={v!r}" for k, v in d.items())
    return f"decoding    the generation config's, where a call leaves them out: {shown}"


def _decode_binaries(r: InspectReport) -> str:
    if r.kernels:
        return f"kernels     {count(len(r.kernels), 'kernel binary', 'kernel binaries')}"
    build = ", CPU build" if r.target == "cpu" else ""
    return f"kernels     no kernel binaries (plain torch decode step{build})"


def _binary_lines(r: InspectReport) -> list[str]:
    """One line per kernel binary: name, function, launch settings, size, launch meta. The
    columns are as wide as their longest entry (Triton's function names run past any fixed
    width); the free-form meta comes last."""
    rows = [
        (
            str(k["name"]),
            str(k["function"]),
            f"warps={k['num_warps']}",
            f"shared={k['shared_mem']}",
            _mib(k["bytes"]),
            " ".join(f"{key}={v}" for key, v in k["meta"].items() if key != "key"),
        )
        for k in r.kernels
    ]
    w = [_width(column) for column in zip(*rows)]
    return [
        f"  {name:<{w[0]}} {function:<{w[1]}} {warps:<{w[2]}} {shared:<{w[3]}} {size:>{w[4]}} "
        f"{meta}".rstrip()
        for name, function, warps, shared, size, meta in rows
    ]


def _width(column, least: int = 0) -> int:
    return max([least, *(len(str(c)) for c in column)])


def _kernel_lines(r: InspectReport) -> list[str]:
    lines = []
    if r.kernels:
        lines.append(f"kernel binaries ({len(r.kernels)}):")
        lines += _binary_lines(r)
    else:
        why = (
            "no binaries are built for the CPU"
            if r.target == "cpu"
            else "no Triton kernel was chosen"
        )
        lines.append(f"kernel binaries: none ({why})")
    if any(b.kernel_choices for b in r.buckets):
        # Buckets whose programs made the same choices share one block.
        groups: dict[str, tuple[list[str], list[KernelChoice]]] = {}
        for b in r.buckets:
            key = repr([(c.op, c.impl, c.config, c.count) for c in b.kernel_choices])
            groups.setdefault(key, ([], b.kernel_choices))[0].append(b.name)
        lines.append("kernl ops and chosen implementations:")
        every = [c for _, choices in groups.values() for c in choices]  # one width for all
        op_w, impl_w = _width((c.op for c in every), 18), _width((c.impl for c in every), 7)
        for names, choices in groups.values():
            lines.append(f"  bucket {', '.join(names)}:")
            for c in choices:
                lines.append(
                    f"    {c.count:5d}  {c.op:<{op_w}} {c.impl:<{impl_w}} {_config_text(c.config)}"
                )
    else:
        lines.append("kernl ops: none (plain aten programs)")
    for b in r.buckets:
        if b.meta:
            meta = ", ".join(f"{k}={v}" for k, v in b.meta.items())
            lines.append(f"  {b.name:>9}  program meta: {meta[:200]}")
    return lines


def _op_count_lines(r: InspectReport) -> list[str]:
    """Op counts per program; buckets with the same counts share one block."""
    groups: dict[tuple, list[str]] = {}
    for b in r.buckets:
        groups.setdefault(tuple(b.op_counts.items()), []).append(b.name)
    lines = ["ops per program:"]
    for counts, names in groups.items():
        total = sum(n for _, n in counts)
        lines.append(f"  bucket {', '.join(names)}: {count(total, 'instruction')}")
        for op, n in counts:
            lines.append(f"    {n:5d}  {op}")
    return lines


def _file_lines(r: InspectReport) -> list[str]:
    programs = [v for k, v in r.file_bytes.items() if k.startswith("programs/")]
    kernels = [v for k, v in r.file_bytes.items() if k.startswith("kernels/")]
    lines = ["files:"]
    for rel in ("manifest.msgpack", SIGNATURE_FILE, "weights.safetensors", "tokenizer.json"):
        if rel in r.file_bytes:
            lines.append(f"  {rel:<22} {_mib(r.file_bytes[rel]):>10}")
    lines.append(
        f"  {'programs/ (' + str(len(programs)) + ')':<22} "
        f"{_mib(sum(p or 0 for p in programs)):>10}"
    )
    if kernels:
        lines.append(
            f"  {'kernels/ (' + str(len(kernels)) + ')':<22} "
            f"{_mib(sum(k or 0 for k in kernels)):>10}"
        )
    missing = [k for k, v in r.file_bytes.items() if v is None]
    if missing:
        lines.append(f"  missing: {', '.join(missing)}")
    lines.append(f"  {'total':<22} {_mib(r.total_bytes):>10}")
    return lines


def _names(value) -> list[str]:
    """The config's `architectures` as shown: its strings, whatever else a hand-edited
    manifest holds there (an int was a traceback, a string one letter per name)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []
