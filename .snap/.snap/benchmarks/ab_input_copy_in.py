"""The copy-in of b94792e against its parent's, in one process on one artifact (the device's
host speed moves between runs, so a change to the host path is compared within one).

    git show b94792e~1:kernl/runtime/model.py > kernl/runtime/model_old.py   # not committed
    python benchmarks/ab_input_copy_in.py /tmp/bench_bert_fusions_*/bert.kernl

The parent's CompiledModel runs on the same loaded model (its class swapped in on a shallow
copy, plus the pinned buffer it kept its range check's results in), so both share weights,
graphs and static buffers. Per shape: outputs equal, then old/new x GPU/CPU inputs, two
rounds, each the median of 300 calls between CUDA events."""

from __future__ import annotations

import copy
import os
import sys

import torch

import kernl.runtime as rt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bert_fusions import time_ms  # noqa: E402

from kernl.runtime import model_old  # see the docstring

SHAPES = [(1, 16), (1, 128), (8, 128), (32, 128), (8, 512)]


def main(artifact: str) -> None:
    new = rt.load(artifact)
    old = copy.copy(new)
    old.__class__ = model_old.CompiledModel
    old._stats_host = torch.empty(2 * len(new._ranges), dtype=torch.int64).pin_memory()
    g = torch.Generator().manual_seed(0)
    for b, s in SHAPES:
        ids = torch.randint(1000, 30000, (b, s), generator=g)
        cpu = dict(
            input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids)
        )
        gpu = {k: v.cuda() for k, v in cpu.items()}
        assert torch.equal(new(**gpu).last_hidden_state, old(**gpu).last_hidden_state)
        rounds: dict[str, list[float]] = {}
        for _ in range(2):
            for name, m in (("old", old), ("new", new)):
                for where, x in (("gpu", gpu), ("cpu", cpu)):
                    rounds.setdefault(f"{name}_{where}", []).append(time_ms(lambda: m(**x), 300))
        print(f"{b}x{s}", {k: [round(v, 4) for v in vs] for k, vs in rounds.items()}, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
