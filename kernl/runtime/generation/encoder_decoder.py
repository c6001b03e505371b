"""The encoder-decoder forward over plain torch ops, for a `Seq2SeqSpec` (T5, BART, mBART,
Marian, Whisper).

`encode` runs the encoder over a [batch, source] bucket and writes every decoder layer's
cross-attention keys and values into static buffers (once per request); `decode` runs one
decoder step for every row at the same slot: self-attention over a static KV cache,
cross-attention over those buffers, then the logits. Nothing here allocates state: the
buffers belong to the caller (generation/seq2seq.py), so a step can be captured as a graph."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernl.artifacts.seq2seq import Seq2SeqSpec

from .decoder import ACTIVATIONS, FEW_ROWS, rms_fold_overflows, zeros_or_view


@dataclass
class Seq2SeqCache:
    """Static buffers of one batch bucket: self-attention keys and values [layers, 2, B, H,
    cache, D] (one copy writes both), `self_k` / `self_v` its two halves, and cross-attention
    K/V [layers, B, H, longest source, D]."""

    self_kv: torch.Tensor
    cross_k: torch.Tensor
    cross_v: torch.Tensor

    @property
    def self_k(self) -> torch.Tensor:
        return self.self_kv[:, 0]

    @property
    def self_v(self) -> torch.Tensor:
        return self.self_kv[:, 1]

    @staticmethod
    def allocate(
        spec: Seq2SeqSpec,
        batch: int,
        cache_len: int,
        source_len: int,
        dtype,
        device,
        shared: Seq2SeqCache | None = None,
    ) -> Seq2SeqCache:
        """Zeros, or (`shared`: a cache of at least `batch` rows) views of the leading part of
        its storage."""
        layers, h, d = spec.num_decoder_layers, spec.num_heads, spec.head_dim

        def zeros(within: torch.Tensor | None, *shape: int) -> torch.Tensor:
            return zeros_or_view(within, (layers, *shape), dtype, device)

        return Seq2SeqCache(
            zeros(shared and shared.self_kv, 2, batch, h, cache_len, d),
            zeros(shared and shared.cross_k, batch, h, source_len, d),
            zeros(shared and shared.cross_v, batch, h, source_len, d),
        )


def relative_position_bucket(
    relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucketing of key - query distances (as in its paper and HF's T5Attention)."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).to(torch.long) * num_buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    large = max_exact + (
        torch.log(relative.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative, large)


def relative_distance_limit(bidirectional: bool, num_buckets: int, max_distance: int) -> int | None:
    """The first query-key distance (either way) at which T5's bucketing gives no bucket, or
    None where every distance gets one. Past the exact buckets the bucket grows with
    log(distance) / log(max_distance / max_exact): with max_distance <= max_exact that ratio
    runs backwards (or is 0 / 0 at max_exact), the buckets fall below 0 and Hugging Face's
    T5 fails there (IndexError). They fall, never to rise again, by distance
    max_exact * (max_exact / max_distance) ** ((max_exact + 1) / max_exact) + 1 (the bucket
    is truncated toward zero, so later than the untruncated max_exact**2 / max_distance; at
    max_distance 1 that was past the range once scanned), within the range scanned here."""
    exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if max_distance > exact or max_distance < 1:  # < 1: the artifact's checker refuses it
        return None
    last = math.ceil(exact * (exact / max_distance) ** ((exact + 1) / exact)) + 2
    distance = torch.arange(last)
    sides = (distance, -distance) if bidirectional else (-distance,)
    bad = torch.zeros_like(distance, dtype=torch.bool)
    for relative in sides:
        bucket = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
        bad |= (bucket < 0) | (bucket >= num_buckets)
    return int(bad.nonzero()[0]) if bool(bad.any()) else None


def decoder_bias_distances(num_buckets: int, max_distance: int) -> int:
    """How many query-key distances (0, 1, ...) the decoder's bias table holds; a longer
    distance takes the last one's bias. With max_distance > num_buckets // 2 every distance
    from max_distance on falls in the last bucket: max_distance + 1. Otherwise the buckets
    keep changing until they are no bucket at all (`relative_distance_limit`): every distance
    before that, and the compiler refuses caches that reach it."""
    limit = relative_distance_limit(False, num_buckets, max_distance)
    return max_distance + 1 if limit is None else limit


@dataclass
class _Normed:
    """A norm not applied yet: the linear that reads it folds it into its prologue
    (kernl's norm_linear), so the normalised rows never reach memory."""

    x: torch.Tensor
    name: str


def _clamp_overflow(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's fp16 clamp of T5's hidden states, without a host sync."""
    top = torch.finfo(x.dtype).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top).to(x.dtype)
    return torch.clamp(x, -limit, limit)


def _clamp_always(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's fp16 clamp of Whisper's and mBART's encoder layers: to max - 1000."""
    limit = torch.finfo(x.dtype).max - 1000
    return torch.clamp(x, -limit, limit)


def _clamp_non_finite(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's fp16 clamp of BART's and Marian's encoder layers: to max - 1000 once any
    value is not finite, without a host sync."""
    top = torch.finfo(x.dtype).max
    limit = torch.where(torch.isfinite(x).all(), top, top - 1000).to(x.dtype)
    return torch.clamp(x, -limit, limit)


# Each fp16 encoder layer's output, clamped as Hugging Face's encoder layer of the family does
# (their decoder layers do not clamp; T5 clamps every block, see EncoderDecoder._clamp)
_ENCODER_LAYER_CLAMPS = {
    "whisper": _clamp_always,
    "mbart": _clamp_always,
    "bart": _clamp_non_finite,
    "marian": _clamp_non_finite,
}


class EncoderDecoder:
    def __init__(self, spec: Seq2SeqSpec, weights: dict[str, torch.Tensor], dtype, device):
        self.spec = spec
        # A decode step of <= 16 rows on kernl's kernels: every linear on the few-rows
        # kernels, bias and residual add in each projection's epilogue, and with "kernl" each
        # pre-norm folded into the linear after it ("kernl-linear": torch's norm before it).
        self.kernels = spec.decode_kernels != "torch"
        # not T5's RMSNorm in fp16 (rms_fold_overflows)
        self.fold_norms = spec.decode_kernels == "kernl" and not rms_fold_overflows(
            spec.norm, dtype
        )
        # T5 in fp16 overflows (activations past 65504); as Hugging Face's T5Block, each
        # block's output is clamped, to max - 1000 once any value is infinite.
        self._clamp = spec.family == "t5" and dtype == torch.float16
        # the other families clamp each encoder layer's output (an overflow was inf, then NaN)
        self._encoder_clamp = (
            _ENCODER_LAYER_CLAMPS.get(spec.family) if dtype == torch.float16 else None
        )
        # The few-rows kernels' launch tile (block_n, block_k, split_k, warps, stages), the
        # compiler's choice, as each kernel's config; None: their defaults.
        self._norm_linear_tile = self._skinny_tile = None
        if spec.decode_tile:
            self.set_tile(spec.decode_tile)
        # The compiler's choice per (batch, kernel, call site), as each kernel's config; a
        # linear without one takes the tile above.
        self._site_configs: dict[tuple[int, str, str], object] = {}
        self.set_site_tiles(spec.decode_site_tiles)
        self._counters: torch.Tensor | None = None  # split-K arrivals, self-resetting
        self.w = weights
        self.dtype = dtype
        self.device = device
        self.act = ACTIVATIONS[spec.activation]
        self.inner = spec.num_heads * spec.head_dim
        # Token tables: one shared by both sides, or the decoder's own (Marian, not shared),
        # which a tied head then reuses.
        self.embeds = {"enc": weights["embed.weight"]}
        self.embeds["dec"] = weights["dec.embed.weight" if spec.decoder_embed else "embed.weight"]
        self.lm_head = weights.get("lm_head.weight", self.embeds["dec"])
        bias = weights.get("final_logits_bias")
        self.logits_bias = None if bias is None else bias.to(self.lm_head.dtype)
        self._zero = torch.zeros((), dtype=dtype, device=device)
        self._lowest = torch.finfo(dtype).min
        self._decoder_bias = None
        if spec.positions == "relative":
            # The decoder's bias depends only on the query-key distance: one [H, distances]
            # table (decoder_bias_distances), gathered per step.
            nb, md = spec.relative_buckets, spec.relative_max_distance
            distance = torch.arange(decoder_bias_distances(nb, md), device=device)
            buckets = relative_position_bucket(-distance, False, nb, md)
            self._decoder_bias = F.embedding(buckets, weights["dec.rel_bias.weight"]).t()

    def set_tile(self, tile) -> None:
        """The launch tile (block_n, block_k, split_k, warps, stages) of both few-rows kernels."""
        from kernl.kernels.norm_linear import NormLinearConfig
        from kernl.kernels.skinny_linear_fused import SkinnyLinearFusedConfig

        self._norm_linear_tile = NormLinearConfig(*tile)
        self._skinny_tile = SkinnyLinearFusedConfig(*tile)

    def set_site_tiles(self, tiles) -> None:
        """Per call site launch configs: [batch, kernel, site, *config] (Seq2SeqSpec)."""
        if not tiles:
            self._site_configs = {}
            return
        from kernl.kernels.decode_attention import DecodeAttentionConfig
        from kernl.kernels.norm_linear import NormLinearConfig
        from kernl.kernels.skinny_linear_fused import SkinnyLinearFusedConfig

        types = {
            "norm_linear": NormLinearConfig,
            "skinny_linear_fused": SkinnyLinearFusedConfig,
            "decode_attention": DecodeAttentionConfig,
        }
        self._site_configs = {(b, k, s): types[k](*c) for b, k, s, *c in tiles}

    def _config(self, rows: int, kernel: str, name: str):
        """The launch config of `kernel` at the call site `name` ("dec.layers.3.o": site "o")."""
        site = name.rsplit(".", 1)[-1]
        default = self._norm_linear_tile if kernel == "norm_linear" else self._skinny_tile
        return self._site_configs.get((rows, kernel, site), default)

    # -- pieces -----------------------------------------------------------------------------

    def _linear(self, x: torch.Tensor | _Normed, name: str, fuse: bool = False) -> torch.Tensor:
        """x @ W.T + b; with `fuse` on kernl's few-rows kernels: norm_linear where x is a norm
        still to apply, else skinny_linear_fused."""
        w, b = self.w[name + ".weight"], self.w.get(name + ".bias")
        if isinstance(x, _Normed):
            from kernl.kernels.norm_linear import norm_linear

            norm_w, norm_b = self.w[x.name + ".weight"], self.w.get(x.name + ".bias")
            eps, norm = self.spec.norm_eps, self.spec.norm
            return norm_linear(
                x.x,
                norm_w,
                norm_b,
                w,
                b,
                eps=eps,
                norm=norm,
                counters=self._few(),
                config=self._config(x.x.shape[0], "norm_linear", name),
            )
        if fuse:
            from kernl.kernels.skinny_linear_fused import skinny_linear_fused

            config = self._config(x.shape[0], "skinny_linear_fused", name)
            return skinny_linear_fused(x, w, b, counters=self._few(), config=config)
        return F.linear(x, w, b)

    def _few(self) -> torch.Tensor:
        if self._counters is None:
            from kernl.kernels.norm_linear import new_counters

            self._counters = new_counters(self.device)
        return self._counters

    def _norm(self, x: torch.Tensor, name: str, fuse: bool = False) -> torch.Tensor:
        """The model's norm; with `fuse` kernl's Triton kernel (torch's LayerNorm takes ~4 µs
        on a decode step's few rows)."""
        s = self.spec
        w, b = self.w[name + ".weight"], self.w.get(name + ".bias")
        if fuse:
            from kernl.kernels import norm

            if s.norm == "layer":
                return norm.layer_norm(x, w, b, s.norm_eps)
            return norm.rms_norm(x, w, None, s.norm_eps)
        if s.norm == "layer":
            return F.layer_norm(x, (s.d_model,), w, b, s.norm_eps)
        if x.dtype == torch.float16:
            # T5LayerNorm as Hugging Face writes it: the variance in float32 (fp16 squares
            # of T5's activations overflow, and torch's RMSNorm squares in fp16 on the CPU).
            var = x.float().pow(2).mean(-1, keepdim=True)
            return w * (x.float() * torch.rsqrt(var + s.norm_eps)).to(x.dtype)
        # T5LayerNorm: no mean, no bias; torch's fused RMSNorm keeps the statistics in
        # float32 too; rounded before the weight, as T5 rounds
        return F.rms_norm(x, (s.d_model,), None, s.norm_eps) * w

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, (T,) H*D] -> [B, H, T, D]
        x = x[:, None] if x.dim() == 2 else x
        b, t, _ = x.shape
        return x.view(b, t, self.spec.num_heads, self.spec.head_dim).transpose(1, 2)

    def _attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """q [B,H,T,D], k/v [B,H,S,D]; mask None (every key attended) or additive in the
        model's dtype, broadcastable to [B,H,T,S] (`_additive`), which carries T5's relative
        position bias too. One fused SDPA kernel: the scores are never materialised
        (Whisper's encoder: [B, H, 1500, 1500]), and a decode step's attention is one launch
        instead of the seven of matmul, scale, bias, softmax, cast, matmul and copy."""
        scale = self.spec.attention_scale
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], self.inner)

    def _decode_attend(self, q, k, v, mask: torch.Tensor | None, config) -> torch.Tensor:
        """One query row per sequence, q [B,H,1,D], on kernl's decode attention; mask [B, S]
        boolean (True: attended) or None."""
        from kernl.kernels.decode_attention import decode_attention

        scale = self.spec.attention_scale
        out = decode_attention(q, k, v, sm_scale=scale, kv_mask=mask, config=config)
        return out.reshape(q.shape[0], self.inner)

    def _additive(self, attended: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """A boolean mask (True: attended) as an additive one in the model's dtype, the bias
        where attended (Hugging Face's masks use the dtype's minimum: a row with no key
        attended stays finite). One kernel."""
        return torch.where(attended, self._zero if bias is None else bias, self._lowest)

    def _mlp(self, x: torch.Tensor, p: str, fuse: bool = False) -> tuple[torch.Tensor, str]:
        """The MLP up to its last projection: (that projection's input, its name)."""
        if self.spec.mlp == "gated":
            gate, up = self._linear(x, p + "gate_up", fuse).chunk(2, dim=-1)
            return self.act(gate) * up, p + "down"
        return self.act(self._linear(x, p + "fc", fuse)), p + "proj"

    def _block(self, x: torch.Tensor, p: str, norm: str, fn, fuse: bool = False) -> torch.Tensor:
        """A residual block, pre-norm (T5) or post-norm (BART); `fn` returns the input of the
        block's output projection and its name, so that the residual add rides in that
        GEMM (`_residual_linear`). With `fuse`, a pre-norm goes to `fn` unapplied."""
        if self.spec.pre_norm:
            h = _Normed(x, p + norm) if fuse and self.fold_norms else self._norm(x, p + norm, fuse)
            x = self._residual_linear(x, *fn(h), fuse)
            return _clamp_overflow(x) if self._clamp else x
        return self._norm(self._residual_linear(x, *fn(x), fuse), p + norm, fuse)

    def _residual_linear(
        self, x: torch.Tensor, h: torch.Tensor, name: str, fuse: bool = False
    ) -> torch.Tensor:
        """x + h @ W.T (+ b): with `fuse` one skinny_linear_fused launch (bias and residual in
        its epilogue); without a bias one GEMM whose C operand is the residual."""
        w, b = self.w[name + ".weight"], self.w.get(name + ".bias")
        if fuse:
            from kernl.kernels.skinny_linear_fused import skinny_linear_fused

            config = self._config(h.shape[0], "skinny_linear_fused", name)
            return skinny_linear_fused(h, w, b, x, counters=self._few(), config=config)
        if b is not None:
            return x + F.linear(h, w, b)
        shape = x.shape
        out = torch.addmm(x.reshape(-1, shape[-1]), h.reshape(-1, h.shape[-1]), w.t())
        return out.view(shape)

    def _embed(self, ids: torch.Tensor, side: str, positions: torch.Tensor) -> torch.Tensor:
        s = self.spec
        x = F.embedding(ids, self.embeds[side])
        if s.embed_scale != 1.0:
            x = x * s.embed_scale
        if s.positions == "learned":
            x = x + F.embedding(positions + s.position_offset, self.w[f"{side}.pos_embed.weight"])
        if s.embed_norm:
            x = self._norm(x, f"{side}.embed_norm")
        return x

    def _relative_bias(self, side: str, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """[1, H, T, S] in the model's dtype (as Hugging Face's table) from query positions [T]
        and key positions [S]."""
        s = self.spec
        buckets = relative_position_bucket(
            key[None, :] - query[:, None],
            side == "enc",
            s.relative_buckets,
            s.relative_max_distance,
        )
        return F.embedding(buckets, self.w[f"{side}.rel_bias.weight"]).permute(2, 0, 1)[None]

    # -- the two steps ----------------------------------------------------------------------

    def encode(self, cache: Seq2SeqCache, ids: torch.Tensor, valid: torch.Tensor) -> None:
        """ids, valid [B, S] (S a source bucket, padded on the right): the encoder, then each
        decoder layer's cross-attention keys and values into cache.cross_k/v[:, :, :, :S]."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        bias = None
        if self.spec.positions == "relative":
            bias = self._relative_bias("enc", pos, pos)
        mask = self._additive(valid[:, None, None, :], bias)
        self._encoder(cache, self._embed(ids, "enc", pos[None, :]), mask)

    def encode_features(self, cache: Seq2SeqCache, features: torch.Tensor) -> None:
        """Whisper: log-mel features [B, mels, frames] through the convolutional front end
        (GELU after each, the second of stride 2: frames / 2 positions), plus the encoder's
        position table; no padding mask (a window is always whole). Then as `encode`."""
        w = self.w
        x = F.gelu(F.conv1d(features, w["enc.conv1.weight"], w["enc.conv1.bias"], padding=1))
        x = F.gelu(F.conv1d(x, w["enc.conv2.weight"], w["enc.conv2.bias"], stride=2, padding=1))
        # [B, frames, d] in row-major order: a transposed residual stream would stay
        # transposed through every add of the encoder (TensorIterator keeps the input's
        # layout), each one unvectorised and each norm copying its input first (at 8 windows
        # ~10 ms of a 55 ms encoder step on an H200, benchmarks/profile_whisper_encoder.py).
        t = x.transpose(1, 2)
        x = torch.add(
            t,
            w["enc.pos_embed.weight"],
            out=torch.empty_like(t, memory_format=torch.contiguous_format),
        )
        self._encoder(cache, x, None)

    def _encoder(self, cache: Seq2SeqCache, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        s = self.spec
        for n in range(s.num_encoder_layers):
            p = f"enc.layers.{n}."

            def attn(h, p=p):
                q, k, v = self._linear(h, p + "qkv").split(self.inner, dim=-1)
                return self._attend(*map(self._heads, (q, k, v)), mask), p + "o"

            x = self._block(x, p, "attn_norm", attn)
            x = self._block(x, p, "mlp_norm", lambda h, p=p: self._mlp(h, p))
            if self._encoder_clamp is not None:
                x = self._encoder_clamp(x)
        if s.final_norm:
            x = self._norm(x, "enc.final_norm")
        length = x.shape[1]
        for n in range(s.num_decoder_layers):
            k, v = self._linear(x, f"dec.layers.{n}.cross_kv").split(self.inner, dim=-1)
            cache.cross_k[n, :, :, :length].copy_(self._heads(k))
            cache.cross_v[n, :, :, :length].copy_(self._heads(v))

    def decode(
        self,
        cache: Seq2SeqCache,
        tokens: torch.Tensor,
        slot: torch.Tensor,
        kv_len: int,
        source_valid: torch.Tensor,
    ) -> torch.Tensor:
        """One step: tokens [B] at decoder position `slot` ([1] int64, the same for every row);
        attends to self-attention slots [0, slot] of the first `kv_len` and to the source
        positions `source_valid` ([B, S]) marks. Returns float logits [B, vocab]."""
        s = self.spec
        rows, heads, head_dim = tokens.shape[0], s.num_heads, s.head_dim
        fuse = self.kernels and rows <= FEW_ROWS
        x = self._embed(tokens[:, None], "dec", slot[None, :])[:, 0]  # [B, d]: rows from here
        keys = torch.arange(kv_len, device=tokens.device)
        relative = None
        if self._decoder_bias is not None:  # [1, H, 1, kv]
            distance = (slot - keys).clamp(0, self._decoder_bias.shape[1] - 1)
            relative = self._decoder_bias.index_select(1, distance)[None, :, None, :]
        # Built once per step, shared by every layer.
        self_mask = self._additive((keys <= slot)[None, None, None, :], relative)
        cross_mask = source_mask = None  # Whisper: a whole window, every position attended
        # kernl's split-K decode attention where the compiler timed it faster than SDPA
        # (Whisper at 8 rows reads 61 MB of cross K/V per layer and step).
        cross_config = self._site_configs.get((rows, "decode_attention", "cross")) if fuse else None
        if s.family != "whisper":
            source_mask = source_valid
            if cross_config is None:
                cross_mask = self._additive(source_valid[:, None, None, :])
        length = source_valid.shape[1]
        for n in range(s.num_decoder_layers):
            p = f"dec.layers.{n}."

            def self_attn(h, n=n, p=p):
                qkv = self._linear(h, p + "qkv", fuse)
                # This slot's keys and values in one copy: [2, B, H, 1, D].
                kv = qkv[:, self.inner :].view(rows, 2, heads, head_dim).transpose(0, 1)
                cache.self_kv[n].index_copy_(3, slot, kv.unsqueeze(3))
                k, v = cache.self_k[n, :, :, :kv_len], cache.self_v[n, :, :, :kv_len]
                q = self._heads(qkv[:, : self.inner])
                return self._attend(q, k, v, self_mask)[:, 0], p + "o"

            def cross_attn(h, n=n, p=p):
                q = self._heads(self._linear(h, p + "cross_q", fuse))
                k, v = cache.cross_k[n, :, :, :length], cache.cross_v[n, :, :, :length]
                if cross_config is not None:
                    return self._decode_attend(q, k, v, source_mask, cross_config), p + "cross_o"
                return self._attend(q, k, v, cross_mask)[:, 0], p + "cross_o"

            x = self._block(x, p, "attn_norm", self_attn, fuse)
            x = self._block(x, p, "cross_norm", cross_attn, fuse)
            x = self._block(x, p, "mlp_norm", lambda h, p=p: self._mlp(h, p, fuse), fuse)
        if s.final_norm:
            x = self._norm(x, "dec.final_norm", fuse)
        if s.logits_scale != 1.0:
            x = x * s.logits_scale
        logits = F.linear(x, self.lm_head)
        if self.logits_bias is not None:
            # in the model's dtype, as Hugging Face adds it: rounded there, as its logits are
            # (in float32, kernl broke the exact ties that rounding makes otherwise than HF)
            logits = logits + self.logits_bias
        return logits.float()
