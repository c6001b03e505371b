"""The attention kernel at BERT-base's shapes with its padding-mask bias ([B, 1, 1, L], 0 /
-inf), before and after the bias became one row per key block (issue 14), every config of
`attention_configs()`, fp16, in one process.

    python benchmarks/ab_attention_bias.py [path/to/attention_before.py]

The "before" kernel is a copy of kernl/kernels/attention.py from the commit before the change
(`git show REV:kernl/kernels/attention.py > .diag/attention_before.py`; the default path), loaded
as a sibling module of kernl.kernels. q, k, v are views of one fused QKV output [B, L, 3, H, D]
and the output is written as [B, L, H, D], as the runtime does. Each figure is bench_utils'
median_ms (CUDA-graph replays, L2 not flushed: the inputs stay in L2 as in the model)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import torch
from bench_utils import median_ms

from kernl.kernels import attention as after

SHAPES = [(1, 16), (1, 128), (8, 128), (32, 128), (8, 512)]
H, D = 12, 64


def load_before(path: str):
    spec = importlib.util.spec_from_file_location("kernl.kernels.attention_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(before_path: str) -> None:
    before = load_before(before_path)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("shape    config                              before µs  after µs  after/before")
    for b, s in SHAPES:
        qkv = torch.randn(b, s, 3, H, D, dtype=torch.float16, device="cuda")
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        lens = torch.randint(s // 2, s + 1, (b,), device="cuda")
        lens[0] = s
        keep = torch.arange(s, device="cuda")[None, :] < lens[:, None]
        bias = torch.zeros(b, 1, 1, s, dtype=torch.float16, device="cuda")
        bias = bias.masked_fill(~keep[:, None, None, :], float("-inf"))
        out = torch.empty(b, s, H, D, dtype=torch.float16, device="cuda").transpose(1, 2)
        best = {"before": float("inf"), "after": float("inf")}
        # the old tuning space (it held two warp-specialised configs that never compiled)
        for old_cfg in before.attention_configs():
            cfg = after.AttentionConfig(**dataclasses.asdict(old_cfg))
            t = {}
            for name, mod, c in (("before", before, old_cfg), ("after", after, cfg)):
                try:
                    t[name] = 1000 * median_ms(
                        lambda: mod.attention(q, k, v, bias=bias, out=out, config=c)
                    )
                except Exception as e:  # a config this shape cannot take: say so, go on
                    t[name] = float("nan")
                    print(f"  {name} {cfg}: {type(e).__name__}: {str(e)[:100]}")
                if t[name] == t[name]:
                    best[name] = min(best[name], t[name])
            ref = after.attention_reference(q, k, v, bias=bias)
            try:
                err = (after.attention(q, k, v, bias=bias, config=cfg) - ref).abs().max().item()
            except Exception:
                err = float("nan")
            print(
                f"{b}x{s:<5}  {cfg.BLOCK_M}x{cfg.BLOCK_N} w{cfg.num_warps} s{cfg.num_stages}"
                f"{' ws' if cfg.warp_specialize else '   '}                   "
                f"{t['before']:8.2f}  {t['after']:8.2f}  {t['after'] / t['before']:.3f}"
                f"   max|err| {err:.4f}",
                flush=True,
            )
        print(
            f"{b}x{s:<5}  BEST  before {best['before']:.2f} µs  after {best['after']:.2f} µs  "
            f"({best['after'] / best['before']:.3f})\n",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".diag/attention_before.py")
