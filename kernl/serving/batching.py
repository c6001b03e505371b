"""Group queued sequences into the artifact's buckets and serve each group with one call.

The replica's gatherer (gather.py) hands over every request that queued while the model was
busy; this module decides how those sequences share graph replays. The rows are sorted by
length and cut into contiguous groups, each held by one bucket, choosing the cut whose
replays cost least: on a GPU each bucket's call time is measured when the replica starts; on
the CPU the price is the bucket's tokens plus a fixed price per replay. So eight short
sequences share one small replay rather than riding along with a long one in a huge bucket,
unless replays are so cheap to launch that the big one wins. A group is padded to its own
longest sequence; the runtime then pads it to the bucket it selects.

No Ray here: the planner and the group runner are plain functions, tested on their own."""

from __future__ import annotations

import bisect
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kernl.artifacts.schema import Bucket, pick_bucket


@dataclass(frozen=True)
class Row:
    """One sequence of a request: its token ids and the other inputs the caller gave
    (`attention_mask`, `token_type_ids`), each as long as `input_ids`."""

    inputs: dict[str, tuple[int, ...]]

    @property
    def length(self) -> int:
        return len(self.inputs["input_ids"])


@dataclass(frozen=True)
class Group:
    """Rows (indices into the planned list) that share one call, and the bucket it replays."""

    rows: tuple[int, ...]
    bucket: Bucket


def smallest_bucket(buckets: Sequence[Bucket], batch: int, seq: int) -> Bucket | None:
    """The bucket the runtime picks for (batch, seq): the format's one rule, `pick_bucket`."""
    return pick_bucket(buckets, batch, seq)


def token_costs(buckets: Sequence[Bucket], replay_cost_tokens: int | None = None) -> dict:
    """A replay's price when nothing was measured: its bucket's tokens plus a fixed price per
    replay (launch, copies, Python), by default the smallest bucket's tokens."""
    if replay_cost_tokens is None:
        replay_cost_tokens = min(b.tokens for b in buckets)
    return {b: float(b.tokens + replay_cost_tokens) for b in buckets}


def measure_costs(model, repeats: int = 3) -> dict:
    """Each bucket's measured time for one full call (copy in, replay, copy out), in seconds:
    the planner's prices on a GPU, where a small replay costs nearly as much as a larger one."""
    costs = {}
    # the inputs a request leaves out are left to the runtime, as run_group leaves them; a
    # mask the model requires (it masks its pad tokens itself without one: DPR) is given
    masked = any(
        s.name == "attention_mask" and s.default == "required" for s in model.manifest.inputs
    )
    for bucket in model.buckets:
        row = {"input_ids": (0,) * bucket.seq}
        if masked:
            row["attention_mask"] = (1,) * bucket.seq
        rows = [Row(row)] * bucket.batch
        inputs = group_inputs(rows, model.manifest.inputs, leave_defaults=True)
        model(**inputs)  # warm-up (lazy capture, allocator)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            times.append(time.perf_counter() - start)
        costs[bucket] = sorted(times)[len(times) // 2]
    return costs


def plan_groups(
    lengths: Sequence[int], buckets: Sequence[Bucket], costs: dict | None = None
) -> list[Group]:
    """Cut rows of the given lengths into groups that each fit one bucket, minimising the
    summed cost of the buckets replayed (`costs`: bucket -> price, default token_costs) over
    cuts of the length-sorted rows (dynamic programming over the cut points).

    A row's length matters only through the shortest bucket length that holds it (its
    class): which buckets hold a group, hence its price, depends on nothing else. The plan of
    a multiset of classes is computed once per replica (`_plan_cuts` caches it): a server
    of 128-token requests plans every batch of 16 with one lookup, not a 1,000-step loop.

    Every row must fit some bucket on its own (callers check this on arrival)."""
    if not buckets:
        raise ValueError("no buckets to plan with")
    costs = costs or token_costs(buckets)
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    seqs = sorted({b.seq for b in buckets})
    classes = []
    for i in order:
        k = bisect.bisect_left(seqs, lengths[i])
        if k == len(seqs):
            raise ValueError(
                f"a sequence of length {lengths[i]} fits no bucket "
                f"({', '.join(f'{b.batch}x{b.seq}' for b in sorted(buckets))})"
            )
        classes.append(seqs[k])
    buckets = tuple(buckets)
    prices = tuple(costs.get(b) for b in buckets)
    return [
        Group(tuple(order[i:j]), buckets[b])
        for i, j, b in _plan_cuts(buckets, prices, tuple(classes))
    ]


@functools.lru_cache(maxsize=4096)
def _plan_cuts(
    buckets: tuple[Bucket, ...], prices: tuple[float | None, ...], lengths: tuple[int, ...]
) -> tuple[tuple[int, int, int], ...]:
    """The cheapest cut of rows of these sorted `lengths` (bucket lengths): (start, end,
    index of the bucket in `buckets`) per group."""
    n = len(lengths)
    max_batch = max(b.batch for b in buckets)
    index = {b: k for k, b in enumerate(buckets)}
    # best[j]: cheapest plan for the first j sorted rows; cut[j]: where its last group starts.
    best: list[float | None] = [0.0] + [None] * n
    cut = [0] * (n + 1)
    choice = [0] * (n + 1)

    # smallest_bucket sorts the buckets on every call, and a Bucket hashes its fields on
    # every dict lookup: ask once per (rows, longest) pair for the bucket and its price.
    @functools.cache
    def price(rows: int, seq: int) -> tuple[float, int] | None:
        bucket = smallest_bucket(buckets, rows, seq)
        if bucket is None:
            return None
        k = index[bucket]
        if prices[k] is None:
            raise KeyError(bucket)  # a price list without this bucket
        return prices[k], k

    for j in range(1, n + 1):
        longest = lengths[j - 1]  # sorted: the last row of a group is its longest
        for i in range(j - 1, max(-1, j - 1 - max_batch), -1):
            priced = price(j - i, longest)
            if priced is None:
                break  # no bucket holds j - i rows of this length: nor any more rows
            if best[i] is None:
                continue
            cost = best[i] + priced[0]
            if best[j] is None or cost < best[j]:
                best[j], cut[j], choice[j] = cost, i, priced[1]
    groups = []
    j = n
    while j > 0:
        groups.append((cut[j], j, choice[j]))
        j = cut[j]
    return tuple(groups[::-1])


def group_inputs(
    rows: Sequence[Row], input_specs, leave_defaults: bool = False
) -> dict[str, torch.Tensor]:
    """The (rows, longest) tensors of one group: each row's values, defaults for inputs it
    left out, pad values (attention mask 0) after its end. One tensor built per input, not
    one per row: an input every row gives or none gives costs one call. `leave_defaults`:
    an input no row gives is left out when the rows are all as long (no padding inside the
    group), for the runtime fills it with the same default, and checks and copies less."""
    longest = max(r.length for r in rows)
    real = torch.arange(longest) < torch.tensor([r.length for r in rows])[:, None]
    even = all(r.length == longest for r in rows)
    tensors: dict[str, torch.Tensor] = {}
    for spec in input_specs:
        dtype = getattr(torch, spec.dtype)
        given = [row.inputs.get(spec.name) for row in rows]
        if all(v is None for v in given):
            if spec.default not in ("ones", "zeros"):
                raise ValueError(f"row 0 lacks the required input {spec.name!r}")
            if leave_defaults and even:
                continue
            fill = 1 if spec.default == "ones" else 0
            t = torch.full((len(rows), longest), spec.pad_value, dtype=dtype)
            tensors[spec.name] = t.masked_fill_(real, fill)
            continue
        padded = []
        for k, (row, values) in enumerate(zip(rows, given)):
            if values is None:
                if spec.default not in ("ones", "zeros"):
                    raise ValueError(f"row {k} lacks the required input {spec.name!r}")
                values = (1 if spec.default == "ones" else 0,) * row.length
            if row.length < longest:
                values = tuple(values) + (spec.pad_value,) * (longest - row.length)
            padded.append(values)
        tensors[spec.name] = _int_tensor(padded, dtype)
    return tensors


def _int_tensor(rows: list, dtype: torch.dtype) -> torch.Tensor:
    """torch.tensor(rows, dtype=dtype), through numpy for integer dtypes: a [16, 128] batch
    of token ids in 29 us instead of 81 (one core of the project's CPU)."""
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        return torch.tensor(rows, dtype=dtype)
    return torch.from_numpy(np.array(rows, dtype=str(dtype).removeprefix("torch.")))


def split_outputs(outputs, rows: Sequence[Row], output_specs) -> list[dict[str, torch.Tensor]]:
    """Per row, each output with the batch axis removed and the sequence axis cut back to the
    row's own length."""
    per_row: list[dict[str, torch.Tensor]] = [{} for _ in rows]
    for spec in output_specs:
        t = outputs[spec.name]
        for k, row in enumerate(rows):
            value = t.select(spec.batch_axis, k)
            if spec.seq_axis is not None:
                axis = spec.seq_axis - (spec.seq_axis > spec.batch_axis)
                value = value.narrow(axis, 0, row.length)
            per_row[k][spec.name] = value
    return per_row


def run_group(
    model, rows: Sequence[Row], wanted: Sequence[str] | None = None
) -> list[dict[str, torch.Tensor]]:
    """Serve one group with one model call (one replay); per row, its outputs on the CPU.
    `wanted`: the outputs to copy back (default all): a 64x128 BERT-base batch's
    last_hidden_state is 12.6 MB of fp16 to copy from the GPU that nobody asked for when
    every request wants the pooler output."""
    inputs = group_inputs(rows, model.manifest.inputs, leave_defaults=True)
    outputs = model(**inputs)
    specs = [s for s in model.manifest.outputs if wanted is None or s.name in wanted]
    outputs = {s.name: outputs[s.name].cpu() for s in specs}
    return split_outputs(outputs, rows, specs)
