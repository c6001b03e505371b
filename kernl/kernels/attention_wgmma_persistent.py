"""attention_wgmma.py's encoder attention as a persistent kernel (Hopper, Gluon): a few
programs an SM walk the (query block, batch x head) tiles, and each program's key and value
blocks stream through its rings across its tiles, so the next tile's first blocks and its
queries land while this tile finishes.

Why: BERT-base's attention at 8x512 takes ~21.8 µs a layer with attention_wgmma.py's serial
64x64 kernel and 9.95 µs at 32x128, the same 768 tiles with 8 and 2 key blocks each (H200,
docs/performance.md, twenty-ninth session). A line through the two puts ~6 µs on the tiles
themselves (launch, each program's first loads, its epilogue) against ~2 µs per key block a
round. One program per tile waits for its queries and first keys from nothing and then for its
store; here only a program's first tile does. Neither the exponentials' unit, the rescale, the
tensor cores' waits nor occupancy moved the 8x512 time (the same session), which leaves this.

The key loop is attention_wgmma.py's serial one (the tuner's choice at 8x512) with each block
numbered in the program's stream (tile after tile), which sets its ring slot and barrier phase.
Every tile has the same number of key blocks: a padding bias, no per-row key counts. Not in the
tuning space: written 2026-12-04 after the session's device time, compiled for sm_90 on the
CPU, not yet run on a GPU (benchmarks/bench_attention_wgmma.py times it)."""

from __future__ import annotations

import torch

from .attention_wgmma import (
    _bias,
    _issue_scores,
    _last_pv,
    _launch_operands,
    _place,
    _rescale,
    _softmax_block,
)
from .jit import (
    cdiv,
    fence_async_shared,
    gl,
    gluon_jit,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from .launch import launch_kernel, sm_count


@gluon_jit
def _tile_place(tile, n_m, num_heads, BLOCK_M: gl.constexpr):
    """A tile's first query row, batch and head (tiles run query block fastest)."""
    bh = tile // n_m
    return (tile % n_m) * BLOCK_M, bh // num_heads, bh % num_heads


@gluon_jit
def _stream_issue(desc, ring, bars, i, n_blocks, pid, nprog, tiles, n_m, num_heads, group_size,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                  STAGES: gl.constexpr, IN_ROW: gl.constexpr):  # fmt: skip
    """Block i of the program's key stream (its tiles' key blocks one after another) into ring
    slot i % STAGES, on that slot's barrier; nothing past the program's last tile."""
    tile = pid + (i // n_blocks) * nprog
    _, b, h = _tile_place(tile, n_m, num_heads, BLOCK_M)
    at, col = _place(b, h // group_size, num_heads // group_size, HEAD_DIM, IN_ROW)
    slot = i % STAGES
    ok = tile < tiles
    mbarrier.expect(bars.index(slot), desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(desc, [at, (i % n_blocks) * BLOCK_N, col], bars.index(slot),
                                    ring.index(slot), pred=ok)  # fmt: skip


@gluon_jit
def _issue_queries(desc, q_smem, q_bar, tile, tiles, n_m, num_heads, BLOCK_M: gl.constexpr,
                   HEAD_DIM: gl.constexpr, IN_ROW: gl.constexpr):  # fmt: skip
    m0, b, h = _tile_place(tile, n_m, num_heads, BLOCK_M)
    at, col = _place(b, h, num_heads, HEAD_DIM, IN_ROW)
    ok = tile < tiles
    mbarrier.expect(q_bar, desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(desc, [at, m0, col], q_bar, q_smem, pred=ok)


@gluon_jit
def _persistent_wgmma_attention_kernel(
    q_desc, k_desc, v_desc, o_desc, Bias, Lq, Lk, batch, num_heads, group_size, qk_scale,
    stride_biasb, stride_biash, stride_biasn,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    Q_IN_ROW: gl.constexpr, KV_IN_ROW: gl.constexpr, O_IN_ROW: gl.constexpr,
    HAS_BIAS: gl.constexpr, MASKED: gl.constexpr, LAZY: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    n_m = (Lq + BLOCK_M - 1) // BLOCK_M
    tiles = n_m * batch * num_heads
    n_blocks = gl.maximum((Lk + BLOCK_N - 1) // BLOCK_N, 1)
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    o_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_M, HEAD_DIM], o_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    _issue_queries(q_desc, q_smem, q_bar, pid, tiles, n_m, num_heads, BLOCK_M, HEAD_DIM, Q_IN_ROW)
    for i in gl.static_range(STAGES):
        _stream_issue(k_desc, k_smem, k_bars, i, n_blocks, pid, nprog, tiles, n_m, num_heads,
                      group_size, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, KV_IN_ROW)  # fmt: skip
        _stream_issue(v_desc, v_smem, v_bars, i, n_blocks, pid, nprog, tiles, n_m, num_heads,
                      group_size, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, KV_IN_ROW)  # fmt: skip
    q = q_smem.reshape([BLOCK_M, HEAD_DIM])
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

    for tau in range((tiles - pid + nprog - 1) // nprog):
        tile = pid + tau * nprog
        m0, b, h = _tile_place(tile, n_m, num_heads, BLOCK_M)
        base = tau * n_blocks  # this tile's first key block in the program's stream
        bias_row = Bias + b.to(gl.int64) * stride_biasb + h.to(gl.int64) * stride_biash
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout))

        mbarrier.wait(q_bar, tau & 1)
        s = _issue_scores(q, k_smem, k_bars, base, zero_s, BLOCK_N, HEAD_DIM, STAGES)
        s = warpgroup_mma_wait(0, deps=(s,))
        # a k slot is free once its q k^T is done, a v slot once its p v is: the stream's
        # block STAGES later goes in, the next tile's once this one's run out
        _stream_issue(k_desc, k_smem, k_bars, base + STAGES, n_blocks, pid, nprog, tiles, n_m,
                      num_heads, group_size, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, KV_IN_ROW)  # fmt: skip
        bias = _bias(bias_row, cols, Lk, stride_biasn, HAS_BIAS)
        for j in range(n_blocks - 1):
            blk = base + j
            s_next = _issue_scores(q, k_smem, k_bars, blk + 1, zero_s, BLOCK_N, HEAD_DIM, STAGES)
            s_next = warpgroup_mma_wait(0, deps=(s_next,))
            _stream_issue(k_desc, k_smem, k_bars, blk + 1 + STAGES, n_blocks, pid, nprog, tiles,
                          n_m, num_heads, group_size, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                          KV_IN_ROW)  # fmt: skip
            bias_next = _bias(bias_row, cols + (j + 1) * BLOCK_N, Lk, stride_biasn, HAS_BIAS)
            p, alpha, m_i, l_i, grown = _softmax_block(s, bias, cols + j * BLOCK_N, Lk, m_i,
                                                       l_i, qk_scale, HAS_BIAS, MASKED, LAZY)  # fmt: skip
            acc = warpgroup_mma_wait(1, deps=(acc,))  # done already: the accumulator as a tensor
            acc = _rescale(acc, alpha, grown, rows_o, LAZY)
            p16 = gl.convert_layout(p.to(dtype), p_layout)
            mbarrier.wait(v_bars.index(blk % STAGES), (blk // STAGES) & 1)
            v_block = v_smem.index(blk % STAGES).reshape([BLOCK_N, HEAD_DIM])
            acc = warpgroup_mma(p16, v_block, acc, is_async=True)
            acc = warpgroup_mma_init(warpgroup_mma_wait(0, deps=(acc,)))
            _stream_issue(v_desc, v_smem, v_bars, blk + STAGES, n_blocks, pid, nprog, tiles, n_m,
                          num_heads, group_size, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, KV_IN_ROW)  # fmt: skip
            s = s_next
            bias = bias_next

        last = n_blocks - 1
        p, alpha, m_i, l_i, grown = _softmax_block(s, bias, cols + last * BLOCK_N, Lk, m_i, l_i,
                                                   qk_scale, HAS_BIAS, MASKED, LAZY)  # fmt: skip
        # every q k^T of this tile is done: the next tile's queries land during the rest
        _issue_queries(q_desc, q_smem, q_bar, tile + nprog, tiles, n_m, num_heads, BLOCK_M,
                       HEAD_DIM, Q_IN_ROW)  # fmt: skip
        acc = warpgroup_mma_wait(0, deps=(acc,))
        acc = _rescale(acc, alpha, grown, rows_o, LAZY)
        acc = _last_pv(p, acc, v_smem, v_bars, base + last, p_layout, BLOCK_N, HEAD_DIM, STAGES)
        _stream_issue(v_desc, v_smem, v_bars, base + last + STAGES, n_blocks, pid, nprog, tiles,
                      n_m, num_heads, group_size, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, KV_IN_ROW)  # fmt: skip

        l_o = gl.convert_layout(l_i, rows_o)
        acc = acc / gl.where(l_o == 0.0, 1.0, l_o)[:, None]
        o_at, o_col = _place(b, h, num_heads, HEAD_DIM, O_IN_ROW)
        tma.store_wait(pendings=0)  # the last tile's store has read o_smem
        o_smem.reshape([BLOCK_M, HEAD_DIM]).store(acc.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [o_at, m0, o_col], o_smem)

    tma.store_wait(pendings=0)
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))


def persistent_wgmma_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    *,
    sm_scale: float,
    bias: torch.Tensor | None,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    programs_per_sm: int,
    max_registers: int = 0,
    lazy_rescale: bool = False,
) -> torch.Tensor:
    """attention_wgmma.wgmma_attention's call (no per-row key counts) on min(tiles,
    programs_per_sm x SMs) programs. max_registers: ptxas's cap a thread (0: its own choice;
    at 64x64 with 4 warps that is 225, two programs an SM; 168 fits three without spilling,
    by ptxas -v for sm_90). Writes `out` and returns it."""
    descs, bias_arg, strides, constants = _launch_operands(q, k, v, out, bias, block_m, block_n)
    B, H, Lq, _ = q.shape
    H_kv, Lk = k.shape[1], k.shape[2]
    tiles = cdiv(Lq, block_m) * B * H
    launch_kernel(
        _persistent_wgmma_attention_kernel,
        (min(tiles, programs_per_sm * sm_count(q.device)),),
        *descs,
        bias_arg,
        Lq,
        Lk,
        B,
        H,
        H // H_kv,
        sm_scale * 1.4426950408889634,
        *strides,
        **constants,
        STAGES=num_stages,
        MASKED=Lk % block_n != 0,
        LAZY=lazy_rescale,
        num_warps=num_warps,
        **({"maxnreg": max_registers} if max_registers else {}),
    )
    return out


JIT_FUNCTIONS = (_persistent_wgmma_attention_kernel,)
