"""Where BERT's residual add goes, measured (issue 14): into the layer norm after the GEMM
(kernl today: the norm reads the GEMM's output and the residual, 3 x 6.3 MB at M = 4096), or
into the GEMM itself, cuBLAS accumulating onto the residual in place (beta = 1, the residual
dead after it) with the norm then adding the bias as a broadcast row (2 x 6.3 MB).

Twelve post-LN layers of BERT-base's O projection and FFN (twelve weight sets), in one CUDA
graph, per M: µs per replay (CUDA events, median of 300), and each variant's output against
an fp32 run of the same layers.
- `norm_residual`: h = addmm(b, x, W^T); y = norm(h + r)          (today)
- `gemm_residual`: addmm(r, x, W^T, out=r); y = norm(r + b)      (the residual in the GEMM)
- `norm_alone`: h = addmm(b, x, W^T); y = norm(h)                (the norm's floor: no residual)

    python benchmarks/bench_residual_in_gemm.py"""

from __future__ import annotations

import json
import statistics

import torch

from kernl.kernels.norm import NormConfig, layer_norm

LAYERS, H, FFN = 12, 768, 3072


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", generator=g) * scale

    layers = [
        dict(
            attn=rnd(4096, H, scale=0.5),
            wo=rnd(H, H, scale=H**-0.5),
            bo=rnd(H, scale=0.1),
            g1=1 + rnd(H, scale=0.1),
            c1=rnd(H, scale=0.1),
            w1=rnd(FFN, H, scale=H**-0.5),
            b1=rnd(FFN, scale=0.1),
            w2=rnd(H, FFN, scale=FFN**-0.5),
            b2=rnd(H, scale=0.1),
            g2=1 + rnd(H, scale=0.1),
            c2=rnd(H, scale=0.1),
        )
        for _ in range(LAYERS)
    ]
    x_all = rnd(4096, H)
    cfg = NormConfig(2, 4)

    def model(M: int, variant: str, dtype):
        ls = [{k: v.to(dtype) for k, v in lay.items()} for lay in layers]
        x0 = x_all[:M].to(dtype)
        h = torch.empty_like(x0)

        def run():
            h.copy_(x0)
            x = h
            for lay in ls:
                attn = lay["attn"][:M]
                if variant == "gemm_residual":
                    torch.addmm(x, attn, lay["wo"].t(), out=x)
                    y = layer_norm(
                        x, lay["g1"], lay["c1"], 1e-12, lay["bo"].expand(M, H), config=cfg
                    )
                else:
                    a = torch.addmm(lay["bo"], attn, lay["wo"].t())
                    res = x if variant == "norm_residual" else None
                    y = layer_norm(a, lay["g1"], lay["c1"], 1e-12, res, config=cfg)
                f1 = torch._addmm_activation(
                    lay["b1"], y, lay["w1"].t(), use_gelu=dtype != torch.float32
                )
                if variant == "gemm_residual":
                    torch.addmm(y, f1, lay["w2"].t(), out=y)
                    x = layer_norm(
                        y, lay["g2"], lay["c2"], 1e-12, lay["b2"].expand(M, H), config=cfg
                    )
                else:
                    f2 = torch.addmm(lay["b2"], f1, lay["w2"].t())
                    res = y if variant == "norm_residual" else None
                    x = layer_norm(f2, lay["g2"], lay["c2"], 1e-12, res, config=cfg)
            return x

        return run

    for M in (4096, 1024, 128):
        ref = model(M, "norm_residual", torch.float32)().double()
        times = {}
        for variant in ("norm_residual", "gemm_residual", "norm_alone"):
            run = model(M, variant, torch.float16)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                run()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run()
            ts = []
            for i in range(330):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graph.replay()
                b.record()
                torch.cuda.synchronize()
                if i >= 30:
                    ts.append(a.elapsed_time(b) * 1e3)
            err = (out.double() - ref).abs().max().item() if variant != "norm_alone" else None
            times[variant] = statistics.median(ts)
            print(
                json.dumps(
                    dict(M=M, variant=variant, us=round(times[variant], 1), max_err_vs_fp32=err)
                ),
                flush=True,
            )
        saved = (times["norm_residual"] - times["gemm_residual"]) / (2 * LAYERS)
        print(json.dumps(dict(M=M, saved_us_per_norm=round(saved, 2))), flush=True)


if __name__ == "__main__":
    main()
