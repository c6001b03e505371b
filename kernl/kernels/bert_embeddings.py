"""BERT embeddings: LayerNorm(word[ids] + position[pos] + token_type[types]), one kernel.

The three gathers, the sum and the LayerNorm happen in registers per token, so the [B, L, H]
sum is never written and re-read (eager runs four kernels and three intermediates)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .jit import cdiv, jit, next_power_of_2, tl
from .launch import launch_kernel


@jit
def _bert_embeddings_kernel(
    Ids,
    TypeIds,
    PosIds,
    Word,
    Pos,
    Type,
    Weight,
    Bias,
    Out,
    num_tokens,
    seq_len,
    hidden,
    eps,
    stride_ib,
    stride_il,
    stride_tb,
    stride_tl,
    stride_pb,
    stride_pl,
    stride_word,
    stride_pos,
    stride_type,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_TYPES: tl.constexpr,
    HAS_POS_IDS: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_mask = tok < num_tokens
    b = tok // seq_len
    pos_in_seq = tok % seq_len
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    mask = tok_mask[:, None] & col_mask[None, :]
    ids = tl.load(Ids + b * stride_ib + pos_in_seq * stride_il, mask=tok_mask, other=0).to(tl.int64)
    if HAS_POS_IDS:
        pos = tl.load(PosIds + b * stride_pb + pos_in_seq * stride_pl, mask=tok_mask, other=0)
    else:
        pos = pos_in_seq
    pos = pos.to(tl.int64)
    x = tl.load(Word + ids[:, None] * stride_word + cols[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    x += tl.load(Pos + pos[:, None] * stride_pos + cols[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    if HAS_TYPES:
        t = tl.load(TypeIds + b * stride_tb + pos_in_seq * stride_tl, mask=tok_mask, other=0).to(
            tl.int64
        )
    else:
        t = tl.zeros([BLOCK_M], dtype=tl.int64)
    x += tl.load(Type + t[:, None] * stride_type + cols[None, :], mask=mask, other=0.0).to(
        tl.float32
    )

    mean = tl.sum(x, 1) / hidden
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / hidden + eps)
    w = tl.load(Weight + cols, mask=col_mask, other=0.0).to(tl.float32)
    bias = tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + bias[None, :]
    rows = tok.to(tl.int64)
    tl.store(Out + rows[:, None] * stride_om + cols[None, :], y.to(Out.dtype.element_ty), mask=mask)


def bert_embeddings_reference(
    input_ids: torch.Tensor,
    word: torch.Tensor,
    pos: torch.Tensor,
    types: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    B, L = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(L, device=input_ids.device)[None, :].expand(B, L)
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    x = word[input_ids] + pos[position_ids.expand(B, L)] + types[token_type_ids]
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@dataclass(frozen=True)
class BertEmbeddingsConfig:
    BLOCK_M: int = 0  # tokens per program; 0 picks from the hidden size
    num_warps: int = 4


def bert_embeddings_configs() -> list[BertEmbeddingsConfig]:
    return [BertEmbeddingsConfig(m, w) for m in (0, 1, 2, 4, 8) for w in (2, 4, 8)]


def bert_embeddings(
    input_ids: torch.Tensor,
    word: torch.Tensor,
    pos: torch.Tensor,
    types: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: BertEmbeddingsConfig | None = None,
) -> torch.Tensor:
    """input_ids [B, L]; position_ids [B, L] or [1, L] (default arange); token_type_ids
    [B, L] (default 0) -> [B, L, H] in the tables' dtype."""
    B, L = input_ids.shape
    H = word.shape[1]
    assert word.stride(1) == 1 and pos.stride(1) == 1 and types.stride(1) == 1
    config = config or BertEmbeddingsConfig()
    BLOCK_N = next_power_of_2(H)
    BLOCK_M = config.BLOCK_M or max(1, 2048 // BLOCK_N)
    if out is None:
        out = torch.empty((B, L, H), dtype=word.dtype, device=word.device)
    out2 = out.view(B * L, H)
    has_pos = position_ids is not None
    pos_ids = position_ids.expand(B, L) if has_pos else input_ids
    has_types = token_type_ids is not None
    type_ids = token_type_ids if has_types else input_ids
    launch_kernel(
        _bert_embeddings_kernel,
        (cdiv(B * L, BLOCK_M),),
        input_ids,
        type_ids,
        pos_ids,
        word,
        pos,
        types,
        weight,
        bias,
        out2,
        B * L,
        L,
        H,
        eps,
        *input_ids.stride(),
        *type_ids.stride(),
        *pos_ids.stride(),
        word.stride(0),
        pos.stride(0),
        types.stride(0),
        out2.stride(0),
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        HAS_TYPES=has_types,
        HAS_POS_IDS=has_pos,
        num_warps=config.num_warps,
    )
    return out


JIT_FUNCTIONS = (_bert_embeddings_kernel,)
CONFIG_TYPE = BertEmbeddingsConfig
