"""Linear in Gluon for Hopper, warp-specialised: activation(x @ W^T + bias), one persistent
program per SM whose two consumer warp groups take its output tiles in turn while one warp
feeds both through a TMA ring.

Why: linear_wgmma.py showed that at BERT-base's FFN1 (M = 4096, K = 768: twelve K steps a
tile) the epilogue decides: its erf GELU left the kernel 27% behind cuBLAS's tanh-GELU
epilogue, although two programs an SM already overlapped some of it (H200, 2026-12-04). At
small K cuBLAS overlaps the epilogue with the next tile's dots by warp specialisation
("ping-pong"): here the producer warp loads tile after tile into the ring (it waits only for
free slots), consumer 0 runs the dots of the program's even tiles and consumer 1 of its odd
ones, so that one's epilogue (bias, activation, the store through shared memory and TMA)
runs while the other's dots use the tensor cores. A consumer starts a tile's dots once the
other has issued the previous tile's (a "turn" barrier each), so the two main loops follow
each other in the ring's order. Registers: 232 a thread asked for each consumer (a 128x128
fp32 accumulator is 128), 40 for the producer, within maxnreg 168 over the 12 warps the three
partitions occupy. ptxas reports 168 registers for the kernel, and with the erf GELU 356
bytes of spills (none with the tanh one).

Measured and left out of the tuning space (H200, 2026-12-04): with a tanh GELU at FFN1
(M = 4096) bench_linear_wgmma.py --only pingpong gave 35.9 us against 39.0 for cuBLASLt's
tanh-GELU epilogue, both as graph replays between CUDA events, and the tuner (which times the
same way) chose it at 32x128 and 8x512. But by the profiler's kernel time cuBLASLt's kernel
takes 34.1 us, this one 36.6 alone and 41.6 between layer norms and FFN2
(benchmarks/diag_pingpong_in_model.py), 48 inside the BERT-base artifact, which lost 0.13 ms
a call. A replay's time counts cuBLAS's memset node beside its kernel (~3 us; the runtime
makes it a ~1 us fill, runtime/memset_nodes.py), likely part of the difference. With the erf
GELU it took 80.5 us. `LinearConfig(pingpong=True)` still runs it. x [M, K] and out [M, N]
contiguous rows, W [N, K]; TMA reads zeros past every edge and drops stores past M and N.
`wgmma_linear_refusal` (linear_wgmma.py) says what a call needs; no residual."""

from __future__ import annotations

import torch

from .jit import (
    cdiv,
    constexpr,
    fence_async_shared,
    gl,
    gluon_jit,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from .launch import launch_kernel, sm_count
from .linear_wgmma import _activation, wgmma_linear_refusal
from .tma import TensorDesc

# (BLOCK_M, BLOCK_N, BLOCK_K, STAGES): each consumer's tile, the ring's depth. Shared memory:
# STAGES x 32 KB of ring and 2 x 32 KB of output staging (one per consumer).
PINGPONG_CONFIGS = [(128, 128, 64, 4), (128, 128, 64, 5)]
# registers a thread: the second consumer's and the producer's (the first consumer, the default
# partition, gets what maxnreg leaves over the 3 warp groups: 3 x 168 - 232 - 40 = 232)
CONSUMER_REGS = constexpr(232)
PRODUCER_REGS = constexpr(40)
MAXNREG = 168


@gluon_jit
def _tile(t, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
    """Output tile t's row and column offsets in blocks, GROUP_M row blocks sharing W's
    columns from L2 (fused_linear.py's order)."""
    in_group = GROUP_M * num_pid_n
    first_m = (t // in_group) * GROUP_M
    group_size = gl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (t % in_group) % group_size, (t % in_group) // group_size


@gluon_jit
def _producer(x_ring, w_ring, ready, empty, turns, c_smem, out_desc, Bias, M, N, K, x_desc, w_desc,
              GROUP_M: gl.constexpr, ACTIVATION: gl.constexpr, HAS_BIAS: gl.constexpr):  # fmt: skip
    """One warp: every K step of every tile of this program, into the ring in order, each
    slot once its last reader has released it."""
    STAGES: gl.constexpr = x_ring.shape[0]
    BLOCK_M: gl.constexpr = x_ring.shape[1]
    BLOCK_K: gl.constexpr = x_ring.shape[2]
    BLOCK_N: gl.constexpr = w_ring.shape[1]
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    n_k = gl.cdiv(K, BLOCK_K)
    step = 0
    for t in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
        pid_m, pid_n = _tile(t, num_pid_m, num_pid_n, GROUP_M)
        for kk in range(n_k):
            slot = step % STAGES
            # a barrier starts as if its phase 1 had completed: the first pass does not wait
            mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
            bar = ready.index(slot)
            mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                x_desc, [pid_m * BLOCK_M, kk * BLOCK_K], bar, x_ring.index(slot)
            )
            tma.async_copy_global_to_shared(
                w_desc, [pid_n * BLOCK_N, kk * BLOCK_K], bar, w_ring.index(slot)
            )
            step += 1


@gluon_jit
def _consume(x_ring, w_ring, ready, empty, turns, c_smem, out_desc, Bias, M, N, K,
             GROUP_M: gl.constexpr, ACTIVATION: gl.constexpr, HAS_BIAS: gl.constexpr,
             WHICH: gl.constexpr):  # fmt: skip
    """One warp group: the dots and the epilogue of this program's tiles WHICH, WHICH + 2, ..."""
    STAGES: gl.constexpr = x_ring.shape[0]
    BLOCK_M: gl.constexpr = x_ring.shape[1]
    BLOCK_K: gl.constexpr = x_ring.shape[2]
    BLOCK_N: gl.constexpr = w_ring.shape[1]
    dtype: gl.constexpr = x_ring.dtype
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    n_k = gl.cdiv(K, BLOCK_K)
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    c_buf = c_smem.index(WHICH)
    for t in range(pid + WHICH * programs, num_pid_m * num_pid_n, 2 * programs):
        pid_m, pid_n = _tile(t, num_pid_m, num_pid_n, GROUP_M)
        j = (t - pid) // programs  # the program's tiles before this one: the ring's step j * n_k
        # The other consumer has waited for every ring slot of the tile before this one. Only
        # then may this one wait for its slots: a barrier's wait names a phase by its parity,
        # so a waiter two fills ahead of a slot would take an old fill for its own.
        n = j // 2
        if WHICH == 0:
            mbarrier.wait(turns.index(0), (n - 1) & 1, pred=n > 0)
        else:
            mbarrier.wait(turns.index(1), n & 1)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=acc_layout)
        for kk in range(n_k):
            step = j * n_k + kk
            slot = step % STAGES
            mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
            w_t = w_ring.index(slot).permute((1, 0))
            acc = warpgroup_mma(x_ring.index(slot), w_t, acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc,))
            # the previous step's dot is done: its slot goes back to the producer
            mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), count=1, pred=kk > 0)
        mbarrier.arrive(turns.index(1 - WHICH), count=1)  # its turn: this tile's dots are issued
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index((j * n_k + n_k - 1) % STAGES), count=1)

        cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
        if HAS_BIAS:
            acc = acc + gl.load(Bias + cols, mask=cols < N, other=0.0).to(gl.float32)[None, :]
        acc = _activation(acc, ACTIVATION)
        tma.store_wait(pendings=0)  # this consumer's last store has left c_buf
        c_buf.store(acc.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [pid_m * BLOCK_M, pid_n * BLOCK_N], c_buf)
    tma.store_wait(pendings=0)


@gluon_jit
def _consumer0(x_ring, w_ring, ready, empty, turns, c_smem, out_desc, Bias, M, N, K,
               GROUP_M: gl.constexpr, ACTIVATION: gl.constexpr, HAS_BIAS: gl.constexpr):  # fmt: skip
    _consume(x_ring, w_ring, ready, empty, turns, c_smem, out_desc, Bias, M, N, K, GROUP_M,
             ACTIVATION, HAS_BIAS, 0)  # fmt: skip


@gluon_jit
def _consumer1(x_ring, w_ring, ready, empty, turns, c_smem, out_desc, Bias, M, N, K, x_desc, w_desc,
               GROUP_M: gl.constexpr, ACTIVATION: gl.constexpr, HAS_BIAS: gl.constexpr):  # fmt: skip
    _consume(x_ring, w_ring, ready, empty, turns, c_smem, out_desc, Bias, M, N, K, GROUP_M,
             ACTIVATION, HAS_BIAS, 1)  # fmt: skip


@gluon_jit
def _pingpong_linear_kernel(
    x_desc, w_desc, out_desc, Bias, M, N, K,
    GROUP_M: gl.constexpr, ACTIVATION: gl.constexpr, HAS_BIAS: gl.constexpr,
    STAGES: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    dtype: gl.constexpr = x_desc.dtype
    gl.static_assert(num_warps == 4, "each consumer is one warp group")
    x_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    w_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    c_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, BLOCK_N], out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(turns.index(i), count=1)
    fence_async_shared()
    # the default partition (consumer 0) may take fewer arguments; the workers take the same
    gl.warp_specialize(
        [
            (_consumer0, (x_ring, w_ring, ready, empty, turns, c_smem, out_desc, Bias, M, N, K,
                          GROUP_M, ACTIVATION, HAS_BIAS)),
            (_consumer1, (x_ring, w_ring, ready, empty, turns, c_smem, out_desc, Bias, M, N, K,
                          x_desc, w_desc, GROUP_M, ACTIVATION, HAS_BIAS)),
            (_producer, (x_ring, w_ring, ready, empty, turns, c_smem, out_desc, Bias, M, N, K,
                         x_desc, w_desc, GROUP_M, ACTIVATION, HAS_BIAS)),
        ],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )  # fmt: skip


def pingpong_linear(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    out2: torch.Tensor,
    *,
    block: tuple[int, int, int],
    group_m: int,
    num_stages: int,
) -> torch.Tensor:
    """out2 [M, N] = activation(x2 [M, K] @ weight.T + bias); `block` is each consumer's
    (BLOCK_M, BLOCK_N, BLOCK_K). One program per SM (or per tile, if fewer)."""
    refusal = wgmma_linear_refusal(x2, weight, out2)
    if refusal:
        raise ValueError(refusal)
    M, K = x2.shape
    N = weight.shape[0]
    bm, bn, bk = block
    programs = min(cdiv(M, bm) * cdiv(N, bn), sm_count(x2.device))
    launch_kernel(
        _pingpong_linear_kernel,
        (programs,),
        TensorDesc(x2, (bm, bk), gluon=True),
        TensorDesc(weight, (bn, bk), gluon=True),
        TensorDesc(out2, (bm, bn), gluon=True),
        bias if bias is not None else weight,
        M,
        N,
        K,
        GROUP_M=group_m,
        ACTIVATION=activation,
        HAS_BIAS=bias is not None,
        STAGES=num_stages,
        num_warps=4,
        maxnreg=MAXNREG,
    )
    return out2


JIT_FUNCTIONS = (_pingpong_linear_kernel,)
