"""The decoder-only forward kernl serves, written once over plain torch ops for every supported
family (Llama, Mistral, Qwen2: pre-RMSNorm, rotary, gated MLP; GPT-2: pre-LayerNorm, learned
positions, plain MLP), reading shapes and variants from a `DecoderSpec`.

Two entry points, both free of host syncs and data-dependent shapes so that each runs inside
one CUDA graph:
  prefill  a (batch, prompt) block, left-padded; fills cache slots [0, prompt), returns the
           last position's logits.
  decode   one token per row at cache slot `slot` (a 1-element tensor), attending to the first
           `kv_len` slots; returns the logits.

Rotary embedding is applied as one batched matmul against a per-position D x D matrix
(cos on the diagonal, ±sin on the half-swapped entries), gathered once per step for every
layer: one kernel per layer instead of the five elementwise ones of `q*cos + rotate(q)*sin`.

A decode step can run four of its pieces on kernl's Triton kernels instead (`DecodeKernels`):
attention over the cache (one split-K kernel reading the slot mask, instead of a bias
broadcast, two batched matmuls and a softmax), the norms, the gated MLP's
silu(x Wg) * (x Wu), and the linear layers (a split-K kernel for a few rows). The default
is plain torch everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernl.artifacts.generation import DecodeKernels, DecoderSpec

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# kernl.kernels.gated_mlp's tile for a decode step's few rows: the smallest M tile tl.dot
# takes, and narrow N tiles so that the weight read is spread over more programs than SMs.
DECODE_GATED_MLP_TILE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4,
                             num_stages=4)  # fmt: skip


@dataclass
class LayerWeights:
    attn_norm_w: torch.Tensor
    attn_norm_b: torch.Tensor | None
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    mlp_norm_w: torch.Tensor
    mlp_norm_b: torch.Tensor | None
    up_w: torch.Tensor  # gate_up (gated) or fc (plain)
    up_b: torch.Tensor | None
    down_w: torch.Tensor  # down (gated) or proj (plain)
    down_b: torch.Tensor | None


@dataclass
class KVCache:
    """Static keys and values of one batch bucket: [layers, batch, kv_heads, slots, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor

    @staticmethod
    def allocate(spec: DecoderSpec, batch: int, slots: int, dtype, device) -> KVCache:
        shape = (spec.num_layers, batch, spec.num_kv_heads, slots, spec.head_dim)
        return KVCache(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )


def rope_matrices(
    inv_freq: torch.Tensor, positions: int, scaling: float, dtype, device
) -> torch.Tensor:
    """[positions, D, D]: x @ M[p] == x * cos(p) + rotate_half(x) * sin(p), with cos and sin
    computed as Hugging Face does (float32 angles, scaled, then cast to the model dtype)."""
    inv_freq = inv_freq.to(device=device, dtype=torch.float32)
    half = inv_freq.numel()
    freqs = torch.arange(positions, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scaling).to(dtype)
    sin = (emb.sin() * scaling).to(dtype)
    d = 2 * half
    m = torch.zeros(positions, d, d, dtype=dtype, device=device)
    idx = torch.arange(d, device=device)
    m[:, idx, idx] = cos
    lo = torch.arange(half, device=device)
    m[:, lo + half, lo] = -sin[:, :half]  # y_i = ... - x_{i+h} sin_i      (i < h)
    m[:, lo, lo + half] = sin[:, half:]  # y_i = ... + x_{i-h} sin_i      (i >= h)
    return m


class Decoder:
    def __init__(
        self,
        spec: DecoderSpec,
        weights: dict[str, torch.Tensor],
        positions: int,
        dtype: torch.dtype,
        device: torch.device,
        kernels: DecodeKernels | None = None,
    ):
        self.spec = spec
        self.dtype = dtype
        self.kernels = kernels or DecodeKernels()
        w = weights

        def get(name: str) -> torch.Tensor | None:
            return w.get(name)

        self.embed = w["embed.weight"]
        self.pos_embed = get("pos_embed.weight")
        self.final_norm_w, self.final_norm_b = w["final_norm.weight"], get("final_norm.bias")
        self.lm_head = self.embed if spec.tied_embeddings else w["lm_head.weight"]
        gated = spec.mlp == "gated"
        self.layers = [
            LayerWeights(
                attn_norm_w=w[f"layers.{i}.attn_norm.weight"],
                attn_norm_b=get(f"layers.{i}.attn_norm.bias"),
                qkv_w=w[f"layers.{i}.qkv.weight"],
                qkv_b=get(f"layers.{i}.qkv.bias"),
                o_w=w[f"layers.{i}.o.weight"],
                o_b=get(f"layers.{i}.o.bias"),
                mlp_norm_w=w[f"layers.{i}.mlp_norm.weight"],
                mlp_norm_b=get(f"layers.{i}.mlp_norm.bias"),
                up_w=w[f"layers.{i}.{'gate_up' if gated else 'fc'}.weight"],
                up_b=get(f"layers.{i}.{'gate_up' if gated else 'fc'}.bias"),
                down_w=w[f"layers.{i}.{'down' if gated else 'proj'}.weight"],
                down_b=get(f"layers.{i}.{'down' if gated else 'proj'}.bias"),
            )
            for i in range(spec.num_layers)
        ]
        self.act = ACTIVATIONS[spec.activation]
        self.gated_silu_without_bias = (
            gated and spec.activation == "silu" and all(lw.up_b is None for lw in self.layers)
        )
        self.rope = None
        if spec.positions == "rope":
            self.rope = rope_matrices(
                w["rope.inv_freq"], positions, spec.rope_attention_scaling, dtype, device
            )

    # -- pieces ---------------------------------------------------------------------------

    def _norm(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, triton: bool = False
    ) -> torch.Tensor:
        if triton:
            from kernl.kernels import norm

            if self.spec.norm == "rms":
                return norm.rms_norm(x, w, b, self.spec.norm_eps)
            return norm.layer_norm(x, w, b, self.spec.norm_eps)
        if self.spec.norm == "rms":
            return F.rms_norm(x, (x.shape[-1],), w, self.spec.norm_eps)
        return F.layer_norm(x, (x.shape[-1],), w, b, self.spec.norm_eps)

    def _mlp(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        lw: LayerWeights,
        triton: bool = False,
        skinny: bool = False,
    ) -> torch.Tensor:
        """x + MLP(h), the residual folded into the last matmul where there is no bias."""
        if triton and self.gated_silu_without_bias:
            from kernl.kernels.gated_mlp import GatedMLPConfig, gated_mlp

            n = lw.up_w.shape[0] // 2
            tile = GatedMLPConfig(**DECODE_GATED_MLP_TILE)
            h = gated_mlp(h, lw.up_w[:n], lw.up_w[n:], config=tile)
        elif self.spec.mlp == "gated":
            gate, up = _linear(h, lw.up_w, lw.up_b, skinny=skinny).chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(_linear(h, lw.up_w, lw.up_b, skinny=skinny))
        return _linear(h, lw.down_w, lw.down_b, residual=x, skinny=skinny)

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        if self.pos_embed is not None:
            x = x + F.embedding(positions, self.pos_embed)
        return x

    def _logits(
        self, x: torch.Tensor, triton_norm: bool = False, skinny: bool = False
    ) -> torch.Tensor:
        h = self._norm(x, self.final_norm_w, self.final_norm_b, triton_norm)
        return _linear(h, self.lm_head, skinny=skinny)

    # -- entry points ---------------------------------------------------------------------

    def prefill(self, cache: KVCache, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ids, valid: [B, S] (left-padded, valid False on padding). Writes the keys and values
        of slots [0, S) and returns the logits of the last position, [B, vocab]."""
        s = self.spec
        bsz, seq = ids.shape
        nh, kvh, d = s.num_heads, s.num_kv_heads, s.head_dim
        positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
        x = self._embed(ids, positions)
        eye = torch.eye(seq, dtype=torch.bool, device=ids.device)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=ids.device).tril()
        # Padded query rows attend to themselves only: no fully masked row (NaN), and no real
        # row ever attends to a padded key.
        mask = (causal[None] & valid[:, None, :]) | eye[None]
        mask = mask[:, None]
        rope = self.rope[positions] if self.rope is not None else None  # [B, S, D, D]
        for i, lw in enumerate(self.layers):
            h = self._norm(x, lw.attn_norm_w, lw.attn_norm_b)
            qkv = F.linear(h, lw.qkv_w, lw.qkv_b)
            qk = qkv[..., : (nh + kvh) * d].view(bsz, seq, nh + kvh, d)
            if rope is not None:
                qk = torch.matmul(qk, rope)
            q = qk[:, :, :nh].transpose(1, 2)
            k = qk[:, :, nh:].transpose(1, 2)
            v = qkv[..., (nh + kvh) * d :].view(bsz, seq, kvh, d).transpose(1, 2)
            cache.k[i, :, :, :seq].copy_(k)
            cache.v[i, :, :, :seq].copy_(v)
            g = nh // kvh
            k = k[:, :, None].expand(bsz, kvh, g, seq, d).reshape(bsz, nh, seq, d)
            v = v[:, :, None].expand(bsz, kvh, g, seq, d).reshape(bsz, nh, seq, d)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s.attention_scale)
            att = att.transpose(1, 2).reshape(bsz, seq, nh * d)
            x = _residual_linear(x, att, lw.o_w, lw.o_b)
            x = self._mlp(x, self._norm(x, lw.mlp_norm_w, lw.mlp_norm_b), lw)
        return self._logits(x[:, -1])

    def decode(
        self,
        cache: KVCache,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slot: torch.Tensor,
        kv_valid: torch.Tensor,
    ) -> torch.Tensor:
        """tokens, positions: [B]; slot: [1]; kv_valid: [B, kv_len] bool, the cache slots each
        row may attend to (this step's slot included). Returns [B, vocab] logits."""
        s, kernels = self.spec, self.kernels
        bsz = tokens.shape[0]
        nh, kvh, d = s.num_heads, s.num_kv_heads, s.head_dim
        g = nh // kvh
        kv_len = kv_valid.shape[-1]
        triton_norm, triton_mlp = kernels.norm == "triton", kernels.gated_mlp == "triton"
        skinny = kernels.linear == "triton"
        if kernels.attention == "torch":
            bias = torch.where(kv_valid, 0.0, torch.finfo(self.dtype).min).to(self.dtype)
            bias = bias[:, None, None, :].expand(bsz, kvh, 1, kv_len).reshape(bsz * kvh, 1, kv_len)
        x = self._embed(tokens, positions)
        rope = self.rope.index_select(0, positions) if self.rope is not None else None
        for i, lw in enumerate(self.layers):
            h = self._norm(x, lw.attn_norm_w, lw.attn_norm_b, triton_norm)
            qkv = _linear(h, lw.qkv_w, lw.qkv_b, skinny=skinny)
            qk = qkv[:, : (nh + kvh) * d].view(bsz, nh + kvh, d)
            if rope is not None:
                qk = torch.bmm(qk, rope)
            else:
                qk = qk.contiguous()
            k_new = qk[:, nh:].unsqueeze(2)
            v_new = qkv[:, (nh + kvh) * d :].view(bsz, kvh, 1, d)
            cache.k[i].index_copy_(2, slot, k_new)
            cache.v[i].index_copy_(2, slot, v_new)
            keys, values = cache.k[i][:, :, :kv_len], cache.v[i][:, :, :kv_len]
            if kernels.attention == "torch":
                q = qk[:, :nh].reshape(bsz * kvh, g, d)
                keys_t = keys.reshape(bsz * kvh, kv_len, d).transpose(1, 2)
                scores = torch.baddbmm(bias, q, keys_t, alpha=s.attention_scale)
                att = torch.bmm(torch.softmax(scores, dim=-1), values.reshape(bsz * kvh, kv_len, d))
            elif kernels.attention == "sdpa":
                att = F.scaled_dot_product_attention(
                    qk[:, :nh].unsqueeze(2), keys, values, attn_mask=kv_valid[:, None, None, :],
                    scale=s.attention_scale, enable_gqa=True,
                )  # fmt: skip
            else:
                from kernl.kernels.decode_attention import decode_attention

                att = decode_attention(
                    qk[:, :nh].unsqueeze(2), keys, values, sm_scale=s.attention_scale,
                    kv_mask=kv_valid,
                )  # fmt: skip
            x = _linear(att.reshape(bsz, nh * d), lw.o_w, lw.o_b, residual=x, skinny=skinny)
            h = self._norm(x, lw.mlp_norm_w, lw.mlp_norm_b, triton_norm)
            x = self._mlp(x, h, lw, triton_mlp, skinny)
        return self._logits(x, triton_norm, skinny)


def _linear(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    skinny: bool = False,
) -> torch.Tensor:
    """residual + h @ w.T + b, on kernl's few-rows kernel when `skinny` and h fits it."""
    if skinny:
        from kernl.kernels.skinny_linear import MAX_ROWS, skinny_linear

        if h.dim() == 2 and h.shape[0] <= MAX_ROWS and h.stride(1) == 1 and w.is_contiguous():
            return skinny_linear(h, w, b, residual)
    if residual is None:
        return F.linear(h, w, b)
    return _residual_linear(residual, h, w, b)


def _residual_linear(
    x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
) -> torch.Tensor:
    if b is not None:
        return x + F.linear(h, w, b)
    if x.dim() == 2:
        return torch.addmm(x, h, w.t())  # one GEMM with the residual as its C operand
    return x + F.linear(h, w)
