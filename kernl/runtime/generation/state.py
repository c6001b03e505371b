"""Static buffers of one batch bucket and the step functions that read and write them.

Everything a prefill or decode step touches lives here, allocated once at load: the KV cache,
which cache slots hold real tokens, each row's next position, the current slot and step, the
finished flags, the generated ids, the prompt buffers of each prefill bucket and the sampler
parameters. A step is a pure function of these buffers, so it can be captured once as a CUDA
graph and replayed: the host never writes anything between two decode steps."""

from __future__ import annotations

import torch

from kernl.artifacts.generation import MAX_EOS_IDS

from .decoder import Decoder, KVCache
from .sampling import SamplerParams, greedy, sample


class BatchState:
    def __init__(
        self,
        decoder: Decoder,
        batch: int,
        prompts: list[int],
        cache_len: int,
        pad_token_id: int,
        device: torch.device,
        shared: KVCache | None = None,
    ):
        """`shared`: the cache whose storage this bucket's views (`shared_cache`); None: a
        cache of its own."""
        spec = decoder.spec
        self.decoder = decoder
        self.batch = batch
        self.cache_len = cache_len
        long = dict(dtype=torch.int64, device=device)
        self.cache = KVCache.allocate(spec, batch, cache_len, decoder.dtype, device, shared)
        self.kv_valid = torch.zeros(batch, cache_len, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(batch, **long)
        self.greedy_ids = torch.zeros(batch, **long)  # lm_head + argmax writes here
        self.positions = torch.zeros(batch, **long)
        self.slot = torch.zeros(1, **long)
        self.step = torch.zeros(1, **long)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.out = torch.zeros(batch, cache_len, **long)
        self.eos = torch.full((MAX_EOS_IDS,), -1, **long)
        self.pad = torch.full((1,), pad_token_id, **long)
        self.sampler = SamplerParams.allocate(device, batch)
        self.prompt_ids = {p: torch.full((batch, p), pad_token_id, **long) for p in prompts}
        self.prompt_valid = {
            p: torch.zeros(batch, p, dtype=torch.bool, device=device) for p in prompts
        }

    def reset_counters(self) -> None:
        """Before warm-up runs at capture: keep every index inside the cache."""
        self.slot.zero_()
        self.step.zero_()
        self.positions.zero_()
        self.kv_valid.zero_()

    # -- steps (captured as graphs on CUDA) -------------------------------------------------

    def prefill(self, prompt: int, do_sample: bool) -> torch.Tensor:
        ids, valid = self.prompt_ids[prompt], self.prompt_valid[prompt]
        logits = self.decoder.prefill(self.cache, ids, valid)
        # The slots past the prompt hold an earlier request's keys and values (this bucket's,
        # or another's: buckets share one storage). They are masked, but the torch and SDPA
        # decode attentions still read them, and 0 x NaN is NaN: one request that overflowed
        # would turn every later one to NaN. Zeros cost one write of the cache a request
        # (45 GB for Gemma2-9B at 16 x 8192), so only where they are read.
        if self.decoder.reads_masked_slots:
            self.cache.k[:, :, :, prompt:].zero_()
            self.cache.v[:, :, :, prompt:].zero_()
        self.kv_valid[:, :prompt].copy_(valid)
        self.kv_valid[:, prompt:].fill_(False)
        self.positions.copy_(valid.sum(-1))
        self.slot.fill_(prompt)
        self.step.zero_()
        self.finished.copy_(~self.active)
        self._emit(logits, do_sample)
        return logits

    def decode(self, kv_len: int, do_sample: bool) -> torch.Tensor:
        self.kv_valid.index_fill_(1, self.slot, True)
        valid = self.kv_valid[:, :kv_len]
        logits, chose = self.decoder.decode(
            self.cache,
            self.tokens,
            self.positions,
            self.slot,
            valid,
            ids_out=None if do_sample else self.greedy_ids,
        )
        self.positions.add_(1)
        self.slot.add_(1)
        self._emit(logits, do_sample, self.greedy_ids if chose else None)
        return logits

    def _emit(self, logits: torch.Tensor, do_sample: bool, chosen: torch.Tensor | None = None):
        """Choose the next ids (unless the decoder's lm_head kernel already did); finished
        rows emit the pad id (as Hugging Face does); a row finishes on emitting an EOS id."""
        if chosen is not None:
            pass
        elif do_sample:
            chosen = sample(logits, self.sampler, self.step)
        else:
            chosen = greedy(logits)
        chosen = torch.where(self.finished, self.pad, chosen)
        self.out.index_copy_(1, self.step, chosen[:, None])
        self.finished |= (chosen[:, None] == self.eos[None, :]).any(-1)
        self.tokens.copy_(chosen)
        self.step.add_(1)


def shared_cache(
    decoder: Decoder, batches: list[int], cache_len: int, device: torch.device
) -> KVCache | None:
    """The KV cache whose storage every batch bucket but the smallest views (the largest
    bucket's), or None where there is no such bucket. Requests run one at a time (the model's
    lock, which an open stream or batch holds), and the only two buckets ever in use at once
    are a running batch's and the smallest, where its joiners are prefilled (joining.py): that
    one keeps its own. A cache per bucket was 13 rows of cache for buckets 1, 4 and 8 where 9
    serve (Gemma2-9B at 8192 slots and buckets 1, 8, 16: 70 GB of caches where 48 GB serve)."""
    if max(batches) == min(batches):
        return None
    return KVCache.allocate(decoder.spec, max(batches), cache_len, decoder.dtype, device)
