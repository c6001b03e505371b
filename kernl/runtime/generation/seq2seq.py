"""Serve an encoder-decoder (seq2seq-lm) artifact: `model.generate(input_ids=..., ...)`.

At load: the weights go to the device once and each batch bucket gets its static buffers
(`_State`: the decoder self-attention KV cache, the cross-attention keys and values for the
longest source bucket, the source ids of each source bucket, the generated ids, the sampler).
A call pads the source on the right into the smallest source bucket (positions stay those of
the caller's columns, as in Hugging Face), runs the encoder once — which also writes every
decoder layer's cross-attention K/V — then one decoder step per new token, starting from the
decoder start token. Steps are pure functions of the buffers; on CUDA they are captured as
graphs on first use (generation/model.py `_Step`)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernl.artifacts.errors import ArtifactCorruptError
from kernl.artifacts.schema import Manifest, pick_size
from kernl.artifacts.seq2seq import Seq2SeqBuckets, Seq2SeqSpec

from .encoder_decoder import EncoderDecoder, Seq2SeqCache
from .model import FINISHED_CHECK_EVERY, _device_of, _generated_length, _Step, check_options
from .sampling import SamplerParams, greedy, sample
from .state import MAX_EOS_IDS


class _State:
    """One batch bucket's static buffers and its two step functions."""

    def __init__(self, model: EncoderDecoder, batch: int, b: Seq2SeqBuckets, pad: int, device):
        spec = model.spec
        long = dict(dtype=torch.int64, device=device)
        self.model = model
        self.cache = Seq2SeqCache.allocate(
            spec, batch, b.cache_len, max(b.sources), model.dtype, device
        )
        self.src_ids = {s: torch.full((batch, s), pad, **long) for s in b.sources}
        self.src_valid = {
            s: torch.zeros(batch, s, dtype=torch.bool, device=device) for s in b.sources
        }
        self.start = torch.full((1,), spec.decoder_start_token_id, **long)
        self.tokens = torch.zeros(batch, **long)
        self.step = torch.zeros(1, **long)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.out = torch.zeros(batch, b.cache_len, **long)
        self.eos = torch.full((MAX_EOS_IDS,), -1, **long)
        self.pad = torch.full((1,), pad, **long)
        self.sampler = SamplerParams.allocate(device)
        self.counter = torch.arange(batch * spec.vocab_size, **long).view(batch, -1)

    def reset_counters(self) -> None:
        self.step.zero_()

    def encode(self, source: int) -> torch.Tensor:
        self.model.encode(self.cache, self.src_ids[source], self.src_valid[source])
        self.tokens.copy_(self.start.expand_as(self.tokens))
        self.step.zero_()
        self.finished.copy_(~self.active)
        return self.tokens

    def decode(self, kv_len: int, source: int, do_sample: bool) -> torch.Tensor:
        logits = self.model.decode(
            self.cache, self.tokens, self.step, kv_len, self.src_valid[source]
        )
        if do_sample:
            chosen = sample(logits, self.sampler, self.step, self.counter)
        else:
            chosen = greedy(logits)
        chosen = torch.where(self.finished, self.pad, chosen)
        self.out.index_copy_(1, self.step, chosen[:, None])
        self.finished |= (chosen[:, None] == self.eos[None, :]).any(-1)
        self.tokens.copy_(chosen)
        self.step.add_(1)
        return logits


@dataclass
class _Plan:
    ids: torch.Tensor  # [batch bucket, source bucket], padded on the right
    valid: torch.Tensor
    batch: int
    batch_bucket: int
    source_bucket: int
    max_new_tokens: int
    do_sample: bool
    eos: list[int]
    pad: int


class Seq2SeqModel:
    """A loaded seq2seq-lm artifact (T5, BART); see `generate`."""

    def __init__(
        self,
        manifest: Manifest,
        weights: dict[str, torch.Tensor],
        device: torch.device,
        capture: str = "lazy",
    ):
        if capture not in ("load", "lazy", "never"):
            raise ValueError(f"capture must be 'load', 'lazy' or 'never', not {capture!r}")
        self.manifest = manifest
        self.device = device
        try:
            self.spec = Seq2SeqSpec.from_dict(manifest.extra["seq2seq"])
            self.buckets = Seq2SeqBuckets.from_dict(manifest.extra["seq2seq_buckets"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactCorruptError(
                f"the manifest's seq2seq description is invalid: {type(e).__name__}: {e}"
            ) from None
        self.dtype = getattr(torch, manifest.dtype)
        # Graphs are captured on first use ("load" captures nothing more up front).
        self.capture_mode = capture if device.type == "cuda" else "never"
        self._pool = torch.cuda.graph_pool_handle() if self.capture_mode != "never" else None
        self._lock = threading.Lock()
        spec = self.spec
        self.default_pad = (
            spec.pad_token_id
            if spec.pad_token_id is not None
            else (spec.eos_token_ids[0] if spec.eos_token_ids else 0)
        )
        self.model = EncoderDecoder(spec, weights, self.dtype, device)
        self._states = {
            b: _State(self.model, b, self.buckets, self.default_pad, device)
            for b in self.buckets.batches
        }
        self._steps: dict[tuple, _Step] = {}

    def generate(
        self,
        input_ids,
        attention_mask=None,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """Like Hugging Face's encoder-decoder `generate`: returns [batch, 1 + new] ids, the
        decoder start token followed by the new tokens; a row that emitted an EOS id is padded
        with `pad_token_id` until every row has finished or `max_new_tokens` (default 20) were
        produced. `attention_mask` zeros mark source padding; a list of token lists is padded
        on the right. Sampling (`do_sample=True`) applies temperature, top-k, top-p; the same
        `seed` gives the same ids. Raises ValueError, leaving the model usable, for a source
        longer than every source bucket or more new tokens than the decoder cache holds."""
        ids, mask = _as_source(input_ids, attention_mask)
        max_new_tokens = 20 if max_new_tokens is None else max_new_tokens
        plan = self._plan(
            ids,
            mask,
            max_new_tokens,
            do_sample,
            temperature,
            top_k,
            top_p,
            eos_token_id,
            pad_token_id,
            seed,
        )
        with self._lock:
            state = self._states[plan.batch_bucket]
            state.src_ids[plan.source_bucket].copy_(plan.ids)
            state.src_valid[plan.source_bucket].copy_(plan.valid)
            state.active.copy_(torch.arange(plan.batch_bucket) < plan.batch)
            eos = torch.full((MAX_EOS_IDS,), -1, dtype=torch.int64)
            eos[: len(plan.eos)] = torch.tensor(plan.eos, dtype=torch.int64)
            state.eos.copy_(eos)
            state.pad.fill_(plan.pad)
            state.sampler.set(temperature, top_k, top_p, seed, self.spec.vocab_size)
            self._step(("encode", plan.batch_bucket, plan.source_bucket)).run()
            n = 0
            for n in range(1, plan.max_new_tokens + 1):
                kv = pick_size(self.buckets.caches, n)  # this step writes slot n - 1
                key = ("decode", plan.batch_bucket, kv, plan.source_bucket, plan.do_sample)
                self._step(key).run()
                if plan.eos and n % FINISHED_CHECK_EVERY == 0:
                    if bool(state.finished[: plan.batch].all()):
                        break
            new = state.out[: plan.batch, :n].to("cpu", copy=True)
        new = new[:, : _generated_length(new, plan.eos)]
        start = torch.full((plan.batch, 1), self.spec.decoder_start_token_id, dtype=torch.int64)
        return torch.cat([start, new], dim=1).to(_device_of(input_ids))

    def __repr__(self) -> str:
        b = self.buckets
        return (
            f"Seq2SeqModel({self.manifest.model_type}, {self.manifest.dtype}, "
            f"device={self.device}, batch={b.batches}, source={b.sources}, cache={b.caches})"
        )

    # -- internals --------------------------------------------------------------------------

    def _plan(
        self,
        ids,
        mask,
        max_new_tokens,
        do_sample,
        temperature,
        top_k,
        top_p,
        eos_token_id,
        pad_token_id,
        seed,
    ) -> _Plan:
        """Check a request and pick its buckets before touching any state."""
        b, vocab = self.buckets, self.spec.vocab_size
        check_options(
            max_new_tokens,
            do_sample,
            temperature,
            top_k,
            top_p,
            eos_token_id,
            pad_token_id,
            seed,
            vocab,
        )
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab}); got values in [{lo}, {hi}]")
        empty = [i for i in range(ids.shape[0]) if not bool(mask[i].any())]
        if empty:
            raise ValueError(f"row(s) {empty} of the batch have no tokens (attention_mask all 0)")
        batch = ids.shape[0]
        # Columns after the last real token of every row are padding: drop them.
        length = int(mask.any(0).nonzero().max()) + 1
        batch_bucket = pick_size(b.batches, batch)
        if batch_bucket is None:
            raise ValueError(
                f"a batch of {batch} sources is larger than every batch bucket of this "
                f"artifact ({b.batches}); split the batch or recompile with a larger one"
            )
        source_bucket = pick_size(b.sources, length)
        if source_bucket is None:
            raise ValueError(
                f"a source of {length} tokens is longer than every source bucket of this "
                f"artifact ({b.sources}); shorten it or recompile with a longer source bucket"
            )
        if max_new_tokens > b.cache_len:
            raise ValueError(
                f"max_new_tokens {max_new_tokens} exceeds the decoder cache of {b.cache_len} "
                f"slots (recompile with a larger cache= to go further)"
            )
        eos = self.spec.eos_token_ids if eos_token_id is None else eos_token_id
        eos = [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
        if len(eos) > MAX_EOS_IDS:
            raise ValueError(f"at most {MAX_EOS_IDS} EOS ids are supported, got {len(eos)}")
        pad = self.default_pad if pad_token_id is None else int(pad_token_id)
        padded = torch.full((batch_bucket, source_bucket), self.default_pad, dtype=torch.int64)
        valid = torch.zeros(batch_bucket, source_bucket, dtype=torch.bool)
        padded[:batch, :length] = ids[:, :length]
        valid[:batch, :length] = mask[:, :length]
        valid[batch:, 0] = True  # rows that only fill the bucket: one token each
        return _Plan(
            padded, valid, batch, batch_bucket, source_bucket, max_new_tokens, do_sample, eos, pad
        )

    def _step(self, key: tuple) -> _Step:
        step = self._steps.get(key)
        if step is None:
            state = self._states[key[1]]
            if key[0] == "encode":
                fn = lambda: state.encode(key[2])  # noqa: E731
            else:
                fn = lambda: state.decode(key[2], key[3], key[4])  # noqa: E731
            step = _Step(fn, state.reset_counters)
            if self.capture_mode != "never":
                step.capture(self._pool, self.device)
            self._steps[key] = step
        return step


def _as_source(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, S] int64 on the CPU, mask [B, S] bool); ragged lists are padded on the right."""
    if (
        isinstance(input_ids, (list, tuple))
        and input_ids
        and isinstance(input_ids[0], (list, tuple))
    ):
        if attention_mask is not None:
            raise ValueError("attention_mask is not used with a list of token lists")
        longest = max(len(r) for r in input_ids)
        if longest == 0:
            raise ValueError("input_ids holds no tokens")
        ids = torch.zeros(len(input_ids), longest, dtype=torch.int64)
        mask = torch.zeros(len(input_ids), longest, dtype=torch.bool)
        for i, r in enumerate(input_ids):
            ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.int64)
            mask[i, : len(r)] = True
        return ids, mask
    ids = torch.as_tensor(input_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integers, got {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"input_ids must be [batch, source] and not empty, got {tuple(ids.shape)}")
    ids = ids.to("cpu", torch.int64)
    if attention_mask is None:
        return ids, torch.ones_like(ids, dtype=torch.bool)
    mask = torch.as_tensor(attention_mask)
    if mask.dim() == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}, input_ids has {tuple(ids.shape)}"
        )
    return ids, mask.to("cpu").bool()
