"""What a program does with the weights it is shipped with, found before anything runs.

A program is replayed on PyTorch's `meta` device: every tensor has its real shape, dtype and
storage but no data, so each instruction's output shape is computed by torch's own shape
rules (and kernl's ops by the rules below) at the cost of a few microseconds, with nothing
allocated. The walk checks what hashes cannot:

- shapes: weights are what the program declared (meta.values) and what its ops accept; no
  tensor over `ReadLimits.max_tensor_elements` (a broadcast to 4 TiB is refused like an
  `aten.full` of 4 TiB); sizes that come from a computed value are refused (they are bounded
  by nothing);
- bounds: every index fed to a gather (embedding, index_select, gather, index,
  kernl.bert_embeddings) provably lies inside the table it indexes. Integer values carry an
  interval: inputs from the manifest (input_ids within model_config.vocab_size and its pad
  value), integer weights from their actual values (position_ids filled with 1e9 is refused),
  propagated through views, copies and simple arithmetic; an index whose range is unknown is
  refused;
- writes: an in-place op (`fill_`, `copy_`, any `*_`) or `out=` whose target shares storage
  with a weight or a static input is refused (weights are shared by every bucket), and no
  output may hold memory from `aten.empty*` that nothing initialised;
- memory: activations alive at once, freed as the runtime's executor frees them (after
  their last use), so the memory plan (memory.py) knows each bucket's pool before load.

Imports torch, lazily: shape rules are torch's, and an artifact checker that guessed them
would accept what torch refuses at the first call."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ArtifactCorruptError, ArtifactUnsafeError
from .limits import DEFAULT_LIMITS, ReadLimits
from .program import Program, iter_value_refs
from .schema import NEWER_KERNL_HINT, Manifest
from .shape_rules import aten_result
from .vocabulary import KERNL_NAME, is_in_place, split_aten, written_arguments

Interval = tuple[int, int]

# safetensors dtype -> torch dtype name
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_DTYPE_ARGS = (
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
)
_MEMORY_FORMATS = ("contiguous_format", "preserve_format")

# ops whose `size` argument is a list of static ints: op -> positional index
_SIZE_ARG = {
    "empty": 0,
    "zeros": 0,
    "ones": 0,
    "full": 0,
    "empty_strided": 0,
    "new_empty": 1,
    "new_zeros": 1,
    "new_ones": 1,
    "new_full": 1,
    "new_empty_strided": 1,
    "expand": 1,
    "repeat": 1,
    "view": 1,
    "reshape": 1,
    "_unsafe_view": 1,
    "as_strided": 1,
}
_UNINITIALISED = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}
# ops that read their tensor argument only for its shape, dtype and device
_SHAPE_ONLY = {
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "new_empty",
    "new_zeros",
    "new_ones",
    "new_full",
    "new_empty_strided",
}
# integer ops whose values are those of their first tensor argument (views, copies, casts)
# Overloads of max/min that reduce (the others, `other` and `out`, are elementwise).
_REDUCTIONS = {"default", "dim", "dim_max", "names_dim", "names_dim_max", "unary_out"}
_SAME_VALUES = {
    "slice",
    "select",
    "view",
    "reshape",
    "_unsafe_view",
    "expand",
    "expand_as",
    "unsqueeze",
    "squeeze",
    "permute",
    "transpose",
    "t",
    "alias",
    "detach",
    "clone",
    "contiguous",
    "lift_fresh_copy",
    "flatten",
    "unflatten",
    "repeat",
    "to",
    "_to_copy",
    "type_as",
    "split",
    "chunk",
    "unbind",
    "split_with_sizes",
    "unsafe_split",
    "max",
    "min",
    "as_strided",
    "tril",
    "triu",
}
_GATHERS = {"embedding", "index_select", "gather", "index"}


@dataclass(frozen=True)
class WeightInfo:
    """A tensor of weights.safetensors as the header describes it; `values` is the [min, max]
    of an integer tensor small enough to read (None otherwise)."""

    shape: tuple[int, ...]
    dtype: str  # torch dtype name
    nbytes: int
    values: Interval | None = None


@dataclass(frozen=True)
class ProgramUsage:
    """Device memory one bucket needs beyond the weights."""

    inputs: int  # static input buffers
    outputs: int  # the outputs a captured graph keeps
    peak: int  # activations alive at once (outputs included) while the program runs


class _Fail(Exception):
    """A finding inside the walk; turned into the ArtifactError named by `unsafe`."""

    def __init__(self, message: str, unsafe: bool = True):
        super().__init__(message)
        self.unsafe = unsafe


def input_ranges(manifest: Manifest) -> dict[str, tuple[Interval, str]]:
    """What each input can hold at a call: the runtime refuses input_ids outside
    [0, vocab_size), token_type_ids outside [0, type_vocab_size) and masks other than 0/1
    (kernl/runtime/model.py); padding adds the pad value. Other inputs: their dtype's range."""
    from .checks import INPUT_DTYPES, TABLE_SIZES

    config = manifest.model_config if isinstance(manifest.model_config, dict) else {}
    out: dict[str, tuple[Interval, str]] = {}
    for spec in manifest.inputs:
        lo, hi = INPUT_DTYPES[spec.dtype]
        rng, why = (lo, hi - 1), f"{spec.dtype} input {spec.name!r}"
        key = TABLE_SIZES.get(spec.name)
        size = config.get(key) if key else None
        if spec.name == "attention_mask":
            rng, why = (0, 1), "input 'attention_mask' (0/1)"
        elif isinstance(size, int) and not isinstance(size, bool) and size > 0:
            rng, why = (0, size - 1), f"input {spec.name!r} (model_config.{key}={size})"
        elif key:
            why += f" (model_config.{key} is missing, so calls are not range-checked)"
        fill = {"zeros": 0, "ones": 1}.get(spec.default, spec.pad_value)
        lo, hi = min(rng[0], spec.pad_value, fill), max(rng[1], spec.pad_value, fill)
        if (lo, hi) != rng:
            why += f" padded with {spec.pad_value}"
        out[spec.name] = ((lo, hi), why)
    return out


def analyse_program(
    program: Program,
    manifest: Manifest,
    weights: dict[str, WeightInfo],
    where: str,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> ProgramUsage:
    """Walk `program` on the meta device for its bucket; raises ArtifactUnsafeError or
    ArtifactCorruptError naming the instruction. Assumes check_program and the vocabulary
    check passed (value ids in range, defined before use, op names known)."""
    walk = _Walk(program, manifest, weights, limits)
    try:
        walk.check_declared_weights()
        walk.run()
        walk.check_outputs()
    except _Fail as e:
        cls = ArtifactUnsafeError if e.unsafe else ArtifactCorruptError
        raise cls(f"{where}: {e}") from None
    return walk.usage()


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class _Walk:
    def __init__(self, program: Program, manifest: Manifest, weights, limits: ReadLimits):
        import torch

        self.torch = torch
        self.meta = torch.device("meta")
        self.p = program
        self.manifest = manifest
        self.weights = weights
        self.limits = limits
        self.env: list[Any] = [None] * program.num_values
        self.ranges: dict[int, Interval] = {}
        self.sources: dict[int, str] = {}
        self.storage_bytes: dict[int, int] = {}
        self.storage_refs: dict[int, int] = {}
        self.fixed: dict[int, str] = {}  # storage -> "weight 'x'" / "input 'y'"
        self.uninitialised: set[int] = set()
        self.live = 0
        self.peak = 0
        self.input_bytes = 0

    # -- setup ---------------------------------------------------------------------------

    def check_declared_weights(self) -> None:
        values = self.p.meta.get("values") if isinstance(self.p.meta, dict) else None
        values = values if isinstance(values, dict) else {}
        for vid, name in self.p.weights.items():
            info = self.weights[name]
            declared = values.get(vid, values.get(str(vid)))
            if not (isinstance(declared, list) and len(declared) == 2):
                raise _Fail(
                    f"weight {name!r} (value {vid}) has no recorded shape in meta.values; the "
                    "program was not written by kernl-compile (recompile)",
                    unsafe=False,
                )
            shape, dtype = declared
            if shape != list(info.shape) or dtype != info.dtype:
                raise _Fail(
                    f"weight {name!r} is {info.dtype} {list(info.shape)} in the weights file; "
                    f"the program was compiled for {dtype} {shape}",
                    unsafe=False,
                )

    def _bind_fixed(self, vid: int, t, label: str, rng: Interval | None, source: str) -> None:
        self.env[vid] = t
        key = self._key(t)
        self.fixed[key] = label
        if rng is not None:
            self.ranges[vid] = rng
            self.sources[vid] = source

    def setup(self) -> None:
        torch = self.torch
        for vid, name in self.p.weights.items():
            info = self.weights[name]
            t = torch.empty(info.shape, dtype=getattr(torch, info.dtype), device=self.meta)
            rng = info.values if info.values is not None else self._bool_range(t)
            self._bind_fixed(vid, t, f"weight {name!r}", rng, f"weight {name!r}")
        ranges = input_ranges(self.manifest)
        specs = {s.name: s for s in self.manifest.inputs}
        b = self.p.bucket
        for name, vid in self.p.inputs.items():
            spec = specs[name]
            t = torch.empty((b.batch, b.seq), dtype=getattr(torch, spec.dtype), device=self.meta)
            rng, why = ranges[name]
            self._bind_fixed(vid, t, f"input {name!r}", rng, why)
        for spec in self.manifest.inputs:
            self.input_bytes += b.batch * b.seq * getattr(torch, spec.dtype).itemsize

    # -- the walk ------------------------------------------------------------------------

    def run(self) -> None:
        self.setup()
        p = self.p
        keep = set(p.outputs) | set(p.weights) | set(p.inputs.values())
        last_use: dict[int, int] = {}
        for i, ins in enumerate(p.instructions):
            for v in iter_value_refs([ins.args, list(ins.kwargs.values())]):
                last_use[v] = i
        frees: dict[int, list[int]] = {}
        for v, i in last_use.items():
            if v not in keep:
                frees.setdefault(i, []).append(v)
        for i, ins in enumerate(p.instructions):
            try:
                self.step(i, ins)
            except _Fail as e:
                raise _Fail(f"instruction {i} ({ins.op}): {e}", e.unsafe) from None
            except Exception as e:  # arguments of the wrong kind for the checks themselves
                raise _Fail(f"instruction {i} ({ins.op}): malformed ({_short(e)})", False) from None
            for v in frees.get(i, ()):
                self._release(v)

    def step(self, i: int, ins) -> None:
        aten = split_aten(ins.op)
        base = aten[0] if aten else ""
        self._check_static_sizes(base, ins)
        args = [self._decode(a) for a in ins.args]
        kwargs = {k: self._decode(v) for k, v in ins.kwargs.items()}
        self._check_writes(base, ins)
        if base == "as_strided":
            self._check_as_strided(args, kwargs)
        self._check_gathers(ins, base, args, kwargs)
        try:
            if aten:
                fn = getattr(getattr(self.torch.ops.aten, aten[0]), aten[1])
                if kwargs.get("device") is None and any(
                    a.name == "device" and a.kwarg_only for a in fn._schema.arguments
                ):
                    # a factory op without a device would allocate for real on the CPU
                    kwargs["device"] = self.meta
                result = aten_result(self.torch, aten[0], aten[1], args, kwargs)
                if result is None:
                    with self.meta:
                        result = fn(*args, **kwargs)
            else:
                result = KERNL_SHAPES[KERNL_NAME.fullmatch(ins.op).group(1)](*args, **kwargs)
        except _Fail:
            raise
        except Exception as e:
            raise _Fail(
                f"cannot run on bucket {self.p.bucket.name}'s shapes ({_short(e)})", unsafe=False
            ) from None
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        self._forget_written_ranges(ins, args, kwargs)
        reads = [v for v in iter_value_refs([ins.args, list(ins.kwargs.values())])]
        tainted = base not in _SHAPE_ONLY and any(
            self._key(self.env[v]) in self.uninitialised for v in reads if self._is_tensor(v)
        )
        new_keys = []
        for r in results:
            if not isinstance(r, self.torch.Tensor):
                continue
            if r.device.type != "meta":  # every factory is given the meta device above
                raise _Fail(f"made a tensor on {r.device} during the shape check", unsafe=False)
            if r.numel() > self.limits.max_tensor_elements:
                raise _Fail(
                    f"makes a tensor of shape {list(r.shape)} ({r.numel()} elements), more than "
                    f"the {self.limits.max_tensor_elements} a reader allows"
                )
            key = self._key(r)
            if key not in self.storage_bytes and key not in self.fixed:
                self.storage_bytes[key] = r.untyped_storage().nbytes()
                self.storage_refs[key] = 0
                self.live += self.storage_bytes[key]
                new_keys.append(key)
                if base in _UNINITIALISED:
                    self.uninitialised.add(key)
            if tainted:
                self.uninitialised.add(key)
        if is_in_place(ins.op) and not tainted and results:
            target = results[0]
            key = self._key(target)
            if target.numel() * target.element_size() >= self.storage_bytes.get(key, 0):
                self.uninitialised.discard(key)  # fully overwritten
        self.peak = max(self.peak, self.live)
        for which, (o, r) in enumerate(zip(ins.outputs, results)):
            if o is None:
                continue
            self._release(o)
            self.env[o] = r
            if isinstance(r, self.torch.Tensor):
                k = self._key(r)
                if k in self.storage_refs:
                    self.storage_refs[k] += 1
                rng, src = self._range_of(base, ins, args, kwargs, results, which)
                if rng is not None:
                    self.ranges[o], self.sources[o] = rng, src
        for key in new_keys:  # outputs nobody stored (results nobody reads) go at once
            if self.storage_refs.get(key) == 0:
                self._drop_storage(key)

    def check_outputs(self) -> None:
        if self.manifest.task == "causal-lm":
            return
        b = self.p.bucket
        for spec, vid in zip(self.manifest.outputs, self.p.outputs):
            t = self.env[vid]
            if not isinstance(t, self.torch.Tensor):
                raise _Fail(f"output {spec.name!r} is not a tensor", unsafe=False)
            if self._key(t) in self.uninitialised:
                raise _Fail(
                    f"output {spec.name!r} returns uninitialised memory (from aten.empty*, "
                    "never fully written): it would leak whatever the allocator held"
                )
            # Read without running anything: `kernl inspect` shows it, kernl serve prepares
            # its answers' encoding from it.
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype != spec.dtype:
                raise _Fail(
                    f"output {spec.name!r} is {dtype}; the manifest declares {spec.dtype}",
                    unsafe=False,
                )
            for axis, size, what in (
                (spec.batch_axis, b.batch, "batch"),
                (spec.seq_axis, b.seq, "sequence"),
            ):
                if axis is not None and (axis >= t.dim() or t.shape[axis] != size):
                    raise _Fail(
                        f"output {spec.name!r} has shape {list(t.shape)}; the manifest slices "
                        f"axis {axis} as the {what} ({size} in bucket {b.name})",
                        unsafe=False,
                    )

    def usage(self) -> ProgramUsage:
        outputs, seen = 0, set()
        for vid in self.p.outputs:
            t = self.env[vid]
            if isinstance(t, self.torch.Tensor):
                key = self._key(t)
                if key not in seen and key not in self.fixed:
                    outputs += self.storage_bytes.get(key, 0)
                seen.add(key)
        return ProgramUsage(inputs=self.input_bytes, outputs=outputs, peak=self.peak)

    # -- helpers -------------------------------------------------------------------------

    def _key(self, t) -> int:
        return t.untyped_storage()._cdata

    def _forget_written_ranges(self, ins, args: list, kwargs: dict) -> None:
        """An in-place op or an `out=` writes memory whose values had an interval: every value
        over that memory (the target, its views, what it views) has none any more (a
        `fill_(1000)` after `arange(8)` indexed row 1000 of a table taken for [0, 7])."""
        torch = self.torch
        written = written_arguments(ins.op, args, kwargs)
        keys = {self._key(t) for t in written if isinstance(t, torch.Tensor)}
        if not keys:
            return
        for vid in list(self.ranges):
            t = self.env[vid]
            if isinstance(t, torch.Tensor) and self._key(t) in keys:
                del self.ranges[vid]

    def _is_tensor(self, v: int) -> bool:
        return isinstance(self.env[v], self.torch.Tensor)

    def _release(self, vid: int) -> None:
        t = self.env[vid]
        self.env[vid] = None
        self.ranges.pop(vid, None)
        if isinstance(t, self.torch.Tensor):
            key = self._key(t)
            if key in self.storage_refs:
                self.storage_refs[key] -= 1
                if self.storage_refs[key] <= 0:
                    self._drop_storage(key)
        # keep the tensor object for later shape questions about outputs only
        if vid in self.p.outputs:
            self.env[vid] = t

    def _drop_storage(self, key: int) -> None:
        self.live -= self.storage_bytes.pop(key, 0)
        self.storage_refs.pop(key, None)

    def _decode(self, a: Any) -> Any:
        torch = self.torch
        if isinstance(a, list):
            return [self._decode(x) for x in a]
        if isinstance(a, dict):
            ((tag, val),) = a.items()
            if tag == "v":
                return self.env[val]
            if tag == "device":
                return self.meta
            if tag == "dtype" and val in _DTYPE_ARGS:
                return getattr(torch, val)
            if tag == "layout" and val == "strided":
                return torch.strided
            if tag == "memory_format" and val in _MEMORY_FORMATS:
                return getattr(torch, val)
            raise _Fail(f"argument {a!r} is not allowed", unsafe=False)
        return a

    def _check_static_sizes(self, base: str, ins) -> None:
        if base in _SIZE_ARG:
            i = _SIZE_ARG[base]
            size = ins.kwargs.get("size", ins.args[i] if len(ins.args) > i else None)
            if size is not None and any(True for _ in iter_value_refs(size)):
                raise _Fail(
                    "takes its size from a computed value; sizes must be static so that the "
                    "memory a program needs is known before it runs"
                )
        if base == "arange":
            if any(True for _ in iter_value_refs([ins.args, list(ins.kwargs.values())])):
                raise _Fail("takes its range from a computed value; ranges must be static")

    def _check_writes(self, base: str, ins) -> None:
        for target in written_arguments(ins.op, ins.args, ins.kwargs):
            for v in iter_value_refs(target):
                t = self.env[v]
                if isinstance(t, self.torch.Tensor) and self._key(t) in self.fixed:
                    raise _Fail(
                        f"writes {self.fixed[self._key(t)]} in place; weights are shared by "
                        "every bucket and inputs are the model's static buffers"
                    )

    def _check_as_strided(self, args: list, kwargs: dict) -> None:
        self_, size, stride = (args + [None] * 3)[:3]
        stride = kwargs.get("stride", stride)
        size = kwargs.get("size", size)
        offset = kwargs.get("storage_offset", args[3] if len(args) > 3 else None)
        if not isinstance(self_, self.torch.Tensor):
            return
        fixed = self.fixed.get(self._key(self_))
        if fixed is not None and offset is not None:
            # A storage offset is absolute: the runtime lays inputs (and weights) out as rows
            # of shared blocks, so an offset into this walk's storage of one input is another
            # tensor's there (offset 0 of attention_mask is input_ids).
            raise _Fail(f"as_strided over {fixed} with an explicit storage offset {offset}")
        offset = self_.storage_offset() if offset is None else offset
        ok = (
            isinstance(size, list)
            and isinstance(stride, list)
            and len(size) == len(stride)
            and all(isinstance(x, int) and x >= 0 for x in [*size, *stride, offset])
        )
        if not ok:
            raise _Fail(f"as_strided with size {size}, stride {stride}, offset {offset}")
        elements = self_.untyped_storage().nbytes() // self_.element_size()
        last = offset + sum((s - 1) * st for s, st in zip(size, stride)) if all(size) else -1
        if last >= elements:
            raise _Fail(f"views element {last} of a storage of {elements} elements (out of bounds)")

    # -- index bounds --------------------------------------------------------------------

    def _check_gathers(self, ins, base: str, args: list, kwargs: dict) -> None:
        def arg(i: int, name: str):
            return kwargs.get(name, ins.args[i] if len(ins.args) > i else None), (
                kwargs.get(name, args[i] if len(args) > i else None)
            )

        checks: list[tuple[Any, Any, int, bool]] = []  # (encoded index, table, dim, negatives)
        if base == "embedding":
            checks.append((arg(1, "indices")[0], arg(0, "weight")[1], 0, False))
        elif base in ("index_select", "gather"):
            dim = arg(1, "dim")[1]
            checks.append((arg(2, "index")[0], arg(0, "self")[1], dim, False))
        elif base == "index":
            enc, dec = arg(1, "indices")
            table = arg(0, "self")[1]
            if not (isinstance(enc, list) and isinstance(dec, list)):
                return  # not a list of indices: torch refuses it on meta
            for k, (e, d) in enumerate(zip(enc, dec)):
                if d is not None:
                    checks.append((e, table, k, True))
        elif ins.op == "kernl.bert_embeddings":
            for ids, table in ((0, 1), (2, 3), (4, 5)):
                checks.append((arg(ids, "")[0], arg(table, "")[1], 0, False))
        for encoded, table, dim, negatives in checks:
            self._check_index(encoded, table, dim, negatives)

    def _check_index(self, encoded: Any, table: Any, dim: Any, negatives: bool) -> None:
        torch = self.torch
        if not (isinstance(encoded, dict) and "v" in encoded and isinstance(table, torch.Tensor)):
            return  # not a tensor index: torch's own checks (on meta) apply
        vid = encoded["v"]
        index = self.env[vid]
        if not isinstance(index, torch.Tensor) or index.numel() == 0:
            return
        if not isinstance(dim, int) or not -table.dim() <= dim < max(table.dim(), 1):
            return  # torch refuses it on meta
        n = table.shape[dim] if table.dim() else 1
        rng = self.ranges.get(vid)
        source = self.sources.get(vid, "a computed value")
        if rng is None:
            raise _Fail(
                f"indexes a table of {n} entries with {source}, whose values cannot be bounded "
                "before the call; out-of-range indices read outside the table"
            )
        lo_ok = -n if negatives else 0
        if rng[0] < lo_ok or rng[1] >= n:
            raise _Fail(
                f"indexes a table of {n} entries with {source}, whose values reach "
                f"[{rng[0]}, {rng[1]}]: out of range (reads outside the table)"
            )

    def _bool_range(self, t) -> Interval | None:
        return (0, 1) if t.dtype == self.torch.bool else None

    def _range_of(
        self, base: str, ins, args: list, kwargs: dict, results: list, which: int
    ) -> tuple[Interval | None, str]:
        """The interval of integer result `which`, and where its values come from."""
        torch = self.torch
        out = results[which]
        if out.dtype == torch.bool:
            return (0, 1), "a boolean"
        if out.dtype.is_floating_point or out.dtype.is_complex:
            return None, ""
        info = torch.iinfo(out.dtype)
        rng, src = self._int_range(base, ins, args, kwargs, out, which)
        if rng is None or rng[0] < info.min or rng[1] > info.max:
            return None, ""
        return (int(rng[0]), int(rng[1])), src

    def _int_range(self, base, ins, args, kwargs, out, which):  # noqa: C901 - one table
        torch = self.torch
        refs = [a.get("v") if isinstance(a, dict) else None for a in ins.args]

        info = torch.iinfo(out.dtype)

        def fits(r: Interval | None) -> Interval | None:
            """An operand's interval where the result's dtype holds it: an operand past it
            is cast and wraps (a 0-dim int64 bound of an int32 clamp), so it is unknown."""
            return r if r is not None and info.min <= r[0] <= r[1] <= info.max else None

        def of(i: int) -> tuple[Interval | None, str]:
            """Range of positional argument i: a value's interval or a number's."""
            if i >= len(ins.args):
                return None, ""
            a = ins.args[i]
            if refs[i] is not None:
                return fits(self.ranges.get(refs[i])), self.sources.get(refs[i], "")
            return scalar(a), ""

        def scalar(x: Any) -> Interval | None:
            if isinstance(x, bool):
                return (int(x), int(x))
            if isinstance(x, int):
                return fits((x, x))
            if isinstance(x, float) and math.isfinite(x) and x == int(x):
                return fits((int(x), int(x)))
            return None

        def union(*rs):
            if any(r is None for r in rs):
                return None
            return (min(r[0] for r in rs), max(r[1] for r in rs))

        if base in ("max", "min") and split_aten(ins.op)[1] not in _REDUCTIONS:
            base = "maximum" if base == "max" else "minimum"  # max.other: elementwise
        elif base in _SAME_VALUES:
            if base in ("max", "min") and which == 1:
                dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
                return (0, max(args[0].shape[dim] - 1, 0)), "an argmax"
            if base in ("tril", "triu"):  # the other triangle is zeros
                return union(of(0)[0], (0, 0)), of(0)[1]
            return of(0)
        if base in ("zeros", "zeros_like", "new_zeros"):
            return (0, 0), "zeros"
        if base in ("ones", "ones_like", "new_ones"):
            return (1, 1), "ones"
        if base in ("full", "full_like", "fill", "scalar_tensor", "new_full"):
            i = {"full": 1, "full_like": 1, "fill": 1, "scalar_tensor": 0, "new_full": 2}[base]
            v = kwargs.get("fill_value", args[i] if len(args) > i else None)
            return scalar(v), f"a constant {v!r}"
        if base == "arange":
            nums = [scalar(a) for a in args if not isinstance(a, torch.Tensor)]
            if any(n is None for n in nums) or not nums:
                return None, ""
            vals = [n[0] for n in nums]
            start, end, step = (0, vals[0], 1) if len(vals) == 1 else (vals + [1])[:3]
            count = max(0, math.ceil((end - start) / step)) if step else 0
            if count == 0:
                return (0, 0), "an empty arange"
            last = start + (count - 1) * step
            return (min(start, last), max(start, last)), f"arange({start}, {end}, {step})"
        if base in ("argmax", "argmin"):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            n = args[0].numel() if dim is None else args[0].shape[dim]
            return (0, max(n - 1, 0)), f"an {base}"
        if base in ("sort", "topk") and which == 1:
            dim = -1
            if base == "sort":
                dim = kwargs.get(
                    "dim", args[1] if len(args) > 1 and isinstance(args[1], int) else -1
                )
            else:
                dim = kwargs.get("dim", args[2] if len(args) > 2 else -1)
            return (0, max(args[0].shape[dim] - 1, 0)), f"{base} indices"
        if base in ("sort", "topk"):
            return of(0)
        a, src = of(0)
        b, src_b = of(1)
        src = src or src_b
        if base in ("cat", "stack"):
            tensors = ins.args[0] if ins.args else []
            rs = [self.ranges.get(t.get("v")) if isinstance(t, dict) else None for t in tensors]
            srcs = [self.sources.get(t.get("v"), "") for t in tensors if isinstance(t, dict)]
            return union(*rs) if rs else None, next((s for s in srcs if s), "")
        if base in ("maximum", "minimum"):
            if a is None or b is None:
                return None, ""
            f = max if base == "maximum" else min
            return (f(a[0], b[0]), f(a[1], b[1])), src
        if base == "where":
            c, src_c = of(2)
            return union(b, c), src_b or src_c
        if base == "masked_fill":
            return union(a, of(2)[0]), src
        if base in ("clamp", "clamp_min", "clamp_max"):
            return self._clamp_range(base, ins, a, src, scalar, fits)
        if base in ("gather", "index_select", "index", "embedding"):
            # elements of the table (arg 0), wherever the indices point (they are checked)
            return of(0)
        if a is None:
            return None, ""
        if base == "neg":
            return (-a[1], -a[0]), src
        if base == "abs":
            return (
                0 if a[0] <= 0 <= a[1] else min(abs(a[0]), abs(a[1])),
                max(abs(a[0]), abs(a[1])),
            ), src
        if base in ("cumsum", "sum"):
            if base == "cumsum":
                dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
                n = args[0].shape[dim] if args[0].dim() else 1
                return (min(a[0], n * a[0]), max(a[1], n * a[1])), src
            # each output sums n inputs, n = 0 over an empty axis (a sum of 0)
            n = args[0].numel() // out.numel() if out.numel() else 0
            return (min(n * a[0], n * a[1]), max(n * a[0], n * a[1])), src
        if base == "remainder" and b is not None and b[0] == b[1] and b[0] > 0:
            return (0, b[0] - 1), src
        if b is None:
            return None, ""
        if base in ("add", "sub", "rsub"):
            alpha = scalar(kwargs.get("alpha", 1))
            if alpha is None:
                return None, ""
            sb = (min(b[0] * alpha[0], b[1] * alpha[0]), max(b[0] * alpha[0], b[1] * alpha[0]))
            if base == "add":
                return (a[0] + sb[0], a[1] + sb[1]), src
            if base == "sub":
                return (a[0] - sb[1], a[1] - sb[0]), src
            return (sb[0] - a[1], sb[1] - a[0]), src
        if base == "mul":
            products = [x * y for x in a for y in b]
            return (min(products), max(products)), src
        return None, ""

    def _clamp_range(self, base, ins, a, src, scalar, fits):
        """min(max(x, lo), hi) as an interval, each bound either given (a number, or a value
        whose interval is known or not) or absent; (None, None) is a bound whose values are
        unknown, which bounds nothing (it is no absent bound)."""
        names = {"clamp": ("min", "max"), "clamp_min": ("min", None), "clamp_max": (None, "max")}
        lo_name, hi_name = names[base]

        def bound(i: int, name: str | None):
            if name is None:
                return None
            given = ins.kwargs[name] if name in ins.kwargs else None
            if given is None and i < len(ins.args):
                given = ins.args[i]
            if given is None:
                return None
            if isinstance(given, dict) and "v" in given:
                known = fits(self.ranges.get(given["v"]))
                return known if known is not None else (None, None)
            number = scalar(given)
            return number if number is not None else (None, None)

        lo = bound(1, lo_name)
        hi = bound(2 if base == "clamp" else 1, hi_name)
        x = a if a is not None else (None, None)
        if lo is not None:  # y = max(x, lo): at least either's least, at most both's most
            least = [v for v in (x[0], lo[0]) if v is not None]
            most = max(x[1], lo[1]) if x[1] is not None and lo[1] is not None else None
            x = (max(least) if least else None, most)
        if hi is not None:  # z = min(y, hi)
            most = [v for v in (x[1], hi[1]) if v is not None]
            least = min(x[0], hi[0]) if x[0] is not None and hi[0] is not None else None
            x = (least, min(most) if most else None)
        if x[0] is None or x[1] is None:
            return None, ""
        # a clamp bounds what it clamps whatever that is (DeBERTa clamps its relative
        # positions, made through a float, into the table it gathers from)
        return (x[0], x[1]), src if a is not None else "a clamp"


# -- kernl ops: shapes and argument checks, mirroring kernl/runtime/kernl_ops.py --------------

_ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "tanh")


def _impl(impl: Any, config: Any) -> None:
    if impl not in ("aten", "triton"):
        raise _Fail(f"unknown implementation {impl!r}", unsafe=False)
    if config is None:
        return
    pairs = config.items() if isinstance(config, dict) else config
    ok = isinstance(pairs, (list, type({}.items()))) and all(
        isinstance(p, (list, tuple))
        and len(p) == 2
        and isinstance(p[0], str)
        and isinstance(p[1], (int, bool, str))
        and not (isinstance(p[1], int) and not 0 <= p[1] <= 1 << 16)
        for p in pairs
    )
    if not ok:
        raise _Fail(f"kernel config {config!r} is not a list of [name, small value] pairs", False)


def _same(a, b, what: str) -> None:
    if b is not None and tuple(b.shape) != tuple(a.shape):
        raise _Fail(f"{what} has shape {list(b.shape)}, expected {list(a.shape)}", unsafe=False)


# The shape rules of kernl.linear, kernl.layer_norm and kernl.attention are written out rather
# than run on the meta device: torch's meta functions for them are Python decompositions whose
# first call imports torch._dynamo (sympy, inductor, triton: seconds of a cold load()).


def _of_dtype(dtype, *tensors) -> None:
    for t in tensors:
        if t is not None and t.dtype != dtype:
            raise _Fail(f"mixes {dtype} and {t.dtype} operands", unsafe=False)


def _strided(row) -> bool:
    """A 1-d tensor whose elements are not one contiguous run (an expanded or strided view)."""
    return row.numel() > 1 and row.stride(0) != 1


def _kernl_linear(
    x, weight, bias=None, residual=None, activation="none", impl="aten", config=None, counters=None
):
    import torch

    _impl(impl, config)
    if counters is not None and (counters.dtype != torch.int32 or counters.dim() != 1):
        # the split-K kernel's arrival counters (the launcher checks their number per call)
        raise _Fail(f"linear counters {counters.dtype} {list(counters.shape)}: 1-d int32", False)
    if activation not in _ACTIVATIONS:
        raise _Fail(f"unknown activation {activation!r}{NEWER_KERNL_HINT}", unsafe=False)
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise _Fail(f"linear of x {list(x.shape)} and weight {list(weight.shape)}", False)
    if bias is not None and (list(bias.shape) != [weight.shape[0]] or _strided(bias)):
        # the kernels read a bias as one contiguous row: an expanded view would be overrun
        raise _Fail(f"linear bias {list(bias.shape)} for weight {list(weight.shape)}", False)
    _of_dtype(x.dtype, weight, bias, residual)
    y = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)
    _same(y, residual, "residual")
    return y


def _kernl_layer_norm(x, weight, bias, eps, residual=None, impl="aten", config=None):
    import torch

    _impl(impl, config)
    if x.dim() < 1:
        raise _Fail("layer_norm of a 0-d tensor", unsafe=False)
    for t, what in ((weight, "weight"), (bias, "bias")):
        if t is not None and list(t.shape) != [x.shape[-1]]:
            raise _Fail(f"layer_norm {what} {list(t.shape)} for x {list(x.shape)}", False)
    _of_dtype(x.dtype, weight, bias, residual)
    float(eps)  # a program's eps that is no number fails here, as torch's layer_norm would
    _same(x, residual, "residual")
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _kernl_attention(
    q, k, v, mask=None, scale=None, causal=False, impl="aten", config=None, window=None
):
    import torch

    _impl(impl, config)
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)):
        raise _Fail(f"attention window {window!r}", False)
    if window is not None and window < 0:
        raise _Fail(f"attention window {window} (a distance: 0 or more)", False)
    if window is not None and config is not None:
        pairs = dict(config.items() if isinstance(config, dict) else map(tuple, config))
        if any(pairs.get(k) for k in ("programs_per_sm", "tma", "wgmma")):
            raise _Fail("attention window on a kernel without one (only the flash kernel)", False)
    if not (q.dim() == k.dim() == v.dim() == 4 and q.shape[:2] == k.shape[:2] == v.shape[:2]):
        raise _Fail("attention takes [B, H, L, D] q, k, v of one batch and head count", False)
    if k.shape[2] != v.shape[2] or q.shape[3] != k.shape[3]:
        raise _Fail(
            f"attention shapes q {list(q.shape)} k {list(k.shape)} v {list(v.shape)}", False
        )
    if mask is not None:
        try:
            mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        except RuntimeError:
            raise _Fail(f"attention mask {list(mask.shape)} does not broadcast", False) from None
    _of_dtype(q.dtype, k, v)
    return torch.empty((*q.shape[:3], v.shape[3]), dtype=q.dtype, device=q.device)


def _kernl_qkv_attention(x, weight, bias, mask, scale, num_heads, impl="aten", config=None):
    import torch

    _impl(impl, config)
    if not (isinstance(num_heads, int) and num_heads > 0) or isinstance(num_heads, bool):
        raise _Fail(f"qkv_attention of {num_heads!r} heads", unsafe=False)
    if x.dim() != 3 or x.shape[2] % num_heads or list(weight.shape) != [3 * x.shape[2], x.shape[2]]:
        raise _Fail(
            f"qkv_attention of x {list(x.shape)}, weight {list(weight.shape)}, {num_heads} heads",
            unsafe=False,
        )
    if bias is not None and list(bias.shape) != [weight.shape[0]]:
        raise _Fail(f"qkv_attention bias {list(bias.shape)} for weight {list(weight.shape)}", False)
    b, seq, c = x.shape
    if mask is not None and (list(mask.shape) != [b, 1, 1, seq] or not mask.is_floating_point()):
        # the fused kernel reads one additive bias row per sequence
        raise _Fail(
            f"qkv_attention mask {mask.dtype} {list(mask.shape)}: [{b}, 1, 1, {seq}]", False
        )
    _of_dtype(x.dtype, weight, bias)
    d = c // num_heads
    # the kernel's limits (kernels/qkv_attention.py, qkv_attention_refusal; this package
    # imports no kernel): a program past them would verify, then fail at load()
    if impl == "triton" and (d < 16 or d & (d - 1) or seq > 128 or c * x.element_size() % 16):
        raise _Fail(
            f"qkv_attention's kernel takes power-of-two head dims of 16 or more, sequences "
            f"of 128 or fewer and 16-byte rows: not {num_heads} heads of {d}, {seq} tokens",
            unsafe=False,
        )
    return torch.empty((b, num_heads, seq, d), dtype=x.dtype, device=x.device)


def _kernl_mask_to_bias(mask, dtype):
    import torch

    if mask.dtype != torch.bool:  # the runtime's log(mask) is a bias only of a boolean one
        raise _Fail(f"mask_to_bias takes a boolean mask, not {mask.dtype}", unsafe=False)
    return torch.empty(mask.shape, dtype=dtype, device=mask.device)


def _kernl_bert_embeddings(
    word_ids, word, pos_ids, pos, type_ids, types, weight, bias, eps, impl="aten", config=None
):
    import torch

    _impl(impl, config)
    if word_ids.dim() != 2 or not (word.dim() == pos.dim() == types.dim() == 2):
        raise _Fail("bert_embeddings takes [B, L] ids and 2-D tables", unsafe=False)
    b, seq = word_ids.shape
    for ids in (pos_ids, type_ids):
        try:
            ids.expand(b, seq)
        except RuntimeError:
            raise _Fail(
                f"ids of shape {list(ids.shape)} do not broadcast to [{b}, {seq}]", False
            ) from None
    h = word.shape[1]
    if pos.shape[1] != h or types.shape[1] != h or list(weight.shape) != [h]:
        raise _Fail("bert_embeddings tables and norm weight disagree on the hidden size", False)
    _same(weight, bias, "bias")
    return torch.empty((b, seq, h), dtype=word.dtype, device=word.device)


def _kernl_gated_linear(x, weight, bias=None, activation="gelu", impl="aten", config=None):
    import torch

    _impl(impl, config)
    if activation not in _ACTIVATIONS:
        raise _Fail(f"unknown activation {activation!r}{NEWER_KERNL_HINT}", unsafe=False)
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or weight.shape[0] % 2:
        raise _Fail(
            f"gated_linear of x {list(x.shape)} and weight {list(weight.shape)} (an even "
            "number of rows)",
            unsafe=False,
        )
    if bias is not None and (list(bias.shape) != [weight.shape[0]] or _strided(bias)):
        raise _Fail(f"gated_linear bias {list(bias.shape)} for weight {list(weight.shape)}", False)
    _of_dtype(x.dtype, weight, bias)
    return torch.empty((*x.shape[:-1], weight.shape[0] // 2), dtype=x.dtype, device=x.device)


def _kernl_rotary(x, cos, sin, dtype=None, impl="aten", config=None):
    import torch

    _impl(impl, config)
    if not 1 <= x.dim() <= 4 or x.shape[-1] % 2:
        raise _Fail(f"rotary of x {list(x.shape)}: 1 to 4 dims, an even last one", False)
    try:
        wide = torch.broadcast_shapes(cos.shape, sin.shape, x.shape)
    except RuntimeError:
        wide = None
    if wide != x.shape:
        raise _Fail(
            f"rotary's cos {list(cos.shape)} and sin {list(sin.shape)} do not broadcast to "
            f"x {list(x.shape)}",
            unsafe=False,
        )
    out = x.dtype if dtype is None else dtype
    if not all(t.is_floating_point() for t in (x, cos, sin)) or not out.is_floating_point:
        raise _Fail("rotary takes and gives floating-point tensors", unsafe=False)
    return torch.empty(x.shape, dtype=out, device=x.device)


KERNL_SHAPES = {
    "linear": _kernl_linear,
    "layer_norm": _kernl_layer_norm,
    "attention": _kernl_attention,
    "qkv_attention": _kernl_qkv_attention,
    "mask_to_bias": _kernl_mask_to_bias,
    "bert_embeddings": _kernl_bert_embeddings,
    "rotary": _kernl_rotary,
    "gated_linear": _kernl_gated_linear,
}
