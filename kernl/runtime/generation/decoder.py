"""The decoder-only forward kernl serves, written once over plain torch ops for every supported
family (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma2, Gemma3's text decoder:
pre-RMSNorm, rotary, gated MLP, Qwen3's per-head norms of q and k, Gemma's scaled embeddings
and (1 + weight) norms, Gemma2's softcapped attention scores and logits and its norms of the
attention and MLP outputs, Gemma3's rotary table per layer type; GPT-2: pre-LayerNorm, learned
positions, plain MLP), reading shapes and variants from a `DecoderSpec`.

Sliding-window layers (Mistral, Qwen2, Gemma2's every other layer) keep the whole cache: the
query at slot i attends to the slots j > i - window only, a second slot mask made once a step
(and a second band over the prompt at prefill) for the windowed layers alone. Slots stand for
positions here: a row's tokens sit at consecutive slots (left padding, joining), so the slot
distance is Hugging Face's index distance that its window reads.

Two entry points, both free of host syncs and data-dependent shapes so that each runs inside
one CUDA graph:
  prefill  a (batch, prompt) block, left-padded; fills cache slots [0, prompt), returns the
           last position's logits.
  decode   one token per row at cache slot `slot` (a 1-element tensor), attending to the first
           `kv_len` slots; returns the logits.

Rotary embedding: at prefill Hugging Face's `q*cos + rotate_half(q)*sin` over [B, S, D]
tables; at a plain-torch decode step one batched matmul against a per-position D x D matrix
(cos on the diagonal, ±sin on the half-swapped entries), one kernel per layer instead of five.
Gemma3 rotates its sliding-window layers by a table of their own
(`DecoderSpec.rope_local_layers`): each of its layers gathers its type's rows, and the kernels
that read one table for every layer (the persistent step, rotary fused with the KV-cache write
or the QKV projection) are not used for it.

A decode step can run its pieces on kernl's Triton kernels instead (`DecodeKernels`):
attention over the cache (one split-K kernel reading the slot mask), the norms (alone, or
"fused": folded into the prologue of the linear that follows, QKV and gate/up, with the
gated MLP's silu(x Wg) * (x Wu) in its epilogue), the gated MLP, the linear layers
("triton": split-K plus a reduce kernel; "fused": reduced in the same launch, bias and
residual in its epilogue), rotary + KV-cache write in one kernel, and lm_head + argmax in
one pass for greedy steps. The default is plain torch everywhere; the compiler keeps a
kernel only where it times faster. The fused kernels and attention run the launch configs
the compiler tuned per batch and call site (`DecodeKernels.tiles`; attention's per cache
length too), and with `DecodeKernels.pdl` every kernl kernel of the step is launched with
programmatic dependent launch (with `prefetch`, the weight-streaming ones ask L2 for their
first weights before waiting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernl.artifacts.generation import (
    PREFILL_SCORE_BYTES,
    DecodeKernels,
    DecoderSpec,
    rope_matrices_fit,
)

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


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
    q_norm_w: torch.Tensor | None = None  # Qwen3's per-head RMSNorms (DecoderSpec.qk_norm)
    k_norm_w: torch.Tensor | None = None
    # Gemma2's norms of the attention and the MLP outputs (DecoderSpec.sandwich_norms)
    post_attn_norm_w: torch.Tensor | None = None
    post_mlp_norm_w: torch.Tensor | None = None


@dataclass
class KVCache:
    """Static keys and values of one batch bucket: [layers, batch, kv_heads, slots, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor

    @staticmethod
    def allocate(
        spec: DecoderSpec, batch: int, slots: int, dtype, device, shared: KVCache | None = None
    ) -> KVCache:
        """Zeros, or (`shared`: a cache of at least `batch` rows) views of the leading part of
        its storage."""
        shape = (spec.num_layers, batch, spec.num_kv_heads, slots, spec.head_dim)
        return KVCache(
            zeros_or_view(shared and shared.k, shape, dtype, device),
            zeros_or_view(shared and shared.v, shape, dtype, device),
        )


def zeros_or_view(within: torch.Tensor | None, shape: tuple[int, ...], dtype, device):
    """A zero tensor of `shape`, or a contiguous view of the leading elements of `within`
    (batch buckets that share one cache storage: generation/state.py, seq2seq.py)."""
    if within is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return within.view(-1)[: torch.Size(shape).numel()].view(shape)


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


def rms_fold_overflows(norm: str, dtype: torch.dtype) -> bool:
    """Whether folding this norm into the next linear (kernels/norm_linear.py,
    lm_head_argmax, the persistent step) could overflow: an RMSNorm in fp16, whose x * g is
    rounded to fp16 before the deferred 1 / rms (a massive activation times a gain above 1
    passes 65504 where the normalised value is small; NaN logits, review 2026-12-07). bf16
    and fp32 have the range; LayerNorm's fold normalises first."""
    return norm == "rms" and dtype == torch.float16


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
        w = weights

        def get(name: str) -> torch.Tensor | None:
            return w.get(name)

        self.embed = w["embed.weight"]
        self.pos_embed = get("pos_embed.weight")
        # Gemma: Hugging Face casts the float32 scale to the model dtype, then multiplies
        self.embed_scale = None
        if spec.embed_scale != 1.0:
            self.embed_scale = torch.tensor(spec.embed_scale, dtype=torch.float32).to(
                device=device, dtype=dtype
            )
        if spec.norm_plus_one:
            # Gemma's norms scale by 1.0 + weight.float(): the same float32 sum, made once here
            # (the artifact holds the weight as the checkpoint does)
            w = {k: 1.0 + v.float() if _is_norm_weight(k) else v for k, v in w.items()}
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
                q_norm_w=get(f"layers.{i}.q_norm.weight"),
                k_norm_w=get(f"layers.{i}.k_norm.weight"),
                post_attn_norm_w=get(f"layers.{i}.post_attn_norm.weight"),
                post_mlp_norm_w=get(f"layers.{i}.post_mlp_norm.weight"),
            )
            for i in range(spec.num_layers)
        ]
        self.act = ACTIVATIONS[spec.activation]
        self.gated_silu_without_bias = (
            gated and spec.activation == "silu" and all(lw.up_b is None for lw in self.layers)
        )
        self.rope = self.cos = self.sin = None
        # the torch decode path's [positions, D, D] matrices (one bmm a layer) are made only
        # when a step runs that path (the kernels setter): 256 MiB for head_dim 128 and 8192
        # positions, unused when the rotary kernels were chosen
        self._rope_args = None
        # Gemma3's second table, for the layers of rope_local_layers: its sliding-window layers
        # rotate with rope_theta 10000, its full-attention layers with 1e6 (and linear scaling
        # in 4B and up); the same three forms as the first
        self.rope_local = self.cos_local = self.sin_local = None
        self._rope_local_args = None
        local = set(spec.rope_local_layers)
        self.rotates_local = [i in local for i in range(spec.num_layers)]
        self.two_rope_tables = bool(local)
        if spec.positions == "rope":
            from kernl.kernels.rope_cache_write import rope_tables

            inv_freq, scaling = w["rope.inv_freq"], spec.rope_attention_scaling
            self._rope_args = (inv_freq, positions, scaling, dtype, device)
            self.cos, self.sin = rope_tables(inv_freq, positions, scaling, dtype, device)
            if local:
                inv_freq, scaling = w["rope.local_inv_freq"], spec.rope_local_attention_scaling
                self._rope_local_args = (inv_freq, positions, scaling, dtype, device)
                self.cos_local, self.sin_local = rope_tables(
                    inv_freq, positions, scaling, dtype, device
                )
        # Folding a norm into the next linear defers RMSNorm's scale to the epilogue, which a
        # norm bias would not survive. The folding kernels (norm_linear, and lm_head_argmax for
        # the final norm) scale by the weight as Llama's RMSNorm does and their tiles are
        # checked against that: Gemma's (1 + weight) norms run on the norm kernel alone, which
        # computes in float32 and rounds once, as GemmaRMSNorm does.
        # Gemma2's norms of the attention and MLP outputs have no folding kernel either.
        # In fp16 an RMSNorm does not fold (rms_fold_overflows).
        self.rms_fold_overflows = rms_fold_overflows(spec.norm, dtype)
        self.norm_folds = (
            not spec.norm_plus_one
            and not spec.sandwich_norms
            and not self.rms_fold_overflows
            and (
                spec.norm == "layer"
                or all(lw.attn_norm_b is None and lw.mlp_norm_b is None for lw in self.layers)
            )
        )
        self.final_norm_folds = (
            spec.norm == "rms"
            and self.final_norm_b is None
            and not spec.norm_plus_one
            and not self.rms_fold_overflows
        )
        # Gemma2's softcaps: SDPA has no tanh on the scores (kernl's decode attention has,
        # the persistent step's has not), and lm_head_argmax writes the logits before any
        # softcap (and a bf16 tanh can make ties the uncapped argmax would not see): the step
        # runs those pieces on torch for it, and the compiler does not time or tune them
        # (causal_lm/decode_kernels.py, decode_tiles.py)
        self.sdpa_fits = spec.attn_logit_softcap is None
        self.lm_head_kernel_fits = spec.final_logit_softcap is None
        # Sliding-window layers (DecoderSpec.sliding_window): the cache stays whole, and the
        # slots older than the window are masked out for those layers only. A window no
        # shorter than the cache masks nothing: no mask is made for it
        window = spec.sliding_window
        self.window = window if window is not None and window < positions else None
        sliding = set(spec.sliding_layers) if self.window is not None else set()
        self.windowed = [i in sliding for i in range(spec.num_layers)]
        # slot j is in slot i's window where j + window > i: one compare per step
        self._window_ends = None
        if self.window is not None:
            self._window_ends = torch.arange(positions, device=device) + self.window
        self._counters: torch.Tensor | None = None  # split-K arrivals, self-resetting
        self._workspace: torch.Tensor | None = None  # lm_head_argmax's, self-resetting
        # The whole step in one kernel (step "persistent") serves the Llama family: RMSNorm
        # (norm_folds: no norm bias), no bias but QKV's, rotary, a gated SiLU MLP.
        plain_layer = (
            spec.norm == "rms"
            and self.norm_folds
            and self.final_norm_b is None
            and spec.positions == "rope"
            and self.gated_silu_without_bias
            and all(lw.o_b is None and lw.down_b is None for lw in self.layers)
            and not spec.qk_norm
            and not spec.norm_plus_one
            and spec.embed_scale == 1.0
            and not spec.sandwich_norms
            and spec.attn_logit_softcap is None
            and self.lm_head_kernel_fits
        )
        # It reads one slot mask for every layer: the windowed one where every layer has the
        # window (Mistral), neither for a mix (Gemma2, Qwen2 under max_window_layers)
        one_mask = all(self.windowed) or not any(self.windowed)
        # its head loops are tl.arange over the head dimension, which Triton takes in powers of
        # two only (Phi-3-mini's 96 failed in the tuner, and a forced choice crashed)
        head_dim_fits = spec.head_dim & (spec.head_dim - 1) == 0
        self.persistent_fits = (
            plain_layer and one_mask and not self.two_rope_tables and head_dim_fits
        )
        self._persistent_misfit = None
        if not head_dim_fits:
            self._persistent_misfit = (
                f"its heads are {spec.head_dim} wide, and it takes a power of two only"
            )
        elif self.two_rope_tables:
            self._persistent_misfit = (
                "it reads one rotary table for every layer: this model's sliding-window and "
                "full-attention layers rotate with two"
            )
        elif self.rms_fold_overflows:
            self._persistent_misfit = (
                "in fp16 it would round x * g, before 1 / rms, past 65504 (use bf16)"
            )
        elif not plain_layer:
            self._persistent_misfit = "it serves the Llama family's plain layer only"
        elif not one_mask:
            self._persistent_misfit = (
                "it reads one slot mask for every layer: this model's sliding-window and "
                "full-attention layers need two"
            )
        self._step_weights = None  # the persistent step's stacked view of the weights
        self._step_shared: tuple | None = None  # its counters, zeroed once, self-resetting
        self._step_buffers: dict[tuple, object] = {}  # its buffers per batch and config
        self.kernels = kernels or DecodeKernels()

    def kernels_that_do_not_apply(self, kernels: DecodeKernels) -> list[str]:
        """The pieces of `kernels` this model's step would run on torch instead, each with
        why: a compile that is told to use them says so rather than storing a choice that
        does not run."""
        why = []
        if kernels.attention == "sdpa" and not self.sdpa_fits:
            why.append("attention='sdpa' (no logit softcapping in it)")
        if kernels.lm_head != "torch" and not self.lm_head_kernel_fits:
            why.append(f"lm_head={kernels.lm_head!r} (no final logit softcapping in it)")
        if kernels.norm == "fused" and not self.norm_folds:
            why.append(
                "norm='fused' (in fp16 an RMSNorm does not fold: x * g would pass 65504 before "
                "1 / rms)"
                if self.rms_fold_overflows
                else "norm='fused' (this model's norms do not fold into the next linear)"
            )
        if kernels.step == "persistent" and not self.persistent_fits:
            why.append(f"step='persistent' ({self._persistent_misfit})")
        return why

    @property
    def kernels(self) -> DecodeKernels:
        return self._kernels

    @kernels.setter
    def kernels(self, kernels: DecodeKernels) -> None:
        """Choosing the persistent step prepares it here, outside any graph capture: its
        counters must be zero before its first launch, whichever graph replays first. The
        torch path's rotary matrices are made here too, the first time a choice needs them."""
        self._kernels = kernels
        if self.rope_matrices_fit and kernels.rope == "torch" and self.rope is None:
            self.rope = rope_matrices(*self._rope_args)
            if self._rope_local_args is not None:
                self.rope_local = rope_matrices(*self._rope_local_args)
        if kernels.step == "persistent" and self.persistent_fits:
            self._prepare_persistent_step()

    @property
    def rope_matrices_fit(self) -> bool:
        """Whether the torch step rotates with [positions, D, D] matrices (one bmm a layer)
        rather than Hugging Face's elementwise form over the cos and sin tables: only where a
        table of them stays under ROPE_MATRIX_BYTES (Gemma3's two at 32768 positions and
        head_dim 256 were 8 GiB)."""
        return self._rope_args is not None and rope_matrices_fit(
            self.spec.head_dim, self._rope_args[1], self.dtype.itemsize
        )

    def _prepare_persistent_step(self) -> None:
        """Stack each kind of layer weight over the layers, as the persistent step reads them,
        and point the layers at views of the stacks: no weight is held twice."""
        if self._step_weights is not None:
            return
        from kernl.kernels.decode_step import DecodeStepWeights, new_step_counters

        def stack(field: str) -> torch.Tensor:
            stacked = torch.stack([getattr(lw, field) for lw in self.layers])
            for i, lw in enumerate(self.layers):
                setattr(lw, field, stacked[i])
            return stacked

        s = self.spec
        self._step_weights = DecodeStepWeights(
            embed=self.embed,
            attn_norm=stack("attn_norm_w"),
            qkv=stack("qkv_w"),
            qkv_bias=stack("qkv_b") if self.layers[0].qkv_b is not None else None,
            o=stack("o_w"),
            mlp_norm=stack("mlp_norm_w"),
            gate_up=stack("up_w"),
            down=stack("down_w"),
            final_norm=self.final_norm_w,
            lm_head=self.lm_head,
            cos=self.cos,
            sin=self.sin,
            num_heads=s.num_heads,
            num_kv_heads=s.num_kv_heads,
            eps=s.norm_eps,
            sm_scale=s.attention_scale,
        )
        self._step_shared = new_step_counters(self._step_weights)

    def persistent_timed_out(self) -> bool:
        """Whether a persistent step's barrier wait timed out since the last call (its result
        is then wrong; kernels/decode_step.py); the flag is cleared. Synchronises the host."""
        if self._step_shared is None:
            return False
        flag = self._step_shared[-1][2:3]
        if not bool(flag.item()):
            return False
        flag.zero_()
        return True

    def clear_persistent_timeout(self) -> None:
        """At a request's start: a timeout flag an abandoned request left (an exception, a
        stream closed before its end: neither checks it) is not this request's."""
        if self._step_shared is not None:
            self._step_shared[-1][2:3].zero_()

    def _persistent_decode(self, pairs, cache, tokens, positions, slot, kv_valid, ids_out):
        from kernl.kernels.decode_step import DecodeStepBuffers, config_from_pairs, decode_step

        config = config_from_pairs(pairs)
        bsz = tokens.shape[0]
        buffers = self._step_buffers.get((bsz, config))
        if buffers is None:  # no buffer here needs initialising: allocated in a capture is fine
            w, shared = self._step_weights, self._step_shared
            buffers = DecodeStepBuffers.allocate(w, bsz, config, shared)
            self._step_buffers[(bsz, config)] = buffers
        return decode_step(
            self._step_weights,
            buffers,
            tokens,
            positions,
            slot,
            kv_valid,
            cache.k,
            cache.v,
            config=config,
            ids_out=ids_out,
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
        if self.spec.norm_plus_one:
            return _rms_norm_float32_scale(x, w, self.spec.norm_eps)
        if self.spec.norm == "rms":
            # normalised and rounded to the dtype, then scaled, as Hugging Face's RMSNorm
            # (with the weight inside, one rounding: a quarter of fp16/bf16 outputs moved by
            # an ulp, enough to flip greedy ids a score of steps later)
            out = F.rms_norm(x, (x.shape[-1],), None, self.spec.norm_eps)
            return out if w is None else out * w
        return F.layer_norm(x, (x.shape[-1],), w, b, self.spec.norm_eps)

    def _qk_norm(self, qk: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        """Qwen3's RMSNorm of each query head and each key head: qk [..., nh + kvh, d]."""
        nh, d, eps = self.spec.num_heads, self.spec.head_dim, self.spec.norm_eps
        if self.spec.norm_plus_one:
            q = _rms_norm_float32_scale(qk[..., :nh, :], lw.q_norm_w, eps)
            k = _rms_norm_float32_scale(qk[..., nh:, :], lw.k_norm_w, eps)
            return torch.cat([q, k], dim=-2)
        q = F.rms_norm(qk[..., :nh, :], (d,), None, eps) * lw.q_norm_w  # as _norm's
        k = F.rms_norm(qk[..., nh:, :], (d,), None, eps) * lw.k_norm_w
        return torch.cat([q, k], dim=-2)

    def _mlp(
        self,
        x: torch.Tensor | None,
        h: torch.Tensor,
        lw: LayerWeights,
        triton: bool = False,
        linear: str = "torch",
    ) -> torch.Tensor:
        """x + MLP(h), the residual folded into the last matmul where there is no bias; MLP(h)
        alone when x is None."""
        if triton and self.gated_silu_without_bias:
            from kernl.kernels.gated_mlp import gated_mlp, gated_mlp_decode_configs

            n = lw.up_w.shape[0] // 2
            tile = None
            if h.dim() == 2 and h.shape[0] <= FEW_ROWS:
                tile = self._tile_config(h.shape[0], "gated_mlp", "up")
            # untuned: the decode space's first tile (16 rows, narrow N tiles: more programs
            # than SMs stream the weights)
            tile = tile or gated_mlp_decode_configs()[0]
            h = gated_mlp(h, lw.up_w[:n], lw.up_w[n:], config=tile)
        elif self.spec.mlp == "gated":
            up = self._proj(h, lw.up_w, lw.up_b, linear=linear, site="up")
            gate, up = up.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(self._proj(h, lw.up_w, lw.up_b, linear=linear, site="up"))
        return self._proj(h, lw.down_w, lw.down_b, residual=x, linear=linear, site="down")

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        if self.pos_embed is not None:
            x = x + F.embedding(positions, self.pos_embed)
        return x

    def _logits(
        self, x: torch.Tensor, triton_norm: bool = False, linear: str = "torch"
    ) -> torch.Tensor:
        h = self._norm(x, self.final_norm_w, self.final_norm_b, triton_norm)
        logits = self._proj(h, self.lm_head, None, linear=linear)
        if self.spec.final_logit_softcap is not None:
            logits = _softcap(logits, self.spec.final_logit_softcap)
        return logits

    def _attention_out(
        self,
        x: torch.Tensor,
        att: torch.Tensor,
        lw: LayerWeights,
        triton_norm: bool = False,
        linear: str = "torch",
    ) -> torch.Tensor:
        """x + O(att): the residual folded into the O projection, or Gemma2's x + norm(O(att))."""
        if not self.spec.sandwich_norms:
            return self._proj(att, lw.o_w, lw.o_b, x, linear, "o")
        h = self._proj(att, lw.o_w, lw.o_b, None, linear, "o")
        return x + self._norm(h, lw.post_attn_norm_w, None, triton_norm)

    def _mlp_block(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        lw: LayerWeights,
        triton: bool = False,
        linear: str = "torch",
        triton_norm: bool = False,
    ) -> torch.Tensor:
        """x + MLP(h) (h: the normed x), or Gemma2's x + norm(MLP(h))."""
        if not self.spec.sandwich_norms:
            return self._mlp(x, h, lw, triton, linear)
        out = self._mlp(None, h, lw, triton, linear)
        return x + self._norm(out, lw.post_mlp_norm_w, None, triton_norm)

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
        allowed = causal[None] & valid[:, None, :]
        masks = [((allowed | eye[None])[:, None])] * 2  # [full layers, windowed layers]
        if self.window is not None and seq > self.window:  # key j seen from i if j + w > i
            idx = torch.arange(seq, device=ids.device)
            band = idx[None, :] + self.window > idx[:, None]
            masks[1] = ((allowed & band[None]) | eye[None])[:, None]
            del band
        del eye, causal, allowed  # the masks made, their parts go
        if self.cos is not None:  # [B, S, 1, D]: a gather of D x D matrices was 100s of MB
            tables = [(self.cos[positions][:, :, None], self.sin[positions][:, :, None])]
            if self.two_rope_tables:  # [full layers' rows, rope_local_layers' rows]
                tables.append(
                    (self.cos_local[positions][:, :, None], self.sin_local[positions][:, :, None])
                )
        for i, lw in enumerate(self.layers):
            h = self._norm(x, lw.attn_norm_w, lw.attn_norm_b)
            qkv = F.linear(h, lw.qkv_w, lw.qkv_b)
            qk = qkv[..., : (nh + kvh) * d].view(bsz, seq, nh + kvh, d)
            if s.qk_norm:
                qk = self._qk_norm(qk, lw)
            if self.cos is not None:
                cos, sin = tables[self.rotates_local[i]]
                qk = qk * cos + _rotate_half(qk) * sin
            q = qk[:, :, :nh].transpose(1, 2)
            k = qk[:, :, nh:].transpose(1, 2)
            v = qkv[..., (nh + kvh) * d :].view(bsz, seq, kvh, d).transpose(1, 2)
            cache.k[i, :, :, :seq].copy_(k)
            cache.v[i, :, :, :seq].copy_(v)
            g = nh // kvh
            k = k[:, :, None].expand(bsz, kvh, g, seq, d).reshape(bsz, nh, seq, d)
            v = v[:, :, None].expand(bsz, kvh, g, seq, d).reshape(bsz, nh, seq, d)
            mask = masks[self.windowed[i]]
            if s.attn_logit_softcap is None:
                att = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=s.attention_scale
                )
            else:  # SDPA has no softcap: Hugging Face's eager attention, op for op
                att = _softcapped_attention(q, k, v, mask, s.attention_scale, s.attn_logit_softcap)
            att = att.transpose(1, 2).reshape(bsz, seq, nh * d)
            x = self._attention_out(x, att, lw)
            # the attention's intermediates go before the MLP's come (the prefill's peak, which
            # its CUDA graph keeps, and the memory plan charges: generation_memory)
            del h, qkv, qk, q, k, v, att
            x = self._mlp_block(x, self._norm(x, lw.mlp_norm_w, lw.mlp_norm_b), lw)
        return self._logits(x[:, -1])

    @property
    def reads_masked_slots(self) -> bool:
        """Whether the decode attention reads cache slots past each row's current one: torch
        and SDPA read the bucket's whole length under a mask; kernl's kernel (the pieces' and
        the persistent step's) reads up to the current slot and loads no masked value."""
        return self.kernels.attention != "triton"

    def decode(
        self,
        cache: KVCache,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slot: torch.Tensor,
        kv_valid: torch.Tensor,
        ids_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, bool]:
        """tokens, positions: [B]; slot: [1]; kv_valid: [B, kv_len] bool, the cache slots each
        row may attend to (this step's slot included, none after it: Triton attention reads
        slots [0, slot] only; the sliding window not applied: the step applies it). Returns
        [B, vocab] logits, and whether the greedy ids were written into `ids_out` too
        (lm_head + argmax in one kernel)."""
        s, kernels = self.spec, self.kernels
        bsz = tokens.shape[0]
        kv_len = kv_valid.shape[-1]
        # [full layers, windowed layers]: the slots older than the window out of the second,
        # made once a step from `slot` (a tensor: the replayed graph computes it anew)
        masks = [kv_valid, kv_valid]
        if self.window is not None:
            masks[1] = kv_valid & (self._window_ends[:kv_len] > slot)
        pairs = kernels.step_config_for(bsz, kv_len) if bsz <= FEW_ROWS else None
        if pairs is not None and self._step_weights is not None:
            # one mask for every layer (persistent_fits): all windowed, or none
            mask = masks[self.windowed[0]]
            step = self._persistent_decode(pairs, cache, tokens, positions, slot, mask, ids_out)
            return step[0], ids_out is not None
        nh, kvh, d = s.num_heads, s.num_kv_heads, s.head_dim
        g = nh // kvh
        few = bsz <= FEW_ROWS  # kernl's few-rows kernels hold at most 16 rows
        fold = kernels.norm == "fused" and few and self.norm_folds
        triton_norm = kernels.norm != "torch"
        triton_mlp = kernels.gated_mlp == "triton"
        attention = kernels.attention
        if attention == "sdpa" and not self.sdpa_fits:
            attention = "torch"
        if attention == "torch":  # the bias of each mask some layer reads
            biases = {w: self._slot_bias(masks[w], kvh) for w in set(self.windowed)}
        elif attention == "triton":
            # every row's valid length: the chunks of the cache past it read nothing
            kv_lens = (slot + 1).expand(bsz)
            attention_config = self._tile_config(bsz, "decode_attention", "attn", kv_len)
        x = self._embed(tokens, positions)
        # Qwen3's per-head norms come between the QKV projection and the rotary embedding,
        # and the kernels that rotate the projection (and write the cache) read one table,
        # where Gemma3's layers read two: those kernels are not used for either; with a rotary
        # kernel chosen, kernels/rotary.py rotates the (normed) q and k with the layer's table
        # (one launch, as the bmm was)
        rotates_apart = s.qk_norm or self.two_rope_tables
        rope_kernel = "torch" if rotates_apart else kernels.rope
        normed_rotary = rotates_apart and kernels.rope != "torch" and self.cos is not None
        # on torch without the matrices (rope_matrices_fit): q * cos + rotate_half(q) * sin
        elementwise = rope_kernel == "torch" and not normed_rotary and self.rope is None
        elementwise = elementwise and self.cos is not None
        # per table, [full layers', rope_local_layers']: the step's rows of it
        ropes: list = [None, None]
        cos_sins: list = [None, None]
        if normed_rotary or elementwise:
            cos_sins[0] = (self.cos[positions][:, None], self.sin[positions][:, None])
            if self.two_rope_tables:
                cos_sins[1] = (
                    self.cos_local[positions][:, None],
                    self.sin_local[positions][:, None],
                )
        elif self.rope is not None and rope_kernel == "torch":
            ropes[0] = self.rope.index_select(0, positions)
            if self.two_rope_tables:
                ropes[1] = self.rope_local.index_select(0, positions)
        fused_rope = fold and rope_kernel == "fused"  # norm, QKV, rotary, cache write: 1 kernel
        for i, lw in enumerate(self.layers):
            if fused_rope:
                q = self._norm_linear_rope(x, lw, cache, i, positions, slot)[:, :, 0]
            elif fold:
                qkv = self._norm_linear(
                    x, lw.attn_norm_w, lw.attn_norm_b, lw.qkv_w, lw.qkv_b, site="qkv"
                )
            else:
                h = self._norm(x, lw.attn_norm_w, lw.attn_norm_b, triton_norm)
                qkv = self._proj(h, lw.qkv_w, lw.qkv_b, linear=kernels.linear, site="qkv")
            if fused_rope:
                pass  # q and the caches are written
            elif rope_kernel != "torch":  # "fused" without the folded norm: its own kernel
                from kernl.kernels.rope_cache_write import rope_cache_write

                q = rope_cache_write(
                    qkv,
                    positions,
                    self.cos,
                    self.sin,
                    cache.k[i],
                    cache.v[i],
                    slot,
                    num_heads=nh,
                    num_kv_heads=kvh,
                    pdl=kernels.pdl,
                )[:, :, 0]
            else:
                qk = qkv[:, : (nh + kvh) * d].view(bsz, nh + kvh, d)
                if s.qk_norm:
                    qk = self._qk_norm(qk, lw)
                cos_sin, rope = cos_sins[self.rotates_local[i]], ropes[self.rotates_local[i]]
                if cos_sin is not None and elementwise:
                    qk = qk * cos_sin[0] + _rotate_half(qk) * cos_sin[1]
                elif cos_sin is not None:
                    from kernl.kernels.rotary import rotary

                    qk = rotary(qk, *cos_sin)  # [bsz, nh + kvh, d], contiguous
                else:
                    qk = torch.bmm(qk, rope) if rope is not None else qk.contiguous()
                v_new = qkv[:, (nh + kvh) * d :].view(bsz, kvh, 1, d)
                cache.k[i].index_copy_(2, slot, qk[:, nh:].unsqueeze(2))
                cache.v[i].index_copy_(2, slot, v_new)
                q = qk[:, :nh]
            keys, values = cache.k[i][:, :, :kv_len], cache.v[i][:, :, :kv_len]
            kv_mask = masks[self.windowed[i]]
            if attention == "torch":
                bias = biases[self.windowed[i]]
                keys_t = keys.reshape(bsz * kvh, kv_len, d).transpose(1, 2)
                q_rows = q.reshape(bsz * kvh, g, d)
                if s.attn_logit_softcap is None:
                    scores = torch.baddbmm(bias, q_rows, keys_t, alpha=s.attention_scale)
                    probs = torch.softmax(scores, dim=-1)
                else:  # Hugging Face's eager order: scale, softcap, mask, float32 softmax
                    scores = torch.bmm(q_rows, keys_t) * s.attention_scale
                    scores = _softcap(scores, s.attn_logit_softcap) + bias
                    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
                att = torch.bmm(probs, values.reshape(bsz * kvh, kv_len, d))
            elif attention == "sdpa":
                att = F.scaled_dot_product_attention(
                    q.unsqueeze(2),
                    keys,
                    values,
                    attn_mask=kv_mask[:, None, None, :],
                    scale=s.attention_scale,
                    enable_gqa=True,
                )
            else:
                from kernl.kernels.decode_attention import decode_attention

                att = decode_attention(
                    q.unsqueeze(2),
                    keys,
                    values,
                    sm_scale=s.attention_scale,
                    kv_lens=kv_lens,
                    kv_mask=kv_mask,
                    config=attention_config,
                    pdl=kernels.pdl,
                    softcap=s.attn_logit_softcap,
                    # the window's chunks only: the mask has it, this skips the reads before
                    window=self.window if self.windowed[i] else None,
                )
            x = self._attention_out(x, att.reshape(bsz, nh * d), lw, triton_norm, kernels.linear)
            if fold and self.gated_silu_without_bias:
                h = self._norm_linear(
                    x, lw.mlp_norm_w, lw.mlp_norm_b, lw.up_w, gated=True, site="up"
                )
                x = self._proj(h, lw.down_w, lw.down_b, x, kernels.linear, "down")
            elif fold:
                up = self._norm_linear(x, lw.mlp_norm_w, lw.mlp_norm_b, lw.up_w, lw.up_b, site="up")
                if s.mlp == "gated":
                    gate, up = up.chunk(2, dim=-1)
                    h = self.act(gate) * up
                else:
                    h = self.act(up)
                x = self._proj(h, lw.down_w, lw.down_b, x, kernels.linear, "down")
            else:
                h = self._norm(x, lw.mlp_norm_w, lw.mlp_norm_b, triton_norm)
                x = self._mlp_block(x, h, lw, triton_mlp, kernels.linear, triton_norm)
        lm_head_kernel = kernels.lm_head == "triton" and self.lm_head_kernel_fits
        if lm_head_kernel and few and ids_out is not None:
            from kernl.kernels.lm_head_argmax import lm_head_argmax, new_workspace

            if self._workspace is None:
                self._workspace = new_workspace(x.device)
            norm_w = None
            if self.final_norm_folds:
                norm_w, h = self.final_norm_w, x  # the final RMSNorm folds into the kernel
            else:
                h = self._norm(x, self.final_norm_w, self.final_norm_b, triton_norm)
            _, logits = lm_head_argmax(
                h,
                self.lm_head,
                norm_weight=norm_w,
                eps=s.norm_eps,
                return_logits=True,
                ids_out=ids_out,
                workspace=self._workspace,
                config=self._tile_config(bsz, "lm_head_argmax", "lm_head"),
                pdl=kernels.pdl,
                prefetch=kernels.prefetch,
            )
            return logits, True
        return self._logits(x, triton_norm, kernels.linear), False

    def _slot_bias(self, mask: torch.Tensor, kvh: int) -> torch.Tensor:
        """[B * kvh, 1, kv_len]: 0 on the slots `mask` [B, kv_len] lets a row attend to, the
        dtype's lowest elsewhere (the torch step's baddbmm adds it to the scores)."""
        bsz, kv_len = mask.shape
        bias = torch.where(mask, 0.0, torch.finfo(self.dtype).min).to(self.dtype)
        return bias[:, None, None, :].expand(bsz, kvh, 1, kv_len).reshape(bsz * kvh, 1, kv_len)

    def _counters_for(self, x: torch.Tensor) -> torch.Tensor:
        if self._counters is None:
            from kernl.kernels.norm_linear import new_counters

            self._counters = new_counters(x.device)
        return self._counters

    def _tile_config(self, batch: int, kernel: str, site: str, cache: int = 0):
        """The kernel's config dataclass for the tile the compiler tuned at this batch and
        site (and KV-cache length, for attention), or None (its default) where there is none."""
        t = self.kernels.tile(batch, kernel, site, cache)
        if t is None:
            return None
        if kernel == "decode_attention":
            from kernl.kernels.decode_attention import DecodeAttentionConfig

            return DecodeAttentionConfig(t.block_n, t.num_warps, t.num_stages, t.split_k)
        if kernel == "gated_mlp":
            from kernl.kernels.gated_mlp import GatedMLPConfig

            return GatedMLPConfig(16, t.block_n, t.block_k, 1, t.num_warps, t.num_stages)
        if kernel == "norm_linear":
            from kernl.kernels.norm_linear import NormLinearConfig as Config
        elif kernel == "skinny_linear_fused":
            from kernl.kernels.skinny_linear_fused import SkinnyLinearFusedConfig as Config
        else:
            from kernl.kernels.lm_head_argmax import LmHeadArgmaxConfig

            return LmHeadArgmaxConfig(t.block_n, t.block_k, t.num_warps, t.num_stages)
        return Config(t.block_n, t.block_k, t.split_k, t.num_warps, t.num_stages)

    def _norm_linear(
        self, x, norm_w, norm_b, w, b=None, gated: bool = False, site: str = "qkv"
    ) -> torch.Tensor:
        from kernl.kernels.norm_linear import norm_linear

        return norm_linear(
            x,
            norm_w,
            norm_b,
            w,
            b,
            eps=self.spec.norm_eps,
            norm=self.spec.norm,
            gated=gated,
            counters=self._counters_for(x),
            config=self._tile_config(x.shape[0], "norm_linear", site),
            pdl=self.kernels.pdl,
            prefetch=self.kernels.prefetch,
        )

    def _norm_linear_rope(self, x, lw: LayerWeights, cache, i: int, positions, slot):
        """q [B, H, 1, D] of layer i, its k and v written to the cache at `slot`."""
        from kernl.kernels.norm_linear_rope import norm_linear_rope
        from kernl.kernels.rope_cache_write import RopeCacheTarget

        s = self.spec
        target = RopeCacheTarget(
            positions, self.cos, self.sin, cache.k[i], cache.v[i], slot, s.num_heads, s.num_kv_heads
        )
        return norm_linear_rope(
            x,
            lw.attn_norm_w,
            lw.attn_norm_b,
            lw.qkv_w,
            lw.qkv_b,
            target,
            eps=s.norm_eps,
            norm=s.norm,
            counters=self._counters_for(x),
            config=self._tile_config(x.shape[0], "norm_linear", "qkv"),
            pdl=self.kernels.pdl,
            prefetch=self.kernels.prefetch,
        )

    def _proj(
        self,
        h: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        residual: torch.Tensor | None = None,
        linear: str = "torch",
        site: str | None = None,
    ) -> torch.Tensor:
        """residual + h @ w.T + b on the linear kernel `linear` names (a decode step's choice;
        prefill stays on torch: its kernels have no binaries). `site` ("qkv", "up", "o",
        "down") picks the tuned tile of the fused kernel."""
        if linear == "fused" and _few_rows_operands(h, w):
            from kernl.kernels.skinny_linear_fused import skinny_linear_fused

            config = None
            if site is not None:
                config = self._tile_config(h.shape[0], "skinny_linear_fused", site)
            return skinny_linear_fused(
                h,
                w,
                b,
                residual,
                counters=self._counters_for(h),
                config=config,
                pdl=self.kernels.pdl,
                prefetch=self.kernels.prefetch,
            )
        return _linear(h, w, b, residual=residual, skinny=linear != "torch")


FEW_ROWS = 16


def _few_rows_operands(h: torch.Tensor, w: torch.Tensor) -> bool:
    return h.dim() == 2 and h.shape[0] <= FEW_ROWS and h.stride(1) == 1 and w.is_contiguous()


def _is_norm_weight(name: str) -> bool:
    """Whether a weight name (WEIGHT NAMES, causal_lm/describe.py) is an RMSNorm's scale."""
    return name.endswith("norm.weight")


def _rms_norm_float32_scale(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm as Hugging Face computes it: x normalised in float32, times the float32
    scale `w` (the decoder's 1 + weight), rounded to x's dtype once."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).type_as(x)


def _softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma2's tanh(x / cap) * cap, in x's dtype, in Hugging Face's order of operations."""
    return torch.tanh(x / cap) * cap


def _softcapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    cap: float,
    budget: int | None = None,
) -> torch.Tensor:
    """Hugging Face's eager attention with Gemma2's softcap (scale, cap, mask, float32 softmax),
    q [B, H, S, D] against k, v [B, H, S, D], mask [B, 1, S, S] (True: seen), in blocks of
    queries whose float32 scores fit `budget` bytes (PREFILL_SCORE_BYTES): in one piece they
    were 16 GiB for 8 rows of 8 heads at 8192 tokens, and a CUDA graph keeps its peak for good
    (each query's softmax is its own row)."""
    bsz, heads, seq, _ = q.shape
    budget = PREFILL_SCORE_BYTES if budget is None else budget
    block = max(1, budget // (bsz * heads * k.shape[2] * 4))
    out = []
    for i in range(0, seq, block):
        rows = slice(i, i + block)
        scores = torch.matmul(q[:, :, rows], k.transpose(-1, -2)) * scale
        scores = _softcap(scores, cap)
        scores = scores.masked_fill(~mask[:, :, rows], torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        del scores
        out.append(torch.matmul(probs, v))
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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
