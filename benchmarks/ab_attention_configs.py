"""Every tuning candidate of BERT's encoder attention timed, one line each: for an A/B of two
trees of kernl, run once per tree (PYTHONPATH=<tree>), taking turns, on one GPU.

Written for the unmasked bias loads (2026-12-04): where every key block is full, the TMA and
Gluon kernels load their padding bias without a predicate and an address per column.

    PYTHONPATH=<tree> AB_TREE=before python benchmarks/ab_attention_configs.py

BERT-base's case as bench_attention_wgmma.py runs it (q, k, v views of one QKV projection, a
padding bias with a quarter of the rows right-padded, the output as [B, L, H, D]), fp16, at
8x512, 4x256, 32x128 and 8x128; every output checked against float64 before it is timed;
medians of CUDA-graph replays (bench_utils.median_ms)."""

from __future__ import annotations

import json
import math
import os
import sys

import torch

SHAPES = [(8, 512), (4, 256), (32, 128), (8, 128)]
H, D = 12, 64  # bench_attention_short.case's


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_attention_short import case
    from bench_utils import device_info, median_ms

    from kernl.kernels.attention import attention, attention_configs, attention_reference

    tree = os.environ.get("AB_TREE", "?")
    print(json.dumps({"tree": tree, **device_info()}), flush=True)
    for batch, seq in SHAPES:
        q, k, v, bias, _ = case(batch, seq)
        ref = attention_reference(q.double(), k.double(), v.double(), bias=bias.double())
        for config in attention_configs(k, False, q, v):
            out = torch.empty(batch, seq, H, D, dtype=torch.float16, device="cuda").transpose(1, 2)

            def run(c=config, o=out):
                return attention(q, k, v, bias=bias, sm_scale=1 / math.sqrt(D), config=c, out=o)

            line = {"tree": tree, "shape": f"{batch}x{seq}", "config": str(config)}
            try:
                run()
                torch.cuda.synchronize()
                line["max_err"] = (out.double() - ref).abs().max().item()
                line["us"] = median_ms(run) * 1e3
            except Exception as e:  # a config the shape refuses
                line["error"] = repr(e)[:160]
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
