"""BERT-base's GEMMs at M = 4096 (32x128, 8x512) and 1024 (8x128), fp16: the persistent TMA
linear (kernels/linear_tma.py) over a sweep of tiles and modes against cuBLAS as kernl calls it
today (issue 14).

    python benchmarks/bench_linear_tma.py [--quick]      # JSON lines, then a summary table

Per GEMM (QKV, O, FFN1 with the erf GELU, FFN2; bias on all): cuBLAS with bias (F.linear);
for FFN1 also cuBLASLt's bias + tanh-GELU epilogue (kernl's path today) and cuBLAS then a
separate erf GELU; fused_linear.py's pointer kernel at its usual large tiles; and every TMA
config of the sweep. Each candidate's output is checked against cuBLAS + the erf GELU in fp32
first (max |diff|); times are medians of CUDA-graph replays (bench_utils.median_ms). Configs
compile on threads first (compile_ahead), the warp-specialised ones serially."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import device_info, median_ms  # noqa: E402

from kernl.compiler.compile_ahead import compile_ahead_calls  # noqa: E402
from kernl.kernels.fused_linear import LinearConfig, fused_linear, tma_linear_configs  # noqa: E402

GEMMS = {  # name: (N, K, activation)
    "QKV": (2304, 768, "none"),
    "O": (768, 768, "none"),
    "FFN1": (3072, 768, "gelu"),
    "FFN2": (768, 3072, "none"),
}
TILES = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 8, 5),
    (256, 128, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (64, 256, 64, 4, 4),
    (128, 64, 64, 4, 5),
]
MODES = [  # warp_specialize, flatten, split_epilogue
    (False, False, False),
    (False, True, False),
    (False, True, True),
    (True, False, False),
    (True, False, True),
]


def sweep() -> list[LinearConfig]:
    out = []
    for (bm, bn, bk, w, s), (ws, fl, sp) in itertools.product(TILES, MODES):
        if ws and w != 8:
            continue  # Triton 3.6's warp specialiser fails with 4 warps
        out.append(LinearConfig(bm, bn, bk, 8, w, s, ws, True, fl, sp))
    for c in tma_linear_configs():
        if c not in out:
            out.append(c)
    return out


CLASSIC = [LinearConfig(128, 256, 64, 8, 8, 3), LinearConfig(256, 128, 64, 8, 8, 3)]


def label(c: LinearConfig) -> str:
    kind = "tma" if c.tma else "ptr"
    flags = "".join(
        f for f, on in (("W", c.warp_specialize), ("F", c.flatten), ("S", c.split_epilogue)) if on
    )
    return (
        f"{kind} {c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K} w{c.num_warps} s{c.num_stages} {flags or '-'}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="M = 4096 only, the shipped configs")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON")
    args = ap.parse_args()
    print(json.dumps(device_info()), flush=True)
    configs = tma_linear_configs() if args.quick else sweep()
    rows_list = (4096,) if args.quick else (4096, 1024)
    g = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for rows, (name, (N, K, act)) in itertools.product(rows_list, GEMMS.items()):
        x = torch.randn(rows, K, dtype=torch.float16, device="cuda", generator=g)
        w = torch.randn(N, K, dtype=torch.float16, device="cuda", generator=g) / K**0.5
        b = torch.randn(N, dtype=torch.float16, device="cuda", generator=g)
        out = torch.empty(rows, N, dtype=torch.float16, device="cuda")
        ref = F.linear(x.float(), w.float(), b.float())
        ref = F.gelu(ref) if act == "gelu" else ref
        t0 = time.perf_counter()
        submitted = compile_ahead_calls(
            lambda c: fused_linear(x, w, b, act, out=out, config=c), configs + CLASSIC, 16
        )
        compile_s = time.perf_counter() - t0
        cands = {"cublas": lambda: F.linear(x, w, b)}
        if act == "gelu":
            cands["cublas gelu epilogue (tanh)"] = lambda: torch._addmm_activation(
                b, x, w.t(), use_gelu=True
            )
            cands["cublas + erf gelu"] = lambda: F.gelu(F.linear(x, w, b))
        for c in CLASSIC + configs:
            cands[label(c)] = lambda c=c: fused_linear(x, w, b, act, out=out, config=c)
        flops = 2 * rows * N * K
        for impl, fn in cands.items():
            row = dict(rows=rows, gemm=name, impl=impl)
            try:
                got = fn()
                torch.cuda.synchronize()
                row["max_diff"] = (got.float() - ref).abs().max().item()
                ms = median_ms(fn, rep=40)
                row |= dict(us=ms * 1e3, tflops=flops / ms / 1e9)
            except Exception as e:  # noqa: BLE001 - a failing config is reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[-300:]}"
            results.append(row)
            print(json.dumps(row), flush=True)
        print(json.dumps(dict(rows=rows, gemm=name, compiled_ahead=submitted, compile_s=compile_s)))
    with open(os.path.join(args.out, "linear_tma.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\nrows gemm   cublas us  today us  best tma us (config)                    tma/today")
    for rows, name in itertools.product(rows_list, GEMMS):
        mine = [r for r in results if r["rows"] == rows and r["gemm"] == name and "us" in r]
        by = {r["impl"]: r for r in mine}
        today = by.get("cublas gelu epilogue (tanh)", by["cublas"])
        tma = [r for r in mine if r["impl"].startswith("tma") and r["max_diff"] < 0.05]
        best = min(tma, key=lambda r: r["us"]) if tma else None
        print(
            f"{rows:5d} {name:5s} {by['cublas']['us']:9.2f} {today['us']:9.2f}  "
            + (
                f"{best['us']:9.2f} ({best['impl']:28s}) {best['us'] / today['us']:8.3f}"
                if best
                else "none"
            )
        )


if __name__ == "__main__":
    main()
