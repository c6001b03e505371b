"""A whole decode step of a Llama-family decoder (RMSNorm, rotary, gated SiLU MLP; Llama,
Mistral, Qwen2) in one persistent kernel: embedding, every layer, final norm, lm_head and
greedy argmax, for a few rows (<= 16, one token each).

Why one kernel (issue 15): a batch-1 step streams ~2.5 GB of weights, but as ~130 kernels
each boundary costs a few µs of launch, ramp-up and tail in which the weight stream stops.
Here a fixed grid of programs (one or a few per SM, all resident) runs the step's ops in
order, each op split into tasks (a tile of weight rows and a chunk of its K, or a chunk of
the KV cache) that the programs take round-robin. Between two ops a grid barrier makes the
first op's writes visible to every program.

Per layer, five ops (the tasks reuse the fused decode kernels' jit helpers, and the task
helpers of decode_step_tasks.py):
  1. the QKV projection of the RMSNorm'd x, rotary and the KV-cache write in its epilogue
     (norm_linear_rope's tile: half-column pairs of each head);
  2. attention over the cache, a chunk of slots per task; the last chunk of a (row, kv head)
     to finish merges the chunks of its group's heads at once (decode_attention's helpers);
  3. the O projection plus the residual, written back into the residual stream X;
  4. gate/up of the RMSNorm'd x, silu(gate) * up in the epilogue;
  5. the down projection plus the residual, into X.
Each RMSNorm is folded by the op that writes x (the embedding copy, O, down): its finished
tiles also write x * g and their rows' partial sums of squares, so the next op's weight
loop only loads and multiplies and applies 1 / rms in its epilogue (in the loop, the norm
had halved the weight stream: benchmarks/bench_stream_linear.py).
A linear op's tile may be split over K: each split writes an fp32 partial, the last to
arrive sums them in a fixed order and runs the epilogue (norm_linear's split-K gather).
Then lm_head of the final-RMSNorm'd x, the logits written, and the ids of the argmax
(lm_head_argmax's tail: packed keys, atomic max, the last tile to arrive writes the ids).

The grid barrier is the pattern of a cooperative grid sync: every program bumps a counter
(release, after a CTA barrier) and polls it until all have arrived (acquire). Every program
must be resident at once: the launch is cooperative (CUDA refuses a grid that cannot be
co-resident rather than hang), and a wait is bounded (decode_step_tasks.grid_sync). The last
program to leave resets the counter, so the next replay starts clean. Under Triton's
interpreter programs run one after another, so CPU tests run a grid of one (every barrier
is already met when reached); the GPU tests run the real grid."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .decode_attention import decode_attention_chunk, decode_attention_merge
from .decode_step_tasks import (
    grid_sync,
    linear_rows,
    norm_pair,
    now_ns,
    prefetch_task,
    qkv_tile,
    residual_linear,
    row_sumsq,
    store_normed,
    wait_until,
)
from .jit import jit, next_power_of_2, tl
from .launch import is_interpreted, launch_kernel
from .lm_head_argmax import lm_head_argmax_finish
from .norm_linear import _norm_linear_scale
from .rope_cache_write import rope_cache_store

MAX_ROWS = 16


@jit
def _decode_step_kernel(
    Tokens,
    Pos,
    Slot,
    KVMask,
    Embed,
    Cos,
    Sin,
    AttnNormW,
    Wqkv,
    Bqkv,
    Wo,
    MlpNormW,
    Wgu,
    Wd,
    FinalNormW,
    LmHead,
    KCache,
    VCache,
    X,
    Xn,
    Q,
    Att,
    Hmid,
    MidO,
    MidM,
    MidL,
    AttCounters,
    Partial,
    SumSq,
    Counters,
    Logits,
    Ids,
    Best,
    LmCounter,
    Sync,
    GroupReady,
    QkvReady,
    Trace,
    M,
    num_layers,
    slots,
    kv_len,
    vocab,
    eps,
    sm_scale,
    stride_maskb,
    stride_cos,
    stride_kl,
    stride_kb,
    stride_kh,
    stride_kn,
    H: tl.constexpr,
    NH: tl.constexpr,
    KVH: tl.constexpr,
    D: tl.constexpr,
    I: tl.constexpr,
    BLOCK_K: tl.constexpr,
    QKV_N: tl.constexpr,
    QKV_P: tl.constexpr,
    O_N: tl.constexpr,
    UP_N: tl.constexpr,
    DOWN_N: tl.constexpr,
    DOWN_BLOCK_K: tl.constexpr,
    LM_N: tl.constexpr,
    SPLIT_QKV: tl.constexpr,
    SPLIT_O: tl.constexpr,
    SPLIT_UP: tl.constexpr,
    SPLIT_DOWN: tl.constexpr,
    ATT_SPLITS: tl.constexpr,
    ATT_BLOCK: tl.constexpr,
    HAS_QKV_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    PF_QKV: tl.constexpr,
    PF_O: tl.constexpr,
    PF_UP: tl.constexpr,
    PF_DOWN: tl.constexpr,
    PF_LM: tl.constexpr,
    UP_AHEAD: tl.constexpr,
    FLATTEN: tl.constexpr,
    O_WAITS_GROUP: tl.constexpr,
    ATT_WAITS_QKV: tl.constexpr,
    ATT_FILL: tl.constexpr,
    TRACE: tl.constexpr,
):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    # with TRACE: this program's [barriers + 1, 2] times (the last row: its start and end)
    Tr = Trace + pid.to(tl.int64) * (2 + num_layers * 10 + 2)
    if TRACE:
        tl.store(Tr + (1 + num_layers * 5) * 2, now_ns(pid))
    HALF: tl.constexpr = D // 2
    GROUP: tl.constexpr = NH // KVH
    NQ: tl.constexpr = NH * D  # the attention output's width, the O projection's K
    NQKV: tl.constexpr = (NH + 2 * KVH) * D
    QKV_TASKS: tl.constexpr = (NQKV // 2 + QKV_P - 1) // QKV_P * SPLIT_QKV
    O_TASKS: tl.constexpr = (H + O_N - 1) // O_N * SPLIT_O
    UP_TASKS: tl.constexpr = (I + UP_N - 1) // UP_N * SPLIT_UP
    DOWN_TASKS: tl.constexpr = (H + DOWN_N - 1) // DOWN_N * SPLIT_DOWN
    # the sums of squares of x's rows come in parts, one per tile of the op that wrote x
    PARTS_O: tl.constexpr = (H + O_N - 1) // O_N
    PARTS_DOWN: tl.constexpr = (H + DOWN_N - 1) // DOWN_N
    offs_m = tl.arange(0, 16)
    m_mask = offs_m < M

    # the first QKV task's weights are asked for while the embedding rows are copied
    pf_c, c_mask, cols1, cols2 = qkv_tile(pid // SPLIT_QKV, QKV_N, QKV_P, HALF, D, NQKV)
    prefetch_task(Wqkv, cols1, c_mask, H, pid, SPLIT_QKV, BLOCK_K, PF_QKV)
    prefetch_task(Wqkv, cols2, c_mask, H, pid, SPLIT_QKV, BLOCK_K, PF_QKV)
    tok = tl.load(Tokens + offs_m, mask=m_mask, other=0).to(tl.int64)
    for c in range(pid, tl.cdiv(H, DOWN_N), G):  # the tiles of the down projection's (PARTS)
        cols = c * DOWN_N + tl.arange(0, DOWN_N)
        mask = m_mask[:, None] & (cols < H)[None, :]
        e = tl.load(Embed + tok[:, None] * H + cols[None, :], mask=mask, other=0.0)
        tl.store(X + offs_m[:, None] * H + cols[None, :], e, mask=mask)
        store_normed(e.to(tl.float32), AttnNormW, Xn, SumSq, c, offs_m, cols, m_mask, cols < H, H)
    grid_sync(Sync, G, Tr, 0, TRACE)

    n_valid = tl.minimum(tl.load(Slot).to(tl.int32) + 1, kv_len)  # slots [0, slot] are read
    att_splits = ATT_SPLITS  # each (row, kv head)'s chunks of the cache
    if ATT_FILL:  # as many as give each program one task, at most ATT_SPLITS
        att_splits = tl.minimum(tl.maximum(G // (M * KVH), 1), ATT_SPLITS)
    chunk = tl.cdiv(tl.cdiv(n_valid, att_splits), ATT_BLOCK) * ATT_BLOCK
    for layer in range(num_layers):
        lyr = tl.cast(layer, tl.int64)
        arrived = (1 + layer * 5) * G  # arrivals at the barrier before this layer
        W1 = Wqkv + lyr * (NQKV * H)
        Wo_l = Wo + lyr * (H * NQ)
        Wgu_l = Wgu + lyr * (2 * I * H)
        Wd_l = Wd + lyr * (H * I)
        K_l = KCache + lyr * stride_kl
        V_l = VCache + lyr * stride_kl

        # 1. norm -> QKV -> rotary -> q and the cache slot
        for t in tl.range(pid, QKV_TASKS, G, flatten=FLATTEN):
            offs_c, c_mask, cols1, cols2 = qkv_tile(t // SPLIT_QKV, QKV_N, QKV_P, HALF, D, NQKV)
            last, acc, acc_u, ss = norm_pair(
                t,
                Xn,
                W1,
                cols1,
                cols2,
                c_mask,
                Partial,
                SumSq,
                Counters,
                offs_m,
                m_mask,
                H,
                NQKV,
                QKV_N,
                SPLIT_QKV,
                BLOCK_K,
                PRECISION,
                PARTS_DOWN,
            )
            if last:
                acc, acc_u = _norm_linear_scale(
                    acc,
                    acc_u,
                    ss,
                    Bqkv + lyr * NQKV,
                    cols1,
                    cols2,
                    c_mask,
                    H,
                    eps,
                    True,
                    HAS_QKV_BIAS,
                    True,
                )
                rope_cache_store(
                    acc,
                    acc_u,
                    offs_m,
                    offs_c,
                    m_mask,
                    c_mask,
                    Pos,
                    Cos,
                    Sin,
                    Slot,
                    Q,
                    K_l,
                    V_l,
                    NH,
                    KVH,
                    slots,
                    1,
                    stride_cos,
                    stride_cos,
                    NQ,
                    D,
                    1,
                    stride_kb,
                    stride_kh,
                    stride_kn,
                    1,
                    stride_kb,
                    stride_kh,
                    stride_kn,
                    1,
                    HALF,
                    True,
                )
                if ATT_WAITS_QKV:  # this tile's pair columns are written: count them by kv group
                    head = offs_c // HALF  # NH q heads, then KVH k heads, then KVH v heads
                    grp = tl.where(head < NH, head // GROUP, (head - NH) % KVH)
                    tl.debug_barrier()  # every thread's stores precede the (release) counts
                    tl.atomic_add(QkvReady + grp, 1, mask=c_mask, sem="release", scope="gpu")
        # with ATT_WAITS_QKV each attention task waits for its kv group's QKV columns instead
        grid_sync(Sync, arrived + G, Tr, 1 + layer * 5 + 0, TRACE, not ATT_WAITS_QKV)

        # 2. attention: a chunk of slots per task; a (row, kv head)'s last chunk merges
        pf_o = pid // SPLIT_O * O_N + tl.arange(0, O_N)  # O's first tile streams meanwhile
        prefetch_task(Wo_l, pf_o, pf_o < H, NQ, pid, SPLIT_O, BLOCK_K, PF_O)
        for t in range(pid, M * KVH * att_splits, G):
            split = t % att_splits
            bh = t // att_splits
            b = (bh // KVH).to(tl.int64)
            h_kv = (bh % KVH).to(tl.int64)
            lo = split * chunk
            if ATT_WAITS_QKV:  # q, k and v of group h_kv: (GROUP + 2) heads of HALF pairs
                wait_until(QkvReady + h_kv, (layer + 1) * (GROUP + 2) * HALF, Sync)
            o, m_i, l_i, heads, g_mask, offs_d, d_mask = decode_attention_chunk(
                Q,
                K_l,
                V_l,
                KVMask,
                b,
                h_kv,
                lo,
                tl.minimum(lo + chunk, n_valid),
                0,  # no window of its own: the slot mask it reads has it
                GROUP,
                sm_scale,
                1.0,
                stride_maskb,
                NQ,
                D,
                1,
                stride_kb,
                stride_kh,
                stride_kn,
                1,
                stride_kb,
                stride_kh,
                stride_kn,
                1,
                D,
                max(16, D),
                max(16, GROUP),
                ATT_BLOCK,
                True,
                False,  # no softcap: Gemma2 is not served by the persistent step
            )
            mid = (b * NH + heads) * ATT_SPLITS + split  # MidO [B, NH, splits, D]
            tl.store(
                MidO + mid[:, None] * D + offs_d[None, :], o, mask=g_mask[:, None] & d_mask[None, :]
            )
            tl.store(MidM + mid, m_i, mask=g_mask)
            tl.store(MidL + mid, l_i, mask=g_mask)
            tl.debug_barrier()  # every thread's stores precede the (release) arrival
            done = tl.atomic_add(AttCounters + bh, 1, sem="acq_rel", scope="gpu")
            if done == att_splits - 1:
                decode_attention_merge(
                    MidO,
                    MidM,
                    MidL,
                    Att,
                    b,
                    h_kv * GROUP,
                    att_splits,
                    NH * ATT_SPLITS * D,
                    ATT_SPLITS * D,
                    D,
                    NH * ATT_SPLITS,
                    ATT_SPLITS,
                    NQ,
                    D,
                    1,
                    D,
                    max(16, D),
                    max(2, ATT_SPLITS),
                    GROUP,
                )
                tl.store(AttCounters + bh, 0)  # ready for the next layer
                if O_WAITS_GROUP:  # this row's heads of group h_kv are merged
                    tl.debug_barrier()
                    tl.atomic_add(GroupReady + h_kv, 1, sem="release", scope="gpu")
        if UP_AHEAD > 0:  # HBM is mostly idle until gate/up: its first task's weights to L2
            pf_up = pid // SPLIT_UP * UP_N + tl.arange(0, UP_N)
            prefetch_task(Wgu_l, pf_up, pf_up < I, H, pid, SPLIT_UP, BLOCK_K, UP_AHEAD)
            prefetch_task(Wgu_l, I + pf_up, pf_up < I, H, pid, SPLIT_UP, BLOCK_K, UP_AHEAD)
        # with O_WAITS_GROUP the O tasks wait for their kv group's merges instead
        grid_sync(Sync, arrived + 2 * G, Tr, 1 + layer * 5 + 1, TRACE, not O_WAITS_GROUP)

        # 3. O projection + residual
        for t in tl.range(pid, O_TASKS, G, flatten=FLATTEN):
            residual_linear(
                t,
                X,
                Att,
                Wo_l,
                Partial,
                SumSq,
                Counters,
                offs_m,
                m_mask,
                H,
                NQ,
                O_N,
                SPLIT_O,
                BLOCK_K,
                PRECISION,
                GroupReady,
                (layer + 1) * M,
                Sync,
                O_WAITS_GROUP,
                Xn,
                MlpNormW + lyr * H,
            )
        pf_up = pid // SPLIT_UP * UP_N + tl.arange(0, UP_N)
        prefetch_task(Wgu_l, pf_up, pf_up < I, H, pid, SPLIT_UP, BLOCK_K, PF_UP)
        prefetch_task(Wgu_l, I + pf_up, pf_up < I, H, pid, SPLIT_UP, BLOCK_K, PF_UP)
        grid_sync(Sync, arrived + 3 * G, Tr, 1 + layer * 5 + 2, TRACE)

        # 4. norm -> gate/up -> silu(gate) * up
        for t in tl.range(pid, UP_TASKS, G, flatten=FLATTEN):
            offs_n = t // SPLIT_UP * UP_N + tl.arange(0, UP_N)
            n_mask = offs_n < I
            last, acc, acc_u, ss = norm_pair(
                t,
                Xn,
                Wgu_l,
                offs_n,
                I + offs_n,
                n_mask,
                Partial,
                SumSq,
                Counters,
                offs_m,
                m_mask,
                H,
                2 * I,
                UP_N,
                SPLIT_UP,
                BLOCK_K,
                PRECISION,
                PARTS_O,
            )
            if last:
                acc, acc_u = _norm_linear_scale(
                    acc, acc_u, ss, Wgu, offs_n, offs_n + I, n_mask, H, eps, True, False, True
                )
                acc = acc / (1.0 + tl.exp(-acc)) * acc_u
                tl.store(
                    Hmid + offs_m[:, None] * I + offs_n[None, :],
                    acc.to(Hmid.dtype.element_ty),
                    mask=m_mask[:, None] & n_mask[None, :],
                )
        pf_down = pid // SPLIT_DOWN * DOWN_N + tl.arange(0, DOWN_N)
        prefetch_task(Wd_l, pf_down, pf_down < H, I, pid, SPLIT_DOWN, DOWN_BLOCK_K, PF_DOWN)
        grid_sync(Sync, arrived + 4 * G, Tr, 1 + layer * 5 + 3, TRACE)

        # 5. down projection + residual (x normed for the next layer's QKV, or for lm_head)
        next_norm = FinalNormW
        if layer + 1 < num_layers:
            next_norm = AttnNormW + (lyr + 1) * H
        for t in tl.range(pid, DOWN_TASKS, G, flatten=FLATTEN):
            residual_linear(
                t,
                X,
                Hmid,
                Wd_l,
                Partial,
                SumSq,
                Counters,
                offs_m,
                m_mask,
                H,
                I,
                DOWN_N,
                SPLIT_DOWN,
                DOWN_BLOCK_K,
                PRECISION,
                GroupReady,
                0,
                Sync,
                False,
                Xn,
                next_norm,
            )
        if layer + 1 < num_layers:
            pf_c, c_mask, cols1, cols2 = qkv_tile(pid // SPLIT_QKV, QKV_N, QKV_P, HALF, D, NQKV)
            prefetch_task(W1 + NQKV * H, cols1, c_mask, H, pid, SPLIT_QKV, BLOCK_K, PF_QKV)
            prefetch_task(W1 + NQKV * H, cols2, c_mask, H, pid, SPLIT_QKV, BLOCK_K, PF_QKV)
        else:
            pf_lm = pid * LM_N + tl.arange(0, LM_N)
            prefetch_task(LmHead, pf_lm, pf_lm < vocab, H, pid, 1, BLOCK_K, PF_LM)
        grid_sync(Sync, arrived + 5 * G, Tr, 1 + layer * 5 + 4, TRACE)

    # final norm -> lm_head -> logits and the argmax
    lm_tasks = tl.cdiv(vocab, LM_N)
    for t in tl.range(pid, lm_tasks, G, flatten=FLATTEN):
        offs_n = t * LM_N + tl.arange(0, LM_N)
        n_mask = offs_n < vocab
        w_rows = LmHead + offs_n.to(tl.int64)[:, None] * H
        ss = row_sumsq(SumSq, offs_m, PARTS_DOWN)
        acc, _ = linear_rows(
            Xn, H, w_rows, w_rows, offs_m, m_mask, n_mask, 0, H, LM_N, BLOCK_K, PRECISION
        )
        lm_head_argmax_finish(
            acc,
            ss,
            LmHead,
            Logits,
            Ids,
            Best,
            LmCounter,
            offs_m,
            offs_n,
            m_mask,
            n_mask,
            H,
            eps,
            vocab,
            lm_tasks,
            True,
            True,
        )

    if TRACE:
        tl.store(Tr + (1 + num_layers * 5) * 2 + 1, now_ns(pid))
    # the last program out resets the barrier for the next step (all others are past it)
    tl.debug_barrier()
    left = tl.atomic_add(Sync + 1, 1, sem="acq_rel", scope="gpu")
    if left == G - 1:
        tl.store(Sync, 0)
        tl.store(Sync + 1, 0)
        for g in tl.static_range(KVH):
            tl.store(GroupReady + g, 0)
            tl.store(QkvReady + g, 0)


# -- host side -----------------------------------------------------------------------------


@dataclass
class DecodeStepWeights:
    """A decoder's weights as the kernel reads them: each kind stacked over layers (contiguous
    [L, rows, K]), gate_up = [gate; up] rows, cos / sin [positions, D] (`rope_tables`)."""

    embed: torch.Tensor  # [V, H]
    attn_norm: torch.Tensor  # [L, H]
    qkv: torch.Tensor  # [L, (NH + 2 KVH) D, H]
    qkv_bias: torch.Tensor | None  # [L, (NH + 2 KVH) D]
    o: torch.Tensor  # [L, H, NH D]
    mlp_norm: torch.Tensor  # [L, H]
    gate_up: torch.Tensor  # [L, 2 I, H]
    down: torch.Tensor  # [L, H, I]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]
    cos: torch.Tensor
    sin: torch.Tensor
    num_heads: int
    num_kv_heads: int
    eps: float
    sm_scale: float

    @property
    def num_layers(self) -> int:
        return self.qkv.shape[0]

    @property
    def head_dim(self) -> int:
        return self.qkv.shape[1] // (self.num_heads + 2 * self.num_kv_heads)


@dataclass(frozen=True)
class DecodeStepConfig:
    """Tiles (weight rows per task: QKV_N half-column pairs, the others rows), each linear op's
    K split (a tile's chunks streamed by SPLIT programs at once, reduced by the last to
    arrive), the attention chunking, and the launch: programs_per_sm programs on each SM
    (one under the interpreter), each with its own load pipeline."""

    # the defaults: the fastest at Llama-1B's shapes on an H200 (2026-12-01, bench_decode_step)
    BLOCK_K: int = 128
    QKV_N: int = 32
    O_N: int = 64
    UP_N: int = 64
    DOWN_N: int = 64
    LM_N: int = 128
    SPLIT_QKV: int = 2
    SPLIT_O: int = 4
    SPLIT_UP: int = 1
    SPLIT_DOWN: int = 8
    ATT_SPLITS: int = 4
    ATT_BLOCK: int = 64
    num_warps: int = 4
    num_stages: int = 4
    programs_per_sm: int = 1
    flatten: bool = False  # a linear op's task and K loops as one pipelined loop
    # no barrier between attention and O: an O task waits for its K chunk's kv group only
    # (needs SPLIT_O == the kv heads, each chunk one group's heads, whole K blocks)
    o_waits_group: bool = False
    # attention in fewer chunks (at most ATT_SPLITS) where the rows alone give every program a
    # task: at batch 8 over 512 slots, 16 chunks a (row, kv head) took 52 µs a layer (H200)
    att_fill: bool = True
    # the down projection's own K block (0: BLOCK_K): a long one for narrow unsplit tiles
    DOWN_BLOCK_K: int = 0
    # after its attention tasks, each program asks L2 for the first up_ahead_k columns of its
    # first gate/up task (0: not): attention and O leave HBM mostly idle, gate/up is the
    # layer's largest op (67 MB at Llama-1B; L2 holds ~50)
    up_ahead_k: int = 0
    # no barrier between QKV and attention: an attention task waits for its kv group's q, k
    # and v columns only
    att_waits_qkv: bool = False
    # the pairs a QKV tile owns, in its QKV_N lanes (0: QKV_N): a QKV op whose task count
    # fits the grid. Llama-1B's 1536 pairs in tiles of 32, split 2, are 96 tasks for 132 SMs
    # (a third idle; every other op has 128 tasks); in tiles of 24, 128
    QKV_PAIRS: int = 0

    @property
    def max_split(self) -> int:
        return max(self.SPLIT_QKV, self.SPLIT_O, self.SPLIT_UP, self.SPLIT_DOWN)


def decode_step_configs() -> list[DecodeStepConfig]:
    """The variants a benchmark or the compiler times. On an H200 (2026-12-01) the step first
    streamed at 26-37% of the copy bandwidth. A bench of the weight stream alone
    (benchmarks/bench_stream_linear.py) found one program per SM enough for ~3.5 TB/s with a
    barrier a layer (4.3 without), when its loop only loads and multiplies: the RMSNorm once
    folded into each K block had halved it. The norm is now folded by whoever writes x
    (decode_step_tasks.store_normed), and the step went from 1470 to ~995 µs at batch 1.
    Attention over 16 chunks a (row, kv head) then took 52 µs a layer at batch 8: 4 chunks
    of 64-slot blocks took the batch-8 step from 1.74 to 1.14 ms, and the default takes
    fewer still where the rows alone give each program a task (att_fill).
    The others: wider down tiles, 16 chunks where the rows allow (long caches), the tiles
    before the norm moved (wide, deep), QKV unsplit, 4 chunks always, the down projection
    unsplit or split 2 with long K blocks of its own, gate/up's first weights asked of L2
    while attention and O run (up_ahead_k), narrower O tiles, two programs per SM, the task
    loops flattened into their K loops, and fewer barriers a layer (o_waits_group for
    Llama-1B's 8 kv groups, att_waits_qkv). Their times at batch 1, 4 and 8 over 512 and 2048
    slots are in docs/performance.md (ninth session): L2 prefetches, flattening and fewer
    barriers were slower than the default everywhere, two programs per SM but at batch 8
    over 2048 slots. Not kept (thirteenth session): each op's first weight columns loaded
    into registers before its barrier (64 or 128 columns a row), 9-20% slower at every
    bucket, 8 warps too: the kernel already holds 255 registers a thread and spilled more.
    Not kept (twenty-eighth session): gate/up and down as one op, each task's down partial
    over its intermediate columns summed in groups by the last to arrive: 1069 against 944
    µs at batch 1 over 512 slots, 2.6-3.3 ms at batch 4 and 8 (the sums ran on one SM each)."""
    best = DecodeStepConfig()
    wide = DecodeStepConfig(BLOCK_K=256, num_stages=3, UP_N=32, SPLIT_QKV=1)
    wide = replace(wide, ATT_SPLITS=16, ATT_BLOCK=32, att_fill=False)
    return [
        best,
        replace(best, DOWN_N=128),
        replace(best, ATT_SPLITS=16, ATT_BLOCK=32),
        wide,
        replace(wide, BLOCK_K=128, num_stages=4),
        replace(best, SPLIT_QKV=1),
        replace(best, att_fill=False),  # measured: 987 µs at batch 1, 1145 at batch 8
        # down without the split-K gather (or a gather of two): narrow tiles, long K blocks
        replace(best, DOWN_N=16, SPLIT_DOWN=1, DOWN_BLOCK_K=512),
        replace(best, DOWN_N=32, SPLIT_DOWN=2, DOWN_BLOCK_K=512),
        # gate/up's weights asked of L2 while attention and O leave HBM idle: a quarter of
        # each task, half of it
        replace(best, up_ahead_k=512),
        replace(best, up_ahead_k=1024),
        replace(best, O_N=32, SPLIT_O=2),
        # two programs per SM must fit its 227 KB of shared memory together
        replace(best, programs_per_sm=2, UP_N=32, num_stages=3),
        # each linear op's task and K loops fused into one pipelined loop, as Triton's
        # persistent matmul does: the weight stream does not drain between two tasks
        replace(best, flatten=True),
        # no barrier between attention and O (Llama-1B's 8 kv groups: one O split each)
        replace(best, SPLIT_O=8, o_waits_group=True),
        # no barrier between QKV and attention, and none between attention and O either
        replace(best, att_waits_qkv=True),
        replace(best, SPLIT_O=8, o_waits_group=True, att_waits_qkv=True),
        # the fastest at batch 1 over 512 slots, with the chunking of long caches
        replace(best, DOWN_N=128, ATT_SPLITS=16, ATT_BLOCK=32),
        # the two fastest with QKV in 128 tasks (64 tiles of 24 pairs, split 2), not 96
        replace(best, DOWN_N=32, SPLIT_DOWN=2, DOWN_BLOCK_K=512, QKV_PAIRS=24),
        replace(best, DOWN_N=128, QKV_PAIRS=24),
    ]


def decode_step_choice_configs() -> list[DecodeStepConfig]:
    """The few configs the compiler times, each decode bucket then taking the fastest (each
    is one more build of the whole step per batch). On an H200 (2026-12-01, µs at the last
    slot of 512 / 2048): down in 32-row tiles split 2 was the fastest at batch 4 and 8 (976 /
    1118, 1034 / 1293); 128-row down tiles at batch 1 over 512 slots (952); 16 attention
    chunks at batch 1 over 2048 (1005, with the default down tiles; here with 128-row ones)."""
    every = decode_step_configs()
    return [every[8], every[1], every[17]]


def config_pairs(config: DecodeStepConfig) -> tuple[tuple[str, int], ...]:
    """A config as an artifact stores it (DecodeKernels.step_config): (field, int) pairs."""
    return tuple((f.name, int(getattr(config, f.name))) for f in fields(config))


def config_from_pairs(pairs: tuple) -> DecodeStepConfig:
    """The config of stored pairs (the reader checked them); empty: the default."""
    values = dict(pairs)
    if values and "att_fill" not in values:  # stored before the field: what was timed
        values["att_fill"] = 0
    for flag in ("flatten", "o_waits_group", "att_fill", "att_waits_qkv"):
        if flag in values:
            values[flag] = bool(values[flag])
    return DecodeStepConfig(**values)


MAX_TILES = 4096  # split-K counters: the tiles of one op


def new_step_counters(w: DecodeStepWeights) -> tuple[torch.Tensor, ...]:
    """The counters a step leaves zeroed (split-K arrivals per tile, attention arrivals, the
    argmax's best keys and arrivals, the grid barrier), shareable by every batch's buffers:
    zero them once, outside any graph capture, so that whichever captured step replays
    first finds them ready."""
    from .lm_head_argmax import new_workspace

    dev = w.qkv.device
    tiles = torch.zeros(MAX_TILES, dtype=torch.int32, device=dev)
    att = torch.zeros(MAX_ROWS * w.num_kv_heads, dtype=torch.int32, device=dev)
    # the barrier's arrivals, the programs out, the flag of a wait that timed out, and each kv
    # group's merged rows (o_waits_group)
    sync = torch.zeros(3 + 2 * w.num_kv_heads, dtype=torch.int32, device=dev)
    return tiles, att, new_workspace(dev), sync


@dataclass
class DecodeStepBuffers:
    """What one step of `rows` rows writes besides the caches, allocated once per batch bucket
    and config, and the counters (`new_step_counters`)."""

    x: torch.Tensor
    xn: torch.Tensor  # x * the next RMSNorm's weight (decode_step_tasks.store_normed)
    q: torch.Tensor
    att: torch.Tensor
    h: torch.Tensor
    mid_o: torch.Tensor
    mid_m: torch.Tensor
    mid_l: torch.Tensor
    partial: torch.Tensor  # split-K partial tiles [splits, 16, widest op], fp32
    sumsq: torch.Tensor  # x's rows' sums of squares, a part per tile of x's writer [tiles, 16]
    logits: torch.Tensor
    ids: torch.Tensor
    tile_counters: torch.Tensor
    att_counters: torch.Tensor
    best: torch.Tensor
    sync: torch.Tensor

    @staticmethod
    def allocate(
        w: DecodeStepWeights, rows: int, config: DecodeStepConfig, counters: tuple | None = None
    ) -> DecodeStepBuffers:
        dev, dt = w.qkv.device, w.qkv.dtype
        H, NH, D = w.embed.shape[1], w.num_heads, w.head_dim
        I = w.gate_up.shape[1] // 2  # noqa: E741
        splits = config.ATT_SPLITS
        widest = max(w.qkv.shape[1], 2 * I, H)
        tiles = _most_tiles(w, config)
        f32 = torch.float32
        new = lambda *shape, dtype=dt: torch.empty(shape, dtype=dtype, device=dev)  # noqa: E731
        return DecodeStepBuffers(
            new(rows, H),
            new(rows, H),
            new(rows, NH, D),
            new(rows, NH * D),
            new(rows, I),
            new(rows, NH, splits, D, dtype=f32),
            new(rows, NH, splits, dtype=f32),
            new(rows, NH, splits, dtype=f32),
            new(config.max_split, 16, widest, dtype=f32),
            new(tiles * 16, dtype=f32),
            new(rows, w.lm_head.shape[0]),
            new(rows, dtype=torch.int64),
            *(counters or new_step_counters(w)),
        )


def _most_tiles(w: DecodeStepWeights, c: DecodeStepConfig) -> int:
    """The most tiles any linear op of the step has (each has a split-K counter)."""
    H, I = w.embed.shape[1], w.gate_up.shape[1] // 2  # noqa: E741
    ops = ((w.qkv.shape[1] // 2, c.QKV_PAIRS or c.QKV_N), (H, c.O_N), (I, c.UP_N), (H, c.DOWN_N))
    return max(-(-n // tile) for n, tile in ops)


def _lines(on: bool, k: int, split: int, block_k: int, elem: int, stages: int) -> int:
    """L2 prefetch lines per weight row: the first `stages` K blocks of a chunk of a k-long row
    split `split` ways (what the load pipeline asks for before its first multiply), a power
    of two, or 0 when off. The whole chunk (547c654) and the whole next op (the first
    version) were slower on an H200 than no prefetch: they compete with the op running."""
    if not on:
        return 0
    chunk = -(-k // (split * block_k)) * block_k
    return next_power_of_2(-(-min(chunk, stages * block_k) * elem // 128))


def _ahead_lines(config: DecodeStepConfig, elem: int) -> int:
    """UP_AHEAD: up_ahead_k columns as 128-byte lines per weight row, a power of two."""
    return next_power_of_2(-(-config.up_ahead_k * elem // 128))


def trace_shape(layers: int, programs: int) -> tuple[int, int, int]:
    """decode_step's `trace`: per program, the arrival and departure times of each of the
    1 + 5 * layers barriers, then its start and end times."""
    return (programs, 2 + 5 * layers, 2)


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_step(
    w: DecodeStepWeights,
    buffers: DecodeStepBuffers,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    slot: torch.Tensor,
    kv_valid: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    config: DecodeStepConfig | None = None,
    prefetch: bool = False,
    ids_out: torch.Tensor | None = None,
    trace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One greedy decode step in one launch: tokens, positions [B <= 16] (int64), slot [1]
    (the cache slot this step writes), kv_valid [B, kv_len] (bool: the slots each row may
    attend to; slots past `slot` are never read), k_cache / v_cache [L, B, KVH, slots, D]
    (written at `slot`). Returns (logits [B, V], ids [B]): `buffers`' own, or ids_out.
    prefetch: each program asks L2 for its next task's first weight blocks before a barrier
    (larger prefetches were measured slower on an H200; this one not yet). trace: an int64 tensor of
    `trace_shape(...)` that takes each program's times (ns) of arrival at and departure from
    every barrier, and of its start and end (a diagnostic: benchmarks/bench_decode_step.py;
    not under the interpreter)."""
    config = config or DecodeStepConfig()
    B = tokens.shape[0]
    L, NQKV, H = w.qkv.shape
    NH, KVH, D = w.num_heads, w.num_kv_heads, w.head_dim
    I = w.gate_up.shape[1] // 2  # noqa: E741
    V = w.lm_head.shape[0]
    assert 1 <= B <= MAX_ROWS and buffers.x.shape[0] == B and positions.shape == (B,)
    assert NH % KVH == 0 and D % 2 == 0
    assert buffers.mid_m.shape[2] == config.ATT_SPLITS and 0 <= config.QKV_PAIRS <= config.QKV_N
    assert buffers.partial.shape[0] >= config.max_split and _most_tiles(w, config) <= MAX_TILES
    assert (
        buffers.sumsq.numel() >= _most_tiles(w, config) * 16 and buffers.xn.shape == buffers.x.shape
    )
    for t in (w.embed, w.qkv, w.o, w.gate_up, w.down, w.lm_head, w.attn_norm, w.mlp_norm):
        assert t.is_contiguous()
    assert w.o.shape == (L, H, NH * D) and w.down.shape == (L, H, I) and w.embed.shape == (V, H)
    assert k_cache.shape == (L, B, KVH, k_cache.shape[3], D) and k_cache.is_contiguous()
    assert v_cache.shape == k_cache.shape and v_cache.is_contiguous()
    assert kv_valid.dtype == torch.bool and kv_valid.shape[0] == B and kv_valid.stride(1) == 1
    assert w.cos.stride(1) == 1 and w.sin.stride() == w.cos.stride()
    assert positions.is_contiguous() and tokens.is_contiguous()
    interpreted = is_interpreted(_decode_step_kernel)
    programs = 1 if interpreted else config.programs_per_sm * sm_count(tokens.device)
    pf = prefetch and not interpreted
    stages = config.num_stages - 1  # the blocks in flight when the first multiply waits
    down_block_k = config.DOWN_BLOCK_K or config.BLOCK_K
    elem = w.qkv.element_size()
    bf = buffers
    ids = bf.ids if ids_out is None else ids_out
    assert ids.shape == (B,) and ids.dtype == torch.int64
    if config.o_waits_group:
        chunk = -(-NH * D // (config.SPLIT_O * config.BLOCK_K)) * config.BLOCK_K
        assert config.SPLIT_O == KVH and chunk == NH // KVH * D, "o_waits_group: see its doc"
    assert buffers.sync.numel() == 3 + 2 * KVH
    if trace is not None:
        assert not interpreted and trace.dtype == torch.int64
        assert trace.shape == trace_shape(L, programs) and trace.is_contiguous()
    launch_kernel(
        _decode_step_kernel,
        (programs,),
        tokens,
        positions,
        slot,
        kv_valid,
        w.embed,
        w.cos,
        w.sin,
        w.attn_norm,
        w.qkv,
        w.qkv_bias if w.qkv_bias is not None else w.qkv,
        w.o,
        w.mlp_norm,
        w.gate_up,
        w.down,
        w.final_norm,
        w.lm_head,
        k_cache,
        v_cache,
        bf.x,
        bf.xn,
        bf.q,
        bf.att,
        bf.h,
        bf.mid_o,
        bf.mid_m,
        bf.mid_l,
        bf.att_counters,
        bf.partial,
        bf.sumsq,
        bf.tile_counters,
        bf.logits,
        ids,
        bf.best,
        bf.best[MAX_ROWS:],
        bf.sync,
        bf.sync[3 : 3 + KVH],
        bf.sync[3 + KVH :],
        trace if trace is not None else bf.sync,
        B,
        L,
        k_cache.shape[3],
        kv_valid.shape[1],
        V,
        w.eps,
        w.sm_scale,
        kv_valid.stride(0),
        w.cos.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        k_cache.stride(3),
        H=H,
        NH=NH,
        KVH=KVH,
        D=D,
        I=I,
        BLOCK_K=config.BLOCK_K,
        QKV_N=config.QKV_N,
        QKV_P=config.QKV_PAIRS or config.QKV_N,
        O_N=config.O_N,
        UP_N=config.UP_N,
        DOWN_N=config.DOWN_N,
        DOWN_BLOCK_K=down_block_k,
        LM_N=config.LM_N,
        SPLIT_QKV=config.SPLIT_QKV,
        SPLIT_O=config.SPLIT_O,
        SPLIT_UP=config.SPLIT_UP,
        SPLIT_DOWN=config.SPLIT_DOWN,
        ATT_SPLITS=config.ATT_SPLITS,
        ATT_BLOCK=config.ATT_BLOCK,
        HAS_QKV_BIAS=w.qkv_bias is not None,
        PRECISION="ieee" if w.qkv.dtype == torch.float32 else "tf32",
        PF_QKV=_lines(pf, H, config.SPLIT_QKV, config.BLOCK_K, elem, stages),
        PF_O=_lines(pf, NH * D, config.SPLIT_O, config.BLOCK_K, elem, stages),
        PF_UP=_lines(pf, H, config.SPLIT_UP, config.BLOCK_K, elem, stages),
        PF_DOWN=_lines(pf, I, config.SPLIT_DOWN, down_block_k, elem, stages),
        PF_LM=_lines(pf, H, 1, config.BLOCK_K, elem, stages),
        UP_AHEAD=0 if interpreted or not config.up_ahead_k else _ahead_lines(config, elem),
        FLATTEN=config.flatten,
        O_WAITS_GROUP=config.o_waits_group,
        ATT_WAITS_QKV=config.att_waits_qkv,
        ATT_FILL=config.att_fill,
        TRACE=trace is not None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **({} if interpreted else {"launch_cooperative_grid": True}),
    )
    return bf.logits, ids


def decode_step_reference(
    w: DecodeStepWeights,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    slot: torch.Tensor,
    kv_valid: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same step as Hugging Face's Llama computes it, in plain PyTorch (host-synchronising,
    for tests): writes the caches at `slot`, returns (logits, ids)."""
    import torch.nn.functional as F

    B, (L, _, H) = tokens.shape[0], w.qkv.shape
    NH, KVH, D = w.num_heads, w.num_kv_heads, w.head_dim
    s, kv_len = int(slot.reshape(-1)[0]), kv_valid.shape[1]
    norm = lambda x, g: F.rms_norm(x, (H,), g, w.eps)  # noqa: E731
    rot = lambda t: torch.cat((-t[..., D // 2 :], t[..., : D // 2]), -1)  # noqa: E731
    cos, sin = w.cos[positions][:, None], w.sin[positions][:, None]  # [B, 1, D]
    attend = kv_valid & (torch.arange(kv_len, device=kv_valid.device) <= s)
    x = w.embed[tokens]
    for i in range(L):
        bias = w.qkv_bias[i] if w.qkv_bias is not None else None
        qkv = F.linear(norm(x, w.attn_norm[i]), w.qkv[i], bias)
        q = qkv[:, : NH * D].view(B, NH, D)
        k = qkv[:, NH * D : (NH + KVH) * D].view(B, KVH, D)
        v = qkv[:, (NH + KVH) * D :].view(B, KVH, D)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k_cache[i, :, :, s], v_cache[i, :, :, s] = k, v
        keys = k_cache[i, :, :, :kv_len].repeat_interleave(NH // KVH, 1)
        values = v_cache[i, :, :, :kv_len].repeat_interleave(NH // KVH, 1)
        scores = (q[:, :, None] @ keys.transpose(-1, -2)) * w.sm_scale  # [B, NH, 1, T]
        scores = scores.masked_fill(~attend[:, None, None], float("-inf"))
        att = (torch.softmax(scores, -1).nan_to_num(0.0) @ values).reshape(B, NH * D)
        x = x + F.linear(att, w.o[i])
        gate, up = F.linear(norm(x, w.mlp_norm[i]), w.gate_up[i]).chunk(2, -1)
        x = x + F.linear(F.silu(gate) * up, w.down[i])
    logits = F.linear(norm(x, w.final_norm), w.lm_head)
    return logits, logits.argmax(-1)


JIT_FUNCTIONS = (_decode_step_kernel,)
CONFIG_TYPE = DecodeStepConfig
