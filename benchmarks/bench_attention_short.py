"""BERT's encoder attention as a compiled model runs it, every candidate of the tuner timed in
one process (issue 14): attention.py's flash kernel (one program per query block) against
attention_short.py's persistent, tile-pipelined kernel (every key in one block), against
attention_tma.py's persistent kernel whose tiles move by TMA, and SDPA.

    python benchmarks/bench_attention_short.py            # JSON lines, then a summary table

Per shape (batch x seq, 12 heads of 64, fp16): q, k and v are views of one [B, L, 3, H, D]
QKV projection, the output is written as [B, L, H, D], and the padding mask is a [B, 1, 1, L]
fp32 bias of 0 / -inf (a quarter of the rows right-padded), as kernl_ops.attention gives it.
Each candidate's output is checked against a float64 reference first; times are medians of
CUDA-graph replays (bench_utils.median_ms), inputs hot in L2 as after the QKV GEMM."""

from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import device_info, median_ms  # noqa: E402

from kernl.kernels.attention import attention, attention_configs, attention_reference  # noqa: E402

SHAPES = [(1, 16), (1, 128), (8, 16), (8, 128), (32, 16), (32, 128), (4, 256), (8, 512)]
H, D = 12, 64


def case(batch: int, seq: int):
    """BERT's attention inputs at batch x seq (also bench_attention_wgmma's and
    ab_attention_configs's): q, k, v views of one QKV projection, a 0 / -inf padding bias with
    a quarter of the rows right-padded, and an output [B, L, H, D] seen as [B, H, L, D]."""
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(batch, seq, 3, H, D, dtype=torch.float16, device="cuda", generator=g)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    keep = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    keep[: max(1, batch // 4), seq // 2 :] = False
    bias = torch.zeros(batch, 1, 1, seq, device="cuda").masked_fill(
        ~keep[:, None, None, :], float("-inf")
    )
    out = torch.empty(batch, seq, H, D, dtype=torch.float16, device="cuda").transpose(1, 2)
    return q, k, v, bias, out


def main() -> None:
    print(json.dumps(device_info()), flush=True)
    summary = []
    for batch, seq in SHAPES:
        q, k, v, bias, out = case(batch, seq)
        ref = attention_reference(q.double(), k.double(), v.double(), bias=bias.double())
        sdpa_mask = bias.to(torch.float16)
        sdpa = median_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)
        )
        best: dict[str, tuple[float, str]] = {}
        for config in attention_configs(k, False, q, v):
            kind = "tma" if config.tma else "short" if config.programs_per_sm else "flash"
            scale = 1 / math.sqrt(D)

            def run(c=config):
                return attention(q, k, v, sm_scale=scale, bias=bias, out=out, config=c)

            try:
                out.fill_(float("nan"))  # an element a candidate leaves unwritten shows as NaN
                run()
                err = (out.double() - ref).abs().nan_to_num(float("inf")).max().item()
                us = median_ms(run) * 1000 if err < 2e-2 else float("nan")
            except Exception as e:  # a candidate that fails is reported, as the tuner skips it
                err, us = float("nan"), float("nan")
                print(
                    json.dumps(
                        {
                            "shape": f"{batch}x{seq}",
                            "config": str(config),
                            "error": f"{type(e).__name__}: {str(e)[:200]}",
                        }
                    ),
                    flush=True,
                )
            row = {"shape": f"{batch}x{seq}", "kind": kind, "config": str(config)}
            print(json.dumps(row | {"us": round(us, 2), "max_err": err}), flush=True)
            if us == us and (kind not in best or us < best[kind][0]):
                best[kind] = (us, str(config))
        summary.append((f"{batch}x{seq}", best, sdpa * 1000))
    print("\n| shape | flash best µs | short best µs | TMA best µs | TMA / best other | SDPA µs |")
    print("|---|---|---|---|---|---|")
    nan = (float("nan"), "")
    for shape, best, sdpa_us in summary:
        flash, short, tma = (best.get(kind, nan) for kind in ("flash", "short", "tma"))
        other = min(flash[0], short[0]) if short[0] == short[0] else flash[0]
        print(
            f"| {shape} | {flash[0]:.2f} | {short[0]:.2f} | {tma[0]:.2f} | "
            f"{tma[0] / other:.3f} | {sdpa_us:.2f} |"
        )
    for shape, best, _ in summary:
        for kind, (us, config) in sorted(best.items()):
            print(f"{shape} best {kind}: {us:.2f} µs {config.removeprefix('AttentionConfig')}")


if __name__ == "__main__":
    main()
