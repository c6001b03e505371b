"""BERT-base's QKV projection and attention as one kernel (kernels/qkv_attention.py) against the
two launches a compiled model runs today: cuBLAS's QKV GEMM with its bias, then the best of
the tuner's attention kernels over views of its output (issue 14).

    python benchmarks/bench_qkv_attention.py           # JSON lines, then a summary table

Per shape (batch x seq, 12 heads of 64, fp16): hidden states [B, L, 768], the fused weight
[2304, 768] and bias, a [B, L] padding bias of 0 / -inf with a quarter of the rows
right-padded. Every candidate's output is checked against a float64 reference first; times
are medians of CUDA-graph replays (bench_utils.median_ms)."""

from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import device_info, median_ms  # noqa: E402

from kernl.kernels.attention import attention, attention_configs  # noqa: E402
from kernl.kernels.qkv_attention import (  # noqa: E402
    qkv_attention,
    qkv_attention_reference,
    qkv_attention_sweep,
)

SHAPES = [(32, 128), (64, 128), (16, 128), (8, 128), (64, 64), (128, 32)]
H, D = 12, 64
C = H * D


def case(batch: int, seq: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, seq, C, dtype=torch.float16, device="cuda", generator=g)
    w = torch.randn(3 * C, C, dtype=torch.float16, device="cuda", generator=g) / C**0.5
    b = torch.randn(3 * C, dtype=torch.float16, device="cuda", generator=g)
    keep = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    keep[: max(1, batch // 4), seq // 2 :] = False
    pad = torch.zeros(batch, seq, device="cuda").masked_fill(~keep, float("-inf"))
    return x, w, b, pad


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref).abs().nan_to_num(float("inf")).max().item()


def main() -> None:
    print(json.dumps(device_info()), flush=True)
    scale = 1 / math.sqrt(D)
    rows = []
    for batch, seq in SHAPES:
        x, w, b, pad = case(batch, seq)
        ref = qkv_attention_reference(
            x.double(), w.double(), b.double(), pad.double(), num_heads=H, sm_scale=scale
        )
        qkv = torch.empty(batch, seq, 3 * C, dtype=torch.float16, device="cuda")
        q, k, v = (qkv.view(batch, seq, 3, H, D)[:, :, i].transpose(1, 2) for i in range(3))
        out = torch.empty(batch, seq, C, dtype=torch.float16, device="cuda")
        out4 = out.view(batch, seq, H, D).transpose(1, 2)
        bias4 = pad[:, None, None, :]

        def gemm():  # as a compiled model's kernl.linear calls cuBLAS (kernl_ops.linear)
            return torch.nn.functional.linear(x, w, b)

        gemm_us = median_ms(gemm) * 1000
        qkv.copy_(gemm())
        best_att = (float("inf"), "")
        for config in attention_configs(k, False, q, v):

            def att(c=config):
                return attention(q, k, v, sm_scale=scale, bias=bias4, out=out4, config=c)

            try:
                out.fill_(float("nan"))
                att()
                err = _error(out, ref)
                us = median_ms(att) * 1000 if err < 2e-2 else float("nan")
            except Exception as e:  # a candidate that fails is skipped, as the tuner does
                err, us = float("nan"), float("nan")
                print(json.dumps({"shape": f"{batch}x{seq}", "attention": str(config),
                                  "error": f"{type(e).__name__}: {str(e)[:200]}"}), flush=True)  # fmt: skip
            if us < best_att[0]:
                best_att = (us, str(config))
        c_best = best_att[1]

        best_config = next(c for c in attention_configs(k, False, q, v) if str(c) == c_best)

        def unfused():
            views = gemm().view(batch, seq, 3, H, D)
            q, k, v = (views[:, :, i].transpose(1, 2) for i in range(3))
            attention(q, k, v, sm_scale=scale, bias=bias4, out=out4, config=best_config)

        unfused_us = median_ms(unfused) * 1000
        linear_out_us = median_ms(lambda: torch.nn.functional.linear(x, w, b, out=qkv)) * 1000
        x2, qkv2 = x.view(-1, C), qkv.view(-1, 3 * C)
        addmm_out_us = median_ms(lambda: torch.addmm(b, x2, w.t(), out=qkv2)) * 1000
        print(json.dumps({"shape": f"{batch}x{seq}", "cublas_qkv_us": round(gemm_us, 2),
                          "linear_out_us": round(linear_out_us, 2),
                          "addmm_out_us": round(addmm_out_us, 2),
                          "attention_best_us": round(best_att[0], 2), "attention": c_best,
                          "unfused_us": round(unfused_us, 2)}), flush=True)  # fmt: skip
        best_fused = (float("inf"), "")
        for config in qkv_attention_sweep():

            def fused(c=config):
                return qkv_attention(x, w, b, pad, out, num_heads=H, sm_scale=scale, config=c)

            try:
                out.fill_(float("nan"))
                fused()
                err = _error(out, ref)
                us = median_ms(fused) * 1000 if err < 2e-2 else float("nan")
            except Exception as e:
                err, us = float("nan"), float("nan")
                print(json.dumps({"shape": f"{batch}x{seq}", "fused": str(config),
                                  "error": f"{type(e).__name__}: {str(e)[:200]}"}), flush=True)  # fmt: skip
            print(json.dumps({"shape": f"{batch}x{seq}", "fused": str(config),
                              "us": round(us, 2), "max_err": err}), flush=True)  # fmt: skip
            if us < best_fused[0]:
                best_fused = (us, str(config))
        rows.append((f"{batch}x{seq}", gemm_us, best_att[0], unfused_us, *best_fused))
    print("\n| shape | cuBLAS QKV µs | best attention µs | both, one graph µs | fused best µs "
          "| fused / both | fused config |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for shape, gemm, att, both, fused, config in rows:
        print(f"| {shape} | {gemm:.2f} | {att:.2f} | {both:.2f} | {fused:.2f} | "
              f"{fused / both:.3f} | {config.removeprefix('QKVAttentionConfig')} |")  # fmt: skip


if __name__ == "__main__":
    main()
