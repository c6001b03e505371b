"""An encoder's QKV projection and attention in one kernel: one program per (sequence, head)
computes that head's q, k and v from the hidden states, then attends over the whole sequence.

Why: at BERT-base's 32x128 the QKV GEMM writes 19 MB of q, k and v that the attention kernel
then reads back (25.4 + 9.8 µs a layer on the H200, 2026-12-04): the attention is bound by
that round trip, not by its 1.6 GFLOP. A program that keeps its head's q, k and v in
registers skips both, and one launch a layer goes. The price: the GEMM runs in tiles of one
sequence by one head (L x 3D), smaller than cuBLAS's, and the grid is B x H programs, so it
can only pay where B x H fills the GPU and a sequence fits one block (L <= 128 here).
Measured (H100, 2026-12-05, benchmarks/bench_qkv_attention.py, against cuBLAS's GEMM and the
best of the tuner's attention kernels in one graph): 0.94x their time at 32x128, 0.80x at
64x128, 0.87x at 16x128, 0.96x at 8x128, 0.99x at 64x64, 1.86x at 128x32. So it is not a
rewrite but a choice after tuning (compiler/tune_qkv_attention.py): a group becomes one
kernl.qkv_attention only where this kernel timed faster than the two tuned launches.

x [B, L, C] (C = H * D, contiguous rows), the fused weight [3C, C] as nn.Linear stores it
(q rows, then k, then v: compiler/passes/fuse_qkv.py's order), its bias [3C] or None, a
padding bias [B, L] of 0 / -inf (one row for every query of a sequence) or None; writes
out [B, L, C], the heads side by side as the output projection reads them. Non-causal."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_bias import log2_bias
from .jit import jit, next_power_of_2, tl
from .launch import launch_kernel
from .tma import TensorDesc

MAX_SEQ = 128  # one block of keys; the three accumulators and the scores live in registers


@jit
def _qkv_attention_kernel(
    x_desc,
    w_desc,
    out_desc,
    QKVBias,
    PadBias,
    L,
    num_heads,
    hidden,
    sm_scale,
    stride_pad_b,
    HEAD_DIM: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_QKV_BIAS: tl.constexpr,
    HAS_PAD_BIAS: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # heads of one sequence are neighbours in the grid: they read its hidden states from L2
    pid = tl.program_id(0)
    b = pid // num_heads
    h = pid % num_heads
    q_row = h * HEAD_DIM
    k_row = hidden + q_row
    v_row = 2 * hidden + q_row
    acc_q = tl.zeros((BLOCK_L, HEAD_DIM), dtype=tl.float32)
    acc_k = tl.zeros((BLOCK_L, HEAD_DIM), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_L, HEAD_DIM), dtype=tl.float32)
    for kk in tl.range(0, hidden, BLOCK_K, num_stages=NUM_STAGES):
        # rows past L read zeros (TMA), not the next sequence's tokens
        x = x_desc.load([b, 0, kk]).reshape(BLOCK_L, BLOCK_K)
        acc_q = tl.dot(x, w_desc.load([q_row, kk]).T, acc_q, input_precision=PRECISION)
        acc_k = tl.dot(x, w_desc.load([k_row, kk]).T, acc_k, input_precision=PRECISION)
        acc_v = tl.dot(x, w_desc.load([v_row, kk]).T, acc_v, input_precision=PRECISION)
    if HAS_QKV_BIAS:
        offs_d = tl.arange(0, HEAD_DIM)
        acc_q += tl.load(QKVBias + q_row + offs_d).to(tl.float32)[None, :]
        acc_k += tl.load(QKVBias + k_row + offs_d).to(tl.float32)[None, :]
        acc_v += tl.load(QKVBias + v_row + offs_d).to(tl.float32)[None, :]
    dtype = out_desc.dtype
    # rounded as the unfused GEMM's output is before attention reads it
    q = acc_q.to(dtype)
    k = acc_k.to(dtype)
    v = acc_v.to(dtype)
    log2e = 1.4426950408889634
    qk = tl.dot(q, k.T, input_precision=PRECISION) * (sm_scale * log2e)
    offs_n = tl.arange(0, BLOCK_L)
    col_mask = offs_n < L
    if HAS_PAD_BIAS:
        pad = tl.load(PadBias + b * stride_pad_b + offs_n, mask=col_mask, other=0.0)
        qk += log2_bias(pad)[None, :]
    qk = tl.where(col_mask[None, :], qk, float("-inf"))
    # a row with no visible key keeps p = 0 and outputs zeros, as attention.py's kernels do
    m = tl.max(qk, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.math.exp2(qk - m[:, None])
    denom = tl.sum(p, 1)
    o = tl.dot(p.to(dtype), v, input_precision=PRECISION)
    o = o / tl.where(denom == 0.0, 1.0, denom)[:, None]
    out_desc.store([b, 0, q_row], o.to(dtype).reshape(1, BLOCK_L, HEAD_DIM))


def qkv_attention_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    pad_bias: torch.Tensor | None,
    *,
    num_heads: int,
    sm_scale: float,
) -> torch.Tensor:
    """The same in plain PyTorch: the linear, the split into heads, softmax attention."""
    B, L, C = x.shape
    qkv = torch.nn.functional.linear(x, weight, qkv_bias)
    q, k, v = qkv.view(B, L, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) * sm_scale
    if pad_bias is not None:
        scores = scores + pad_bias[:, None, None, :].to(scores.dtype)
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key: zeros
    return (p @ v).transpose(1, 2).reshape(B, L, C)


@dataclass(frozen=True)
class QKVAttentionConfig:
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3


CONFIG_TYPE = QKVAttentionConfig  # what kernl_ops makes of a program's stored config


def qkv_attention_refusal(x: torch.Tensor, weight: torch.Tensor, num_heads: int) -> str | None:
    """Why the fused kernel cannot take this call, or None."""
    B, L, C = x.shape
    if C % num_heads:
        return f"hidden size {C} is not a multiple of {num_heads} heads"
    head_dim = C // num_heads
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head dim {head_dim} is not a power of two of 16 or more"
    if L > MAX_SEQ:
        return f"sequences of {L} tokens are longer than one block ({MAX_SEQ})"
    if tuple(weight.shape) != (3 * C, C):
        return f"a fused QKV weight is [{3 * C}, {C}], not {list(weight.shape)}"
    if not (x.is_contiguous() and weight.is_contiguous()):
        return "x and the weight must be contiguous"
    if C * x.element_size() % 16:
        return f"rows of {C} elements are not 16-byte multiples (TMA)"
    return None


def qkv_attention(
    x: torch.Tensor,
    weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    pad_bias: torch.Tensor | None,
    out: torch.Tensor,
    *,
    num_heads: int,
    sm_scale: float,
    config: QKVAttentionConfig = QKVAttentionConfig(),
) -> torch.Tensor:
    """out [B, L, C] = attention over each head of x [B, L, C] @ weight.T + qkv_bias, with the
    padding bias [B, L] (0 / -inf, or any additive per-key values) added to every query's
    scores. Returns `out`."""
    refusal = qkv_attention_refusal(x, weight, num_heads)
    if refusal:
        raise ValueError(f"qkv_attention: {refusal}")
    B, L, C = x.shape
    head_dim = C // num_heads
    if out.shape != x.shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {list(x.shape)}, not {list(out.shape)}")
    if pad_bias is not None and (pad_bias.shape != (B, L) or pad_bias.stride(-1) != 1):
        raise ValueError(f"the padding bias is [{B}, {L}] with unit key stride")
    block_l = max(16, next_power_of_2(L))
    launch_kernel(
        _qkv_attention_kernel,
        (B * num_heads,),
        TensorDesc(x, (1, block_l, config.block_k)),
        TensorDesc(weight, (head_dim, config.block_k)),
        TensorDesc(out, (1, block_l, head_dim)),
        qkv_bias if qkv_bias is not None else weight,
        pad_bias if pad_bias is not None else weight,
        L,
        num_heads,
        C,
        sm_scale,
        pad_bias.stride(0) if pad_bias is not None else 0,
        HEAD_DIM=head_dim,
        BLOCK_L=block_l,
        BLOCK_K=config.block_k,
        HAS_QKV_BIAS=qkv_bias is not None,
        HAS_PAD_BIAS=pad_bias is not None,
        NUM_STAGES=config.num_stages,
        # fp32 in full precision: TF32's 10-bit products would miss an fp32 model's tolerance
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def qkv_attention_configs() -> list[QKVAttentionConfig]:
    """The tuner's candidates: the best of the bench's 14 at every shape it timed (H100,
    2026-12-05: K steps of 64 with 4 warps and 2 stages, or 8 warps and 3) and their nearest
    neighbours; K steps of 32 with 8 warps were 30-90% slower everywhere, so they are not
    compiled at every build. `bench_qkv_attention.py` still times the full sweep."""
    return [
        QKVAttentionConfig(64, 4, 2),
        QKVAttentionConfig(64, 4, 3),
        QKVAttentionConfig(64, 8, 3),
        QKVAttentionConfig(128, 8, 2),
        QKVAttentionConfig(32, 4, 4),
    ]


def qkv_attention_sweep() -> list[QKVAttentionConfig]:
    """Every config the bench times (wider K steps fewer, deeper pipelines more memory)."""
    return [
        QKVAttentionConfig(block_k, warps, stages)
        for block_k in (32, 64, 128)
        for warps in (4, 8)
        for stages in (2, 3, 4)
        if block_k * stages <= 256
    ]


JIT_FUNCTIONS = (_qkv_attention_kernel,)
