"""Rewrite passes over a bucket's program: aten patterns -> kernl ops. Each pass is a small
table of pattern -> replacement rules applied in one walk (matcher.py), and leaves a pattern it
cannot prove safe as it was."""

from __future__ import annotations

import torch

from kernl.artifacts.program import Program

from .eager_attention import replace_eager_attention
from .embeddings import fuse_bert_embeddings
from .fuse_linear import fuse_linear
from .fuse_qkv import fuse_qkv
from .gated_linear import fuse_gated_linear
from .graph import drop_dead, reads
from .norm_attention import hoist_attention_mask, replace_attention, replace_layer_norm
from .padding_mask import shorten_padding_mask
from .rotary import fuse_rotary
from .spelled_gelu import replace_spelled_gelu

__all__ = [
    "fuse_bert_embeddings",
    "fuse_gated_linear",
    "fuse_linear",
    "fuse_qkv",
    "fuse_rotary",
    "hoist_attention_mask",
    "replace_attention",
    "replace_eager_attention",
    "replace_layer_norm",
    "replace_spelled_gelu",
    "shorten_padding_mask",
    "rewrite",
    "drop_dead",
    "drop_unused_weights",
]


def rewrite(program: Program, weights: dict[str, torch.Tensor]) -> Program:
    """All passes in order; `weights` gains the fused weights the program now reads."""
    program = fuse_qkv(program, weights)
    # Norms first: a residual add that feeds a norm goes into the norm kernel, so the linear
    # before it stays a plain GEMM (one launch on cuBLAS too, where linear+add would be two).
    program = replace_layer_norm(program)
    program = fuse_bert_embeddings(program)
    program = replace_spelled_gelu(program)  # then fuse_linear takes it into the epilogue
    program = fuse_linear(program)
    program = fuse_gated_linear(program, weights)
    program = fuse_rotary(program)
    program = replace_attention(program)
    program = replace_eager_attention(program)
    program = hoist_attention_mask(program)
    program = shorten_padding_mask(program)
    return drop_unused_weights(drop_dead(program))


def drop_unused_weights(program: Program) -> Program:
    """Weights folded into fused ones (q, k, v) are no longer read: drop them. (Not a rule: it
    looks at the whole program, not at an instruction and its producers.)"""
    used = set(program.outputs)
    for ins in program.instructions:
        used.update(reads(ins))
    program.weights = {v: n for v, n in program.weights.items() if v in used}
    return program
