"""Persistent TMA linear for Hopper: activation(x @ W^T + bias) (+ residual), as fused_linear.py
computes it, from a grid of one program per SM that walks the output tiles.

Why: at BERT-base's M = 4096 the GEMMs are most of a call, and cuBLAS pays for each fused
epilogue (its tanh-GELU one costs 4 µs over its bias-only FFN1 GEMM; an erf GELU it has not).
fused_linear.py's kernel, one program per tile loading through pointers, does not reach
cuBLAS there. Here the tiles move by TMA (x and W through descriptors, the output stored by
one), and each program's tile loop is one flattened, software-pipelined loop, optionally
warp-specialised: the next tile's loads are in flight while this one's epilogue (bias,
activation, residual, all in fp32 registers) runs and stores. The tile order and the
`tile_out` recomputation follow Triton's persistent-matmul tutorial's structure.
Measured (H200, 2026-12-03, benchmarks/bench_linear_tma.py): 1.3-1.6x faster than the
pointer kernel, but 10-27% slower than cuBLAS at BERT-base's M = 4096 GEMMs (the erf GELU
epilogue costs it most), so its configs are not in the tuning space (fused_linear.py).

x [M, K] and out [M, N] contiguous rows, W [N, K] as nn.Linear stores it; K and N multiples
of 8 (16-byte rows in fp16/bf16), 16-byte aligned starts (`tma.tma_usable`). Edges need no
masks: TMA loads past them read zeros, stores past them are dropped. The residual and bias
go through plain loads. The reference is fused_linear.py's `fused_linear_reference`."""

from __future__ import annotations

import torch

from .activation import _activation
from .jit import cdiv, jit, tl
from .launch import launch_kernel, sm_count
from .tma import TensorDesc


@jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # GROUP_M row blocks share W's columns from L2 before the walk moves on
    in_group = GROUP_M * num_pid_n
    first_m = (tile // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % group_size
    pid_n = (tile % in_group) // group_size
    return pid_m, pid_n


@jit
def _epilogue(acc, Bias, Residual, out_desc, M, N, stride_rm, off_m, off_n, BM: tl.constexpr,
              BN: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_RESIDUAL: tl.constexpr):  # fmt: skip
    offs_n = off_n + tl.arange(0, BN)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, ACTIVATION)
    if HAS_RESIDUAL:
        offs_m = off_m + tl.arange(0, BM)
        rows = offs_m.to(tl.int64)[:, None] * stride_rm
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        acc += tl.load(Residual + rows + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


@jit
def _linear_tma_kernel(
    x_desc,
    w_desc,
    out_desc,
    Bias,
    Residual,
    M,
    N,
    K,
    stride_rm,
    num_programs,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
    FLATTEN: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    start = tl.program_id(0)
    # the epilogue's tile, counted apart from the loop's: with FLATTEN the loads of the next
    # tile are issued before this epilogue, so it must not read the loop's tile variable
    tile_out = start - num_programs
    for tile in tl.range(
        start, num_tiles, num_programs, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE
    ):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            x = x_desc.load([off_m, ki * BLOCK_K])
            w = w_desc.load([off_n, ki * BLOCK_K])
            acc = tl.dot(x, w.T, acc)
        tile_out += num_programs
        pid_m, pid_n = _tile_coords(tile_out, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        if SPLIT_EPILOGUE:
            # two half-width stores: half the registers live at once, and the first store
            # is under way while the second half's epilogue runs
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            acc0, acc1 = tl.split(halves)
            _epilogue(acc0, Bias, Residual, out_desc, M, N, stride_rm, off_m,
                      pid_n * BLOCK_N, BLOCK_M, BLOCK_N // 2, ACTIVATION, HAS_BIAS, HAS_RESIDUAL)  # fmt: skip
            _epilogue(acc1, Bias, Residual, out_desc, M, N, stride_rm, off_m,
                      pid_n * BLOCK_N + BLOCK_N // 2, BLOCK_M, BLOCK_N // 2, ACTIVATION, HAS_BIAS,
                      HAS_RESIDUAL)  # fmt: skip
        else:
            _epilogue(acc, Bias, Residual, out_desc, M, N, stride_rm, off_m,
                      pid_n * BLOCK_N, BLOCK_M, BLOCK_N, ACTIVATION, HAS_BIAS, HAS_RESIDUAL)  # fmt: skip


def linear_tma(
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
    warp_specialize: bool = False,
    flatten: bool = False,
    split_epilogue: bool = False,
) -> torch.Tensor:
    """out2 [M, N] = activation(x2 [M, K] @ weight.T + bias) (+ res2); `block` is (BLOCK_M,
    BLOCK_N, BLOCK_K). fused_linear.fused_linear calls it for a LinearConfig with `tma` set."""
    M, K = x2.shape
    N = weight.shape[0]
    bm, bn, bk = block
    out_block = (bm, bn // 2 if split_epilogue else bn)
    tiles = cdiv(M, bm) * cdiv(N, bn)
    programs = min(tiles, sm_count(x2.device))
    launch_kernel(
        _linear_tma_kernel,
        (programs,),
        TensorDesc(x2, (bm, bk)),
        TensorDesc(weight, (bn, bk)),
        TensorDesc(out2, out_block),
        bias if bias is not None else weight,
        res2 if res2 is not None else out2,
        M,
        N,
        K,
        res2.stride(0) if res2 is not None else 0,
        programs,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=group_m,
        ACTIVATION=activation,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=res2 is not None,
        SPLIT_EPILOGUE=split_epilogue,
        FLATTEN=flatten,
        WARP_SPECIALIZE=warp_specialize,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out2


JIT_FUNCTIONS = (_linear_tma_kernel,)
