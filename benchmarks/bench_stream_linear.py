"""How fast can a persistent grid stream decode weights? (issue 15, a diagnostic)

The persistent decode step (kernels/decode_step.py) reaches ~1.9 TB/s in its gate/up op where
the copy ceiling is ~4.26 TB/s, with one program per SM. This bench isolates the weight
stream: x [16, K] (one valid row) times 16 stacked layers of W [N, K] (bf16), each layer's
tiles taken round-robin by a persistent grid, with or without a grid barrier between layers,
for the loop shapes a persistent step could use:
  - pointer loads (cp.async pipelined, what decode_step does) or TMA tensor descriptors;
  - 4 or 8 warps, 1 or 2 programs per SM, tile rows, K block, stages;
  - split K (each split's partial stored, not reduced: the reduction is not what is timed);
and, as the reference, the same tiles as one plain (non-persistent) launch per layer
(`STREAM_PART=sweep`). By default, the norm-folded pair ops (gate/up, QKV) with the norm in
the loop (as the step had it, measured at 2.05 TB/s), lightened, or out of it (3.5 TB/s):
what moved the norm to x's writer (docs/performance.md, 2026-12-01, eighth session).

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

from kernl.kernels import decode_step_tasks  # noqa: E402
from kernl.kernels.jit import made  # noqa: E402
from kernl.kernels.norm_linear import _norm_linear_loop  # noqa: E402

# Triton's own function: a kernl @jit is lazy, and a plain @triton.jit kernel cannot call it
grid_sync = made(decode_step_tasks.grid_sync)
LAYERS = 16
SHAPES = {"gate_up": (16384, 2048), "down": (2048, 8192), "qkv": (3072, 2048)}


@triton.jit
def _stream_kernel(
    X, W, Y, Sync, Trace, M, L, N: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, BARRIER: tl.constexpr, FLATTEN: tl.constexpr,
    FIRST_LAYER, TMA: tl.constexpr,
):  # fmt: skip
    """W: the stacked weights [L, N, K], or (TMA) a tensor descriptor over them as [L N, K]."""
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
            offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
            for k0 in range(k_lo, k_lo + KC, BLOCK_K):
                ks = k0 + offs_k
                x = tl.load(X + offs_m[:, None] * K + ks[None, :], mask=m_mask[:, None], other=0.0)
                if TMA:
                    w = W.load([layer * N + tile * BLOCK_N, k0])
                else:
                    rows = tl.cast(layer, tl.int64) * N + offs_n.to(tl.int64)
                    w = tl.load(W + rows[:, None] * K + ks[None, :])
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
def _pair_loop(X, NormW, w_rows, u_rows, offs_m, m_mask, k_lo, k_hi, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, MODE: tl.constexpr):  # fmt: skip
    """The norm-folded pair loop with the norm weight loaded as x is (MODE 1), the same without
    the sum of squares (2), or no norm at all (3)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    ss = tl.zeros([16], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < k_hi
        x_mask = m_mask[:, None] & k_mask[None, :]
        x = tl.load(X + offs_m[:, None] * k_hi + ks[None, :], mask=x_mask, other=0.0)  # whole rows
        if MODE == 3:
            h = x
        else:
            g = tl.load(NormW + offs_m[:, None] * 0 + ks[None, :], mask=k_mask[None, :], other=0.0)
            xf = x.to(tl.float32)
            if MODE == 1:
                ss += tl.sum(xf * xf, 1)
            h = (xf * g.to(tl.float32)).to(x.dtype)
        w = tl.load(w_rows + ks[None, :], mask=k_mask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc)
        wu = tl.load(u_rows + ks[None, :], mask=k_mask[None, :], other=0.0)
        acc_u = tl.dot(h, tl.trans(wu), acc_u)
    return acc, acc_u, ss


@triton.jit
def _pair_kernel(
    X, NormW, W, Y, Sync, Partial, SumSq, Counters, M, L, I: tl.constexpr, H: tl.constexpr,
    UP_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr,
):  # fmt: skip
    """gate/up (or QKV's pairs) in a persistent grid: MODE 0 the RMSNorm folded into every K
    block (norm_linear's loop, the persistent step's until dcfbf2d), 1-3 the variants of
    _pair_loop (3: what the step's loop is since); silu(gate) * up * rstd stored, a barrier
    per layer."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    offs_m = tl.arange(0, 16)
    m_mask = offs_m < M
    for layer in range(0, L):
        Wl = W + tl.cast(layer, tl.int64) * 2 * I * H
        for t in range(pid, I // UP_N, G):
            rows1 = t * UP_N + tl.arange(0, UP_N)
            rows2 = rows1 + I
            if MODE == 0:
                w_rows = Wl + rows1.to(tl.int64)[:, None] * H
                u_rows = Wl + rows2.to(tl.int64)[:, None] * H
                acc, acc_u, ss = _norm_linear_loop(
                    X, NormW, NormW, w_rows, u_rows, offs_m, m_mask, rows1 < I, 0, H, H, 1e-5,
                    H, UP_N, BLOCK_K, True, False, True, "tf32",
                )  # fmt: skip
            else:
                w_rows = Wl + rows1.to(tl.int64)[:, None] * H
                u_rows = Wl + rows2.to(tl.int64)[:, None] * H
                acc, acc_u, ss = _pair_loop(X, NormW, w_rows, u_rows, offs_m, m_mask, 0, H, UP_N,
                                            BLOCK_K, MODE)  # fmt: skip
            rstd = 1.0 / tl.sqrt(ss / H + 1e-5)
            out = acc * rstd[:, None] / (1 + tl.exp(-acc * rstd[:, None])) * acc_u * rstd[:, None]
            ptrs = Y + (layer * 16 + offs_m[:, None]) * I + rows1[None, :]
            tl.store(ptrs, out, mask=m_mask[:, None])
        grid_sync(Sync, (layer + 1) * G, Sync, 0, False)
    if tl.atomic_add(Sync + 1, 1, sem="acq_rel", scope="gpu") == G - 1:
        tl.store(Sync, 0)
        tl.store(Sync + 1, 0)


def pair_case(shape: str, mode: int, nw: int, up_n: int, bk: int, stages: int) -> dict:
    N2, H = SHAPES[shape]
    dev = "cuda"
    W = torch.randn(LAYERS, N2, H, device=dev, dtype=torch.bfloat16)
    X = torch.randn(16, H, device=dev, dtype=torch.bfloat16)
    g = torch.rand(H, device=dev, dtype=torch.bfloat16) + 0.5
    Y = torch.empty(LAYERS, 16, N2 // 2, device=dev, dtype=torch.float32)
    sync = torch.zeros(4, device=dev, dtype=torch.int32)
    scratch = torch.zeros(1 << 16, device=dev, dtype=torch.float32)
    counters = torch.zeros(4096, device=dev, dtype=torch.int32)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count

    def fn():
        _pair_kernel[(sms,)](X, g, W, Y, sync, scratch, scratch, counters, 1, LAYERS, I=N2 // 2,
                             H=H, UP_N=up_n, BLOCK_K=bk, MODE=mode, num_warps=nw,
                             num_stages=stages, launch_cooperative_grid=True)  # fmt: skip

    row = dict(shape=shape, mode=f"pair{mode}", num_warps=nw, BLOCK_N=up_n, BLOCK_K=bk,
               stages=stages, pps=1, split=1, barrier=True, flatten=False)  # fmt: skip
    try:
        us = time_graph(fn)
        row.update(us=round(us, 1), gbps=round(W.numel() * 2 / us / 1e3))
    except Exception as e:
        row.update(error=f"{type(e).__name__}: {str(e)[:120]}")
    return row


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
    kernel, w_arg, tma = _stream_kernel, W, mode.startswith("tma")
    meta = dict(
        N=N, K=K, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split, TMA=tma, num_warps=nw, num_stages=stages
    )
    if tma:
        w_arg = TensorDescriptor.from_tensor(W.view(-1, K), [bn, bk])
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
    if os.environ.get("STREAM_PART", "pair") == "pair":
        # the persistent step's norm-folded pair ops, and what slows them
        for shape, mode, (nw, up_n, bk, stages) in itertools.product(
            ("gate_up", "qkv"), (0, 1, 2, 3), ((4, 32, 256, 3), (4, 64, 128, 4), (4, 32, 128, 4))
        ):
            r = pair_case(shape, mode, nw, up_n, bk, stages)
            rows.append(r)
            figs = f"{r['us']:8.1f} us {r['gbps']:5d} GB/s" if "us" in r else r["error"]
            print(
                figs, {k: v for k, v in r.items() if k not in ("us", "gbps", "error")}, flush=True
            )
    else:
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
