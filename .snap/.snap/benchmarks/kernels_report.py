"""Kernel library report for one GPU: ceilings, correctness (fp16 + bf16 vs float64) and every
comparison of the kernel-library issue, printed as markdown tables; JSON + log under $OUT.

    PYTHONUNBUFFERED=1 python benchmarks/kernels_report.py [--budget-s 330] [--no-tune]

"kernl default" is the launcher's default config; "kernl tuned" is the best of the file's
tuning space for that exact shape (what kernl-compile's tuner would store). Times are medians
of CUDA-event timings of CUDA-graph replays (see bench_utils.py). --ws runs only the
warp-specialised configs (kept in a separate process: a compiler crash there must not take the
main report down)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_utils as bu  # noqa: E402

OUT = os.environ.get("OUT", ".")
RESULTS: dict = {"info": {}, "ceilings": {}, "correctness": [], "bench": []}


def save() -> None:
    with open(os.path.join(OUT, os.environ.get("REPORT_JSON", "kernels_report.json")), "w") as f:
        json.dump(RESULTS, f, indent=1)


def ceilings() -> None:
    n = 256 * 1024 * 1024
    src = torch.randn(n, device="cuda", dtype=torch.float16)  # 512 MiB, far past L2
    dst = torch.empty_like(src)
    ms = bu.median_ms(lambda: dst.copy_(src))
    RESULTS["ceilings"]["copy_GBps"] = 4 * n / ms / 1e6  # bytes read + bytes written
    for dtype in (torch.float16, torch.bfloat16):
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=dtype) for _ in range(2))
        ms = bu.median_ms(lambda: a @ b)
        RESULTS["ceilings"][f"matmul_{str(dtype)[6:]}_TFLOPs"] = 2 * 8192**3 / ms / 1e9
    print("ceilings:", json.dumps(RESULTS["ceilings"]), flush=True)


def _err(out, ref):
    return (out.double() - ref).abs().max().item()


def correctness() -> None:
    """Max |err| vs float64 for kernl and for stock PyTorch in the same dtype; pass = kernl
    <= 2x stock + eps and every element written (outputs are prefilled with NaN)."""
    from kernl.kernels import (
        attention,
        bert_embeddings,
        decode_attention,
        fused_linear,
        gated_mlp,
        norm,
    )

    def rnd(*s, dtype):
        return torch.randn(*s, device="cuda", dtype=dtype)

    def nanbuf(shape, dtype):
        return torch.full(shape, float("nan"), device="cuda", dtype=dtype)

    for dtype in (torch.float16, torch.bfloat16):
        checks = []
        B, H, L = 2, 8, 1031
        for D in (64, 80, 128):
            for causal in (False, True):
                q, k, v = (rnd(B, H, L, D, dtype=dtype) for _ in range(3))
                out = attention.attention(q, k, v, causal=causal, out=nanbuf(q.shape, dtype))
                ref = F.scaled_dot_product_attention(
                    q.double(), k.double(), v.double(), is_causal=causal
                )
                stock = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                checks.append((f"attention hd{D} causal={causal}", out, ref, stock))
        q, k, v = (
            rnd(3, 8, 37, 64, dtype=dtype),
            rnd(3, 2, 1500, 64, dtype=dtype),
            rnd(3, 2, 1500, 64, dtype=dtype),
        )
        lens = torch.tensor([1500, 700, 40], device="cuda")
        bias = rnd(3, 1, 1, 1500, dtype=dtype)
        out = attention.attention(
            q, k, v, causal=True, kv_lens=lens, bias=bias, out=nanbuf(q.shape, dtype)
        )
        ref = attention.attention_reference(
            q.double(), k.double(), v.double(), causal=True, kv_lens=lens, bias=bias.double()
        )
        checks.append(
            (
                "attention gqa+kv_lens+bias Lq<Lk",
                out,
                ref,
                attention.attention_reference(q, k, v, causal=True, kv_lens=lens, bias=bias),
            )
        )
        q, k, v = (
            rnd(4, 32, 1, 128, dtype=dtype),
            rnd(4, 8, 9000, 128, dtype=dtype),
            rnd(4, 8, 9000, 128, dtype=dtype),
        )
        lens = torch.tensor([9000, 4500, 1, 8993], device="cuda")
        out = decode_attention.decode_attention(q, k, v, kv_lens=lens, out=nanbuf(q.shape, dtype))
        ref = decode_attention.decode_attention_reference(
            q.double(), k.double(), v.double(), kv_lens=lens
        )
        checks.append(
            (
                "decode attention",
                out,
                ref,
                decode_attention.decode_attention_reference(q, k, v, kv_lens=lens),
            )
        )
        x, r = rnd(3000, 768, dtype=dtype), rnd(3000, 3072, dtype=dtype)
        w, b = rnd(3072, 768, dtype=dtype) / math.sqrt(768), rnd(3072, dtype=dtype)
        for act in ("none", "gelu", "gelu_tanh", "silu", "relu"):
            out = fused_linear.fused_linear(x, w, b, act, r, out=nanbuf(r.shape, dtype))
            ref = fused_linear.fused_linear_reference(
                x.double(), w.double(), b.double(), act, r.double()
            )
            checks.append(
                (
                    f"linear {act}+residual",
                    out,
                    ref,
                    fused_linear.fused_linear_reference(x, w, b, act, r),
                )
            )
        wu = rnd(3072, 768, dtype=dtype) / math.sqrt(768)
        out = gated_mlp.gated_mlp(x, w, wu, out=nanbuf(r.shape, dtype))
        ref = gated_mlp.gated_mlp_reference(x.double(), w.double(), wu.double())
        checks.append(("gated mlp", out, ref, gated_mlp.gated_mlp_reference(x, w, wu)))
        for N in (768, 8192):
            x, r, w, b = (
                rnd(4099, N, dtype=dtype),
                rnd(4099, N, dtype=dtype),
                rnd(N, dtype=dtype),
                rnd(N, dtype=dtype),
            )
            for kind, fn, rf in (
                ("layer_norm", norm.layer_norm, norm.layer_norm_reference),
                ("rms_norm", norm.rms_norm, norm.rms_norm_reference),
            ):
                y, s = fn(x, w, b, 1e-5, r, return_sum=True, out=nanbuf(x.shape, dtype))
                ref = rf(x.double(), w.double(), b.double(), 1e-5, r.double())
                checks.append((f"add+{kind} N{N}", y, ref, rf(x, w, b, 1e-5, r)))
                checks.append((f"add+{kind} N{N} sum", s, x.double() + r.double(), x + r))
        tables = [rnd(n, 768, dtype=dtype) for n in (30522, 512, 2)] + [
            rnd(768, dtype=dtype),
            rnd(768, dtype=dtype),
        ]
        ids, tt = (
            torch.randint(0, 30522, (8, 512), device="cuda"),
            torch.randint(0, 2, (8, 512), device="cuda"),
        )
        out = bert_embeddings.bert_embeddings(
            ids, *tables, 1e-12, tt, out=nanbuf((8, 512, 768), dtype)
        )
        ref = bert_embeddings.bert_embeddings_reference(
            ids, *[t.double() for t in tables], 1e-12, tt
        )
        checks.append(
            (
                "bert embeddings",
                out,
                ref,
                bert_embeddings.bert_embeddings_reference(ids, *tables, 1e-12, tt),
            )
        )
        eps = 1e-3 if dtype == torch.float16 else 8e-3
        for name, out, ref, stock in checks:
            ours, theirs = _err(out, ref), _err(stock, ref)
            ok = not out.isnan().any().item() and ours <= 2 * theirs + eps
            RESULTS["correctness"].append(
                {
                    "dtype": str(dtype)[6:],
                    "check": name,
                    "kernl_err": ours,
                    "stock_err": theirs,
                    "pass": ok,
                }
            )
        torch.cuda.synchronize()
    save()


def cases() -> list[bu.Case]:
    out = [bu.attention_case(*s) for s in bu.ATTENTION_SHAPES]
    out += [bu.linear_case(*s) for s in bu.LINEAR_SHAPES]
    out += [bu.norm_case(*s) for s in bu.NORM_SHAPES]
    out += [bu.decode_case(s) for s in bu.DECODE_SHAPES]
    out += [bu.gated_mlp_case(4096, 4096, 11008)]
    return out


def bench(case: bu.Case, tune: bool, deadline: float, ws: bool = False) -> dict:
    row = {"op": case.op, "shape": case.label, "flops": case.flops, "bytes": case.bytes}
    for impl in case.impls:
        row[impl if impl != "kernl" else "kernl_default"] = bu.median_ms(case.make(impl))
    best, best_cfg = row["kernl_default"], "default"
    if tune and case.configs is not None and time.time() < deadline:
        for cfg in case.configs():
            if getattr(cfg, "warp_specialize", False) != ws:
                continue
            if time.time() > deadline:
                break
            try:
                ms = bu.median_ms(case.make("kernl", cfg), rep=30)
            except Exception as e:  # out of shared memory / registers: skip the config
                print(f"  {case.op} {case.label} {cfg}: {type(e).__name__}", flush=True)
                continue
            if ms < best:
                best, best_cfg = ms, cfg
        if best_cfg != "default":
            best = bu.median_ms(case.make("kernl", best_cfg))  # re-time the winner properly
    row["kernl_tuned"], row["tuned_config"] = best, str(best_cfg)
    return row


def _size(label: str) -> int:
    """The sequence length or row count in a label ("hd64 L512 ..." -> 512, "M4096 ..." -> 4096)."""
    for tok in label.split():
        if tok[0] in "LM" and tok[1:].isdigit():
            return int(tok[1:])
    return 1 << 30


def fmt_row(r: dict, copy_gbps: float) -> str:
    other = [k for k in ("sdpa", "cublas", "torch") if k in r][0]
    t_k, t_d, t_o = r["kernl_tuned"], r["kernl_default"], r[other]
    if r["flops"]:
        metric = f"{r['flops'] / t_k / 1e9:.0f} TFLOP/s (vs {r['flops'] / t_o / 1e9:.0f})"
    else:
        gbps = r["bytes"] / t_k / 1e6
        metric = f"{gbps:.0f} GB/s = {100 * gbps / copy_gbps:.0f}% copy (vs {r['bytes'] / t_o / 1e6:.0f})"
    return (
        f"| {r['op']} | {r['shape']} | {t_d * 1e3:.1f} | {t_k * 1e3:.1f} | {other} {t_o * 1e3:.1f} "
        f"| {t_o / t_k:.2f}x | {metric} | {r['tuned_config']} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=330)
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated op names to benchmark")
    ap.add_argument("--ws", action="store_true", help="tune over warp-specialised configs only")
    ap.add_argument("--no-correctness", action="store_true")
    ap.add_argument(
        "--min-size", type=int, default=0, help="skip shapes whose label has a smaller L/M"
    )
    args = ap.parse_args()
    start = time.time()
    RESULTS["info"] = bu.device_info() | {"date": time.strftime("%Y-%m-%d")}
    print(json.dumps(RESULTS["info"]), flush=True)
    ceilings()
    try:
        if not args.no_correctness:
            correctness()
    except Exception:
        traceback.print_exc()
    print(f"correctness done at {time.time() - start:.0f}s", flush=True)
    todo = [c for c in cases() if not args.only or c.op in args.only.split(",")]
    todo = [c for c in todo if _size(c.label) >= args.min_size]
    # defaults and stock first for every case, tuning sweeps with what time is left
    rows = []
    for c in todo:
        try:
            rows.append(bench(c, tune=False, deadline=0))
        except Exception:
            traceback.print_exc()
            rows.append(None)
        print(f"  {c.op} {c.label}: {rows[-1]}", flush=True)
        RESULTS["bench"] = [r for r in rows if r]
        save()
    deadline = start + args.budget_s
    if not args.no_tune:
        for i, c in enumerate(todo):
            if rows[i] is None or time.time() > deadline:
                continue
            try:
                rows[i] = bench(c, tune=True, deadline=deadline, ws=args.ws)
            except Exception:
                traceback.print_exc()
            print(
                f"  tuned {c.op} {c.label}: {rows[i]['kernl_tuned'] * 1e3:.1f} us {rows[i]['tuned_config']}",
                flush=True,
            )
            RESULTS["bench"] = [r for r in rows if r]
            save()
    copy = RESULTS["ceilings"]["copy_GBps"]
    print("\n## correctness (max |err| vs float64; pass = kernl <= 2x stock + eps, no NaN)\n")
    print("| dtype | check | kernl err | stock err | pass |\n|---|---|---|---|---|")
    for c in RESULTS["correctness"]:
        print(
            f"| {c['dtype']} | {c['check']} | {c['kernl_err']:.2e} | {c['stock_err']:.2e} | {c['pass']} |"
        )
    print(
        f"\n## speed ({RESULTS['info']['device']}; copy {copy:.0f} GB/s; ceilings {RESULTS['ceilings']})\n"
    )
    print(
        "| op | shape | kernl default us | kernl tuned us | stock us | speedup (tuned) | metric | tuned config |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r:
            print(fmt_row(r, copy))
    print(f"\ntotal {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
