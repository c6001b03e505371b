"""Can encoder attention overlap its softmax with its tensor-core work? (issue 14, 8x512)

BERT-base's attention at 8x512 takes ~25 µs a layer with attention.py's flash kernel, about
258 TFLOP/s (H200, docs/performance.md, twenty-second session). At head dim 64 the
per-score softmax work is as large as the two dots', and Triton 3.6 waits for each dot right
after issuing it, so a program does one or the other. FlashAttention-3 overlaps them within a
warpgroup: the next key block's q k^T is issued before this block's softmax, and this block's
p v runs while the next block's softmax is computed. Gluon (Triton's lower-level dialect)
exposes the asynchronous wgmma and its wait, so that schedule can be written; this bench
measures it against the kernels the tuner has.

The Gluon kernel is kernl/kernels/attention_wgmma.py. `overlap=False` runs it with every
wgmma waited for at once: the schedule's own effect, separated from TMA's.

    python benchmarks/bench_attention_wgmma.py      # JSON lines, then a summary

Shapes: 8x512, 4x256 and 32x128 (batch x seq, 12 heads of 64, fp16), BERT's attention as the
model runs it (bench_attention_short.py's case: q, k, v views of one QKV projection, a padding
bias with a quarter of the rows right-padded, the output written as [B, L, H, D]), then
3x300 with kv_lens in bf16 (a ragged tail), checked only. Outputs are checked against float64
first; times are medians of CUDA-graph replays (bench_utils.median_ms)."""

from __future__ import annotations

import json
import math
import os
import sys

import torch

SHAPES = [(8, 512), (4, 256), (32, 128)]
H, D = 12, 64
VARIANTS = [  # (block_m, block_n, stages, overlap, num_warps[, lazy_rescale])
    (64, 64, 2, False, 4),  # the tuner's choice at 8x512
    # overlap: FlashAttention-3's order (kernels/attention_wgmma.py, `_overlapped_loop`); the
    # first overlapped schedule had every wgmma serialised by ptxas (warning C7514)
    (64, 64, 2, True, 4),
    (64, 64, 3, True, 4),
    (64, 128, 2, True, 4),
    (128, 64, 2, True, 4),
    (128, 64, 2, True, 8),
    (128, 64, 3, True, 8),
    (128, 128, 2, True, 8),
    # FlashAttention-4's lazy rescale: the accumulator's multiply skipped when no row's max
    # moved by more than 8 (base 2)
    (64, 64, 2, True, 4, True),
    (64, 128, 2, False, 4, True),
    (64, 128, 2, True, 4, True),
    # (measured 2026-12-04 and gone: half the exponentials on the FMA units, 14% slower at
    # 8x512; 32-key blocks (~95 registers a thread, 5 programs an SM), 27-31% slower at
    # 8x512; 128x128 with 4 warps and 256x64 with 8, 3.4x and 1.4x slower, c350d81)
]
# (measured 2026-12-04 and gone: the serial loop in a persistent grid, 2-4 programs an SM, each
# program's keys streamed across its tiles: 19-37% slower at 8x512;
# the kernel is in 5da9c67)


def _time_variant(name, run, ref, shape, row, median_ms) -> None:
    """`run(out)` checked against `ref` ([B, L, H, D]) and timed; a line and a summary cell."""
    batch, seq = shape
    out = torch.full((batch, seq, H, D), float("nan"), dtype=torch.float16, device="cuda")
    o_view = out.transpose(1, 2)
    try:
        run(o_view)
        torch.cuda.synchronize()
        err = (out.double() - ref).abs().max().item()
        ms = median_ms(lambda: run(o_view))
    except Exception as e:
        print(json.dumps({"shape": [batch, seq], "variant": name, "error": repr(e)[:400]}))
        return
    ok = err < 2e-2
    print(json.dumps({"shape": [batch, seq], "variant": name, "us": ms * 1e3,
                      "max_err": err, "ok": ok}), flush=True)  # fmt: skip
    row[name] = round(ms * 1e3, 2) if ok else f"wrong ({err:.3g})"


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_attention_short import case
    from bench_utils import device_info, median_ms

    from kernl.kernels.attention import attention, attention_configs, attention_reference
    from kernl.kernels.attention_wgmma import wgmma_attention

    print(json.dumps(device_info()), flush=True)
    summary = []
    for batch, seq in SHAPES:
        q, k, v, bias, _ = case(batch, seq)
        ref = attention_reference(q.double(), k.double(), v.double(), bias=bias.double())
        ref = ref.transpose(1, 2)  # [B, L, H, D]
        scale = 1 / math.sqrt(D)
        best_other = (float("inf"), "")
        for config in attention_configs(k, False, q, v):
            kind = "tma" if config.tma else "short" if config.programs_per_sm else "flash"
            out = torch.empty(batch, seq, H, D, dtype=torch.float16, device="cuda").transpose(1, 2)

            def run(c=config, o=out):
                return attention(q, k, v, bias=bias, sm_scale=scale, config=c, out=o)

            try:
                run()
            except Exception as e:  # a config the shape refuses
                print(json.dumps({"shape": [batch, seq], "kind": kind, "refused": str(e)[:120]}))
                continue
            ms = median_ms(run)
            if ms < best_other[0]:
                best_other = (ms, f"{kind} {config}")
        print(json.dumps({"shape": [batch, seq], "best_other_us": best_other[0] * 1e3,
                          "config": best_other[1]}), flush=True)  # fmt: skip
        row = {"shape": f"{batch}x{seq}", "best_other_us": round(best_other[0] * 1e3, 2)}
        for bm, bn, st, ov, nw, *lazy in VARIANTS:
            lazy = bool(lazy and lazy[0])
            name = f"wgmma {bm}x{bn} s{st} {'overlap' if ov else 'serial'} w{nw}"
            name += " lazy" if lazy else ""

            def run(o, a=(bm, bn, st, ov, nw, lazy)):
                return wgmma_attention(q, k, v, o, sm_scale=scale, bias=bias, kv_lens=None,
                                       block_m=a[0], block_n=a[1], num_stages=a[2],
                                       overlap=a[3], num_warps=a[4], lazy_rescale=a[5])  # fmt: skip

            _time_variant(name, run, ref, (batch, seq), row, median_ms)
        summary.append(row)
    print(json.dumps({"summary": summary}), flush=True)
    # a ragged tail, kv_lens, bf16, heads each in their own rows: correctness only
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (
        torch.randn(3, H, 300, D, dtype=torch.bfloat16, device="cuda", generator=g)
        for _ in range(3)
    )
    lens = torch.tensor([300, 17, 0], device="cuda")
    ref = attention_reference(q.double(), k.double(), v.double(), kv_lens=lens)
    for bm, bn, st, ov, nw, *lazy in VARIANTS:
        out = torch.full_like(q, float("nan"))
        try:
            wgmma_attention(q, k, v, out, sm_scale=1 / math.sqrt(D), bias=None, kv_lens=lens,
                            block_m=bm, block_n=bn, num_stages=st, overlap=ov, num_warps=nw,
                            lazy_rescale=bool(lazy and lazy[0]))  # fmt: skip
            err = (out.double() - ref).abs().max().item()
        except Exception as e:
            err = repr(e)[:300]
        print(json.dumps({"ragged": [bm, bn, st, ov, nw, *lazy], "max_err": err}), flush=True)


if __name__ == "__main__":
    main()
