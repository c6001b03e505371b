"""The tasks of the persistent decode step (decode_step.py): its grid barrier, a split-K
task's K chunk, the weight loop, the residual linear ops (O, down) that also fold the next
RMSNorm into what they write, and the pairs that read it (QKV's rotary halves, gate and up),
each reduced over its splits by the last to arrive, and the L2 prefetch of a task's first
weights. Split from the kernel so that each reads in one sitting."""

from __future__ import annotations

from .jit import constexpr, jit, tl, triton
from .norm_linear import _split_k_gather
from .pdl import prefetch_rows_l2

MAX_POLLS = constexpr(1 << 20)  # a barrier's wait, bounded


@jit
def now_ns(x):
    """The GPU's global timer, in ns (x: any scalar, to give the result its shape)."""
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=tl.int64, is_pure=False, pack=1
    )


@jit
def wait_until(Count, target, Sync):
    """Wait until *Count >= target (acquire: what was written before the counts is visible
    after). Bounded (~a second): a count that never comes (which the cooperative launch
    rules out) sets the flag Sync[2], every later wait of the step falls through, and the
    step finishes wrong (the flag says so) rather than hang the process."""
    seen = tl.load(Count, volatile=True)
    flagged = tl.load(Sync + 2, volatile=True)
    polls = 0
    while (seen < target) & (flagged == 0):
        seen = tl.load(Count, volatile=True)
        flagged = tl.load(Sync + 2, volatile=True)
        polls += 1
        if polls == MAX_POLLS:
            tl.atomic_max(Sync + 2, 1, sem="relaxed", scope="gpu")
    # The acquire that makes the others' writes visible here (their release at arrival). Its
    # value must be used: Triton lowers an atomic add of 0 to a load-acquire and drops it
    # when nothing reads it, as it did until 2026-12-02 (no acquire in the step's PTX; the
    # split-K gathers' acq_rel atomics happened to stand in). A count still short here is a
    # wait that timed out: flagged again.
    confirmed = tl.atomic_add(Count, 0, sem="acquire", scope="gpu")
    if confirmed < target:
        tl.atomic_max(Sync + 2, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()


@jit
def grid_sync(Sync, arrivals, Trace, barrier, TRACE: tl.constexpr, WAIT: tl.constexpr = True):
    """Arrive at the grid barrier, then (WAIT) wait until `arrivals` arrivals in all were
    counted (`wait_until`). With TRACE, the program's times of arrival and of leaving go to
    Trace[program, barrier, 0:2]."""
    if TRACE:
        tl.store(Trace + barrier * 2, now_ns(barrier))
    tl.debug_barrier()  # every thread's writes precede the release below
    tl.atomic_add(Sync, 1, sem="release", scope="gpu")
    if WAIT:
        wait_until(Sync, arrivals, Sync)
    if TRACE:
        tl.store(Trace + barrier * 2 + 1, now_ns(barrier))


@jit
def split_task(t, SPLIT: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Task t of a split-K op: (tile, split, k_lo, k_hi); a tile's SPLIT tasks are consecutive,
    so different programs stream its K chunks at once."""
    KC: tl.constexpr = (K + SPLIT * BLOCK_K - 1) // (SPLIT * BLOCK_K) * BLOCK_K
    split = t % SPLIT
    k_lo = split * KC
    return t // SPLIT, split, k_lo, tl.minimum(k_lo + KC, K)


@jit
def linear_rows(
    X, stride_xm, w_rows, u_rows, offs_m, m_mask, n_mask, k_lo, k_hi, BLOCK_N, BLOCK_K, PREC,
    PAIRED: tl.constexpr = False,
):  # fmt: skip
    """x[:16, k_lo:k_hi] @ W[w_rows, k_lo:k_hi]^T in fp32 (and @ W[u_rows]^T too, PAIRED). x
    is loaded as it is: a norm is folded in by whoever wrote it (store_normed), since in the
    loop its per-block work (the norm weight, the sum of squares over 16 padded rows) halved
    the weight stream of one program per SM (benchmarks/bench_stream_linear.py)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < k_hi
        x = tl.load(
            X + offs_m[:, None] * stride_xm + ks[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w_mask = n_mask[:, None] & k_mask[None, :]
        w = tl.load(w_rows + ks[None, :], mask=w_mask, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
        if PAIRED:
            wu = tl.load(u_rows + ks[None, :], mask=w_mask, other=0.0)
            acc_u = tl.dot(x, tl.trans(wu), acc_u, input_precision=PREC)
    return acc, acc_u


@jit
def store_normed(x, NormW, Xn, SumSq, part, offs_m, offs_n, m_mask, n_mask, H: tl.constexpr):
    """For the RMSNorm the next op folds in, from a finished tile x [16, cols offs_n] of the
    residual stream (as stored, fp32): Xn's tile, x * g rounded as the norm-folded loop
    rounded it (1 / rms comes in that op's epilogue), and the tile's rows' sums of squares
    in SumSq[part] (summed over the parts in a fixed order by `row_sumsq`)."""
    mask = m_mask[:, None] & n_mask[None, :]
    g = tl.load(NormW + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(
        Xn + offs_m[:, None] * H + offs_n[None, :],
        (x * g[None, :]).to(Xn.dtype.element_ty),
        mask=mask,
    )
    tl.store(SumSq + part * 16 + offs_m, tl.sum(tl.where(mask, x * x, 0.0), 1))


@jit
def row_sumsq(SumSq, offs_m, PARTS: tl.constexpr):
    """The rows' sums of squares: store_normed's PARTS parts, summed in order."""
    offs_p = tl.arange(0, triton.next_power_of_2(PARTS))
    parts = tl.load(
        SumSq + offs_p[:, None] * 16 + offs_m[None, :],
        mask=(offs_p < PARTS)[:, None],
        other=0.0,
        cache_modifier=".cg",
    )
    return tl.sum(parts, 0)


@jit
def residual_linear(
    t,
    X,
    In,
    W,
    Partial,
    SumSq,
    Counters,
    offs_m,
    m_mask,
    H: tl.constexpr,
    K: tl.constexpr,
    N_TILE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
    Ready,
    ready_target,
    Sync,
    WAIT_READY: tl.constexpr,
    Xn,
    NextNormW,
):
    """Task t of X[:, :H] += In[:, :K] @ W^T (O and down projections): its tile's K chunk,
    reduced by the tile's last split to arrive. Each column of X is read and written by the
    one task that finishes its tile, which also writes Xn and SumSq for the next op's RMSNorm
    (weight NextNormW; store_normed). WAIT_READY: first wait until Ready[split] counts
    ready_target (the O projection's chunk split is one kv group's heads, which that group's
    attention merges announce there)."""
    tile, split, k_lo, k_hi = split_task(t, SPLIT, K, BLOCK_K)
    if WAIT_READY:
        wait_until(Ready + split, ready_target, Sync)
    offs_n = tile * N_TILE + tl.arange(0, N_TILE)
    n_mask = offs_n < H
    w_rows = W + offs_n.to(tl.int64)[:, None] * K
    acc, _ = linear_rows(
        In, K, w_rows, w_rows, offs_m, m_mask, n_mask, k_lo, k_hi, N_TILE, BLOCK_K, PREC
    )
    last = True
    if SPLIT > 1:
        no_ss = tl.zeros([16], dtype=tl.float32)
        last, acc, _, _ = _split_k_gather(
            acc,
            acc,
            no_ss,
            Partial,
            SumSq,
            Counters,
            tile,
            split,
            offs_m,
            offs_n,
            offs_n,
            m_mask,
            n_mask,
            H,
            N_TILE,
            SPLIT,
            False,
            False,
        )
    if last:
        mask = m_mask[:, None] & n_mask[None, :]
        ptrs = X + offs_m[:, None] * H + offs_n[None, :]
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x = acc.to(X.dtype.element_ty)
        tl.store(ptrs, x, mask=mask)
        store_normed(
            x.to(tl.float32), NextNormW, Xn, SumSq, tile, offs_m, offs_n, m_mask, n_mask, H
        )


@jit
def norm_pair(
    t,
    Xn,
    W,
    rows1,
    rows2,
    n_mask,
    Partial,
    SumSq,
    Counters,
    offs_m,
    m_mask,
    H: tl.constexpr,
    N_W: tl.constexpr,
    N_TILE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
    PARTS: tl.constexpr,
):
    """Task t of RMSNorm(x) @ W[rows1]^T and @ W[rows2]^T (QKV's pair halves, gate and up), from
    Xn and the PARTS sums of squares its writer left (store_normed): (last, acc1, acc2, ss),
    the tile's splits gathered when last; 1 / rms is the caller's (_norm_linear_scale)."""
    tile, split, k_lo, k_hi = split_task(t, SPLIT, H, BLOCK_K)
    ss = row_sumsq(SumSq, offs_m, PARTS)  # asked for now, used after the loop
    w_rows = W + rows1.to(tl.int64)[:, None] * H
    u_rows = W + rows2.to(tl.int64)[:, None] * H
    acc, acc_u = linear_rows(
        Xn, H, w_rows, u_rows, offs_m, m_mask, n_mask, k_lo, k_hi, N_TILE, BLOCK_K, PREC, True
    )
    last = True
    if SPLIT > 1:
        last, acc, acc_u, _ = _split_k_gather(
            acc,
            acc_u,
            ss,
            Partial,
            SumSq,
            Counters,
            tile,
            split,
            offs_m,
            rows1,
            rows2,
            m_mask,
            n_mask,
            N_W,
            N_TILE,
            SPLIT,
            False,
            True,
        )
    return last, acc, acc_u, ss


@jit
def prefetch_task(W, rows, row_mask, K: tl.constexpr, t, SPLIT: tl.constexpr, BLOCK_K, LINES):
    """Ask L2 for task t's weights (rows [R], their K chunk): LINES 128-byte lines a row."""
    if LINES > 0:
        _, _, k_lo, k_hi = split_task(t, SPLIT, K, BLOCK_K)
        w_rows = W + rows.to(tl.int64)[:, None] * K
        prefetch_rows_l2(w_rows, row_mask, k_lo, k_hi, LINES, W.dtype.element_ty)


@jit
def qkv_tile(
    tile, QKV_N: tl.constexpr, QKV_P: tl.constexpr, HALF: tl.constexpr, D: tl.constexpr, NQKV
):  # fmt: skip
    """QKV tile: its QKV_P half-columns (head c // HALF, element c % HALF; a tile may span
    heads) in QKV_N lanes, and the weight rows of both halves of each pair."""
    lane = tl.arange(0, QKV_N)
    offs_c = tile * QKV_P + lane
    cols1 = (offs_c // HALF) * D + offs_c % HALF
    return offs_c, (lane < QKV_P) & (offs_c < NQKV // 2), cols1, cols1 + HALF
