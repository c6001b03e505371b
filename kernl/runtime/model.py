"""A loaded artifact: one program per bucket, weights on the device once, and on CUDA one
graph per bucket, all graphs drawing on one memory pool.

A call picks the smallest bucket that holds it, copies the inputs into that bucket's static
buffers (padding the rest), replays, and returns sliced copies of the outputs."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch

from kernl.artifacts.errors import ArtifactCorruptError
from kernl.artifacts.program import Program
from kernl.artifacts.schema import Bucket, Manifest, pick_bucket

from .binaries import KernelBinaries, running_with
from .executor import Executor
from .graphs import capture_graph

# Hugging Face's positional order for the inputs kernl's encoders take (BERT, RoBERTa,
# XLM-RoBERTa, ELECTRA, DistilBERT: input_ids, attention_mask, token_type_ids).
POSITIONAL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class ModelOutput(dict):
    """The model's outputs by field name, like Hugging Face's ModelOutput: `out.logits`,
    `out["logits"]` and `out[0]` all work."""

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key):
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())


class _BucketRunner:
    def __init__(self, bucket: Bucket, executor: Executor, manifest: Manifest, device):
        self.bucket = bucket
        self.executor = executor
        self.static_inputs = {
            spec.name: torch.full(
                (bucket.batch, bucket.seq),
                spec.pad_value,
                dtype=getattr(torch, spec.dtype),
                device=device,
            )
            for spec in manifest.inputs
        }
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_outputs: list[torch.Tensor] | None = None
        self.filled: dict[str, tuple | None] = {}  # what a default-filled buffer holds now

    def capture(self, pool) -> None:
        self.graph, self.static_outputs = capture_graph(
            lambda: self.executor.run(self.static_inputs),
            pool,
            warmups=2,
            device=self.executor.device,
        )

    def run(self) -> list[torch.Tensor]:
        if self.graph is not None:
            self.graph.replay()
            return self.static_outputs
        return self.executor.run(self.static_inputs)


class CompiledModel:
    """Callable with the model's own keyword inputs; see `kernl.runtime.load`."""

    def __init__(
        self,
        manifest: Manifest,
        programs: list[Program],
        weights: dict[str, torch.Tensor],
        device: torch.device,
        capture: str = "load",
        binaries: KernelBinaries | None = None,
    ):
        if capture not in ("load", "lazy", "never"):
            raise ValueError(f"capture must be 'load', 'lazy' or 'never', not {capture!r}")
        _check_artifact(manifest, programs, device)
        self.manifest = manifest
        self.device = device
        self._binaries = binaries
        self.weights = weights
        self.capture_mode = capture if device.type == "cuda" else "never"
        self._lock = threading.Lock()
        self._pool = torch.cuda.graph_pool_handle() if self.capture_mode != "never" else None
        self._inputs = {spec.name: spec for spec in manifest.inputs}
        # Index ranges of the embedding tables: an id outside them is an error on the CPU and
        # a device-side assert on CUDA, which poisons the whole CUDA context.
        self._ranges = {
            "input_ids": _config_int(manifest.model_config, "vocab_size"),
            "token_type_ids": _config_int(manifest.model_config, "type_vocab_size"),
            "attention_mask": 2,
        }
        self._runners = {
            p.bucket: _BucketRunner(p.bucket, Executor(p, weights, device), manifest, device)
            for p in programs
        }
        # Smallest first: a call takes the first bucket that holds it.
        self.buckets: list[Bucket] = sorted(self._runners, key=lambda b: (b.tokens, b.batch))
        if self.capture_mode == "load":
            # Largest first, so smaller graphs reuse the pool's blocks.
            with running_with(self._binaries, device):
                for bucket in sorted(self.buckets, key=lambda b: -b.tokens):
                    self._runners[bucket].capture(self._pool)

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.manifest.outputs]

    def select_bucket(self, batch: int, seq: int) -> Bucket:
        bucket = pick_bucket(self.buckets, batch, seq)
        if bucket is not None:
            return bucket
        names = ", ".join(f"{b.batch}x{b.seq}" for b in sorted(self.buckets))
        raise ValueError(
            f"input of batch {batch} and sequence length {seq} is larger than every bucket "
            f"of this artifact (batch x seq: {names}); recompile with a larger bucket"
        )

    def __call__(self, *args: Any, **inputs: Any) -> ModelOutput:
        """`model(input_ids=..., attention_mask=...)`, or positionally in Hugging Face's order
        (`model(ids)`, `model(ids, mask)`, `model(ids, mask, token_type_ids)`)."""
        inputs = _positional(args, inputs, [n for n in POSITIONAL_INPUTS if n in self._inputs])
        tensors = self._check_inputs(inputs)
        batch, seq = tensors["input_ids"].shape
        bucket = self.select_bucket(batch, seq)
        runner = self._runners[bucket]
        with self._lock, running_with(self._binaries, self.device):
            self._copy_in(runner, tensors, batch, seq)
            if runner.graph is None and self.capture_mode == "lazy":
                runner.capture(self._pool)
            outs = runner.run()
            exact = batch == bucket.batch and seq == bucket.seq
            result = ModelOutput()
            for spec, t in zip(self.manifest.outputs, outs):
                if not exact:
                    index = [slice(None)] * t.dim()
                    index[spec.batch_axis] = slice(0, batch)
                    if spec.seq_axis is not None:
                        index[spec.seq_axis] = slice(0, seq)
                    t = t[tuple(index)]
                result[spec.name] = t.clone()
        return result

    def _copy_in(self, runner, tensors: dict[str, torch.Tensor], batch: int, seq: int) -> None:
        """Write the call into the bucket's static buffers with as few device operations as
        possible: every one of them costs launch time on the latency path."""
        bucket = runner.bucket
        exact = batch == bucket.batch and seq == bucket.seq
        for name, buf in runner.static_inputs.items():
            spec = self._inputs[name]
            src = tensors.get(name)
            if src is None:
                key = ("default", batch, seq)
                if runner.filled.get(name) == key:
                    continue  # still holds this default from the last call of this shape
                if spec.default == "ones":
                    buf.zero_()
                    buf[:batch, :seq].fill_(1)
                else:
                    buf.fill_(spec.pad_value)
                runner.filled[name] = key
            elif exact:
                buf.copy_(src, non_blocking=True)
                runner.filled[name] = None
            else:
                if src.device.type == "cpu":
                    # pad on the host, then one copy to the device
                    padded = torch.full(tuple(buf.shape), spec.pad_value, dtype=buf.dtype)
                    padded[:batch, :seq] = src
                    if name == "attention_mask":
                        padded[batch:] = 1
                    buf.copy_(padded, non_blocking=buf.device.type != "cpu")
                    runner.filled[name] = None
                    continue
                buf.fill_(spec.pad_value)
                buf[:batch, :seq].copy_(src, non_blocking=True)
                runner.filled[name] = None
            if name == "attention_mask" and batch < bucket.batch:
                # Rows that only pad the batch attend to everything: no fully masked
                # softmax (NaN) anywhere, and real rows never see them.
                buf[batch:].fill_(1)

    def _check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        unknown = sorted(k for k in inputs if k not in self._inputs)
        if unknown:
            raise TypeError(f"unexpected input(s) {unknown}; this model takes {self.input_names}")
        tensors: dict[str, torch.Tensor] = {}
        for name, spec in self._inputs.items():
            value = inputs.get(name)
            if value is None:
                if spec.default == "required":
                    raise TypeError(f"missing required input {name!r}")
                continue
            if not isinstance(value, torch.Tensor):
                try:
                    value = torch.as_tensor(value)
                except Exception as e:
                    raise TypeError(f"input {name!r} must be a tensor, not {type(value)}") from e
            if value.device.type not in ("cpu", self.device.type):
                raise ValueError(
                    f"input {name!r} is on {value.device}; this model runs on {self.device} and "
                    f"takes tensors on the CPU or on {self.device.type}"
                )
            if value.dim() != 2:
                raise ValueError(
                    f"input {name!r} must have 2 dimensions (batch, sequence), "
                    f"got shape {tuple(value.shape)}"
                )
            if value.dtype.is_floating_point or value.dtype.is_complex:
                raise TypeError(f"input {name!r} must hold integers, got {value.dtype}")
            tensors[name] = value
        shape = tensors["input_ids"].shape
        for name, t in tensors.items():
            if t.shape != shape:
                raise ValueError(
                    f"input {name!r} has shape {tuple(t.shape)}, input_ids has {tuple(shape)}"
                )
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"empty input: input_ids has shape {tuple(shape)}")
        checked = [
            (name, t, self._ranges[name]) for name, t in tensors.items() if name in self._ranges
        ]
        if checked:
            for (name, _, size), (lo, hi) in zip(checked, _ranges_of([t for _, t, _ in checked])):
                if lo < 0 or hi >= size:
                    raise ValueError(f"{name} must lie in [0, {size}); got values in [{lo}, {hi}]")
        return tensors

    def __repr__(self) -> str:
        b = ", ".join(f"{x.batch}x{x.seq}" for x in sorted(self.buckets))
        return (
            f"CompiledModel({self.manifest.model_type}, task={self.manifest.task}, "
            f"dtype={self.manifest.dtype}, device={self.device}, buckets=[{b}])"
        )


def _positional(args: tuple, inputs: dict[str, Any], order: list[str]) -> dict[str, Any]:
    if len(args) > len(order):
        raise TypeError(
            f"this model takes at most {len(order)} positional input(s) ({', '.join(order)}); "
            f"got {len(args)}"
        )
    named = dict(inputs)
    for name, value in zip(order, args):
        if name in named:
            raise TypeError(f"input {name!r} given both positionally and by name")
        named[name] = value
    return named


def _ranges_of(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(min, max) of each tensor with as few operations as possible: they are on the latency
    path of every call. One aminmax per tensor; the device ones then read back together,
    since on a GPU every separate read is a sync."""
    found: list[tuple[int, int] | None] = []
    on_device: list[torch.Tensor] = []
    for t in tensors:
        lo, hi = torch.aminmax(t)
        if t.device.type == "cpu":
            found.append((int(lo), int(hi)))
        else:
            found.append(None)
            on_device += [lo, hi]
    if on_device:
        same = all(v.device == on_device[0].device for v in on_device)
        values = iter(torch.stack(on_device).tolist() if same else [v.item() for v in on_device])
        found = [f if f is not None else (next(values), next(values)) for f in found]
    return found


def _config_int(config: dict, key: str) -> int | None:
    v = config.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _check_artifact(manifest: Manifest, programs: list[Program], device: torch.device) -> None:
    """What a CompiledModel relies on beyond what the reader and load()'s compatibility check
    (kernl.artifacts.check_compatibility) cover: one program per listed bucket, input_ids."""
    if "input_ids" not in {spec.name for spec in manifest.inputs}:
        raise ArtifactCorruptError("the manifest declares no input_ids input")
    # load() reads programs in the manifest's bucket order.
    if len(programs) != len(manifest.buckets):
        raise ArtifactCorruptError(
            f"the manifest lists {len(manifest.buckets)} buckets, {len(programs)} programs were read"
        )
    for entry, p in zip(manifest.buckets, programs):
        if p.bucket != entry.bucket:
            raise ArtifactCorruptError(
                f"{entry.program}: the program is for bucket {p.bucket.name}, the manifest "
                f"lists it for {entry.bucket.name}"
            )
    names = {spec.name for spec in manifest.inputs}
    for p in programs:
        if not set(p.inputs) <= names or len(p.outputs) != len(manifest.outputs):
            raise ArtifactCorruptError(
                f"program {p.bucket.name} takes inputs {sorted(p.inputs)} and returns "
                f"{len(p.outputs)} values; the manifest declares inputs {sorted(names)} and "
                f"{len(manifest.outputs)} outputs"
            )
