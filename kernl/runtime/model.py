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
    """One bucket: its static input buffers, its graph and, on CUDA, a pinned host twin of
    the input buffers. The buffers of one dtype are rows of one block (kernl's encoders take
    int64 alone), so inputs from the CPU go in with one copy."""

    def __init__(self, bucket: Bucket, executor: Executor, manifest: Manifest, device):
        self.bucket = bucket
        self.executor = executor
        shape = (bucket.batch, bucket.seq)
        by_dtype: dict[str, list] = {}
        for spec in manifest.inputs:
            by_dtype.setdefault(spec.dtype, []).append(spec)
        # (block on the device, where CPU inputs are padded: the block itself on the CPU, a
        # pinned twin on CUDA, copied in without blocking the host)
        self.blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        static, host = {}, {}
        for dtype, specs in by_dtype.items():
            block = torch.empty((len(specs), *shape), dtype=getattr(torch, dtype), device=device)
            twin = block if device.type == "cpu" else block.cpu().pin_memory()
            self.blocks.append((block, twin))
            for spec, buf, staged in zip(specs, block.unbind(0), twin.unbind(0)):
                buf.fill_(spec.pad_value)
                static[spec.name], host[spec.name] = buf, staged
        self.static_inputs = {spec.name: static[spec.name] for spec in manifest.inputs}
        self.host_inputs = {spec.name: host[spec.name] for spec in manifest.inputs}
        # Marks the copy out of the twins: they are rewritten only once it has read them.
        self.staged = torch.cuda.Event() if device.type == "cuda" else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_outputs: list[torch.Tensor] | None = None
        # What a default-filled static buffer holds now (inputs copied in on the device).
        self.filled: dict[str, tuple] = {}

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
        ranges = {
            "input_ids": _config_int(manifest.model_config, "vocab_size"),
            "token_type_ids": _config_int(manifest.model_config, "type_vocab_size"),
            "attention_mask": 2,
        }
        self._ranges = {k: v for k, v in ranges.items() if k in self._inputs and v}
        self._required = [s.name for s in manifest.inputs if s.default == "required"]
        if "input_ids" not in self._required:
            self._required.insert(0, "input_ids")  # it gives the call's shape
        self._positional = [n for n in POSITIONAL_INPUTS if n in self._inputs]
        self._output_names = self.output_names
        self._bucket_of: dict[tuple[int, int], Bucket] = {}
        # Where the device-side range check of GPU inputs lands: (min, max) per input.
        self._stats_host = torch.empty(2 * len(self._ranges), dtype=torch.int64)
        self._checked: torch.cuda.Event | None = None  # marks that copy
        if device.type == "cuda":
            self._stats_host = self._stats_host.pin_memory()
            self._checked = torch.cuda.Event()
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
        bucket = self._bucket_of.get((batch, seq))
        if bucket is not None:
            return bucket
        bucket = pick_bucket(self.buckets, batch, seq)
        if bucket is not None:
            # At most max batch x max seq entries: only shapes that fit are remembered.
            self._bucket_of[(batch, seq)] = bucket
            return bucket
        names = ", ".join(f"{b.batch}x{b.seq}" for b in sorted(self.buckets))
        raise ValueError(
            f"input of batch {batch} and sequence length {seq} is larger than every bucket "
            f"of this artifact (batch x seq: {names}); recompile with a larger bucket"
        )

    def __call__(self, *args: Any, **inputs: Any) -> ModelOutput:
        """`model(input_ids=..., attention_mask=...)`, or positionally in Hugging Face's order
        (`model(ids)`, `model(ids, mask)`, `model(ids, mask, token_type_ids)`)."""
        if args:
            inputs = _positional(args, inputs, self._positional)
        tensors = self._check_inputs(inputs)
        batch, seq = tensors["input_ids"].shape
        runner = self._runners[self.select_bucket(batch, seq)]
        on_device = self._on_device(tensors)
        with self._lock, running_with(self._binaries, self.device):
            if on_device:
                check = self._copy_in_device(runner, tensors, batch, seq)
            else:
                self._copy_in_host(runner, tensors, batch, seq)
            if runner.graph is None and self.capture_mode == "lazy":
                runner.capture(self._pool)
            outs = runner.run()
            result = ModelOutput()
            if batch == runner.bucket.batch and seq == runner.bucket.seq:
                for name, t in zip(self._output_names, outs):
                    result[name] = t.clone()
            else:
                for (name, index), t in zip(self._slices(batch, seq), outs):
                    result[name] = t[index].clone()
            if on_device:
                # Waits for the range check only, queued before the replay: the GPU is busy
                # with the graph meanwhile. Out-of-range ids were clamped on their way in, so
                # the graph read no memory it does not own; its outputs are dropped here.
                _raise_if_out_of_range(*check)
        return result

    def _on_device(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether the call's inputs are copied in on the device (any given input already
        there) rather than padded on the host (all of them on the CPU: a tokenizer's output)."""
        return self.device.type != "cpu" and any(t.device.type != "cpu" for t in tensors.values())

    def _slices(self, batch: int, seq: int) -> list[tuple[str, tuple]]:
        """Per output, the index that cuts a bucket's output back to the call's shape."""
        found = []
        for spec in self.manifest.outputs:
            index: list[slice] = [slice(None)] * (max(spec.batch_axis, spec.seq_axis or 0) + 1)
            index[spec.batch_axis] = slice(0, batch)
            if spec.seq_axis is not None:
                index[spec.seq_axis] = slice(0, seq)
            found.append((spec.name, tuple(index)))
        return found

    def _copy_in_host(self, runner, tensors: dict[str, torch.Tensor], batch: int, seq: int) -> None:
        """Inputs on the CPU: range-check them, pad them on the host (into the pinned twin of
        the static buffers on CUDA), then one copy that does not block the host."""
        for name, t in tensors.items():
            size = self._ranges.get(name)
            if size is not None:
                _raise_if_out_of_range([(name, size)], torch.stack(torch.aminmax(t)), None)
        if runner.staged is not None:
            runner.staged.synchronize()  # the previous call's copy has read the twin
        exact = batch == runner.bucket.batch and seq == runner.bucket.seq
        for name, buf in runner.host_inputs.items():
            spec = self._inputs[name]
            src = tensors.get(name)
            region = buf if exact else buf[:batch, :seq]
            if not exact:
                buf.fill_(spec.pad_value)
            if src is not None:
                region.copy_(src)
            else:
                region.fill_(1 if spec.default == "ones" else 0)
            if name == "attention_mask" and batch < runner.bucket.batch:
                # Rows that only pad the batch attend to everything: no fully masked softmax
                # (NaN) anywhere, and real rows never see them.
                buf[batch:].fill_(1)
        runner.filled.clear()  # every static buffer is rewritten (on the CPU, right here)
        if runner.staged is not None:  # on the CPU the twins are the static buffers
            for block, twin in runner.blocks:
                block.copy_(twin, non_blocking=True)
            runner.staged.record()

    def _copy_in_device(
        self, runner, tensors: dict[str, torch.Tensor], batch: int, seq: int
    ) -> tuple[list[tuple[str, int]], torch.Tensor | None, torch.cuda.Event | None]:
        """Inputs on the device: copied in and range-checked there, without blocking the host.
        An id outside its table is clamped into it on the way in (an embedding lookup out of
        bounds is a device-side fault that ends the CUDA context) and reported after the
        replay by _raise_if_out_of_range, which takes what this returns."""
        bucket = runner.bucket
        exact = batch == bucket.batch and seq == bucket.seq
        checked: list[tuple[str, int]] = []
        stats: list[torch.Tensor] = []
        for name, buf in runner.static_inputs.items():
            spec = self._inputs[name]
            src = tensors.get(name)
            if src is None:
                key = ("default", batch, seq)
                if runner.filled.get(name) == key:
                    continue  # still holds this default from the last call of this shape
                buf.fill_(spec.pad_value)
                buf[:batch, :seq].fill_(1 if spec.default == "ones" else 0)
                runner.filled[name] = key
            else:
                runner.filled.pop(name, None)
                if src.device != buf.device:
                    src = src.to(buf.device)
                if not exact:
                    buf.fill_(spec.pad_value)
                region = buf if exact else buf[:batch, :seq]
                size = self._ranges.get(name)
                if size is None:
                    region.copy_(src, non_blocking=True)
                else:
                    checked.append((name, size))
                    stats += torch.aminmax(src)
                    if src.dtype == region.dtype:
                        torch.clamp(src, 0, size - 1, out=region)
                    else:
                        region.copy_(src)
                        region.clamp_(0, size - 1)
            if name == "attention_mask" and batch < bucket.batch:
                buf[batch:].fill_(1)  # as in _copy_in_host
        if not checked:
            return checked, None, None
        found = torch.stack(stats)
        if found.device.type == "cpu":
            return checked, found, None
        host = self._stats_host[: found.numel()]
        host.copy_(found, non_blocking=True)
        self._checked.record()  # read before the lock is released: one event serves all calls
        return checked, host, self._checked

    def _check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Types, devices and shapes of the call's inputs (their ranges are checked where they
        are copied in)."""
        if not inputs.keys() <= self._inputs.keys():
            unknown = sorted(k for k in inputs if k not in self._inputs)
            raise TypeError(f"unexpected input(s) {unknown}; this model takes {self.input_names}")
        tensors: dict[str, torch.Tensor] = {}
        for name, value in inputs.items():
            if value is None:
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
        for name in self._required:
            if name not in tensors:
                raise TypeError(f"missing required input {name!r}")
        shape = tensors["input_ids"].shape
        for name, t in tensors.items():
            if t.shape != shape:
                raise ValueError(
                    f"input {name!r} has shape {tuple(t.shape)}, input_ids has {tuple(shape)}"
                )
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"empty input: input_ids has shape {tuple(shape)}")
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


def _raise_if_out_of_range(
    checked: list[tuple[str, int]], found: torch.Tensor | None, done: torch.cuda.Event | None
) -> None:
    """`found` holds (min, max) of each checked input, in order; `done` marks its copy to the
    host (None: it is already there)."""
    if found is None:
        return
    if done is not None:
        done.synchronize()
    values = found.tolist()
    for i, (name, size) in enumerate(checked):
        lo, hi = values[2 * i], values[2 * i + 1]
        if lo < 0 or hi >= size:
            raise ValueError(f"{name} must lie in [0, {size}); got values in [{lo}, {hi}]")


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
