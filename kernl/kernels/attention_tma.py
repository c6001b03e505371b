"""Encoder attention whose q, k, v and output tiles move by TMA: softmax(q k^T * scale + bias) v
from a persistent grid that walks (batch, head, query block) tiles.

Why: BERT-base's attention at 32x128 and 8x512 reads q, k and v from the QKV projection's
output, which the GEMM has just left in L2, yet the pointer kernels (attention.py,
attention_short.py) moved it at about half of what that allows (~11 µs a layer at 32x128, ~25
at 8x512, H200). Here one TMA copy per tile replaces each program's address arithmetic and
per-thread loads, lands the tile in shared memory in the layout the tensor cores read, and the
tile loop is software-pipelined: the next tiles' copies are in flight while one computes.
Where every key fits one block (`ONE_BLOCK`), there is no key loop and the softmax is a plain
one; otherwise the keys stream in BLOCK_N blocks with an online softmax, as in attention.py.

The descriptors see each of q, k, v and out as rows of a 3-d tensor. Either the heads lie
side by side in a row (`*_IN_ROW`: [B, L, H * D], q, k and v the views of one QKV
projection or of a [B, L, H, D] tensor; the tile is at column h * D) or each head is its own
block of rows ([B * H, L, D], a contiguous [B, H, L, D]). Rows past L read zeros and stores
past it are dropped, per batch. `attention_tma_refusal` says why a call cannot take this kernel
(the tuner then leaves the config out). Non-causal only; a bias one row for every query (a
padding mask) or a full [B, H, Lq, Lk] one, per-row valid key counts and GQA as attention.py.
The reference is attention.py's `attention_reference`."""

from __future__ import annotations

import torch

from .attention_bias import log2_bias
from .jit import cdiv, jit, tl
from .launch import launch_kernel, sm_count
from .tma import TensorDesc, tma_usable


@jit
def _scores(q, k, Bias_row, offs_m, cols, kv_len, qk_scale, stride_biasm, stride_biasn, Lq,
            HAS_BIAS: tl.constexpr, BIAS_PER_KEY: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    # log2-domain scores of one key block; keys past kv_len are -inf
    qk = tl.dot(q, k.T)
    if BIAS_PER_KEY:
        if MASKED:
            bias = tl.load(Bias_row + cols * stride_biasn, mask=cols < kv_len, other=0.0)
        else:  # every block full: no predicate and address per column (as attention_wgmma.py)
            bias = tl.load(Bias_row + cols * stride_biasn)
        qk = qk * qk_scale + log2_bias(bias)[None, :]
    elif HAS_BIAS:
        mask = (offs_m[:, None] < Lq) & (cols[None, :] < kv_len)
        ptrs = Bias_row + offs_m[:, None] * stride_biasm + cols[None, :] * stride_biasn
        qk = qk * qk_scale + log2_bias(tl.load(ptrs, mask=mask, other=0.0))
    else:
        qk = qk * qk_scale
    if MASKED:
        qk = tl.where(cols[None, :] < kv_len, qk, float("-inf"))
    return qk


@jit
def _place(b, h, heads, HEAD_DIM: tl.constexpr, IN_ROW: tl.constexpr):
    if IN_ROW:
        return b, h * HEAD_DIM
    return b * heads + h, 0


@jit
def _tma_attention_kernel(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    Bias,
    KVLens,
    Lq,
    Lk,
    num_heads,
    group_size,
    sm_scale,
    num_m_blocks,
    num_tiles,
    stride_biasb,
    stride_biash,
    stride_biasm,
    stride_biasn,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    Q_IN_ROW: tl.constexpr,
    KV_IN_ROW: tl.constexpr,
    O_IN_ROW: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_PER_KEY: tl.constexpr,
    HAS_KV_LENS: tl.constexpr,
    MASKED: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    qk_scale = sm_scale * 1.4426950408889634
    offs_n = tl.arange(0, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), num_stages=NUM_STAGES):
        # query blocks of one head are neighbours: they share k and v in L2
        bh = tile // num_m_blocks
        m0 = (tile % num_m_blocks) * BLOCK_M
        b = bh // num_heads
        h = bh % num_heads
        h_kv = h // group_size
        # a tile's place: (batch, row, head's column) or (batch x head, row, 0)
        q_at, q_col = _place(b, h, num_heads, HEAD_DIM, Q_IN_ROW)
        kv_at, kv_col = _place(b, h_kv, num_heads // group_size, HEAD_DIM, KV_IN_ROW)
        o_at, o_col = _place(b, h, num_heads, HEAD_DIM, O_IN_ROW)
        kv_len = Lk
        if HAS_KV_LENS:
            kv_len = tl.minimum(tl.load(KVLens + b).to(tl.int32), Lk)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        bias_row = Bias + b.to(tl.int64) * stride_biasb + h.to(tl.int64) * stride_biash
        q = q_desc.load([q_at, m0, q_col]).reshape(BLOCK_M, HEAD_DIM)
        if ONE_BLOCK:
            k = k_desc.load([kv_at, 0, kv_col]).reshape(BLOCK_N, HEAD_DIM)
            qk = _scores(q, k, bias_row, offs_m, offs_n, kv_len, qk_scale, stride_biasm,
                         stride_biasn, Lq, HAS_BIAS, BIAS_PER_KEY, MASKED)  # fmt: skip
            m = tl.max(qk, 1)
            # a row with no visible key (all -inf) keeps p = 0 and outputs zeros, not NaN
            m = tl.where(m == float("-inf"), 0.0, m)
            p = tl.math.exp2(qk - m[:, None])
            l_i = tl.sum(p, 1)
            v = v_desc.load([kv_at, 0, kv_col]).reshape(BLOCK_N, HEAD_DIM)
            acc = tl.dot(p.to(v.dtype), v)
        else:
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_M,), tl.float32)
            acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
            for start_n in tl.range(0, kv_len, BLOCK_N, num_stages=NUM_STAGES):
                k = k_desc.load([kv_at, start_n, kv_col]).reshape(BLOCK_N, HEAD_DIM)
                qk = _scores(q, k, bias_row, offs_m, start_n + offs_n, kv_len, qk_scale,
                             stride_biasm, stride_biasn, Lq, HAS_BIAS, BIAS_PER_KEY, MASKED)  # fmt: skip
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(qk - m_safe[:, None])
                alpha = tl.math.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = v_desc.load([kv_at, start_n, kv_col]).reshape(BLOCK_N, HEAD_DIM)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
                m_i = m_new
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o = acc.to(o_desc.dtype).reshape(1, BLOCK_M, HEAD_DIM)
        o_desc.store([o_at, m0, o_col], o)


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """`t` [B, H, L, D] as the 3-d rows its descriptor walks, and whether the heads lie side
    by side in a row; None where neither view exists without a copy."""
    B, H, L, D = t.shape
    sb, sh, sl, sd = t.stride()
    if sd != 1 and D > 1:
        return None
    if sh == D or H == 1:  # [B, L, H * D]: a row holds every head
        return t.as_strided((B, L, H * D), (sb, sl, 1)), True
    if sb == H * sh or B == 1:  # [B * H, L, D]: each head its own rows
        return t.as_strided((B * H, L, D), (sh, sl, 1)), False
    return None


def attention_tma_refusal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    causal: bool,
    block_m: int,
    block_n: int,
) -> str | None:
    """Why this kernel cannot run the call, or None. `out` None: a [B, Lq, H, D] tensor of its
    own, as kernl_ops writes attention's output."""
    D = q.shape[-1]
    if causal:
        return "the TMA attention kernel is not causal"
    if D not in (16, 32, 64, 128, 256):
        return f"head dim {D} is not a power of two from 16 to 256"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        return f"{q.dtype} / {k.dtype} tensors"
    if max(block_m, block_n) > 256:
        return f"a TMA box holds at most 256 rows, not {max(block_m, block_n)}"
    views = [_rows(t) for t in (q, k, v) + ((out,) if out is not None else ())]
    if any(view is None for view in views):
        return "q, k, v and out need heads side by side in a row or each in its own rows"
    if views[1][1] != views[2][1]:
        return "k and v must lay their heads out alike"
    if out is None and q.shape[1] * D * q.element_size() % 16:
        return "a row of the output's heads is not a multiple of 16 bytes"
    if not tma_usable(*(view[0] for view in views)):
        return "a tensor's start or row stride is not 16-byte aligned"
    return None


def tma_attention(
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
    programs_per_sm: int,
) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, H_kv, Lk, D], out like q (strides as `attention_tma_refusal`
    accepts); `bias` already broadcast to [B, H, Lq, Lk] or None; kv_lens [B] or None.
    Writes `out` and returns it. Non-causal only."""
    refusal = attention_tma_refusal(q, k, v, out, False, block_m, block_n)
    if refusal:
        raise ValueError(refusal)
    B, H, Lq, D = q.shape
    H_kv, Lk = k.shape[1], k.shape[2]
    (q_rows, q_in_row), (k_rows, kv_in_row), (v_rows, _), (o_rows, o_in_row) = [
        _rows(t) for t in (q, k, v, out)
    ]
    num_m_blocks = cdiv(Lq, block_m)
    num_tiles = B * H * num_m_blocks
    programs = max(1, min(num_tiles, programs_per_sm * sm_count(q.device)))
    if bias is not None:
        bias_strides = list(bias.stride())
    else:
        bias, bias_strides = q, [0, 0, 0, 0]  # never read: HAS_BIAS is False
    lens = kv_lens.to(device=q.device, dtype=torch.int32) if kv_lens is not None else q
    one_block = Lk <= block_n
    launch_kernel(
        _tma_attention_kernel,
        (programs,),
        TensorDesc(q_rows, (1, block_m, D)),
        TensorDesc(k_rows, (1, block_n, D)),
        TensorDesc(v_rows, (1, block_n, D)),
        TensorDesc(o_rows, (1, block_m, D)),
        bias,
        lens,
        Lq,
        Lk,
        H,
        H // H_kv,
        sm_scale,
        num_m_blocks,
        num_tiles,
        *bias_strides,
        HEAD_DIM=D,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        Q_IN_ROW=q_in_row,
        KV_IN_ROW=kv_in_row,
        O_IN_ROW=o_in_row,
        ONE_BLOCK=one_block,
        HAS_BIAS=bias is not q,
        BIAS_PER_KEY=bias is not q and (bias_strides[2] == 0 or Lq == 1),
        HAS_KV_LENS=kv_lens is not None,
        MASKED=kv_lens is not None or Lk % block_n != 0,
        NUM_STAGES=num_stages,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


JIT_FUNCTIONS = (_tma_attention_kernel,)
