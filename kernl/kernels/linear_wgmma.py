"""Linear in Gluon for Hopper: activation(x @ W^T + bias) (+ residual), each program one output
tile through a TMA ring into asynchronous wgmma, two programs sharing an SM.

Why: at BERT-base's M = 4096 the GEMMs are ~80% of a call. cuBLAS fuses only a tanh GELU
(4 µs over its bias-only FFN1 GEMM, and a memset with the 256x128 kernel it then picks), and
Triton's own TMA kernel (linear_tma.py) ran 10-27% behind cuBLAS, most at FFN1's erf GELU
(H200, 2026-12-03). That kernel runs one program per SM: while a program computes its
epilogue (an erf is ~20 instructions an element, 12.6 M of them at FFN1) the tensor cores
idle. Here a 128x128 tile with 4 warps holds its accumulator in 128 registers a thread and
its ring in 64-96 KB of shared memory (the epilogue's staging reuses the ring), so two
programs fit an SM and one's epilogue runs beside the other's dots: the overlap that cuBLAS
gets from its ping-pong warp groups, left to the SM's warp schedulers.
Measured (H200, 2026-12-04, benchmarks/bench_linear_wgmma.py): two programs an SM do help
(128x128 at 3 stages, 98 KB, against 4 stages, 131 KB: QKV 28.3 against 31.3 µs), but the
kernel stays 4-15% behind cuBLAS without an epilogue (QKV 26.9 against 25.9, FFN2 34.9
against 30.8), level at O (9.66 against 9.76), and the erf GELU costs ~10 µs at FFN1 (48.7
against cuBLAS's tanh-GELU epilogue at 38.4; its own tanh GELU 40.5). So its configs are not
in the tuning space (fused_linear.py); Triton tiles must be powers of two, and cuBLAS's
192-row tiles give N = 768 GEMMs exactly one wave of 132.

Per K step the program waits for its ring slot's barrier, issues the wgmma and waits only
for the previous step's (one group in flight), then refills that step's slot with the step
STAGES ahead. x [M, K] and out [M, N] contiguous rows, W [N, K] as nn.Linear stores it; TMA
reads zeros past every edge and drops stores past M and N, so any M, N and K (K and N
multiples of 8: 16-byte rows). fp16 / bf16, compute capability 9 only: `wgmma_linear_refusal`
says what a call needs. No interpreter runs Gluon: the CPU tests compile it for sm_90, the
GPU tests run it. The reference is fused_linear.py's `fused_linear_reference`."""

from __future__ import annotations

import torch

from .jit import (
    cdiv,
    fence_async_shared,
    gl,
    gluon_jit,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from .launch import launch_kernel
from .tma import TensorDesc, tma_usable

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, STAGES). 128x128 with 4 warps: two programs an SM
# (ring 64-96 KB); 128x256 with 8 warps (two warp groups of 64 rows): one, as cuBLAS's tiles.
WGMMA_LINEAR_CONFIGS = [
    (128, 128, 64, 4, 3),
    (128, 128, 64, 4, 2),
    (128, 64, 64, 4, 4),
    (128, 256, 64, 8, 3),
]


@gluon_jit
def _activation(y, ACTIVATION: gl.constexpr):
    """activation.py's `_activation`, in Gluon."""
    if ACTIVATION == "relu":
        y = gl.maximum(y, 0.0)
    elif ACTIVATION == "gelu":
        y = 0.5 * y * (1.0 + gl.erf(y * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (2.0 / (1.0 + gl.exp(-2.0 * u)))  # 1 + tanh(u) = 2 sigmoid(2u)
    elif ACTIVATION == "silu":
        y = y / (1.0 + gl.exp(-y))
    elif ACTIVATION == "tanh":
        y = 2.0 / (1.0 + gl.exp(-2.0 * y)) - 1.0
    return y


@gluon_jit
def _load_step(x_desc, w_desc, x_ring, w_ring, bars, step, off_m, off_n, ok,
               BLOCK_K: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """K step `step`'s x and W tiles into its ring slot, on that slot's barrier (if `ok`)."""
    slot = step % STAGES
    bar = bars.index(slot)
    mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(x_desc, [off_m, step * BLOCK_K], bar, x_ring.index(slot), ok)
    tma.async_copy_global_to_shared(w_desc, [off_n, step * BLOCK_K], bar, w_ring.index(slot), ok)


@gluon_jit
def _wgmma_linear_kernel(
    x_desc, w_desc, out_desc, Bias, Residual, M, N, K, stride_rm,
    GROUP_M: gl.constexpr, ACTIVATION: gl.constexpr, HAS_BIAS: gl.constexpr,
    HAS_RESIDUAL: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    dtype: gl.constexpr = x_desc.dtype

    # GROUP_M row blocks share W's columns from L2 before the walk moves on
    pid = gl.program_id(0)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = gl.minimum(num_pid_m - first_m, GROUP_M)
    off_m = (first_m + (pid % in_group) % group_size) * BLOCK_M
    off_n = ((pid % in_group) // group_size) * BLOCK_N

    x_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    w_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()

    n_k = gl.cdiv(K, BLOCK_K)
    for i in gl.static_range(STAGES):
        _load_step(x_desc, w_desc, x_ring, w_ring, bars, i, off_m, off_n, i < n_k, BLOCK_K, STAGES)

    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=acc_layout)
    for i in range(n_k):
        slot = i % STAGES
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        w_t = w_ring.index(slot).permute((1, 0))
        acc = warpgroup_mma(x_ring.index(slot), w_t, acc, is_async=True)
        # the previous step's dot is done (this one may run on): its slot takes the step
        # STAGES after it
        acc = warpgroup_mma_wait(1, deps=(acc,))
        ahead = i - 1 + STAGES
        ok = (i > 0) & (ahead < n_k)
        _load_step(x_desc, w_desc, x_ring, w_ring, bars, ahead, off_m, off_n, ok, BLOCK_K, STAGES)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
    if HAS_BIAS:
        acc = acc + gl.load(Bias + cols, mask=cols < N, other=0.0).to(gl.float32)[None, :]
    acc = _activation(acc, ACTIVATION)
    if HAS_RESIDUAL:
        rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        at = Residual + rows.to(gl.int64)[:, None] * stride_rm + cols[None, :]
        acc = acc + gl.load(at, mask=mask, other=0.0).to(gl.float32)
    # every dot and load is done: the x ring is the output's staging (two programs an SM
    # fit where a buffer of its own would not)
    if STAGES * BLOCK_K >= BLOCK_N:
        c_smem = x_ring._reinterpret(dtype, [BLOCK_M, BLOCK_N], out_desc.layout)
    else:
        c_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N], out_desc.layout)
    c_smem.store(acc.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(out_desc, [off_m, off_n], c_smem)
    tma.store_wait(pendings=0)


def wgmma_linear_refusal(
    x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None
) -> str | None:
    """Why this kernel cannot run the call (x [M, K], weight [N, K]), or None."""
    if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] != 9:
        return "the wgmma linear runs on Hopper (compute capability 9) only"
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        return f"{x.dtype} x and {weight.dtype} weight: the wgmma linear takes fp16 or bf16"
    K, N = x.shape[-1], weight.shape[0]
    if K % 8 or N % 8:
        return f"K = {K}, N = {N}: the wgmma linear needs multiples of 8 (16-byte rows)"
    x2 = x.reshape(-1, K)
    tensors = [x2, weight] + ([out.reshape(-1, N)] if out is not None else [])
    if not tma_usable(*tensors):
        return "a tensor TMA cannot see (strides or alignment)"
    return None


def wgmma_linear(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    res2: torch.Tensor | None,
    out2: torch.Tensor,
    *,
    block: tuple[int, int, int],
    group_m: int,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    """out2 [M, N] = activation(x2 [M, K] @ weight.T + bias) (+ res2); `block` is (BLOCK_M,
    BLOCK_N, BLOCK_K). fused_linear.fused_linear calls it for a LinearConfig with `wgmma`."""
    refusal = wgmma_linear_refusal(x2, weight, out2)
    if refusal:
        raise ValueError(refusal)
    M, K = x2.shape
    N = weight.shape[0]
    bm, bn, bk = block
    launch_kernel(
        _wgmma_linear_kernel,
        (cdiv(M, bm) * cdiv(N, bn),),
        TensorDesc(x2, (bm, bk), gluon=True),
        TensorDesc(weight, (bn, bk), gluon=True),
        TensorDesc(out2, (bm, bn), gluon=True),
        bias if bias is not None else weight,
        res2 if res2 is not None else out2,
        M,
        N,
        K,
        res2.stride(0) if res2 is not None else 0,
        GROUP_M=group_m,
        ACTIVATION=activation,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=res2 is not None,
        STAGES=num_stages,
        num_warps=num_warps,
    )
    return out2


JIT_FUNCTIONS = (_wgmma_linear_kernel,)
