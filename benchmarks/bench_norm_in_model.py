"""The layer norm's configs where BERT runs them (issue 14): twelve post-LN layers of
BERT-base's O projection and FFN on cuBLAS (twelve weight sets) with kernl's add + norm
between, in one CUDA graph, against the same norms alone in a graph (24 calls over the
same two tensors: what the tuner times). Per M and norm config: µs per replay (CUDA events,
median of 300) of the layers, and of the norms alone per call. The persistent configs
(`programs_per_sm` > 0) walk the row blocks in a loop pipelined over `num_stages`.

    python benchmarks/bench_norm_in_model.py"""

from __future__ import annotations

import json
import statistics

import torch

from kernl.kernels.norm import NormConfig, layer_norm

LAYERS, H, FFN = 12, 768, 3072
CONFIGS = [NormConfig(2, 4), NormConfig(1, 4), NormConfig(4, 4), NormConfig(4, 8)]
CONFIGS += [NormConfig(m, w, p, s) for m, w in ((1, 4), (2, 4), (4, 4), (4, 8))
            for p in (2, 4, 8) for s in (1, 2)]  # fmt: skip


def replay_us(run, iters: int = 300) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    ts = []
    for i in range(iters + 30):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        if i >= 30:
            ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).half()

    layers = [
        dict(
            attn=rnd(4096, H, scale=0.5), wo=rnd(H, H, scale=H**-0.5), bo=rnd(H, scale=0.1),
            g1=1 + rnd(H, scale=0.1), c1=rnd(H, scale=0.1), w1=rnd(FFN, H, scale=H**-0.5),
            b1=rnd(FFN, scale=0.1), w2=rnd(H, FFN, scale=FFN**-0.5), b2=rnd(H, scale=0.1),
            g2=1 + rnd(H, scale=0.1), c2=rnd(H, scale=0.1),
        )
        for _ in range(LAYERS)
    ]  # fmt: skip
    x_all = rnd(4096, H)
    for M in (4096, 1024, 128):
        x0 = x_all[:M]
        ref = None
        for cfg in CONFIGS:

            def model(cfg=cfg):
                x = x0
                for lay in layers:
                    a = torch.addmm(lay["bo"], lay["attn"][:M], lay["wo"].t())
                    y = layer_norm(a, lay["g1"], lay["c1"], 1e-12, x, config=cfg)
                    f1 = torch._addmm_activation(lay["b1"], y, lay["w1"].t(), use_gelu=True)
                    f2 = torch.addmm(lay["b2"], f1, lay["w2"].t())
                    x = layer_norm(f2, lay["g2"], lay["c2"], 1e-12, y, config=cfg)
                return x

            out = model()
            ref = out if ref is None else ref
            same = torch.equal(out, ref)
            a, r = layers[0]["attn"][:M], x0

            def alone(cfg=cfg):
                for _ in range(2 * LAYERS):
                    layer_norm(a, layers[0]["g1"], layers[0]["c1"], 1e-12, r, config=cfg)

            row = dict(
                M=M, config=[cfg.BLOCK_M, cfg.num_warps, cfg.programs_per_sm, cfg.num_stages]
            )
            row |= dict(layers_us=round(replay_us(model), 1))
            row |= dict(norm_alone_us=round(replay_us(alone) / (2 * LAYERS), 2), same_output=same)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
