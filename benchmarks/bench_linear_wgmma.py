"""BERT-base's GEMMs at M = 4096 (32x128, 8x512) and 1024 (8x128), fp16: the Gluon linear
(kernels/linear_wgmma.py) over a sweep of tiles against cuBLAS as kernl calls it today
(issue 14).

    python benchmarks/bench_linear_wgmma.py      # JSON lines, then a summary table
    python benchmarks/bench_linear_wgmma.py --only pingpong   # cuBLAS and the ping-pong kernel

Per GEMM (QKV, O, FFN1, FFN2; bias on all): cuBLAS with bias (F.linear); for FFN1 also
cuBLASLt's bias + tanh-GELU epilogue (kernl's path today, which the compiler takes where its
error is within 2x stock PyTorch's); then every Gluon tile of the sweep, FFN1 with the erf
GELU and with the tanh one; then the warp-specialised kernel (kernels/linear_pingpong.py,
two consumer warp groups taking tiles in turn). The question is whether an epilogue beside
another tile's dots (two programs an SM, or two warp groups of one) beats cuBLAS where its
epilogue costs most. Outputs are checked against an fp32 reference first (max |diff|);
times are medians of CUDA-graph replays (bench_utils.median_ms)."""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import device_info, median_ms  # noqa: E402

from kernl.kernels.linear_pingpong import PINGPONG_CONFIGS, pingpong_linear  # noqa: E402
from kernl.kernels.linear_wgmma import WGMMA_LINEAR_CONFIGS, wgmma_linear  # noqa: E402

GEMMS = {  # name: (N, K, activation)
    "QKV": (2304, 768, "none"),
    "O": (768, 768, "none"),
    "FFN1": (3072, 768, "gelu"),
    "FFN2": (768, 3072, "none"),
}
SWEEP = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, STAGES, GROUP_M
    (128, 128, 64, 4, 4, 8),
    (128, 64, 64, 4, 3, 8),
    (64, 128, 64, 4, 4, 8),
    (64, 256, 64, 4, 3, 8),
    (64, 128, 64, 4, 3, 8),
    (128, 256, 64, 8, 4, 8),
    (256, 128, 64, 8, 3, 8),
    (128, 128, 64, 4, 3, 1),
    (128, 128, 64, 4, 3, 32),
]


def configs() -> list[tuple]:
    if "--only" in sys.argv and sys.argv[sys.argv.index("--only") + 1] == "pingpong":
        return []
    return [(*c, 8) for c in WGMMA_LINEAR_CONFIGS] + [c for c in SWEEP]


def main() -> None:
    print(json.dumps(device_info()), flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for rows, (name, (N, K, act)) in itertools.product((4096, 1024), GEMMS.items()):
        x = torch.randn(rows, K, dtype=torch.float16, device="cuda", generator=g)
        w = torch.randn(N, K, dtype=torch.float16, device="cuda", generator=g) / K**0.5
        b = torch.randn(N, dtype=torch.float16, device="cuda", generator=g)
        out = torch.empty(rows, N, dtype=torch.float16, device="cuda")
        lin = F.linear(x.float(), w.float(), b.float())
        refs = {"none": lin, "gelu": F.gelu(lin), "gelu_tanh": F.gelu(lin, approximate="tanh")}
        cands = {"cublas": (lambda: F.linear(x, w, b), "none")}
        if act == "gelu":
            cands["cublas gelu epilogue (tanh)"] = (
                lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True),
                "gelu_tanh",
            )
        acts = [act, "gelu_tanh"] if act == "gelu" else [act]
        for (bm, bn, bk, warps, stages, group), a in itertools.product(configs(), acts):

            def fn(bm=bm, bn=bn, bk=bk, warps=warps, stages=stages, group=group, a=a):
                return wgmma_linear(x, w, b, a, None, out, block=(bm, bn, bk), group_m=group,
                                    num_warps=warps, num_stages=stages)  # fmt: skip

            cands[f"gluon {bm}x{bn}x{bk} w{warps} s{stages} g{group} {a}"] = (fn, a)
        for (bm, bn, bk, stages), group, a in itertools.product(PINGPONG_CONFIGS, (8, 1), acts):

            def fn(bm=bm, bn=bn, bk=bk, stages=stages, group=group, a=a):
                return pingpong_linear(x, w, b, a, out, block=(bm, bn, bk), group_m=group,
                                       num_stages=stages)  # fmt: skip

            cands[f"gluon pingpong {bm}x{bn}x{bk} s{stages} g{group} {a}"] = (fn, a)
        flops = 2 * rows * N * K
        for impl, (fn, a) in cands.items():
            row = dict(rows=rows, gemm=name, impl=impl)
            try:
                out.fill_(float("nan"))
                got = fn()
                torch.cuda.synchronize()
                row["max_diff"] = (got.float() - refs[a]).abs().max().item()
                ms = median_ms(fn, rep=40)
                row |= dict(us=ms * 1e3, tflops=flops / ms / 1e9)
            except Exception as e:  # noqa: BLE001 - a failing config is reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[-300:]}"
            results.append(row)
            print(json.dumps(row), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "linear_wgmma.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\nrows gemm   cublas us  today us  best gluon us (config)                        /today")
    for rows, name in itertools.product((4096, 1024), GEMMS):
        mine = [r for r in results if r["rows"] == rows and r["gemm"] == name and "us" in r]
        by = {r["impl"]: r for r in mine}
        today = by.get("cublas gelu epilogue (tanh)", by["cublas"])
        for a in ("gelu", "gelu_tanh", "none"):
            ok = [
                r for r in mine
                if r["impl"].startswith("gluon") and r["impl"].endswith(f" {a}")
                and r["max_diff"] < 0.05
            ]  # fmt: skip
            if not ok:
                continue
            best = min(ok, key=lambda r: r["us"])
            print(
                f"{rows:5d} {name:5s} {by['cublas']['us']:9.2f} {today['us']:9.2f}  "
                f"{best['us']:9.2f} ({best['impl']:40s}) {best['us'] / today['us']:6.3f}"
            )


if __name__ == "__main__":
    main()
