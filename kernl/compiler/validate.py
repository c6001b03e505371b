"""Compare a compiled program with the eager model on fresh inputs."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from kernl.artifacts.program import Program
from kernl.artifacts.schema import Bucket, InputSpec, OutputSpec
from kernl.runtime.executor import Executor

from .trace import FlatModel, UnsupportedModelError, example_inputs, feed_forward_chunk

DEFAULT_TOLERANCE = {  # (atol, rtol) per dtype
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (8e-2, 5e-2),
}


def resolve_tolerance(dtype: torch.dtype, atol: float | None, rtol: float | None):
    """--atol/--rtol, or the dtype's defaults. ValueError for a tolerance that is not a
    finite number >= 0: NaN would turn validation off (no error compares greater than it),
    a negative one fails every bucket after minutes of compiling."""
    default_atol, default_rtol = DEFAULT_TOLERANCE[dtype]
    return (
        default_atol if atol is None else check_tolerance("atol", atol),
        default_rtol if rtol is None else check_tolerance("rtol", rtol),
    )


def check_tolerance(name: str, value) -> float:
    """`value` as a float if it is a finite number >= 0, else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number >= 0, not {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
    return value


class ValidationError(AssertionError):
    pass


@dataclass
class ValidationResult:
    bucket: Bucket
    max_abs_error: float
    worst_output: str
    # set where kernl was further from eager in the model's dtype than the tolerance, and as
    # close to eager in float32 as eager in that dtype is (what `_no_less_accurate` measured)
    against_float32: str | None = None


# How much further than eager in its own dtype kernl may be from eager in float32 (the
# run-to-run spread of two reduced-precision computations of one model is about their error)
FLOAT32_SLACK = 1.25


def validate(
    flat: FlatModel,
    program: Program,
    weights: dict[str, torch.Tensor],
    device: torch.device,
    atol: float,
    rtol: float,
    seed: int = 1234,
) -> ValidationResult:
    bucket = program.bucket
    label = f"bucket {bucket.batch}x{bucket.seq}"  # as the compile summary, inspect and bench
    g = torch.Generator().manual_seed(seed + bucket.batch * 7919 + bucket.seq)
    args = example_inputs(flat.input_names, bucket, flat.model.config.vocab_size, device, g)
    with torch.no_grad():
        expected = flat(*args)
        got = Executor(program, weights, device).run(dict(zip(flat.input_names, args)))
    worst, worst_name = 0.0, ""
    against_float32: str | None = None
    compared, no_look = False, ""  # no_look: why the float32 look could not be made
    for name, e, o in zip(flat.output_names, expected, got):
        if e.shape != o.shape:
            raise ValidationError(
                f"{label}: output {name} has shape {tuple(o.shape)}, eager gives {tuple(e.shape)}"
            )
        c = _compare(o, e, atol, rtol)
        if not c.ours_finite and c.eager_finite:
            raise ValidationError(f"{label}: output {name} has NaN/inf, eager has none")
        max_err = c.max_err
        if max_err >= worst:
            worst, worst_name = max_err, name
        if c.first_bad is not None and e.dtype in (torch.float16, torch.bfloat16):
            # a deep model's two fp16 or bf16 computations differ by about their own error:
            # refuse only where kernl is less accurate than eager in its dtype (every output
            # compared at once, the first time one is off)
            if not compared and not no_look:
                found = _no_less_accurate(flat, args, expected, got)
                if isinstance(found, _NoLook):
                    no_look = found.why
                else:
                    against_float32, compared = found, True
            if against_float32 is not None:
                continue
        if c.first_bad is not None:
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(c.first_bad), o.shape))
            where = first_divergence(
                program, weights, dict(zip(flat.input_names, args)), device, atol, rtol
            )
            raise ValidationError(
                f"{label}: output {name} differs from eager beyond "
                f"atol={atol}, rtol={rtol}: max |error| {max_err:.3g}; first bad element {idx}: "
                f"kernl {float(o[idx]):.6g} vs eager {float(e[idx]):.6g}. {where}"
                + (
                    f" Against eager in float32, kernl is further off than eager in {e.dtype}."
                    if compared
                    else f" No float32 look ({no_look}): the tolerance alone decided."
                    if no_look
                    else ""
                )
            )
    return ValidationResult(bucket, worst, worst_name, against_float32)


# Outputs are compared a slice at a time in float64: whole, a masked LM's logits at 64x512
# (1e9 values) held ~45 GB of float64 temporaries at once.
COMPARE_CHUNK = 1 << 24


@dataclass
class _Comparison:
    max_err: float  # the largest |kernl - eager| (NaN read as 0, inf as the largest float)
    first_bad: int | None  # flat index of the first element beyond the tolerance
    ours_finite: bool
    eager_finite: bool


def _compare(ours: torch.Tensor, eager: torch.Tensor, atol: float, rtol: float) -> _Comparison:
    """kernl's output against eager's, in float64, COMPARE_CHUNK elements at a time."""
    o, e = ours.reshape(-1), eager.reshape(-1)
    c = _Comparison(0.0, None, True, True)
    for start in range(0, o.numel(), COMPARE_CHUNK):
        o64 = o[start : start + COMPARE_CHUNK].double()
        e64 = e[start : start + COMPARE_CHUNK].double()
        c.ours_finite &= bool(torch.isfinite(o64).all())
        c.eager_finite &= bool(torch.isfinite(e64).all())
        err = (o64 - e64).abs()
        c.max_err = max(c.max_err, float(err.nan_to_num(0).max()))
        if c.first_bad is None:
            bad = (err > atol + rtol * e64.abs()).nonzero()
            if len(bad):
                c.first_bad = start + int(bad[0])
    return c


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64 (NaN read as inf), a slice at a time."""
    a, b, worst = a.reshape(-1), b.reshape(-1), 0.0
    for start in range(0, a.numel(), COMPARE_CHUNK):
        d = a[start : start + COMPARE_CHUNK].double() - b[start : start + COMPARE_CHUNK].double()
        worst = max(worst, float(d.abs().nan_to_num(float("inf")).max()))
    return worst


@dataclass
class _NoLook:
    """The float32 look could not be made, and why (said in the refusal: a user whose model
    is refused on the tolerance alone must know the look was not there to accept it)."""

    why: str


def no_look_reason(e: BaseException) -> str:
    """What kept the model from running in float32, in a few words."""
    if isinstance(e, torch.OutOfMemoryError):
        return "the model in float32 does not fit in memory"
    return f"the model in float32 failed: {type(e).__name__}: {e}"[:300]


def _no_less_accurate(flat: FlatModel, args, expected, got) -> str | None | _NoLook:
    """Each output of kernl (`got`) against eager in float32, beside eager in the model's
    reduced dtype (`expected`): a summary if kernl is at most FLOAT32_SLACK times as far from
    float32 as eager is for every output, else None; _NoLook where it could not compare (a
    float32 copy of the model that does not fit, a float32 output that is not finite)."""
    import copy

    try:
        wide = copy.deepcopy(flat.model).float()
        with torch.no_grad():
            ref = FlatModel(wide, flat.input_names, flat.output_names)(*args)
    except Exception as e:  # noqa: BLE001 - no copy (memory, a module deepcopy cannot copy)
        return _NoLook(no_look_reason(e))
    del wide  # its memory back before the comparison
    parts = []
    for name, e, o, r in zip(flat.output_names, expected, got, ref):
        if not torch.isfinite(r).all():
            return _NoLook(f"eager float32's output {name} is not finite")
        ours, theirs = _max_abs_diff(o, r), _max_abs_diff(e, r)
        if not ours <= FLOAT32_SLACK * theirs:
            return None
        parts.append(f"{name}: kernl {ours:.3g} from float32, eager {e.dtype} {theirs:.3g}")
    return "; ".join(parts)


def first_divergence(program: Program, weights, inputs, device, atol: float, rtol: float) -> str:
    """Re-run the program step by step and compare every kernl op with its aten
    implementation on the same inputs; name the first that disagrees."""
    from kernl.compiler.tune import _walk
    from kernl.runtime.vocabulary import resolve_op

    executor = Executor(program, weights, device)
    state: dict = {}
    with torch.no_grad():
        for i, op, _outs, _ in _walk(executor, inputs, state):
            ins = program.instructions[i]
            if not op.startswith("kernl.") or ins.kwargs.get("impl", "aten") == "aten":
                continue
            fn = resolve_op(op)
            got = fn(*state["args"], **state["kwargs"])
            ref = fn(*state["args"], **{**state["kwargs"], "impl": "aten"})
            err = (got.double() - ref.double()).abs()
            if (err > atol + rtol * ref.double().abs()).any():
                return (
                    f"First diverging op: instruction #{i} {op} "
                    f"(config {ins.kwargs.get('config')}), max |error| vs aten {float(err.max()):.3g}"
                )
    return "No single kernl op diverges beyond tolerance: the error accumulates across ops."


def check_padding_is_neutral(
    flat: FlatModel, inputs: list[InputSpec], outputs: list[OutputSpec], device, atol, rtol
) -> None:
    """Refuse a model whose real positions read the padding the runtime adds to reach a
    bucket (pad ids, mask 0): validation runs calls of the buckets' exact lengths, where no
    such padding exists, and every shorter call would be served wrong. MobileBERT's trigram
    embeddings read the next token's: eager reads zeros past a call's end, kernl the pad
    token's row (0.17 from eager at the last token, review 2026-12-07).

    Two eager calls padded with two different ids are compared first: equal (bit for bit,
    as masked keys add exact zeros), the padding is never read. Otherwise the call padded
    with the pad id must still match the unpadded call within the tolerance (a zero pad
    row, as a fresh MobileBERT's, is read as the zeros eager reads)."""
    names = [s.name for s in inputs]
    if "attention_mask" not in names:
        return
    chunk = feed_forward_chunk(flat.model.config)
    real, total = 6 * chunk, 8 * chunk
    vocab = flat.model.config.vocab_size
    pad_id = next(s.pad_value for s in inputs if s.name == "input_ids")
    ids = torch.randint(0, vocab, (2, total), generator=torch.Generator().manual_seed(7))
    ids[ids == pad_id] = (pad_id + 1) % vocab

    def call(length: int, fill: int | None):
        tensors = []
        for spec in inputs:
            if spec.name == "input_ids":
                t = ids.clone()
                t[:, real:] = pad_id if fill is None else fill
            elif spec.name == "attention_mask":
                t = torch.ones_like(ids)
                t[:, real:] = 0
            else:  # token types: zeros, then their pad value
                t = torch.zeros_like(ids)
                t[:, real:] = spec.pad_value
            tensors.append(t[:, :length].to(device))
        with torch.no_grad():
            out = flat(*tensors)
        return [
            o.narrow(s.seq_axis, 0, real) if s.seq_axis is not None else o
            for o, s in zip(out, outputs)
        ]

    padded = call(total, None)
    other = call(total, (pad_id + 2) % vocab)
    if all(torch.equal(a, b) for a, b in zip(padded, other)):
        return
    for spec, got, want in zip(outputs, padded, call(real, None)):
        c = _compare(got, want, atol, rtol)
        if c.first_bad is not None:
            raise UnsupportedModelError(
                f"output {spec.name} at a call's real tokens depends on the padding that "
                f"serves a shorter call in a longer bucket: {c.max_err:.3g} from eager on the "
                f"call itself (atol={atol}, rtol={rtol}). The model reads past a call's end "
                "(MobileBERT's trigram embeddings read the next token: eager reads zeros "
                f"there, kernl the pad token {pad_id}'s row), so every call shorter than its "
                "bucket would be served wrong; kernl does not compile it"
            )
