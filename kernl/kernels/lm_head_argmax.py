"""Greedy decoding's last step in one pass: logits = x[M <= 16, K] @ W[V, K]^T (optionally with
the final RMSNorm folded in), written only when asked for, and ids = argmax(logits, -1) with
torch.argmax's tie rule (the first index among equal maxima).

The vocabulary is large (128k rows for Llama 3), so the grid is over V blocks alone, each
program streaming its BLOCK_N rows of W over the whole of K. A program packs each logit into
one int64, order-preserving bits of the value above (2^31 - 1 - column) — so the largest key
is the largest value and, among equal values, the smallest column — takes the max of its
tile and `atomic_max`es it into a per-row slot. The last program to arrive (an arrival
counter, bumped with release semantics after a barrier) decodes the ids and resets the slots
and the counter, so the workspace needs no reinitialising kernel between launches. The
atomics are a few per program over a launch that reads hundreds of MB: no contention worth
counting, and no second kernel scanning per-block maxima.

The argmax is taken over the logits as rounded to the weight's dtype, so the ids equal
torch.argmax of the logits this kernel writes (and of the unfused path's). RMSNorm is a
positive per-row scale applied in the epilogue (x * g accumulates against W; the sum of
squares comes from the same loads), so it costs no extra pass. NaN logits are not handled."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .jit import cdiv, constexpr, jit, tl
from .launch import is_interpreted, launch_kernel
from .pdl import pdl_kwargs, pdl_release, pdl_start, prefetch_lines, prefetch_rows_l2

MAX_ROWS = 16
INT64_MIN = -(2**63)
_KEY_MIN = constexpr(INT64_MIN)  # the empty key, below every packed logit


@jit
def _lm_head_argmax_kernel(
    X,
    W,
    NormW,
    Logits,
    Ids,
    Best,
    Counter,
    M,
    V,
    K,
    eps,
    stride_xm,
    stride_wn,
    stride_lm,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_NORM: tl.constexpr,
    WRITE_LOGITS: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, 16)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < V
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    if PREFETCH > 0:  # weights never depend on the previous kernel: stream them while it drains
        prefetch_rows_l2(w_rows, n_mask, 0, K, PREFETCH, W.dtype.element_ty)
    pdl_start(USE_PDL)  # every read below may depend on the previous kernel
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    ss = tl.zeros([16], dtype=tl.float32)
    # the norm weight's [BLOCK_K] load is too narrow per thread for an async copy, so the
    # pipeliner leaves it synchronous: load it one iteration ahead, its latency hidden
    g_next = tl.load(NormW + offs_k, mask=HAS_NORM & (offs_k < K), other=0.0)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        g = g_next.to(tl.float32)
        if HAS_NORM:
            g_next = tl.load(NormW + BLOCK_K + ks, mask=BLOCK_K + ks < K, other=0.0)
        x = tl.load(
            X + offs_m[:, None] * stride_xm + ks[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if HAS_NORM:
            xf = x.to(tl.float32)
            ss += tl.sum(xf * xf, 1)
            x = (xf * g[None, :]).to(W.dtype.element_ty)
        w = tl.load(w_rows + ks[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    pdl_release(USE_PDL)
    lm_head_argmax_finish(
        acc,
        ss,
        W,
        Logits,
        Ids,
        Best,
        Counter,
        offs_m,
        offs_n,
        m_mask,
        n_mask,
        K,
        eps,
        stride_lm,
        tl.num_programs(0),
        HAS_NORM,
        WRITE_LOGITS,
    )


@jit
def lm_head_argmax_finish(
    acc,
    ss,
    W,
    Logits,
    Ids,
    Best,
    Counter,
    offs_m,
    offs_n,
    m_mask,
    n_mask,
    K,
    eps,
    stride_lm,
    arrivals,
    HAS_NORM: tl.constexpr,
    WRITE_LOGITS: tl.constexpr,
):
    """A finished logits tile (acc, and x's sum of squares ss for the folded RMSNorm): write
    it, fold its argmax into the rows' best keys, and count its arrival; the `arrivals`-th
    tile to arrive writes the ids and leaves Best and Counter ready for the next step."""
    if HAS_NORM:
        acc = acc * (1.0 / tl.sqrt(ss / K + eps))[:, None]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if WRITE_LOGITS:
        tl.store(
            Logits + offs_m[:, None].to(tl.int64) * stride_lm + offs_n[None, :],
            acc.to(Logits.dtype.element_ty),
            mask=out_mask,
        )

    # the value torch.argmax would see, as order-preserving int32 bits (-0.0 made +0.0)
    v = acc.to(W.dtype.element_ty).to(tl.float32) + 0.0
    key = v.to(tl.int32, bitcast=True)
    key = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    packed = (key.to(tl.int64) << 32) | (0x7FFFFFFF - offs_n).to(tl.int64)
    packed = tl.where(n_mask[None, :], packed, _KEY_MIN)
    tl.atomic_max(Best + offs_m, tl.max(packed, 1), mask=m_mask, sem="relaxed", scope="gpu")
    # every thread's atomics precede the (release) bump of the counter
    tl.debug_barrier()
    arrived = tl.atomic_add(Counter, 1, sem="acq_rel", scope="gpu")
    if arrived == arrivals - 1:
        empty = tl.full([16], _KEY_MIN, dtype=tl.int64)
        best = tl.atomic_xchg(Best + offs_m, empty, mask=m_mask, sem="acq_rel", scope="gpu")
        tl.store(Ids + offs_m, (0x7FFFFFFF - (best & 0x7FFFFFFF)).to(tl.int64), mask=m_mask)
        tl.store(Counter, 0)  # ready for the next launch


def lm_head_argmax_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused sequence: (RMSNorm,) lm_head, argmax. Returns (ids [M], logits [M, V])."""
    if norm_weight is not None:
        x = F.rms_norm(x, (x.shape[-1],), norm_weight, eps)
    logits = F.linear(x, weight)
    return logits.argmax(-1), logits


@dataclass(frozen=True)
class LmHeadArgmaxConfig:
    BLOCK_N: int = 64
    BLOCK_K: int = 128
    num_warps: int = 4
    num_stages: int = 4


def lm_head_argmax_configs() -> list[LmHeadArgmaxConfig]:
    return [
        LmHeadArgmaxConfig(bn, bk, w, s)
        for bn, bk, w, s in [
            (64, 128, 4, 4),
            (32, 128, 4, 4),
            (128, 128, 8, 4),
            (64, 256, 4, 3),
            (32, 256, 4, 3),
            (128, 64, 4, 5),
        ]
    ]


def lm_head_argmax_decode_configs() -> list[LmHeadArgmaxConfig]:
    """The few the compiler times per decode batch on the model's own lm_head
    (compiler/tasks/causal_lm/decode_tiles.py)."""
    return [
        LmHeadArgmaxConfig(64, 128, 4, 4),
        LmHeadArgmaxConfig(32, 128, 4, 4),
        LmHeadArgmaxConfig(128, 128, 8, 4),
        LmHeadArgmaxConfig(64, 256, 4, 3),
        LmHeadArgmaxConfig(128, 64, 4, 5),
        LmHeadArgmaxConfig(32, 256, 2, 3),
        LmHeadArgmaxConfig(256, 64, 4, 5),  # the wide sweep's best at Llama-1B, H200
    ]


def new_workspace(device: torch.device | str) -> torch.Tensor:
    """Per-row best keys and the arrival counter (int64 [MAX_ROWS + 1]), ready for a launch;
    allocate once per stream, pass to every call: each launch leaves it ready again."""
    ws = torch.full((MAX_ROWS + 1,), INT64_MIN, dtype=torch.int64, device=device)
    ws[MAX_ROWS] = 0
    return ws


def lm_head_argmax(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    return_logits: bool = False,
    logits_out: torch.Tensor | None = None,
    ids_out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    config: LmHeadArgmaxConfig | None = None,
    pdl: bool = False,
    prefetch: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [M <= 16, K] (unit stride along K), weight [V, K] (unit stride along K), optional
    RMSNorm weight [K] applied to x first. Returns (ids [M] int64, logits [M, V] in x's dtype
    or None): logits are written when `return_logits` or `logits_out` is given. workspace:
    `new_workspace(device)`, left ready; None allocates one (one more kernel). pdl: launch with
    programmatic dependent launch (kernels/launch.py; off under the interpreter); prefetch
    (with pdl): first pull this program's first weight lines toward L2, before waiting."""
    M, K = x.shape
    V = weight.shape[0]
    assert M <= MAX_ROWS and weight.shape == (V, K) and weight.stride(1) == 1
    assert x.stride(1) == 1 and V < 2**31
    assert norm_weight is None or norm_weight.shape == (K,)
    config = config or LmHeadArgmaxConfig()
    write_logits = return_logits or logits_out is not None
    if write_logits and logits_out is None:
        logits_out = torch.empty((M, V), dtype=x.dtype, device=x.device)
    if write_logits:
        assert logits_out.shape == (M, V) and logits_out.stride(1) == 1
    if ids_out is None:
        ids_out = torch.empty((M,), dtype=torch.int64, device=x.device)
    assert ids_out.shape == (M,) and ids_out.dtype == torch.int64
    if workspace is None:
        workspace = new_workspace(x.device)
    assert workspace.dtype == torch.int64 and workspace.numel() == MAX_ROWS + 1
    logits = logits_out if write_logits else x
    launch_kernel(
        _lm_head_argmax_kernel,
        (cdiv(V, config.BLOCK_N),),
        x,
        weight,
        norm_weight if norm_weight is not None else weight,
        logits,
        ids_out,
        workspace,
        workspace[MAX_ROWS:],
        M,
        V,
        K,
        eps,
        x.stride(0),
        weight.stride(0),
        logits.stride(0),
        BLOCK_N=config.BLOCK_N,
        BLOCK_K=config.BLOCK_K,
        HAS_NORM=norm_weight is not None,
        WRITE_LOGITS=write_logits,
        PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_kwargs(pdl, is_interpreted(_lm_head_argmax_kernel), streaming=True),
        PREFETCH=prefetch_lines(pdl and prefetch, K, weight, _lm_head_argmax_kernel),
    )
    return ids_out, (logits_out if write_logits else None)


JIT_FUNCTIONS = (_lm_head_argmax_kernel,)
CONFIG_TYPE = LmHeadArgmaxConfig
