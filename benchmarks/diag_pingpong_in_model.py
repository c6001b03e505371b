"""Why the ping-pong linear took 48 us a call inside the BERT-base artifact (32x128, 8x512)
when the tuner and bench_linear_wgmma.py timed it at 35.6-36 us (H200, 2026-12-04, issue 14).

    python benchmarks/diag_pingpong_in_model.py

BERT-base's FFN1 (M = 4096, K = 768, N = 3072, bias, tanh GELU) as the ping-pong kernel
(its tuned config) and as cuBLASLt's tanh-GELU epilogue, each captured in CUDA graphs of 12
calls in four settings: the same call 12 times ("alone"), and 12 layers of layer norm, FFN1
and FFN2 with one weight set or twelve ("layers shared" / "layers distinct", the model's case:
57 MB of FFN1 weights, more than L2 keeps); the ping-pong kernel launched through Triton's JIT
and from its recorded cubin as the runtime launches it ("binary"). Per setting: the FFN1
kernel's mean µs from the torch profiler over 20 replays (as profile_bert_kernels.py times
the artifact), and the replay's ms between CUDA events."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import device_info  # noqa: E402

from kernl.kernels.fused_linear import LinearConfig, fused_linear  # noqa: E402
from kernl.kernels.launch import launching_with  # noqa: E402
from kernl.runtime import binaries as b  # noqa: E402

M, K, N = 4096, 768, 3072
LAYERS = 12
PINGPONG = LinearConfig(128, 128, 64, 8, 4, 4, pingpong=True)


def weights(g, count):
    def one():
        return dict(
            w1=torch.randn(N, K, device="cuda", generator=g, dtype=torch.float16) * 0.02,
            b1=torch.randn(N, device="cuda", generator=g, dtype=torch.float16) * 0.02,
            w2=torch.randn(K, N, device="cuda", generator=g, dtype=torch.float16) * 0.02,
            b2=torch.randn(K, device="cuda", generator=g, dtype=torch.float16) * 0.02,
        )

    first = one()
    return [first if count == 1 else (first if i == 0 else one()) for i in range(LAYERS)]


def ffn1(impl, x, w, out):
    if impl == "cublas":
        return torch._addmm_activation(w["b1"], x, w["w1"].t(), use_gelu=True)
    return fused_linear(x, w["w1"], w["b1"], "gelu_tanh", out=out, config=PINGPONG)


def layers(setting, impl, x, ws, outs, ln_w, ln_b):
    h = x
    for i in range(LAYERS):
        if setting == "alone":
            ffn1(impl, x, ws[0], outs[i])
            continue
        a = F.layer_norm(h, (K,), ln_w, ln_b)
        f = ffn1(impl, a, ws[i], outs[i])
        h = F.linear(f, ws[i]["w2"], ws[i]["b2"])


def capture(*args):
    layers(*args)  # cuBLAS's handle and workspace outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layers(*args)
    return graph


def measure(graph, name_part):
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
    mine = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and name_part in e.key]
    total = sum(e.self_device_time_total for e in mine)
    count = sum(e.count for e in mine)
    return dict(kernel_us=total / max(count, 1), kernels=count, replay_ms=sorted(times)[10])


def main() -> None:
    print(json.dumps(device_info()), flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.float16)
    ln_w = torch.ones(K, device="cuda", dtype=torch.float16)
    ln_b = torch.zeros(K, device="cuda", dtype=torch.float16)
    outs = [torch.empty(M, N, device="cuda", dtype=torch.float16) for _ in range(LAYERS)]
    shared, distinct = weights(g, 1), weights(g, LAYERS)
    # the ping-pong kernel's cubin, recorded as the compiler records it
    found = {}
    with b.allow_jit(lambda key, kernel: found.setdefault(key, kernel)):
        ffn1("pingpong", x, shared[0], outs[0])
    kb = b.KernelBinaries(torch.device("cuda"))
    for key, kernel in found.items():
        kb.add(*b.spec_from_compiled(key, kernel))
    rows = []
    for setting, ws in (
        ("alone", shared),
        ("layers shared", shared),
        ("layers distinct", distinct),
    ):
        for impl, launch in (("cublas", "aten"), ("pingpong", "jit"), ("pingpong", "binary")):
            with b.allow_jit():
                if launch == "binary":
                    with launching_with(kb):
                        graph = capture(setting, impl, x, ws, outs, ln_w, ln_b)
                else:
                    graph = capture(setting, impl, x, ws, outs, ln_w, ln_b)
            part = "nvjet" if impl == "cublas" else "_pingpong_linear_kernel"
            if impl == "cublas" and setting != "alone":
                part = "gelubias"  # FFN1's cuBLASLt kernel, not FFN2's
            row = dict(setting=setting, impl=impl, launch=launch, **measure(graph, part))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\nsetting            impl      launch   FFN1 kernel us   replay ms")
    for r in rows:
        print(
            f"{r['setting']:18s} {r['impl']:9s} {r['launch']:7s} {r['kernel_us']:10.2f}"
            f" ({r['kernels']:3d}) {r['replay_ms']:9.3f}"
        )


if __name__ == "__main__":
    main()
