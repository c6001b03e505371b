"""Can encoder attention overlap its softmax with its tensor-core work? (issue 14, 8x512)

BERT-base's attention at 8x512 takes ~25 µs a layer with attention.py's flash kernel, about
258 TFLOP/s (H200, docs/performance.md, twenty-second session). At head dim 64 the
per-score softmax work is as large as the two dots', and Triton 3.6 waits for each dot right
after issuing it, so a program does one or the other. FlashAttention-3 overlaps them within a
warpgroup: the next key block's q k^T is issued before this block's softmax, and this block's
p v runs while the next block's softmax is computed. Gluon (Triton's lower-level dialect)
exposes the asynchronous wgmma and its wait, so that schedule can be written; this bench
measures it against the kernels the tuner has.

The Gluon kernel here: one program per (query block, batch x head); q, k, v move by TMA from
the QKV projection's [B * L, 3 * H * D] output (k and v in rings of STAGES slots, each slot
with its own barrier, so q k^T starts before v has landed); the padding mask is one bias row per
key. `OVERLAP=False` runs the same kernel with every wgmma waited for at once: the schedule's
own effect, separated from TMA's.

    python benchmarks/bench_attention_wgmma.py      # JSON lines, then a summary

Shapes: 8x512 and 4x256 and 32x128 (batch x seq, 12 heads of 64, fp16; L a multiple of the
blocks: this bench's kernel does not mask a tail). Outputs are checked against float64 first;
times are medians of CUDA-graph replays (bench_utils.median_ms)."""

from __future__ import annotations

import json
import math
import os
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

LOG2E = 1.4426950408889634


@gluon.jit
def _softmax_block(s, bias, m_i, l_i, qk_scale):
    """One key block's scores into p (base 2, the row max subtracted), with the running max
    and sum updated; alpha rescales what was accumulated before."""
    x = s * qk_scale + (bias * 1.4426950408889634)[None, :]
    m_new = gl.maximum(m_i, gl.max(x, 1))
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw only -inf
    p = gl.exp2(x - m_safe[:, None])
    alpha = gl.exp2(m_i - m_safe)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _issue(desc, ring, bars, block, n_blocks, row0, col, BLOCK_N: gl.constexpr,
           STAGES: gl.constexpr):  # fmt: skip
    """Key block `block` (none past the last) into its ring slot, on that slot's barrier."""
    slot = block % STAGES
    ok = block < n_blocks
    mbarrier.expect(bars.index(slot), desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(desc, [row0 + block * BLOCK_N, col], bars.index(slot),
                                    ring.index(slot), pred=ok)  # fmt: skip


@gluon.jit
def _wgmma_attention_kernel(
    q_desc, k_desc, v_desc, o_desc, Bias, stride_bias_b, L, H, qk_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    row0 = b * L + pid_m * BLOCK_M
    kv_row0 = b * L
    q_col = h * HEAD_DIM
    k_col = (H + h) * HEAD_DIM
    v_col = (2 * H + h) * HEAD_DIM
    n_blocks = L // BLOCK_N
    dtype: gl.constexpr = q_desc.dtype

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    cols_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [row0, q_col], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        _issue(k_desc, k_smem, k_bars, i, n_blocks, kv_row0, k_col, BLOCK_N, STAGES)
        _issue(v_desc, v_smem, v_bars, i, n_blocks, kv_row0, v_col, BLOCK_N, STAGES)

    bias_row = Bias + b * stride_bias_b
    cols = gl.arange(0, BLOCK_N, layout=cols_s)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows_s)
    acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout))

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bars.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    # a k slot is free once its q k^T is done, a v slot once its p v is
    _issue(k_desc, k_smem, k_bars, STAGES, n_blocks, kv_row0, k_col, BLOCK_N, STAGES)
    bias = gl.load(bias_row + cols).to(gl.float32)

    for j in range(n_blocks - 1):
        slot = j % STAGES
        nxt = (j + 1) % STAGES
        # the next block's scores start on the tensor cores before this block's softmax
        mbarrier.wait(k_bars.index(nxt), ((j + 1) // STAGES) & 1)
        s_next = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)), zero_s, use_acc=False,
                               is_async=True)  # fmt: skip
        if not OVERLAP:
            s_next = warpgroup_mma_wait(0, deps=(s_next,))
        bias_next = gl.load(bias_row + (j + 1) * BLOCK_N + cols).to(gl.float32)
        p, alpha, m_i, l_i = _softmax_block(s, bias, m_i, l_i, qk_scale)
        # the previous block's p v is done (only the next q k^T may still run)
        acc = warpgroup_mma_wait(1, deps=(acc,))
        if j > 0:
            _issue(
                v_desc, v_smem, v_bars, j - 1 + STAGES, n_blocks, kv_row0, v_col, BLOCK_N, STAGES
            )
        acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
        p16 = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_bars.index(slot), (j // STAGES) & 1)
        acc = warpgroup_mma(p16, v_smem.index(slot), acc, is_async=True)
        if not OVERLAP:
            acc = warpgroup_mma_init(warpgroup_mma_wait(0, deps=(acc,)))
        s = warpgroup_mma_wait(1, deps=(s_next,))
        _issue(k_desc, k_smem, k_bars, j + 1 + STAGES, n_blocks, kv_row0, k_col, BLOCK_N, STAGES)
        bias = bias_next

    last = n_blocks - 1
    p, alpha, m_i, l_i = _softmax_block(s, bias, m_i, l_i, qk_scale)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
    p16 = gl.convert_layout(p.to(dtype), p_layout)
    mbarrier.wait(v_bars.index(last % STAGES), (last // STAGES) & 1)
    acc = warpgroup_mma(p16, v_smem.index(last % STAGES), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))

    l_o = gl.convert_layout(l_i, rows_o)
    acc = acc / gl.where(l_o == 0.0, 1.0, l_o)[:, None]
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
    o_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], o_desc.layout)
    o_smem.store(acc.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [row0, q_col], o_smem)
    tma.store_wait(pendings=0)


def wgmma_attention(qkv: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, *, block_m: int,
                    block_n: int, stages: int, overlap: bool, num_warps: int) -> torch.Tensor:  # fmt: skip
    """qkv [B, L, 3, H, D] (one QKV projection's output), bias [B, 1, 1, L] fp32, out
    [B, L, H, D]; L a multiple of block_m and block_n."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, L, _, H, D = qkv.shape
    assert L % block_m == 0 and L % block_n == 0
    rows = qkv.view(B * L, 3 * H * D)
    o_rows = out.view(B * L, H * D)
    gdt = gl.float16 if qkv.dtype == torch.float16 else gl.bfloat16

    def desc(t, block):
        layout = gl.NVMMASharedLayout.get_default_for(block, gdt)
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)

    q_desc = desc(rows, [block_m, D])
    kv_desc = desc(rows, [block_n, D])
    o_desc = desc(o_rows, [block_m, D])
    grid = (L // block_m, B * H)
    _wgmma_attention_kernel[grid](
        q_desc, kv_desc, kv_desc, o_desc, bias, bias.stride(0), L, H, LOG2E / math.sqrt(D),
        D, block_m, block_n, stages, overlap, num_warps=num_warps,
    )  # fmt: skip
    return out


SHAPES = [(8, 512), (4, 256), (32, 128)]
H, D = 12, 64
VARIANTS = [  # (block_m, block_n, stages, overlap, num_warps)
    (128, 64, 2, True, 8),
    (128, 64, 3, True, 8),
    (128, 128, 2, True, 8),
    (128, 64, 2, False, 8),
    (128, 128, 2, False, 8),
    (64, 64, 2, True, 4),
    (64, 64, 3, True, 4),
    (64, 128, 2, True, 4),
    (64, 64, 2, False, 4),
]


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_utils import device_info, median_ms

    from kernl.kernels.attention import attention, attention_configs, attention_reference

    print(json.dumps(device_info()), flush=True)
    summary = []
    for batch, seq in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        qkv = torch.randn(batch, seq, 3, H, D, dtype=torch.float16, device="cuda", generator=g)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        keep = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
        keep[: max(1, batch // 4), seq // 2 :] = False
        bias = torch.zeros(batch, 1, 1, seq, device="cuda").masked_fill(
            ~keep[:, None, None, :], float("-inf")
        )
        ref = attention_reference(q.double(), k.double(), v.double(), bias=bias.double())
        ref = ref.transpose(1, 2)  # [B, L, H, D]
        scale = 1 / math.sqrt(D)
        best_other = (float("inf"), "")
        for config in attention_configs(k, False, q, v):
            kind = "tma" if config.tma else "short" if config.programs_per_sm else "flash"
            out = torch.empty(batch, seq, H, D, dtype=torch.float16, device="cuda").transpose(1, 2)

            def run(c=config, o=out):
                return attention(q, k, v, bias=bias, sm_scale=scale, config=c, out=o)

            try:
                run()
            except Exception as e:  # a config the shape refuses
                print(json.dumps({"shape": [batch, seq], "kind": kind, "refused": str(e)[:120]}))
                continue
            ms = median_ms(run)
            if ms < best_other[0]:
                best_other = (ms, f"{kind} {config}")
        print(json.dumps({"shape": [batch, seq], "best_other_us": best_other[0] * 1e3,
                          "config": best_other[1]}), flush=True)  # fmt: skip
        row = {"shape": f"{batch}x{seq}", "best_other_us": round(best_other[0] * 1e3, 2)}
        for bm, bn, st, ov, nw in VARIANTS:
            name = f"wgmma {bm}x{bn} s{st} {'overlap' if ov else 'serial'} w{nw}"
            out = torch.full((batch, seq, H, D), float("nan"), dtype=torch.float16, device="cuda")
            try:

                def run(o=out, a=(bm, bn, st, ov, nw)):
                    return wgmma_attention(qkv, bias, o, block_m=a[0], block_n=a[1], stages=a[2],
                                           overlap=a[3], num_warps=a[4])  # fmt: skip

                run()
                torch.cuda.synchronize()
                err = (out.double() - ref).abs().max().item()
                ms = median_ms(run)
            except Exception as e:
                print(json.dumps({"shape": [batch, seq], "variant": name, "error": repr(e)[:400]}))
                continue
            ok = err < 2e-2
            print(json.dumps({"shape": [batch, seq], "variant": name, "us": ms * 1e3,
                              "max_err": err, "ok": ok}), flush=True)  # fmt: skip
            row[name] = round(ms * 1e3, 2) if ok else f"wrong ({err:.3g})"
        summary.append(row)
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
