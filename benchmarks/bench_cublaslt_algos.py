"""BERT-base's linears through cuBLASLt with each algorithm its heuristic offers, against the
call kernl makes today (torch's addmm / _addmm_activation, the heuristic's first pick), fp16
(issue 14): is a better algorithm there to be chosen at build time?

    python benchmarks/bench_cublaslt_algos.py [--count 32]   # JSON lines, then a summary

Per GEMM (QKV, O, FFN1 with cuBLASLt's bias + GELU epilogue, FFN2; bias on all) and M
(4096: 32x128 and 8x512; 1024: 8x128; 128: 1x128): torch's call, then every algorithm of
`cublasLtMatmulAlgoGetHeuristic` (up to --count, 32 MiB of workspace allowed) through
benchmarks/cublaslt_ctypes.py. Each output is compared with torch's first (max |diff|); times
are medians of CUDA-graph replays (bench_utils.median_ms), so a memset an algorithm adds and
the idle after it count."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cublaslt_ctypes as cublaslt  # noqa: E402
from bench_utils import device_info, median_ms  # noqa: E402

GEMMS = {"QKV": (2304, 768, "bias"), "O": (768, 768, "bias"), "FFN1": (3072, 768, "gelu_bias"),
         "FFN2": (768, 3072, "bias")}  # fmt: skip
ROWS = (4096, 1024, 128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=32, help="algorithms asked of the heuristic")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON")
    args = ap.parse_args()
    print(json.dumps(device_info()), flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    workspace = torch.empty(cublaslt.WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    rows_out, summary = [], []
    for M, (name, (N, K, epilogue)) in itertools.product(ROWS, GEMMS.items()):
        x = torch.randn(M, K, dtype=torch.float16, device="cuda", generator=g)
        w = torch.randn(N, K, dtype=torch.float16, device="cuda", generator=g) / K**0.5
        b = torch.randn(N, dtype=torch.float16, device="cuda", generator=g)
        if epilogue == "gelu_bias":
            torch_call = lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)  # noqa: E731
        else:
            torch_call = lambda: F.linear(x, w, b)  # noqa: E731
        ref = torch_call()
        t_torch = median_ms(torch_call) * 1e3
        plan = cublaslt.LinearPlan.make(M, N, K, torch.float16, epilogue)
        algos = plan.candidates(b, args.count)
        out = torch.empty(M, N, dtype=torch.float16, device="cuda")
        best = None
        for i, algo in enumerate(algos):
            row = dict(M=M, gemm=name, index=i, algo=cublaslt.describe(algo))
            try:
                run = lambda a=algo: plan.run(x, w, b, out, a, workspace)  # noqa: E731
                out.fill_(float("nan"))
                run()
                torch.cuda.synchronize()
                row["max_diff"] = (out.float() - ref.float()).abs().max().item()
                row["us"] = median_ms(run) * 1e3
                if row["max_diff"] < 0.05 and (best is None or row["us"] < best["us"]):
                    best = row
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[-200:]}"
            rows_out.append(row)
            print(json.dumps(row), flush=True)
        first = next(
            (r for r in rows_out if r["M"] == M and r["gemm"] == name and r["index"] == 0), {}
        )
        s = dict(M=M, gemm=name, torch_us=t_torch, first_us=first.get("us"), algos=len(algos))
        if best:
            s |= dict(best_us=best["us"], best_index=best["index"], best_algo=best["algo"])
        summary.append(s)
        print(json.dumps(s), flush=True)
    with open(os.path.join(args.out, "cublaslt_algos.json"), "w") as f:
        json.dump({"rows": rows_out, "summary": summary}, f, indent=1)
    print("\n    M gemm  torch us  heuristic #0 us  best us (index, algo)          best / torch")
    for s in summary:
        if "best_us" in s:
            print(f"{s['M']:5d} {s['gemm']:5s} {s['torch_us']:8.2f} {s['first_us'] or 0:16.2f} "
                  f"{s['best_us']:8.2f} ({s['best_index']:2d}, {s['best_algo']:14s}) "
                  f"{s['best_us'] / s['torch_us']:8.3f}")  # fmt: skip
        else:
            print(
                f"{s['M']:5d} {s['gemm']:5s} {s['torch_us']:8.2f}  no algorithm ran ({s['algos']} offered)"
            )


if __name__ == "__main__":
    main()
