"""A loaded artifact: one program per bucket, weights on the device once, and on CUDA one
graph per bucket, all graphs drawing on one memory pool.

A call picks the smallest bucket that holds it, copies the inputs into that bucket's static
buffers (padding the rest), replays, and returns sliced copies of the outputs."""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from kernl.artifacts.errors import ArtifactCorruptError
from kernl.artifacts.program import Program
from kernl.artifacts.schema import POSITIONAL_INPUTS_KEY, Bucket, Manifest, pick_bucket

from .binaries import KernelBinaries, running_with
from .executor import Executor
from .graphs import capture_graph

# Hugging Face's positional order for the inputs kernl's encoders take (BERT, RoBERTa,
# XLM-RoBERTa, ELECTRA, DistilBERT: input_ids, attention_mask, token_type_ids).
POSITIONAL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# Families whose Hugging Face forward does not take (input_ids, attention_mask,
# token_type_ids) first (RoCBert: input_shape_ids second; LayoutLM, LiLT, Bros: bbox; XLM,
# FlauBERT: langs; X-MOD: lang_ids; GPT-2 and its kin: the cache). An artifact compiled before
# kernl recorded the forward's order (POSITIONAL_INPUTS_KEY) read `model(ids, x)` in the usual
# order for them too, silently wrong: such a call is refused, asking for names or a recompile.
_UNUSUAL_ORDER = frozenset(
    {
        "roc_bert", "layoutlm", "layoutlmv3", "lilt", "bros", "markuplm", "xlm", "flaubert",
        "xmod", "xlnet", "longformer", "gpt2", "gpt_bigcode", "gpt_neo", "gptj", "codegen",
        "ctrl", "imagegpt", "gpt-sw3", "bloom", "falcon", "mpt",
    }
)  # fmt: skip

# Fields of Hugging Face's output classes that kernl never fills (no labels, no per-layer
# tuples, no cache are taken), and that HF's classes then hold as None: `out.loss is None`.
_NONE_FIELDS = frozenset({"loss", "hidden_states", "attentions", "cross_attentions"})

# Families whose Hugging Face forward has no token_type_ids: given one by a BERT-vocabulary
# tokenizer (pairs: 1s), it takes and ignores them (**kwargs). GPT-2's forward uses them, so an
# artifact without them (compiler/trace.py's model_signature) refuses them.
NO_TOKEN_TYPES = frozenset({"distilbert", "mpnet", "modernbert", "esm", "eurobert", "ultrabert"})

# What a tokenizer returns besides a model's inputs when asked (`return_offsets_mapping=True`
# for token classification, ...): `model(**tokenizer(...))` passes them on, and Hugging Face's
# forward swallows them. Taken and ignored; any other unknown name is refused.
TOKENIZER_ONLY_OUTPUTS = frozenset(
    {
        "special_tokens_mask",
        "offset_mapping",
        "length",
        "overflow_to_sample_mapping",
        "num_truncated_tokens",
        "overflowing_tokens",
    }
)


class ModelOutput(dict):
    """The model's outputs by field name, like Hugging Face's ModelOutput: `out.logits`,
    `out["logits"]`, `out[0]` and `out[:2]` (a tuple, as Hugging Face's) all work; `out.loss`
    and the per-layer tuples are None, as HF's are when not asked for."""

    def __getattr__(self, name: str) -> torch.Tensor | None:
        try:
            return self[name]
        except KeyError:
            if name in _NONE_FIELDS:
                return None
            raise AttributeError(name) from None

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())


class _BlockCheck:
    """The range check of one block of static inputs, on the device: (min, max) of every row
    (one input each) in one reduction, then every id clamped into its table in one kernel,
    so the run reads no memory it does not own. The (min, max) pairs then go to the host
    without blocking it; `_raise_if_checks_failed` reads them after the replay is queued.
    Two kernels and a copy whatever the number of inputs (one reduction and one clamp per
    input cost two launches each, on the host's critical path before the replay). Where the
    bucket has a graph, these are its first nodes (`_BucketRunner.capture`): no launch at
    all before the replay."""

    def __init__(self, block: torch.Tensor, checked: list[tuple[str, int, int]]):
        self.block = block
        self.checked = checked  # (input, its table's size, its row in the block)
        rows = block.shape[0]
        info = torch.iinfo(block.dtype)
        low = torch.full((rows, 1, 1), info.min, dtype=block.dtype)
        high = torch.full((rows, 1, 1), info.max, dtype=block.dtype)
        for _, size, row in checked:
            low[row], high[row] = 0, size - 1
        self.low, self.high = low.to(block.device), high.to(block.device)
        self.found = torch.empty((2, rows), dtype=block.dtype, device=block.device)
        self._found_rows = tuple(self.found.unbind(0))  # aminmax's out=, made once
        on_cuda = block.device.type == "cuda"
        self.found_host = self.found.cpu().pin_memory() if on_cuda else self.found

    @classmethod
    def of(cls, block: torch.Tensor, names: list[str], ranges: Mapping[str, int], shared: dict):
        """The check of `block`, or None. Its bounds and result buffers are the same for every
        bucket's block of these inputs: made once, kept in `shared` (one model's calls hold
        its lock until they have read the results, so the buckets can share them)."""
        key = (block.dtype, tuple(names))
        if key not in shared:
            checked = [(n, ranges[n], row) for row, n in enumerate(names) if n in ranges]
            shared[key] = cls(block, checked) if checked else None
        if shared[key] is None:
            return None
        check = copy.copy(shared[key])
        check.block = block
        return check

    def run(self) -> None:
        torch.aminmax(self.block.view(self.block.shape[0], -1), dim=1, out=self._found_rows)
        self.block.clamp_(self.low, self.high)
        if self.found_host is not self.found:
            self.found_host.copy_(self.found, non_blocking=True)


class _BucketRunner:
    """One bucket: its static input buffers, its graph and, on CUDA, a pinned host twin of
    the input buffers. The buffers of one dtype are rows of one block (kernl's encoders take
    int64 alone), so inputs from the CPU go in with one copy."""

    def __init__(
        self,
        bucket: Bucket,
        executor: Executor,
        manifest: Manifest,
        device,
        ranges: Mapping[str, int] | None = None,
        shared_checks: dict | None = None,
    ):
        self.bucket = bucket
        self.executor = executor
        shape = (bucket.batch, bucket.seq)
        by_dtype: dict[str, list] = {}
        for spec in manifest.inputs:
            by_dtype.setdefault(spec.dtype, []).append(spec)
        # (block on the device, where CPU inputs are padded: the block itself on the CPU, a
        # pinned twin on CUDA, copied in without blocking the host)
        self.blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_names: list[list[str]] = []  # the input held by each row of each block
        self.checks: list[_BlockCheck] = []  # the range check of inputs from the device
        static, host = {}, {}
        for dtype, specs in by_dtype.items():
            block = torch.empty((len(specs), *shape), dtype=getattr(torch, dtype), device=device)
            twin = block if device.type == "cpu" else block.cpu().pin_memory()
            self.blocks.append((block, twin))
            self.block_names.append([spec.name for spec in specs])
            for spec, buf, staged in zip(specs, block.unbind(0), twin.unbind(0)):
                buf.fill_(spec.pad_value)
                static[spec.name], host[spec.name] = buf, staged
            check = _BlockCheck.of(
                block,
                self.block_names[-1],
                ranges or {},
                {} if shared_checks is None else shared_checks,
            )
            if check is not None:
                self.checks.append(check)
        self.static_inputs = {spec.name: static[spec.name] for spec in manifest.inputs}
        self.host_inputs = {spec.name: host[spec.name] for spec in manifest.inputs}
        # Marks the copy out of the twins: they are rewritten only once it has read them.
        self.staged = torch.cuda.Event() if device.type == "cuda" else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_outputs: list[torch.Tensor] | None = None
        self.checks_in_graph = False  # the range checks are the graph's first nodes
        # What a default-filled static buffer holds now (inputs copied in on the device).
        self.filled: dict[str, tuple] = {}
        self._row_views: dict[tuple[int, int, int], torch.Tensor] = {}  # see block_rows

    def capture(
        self, pool, checked: torch.cuda.Event | None = None, edit=None, warmups: int = 1
    ) -> None:
        """Captures the bucket's graph. Given `checked` (an event made with `external=True`),
        the range checks of the static blocks go into the graph ahead of the model, and the
        graph records `checked` once their results are on the host: the caller then launches
        nothing but its inputs' copy before the replay, and waits on `checked`, not on the
        whole graph, before it raises on a bad id. `edit`: see `capture_graph`. `warmups`:
        runs before the capture; the model's first capture needs one (below), later ones
        none."""
        in_graph = checked is not None and bool(self.checks)

        def run() -> list[torch.Tensor]:
            if in_graph:
                for check in self.checks:
                    check.run()
                checked.record()
            return self.executor.run(self.static_inputs)

        self.graph, self.static_outputs = capture_graph(
            run, pool, warmups=warmups, device=self.executor.device, edit=edit
        )
        self.checks_in_graph = in_graph

    def block_rows(self, block: torch.Tensor, rows: slice, cached: bool = True) -> torch.Tensor:
        """`block[rows]`, a view made once per block and rows (`cached`), not per call."""
        if not cached:
            return block[rows]
        key = (block.data_ptr(), rows.start, rows.stop)
        view = self._row_views.get(key)
        if view is None:
            view = self._row_views[key] = block[rows]
        return view

    def run(self) -> list[torch.Tensor]:
        if self.graph is not None:
            self.graph.replay()
            return self.static_outputs
        return self.executor.run(self.static_inputs)


# The loaded models of this process, for a forked child (see `new_call_lock`).
_LIVE_MODELS: weakref.WeakSet = weakref.WeakSet()


def new_call_lock(model) -> threading.Lock:
    """The lock that serialises `model`'s calls. A fork copies a lock as it is: forked while
    another thread held it (a call running, a stream open), the child's model stayed locked
    for good (gunicorn --preload, 2026-12-05). So a forked child gets every live model's lock
    fresh, and no thread of its own holds one."""
    _LIVE_MODELS.add(model)
    return threading.Lock()


def _fresh_locks_in_child() -> None:
    for model in list(_LIVE_MODELS):
        model._lock = threading.Lock()
        if hasattr(model, "_streaming_thread"):
            model._streaming_thread = None
            model._batch_threads = frozenset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_locks_in_child)


def refuse_pickling(model) -> None:
    """A loaded model's __reduce__ (pickle, copy): it holds device buffers, captured graphs
    and a lock. pickle's own "cannot pickle '_thread.lock' object" did not say what to do."""
    raise TypeError(
        f"a loaded kernl model ({type(model).__name__}) cannot be pickled or copied: it holds "
        "device buffers, graphs and a lock. Load the artifact in each process "
        "(kernl.runtime.load(path)) instead of sending the model"
    )


class CompiledModel:
    """Callable with the model's own keyword inputs; see `kernl.runtime.load`."""

    __reduce__ = refuse_pickling

    # Where a bucket has a graph, its range checks are in it (a benchmark sets this false on
    # the class to load a model with the checks launched by each call, for comparison).
    _checks_in_graph = True
    # The range check's copy to the host beside each graph's path rather than on it
    # (graph_edges.py): BERT-base fp16 calls 1.5-4% faster at 1x16 and 1x128, level at
    # larger shapes (H200, 2026-12-02).
    _side_work_off_path = True
    # ... and cuBLAS's memsets too: off, they slowed 32x128 by 1.3-1.6% (two runs).
    _memsets_off_path = False
    # cuBLAS's memset nodes as fill kernels (memset_nodes.py): on an H200 a memset node cost
    # 2.98 µs of GPU time against 1.06 for the kernel, and twelve of them 13.8 µs of the
    # graph's launch (2026-12-04); BERT-base's M = 4096 buckets have twelve.
    _memsets_as_kernels = True
    # A warm-up run before every capture rather than before the model's first only. The first
    # run of a model makes what a capture must not (cuBLAS's handles, the lazy CUDA state of
    # this thread and stream); the kernel binaries are loaded by load() itself, and every
    # allocation of a capture comes from the graphs' pool. A warm-up per capture was 9 of the
    # 18 executor runs of a 9-bucket cold load(): 0.57 s of them against 0.45 s with one
    # (BERT-base, H200, 2026-12-02, medians of three fresh processes; outputs bitwise equal).
    _warmup_every_capture = False
    # A call whose bucket has a graph runs without the launcher context (a replay launches
    # nothing from Python) and without a device switch where its device is already the
    # current one, and stacks its inputs into views of the blocks made once. False: every
    # call under `running_with`, as until 2026-12-03 (for the same-run comparison of
    # benchmarks/diag_host_path.py --ab). On the H200 the context took 17 µs and the
    # copy in 46-52 µs of the ~100 µs a small call spends before its replay starts.
    _lean_call = True

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
        self._lean = self._lean_call  # this model's, whatever the class says later
        # the device's index, compared with the current device's by each call
        self._device_index = (
            (device.index if device.index is not None else torch.cuda.current_device())
            if device.type == "cuda"
            else None
        )
        self._binaries = binaries
        self.weights = weights
        self.capture_mode = capture if device.type == "cuda" else "never"
        self._lock = new_call_lock(self)
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
        self._positional, self._order_hint = _positional_order(manifest, self._inputs)
        self._ignores_token_types = (
            "token_type_ids" not in self._inputs and manifest.model_type in NO_TOKEN_TYPES
        )
        self._output_names = self.output_names
        self._bucket_of: dict[tuple[int, int], Bucket] = {}
        # Marks the copy of the device-side range check's results to the host, recorded by
        # the call or, where the checks are in the bucket's graph, by the graph.
        self._checked, external = _check_event() if device.type == "cuda" else (None, False)
        # What each capture puts in the graph: the checks with the event recorded after them
        # (None: the checks stay per call), and an edit of the captured graph (or None).
        self._graph_event = self._checked if external and self._checks_in_graph else None
        side_work = self._graph_event is not None or self._memsets_off_path  # anything to move
        side_work = side_work and self._side_work_off_path
        fills = self._memsets_as_kernels and device.type == "cuda"
        self._graph_edit = self._capture_edit(side_work, fills) if side_work or fills else None
        self.side_edges_removed = 0  # by _graph_edit, over every capture
        self.memsets_replaced = 0  # memset nodes that became fill kernels, over every capture
        self.side_work_error: str | None = None  # why an edit was given up, if one was
        self._warmed_up: set[int] = set()  # the threads whose capture of this model warmed up
        shared_checks: dict = {}  # the range checks' bounds and buffers, one set per dtype
        self._runners = {
            p.bucket: _BucketRunner(
                p.bucket,
                Executor(p, weights, device),
                manifest,
                device,
                self._ranges,
                shared_checks,
            )
            for p in programs
        }
        # Smallest first: a call takes the first bucket that holds it.
        self.buckets: list[Bucket] = sorted(self._runners, key=lambda b: (b.tokens, b.batch))
        if self.capture_mode == "load":
            # Largest first, so smaller graphs reuse the pool's blocks.
            with running_with(self._binaries, device):
                for bucket in sorted(self.buckets, key=lambda b: -b.tokens):
                    self._capture(self._runners[bucket])

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
            inputs = _positional(args, inputs, self._positional, self._order_hint)
        return_dict = _hf_call_options(inputs)
        if return_dict is False:
            return self(**inputs).to_tuple()
        tensors = self._check_inputs(inputs)
        batch, seq = tensors["input_ids"].shape
        try:
            bucket = self.select_bucket(batch, seq)
        except ValueError as e:
            fits = lambda s: pick_bucket(self.buckets, batch, s) is not None  # noqa: E731
            hint = _padding_hint(tensors.get("attention_mask"), seq, fits)
            raise ValueError(f"{e}{hint}") from None
        runner = self._runners[bucket]
        on_device = self._on_device(tensors)
        with self._lock, self._call_context(runner):
            if runner.graph is None and self.capture_mode == "lazy":
                self._capture(runner)  # on its static buffers
            checked_later = on_device or runner.checks_in_graph
            if on_device:
                self._copy_in_device(runner, tensors, batch, seq)
            else:
                self._copy_in_host(runner, tensors, batch, seq, check=not checked_later)
            outs = runner.run()
            result = ModelOutput()
            if batch == runner.bucket.batch and seq == runner.bucket.seq:
                for name, t in zip(self._output_names, outs):
                    result[name] = t.clone()
            else:
                for (name, index), t in zip(self._slices(batch, seq), outs):
                    result[name] = t[index].clone()
            if checked_later:
                # Waits for the range check only, queued before (or as the first nodes of)
                # the replay: the GPU is busy with the model meanwhile. Out-of-range ids were
                # clamped on their way in, so the graph read no memory it does not own; its
                # outputs are dropped here.
                _raise_if_checks_failed(runner.checks, self._checked if runner.checks else None)
        return result

    def _call_context(self, runner: _BucketRunner):
        """What a call runs under. Without a graph (none captured yet, or CPU mode) the
        executor launches kernels: the model's device and its binaries as the launcher. A
        replay launches nothing from Python; the model's device must still be the current
        one (the events and the copies from pinned memory go to the current stream), which
        in a one-GPU process it already is."""
        if runner.graph is None or not self._lean:
            return running_with(self._binaries, self.device)
        if torch.cuda.current_device() != self._device_index:
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def _capture(self, runner: _BucketRunner) -> None:
        # cuBLAS's handles are per thread: a lazy capture from a thread that has not run
        # this model yet warms up again.
        thread = threading.get_ident()
        warm = self._warmup_every_capture or thread not in self._warmed_up
        runner.capture(self._pool, self._graph_event, self._graph_edit, warmups=int(warm))
        self._warmed_up.add(thread)  # (the event the edit looks for is recorded by then too)

    def _capture_edit(self, side_work: bool, fills: bool):
        """The edit of each captured graph before it is instantiated: cuBLAS's memset nodes as
        fill kernels (memset_nodes.py, `_memsets_as_kernels`), then the side work off its path
        (graph_edges.py, `_side_work_off_path`)."""
        from .graph_edges import take_side_work_off_path
        from .memset_nodes import memsets_as_kernels

        ours = set()
        if self._binaries is not None:
            ours = {loaded.function.value for loaded in self._binaries.loaded.values()}
        # The model holds this edit: a strong reference back would make a cycle that only gc
        # frees, and `del model` would keep its GPU memory (graphs, pool, weights) until then.
        owner_ref = weakref.ref(self)

        def edit(graph) -> None:
            owner = owner_ref()
            if owner is None:
                return
            if fills:
                try:
                    owner.memsets_replaced += memsets_as_kernels(graph, owner.device)
                except (OSError, AttributeError, RuntimeError, TypeError) as e:
                    # a driver without these calls or one that refuses one: the memsets stay
                    # (a fill added before its memset's removal failed only writes twice)
                    owner.side_work_error = f"{type(e).__name__}: {e}"
            if not side_work:
                return
            # the event exists once recorded: by the first warm-up, before this runs
            event = owner._graph_event
            side = {event.cuda_event} if event is not None else set()
            memsets = owner._memsets_off_path
            try:
                owner.side_edges_removed += take_side_work_off_path(graph, ours, side, memsets)
            except (OSError, AttributeError, RuntimeError) as e:
                # a driver without these calls, or one that refuses a query: the graph as
                # captured, still right (edges are added before any is removed, so a partial
                # edit only orders more)
                owner.side_work_error = f"{type(e).__name__}: {e}"

        return edit

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

    def _copy_in_host(
        self, runner, tensors: dict[str, torch.Tensor], batch: int, seq: int, check: bool
    ) -> None:
        """Inputs on the CPU: range-check them (unless `check` is false: the bucket's graph
        checks its buffers itself), pad them on the host (into the pinned twin of the static
        buffers on CUDA), then one copy that does not block the host."""
        for name, t in tensors.items():
            size = self._ranges.get(name) if check else None
            if size is not None:
                lo, hi = torch.aminmax(t)
                _raise_if_out_of_range([(name, size, 0)], [[int(lo)], [int(hi)]])
        if runner.staged is not None:
            runner.staged.synchronize()  # the previous call's copy has read the twin
        exact = batch == runner.bucket.batch and seq == runner.bucket.seq
        for (_, twin), names in zip(runner.blocks, runner.block_names):
            srcs = [tensors.get(name) for name in names]
            if exact and all(src is not None and src.dtype == twin.dtype for src in srcs):
                torch.stack(srcs, out=twin)  # one op for a tokenizer's whole output
                continue
            for name, src in zip(names, srcs):
                spec, buf = self._inputs[name], runner.host_inputs[name]
                region = buf if exact else buf[:batch, :seq]
                if not exact:
                    buf.fill_(spec.pad_value)
                if src is not None:
                    region.copy_(src)
                else:
                    region.fill_(1 if spec.default == "ones" else 0)
                if name == "attention_mask" and batch < runner.bucket.batch:
                    # Rows that only pad the batch attend to everything: no fully masked
                    # softmax (NaN) anywhere, and real rows never see them.
                    buf[batch:].fill_(1)
        runner.filled.clear()  # every static buffer is rewritten (on the CPU, right here)
        if runner.staged is not None:  # on the CPU the twins are the static buffers
            for block, twin in runner.blocks:
                block.copy_(twin, non_blocking=True)
            runner.staged.record()

    def _copy_in_device(self, runner, tensors: dict[str, torch.Tensor], batch: int, seq: int):
        """Inputs on the device: copied in and range-checked there (by the bucket's graph
        where its checks are in it), without blocking the host. An id outside its table is
        clamped into it (an embedding lookup out of bounds is a device-side fault that ends
        the CUDA context) and reported after the replay by _raise_if_checks_failed.

        Each launch here is host time before the replay, which the caller waits through: a
        call of the bucket's exact shape goes in with one stack per block, of the rows it gives
        (a tokenizer's output moved to the GPU: all of them; `input_ids` and `attention_mask`
        alone: two rows, the third keeping the default it got at the last call of this
        shape), then one check per block."""
        exact = batch == runner.bucket.batch and seq == runner.bucket.seq
        for (block, _), names in zip(runner.blocks, runner.block_names):
            srcs = [tensors.get(name) for name in names]
            rows = _stackable_rows(runner, block, names, srcs, batch, seq) if exact else None
            if rows is not None:
                torch.stack(srcs[rows], out=runner.block_rows(block, rows, self._lean))
                for name in names[rows]:
                    runner.filled.pop(name, None)
                continue
            for name, src in zip(names, srcs):
                self._copy_row_in(runner, name, src, batch, seq, exact)
        if runner.checks_in_graph:
            return
        for check in runner.checks:
            check.run()
        if runner.checks and self._checked is not None:
            self._checked.record()  # read before the lock is released: one serves all calls

    def _copy_row_in(self, runner, name: str, src, batch: int, seq: int, exact: bool) -> None:
        """One input into its static buffer on the device: the call's values (or its default)
        in the top-left corner, the pad value around them."""
        spec, buf = self._inputs[name], runner.static_inputs[name]
        if src is None:
            key = ("default", batch, seq)
            if runner.filled.get(name) != key:  # else it holds this default from the last call
                buf.fill_(spec.pad_value)
                buf[:batch, :seq].fill_(1 if spec.default == "ones" else 0)
                runner.filled[name] = key
        else:
            runner.filled.pop(name, None)
            if src.device != buf.device:
                src = src.to(buf.device)
            if not exact:
                buf.fill_(spec.pad_value)
            (buf if exact else buf[:batch, :seq]).copy_(src, non_blocking=True)
        if name == "attention_mask" and batch < runner.bucket.batch:
            buf[batch:].fill_(1)  # as in _copy_in_host

    def _check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Types, devices and shapes of the call's inputs (their ranges are checked where they
        are copied in)."""
        if not inputs.keys() <= self._inputs.keys():
            # None is HF's "not given" (position_ids=None, head_mask=None): taken as such
            unknown = sorted(
                k
                for k in inputs
                if k not in self._inputs
                and inputs[k] is not None
                and k not in TOKENIZER_ONLY_OUTPUTS
                and not (k == "token_type_ids" and self._ignores_token_types)
            )
            if unknown:
                why = ""
                if "labels" in unknown:  # a training loop's call, or a pipeline's eval
                    why = " (kernl serves inference: it computes no loss; compute it from the outputs)"
                raise TypeError(
                    f"unexpected input(s) {unknown}; this model takes {self.input_names}{why}"
                )
            inputs = {k: v for k, v in inputs.items() if k in self._inputs}
        tensors: dict[str, torch.Tensor] = {}
        # Per call, on the host before the replay (7-9 µs of a small call's ~40, H200,
        # 2026-12-03): the tensor's flags rather than a `torch.device` made per input, one
        # set lookup for the dtype.
        on_cuda_ok = self.device.type == "cuda"
        for name, value in inputs.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                value = input_tensor(name, value)
            if not (value.is_cpu or (on_cuda_ok and value.is_cuda)):
                if value.device.type not in ("cpu", self.device.type):
                    raise ValueError(
                        f"input {name!r} is on {value.device}; this model runs on {self.device} "
                        "and takes tensors on the CPU"
                        + (f" or on {self.device.type}" if self.device.type != "cpu" else "")
                    )
            if value.ndim != 2:
                raise ValueError(
                    f"input {name!r} must have 2 dimensions (batch, sequence), "
                    f"got shape {tuple(value.shape)}"
                )
            dtype = value.dtype
            not_integer = _NOT_INTEGER.get(dtype)
            if not_integer is None:
                not_integer = _NOT_INTEGER[dtype] = (
                    dtype.is_floating_point or dtype.is_complex or dtype == torch.bool
                )
            if not_integer:
                if name != "attention_mask" or dtype.is_complex:
                    # bool ids too: eager's embedding refuses them, and a mask passed where
                    # the ids go is caught here rather than served as ids 0 and 1
                    raise TypeError(f"input {name!r} must hold integers, got {dtype}")
                if dtype != torch.bool:
                    value = _float_mask(value)
            elif dtype in _WIDE_UNSIGNED:  # torch has no min/max for them: checked as int64
                value = value.long()
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


_WIDE_UNSIGNED = frozenset(
    getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)
)


def _float_mask(mask: torch.Tensor) -> torch.Tensor:
    """A float attention_mask as the boolean one it means. Only 0 and 1 are taken: models
    differ on other values (BERT keeps any nonzero key; ESM and DeBERTa weigh keys by them),
    and an integer mask holding them is refused by the range check alike."""
    keep = mask != 0
    if (keep & (mask != 1)).any():
        if mask.isnan().any():
            raise ValueError("attention_mask must hold 0 and 1 only, and it holds NaN")
        lo, hi = mask.aminmax()
        raise ValueError(
            f"attention_mask must hold 0 and 1 only, got values in [{lo.item():g}, {hi.item():g}]"
        )
    return keep


def input_tensor(name: str, value: Any) -> torch.Tensor:
    """A call's input that is not a tensor (a numpy array, nested lists) as one."""
    try:
        return torch.as_tensor(value)
    except ValueError as e:
        if "negative" in str(e) and hasattr(value, "copy"):  # a reversed numpy view
            return torch.as_tensor(value.copy())
        raise TypeError(f"input {name!r} cannot be made a tensor: {e}") from e
    except Exception as e:
        raise TypeError(f"input {name!r} must be a tensor, not {type(value)} ({e})") from e


def _hf_call_options(inputs: dict[str, Any]) -> bool | None:
    """Hugging Face's call options, taken out of `inputs`: `return_dict` (returned: False
    gives a tuple), `output_attentions` and `output_hidden_states` when off (nothing but the
    outputs is kept, so asking for them is refused by name), and `use_cache` (meaningless
    for an encoder, as in HF)."""
    if not inputs.keys() & _HF_CALL_OPTIONS:
        return None
    for name in ("output_attentions", "output_hidden_states"):
        if inputs.pop(name, None):
            raise ValueError(
                f"{name}=True: a kernl artifact returns the model's outputs only (its graphs "
                "keep no intermediate attentions or hidden states)"
            )
    use_cache = inputs.pop("use_cache", None)  # an encoder has no cache: either is served
    if use_cache is not None and not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be True, False or None, got {use_cache!r}")
    return_dict = inputs.pop("return_dict", None)
    if return_dict is not None and not isinstance(return_dict, bool):
        raise TypeError(f"return_dict must be True, False or None, got {return_dict!r}")
    return return_dict


_HF_CALL_OPTIONS = frozenset(
    {"return_dict", "output_attentions", "output_hidden_states", "use_cache"}
)


def _padding_hint(mask, seq: int, fits) -> str:
    """Where a call too long for every bucket is too long only by its padding (a tokenizer's
    padding="max_length"): what to pass instead. `fits(seq)`: whether a bucket takes the
    call's batch at that length. Only on this error path (it reads the mask)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.numel() == 0:
        return ""
    real = int((mask != 0).sum(dim=1).max())
    if not 0 < real < seq or not fits(real):
        return ""
    return (
        f"; its attention_mask marks at most {real} real tokens a row: pad to the longest "
        "text (tokenizer(..., padding=True)) rather than to a fixed max_length"
    )


def _positional_order(manifest: Manifest, served) -> tuple[list[str], str]:
    """The order a call's positional inputs are read in: the model's own where the compiler
    recorded it (POSITIONAL_INPUTS_KEY), else HF's usual one. A name there that the artifact
    does not serve (RoCBert's input_shape_ids) is refused when given as other than None. With
    it, what a call of too many positional inputs is told beyond their number."""
    order = manifest.extra.get(POSITIONAL_INPUTS_KEY)  # checked with the manifest (checks.py)
    if order is None and manifest.model_type in _UNUSUAL_ORDER:
        return ["input_ids"], _ORDER_NOT_RECORDED  # from before the order was recorded: above
    if order is None:
        return [n for n in POSITIONAL_INPUTS if n in served], ""
    return list(order), ""


_ORDER_NOT_RECORDED = (
    ": this artifact does not record its forward's order (compiled by an older kernl), and "
    "this family's forward does not take (input_ids, attention_mask, token_type_ids) in that "
    "order. Pass the other inputs by name (attention_mask=...), or recompile it"
)


def _positional(
    args: tuple, inputs: dict[str, Any], order: list[str], hint: str = ""
) -> dict[str, Any]:
    # HF's later positional inputs (position_ids, head_mask, ...) as None: "not given" there,
    # as by name (`model(ids, mask, None, None)`)
    while len(args) > len(order) and args[-1] is None:
        args = args[:-1]
    if len(args) > len(order):
        raise TypeError(
            f"this model takes at most {len(order)} positional input(s) ({', '.join(order)}); "
            f"got {len(args)}{hint}"
        )
    named = dict(inputs)
    for name, value in zip(order, args):
        if name in named:
            raise TypeError(f"input {name!r} given both positionally and by name")
        if value is not None:  # None: not given, as HF takes it (its later positional inputs)
            named[name] = value
    return named


# dtype -> whether an input holding it is refused (floating point, complex), as first seen
_NOT_INTEGER: dict[torch.dtype, bool] = {}


def _stackable_rows(
    runner: _BucketRunner, block: torch.Tensor, names: list[str], srcs: list, batch: int, seq: int
) -> slice | None:
    """The rows of `block` one stack can fill with the call's inputs: those given, if they are
    consecutive rows, of the block's dtype and device, and every other row of the block still
    holds its default for this shape. None: row by row."""
    given = [i for i, src in enumerate(srcs) if src is not None]
    if not given or given[-1] - given[0] + 1 != len(given):
        return None
    if any(srcs[i].dtype != block.dtype or srcs[i].device != block.device for i in given):
        return None
    rows = slice(given[0], given[-1] + 1)
    default = ("default", batch, seq)
    if any(runner.filled.get(name) != default for i, name in enumerate(names) if srcs[i] is None):
        return None
    return rows


def _raise_if_out_of_range(
    checked: list[tuple[str, int, int]], found: torch.Tensor | list[list[int]]
) -> None:
    """`checked` holds (input, its table's size, its column in `found`); `found` holds the
    minima in its first row, the maxima in its second."""
    lows, highs = found.tolist() if isinstance(found, torch.Tensor) else found
    for name, size, row in checked:
        lo, hi = lows[row], highs[row]
        if lo < 0 or hi >= size:
            raise ValueError(f"{name} must lie in [0, {size}); got values in [{lo}, {hi}]")


def _raise_if_checks_failed(checks: list[_BlockCheck], done: torch.cuda.Event | None) -> None:
    """After the replay is queued: waits for the device-side checks' results (`done` marks
    their copy to the host; None: they are already there) and raises on the first bad input."""
    if done is not None:
        done.synchronize()
    for check in checks:
        _raise_if_out_of_range(check.checked, check.found_host)


def _check_event() -> tuple[torch.cuda.Event, bool]:
    """The event that marks the range checks' results on the host, and whether a graph can
    record it as one of its nodes (an external event; a torch without them gets a plain one,
    and the checks stay out of the graphs)."""
    try:
        return torch.cuda.Event(external=True), True
    except TypeError:
        return torch.cuda.Event(), False


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
