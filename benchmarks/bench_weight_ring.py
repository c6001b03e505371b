"""Can one weight stream run through a whole decode layer's barriers? (issue 15, a diagnostic
for the step's next design)

The persistent decode step (kernels/decode_step.py) runs at ~2.6 TB/s over a Llama-1B step
(0.94 ms for 2.47 GB) where the copy ceiling is ~4.3 TB/s. Its ops are Triton loops whose
pipeliner issues the first weight loads after each grid barrier, so the stream stops at five
barriers a layer, and each small op (QKV, O) is mostly its ramp and tail. In a stream of one
shape, a Gluon TMA ring whose next blocks were issued before the barrier made the barrier
free (bench_stream_gluon.py, fifteenth session), but its single-partition loop streamed at
3.46 TB/s against 4.35 for Triton's loop without barriers.

This bench streams the step's real linear sequence: per layer QKV [3072, 2048], O [2048,
2048], gate/up [16384, 2048] and down [2048, 8192] (bf16, 16 layers, 1.94 GB), against one row
of x, with a grid barrier after every op, one persistent program an SM. Each op's [BN, BK]
weight blocks are split evenly over the programs in (tile, K block) order, each block's
partial dot added into y (fp32 atomics, the same in every variant). Variants:
  - `ring-cross`: Gluon, warp-specialised: one producer warp walks the program's blocks of
    every op of every layer into a TMA ring (it waits only for free slots), the consumer warp
    group waits for each block, multiplies, frees the slot, and meets the grid barrier at each
    op's end; so the next op's first blocks land while the barrier is met.
  - `ring-drain`: the same, but the producer also waits for each op's barrier before its
    first copy (the stream stops at each barrier, as in the step today).
  - `ring-free`: no barriers at all (the ring's own ceiling).
  - `ring-flags`: `cross` without the barrier between gate/up and down: each program counts
    its finished gate/up blocks per tile, and down waits only for the tiles its K blocks
    read (what the step could do where no norm needs a whole row).
  - `-owned` (any of the three): whole tiles (BN rows, all of K) round-robin instead of an
    even split of the blocks, so that one program sums each tile in a fixed order, as the
    step's epilogues need; small tiles (8-32 rows) keep the programs' shares even.
  - `triton`: the same blocks as one `tl.range` loop per op (pointer loads, cp.async
    pipelined), a grid barrier after each op, with and without (`triton-free`) the barriers.

    python benchmarks/bench_weight_ring.py        # JSON to $OUT/bench_weight_ring.json

Each case: captured in a CUDA graph (the barrier counter reset by the kernel itself), replayed
to warm up, the median of 30 replays timed with CUDA events; GB/s counts the weight bytes;
each case is checked against torch (every op's y of the last layer). A plain script, not
collected by pytest; its kernels compile for sm_90 on a CPU in
tests/kernels/test_compile_for_hopper.py."""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_stream_gluon import _arrive_and_wait  # noqa: E402

from kernl.kernels import decode_step_tasks  # noqa: E402
from kernl.kernels.jit import made  # noqa: E402

# Triton's own function: a kernl @jit is lazy, and a plain @triton.jit kernel cannot call it
grid_sync = made(decode_step_tasks.grid_sync)
LAYERS = 16
OPS = (("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192))
PRODUCER_REGS = gl.constexpr(40)


@gluon.jit
def _span(B, NKB, SPLIT: gl.constexpr):
    """This program's share of an op's B blocks (NKB a tile): (first tile, end, tile step,
    first block, end block). Split evenly in (tile, K block) order (a tile may be shared by two
    programs, whose partial sums then meet in y), or (SPLIT "owned") whole tiles
    round-robin, so that each tile's sum is one program's, in a fixed order, as the step's
    epilogues (rotary, SiLU, residual, the next norm) would need."""
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    if SPLIT == "owned":
        return pid, B // NKB, G, 0, B
    lo = pid * B // G
    hi = (pid + 1) * B // G
    return lo // NKB, (hi + NKB - 1) // NKB, 1, lo, hi


@gluon.jit
def _produce_op(desc, ring, ready, empty, step, layer, N: gl.constexpr, K: gl.constexpr,
                SPLIT: gl.constexpr):  # fmt: skip
    """Copy this program's blocks of one op (its even share of the op's (tile, K block) order)
    into the ring, each slot once the consumer freed it. Returns the ring step after them."""
    STAGES: gl.constexpr = ring.shape[0]
    BN: gl.constexpr = ring.shape[1]
    BK: gl.constexpr = ring.shape[2]
    NKB: gl.constexpr = K // BK
    B: gl.constexpr = N // BN * NKB
    t_lo, t_hi, t_step, lo, hi = _span(B, NKB, SPLIT)
    for tile in range(t_lo, t_hi, t_step):
        for b in range(gl.maximum(lo, tile * NKB), gl.minimum(hi, tile * NKB + NKB)):
            slot = step % STAGES
            # a barrier starts as if its phase 1 had completed: the first pass does not wait
            mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
            bar = ready.index(slot)
            mbarrier.expect(bar, desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                desc, [layer * N + tile * BN, (b % NKB) * BK], bar, ring.index(slot)
            )
            step += 1
    return step


@gluon.jit
def _consume_op(ring, ready, empty, step, X, Y, Sync, layer, N: gl.constexpr, K: gl.constexpr,
                layout: gl.constexpr, SPLIT: gl.constexpr, CONSUMER: gl.constexpr,
                SIGNAL: gl.constexpr = False, WAIT: gl.constexpr = False):  # fmt: skip
    """One op's blocks: `_consume_op_dynamic`, `_consume_op_mma` or `_consume_op_fma` (which
    alone takes the flags of BARRIER "flags": SIGNAL counts gate/up's finished blocks per
    tile, WAIT makes down wait for the tiles its K blocks read instead of a grid barrier)."""
    Flags = Sync + 32768
    if SPLIT == "dynamic":
        step = _consume_op_dynamic(ring, ready, empty, step, X, Y, Sync, layer, N, K, layout)
    elif CONSUMER == "mma":
        step = _consume_op_mma(ring, ready, empty, step, X, Y, layer, N, K, SPLIT)
    else:
        step = _consume_op_fma(
            ring, ready, empty, step, X, Y, layer, N, K, layout, SPLIT, Flags, SIGNAL, WAIT
        )
    return step


@gluon.jit
def _sum_blocks(ring, ready, empty, step, X, b0, b1, NKB: gl.constexpr, layout: gl.constexpr):
    """Blocks b0..b1 of one tile from the ring (from its slot `step` on) times x's blocks, the
    products summed elementwise in registers: (acc [BN, BK], the ring step after them). Each
    slot is freed once read; x's next block is loaded before this block's wait."""
    STAGES: gl.constexpr = ring.shape[0]
    BN: gl.constexpr = ring.shape[1]
    BK: gl.constexpr = ring.shape[2]
    cols = gl.arange(0, BK, gl.SliceLayout(0, layout))
    acc = gl.zeros([BN, BK], gl.float32, layout)
    x = gl.load(X + (b0 % NKB) * BK + cols)
    for b in range(b0, b1):
        nxt = b + 1
        x_next = gl.load(X + (nxt % NKB) * BK + cols, mask=(cols < BK) & (nxt < b1), other=0.0)
        slot = step % STAGES
        mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
        w = ring.index(slot).load(layout)
        gl.thread_barrier()  # every warp has read the slot before it goes back
        mbarrier.arrive(empty.index(slot), count=1)
        acc += w.to(gl.float32) * x.to(gl.float32)[None, :]
        x = x_next
        step += 1
    return acc, step


@gluon.jit
def _consume_op_fma(ring, ready, empty, step, X, Y, layer, N: gl.constexpr, K: gl.constexpr,
                    layout: gl.constexpr, SPLIT: gl.constexpr, Flags, SIGNAL: gl.constexpr,
                    WAIT: gl.constexpr):  # fmt: skip
    """y[layer, tile rows] += W tile @ x for this program's blocks of one op, tile by tile: each
    block's products summed elementwise in registers, reduced across the threads once at the
    tile's end (the first run reduced every block: that work, not HBM, bounded the ring), each
    ring slot freed once read. x's next block is loaded before this block's wait."""
    BN: gl.constexpr = ring.shape[1]
    BK: gl.constexpr = ring.shape[2]
    NKB: gl.constexpr = K // BK
    B: gl.constexpr = N // BN * NKB
    t_lo, t_hi, t_step, lo, hi = _span(B, NKB, SPLIT)
    rows = gl.arange(0, BN, gl.SliceLayout(1, layout))
    if WAIT:  # down: x's columns of this program's K blocks, gate's and up's rows, summed
        kb_lo = lo % NKB
        kb_hi = (hi - 1) % NKB + 1
        if (hi - lo >= NKB) | (lo // NKB != (hi - 1) // NKB):
            kb_lo = 0
            kb_hi = NKB
        g_lo = kb_lo * BK // BN
        g_hi = (kb_hi * BK + BN - 1) // BN
        _wait_tiles(Flags + layer * 512, g_lo, g_hi, 2048 // BK, Flags - 32768)  # K 2048
        _wait_tiles(Flags + layer * 512 + K // BN, g_lo, g_hi, 2048 // BK, Flags - 32768)
    for tile in range(t_lo, t_hi, t_step):
        b0 = gl.maximum(lo, tile * NKB)
        b1 = gl.minimum(hi, tile * NKB + NKB)
        acc, step = _sum_blocks(ring, ready, empty, step, X, b0, b1, NKB, layout)
        gl.atomic_add(Y + (layer * N + tile * BN) + rows, gl.sum(acc, axis=1), sem="relaxed")
        if SIGNAL:  # gate/up: this tile's blocks of this program are summed into y
            gl.thread_barrier()  # every thread's adds precede the (release) count
            gl.atomic_add(Flags + layer * 512 + tile, b1 - b0, sem="release", scope="gpu")
    return step


@gluon.jit
def _wait_tiles(Flags, t_lo, t_hi, target, Sync):
    """Wait until every count of Flags[t_lo:t_hi] reaches `target` (one poll covers 128), then
    acquire: what their writers released is visible. Bounded (~a second): a count that never
    comes sets Sync[2] (the case reports `flagged`) rather than hang the device."""
    one: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    offs = gl.arange(0, 128, one)
    for t0 in range(t_lo, t_hi, 128):
        idx = t0 + offs
        m = idx < t_hi
        seen = gl.min(gl.load(Flags + idx, mask=m, other=target, volatile=True), axis=0)
        polls = 0
        while (seen < target) & (polls < 1 << 20):
            seen = gl.min(gl.load(Flags + idx, mask=m, other=target, volatile=True), axis=0)
            polls += 1
        if seen < target:
            gl.atomic_max(Sync + 2, 1, sem="relaxed", scope="gpu")
    # its value used, or Triton drops the acquire (decode_step_tasks.wait_until)
    confirmed = gl.atomic_add(Flags + t_lo, 0, sem="acquire", scope="gpu")
    if confirmed < 0:
        gl.atomic_max(Flags + t_lo, 0, sem="relaxed", scope="gpu")
    gl.thread_barrier()


@gluon.jit
def _consume_op_mma(ring, ready, empty, step, X, Y, layer, N: gl.constexpr, K: gl.constexpr,
                    SPLIT: gl.constexpr):  # fmt: skip
    """`_consume_op` for 16 rows on the tensor cores, as the step's batches up to 16 need: X
    [16, K], Y [layers, 16, N]; per block one synchronous wgmma of x's block (rows padded to
    the warp group's 64, from registers) by the ring slot, read in place."""
    STAGES: gl.constexpr = ring.shape[0]
    BN: gl.constexpr = ring.shape[1]
    BK: gl.constexpr = ring.shape[2]
    NKB: gl.constexpr = K // BK
    B: gl.constexpr = N // BN * NKB
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16]
    )
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    xl: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    xr = gl.arange(0, 64, gl.SliceLayout(1, xl))
    xc = gl.arange(0, BK, gl.SliceLayout(0, xl))
    x_rows = X + xr[:, None] * K + xc[None, :]
    yr = gl.arange(0, 64, gl.SliceLayout(1, acc_layout))
    yc = gl.arange(0, BN, gl.SliceLayout(0, acc_layout))
    t_lo, t_hi, t_step, lo, hi = _span(B, NKB, SPLIT)
    for tile in range(t_lo, t_hi, t_step):
        b0 = gl.maximum(lo, tile * NKB)
        b1 = gl.minimum(hi, tile * NKB + NKB)
        acc = gl.zeros([64, BN], gl.float32, acc_layout)
        x = gl.load(x_rows + (b0 % NKB) * BK, mask=(xr < 16)[:, None], other=0.0)
        for b in range(b0, b1):
            nxt = b + 1
            x_next = gl.load(
                x_rows + (nxt % NKB) * BK, mask=(xr < 16)[:, None] & (nxt < b1), other=0.0
            )
            slot = step % STAGES
            mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
            acc = warpgroup_mma(
                gl.convert_layout(x, a_layout), ring.index(slot).permute((1, 0)), acc
            )
            gl.thread_barrier()  # every warp's dot is done with the slot before it goes back
            mbarrier.arrive(empty.index(slot), count=1)
            x = x_next
            step += 1
        out = Y + layer * 16 * N + yr[:, None] * N + (tile * BN + yc)[None, :]
        gl.atomic_add(out, acc, mask=(yr < 16)[:, None], sem="relaxed")
    return step


CHUNK = gl.constexpr(2)  # blocks a program takes at once where the split is dynamic


@gluon.jit
def _produce_op_dynamic(desc, ring, ready, empty, step, layer, Sync, op, N: gl.constexpr,
                        K: gl.constexpr):  # fmt: skip
    """`_produce_op` with the op's blocks taken CHUNK at a time from a counter (Sync[8 + op]):
    a program that streams faster takes more. Each chunk's id goes to the consumer at its first
    slot's entry of the program's Sync[1024 + 64 program:] (ordered before the slot's barrier
    completes by the arrival's release); a last slot without bytes says -1: no more chunks."""
    STAGES: gl.constexpr = ring.shape[0]
    BN: gl.constexpr = ring.shape[1]
    BK: gl.constexpr = ring.shape[2]
    NKB: gl.constexpr = K // BK
    CHUNKS: gl.constexpr = N // BN * NKB // CHUNK
    counter = Sync + 8 + layer * 4 + op
    c = gl.atomic_add(counter, 1, sem="relaxed", scope="gpu")
    while c < CHUNKS:
        c_next = gl.atomic_add(counter, 1, sem="relaxed", scope="gpu")  # asked for early
        for i in range(CHUNK):
            b = c * CHUNK + i
            slot = step % STAGES
            mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
            if i == 0:
                gl.store(Sync + 1024 + gl.program_id(0) * 64 + slot, c)
            bar = ready.index(slot)
            mbarrier.expect(bar, desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                desc, [layer * N + (b // NKB) * BN, (b % NKB) * BK], bar, ring.index(slot)
            )
            step += 1
        c = c_next
    slot = step % STAGES
    mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
    gl.store(Sync + 1024 + gl.program_id(0) * 64 + slot, -1)
    mbarrier.arrive(ready.index(slot), count=1)
    return step + 1


@gluon.jit
def _consume_op_dynamic(ring, ready, empty, step, X, Y, Sync, layer, N: gl.constexpr,
                        K: gl.constexpr, layout: gl.constexpr):  # fmt: skip
    """`_consume_op` over the chunks `_produce_op_dynamic` took, until its -1."""
    STAGES: gl.constexpr = ring.shape[0]
    BN: gl.constexpr = ring.shape[1]
    BK: gl.constexpr = ring.shape[2]
    NKB: gl.constexpr = K // BK
    Meta = Sync + 1024 + gl.program_id(0) * 64
    rows = gl.arange(0, BN, gl.SliceLayout(1, layout))
    mbarrier.wait(ready.index(step % STAGES), (step // STAGES) & 1)
    c = gl.load(Meta + step % STAGES, volatile=True)
    while c >= 0:
        b0 = c * CHUNK
        acc, step = _sum_blocks(ring, ready, empty, step, X, b0, b0 + CHUNK, NKB, layout)
        gl.atomic_add(Y + (layer * N + (b0 // NKB) * BN) + rows, gl.sum(acc, axis=1), sem="relaxed")
        mbarrier.wait(ready.index(step % STAGES), (step // STAGES) & 1)
        c = gl.load(Meta + step % STAGES, volatile=True)
    gl.thread_barrier()  # every warp has read the -1 before its slot goes back
    mbarrier.arrive(empty.index(step % STAGES), count=1)
    return step + 1


@gluon.jit
def _now_ns(x):
    """The GPU's global timer in ns (x: any scalar, for the result's shape)."""
    return gl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=gl.int64, is_pure=False, pack=1
    )


@gluon.jit
def _grid_sync(Sync, target, Trace, index, TRACE: gl.constexpr):
    """Arrive, wait for `target` arrivals; with TRACE the times of arrival and of leaving go to
    Trace[program, index, 0:2]."""
    Tr = Trace + (gl.program_id(0) * 4096 + index) * 2
    if TRACE:
        gl.store(Tr, _now_ns(index))
    _arrive_and_wait(Sync, target, True)
    if TRACE:
        gl.store(Tr + 1, _now_ns(index))


@gluon.jit
def _consumer(ring, ready, empty, d0, d1, d2, d3, X0, X1, X2, X3, Y0, Y1, Y2, Y3, Sync,
              L, Trace, BARRIER: gl.constexpr, SPLIT: gl.constexpr, TRACE: gl.constexpr,
              CONSUMER: gl.constexpr):  # fmt: skip
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [gl.num_warps(), 1], [1, 0])
    G = gl.num_programs(0)
    FLAGS: gl.constexpr = BARRIER == "flags"
    NB: gl.constexpr = 4 - FLAGS  # grid barriers a layer
    step = 0
    for layer in range(L):
        base = layer * NB * G
        step = _consume_op(
            ring, ready, empty, step, X0, Y0, Sync, layer, 3072, 2048, layout, SPLIT, CONSUMER
        )
        if BARRIER != "free":
            _grid_sync(Sync, base + G, Trace, layer * 4 + 0, TRACE)
        step = _consume_op(
            ring, ready, empty, step, X1, Y1, Sync, layer, 2048, 2048, layout, SPLIT, CONSUMER
        )
        if BARRIER != "free":
            _grid_sync(Sync, base + 2 * G, Trace, layer * 4 + 1, TRACE)
        step = _consume_op(ring, ready, empty, step, X2, Y2, Sync, layer, 16384, 2048, layout,
                           SPLIT, CONSUMER, FLAGS)  # fmt: skip
        if (BARRIER != "free") & (BARRIER != "flags"):
            _grid_sync(Sync, base + 3 * G, Trace, layer * 4 + 2, TRACE)
        step = _consume_op(ring, ready, empty, step, X3, Y3, Sync, layer, 2048, 8192, layout,
                           SPLIT, CONSUMER, False, FLAGS)  # fmt: skip
        if BARRIER != "free":
            _grid_sync(Sync, base + NB * G, Trace, layer * 4 + 3, TRACE)
    # the last program out resets the counter for the next replay
    if gl.atomic_add(Sync + 1, 1, sem="acq_rel", scope="gpu") == G - 1:
        gl.store(Sync, 0)
        gl.store(Sync + 1, 0)


@gluon.jit
def _produce(desc, ring, ready, empty, step, layer, Sync, target, op, N: gl.constexpr,
             K: gl.constexpr, BARRIER: gl.constexpr, SPLIT: gl.constexpr):  # fmt: skip
    """One op's copies (`drain`: once the barrier that ends the op before, `target` arrivals,
    is met), split as SPLIT says."""
    if BARRIER == "drain":  # the op before has met its barrier: only then this op's copies
        seen = gl.load(Sync, volatile=True)
        while seen < target:
            seen = gl.load(Sync, volatile=True)
    if SPLIT == "dynamic":
        step = _produce_op_dynamic(desc, ring, ready, empty, step, layer, Sync, op, N, K)
    else:
        step = _produce_op(desc, ring, ready, empty, step, layer, N, K, SPLIT)
    return step


@gluon.jit
def _producer(ring, ready, empty, d0, d1, d2, d3, X0, X1, X2, X3, Y0, Y1, Y2, Y3, Sync,
              L, Trace, BARRIER: gl.constexpr, SPLIT: gl.constexpr, TRACE: gl.constexpr,
              CONSUMER: gl.constexpr):  # fmt: skip
    G = gl.num_programs(0)
    step = 0
    for layer in range(L):
        base = layer * 4 * G
        step = _produce(
            d0, ring, ready, empty, step, layer, Sync, base, 0, 3072, 2048, BARRIER, SPLIT
        )
        step = _produce(
            d1, ring, ready, empty, step, layer, Sync, base + G, 1, 2048, 2048, BARRIER, SPLIT
        )
        step = _produce(
            d2, ring, ready, empty, step, layer, Sync, base + 2 * G, 2, 16384, 2048, BARRIER, SPLIT
        )
        step = _produce(
            d3, ring, ready, empty, step, layer, Sync, base + 3 * G, 3, 2048, 8192, BARRIER, SPLIT
        )


@gluon.jit
def _ring_kernel(d0, d1, d2, d3, X0, X1, X2, X3, Y0, Y1, Y2, Y3, Sync, L, Trace,
                 STAGES: gl.constexpr, BARRIER: gl.constexpr, SPLIT: gl.constexpr,
                 TRACE: gl.constexpr, CONSUMER: gl.constexpr,
                 num_warps: gl.constexpr):  # fmt: skip
    """Every op of every layer through one TMA ring of STAGES [BN, BK] blocks. BARRIER "drain",
    "cross" or "free" (module docstring); SPLIT "even", "owned" (whole tiles a program,
    `_span`) or "dynamic" (blocks taken CHUNK at a time from a counter, `_produce_op_dynamic`);
    CONSUMER "fma" (one row of x) or "mma" (16 rows on the tensor cores, `_consume_op_mma`)."""
    BN: gl.constexpr = d0.block_type.shape[0]
    BK: gl.constexpr = d0.block_type.shape[1]
    ring = gl.allocate_shared_memory(d0.dtype, [STAGES, BN, BK], d0.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    fence_async_shared()
    # the argument tuples written in the call: a tuple assigned first holds tensors, and a
    # constexpr in it (a string here) fails or (an int) reaches the partition as a runtime value
    gl.warp_specialize(
        [
            (_consumer, (ring, ready, empty, d0, d1, d2, d3, X0, X1, X2, X3, Y0, Y1, Y2, Y3,
                         Sync, L, Trace, BARRIER, SPLIT, TRACE, CONSUMER)),
            (_producer, (ring, ready, empty, d0, d1, d2, d3, X0, X1, X2, X3, Y0, Y1, Y2, Y3,
                         Sync, L, Trace, BARRIER, SPLIT, TRACE, CONSUMER)),
        ],
        [1],
        [PRODUCER_REGS],
    )  # fmt: skip


@triton.jit
def _triton_op(W, X, Y, layer, N: tl.constexpr, K: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    NKB: tl.constexpr = K // BK
    B: tl.constexpr = N // BN * NKB
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    rows = tl.arange(0, BN)
    cols = tl.arange(0, BK)
    W_l = W + tl.cast(layer, tl.int64) * N * K
    for b in tl.range(pid * B // G, (pid + 1) * B // G, num_stages=STAGES):
        r = (b // NKB) * BN + rows
        k = (b % NKB) * BK + cols
        w = tl.load(W_l + r.to(tl.int64)[:, None] * K + k[None, :])
        x = tl.load(X + k)
        part = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], 1)
        tl.atomic_add(Y + layer * N + r, part, sem="relaxed")


@triton.jit
def _barrier(Sync, target, BARRIER: tl.constexpr):
    if BARRIER:  # the persistent step's own grid barrier
        grid_sync(Sync, target, Sync, 0, False)


@triton.jit
def _triton_kernel(W0, W1, W2, W3, X0, X1, X2, X3, Y0, Y1, Y2, Y3, Sync, L, BN: tl.constexpr,
                   BK: tl.constexpr, STAGES: tl.constexpr, BARRIER: tl.constexpr):  # fmt: skip
    G = tl.num_programs(0)
    for layer in range(L):
        base = layer * 4 * G
        _triton_op(W0, X0, Y0, layer, 3072, 2048, BN, BK, STAGES)
        _barrier(Sync, base + G, BARRIER)
        _triton_op(W1, X1, Y1, layer, 2048, 2048, BN, BK, STAGES)
        _barrier(Sync, base + 2 * G, BARRIER)
        _triton_op(W2, X2, Y2, layer, 16384, 2048, BN, BK, STAGES)
        _barrier(Sync, base + 3 * G, BARRIER)
        _triton_op(W3, X3, Y3, layer, 2048, 8192, BN, BK, STAGES)
        _barrier(Sync, base + 4 * G, BARRIER)
    if BARRIER:
        if tl.atomic_add(Sync + 1, 1, sem="acq_rel", scope="gpu") == G - 1:
            tl.store(Sync, 0)
            tl.store(Sync + 1, 0)


def case(impl: str, weights, xs, bn: int, bk: int, stages: int, nw: int = 4,
         consumer: str = "fma") -> dict:  # fmt: skip
    from bench_stream_linear import time_graph
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    dev = "cuda"
    ys = [torch.zeros(LAYERS, n, device=dev, dtype=torch.float32) for _, n, _ in OPS]
    if consumer == "mma":  # 16 rows of x, [layers, 16, N] of y
        xs = [torch.randn(16, k, device=dev, dtype=torch.bfloat16) for _, _, k in OPS]
        ys = [torch.zeros(LAYERS, 16, n, device=dev, dtype=torch.float32) for _, n, _ in OPS]
    # [0] the barrier's arrivals, [1] the programs out, [2] a wait timed out, [8:] the dynamic
    # split's chunk counters, one an op of each layer, [1024 + 64 program:] its chunk ids,
    # [32768 + 512 layer:] gate/up's finished blocks per tile (BARRIER "flags")
    sync = torch.zeros(32768 + 512 * LAYERS, device=dev, dtype=torch.int32)
    grid = (torch.cuda.get_device_properties(dev).multi_processor_count,)
    row = dict(impl=impl, BN=bn, BK=bk, stages=stages, num_warps=nw, consumer=consumer)
    if impl.startswith("ring"):
        layout = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.bfloat16)
        descs = [TensorDescriptor.from_tensor(w.view(-1, w.shape[-1]), [bn, bk], layout)
                 for w in weights]  # fmt: skip
        parts = impl.split("-")  # ring-BARRIER[-SPLIT]
        barrier, split = parts[1], parts[2] if len(parts) > 2 else "even"

        trace = torch.zeros(grid[0], 4096, 2, device=dev, dtype=torch.int64)

        def fn(traced: bool = False):
            for y in ys:
                y.zero_()
            sync[8:1024].zero_()
            sync[32768:].zero_()
            _ring_kernel[grid](*descs, *xs, *ys, sync, LAYERS, trace, STAGES=stages,
                               BARRIER=barrier, SPLIT=split, CONSUMER=consumer,
                               TRACE=traced, num_warps=nw,
                               launch_cooperative_grid=barrier != "free")  # fmt: skip
    else:
        barrier = impl == "triton"

        def fn():
            for y in ys:
                y.zero_()
            _triton_kernel[grid](*weights, *xs, *ys, sync, LAYERS, BN=bn, BK=bk, STAGES=stages,
                                 BARRIER=barrier, num_warps=4,
                                 launch_cooperative_grid=barrier)  # fmt: skip

    try:
        us = time_graph(fn, warmup=5, reps=30)
        errs = []
        for w, x, y in zip(weights, xs, ys):
            ref = x.float() @ w[-1].float().T if x.dim() == 2 else w[-1].float() @ x.float()
            errs.append(((y[-1] - ref).abs().max() / ref.abs().max()).item())
        nbytes = sum(w.numel() for w in weights) * 2
        row.update(us=round(us, 1), gbps=round(nbytes / us / 1e3), us_per_layer=round(us / LAYERS, 2),
                   rel_err=max(errs), flagged=int(sync[2].item()))  # fmt: skip
        if impl.startswith(("ring-cross", "ring-drain", "ring-flags")):
            fn(traced=True)
            torch.cuda.synchronize()
            row.update(barriers(trace[:, : LAYERS * 4].cpu()))
    except Exception as e:  # noqa: BLE001 - reported, the others still run
        row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
    return row


def barriers(trace: torch.Tensor) -> dict:
    """From the consumers' barrier times [programs, barriers, (arrive, leave)] ns: per op (the
    span between the barriers around it; with BARRIER "flags" down's span holds gate/up's,
    whose barrier is not there), medians over the layers, µs, of: the op's span from the
    first program's leaving the barrier before to the last one's arrival (`span`), the
    spread of arrivals (`skew`: last arrival - median arrival), and the barrier's own release
    (`release`: median leaving - last arrival)."""
    arrive, leave = trace[..., 0].double(), trace[..., 1].double()
    out = {}
    for k, (name, _, _) in enumerate(OPS):
        idx = list(range(k, trace.shape[1], 4))
        spans, skews, releases = [], [], []
        for i in idx:
            traced = [j for j in range(i) if arrive[:, j].max() > 0]
            if not traced or arrive[:, i].max() == 0:  # the first, or no barrier there
                continue
            spans.append((arrive[:, i].max() - leave[:, traced[-1]].min()).item() / 1e3)
            skews.append((arrive[:, i].max() - arrive[:, i].median()).item() / 1e3)
            releases.append((leave[:, i].median() - arrive[:, i].max()).item() / 1e3)
        if not spans:
            continue
        out[name] = dict(
            span=round(statistics.median(spans), 2),
            skew=round(statistics.median(skews), 2),
            release=round(statistics.median(releases), 2),
        )
    return out


# (impl, BN, BK, stages, consumer warps[, consumer]); "-owned": whole tiles round-robin
# (`_span`); "-dynamic": CHUNK blocks at a time from a counter (`_produce_op_dynamic`); consumer
# "mma": 16 rows on the tensor cores (`_consume_op_mma`), else one row on the FMA units
CASES = [  # the variants not yet run on a GPU (flags, "mma") last: a fault there ends the process
    ("ring-cross", 64, 256, 6, 4),
    ("ring-free", 64, 256, 6, 4),
    ("triton", 128, 128, 4),
    ("ring-flags", 64, 256, 6, 4),  # not yet run on a GPU either
    ("ring-flags", 128, 128, 6, 4),
    ("ring-cross", 64, 256, 6, 4, "mma"),
    ("ring-free", 64, 256, 6, 4, "mma"),
    ("ring-cross", 128, 128, 6, 4, "mma"),
    ("ring-cross", 64, 128, 12, 4, "mma"),
    ("ring-cross", 128, 64, 12, 4, "mma"),
]


def main() -> None:
    out = os.environ.get("OUT", ".")
    os.makedirs(out, exist_ok=True)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    torch.manual_seed(0)
    weights = [torch.randn(LAYERS, n, k, device="cuda", dtype=torch.bfloat16) for _, n, k in OPS]
    xs = [torch.randn(k, device="cuda", dtype=torch.bfloat16) for _, _, k in OPS]
    only = os.environ.get("RING_CASES")
    rows = []
    for i, c in enumerate(CASES):
        if only and str(i) not in only.split(","):
            continue
        r = case(c[0], weights, xs, *c[1:])
        rows.append(r)
        figs = f"{r['us']:8.1f} us {r['gbps']:5d} GB/s" if "us" in r else r["error"]
        print(figs, {k: v for k, v in r.items() if k not in ("us", "gbps", "error")}, flush=True)
    with open(os.path.join(out, "bench_weight_ring.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
