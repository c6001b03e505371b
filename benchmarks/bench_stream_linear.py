"""How fast can a persistent grid stream decode weights? (issue 15, a diagnostic)

The persistent decode step (kernels/decode_step.py) reaches ~1.9 TB/s in its gate/up op where
the copy ceiling is ~4.26 TB/s, with one program per SM. This bench isolates the weight
stream: x [16, K] (one valid row) times 16 stacked layers of W [N, K] (bf16), each layer's
tiles taken round-robin by a persistent grid, with or without a grid barrier between layers,
for the loop shapes a persistent step could use:
  - pointer loads (cp.async pipelined, what decode_step does) or TMA tensor descriptors;
  - 4 or 8 warps, 1 or 2 programs per SM, tile rows, K block, stages;
  - split K (each split's partial stored, not reduced: the reduction is not what is timed);
and, as the reference, the same tiles as one plain (non-persistent) launch per layer.

    python benchmarks/bench_stream_linear.py      # JSON to $OUT/bench_stream_linear.json

Each case: captured in a CUDA graph, replayed 10 times to warm up, then the median of 50
replays timed one by one with CUDA events; GB/s counts the weight bytes only. A plain
script, not collected by pytest."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernl.kernels.decode_step_tasks import grid_sync  # noqa: E402

LAYERS = 16
SHAPES = {"gate_up": (16384, 2048), "down": (2048, 8192), "qkv": (3072, 2048)}


@triton.jit
def _stream_kernel(
    X, W, Y, Sync, Trace, M, L, N: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, BARRIER: tl.constexpr, FLATTEN: tl.constexpr,
    FIRST_LAYER,
):  # fmt: skip
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    offs_m = tl.arange(0, 16)
    m_mask = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    KC: tl.constexpr = K // SPLIT
    TASKS: tl.constexpr = N // BLOCK_N * SPLIT
    for layer in range(FIRST_LAYER, FIRST_LAYER + L):
        Wl = W + tl.cast(layer, tl.int64) * N * K
        for t in tl.range(pid, TASKS, G, flatten=FLATTEN):
            tile = t // SPLIT
            k_lo = (t % SPLIT) * KC
            offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            w_rows = Wl + offs_n.to(tl.int64)[:, None] * K
            acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
            for k0 in range(k_lo, k_lo + KC, BLOCK_K):
                ks = k0 + offs_k
                x = tl.load(X + offs_m[:, None] * K + ks[None, :], mask=m_mask[:, None], other=0.0)
                w = tl.load(w_rows + ks[None, :])
                acc = tl.dot(x, tl.trans(w), acc)
            out = Y + ((layer * SPLIT + t % SPLIT) * 16 + offs_m[:, None]) * N + offs_n[None, :]
            tl.store(out, acc, mask=m_mask[:, None])
        if BARRIER:
            grid_sync(Sync, (layer - FIRST_LAYER + 1) * G, Trace, 0, False)
    if BARRIER:  # the last program out resets the counter for the next replay
        if tl.atomic_add(Sync + 1, 1, sem="acq_rel", scope="gpu") == G - 1:
            tl.store(Sync, 0)
            tl.store(Sync + 1, 0)


@triton.jit
def _stream_tma_kernel(
    X, Wd, Y, Sync, Trace, M, L, N: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, BARRIER: tl.constexpr, FLATTEN: tl.constexpr,
    FIRST_LAYER,
):  # fmt: skip
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    offs_m = tl.arange(0, 16)
    m_mask = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    KC: tl.constexpr = K // SPLIT
    TASKS: tl.constexpr = N // BLOCK_N * SPLIT
    for layer in range(FIRST_LAYER, FIRST_LAYER + L):
        for t in tl.range(pid, TASKS, G, flatten=FLATTEN):
            tile = t // SPLIT
            k_lo = (t % SPLIT) * KC
            row = layer * N + tile * BLOCK_N
            acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
            for k0 in range(k_lo, k_lo + KC, BLOCK_K):
                ks = k0 + offs_k
                x = tl.load(X + offs_m[:, None] * K + ks[None, :], mask=m_mask[:, None], other=0.0)
                w = Wd.load([row, k0])
                acc = tl.dot(x, tl.trans(w), acc)
            offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            out = Y + ((layer * SPLIT + t % SPLIT) * 16 + offs_m[:, None]) * N + offs_n[None, :]
            tl.store(out, acc, mask=m_mask[:, None])
        if BARRIER:
            grid_sync(Sync, (layer - FIRST_LAYER + 1) * G, Trace, 0, False)
    if BARRIER:
        if tl.atomic_add(Sync + 1, 1, sem="acq_rel", scope="gpu") == G - 1:
            tl.store(Sync, 0)
            tl.store(Sync + 1, 0)


def time_graph(fn, warmup: int = 10, reps: int = 50) -> float:
    """Median µs of one replay of fn captured in a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return statistics.median(times)


def case(shape: str, mode: str, nw: int, bn: int, bk: int, stages: int, pps: int, split: int,
         barrier: bool, flatten: bool = False) -> dict:  # fmt: skip
    from triton.tools.tensor_descriptor import TensorDescriptor

    N, K = SHAPES[shape]
    dev = "cuda"
    W = torch.randn(LAYERS, N, K, device=dev, dtype=torch.bfloat16)
    X = torch.randn(16, K, device=dev, dtype=torch.bfloat16)
    Y = torch.empty(LAYERS, split, 16, N, device=dev, dtype=torch.float32)
    sync = torch.zeros(4, device=dev, dtype=torch.int32)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    tasks = N // bn * split
    meta = dict(N=N, K=K, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split, num_warps=nw, num_stages=stages)
    kernel, w_arg = _stream_kernel, W
    if mode.startswith("tma"):
        kernel, w_arg = _stream_tma_kernel, TensorDescriptor.from_tensor(W.view(-1, K), [bn, bk])
    if mode.endswith("plain"):  # one launch per layer, a CTA per task

        def fn():
            for layer in range(LAYERS):
                kernel[(tasks,)](X, w_arg, Y, sync, sync, 1, 1, BARRIER=False, FLATTEN=False,
                                 FIRST_LAYER=layer, **meta)  # fmt: skip
    else:
        grid = (sms * pps,)

        def fn():
            kernel[grid](X, w_arg, Y, sync, sync, 1, LAYERS, BARRIER=barrier, FLATTEN=flatten,
                         FIRST_LAYER=0, launch_cooperative_grid=barrier, **meta)  # fmt: skip

    row = dict(shape=shape, mode=mode, num_warps=nw, BLOCK_N=bn, BLOCK_K=bk, stages=stages,
               pps=pps, split=split, barrier=barrier, flatten=flatten)  # fmt: skip
    try:
        us = time_graph(fn)
        ref = (X[:1].float() @ W[3].float().T)[0]
        got = Y[3].sum(0)[0]
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        row.update(us=round(us, 1), gbps=round(W.numel() * 2 / us / 1e3), rel_err=err)
    except Exception as e:  # a config that does not fit (shared memory, cooperative grid)
        row.update(error=f"{type(e).__name__}: {str(e)[:120]}")
    del W
    return row


def main() -> None:
    out = os.environ.get("OUT", ".")
    os.makedirs(out, exist_ok=True)
    rows = []

    def run(*args, **kw):
        r = case(*args, **kw)
        rows.append(r)
        figs = f"{r['us']:8.1f} us {r['gbps']:5d} GB/s" if "us" in r else r["error"]
        print(figs, {k: v for k, v in r.items() if k not in ("us", "gbps", "error")}, flush=True)

    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    # the reference: one plain launch per layer
    for bn, bk, nw in ((64, 128, 4), (32, 256, 4), (128, 64, 4), (64, 64, 4)):
        run("gate_up", "plain", nw, bn, bk, 4, 1, 1, False)
    # persistent pointer loads: the decode step's loop
    for nw, bn, bk, stages, pps in itertools.product(
        (4, 8), (32, 64, 128), (64, 128, 256), (3, 4), (1, 2)
    ):
        run("gate_up", "ptr", nw, bn, bk, stages, pps, 1, True)
    # TMA tensor descriptors
    for nw, bn, bk, stages, pps in itertools.product(
        (4, 8), (32, 64, 128), (64, 128), (3, 4), (1, 2)
    ):
        run("gate_up", "tma", nw, bn, bk, stages, pps, 1, True)
    for bn, bk in ((64, 128), (128, 64)):
        run("gate_up", "tma-plain", 4, bn, bk, 4, 1, 1, False)
    ok = [r for r in rows if "us" in r and r["mode"] in ("ptr", "tma")]
    best = sorted(ok, key=lambda r: r["us"])[:4]
    for r in best:  # the barrier's cost, flatten, and the other shapes with split K
        keys = (r["num_warps"], r["BLOCK_N"], r["BLOCK_K"], r["stages"], r["pps"])
        run("gate_up", r["mode"], *keys, 1, False)
        run("gate_up", r["mode"], *keys, 1, True, flatten=True)
        for split in (1, 2, 4, 8):
            run("down", r["mode"], *keys, split, True)
        for split in (1, 2, 4):
            run("qkv", r["mode"], *keys, split, True)
    with open(os.path.join(out, "bench_stream_linear.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
