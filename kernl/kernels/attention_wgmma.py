"""Encoder attention in Gluon with FlashAttention-3's in-warpgroup overlap (Hopper):
softmax(q k^T * scale + bias) v, a key block's p v on the tensor cores while the next
block's softmax runs on the other units.

Why: at head dim 64 a score's softmax costs about as much as its two dots, and Triton 3.6
waits for every dot right after issuing it (its PTX has `wgmma.wait_group 0` before the
softmax's `ex2`), so a Triton program does one or the other: BERT-base's attention at 8x512
ran at ~258 TFLOP/s, ~25 µs a layer (H200, docs/performance.md, twenty-second session).
Gluon (Triton's lower-level dialect) exposes the asynchronous wgmma and its wait. With
`OVERLAP`, per key block j the program issues q k_{j+1}^T and p_j v_j, waits for the first,
runs block j+1's softmax, then waits for p_j v_j and rescales the accumulator
(`_overlapped_loop`); without it, each wgmma is waited for as it is issued (`_serial_loop`).

q, k, v and the output move by TMA through 3-d descriptors, as in attention_tma.py: each
tensor is rows of [B, L, H * D] (heads side by side, `*_IN_ROW`, the views of one QKV
projection) or of [B * H, L, D]; rows past L read zeros, stores past it are dropped. k and v
sit in rings of STAGES slots, each slot with its own barrier, so q k^T starts before v lands.
One program per (query block, batch x head); non-causal; a bias one row for every query (a
padding mask) or none; per-row valid key counts; GQA. `wgmma_attention_refusal` says what a
call needs. No interpreter runs Gluon: the CPU tests compile it for sm_90, the GPU tests run
it. The reference is attention.py's `attention_reference`."""

from __future__ import annotations

import torch

from .attention_tma import _rows, attention_tma_refusal
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
from .launch import launch_kernel
from .tma import TensorDesc

# (BLOCK_M, BLOCK_N, num_warps, STAGES): 8 warps are two warpgroups of 64 query rows each
WGMMA_CONFIGS = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2)]
WGMMA_CONFIGS += [(64, 64, 4, 3), (64, 128, 4, 2)]


@gluon_jit
def _place(b, h, heads, HEAD_DIM: gl.constexpr, IN_ROW: gl.constexpr):
    if IN_ROW:
        return b, h * HEAD_DIM
    return b * heads + h, 0


@gluon_jit
def _issue(desc, ring, bars, block, n_blocks, at, col, BLOCK_N: gl.constexpr,
           STAGES: gl.constexpr):  # fmt: skip
    """Key block `block` (none past the last) into its ring slot, on that slot's barrier."""
    slot = block % STAGES
    ok = block < n_blocks
    mbarrier.expect(bars.index(slot), desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(desc, [at, block * BLOCK_N, col], bars.index(slot),
                                    ring.index(slot), pred=ok)  # fmt: skip


@gluon_jit
def _bias(bias_row, cols, kv_len, stride_biasn, HAS_BIAS: gl.constexpr, MASKED: gl.constexpr):
    """One key block's bias in the log2 domain (zeros without one; keys past kv_len: 0).
    Unmasked where every block is full: a predicate and an address per column made ~80 of
    the loop's ~500 instructions a thread (sm_90 SASS, 64x64), loads of one element each."""
    if HAS_BIAS:
        if MASKED:
            bias = gl.load(bias_row + cols * stride_biasn, mask=cols < kv_len, other=0.0)
        else:
            bias = gl.load(bias_row + cols * stride_biasn)
        # as attention_bias.log2_bias (a Gluon kernel calls no Triton function): a finite
        # bias stays finite, -inf stays -inf
        bias = bias.to(gl.float32)
        bias = gl.where(bias == float("-inf"), bias, gl.maximum(bias, -2.0e38))
        return bias * 1.4426950408889634
    return cols.to(gl.float32) * 0.0  # never read: HAS_BIAS is False


@gluon_jit
def _softmax_block(s, bias, cols, kv_len, m_i, l_i, qk_scale, HAS_BIAS: gl.constexpr,
                   MASKED: gl.constexpr, LAZY: gl.constexpr):  # fmt: skip
    """One key block's scores into p (base 2, the running max subtracted), with the running
    max and sum updated; alpha rescales what was accumulated before, and `grown` says whether
    any row's max moved (LAZY: else the accumulator's rescale is skipped)."""
    x = s * qk_scale
    if HAS_BIAS:
        x = x + bias[None, :]
    if MASKED:
        x = gl.where((cols < kv_len)[None, :], x, float("-inf"))
    m_blk = gl.max(x, 1)
    if LAZY:
        # FlashAttention-4's lazy rescale: a row keeps its max until a block's passes it by
        # more than 8 (base 2), so p <= 256, exact in fp16 and bf16 and summed in fp32; the
        # rows' maxima then rarely move after the first block and the accumulator's rescale
        # (a multiply per output element every block) is skipped when none did.
        m_new = gl.where(m_blk > m_i + 8.0, m_blk, m_i)
        grown = gl.max((m_new != m_i).to(gl.int32), 0)
    else:
        m_new = gl.maximum(m_i, m_blk)
        grown = 1
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw only -inf
    p = gl.exp2(x - m_safe[:, None])
    alpha = gl.exp2(m_i - m_safe)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i, grown


@gluon_jit
def _rescale(acc, alpha, grown, rows_o: gl.constexpr, LAZY: gl.constexpr):
    """acc * alpha per row; LAZY: only when some row's max moved (else alpha is all ones)."""
    if LAZY:
        if grown > 0:
            acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
    else:
        acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
    return acc


@gluon_jit
def _issue_scores(q, k_smem, k_bars, block, zero_s, BLOCK_N: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """q k^T of key block `block` issued once its keys have landed (not waited for)."""
    slot = block % STAGES
    mbarrier.wait(k_bars.index(slot), (block // STAGES) & 1)
    k_block = k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
    return warpgroup_mma(q, k_block, zero_s, use_acc=False, is_async=True)


@gluon_jit
def _last_pv(p, acc, v_smem, v_bars, last, p_layout: gl.constexpr, BLOCK_N: gl.constexpr,
             HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """acc + p v of the last key block, waited for."""
    p16 = gl.convert_layout(p.to(v_smem.dtype), p_layout)
    mbarrier.wait(v_bars.index(last % STAGES), (last // STAGES) & 1)
    v_last = v_smem.index(last % STAGES).reshape([BLOCK_N, HEAD_DIM])
    acc = warpgroup_mma(p16, v_last, acc, is_async=True)
    return warpgroup_mma_wait(0, deps=(acc,))


@gluon_jit
def _serial_loop(q, k_smem, v_smem, k_bars, v_bars, k_desc, v_desc, s, bias, bias_row, cols,
                 kv_len, stride_biasn, n_blocks, kv_at, kv_col, m_i, l_i, acc, qk_scale, zero_s,
                 rows_o: gl.constexpr, p_layout: gl.constexpr, BLOCK_N: gl.constexpr,
                 HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
                 MASKED: gl.constexpr, LAZY: gl.constexpr):  # fmt: skip
    """The key loop with every wgmma waited for as soon as it is issued; block 0's scores
    are in `s`. Returns the accumulator and the rows' sums."""
    dtype: gl.constexpr = q.dtype
    for j in range(n_blocks - 1):
        slot = j % STAGES
        s_next = _issue_scores(q, k_smem, k_bars, j + 1, zero_s, BLOCK_N, HEAD_DIM, STAGES)
        s_next = warpgroup_mma_wait(0, deps=(s_next,))
        bias_next = _bias(
            bias_row, cols + (j + 1) * BLOCK_N, kv_len, stride_biasn, HAS_BIAS, MASKED
        )
        p, alpha, m_i, l_i, grown = _softmax_block(s, bias, cols + j * BLOCK_N, kv_len, m_i,
                                                   l_i, qk_scale, HAS_BIAS, MASKED, LAZY)  # fmt: skip
        acc = warpgroup_mma_wait(1, deps=(acc,))  # done already: the accumulator as a tensor
        if j > 0:
            _issue(v_desc, v_smem, v_bars, j - 1 + STAGES, n_blocks, kv_at, kv_col, BLOCK_N, STAGES)
        acc = _rescale(acc, alpha, grown, rows_o, LAZY)
        p16 = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_bars.index(slot), (j // STAGES) & 1)
        acc = warpgroup_mma(
            p16, v_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True
        )
        acc = warpgroup_mma_init(warpgroup_mma_wait(0, deps=(acc,)))
        s = warpgroup_mma_wait(1, deps=(s_next,))
        _issue(k_desc, k_smem, k_bars, j + 1 + STAGES, n_blocks, kv_at, kv_col, BLOCK_N, STAGES)
        bias = bias_next

    last = n_blocks - 1
    p, alpha, m_i, l_i, grown = _softmax_block(s, bias, cols + last * BLOCK_N, kv_len, m_i, l_i,
                                               qk_scale, HAS_BIAS, MASKED, LAZY)  # fmt: skip
    acc = warpgroup_mma_wait(0, deps=(acc,))
    acc = _rescale(acc, alpha, grown, rows_o, LAZY)
    return _last_pv(p, acc, v_smem, v_bars, last, p_layout, BLOCK_N, HEAD_DIM, STAGES), l_i


@gluon_jit
def _overlapped_loop(q, k_smem, v_smem, k_bars, v_bars, k_desc, v_desc, s, bias, bias_row, cols,
                     kv_len, stride_biasn, n_blocks, kv_at, kv_col, m_i, l_i, acc, qk_scale,
                     zero_s, rows_o: gl.constexpr, p_layout: gl.constexpr,
                     BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                     HAS_BIAS: gl.constexpr, MASKED: gl.constexpr, LAZY: gl.constexpr):  # fmt: skip
    """FlashAttention-3's order: with block j's p in hand, issue q k_{j+1}^T and then p_j v_j,
    wait for the first only, run block j+1's softmax while p_j v_j runs, then wait for it and
    rescale. Nothing reads the accumulator while a wgmma is in flight: where something did
    (this kernel's first schedule, block j's softmax under q k_{j+1}^T and the rescale before
    p_j v_j), ptxas serialised every wgmma (its warning C7514)."""
    dtype: gl.constexpr = q.dtype
    # block 0: the accumulator is still zero, nothing to rescale
    p, alpha, m_i, l_i, grown = _softmax_block(s, bias, cols, kv_len, m_i, l_i, qk_scale,
                                               HAS_BIAS, MASKED, LAZY)  # fmt: skip
    for j in range(n_blocks - 1):
        slot = j % STAGES
        s_next = _issue_scores(q, k_smem, k_bars, j + 1, zero_s, BLOCK_N, HEAD_DIM, STAGES)
        p16 = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_bars.index(slot), (j // STAGES) & 1)
        acc = warpgroup_mma(
            p16, v_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True
        )
        bias = _bias(bias_row, cols + (j + 1) * BLOCK_N, kv_len, stride_biasn, HAS_BIAS, MASKED)
        s = warpgroup_mma_wait(1, deps=(s_next,))  # groups retire in order: q k^T is done
        _issue(k_desc, k_smem, k_bars, j + 1 + STAGES, n_blocks, kv_at, kv_col, BLOCK_N, STAGES)
        p, alpha, m_i, l_i, grown = _softmax_block(s, bias, cols + (j + 1) * BLOCK_N, kv_len,
                                                   m_i, l_i, qk_scale, HAS_BIAS, MASKED, LAZY)  # fmt: skip
        acc = warpgroup_mma_wait(0, deps=(acc,))
        _issue(v_desc, v_smem, v_bars, j + STAGES, n_blocks, kv_at, kv_col, BLOCK_N, STAGES)
        acc = warpgroup_mma_init(_rescale(acc, alpha, grown, rows_o, LAZY))

    last = n_blocks - 1
    return _last_pv(p, acc, v_smem, v_bars, last, p_layout, BLOCK_N, HEAD_DIM, STAGES), l_i


@gluon_jit
def _wgmma_attention_kernel(
    q_desc, k_desc, v_desc, o_desc, Bias, KVLens, Lk, num_heads, group_size, qk_scale,
    stride_biasb, stride_biash, stride_biasn,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    Q_IN_ROW: gl.constexpr, KV_IN_ROW: gl.constexpr, O_IN_ROW: gl.constexpr,
    HAS_BIAS: gl.constexpr, HAS_KV_LENS: gl.constexpr, MASKED: gl.constexpr,
    OVERLAP: gl.constexpr, LAZY: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    m0 = gl.program_id(0) * BLOCK_M
    bh = gl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    q_at, q_col = _place(b, h, num_heads, HEAD_DIM, Q_IN_ROW)
    kv_at, kv_col = _place(b, h // group_size, num_heads // group_size, HEAD_DIM, KV_IN_ROW)
    o_at, o_col = _place(b, h, num_heads, HEAD_DIM, O_IN_ROW)
    kv_len = Lk
    if HAS_KV_LENS:
        kv_len = gl.minimum(gl.load(KVLens + b).to(gl.int32), Lk)
    # at least one block: a row with no key runs it fully masked and writes zeros
    n_blocks = gl.maximum((kv_len + BLOCK_N - 1) // BLOCK_N, 1)
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
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_at, m0, q_col], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        _issue(k_desc, k_smem, k_bars, i, n_blocks, kv_at, kv_col, BLOCK_N, STAGES)
        _issue(v_desc, v_smem, v_bars, i, n_blocks, kv_at, kv_col, BLOCK_N, STAGES)
    q = q_smem.reshape([BLOCK_M, HEAD_DIM])

    bias_row = Bias + b.to(gl.int64) * stride_biasb + h.to(gl.int64) * stride_biash
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout))

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bars.index(0), 0)
    k0 = k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
    s = warpgroup_mma(q, k0, zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    # a k slot is free once its q k^T is done, a v slot once its p v is
    _issue(k_desc, k_smem, k_bars, STAGES, n_blocks, kv_at, kv_col, BLOCK_N, STAGES)
    bias = _bias(bias_row, cols, kv_len, stride_biasn, HAS_BIAS, MASKED)

    if OVERLAP:
        acc, l_i = _overlapped_loop(
            q, k_smem, v_smem, k_bars, v_bars, k_desc, v_desc, s, bias, bias_row, cols, kv_len,
            stride_biasn, n_blocks, kv_at, kv_col, m_i, l_i, acc, qk_scale, zero_s, rows_o,
            p_layout, BLOCK_N, HEAD_DIM, STAGES, HAS_BIAS, MASKED, LAZY,
        )  # fmt: skip
    else:
        acc, l_i = _serial_loop(
            q, k_smem, v_smem, k_bars, v_bars, k_desc, v_desc, s, bias, bias_row, cols, kv_len,
            stride_biasn, n_blocks, kv_at, kv_col, m_i, l_i, acc, qk_scale, zero_s, rows_o,
            p_layout, BLOCK_N, HEAD_DIM, STAGES, HAS_BIAS, MASKED, LAZY,
        )  # fmt: skip

    l_o = gl.convert_layout(l_i, rows_o)
    acc = acc / gl.where(l_o == 0.0, 1.0, l_o)[:, None]
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
    o_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_M, HEAD_DIM], o_desc.layout)
    o_smem.reshape([BLOCK_M, HEAD_DIM]).store(acc.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [o_at, m0, o_col], o_smem)
    tma.store_wait(pendings=0)


def wgmma_attention_refusal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None, causal: bool
) -> str | None:
    """Why this kernel cannot run the call, or None (`out` None: a [B, Lq, H, D] tensor of its
    own, as kernl_ops writes attention's output)."""
    D = q.shape[-1]
    if causal:
        return "the wgmma attention kernel is not causal"
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "the wgmma attention kernel runs on Hopper (compute capability 9) only"
    if D not in (64, 128):
        return f"head dim {D}: the wgmma attention kernel takes 64 or 128"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"{q.dtype} / {k.dtype} / {v.dtype} tensors"
    # the same descriptors as the TMA kernel's: its refusal says where they cannot see a tensor
    return attention_tma_refusal(q, k, v, out, causal, 64, 64)


def wgmma_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    *,
    sm_scale: float,
    bias: torch.Tensor | None,
    kv_lens: torch.Tensor | None,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    overlap: bool = True,
    lazy_rescale: bool = False,
) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, H_kv, Lk, D], out like q; `bias` broadcast to [B, H, Lq, Lk]
    with one row for every query (stride 0 over the queries), or None; kv_lens [B] or None.
    lazy_rescale: FlashAttention-4's lazy rescale of the accumulator (`_softmax_block`).
    Writes `out` and returns it."""
    descs, bias_arg, strides, constants = _launch_operands(q, k, v, out, bias, block_m, block_n)
    B, H, Lq, _ = q.shape
    H_kv, Lk = k.shape[1], k.shape[2]
    lens = kv_lens.to(device=q.device, dtype=torch.int32) if kv_lens is not None else q
    launch_kernel(
        _wgmma_attention_kernel,
        (cdiv(Lq, block_m), B * H),
        *descs,
        bias_arg,
        lens,
        Lk,
        H,
        H // H_kv,
        sm_scale * 1.4426950408889634,
        *strides,
        **constants,
        STAGES=num_stages,
        HAS_KV_LENS=kv_lens is not None,
        MASKED=kv_lens is not None or Lk % block_n != 0,
        OVERLAP=overlap,
        LAZY=lazy_rescale,
        num_warps=num_warps,
    )
    return out


def _launch_operands(q, k, v, out, bias, block_m: int, block_n: int):
    """What the launcher passes: the TMA descriptors of q, k, v and out, the bias (q where
    there is none, never read) and its strides, and the constexprs of their layout. Raises
    ValueError for a call the kernel cannot run."""
    refusal = wgmma_attention_refusal(q, k, v, out, False)
    if refusal:
        raise ValueError(refusal)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if bias is not None:
        bias = bias.expand(B, H, Lq, Lk)  # broadcast dims get stride 0
    if bias is not None and bias.stride(2) != 0 and Lq > 1:
        raise ValueError("the wgmma attention kernel takes a bias of one row for every query")
    (q_rows, q_in_row), (k_rows, kv_in_row), (v_rows, _), (o_rows, o_in_row) = [
        _rows(t) for t in (q, k, v, out)
    ]
    descs = [
        TensorDesc(q_rows, (1, block_m, D), gluon=True),
        TensorDesc(k_rows, (1, block_n, D), gluon=True),
        TensorDesc(v_rows, (1, block_n, D), gluon=True),
        TensorDesc(o_rows, (1, block_m, D), gluon=True),
    ]
    strides = [bias.stride(0), bias.stride(1), bias.stride(3)] if bias is not None else [0, 0, 0]
    constants = dict(HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, Q_IN_ROW=q_in_row)
    constants |= dict(KV_IN_ROW=kv_in_row, O_IN_ROW=o_in_row, HAS_BIAS=bias is not None)
    return descs, bias if bias is not None else q, strides, constants


JIT_FUNCTIONS = (_wgmma_attention_kernel,)
