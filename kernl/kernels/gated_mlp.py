"""Gated MLP input projection: act(x @ Wg^T + bg) * (x @ Wu^T + bu), one kernel (LLaMA/Mistral's
SiLU MLP; ModernBERT's GELU one, whose one projection's halves are Wg and Wu).

Both products share each loaded x tile and accumulate side by side in fp32; the gate is
applied in registers, so neither [M, N] intermediate ever reaches memory. Weights are
nn.Linear-style [N, K]. Any M and N; K must be a multiple of 8."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .activation import _activation, apply_activation
from .jit import cdiv, jit, tl
from .launch import launch_kernel


@jit
def _gated_mlp_kernel(
    X,
    Wg,
    Wu,
    Bg,
    Bu,
    Out,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_gn,
    stride_gk,
    stride_un,
    stride_uk,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    ACTIVATION: tl.constexpr = "silu",
    HAS_BIAS: tl.constexpr = False,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_xm = (offs_m % M).to(tl.int64)  # wrapped: loads stay in bounds without masks
    offs_wn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + offs_xm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    g_ptrs = Wg + offs_wn[None, :] * stride_gn + offs_k[:, None] * stride_gk
    u_ptrs = Wu + offs_wn[None, :] * stride_un + offs_k[:, None] * stride_uk

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            wg = tl.load(g_ptrs)
            wu = tl.load(u_ptrs)
        else:
            k_left = K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            wg = tl.load(g_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            wu = tl.load(u_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc_g = tl.dot(x, wg, acc_g)
        acc_u = tl.dot(x, wu, acc_u)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_gk
        u_ptrs += BLOCK_K * stride_uk

    if HAS_BIAS:
        acc_g += tl.load(Bg + offs_wn).to(tl.float32)[None, :]
        acc_u += tl.load(Bu + offs_wn).to(tl.float32)[None, :]
    y = _activation(acc_g, ACTIVATION) * acc_u
    offs_om = offs_m.to(tl.int64)
    o_ptrs = Out + offs_om[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, y.to(Out.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def gated_mlp_reference(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    bias_gate: torch.Tensor | None = None,
    bias_up: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    gate = apply_activation(F.linear(x, w_gate, bias_gate), activation)
    return gate * F.linear(x, w_up, bias_up)


@dataclass(frozen=True)
class GatedMLPConfig:
    BLOCK_M: int = 128
    BLOCK_N: int = 128
    BLOCK_K: int = 64
    GROUP_M: int = 8
    num_warps: int = 8
    num_stages: int = 3


def gated_mlp_configs() -> list[GatedMLPConfig]:
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 128, 32, 8, 4),
        (32, 64, 64, 4, 4),
    ]
    return [GatedMLPConfig(bm, bn, bk, 8, w, s) for bm, bn, bk, w, s in shapes]


def gated_mlp_decode_configs() -> list[GatedMLPConfig]:
    """The few the compiler times per decode batch at the MLP's up projection, when the norm
    before it runs alone (compiler/tasks/causal_lm/decode_tiles.py): one tile of <= 16 rows
    (the smallest M tl.dot takes), narrow N tiles so that more programs than SMs stream the
    two weights. The runtime's default for an untuned step comes first."""
    table = [  # BLOCK_N, BLOCK_K, num_warps, num_stages
        (32, 128, 4, 4),
        (16, 128, 4, 4),
        (16, 256, 4, 3),
        (32, 256, 4, 3),
        (32, 64, 4, 5),
        (64, 64, 4, 5),
        (16, 128, 2, 4),
    ]
    return [GatedMLPConfig(16, n, k, 1, w, s) for n, k, w, s in table]


def gated_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    *,
    bias_gate: torch.Tensor | None = None,
    bias_up: torch.Tensor | None = None,
    activation: str = "silu",
    out: torch.Tensor | None = None,
    config: GatedMLPConfig | None = None,
) -> torch.Tensor:
    """x [..., K], w_gate / w_up [N, K], biases [N] (both or neither) ->
    act(x Wg^T + bg) * (x Wu^T + bu), [..., N]; `activation` one of activation.ACTIVATIONS."""
    K = x.shape[-1]
    N = w_gate.shape[0]
    if w_gate.shape != (N, K) or w_up.shape != (N, K) or K % 8:
        raise ValueError(
            f"gated_mlp takes x [..., K] and two weights [N, K] with K a multiple of 8 (its "
            f"16-byte loads), got x {tuple(x.shape)}, weights {tuple(w_gate.shape)} and "
            f"{tuple(w_up.shape)}"
        )
    assert (bias_gate is None) == (bias_up is None)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    config = config or GatedMLPConfig()
    if out is None:
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, N)
    grid = (cdiv(M, config.BLOCK_M) * cdiv(N, config.BLOCK_N),)
    launch_kernel(
        _gated_mlp_kernel,
        grid,
        x2,
        w_gate,
        w_up,
        w_gate if bias_gate is None else bias_gate,  # unread without HAS_BIAS
        w_up if bias_up is None else bias_up,
        out2,
        M,
        N,
        K,
        *x2.stride(),
        *w_gate.stride(),
        *w_up.stride(),
        *out2.stride(),
        BLOCK_M=config.BLOCK_M,
        BLOCK_N=config.BLOCK_N,
        BLOCK_K=config.BLOCK_K,
        GROUP_M=config.GROUP_M,
        EVEN_K=K % config.BLOCK_K == 0,
        ACTIVATION=activation,
        HAS_BIAS=bias_gate is not None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


JIT_FUNCTIONS = (_gated_mlp_kernel,)
CONFIG_TYPE = GatedMLPConfig
