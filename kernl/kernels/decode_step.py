"""A whole decode step of a Llama-family decoder (RMSNorm, rotary, gated SiLU MLP; Llama,
Mistral, Qwen2) in one persistent kernel: embedding, every layer, final norm, lm_head and
greedy argmax, for a few rows (<= 16, one token each).

Why one kernel (issue 15): a batch-1 step streams ~2.5 GB of weights, but as ~130 kernels
each boundary costs a few µs of launch, ramp-up and tail in which the weight stream stops.
Here one program per SM runs the step's ops in order, each op split into tasks (a tile of
weight rows, or a chunk of the KV cache) that the programs take round-robin. Between two ops
a grid barrier makes the first op's writes visible to every program; before arriving there
a program asks L2 for the first weights of its task of the next op, so the stream keeps
going while the slowest program of the op finishes.

Per layer, five ops (the tasks reuse the fused decode kernels' jit helpers):
  1. RMSNorm folded into the QKV projection, rotary and the KV-cache write in its epilogue
     (norm_linear_rope's tile: half-column pairs of each head);
  2. attention over the cache, a chunk of slots per task; the last chunk of a (row, kv head)
     to finish merges the chunks (decode_attention's helpers);
  3. the O projection plus the residual, written back into the residual stream X;
  4. RMSNorm folded into gate/up, silu(gate) * up in the epilogue;
  5. the down projection plus the residual, into X.
Then the final RMSNorm folded into lm_head, the logits written, and the ids of the argmax
(lm_head_argmax's tail: packed keys, atomic max, the last tile to arrive writes the ids).

The grid barrier is a counter every program bumps (release, after a CTA barrier) and polls
until all have arrived at this barrier (acquire): the pattern of a cooperative grid sync. It
needs every program resident at once, so the grid is at most one program per SM and the
launch is cooperative (CUDA refuses a cooperative grid that cannot be co-resident, rather
than hang). The last program to leave resets the counter, so the next replay starts clean.
Under Triton's interpreter programs run one after another, so tests run a grid of one
(every barrier is already met when reached); the GPU tests run the real grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .decode_attention import decode_attention_chunk, decode_attention_merge
from .launch import is_interpreted, launch_kernel
from .lm_head_argmax import lm_head_argmax_finish
from .norm_linear import _norm_linear_loop, _norm_linear_scale
from .pdl import prefetch_rows_l2
from .rope_cache_write import rope_cache_store

MAX_ROWS = 16
MAX_POLLS: tl.constexpr = tl.constexpr(1 << 20)  # a barrier's wait, bounded


@triton.jit
def _grid_sync(Sync, arrivals):
    """Arrive at the grid barrier, then wait until `arrivals` arrivals in all were counted.
    The wait is bounded (~a second): a program that never arrives (which the cooperative
    launch rules out) sets the flag Sync[2], every later wait of the step falls through, and
    the step finishes wrong (the flag says so) rather than hang the process."""
    tl.debug_barrier()  # every thread's writes precede the release below
    tl.atomic_add(Sync, 1, sem="release", scope="gpu")
    seen = tl.load(Sync, volatile=True)
    flagged = tl.load(Sync + 2, volatile=True)
    polls = 0
    while (seen < arrivals) & (flagged == 0):
        seen = tl.load(Sync, volatile=True)
        flagged = tl.load(Sync + 2, volatile=True)
        polls += 1
        if polls == MAX_POLLS:
            tl.atomic_max(Sync + 2, 1, sem="relaxed", scope="gpu")
    tl.atomic_add(Sync, 0, sem="acquire", scope="gpu")  # the others' writes are visible
    tl.debug_barrier()


@triton.jit
def _linear_rows(X, stride_xm, w_rows, offs_m, m_mask, n_mask, K, BLOCK_N, BLOCK_K, PRECISION):
    """x[:16, :K] @ W[w_rows, :K]^T in fp32."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        x = tl.load(
            X + offs_m[:, None] * stride_xm + ks[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(w_rows + ks[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _residual_store(acc, X, offs_m, offs_n, m_mask, n_mask, H):
    """X[:, offs_n] += acc: each column of X is read and written by the one task owning it."""
    mask = m_mask[:, None] & n_mask[None, :]
    ptrs = X + offs_m[:, None] * H + offs_n[None, :]
    acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _prefetch(W, first_row, n_rows, K, ROWS: tl.constexpr, LINES: tl.constexpr):
    """Ask L2 for weight rows [first_row, first_row + ROWS) (those < n_rows), LINES 128-byte
    lines of each (LINES covers a whole row: a task's whole tile is then on its way at once,
    far more bytes in flight than the one program per SM keeps in its pipeline)."""
    if LINES > 0:
        rows = first_row + tl.arange(0, ROWS)
        w_rows = W + rows.to(tl.int64)[:, None] * K
        prefetch_rows_l2(w_rows, rows < n_rows, 0, K, LINES, W.dtype.element_ty)


@triton.jit
def _qkv_tile(t, QKV_N: tl.constexpr, HALF: tl.constexpr, D: tl.constexpr, NQKV: tl.constexpr):
    """QKV task t: its half-columns (head c // HALF, element c % HALF) and the weight rows of
    both halves of each pair."""
    offs_c = t * QKV_N + tl.arange(0, QKV_N)
    cols1 = (offs_c // HALF) * D + offs_c % HALF
    return offs_c, offs_c < NQKV // 2, cols1, cols1 + HALF


@triton.jit
def _prefetch_qkv(W1, t, H, QKV_N: tl.constexpr, HALF, D, NQKV, LINES: tl.constexpr):
    if LINES > 0:
        _, c_mask, cols1, cols2 = _qkv_tile(t, QKV_N, HALF, D, NQKV)
        dt = W1.dtype.element_ty
        prefetch_rows_l2(W1 + cols1.to(tl.int64)[:, None] * H, c_mask, 0, H, LINES, dt)
        prefetch_rows_l2(W1 + cols2.to(tl.int64)[:, None] * H, c_mask, 0, H, LINES, dt)


@triton.jit
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
    Q,
    Att,
    Hmid,
    MidO,
    MidM,
    MidL,
    AttCounters,
    Logits,
    Ids,
    Best,
    LmCounter,
    Sync,
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
    O_N: tl.constexpr,
    UP_N: tl.constexpr,
    DOWN_N: tl.constexpr,
    LM_N: tl.constexpr,
    ATT_SPLITS: tl.constexpr,
    ATT_BLOCK: tl.constexpr,
    HAS_QKV_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    PF_H: tl.constexpr,
    PF_Q: tl.constexpr,
    PF_I: tl.constexpr,
):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    HALF: tl.constexpr = D // 2
    GROUP: tl.constexpr = NH // KVH
    NQ: tl.constexpr = NH * D  # the attention output's width, the O projection's K
    NQKV: tl.constexpr = (NH + 2 * KVH) * D
    QKV_TASKS: tl.constexpr = (NQKV // 2 + QKV_N - 1) // QKV_N  # a tile may span heads
    BLOCK_D: tl.constexpr = max(16, D)
    BLOCK_G: tl.constexpr = max(16, GROUP)
    BLOCK_S: tl.constexpr = max(2, ATT_SPLITS)
    offs_m = tl.arange(0, 16)
    m_mask = offs_m < M

    # the first QKV task's weights while the embedding rows are copied
    _prefetch_qkv(Wqkv, pid, H, QKV_N, HALF, D, NQKV, PF_H)
    tok = tl.load(Tokens + offs_m, mask=m_mask, other=0).to(tl.int64)
    for c in range(pid, tl.cdiv(H, BLOCK_K), G):
        ks = c * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = m_mask[:, None] & (ks < H)[None, :]
        e = tl.load(Embed + tok[:, None] * H + ks[None, :], mask=mask, other=0.0)
        tl.store(X + offs_m[:, None] * H + ks[None, :], e, mask=mask)
    _grid_sync(Sync, G)

    n_valid = tl.minimum(tl.load(Slot).to(tl.int32) + 1, kv_len)  # slots [0, slot] are read
    chunk = tl.cdiv(tl.cdiv(n_valid, ATT_SPLITS), ATT_BLOCK) * ATT_BLOCK
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
        for t in range(pid, QKV_TASKS, G):
            _prefetch_qkv(W1, t + G, H, QKV_N, HALF, D, NQKV, PF_H)  # this program's next
            offs_c, c_mask, cols1, cols2 = _qkv_tile(t, QKV_N, HALF, D, NQKV)
            acc, acc_u, ss = _norm_linear_loop(
                X,
                AttnNormW + lyr * H,
                AttnNormW,
                W1 + cols1.to(tl.int64)[:, None] * H,
                W1 + cols2.to(tl.int64)[:, None] * H,
                offs_m,
                m_mask,
                c_mask,
                0,
                H,
                H,
                eps,
                H,
                QKV_N,
                BLOCK_K,
                True,
                False,
                True,
                PRECISION,
            )
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
        _grid_sync(Sync, arrived + G)

        # 2. attention: a chunk of slots per task; a (row, kv head)'s last chunk merges
        _prefetch(Wo_l, pid * O_N, H, NQ, O_N, PF_Q)  # streams while attention runs
        for t in range(pid, M * KVH * ATT_SPLITS, G):
            split = t % ATT_SPLITS
            bh = t // ATT_SPLITS
            b = (bh // KVH).to(tl.int64)
            h_kv = (bh % KVH).to(tl.int64)
            lo = split * chunk
            o, m_i, l_i, heads, g_mask, offs_d, d_mask = decode_attention_chunk(
                Q,
                K_l,
                V_l,
                KVMask,
                b,
                h_kv,
                lo,
                tl.minimum(lo + chunk, n_valid),
                GROUP,
                sm_scale,
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
                BLOCK_D,
                BLOCK_G,
                ATT_BLOCK,
                True,
            )
            mid = (b * NH + heads) * ATT_SPLITS + split  # MidO [B, NH, splits, D]
            tl.store(
                MidO + mid[:, None] * D + offs_d[None, :], o, mask=g_mask[:, None] & d_mask[None, :]
            )
            tl.store(MidM + mid, m_i, mask=g_mask)
            tl.store(MidL + mid, l_i, mask=g_mask)
            tl.debug_barrier()  # every thread's stores precede the (release) arrival
            done = tl.atomic_add(AttCounters + bh, 1, sem="acq_rel", scope="gpu")
            if done == ATT_SPLITS - 1:
                for g in tl.static_range(GROUP):
                    decode_attention_merge(
                        MidO,
                        MidM,
                        MidL,
                        Att,
                        b,
                        h_kv * GROUP + g,
                        ATT_SPLITS,
                        NH * ATT_SPLITS * D,
                        ATT_SPLITS * D,
                        D,
                        NH * ATT_SPLITS,
                        ATT_SPLITS,
                        NQ,
                        D,
                        1,
                        D,
                        BLOCK_D,
                        BLOCK_S,
                    )
                tl.store(AttCounters + bh, 0)  # ready for the next layer
        _grid_sync(Sync, arrived + 2 * G)

        # 3. O projection + residual
        for t in range(pid, tl.cdiv(H, O_N), G):
            _prefetch(Wo_l, (t + G) * O_N, H, NQ, O_N, PF_Q)
            offs_n = t * O_N + tl.arange(0, O_N)
            n_mask = offs_n < H
            w_rows = Wo_l + offs_n.to(tl.int64)[:, None] * NQ
            acc = _linear_rows(Att, NQ, w_rows, offs_m, m_mask, n_mask, NQ, O_N, BLOCK_K, PRECISION)
            _residual_store(acc, X, offs_m, offs_n, m_mask, n_mask, H)
        _prefetch(Wgu_l, pid * UP_N, I, H, UP_N, PF_H)
        _prefetch(Wgu_l, I + pid * UP_N, 2 * I, H, UP_N, PF_H)
        _grid_sync(Sync, arrived + 3 * G)

        # 4. norm -> gate/up -> silu(gate) * up
        for t in range(pid, tl.cdiv(I, UP_N), G):
            _prefetch(Wgu_l, (t + G) * UP_N, I, H, UP_N, PF_H)
            _prefetch(Wgu_l, I + (t + G) * UP_N, 2 * I, H, UP_N, PF_H)
            offs_n = t * UP_N + tl.arange(0, UP_N)
            n_mask = offs_n < I
            acc, acc_u, ss = _norm_linear_loop(
                X,
                MlpNormW + lyr * H,
                MlpNormW,
                Wgu_l + offs_n.to(tl.int64)[:, None] * H,
                Wgu_l + (I + offs_n).to(tl.int64)[:, None] * H,
                offs_m,
                m_mask,
                n_mask,
                0,
                H,
                H,
                eps,
                H,
                UP_N,
                BLOCK_K,
                True,
                False,
                True,
                PRECISION,
            )
            acc, acc_u = _norm_linear_scale(
                acc, acc_u, ss, Wgu, offs_n, offs_n + I, n_mask, H, eps, True, False, True
            )
            acc = acc / (1.0 + tl.exp(-acc)) * acc_u
            tl.store(
                Hmid + offs_m[:, None] * I + offs_n[None, :],
                acc.to(Hmid.dtype.element_ty),
                mask=m_mask[:, None] & n_mask[None, :],
            )
        _prefetch(Wd_l, pid * DOWN_N, H, I, DOWN_N, PF_I)
        _grid_sync(Sync, arrived + 4 * G)

        # 5. down projection + residual
        for t in range(pid, tl.cdiv(H, DOWN_N), G):
            _prefetch(Wd_l, (t + G) * DOWN_N, H, I, DOWN_N, PF_I)
            offs_n = t * DOWN_N + tl.arange(0, DOWN_N)
            n_mask = offs_n < H
            w_rows = Wd_l + offs_n.to(tl.int64)[:, None] * I
            acc = _linear_rows(
                Hmid, I, w_rows, offs_m, m_mask, n_mask, I, DOWN_N, BLOCK_K, PRECISION
            )
            _residual_store(acc, X, offs_m, offs_n, m_mask, n_mask, H)
        if layer + 1 < num_layers:
            _prefetch_qkv(W1 + NQKV * H, pid, H, QKV_N, HALF, D, NQKV, PF_H)
        else:
            _prefetch(LmHead, pid * LM_N, vocab, H, LM_N, PF_H)
        _grid_sync(Sync, arrived + 5 * G)

    # final norm -> lm_head -> logits and the argmax
    lm_tasks = tl.cdiv(vocab, LM_N)
    for t in range(pid, lm_tasks, G):
        _prefetch(LmHead, (t + G) * LM_N, vocab, H, LM_N, PF_H)
        offs_n = t * LM_N + tl.arange(0, LM_N)
        n_mask = offs_n < vocab
        w_rows = LmHead + offs_n.to(tl.int64)[:, None] * H
        acc, _, ss = _norm_linear_loop(
            X,
            FinalNormW,
            FinalNormW,
            w_rows,
            w_rows,
            offs_m,
            m_mask,
            n_mask,
            0,
            H,
            H,
            eps,
            H,
            LM_N,
            BLOCK_K,
            True,
            False,
            False,
            PRECISION,
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

    # the last program out resets the barrier for the next step (all others are past it)
    tl.debug_barrier()
    left = tl.atomic_add(Sync + 1, 1, sem="acq_rel", scope="gpu")
    if left == G - 1:
        tl.store(Sync, 0)
        tl.store(Sync + 1, 0)


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
    """Tiles (weight rows per task: QKV_N half-column pairs, the others rows), the attention
    chunking, and the launch. programs 0: one per SM (1 under the interpreter). Each task's
    whole tile is prefetched to L2 a task ahead: a tile of at most ~128 KB keeps two tiles
    per SM well inside L2."""

    BLOCK_K: int = 256
    QKV_N: int = 16
    O_N: int = 16
    UP_N: int = 16
    DOWN_N: int = 16
    LM_N: int = 32
    ATT_SPLITS: int = 16
    ATT_BLOCK: int = 32
    num_warps: int = 4
    num_stages: int = 3
    programs: int = 0


def decode_step_configs() -> list[DecodeStepConfig]:
    """The variants a benchmark or the compiler times: the default, deeper pipelines over
    narrower K blocks, more warps, more attention chunks."""
    return [
        DecodeStepConfig(),
        DecodeStepConfig(BLOCK_K=128, num_stages=4),
        DecodeStepConfig(BLOCK_K=128, num_stages=6),
        DecodeStepConfig(num_warps=8),
        DecodeStepConfig(BLOCK_K=128, num_stages=4, ATT_SPLITS=32, ATT_BLOCK=16),
    ]


def new_step_counters(w: DecodeStepWeights) -> tuple[torch.Tensor, ...]:
    """The counters a step leaves zeroed (attention arrivals, the argmax's best keys and
    arrivals, the grid barrier), shareable by every batch's buffers: zero them once, outside
    any graph capture, so that whichever captured step replays first finds them ready."""
    from .lm_head_argmax import new_workspace

    dev = w.qkv.device
    att = torch.zeros(MAX_ROWS * w.num_kv_heads, dtype=torch.int32, device=dev)
    # the barrier's arrivals, the programs out, and the flag of a wait that timed out
    return att, new_workspace(dev), torch.zeros(3, dtype=torch.int32, device=dev)


@dataclass
class DecodeStepBuffers:
    """What one step of `rows` rows writes besides the caches, allocated once per batch bucket,
    and the counters (`new_step_counters`)."""

    x: torch.Tensor
    q: torch.Tensor
    att: torch.Tensor
    h: torch.Tensor
    mid_o: torch.Tensor
    mid_m: torch.Tensor
    mid_l: torch.Tensor
    logits: torch.Tensor
    ids: torch.Tensor
    att_counters: torch.Tensor
    best: torch.Tensor
    sync: torch.Tensor

    @staticmethod
    def allocate(
        w: DecodeStepWeights, rows: int, att_splits: int, counters: tuple | None = None
    ) -> DecodeStepBuffers:
        dev, dt = w.qkv.device, w.qkv.dtype
        H, NH, D = w.embed.shape[1], w.num_heads, w.head_dim
        I = w.gate_up.shape[1] // 2  # noqa: E741
        new = lambda *shape, dtype=dt: torch.empty(shape, dtype=dtype, device=dev)  # noqa: E731
        return DecodeStepBuffers(
            new(rows, H),
            new(rows, NH, D),
            new(rows, NH * D),
            new(rows, I),
            new(rows, NH, att_splits, D, dtype=torch.float32),
            new(rows, NH, att_splits, dtype=torch.float32),
            new(rows, NH, att_splits, dtype=torch.float32),
            new(rows, w.lm_head.shape[0]),
            new(rows, dtype=torch.int64),
            *(counters or new_step_counters(w)),
        )


def _lines(on: bool, k: int, elem: int) -> int:
    """L2 prefetch lines per weight row of k elements: the whole row (a power of two, at most
    32 KB), or 0 when off."""
    return min(256, triton.next_power_of_2(-(-k * elem // 128))) if on else 0


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
    prefetch: bool = True,
    ids_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One greedy decode step in one launch: tokens, positions [B <= 16] (int64), slot [1]
    (the cache slot this step writes), kv_valid [B, kv_len] (bool: the slots each row may
    attend to; slots past `slot` are never read), k_cache / v_cache [L, B, KVH, slots, D]
    (written at `slot`). Returns (logits [B, V], ids [B]): `buffers`' own, or ids_out."""
    config = config or DecodeStepConfig()
    B = tokens.shape[0]
    L, NQKV, H = w.qkv.shape
    NH, KVH, D = w.num_heads, w.num_kv_heads, w.head_dim
    I = w.gate_up.shape[1] // 2  # noqa: E741
    V = w.lm_head.shape[0]
    assert 1 <= B <= MAX_ROWS and buffers.x.shape[0] == B and positions.shape == (B,)
    assert NH % KVH == 0 and D % 2 == 0
    assert buffers.mid_m.shape[2] == config.ATT_SPLITS
    for t in (w.embed, w.qkv, w.o, w.gate_up, w.down, w.lm_head, w.attn_norm, w.mlp_norm):
        assert t.is_contiguous()
    assert w.o.shape == (L, H, NH * D) and w.down.shape == (L, H, I) and w.embed.shape == (V, H)
    assert k_cache.shape == (L, B, KVH, k_cache.shape[3], D) and k_cache.is_contiguous()
    assert v_cache.shape == k_cache.shape and v_cache.is_contiguous()
    assert kv_valid.dtype == torch.bool and kv_valid.shape[0] == B and kv_valid.stride(1) == 1
    assert w.cos.stride(1) == 1 and w.sin.stride() == w.cos.stride()
    assert positions.is_contiguous() and tokens.is_contiguous()
    interpreted = is_interpreted(_decode_step_kernel)
    programs = config.programs or (1 if interpreted else sm_count(tokens.device))
    pf = prefetch and not interpreted
    elem = w.qkv.element_size()
    bf = buffers
    ids = bf.ids if ids_out is None else ids_out
    assert ids.shape == (B,) and ids.dtype == torch.int64
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
        bf.q,
        bf.att,
        bf.h,
        bf.mid_o,
        bf.mid_m,
        bf.mid_l,
        bf.att_counters,
        bf.logits,
        ids,
        bf.best,
        bf.best[MAX_ROWS:],
        bf.sync,
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
        O_N=config.O_N,
        UP_N=config.UP_N,
        DOWN_N=config.DOWN_N,
        LM_N=config.LM_N,
        ATT_SPLITS=config.ATT_SPLITS,
        ATT_BLOCK=config.ATT_BLOCK,
        HAS_QKV_BIAS=w.qkv_bias is not None,
        PRECISION="ieee" if w.qkv.dtype == torch.float32 else "tf32",
        PF_H=_lines(pf, H, elem),
        PF_Q=_lines(pf, NH * D, elem),
        PF_I=_lines(pf, I, elem),
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
