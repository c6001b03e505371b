"""Can the weight stream cross a grid barrier? (issue 15, a diagnostic for the next step design)

The persistent decode step (kernels/decode_step.py) stops its weight stream at each of its
five grid barriers a layer: Triton's pipeliner issues a loop's first loads when the loop
starts, after the barrier. In the weight stream alone (bench_stream_linear.py) one barrier a
layer cost 15% of the bandwidth (3654 against 4312 GB/s, H200), and holding the next op's
first block in registers across the barrier made the step 9-20% slower (register pressure;
docs/performance.md, thirteenth session). Gluon (Triton's lower-level dialect) gives a kernel
its own shared memory and `cp.async` groups: a ring of weight blocks whose copies run ahead
of the compute across layer boundaries, since weights never depend on the barrier.

This bench streams 16 stacked gate/up-shaped layers W [16384, 2048] bf16 against one row
of x with a persistent grid (a program per SM, a 128-row tile each per layer), a grid barrier
between layers, three ways in Gluon:
  - `drain`: each layer's ring filled after its barrier (what Triton's pipeliner does);
  - `cross`: the copies of the next layer's first blocks issued before the barrier;
  - `free`: as `drain` without the barrier (the ceiling; until 2026-12-02 it skipped the
    refill too, read a quarter of the blocks from stale slots and failed its check);
and the same three with TMA (`tma-drain`, `tma-cross`, `tma-free`: one bulk copy a block into
mbarrier-guarded slots, as the megakernel streams; added after the cp.async ring's first run
streamed at 2.4-2.6 TB/s against Triton's 3.6 with barriers, whatever the mode), and Triton's
own persistent stream (bench_stream_linear's loop) with and without barriers.

    python benchmarks/bench_stream_gluon.py       # JSON to $OUT/bench_stream_gluon.json

Each case: captured in a CUDA graph (the barrier counter reset by the kernel itself),
replayed 10 times to warm up, the median of 50 replays timed with CUDA events; GB/s counts
the weight bytes. Each Gluon case is checked against torch (the last layer's y). A plain
script, not collected by pytest. First run 2026-12-02 (docs/performance.md, fourteenth
session); the TMA cases were written after it, compiled for sm_90a on a CPU, not run yet."""

from __future__ import annotations

import json
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LAYERS, N, K = 16, 16384, 2048


@gluon.jit
def _issue(ring, W, c, rows, cols, NKB: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
           total, N: gl.constexpr, K: gl.constexpr, active):  # fmt: skip
    """Copy block c of this program's flattened (layer, K block) sequence into ring slot
    c % STAGES (nothing past the last block), and close its cp.async group."""
    layer = c // NKB
    k0 = (c % NKB) * BK
    ptrs = W + (rows.to(gl.int64) + layer * N)[:, None] * K + (k0 + cols)[None, :]
    ok = active & (c < total)
    cp.async_copy_global_to_shared(ring.index(c % STAGES), ptrs, mask=ok & (rows < N)[:, None])
    cp.commit_group()


@gluon.jit
def _dot_block(acc, w_slot, x_ptr, cols, layout: gl.constexpr):
    """acc + the ring slot's [BN, BK] weight block times x's BK values at x_ptr."""
    w = w_slot.load(layout).to(gl.float32)
    x = gl.load(x_ptr + cols).to(gl.float32)
    return acc + gl.sum(w * x[None, :], axis=1)


@gluon.jit
def _arrive_and_wait(Sync, target, WAIT: gl.constexpr):
    gl.thread_barrier()  # every thread's stores precede the release
    gl.atomic_add(Sync, 1, sem="release", scope="gpu")
    if WAIT:
        seen = gl.load(Sync, volatile=True)
        while seen < target:
            seen = gl.load(Sync, volatile=True)
        # its value used, or Triton drops the acquire (decode_step_tasks.wait_until)
        confirmed = gl.atomic_add(Sync, 0, sem="acquire", scope="gpu")
        if confirmed < target:
            gl.atomic_max(Sync + 2, 1, sem="relaxed", scope="gpu")
        gl.thread_barrier()


@gluon.jit
def _stream_kernel(X, W, Y, Sync, L, N: gl.constexpr, K: gl.constexpr, BN: gl.constexpr,
                   BK: gl.constexpr, STAGES: gl.constexpr, MODE: gl.constexpr):  # fmt: skip
    """y[l, tile rows] = W[l, rows] @ x[l] for each layer l, a barrier between layers.
    MODE 0 drain, 1 cross, 2 free (no barrier)."""
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    # each thread copies and later reads the same 16-byte pieces: no CTA barrier between a
    # slot's copy, its read and its next copy
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    smem: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=1, order=[1, 0])
    ring = gl.allocate_shared_memory(W.dtype.element_ty, [STAGES, BN, BK], smem)
    rows = pid * BN + gl.arange(0, BN, gl.SliceLayout(1, layout))
    cols = gl.arange(0, BK, gl.SliceLayout(0, layout))
    active = pid < N // BN
    NKB: gl.constexpr = K // BK
    total = L * NKB
    for c in gl.static_range(STAGES - 1):  # the first layer's first blocks
        _issue(ring, W, c, rows, cols, NKB, BK, STAGES, total, N, K, active)
    acc = gl.zeros([BN], gl.float32, gl.SliceLayout(1, layout))
    for c in range(total):
        layer = c // NKB
        kb = c % NKB
        if MODE == 1:  # cross: block c + STAGES - 1, whatever its layer
            _issue(ring, W, c + STAGES - 1, rows, cols, NKB, BK, STAGES, total, N, K, active)
        else:  # drain: within this layer only; the next layer's after its barrier
            ahead = c + STAGES - 1
            _issue(ring, W, ahead, rows, cols, NKB, BK, STAGES, total, N, K,
                   active & (ahead // NKB == layer))  # fmt: skip
        cp.wait_group(STAGES - 1)
        acc = _dot_block(acc, ring.index(c % STAGES), X + layer * K + kb * BK, cols, layout)
        if kb == NKB - 1:
            gl.store(Y + layer * N + rows, acc, mask=active & (rows < N))
            acc = gl.zeros([BN], gl.float32, gl.SliceLayout(1, layout))
            if layer + 1 < L:
                if MODE != 1:  # drained (a masked copy may still be zero-filling a slot the
                    # refill writes: two copies to one address are unordered until waited for)
                    cp.wait_group(0)
                _arrive_and_wait(Sync, (layer + 1) * G, MODE != 2)
                if MODE != 1:  # refill the ring for the next layer (its slots, in order)
                    for s in gl.static_range(STAGES - 1):
                        _issue(ring, W, c + 1 + s, rows, cols, NKB, BK, STAGES, total, N, K,
                               active)  # fmt: skip
    cp.wait_group(0)
    # the last program out resets the counter for the next replay
    if gl.atomic_add(Sync + 1, 1, sem="acq_rel", scope="gpu") == G - 1:
        gl.store(Sync, 0)
        gl.store(Sync + 1, 0)


@gluon.jit
def _issue_tma(ring, bars, w_desc, c, row0, NKB: gl.constexpr, BK: gl.constexpr,
               STAGES: gl.constexpr, total, N: gl.constexpr, ok):  # fmt: skip
    """Block c of this program's (layer, K block) sequence into slot c % STAGES, by TMA; its
    mbarrier completes when the bytes have landed. Each block is issued exactly once, so a
    slot's n-th completion is phase n & 1."""
    slot = c % STAGES
    pred = ok & (c < total)
    bar = bars.index(slot)
    mbarrier.expect(bar, w_desc.block_type.nbytes, pred=pred)
    coord = [(c // NKB) * N + row0, (c % NKB) * BK]
    tma.async_copy_global_to_shared(w_desc, coord, bar, ring.index(slot), pred=pred)


@gluon.jit
def _stream_tma_kernel(X, w_desc, Y, Sync, L, N: gl.constexpr, K: gl.constexpr,
                       BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                       MODE: gl.constexpr):  # fmt: skip
    """_stream_kernel with TMA copies: W is a descriptor over [L N, K] in [BN, BK] blocks."""
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()  # the barriers' init before the async proxy uses them
    row0 = pid * BN
    rows = row0 + gl.arange(0, BN, gl.SliceLayout(1, layout))
    cols = gl.arange(0, BK, gl.SliceLayout(0, layout))
    active = pid < N // BN
    NKB: gl.constexpr = K // BK
    total = L * NKB
    for c in gl.static_range(STAGES - 1):
        _issue_tma(ring, bars, w_desc, c, row0, NKB, BK, STAGES, total, N, active)
    acc = gl.zeros([BN], gl.float32, gl.SliceLayout(1, layout))
    for c in range(total):
        layer = c // NKB
        kb = c % NKB
        ahead = c + STAGES - 1  # into the slot block c - 1 was read from: every warp is done
        gl.thread_barrier()  # with it, and its reads are ordered before the async write
        fence_async_shared()
        if MODE == 1:  # cross: block c + STAGES - 1, whatever its layer
            _issue_tma(ring, bars, w_desc, ahead, row0, NKB, BK, STAGES, total, N, active)
        else:  # within this layer only; the next layer's after its barrier
            _issue_tma(ring, bars, w_desc, ahead, row0, NKB, BK, STAGES, total, N,
                       active & (ahead // NKB == layer))  # fmt: skip
        mbarrier.wait(bars.index(c % STAGES), (c // STAGES) & 1, pred=active)
        acc = _dot_block(acc, ring.index(c % STAGES), X + layer * K + kb * BK, cols, layout)
        if kb == NKB - 1:
            gl.store(Y + layer * N + rows, acc, mask=active & (rows < N))
            acc = gl.zeros([BN], gl.float32, gl.SliceLayout(1, layout))
            if layer + 1 < L:
                _arrive_and_wait(Sync, (layer + 1) * G, MODE != 2)
                if MODE != 1:  # the next layer's first blocks, after the barrier
                    gl.thread_barrier()
                    fence_async_shared()
                    for s in gl.static_range(STAGES - 1):
                        _issue_tma(ring, bars, w_desc, c + 1 + s, row0, NKB, BK, STAGES, total,
                                   N, active)  # fmt: skip
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    if gl.atomic_add(Sync + 1, 1, sem="acq_rel", scope="gpu") == G - 1:
        gl.store(Sync, 0)
        gl.store(Sync + 1, 0)


MODES = {"drain": 0, "cross": 1, "free": 2}


def gluon_case(mode: str, bn: int = 128, bk: int = 128, stages: int = 4, nw: int = 4) -> dict:
    from bench_stream_linear import time_graph

    dev = "cuda"
    torch.manual_seed(0)
    W = torch.randn(LAYERS, N, K, device=dev, dtype=torch.bfloat16)
    X = torch.randn(LAYERS, K, device=dev, dtype=torch.bfloat16)
    Y = torch.zeros(LAYERS, N, device=dev, dtype=torch.float32)
    sync = torch.zeros(4, device=dev, dtype=torch.int32)
    grid = (torch.cuda.get_device_properties(dev).multi_processor_count,)
    row = dict(impl="gluon", mode=mode, BLOCK_N=bn, BLOCK_K=bk, stages=stages, num_warps=nw)

    if mode.startswith("tma-"):
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        layout = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.bfloat16)
        w_desc = TensorDescriptor.from_tensor(W.view(LAYERS * N, K), [bn, bk], layout)
        kernel, w_arg, m = _stream_tma_kernel, w_desc, MODES[mode[4:]]
    else:
        kernel, w_arg, m = _stream_kernel, W, MODES[mode]

    def fn():
        kernel[grid](X, w_arg, Y, sync, LAYERS, N=N, K=K, BN=bn, BK=bk, STAGES=stages, MODE=m,
                     num_warps=nw, launch_cooperative_grid=True)  # fmt: skip

    try:
        us = time_graph(fn)
        ref = W[-1].float() @ X[-1].float()
        err = ((Y[-1] - ref).abs().max() / ref.abs().max()).item()
        row.update(us=round(us, 1), gbps=round(W.numel() * 2 / us / 1e3), rel_err=err)
    except Exception as e:  # noqa: BLE001 - reported, the others still run
        row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
    return row


def main() -> None:
    from bench_stream_linear import case

    out = os.environ.get("OUT", ".")
    os.makedirs(out, exist_ok=True)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    rows = []
    for r in (
        *(gluon_case(m) for m in ("tma-drain", "tma-cross", "tma-free")),
        *(gluon_case(m, stages=6) for m in ("tma-drain", "tma-cross")),
        *(gluon_case(m, bn=64, bk=256, stages=6) for m in ("tma-drain", "tma-cross", "tma-free")),
        *(gluon_case(m) for m in ("drain", "cross", "free")),
        *(gluon_case(m, stages=6) for m in ("drain", "cross")),
        *(gluon_case(m, bk=64, stages=8) for m in ("drain", "cross")),
        # Triton's persistent stream, the loop the decode step uses (one row of x live)
        {"impl": "triton", **case("gate_up", "ptr", 4, 128, 128, 4, 1, 1, True)},
        {"impl": "triton", **case("gate_up", "ptr", 4, 128, 128, 4, 1, 1, False)},
    ):
        rows.append(r)
        figs = f"{r['us']:8.1f} us {r['gbps']:5d} GB/s" if "us" in r else r["error"]
        print(figs, {k: v for k, v in r.items() if k not in ("us", "gbps", "error")}, flush=True)
    with open(os.path.join(out, "bench_stream_gluon.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
