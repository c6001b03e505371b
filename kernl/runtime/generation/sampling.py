"""Choosing the next token inside the captured step: greedy argmax, or sampling with
temperature, top-k and top-p.

Sampling is Gumbel-max (argmax of filtered logits / T plus Gumbel noise, an exact draw from
the softmax) with the noise taken from a counter-based hash of (seed, step, row, token): no
generator state to register with a CUDA graph, the same draws on CPU and GPU, and a seeded
call repeats exactly. The parameters are per-row tensors, so one captured graph serves any
temperature, top-k, top-p and seed, and rows that differ in them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
# The temperatures a sampled row takes (check_options): logits / T in float32 stays finite and
# meaningful. Below, a draw is greedy decoding; above, a uniform draw.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6
# Multipliers below 2**31 so that every product of two 32-bit values fits an int64.
_MIX1, _MIX2 = 0x7FEB352D, 0x2C1B3C6D
_SEED_MUL, _STEP_MUL = 0x5BD1E995, 0x1B873593


@dataclass
class SamplerParams:
    """Static per-row tensors ([batch bucket] each) the host fills before a call: each row
    samples with its own temperature, top-k, top-p and seed, so requests with different
    sampling arguments can share one call (the serving batcher does)."""

    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # int64; vocab size when off
    top_p: torch.Tensor  # float32; 1.0 when off
    seed: torch.Tensor  # int64
    # The row's index among the rows its noise is keyed with: with one seed for the call,
    # each row's own index (the rows are distinct draws); with a seed per row, 0 (each row
    # draws what it would alone with its seed).
    row: torch.Tensor  # int64
    # Subtracted from the call's step for the row's noise: a row that joined a running batch
    # (generation/joining.py) draws at each of its steps what it would alone. 0 otherwise.
    step_offset: torch.Tensor  # int64

    @staticmethod
    def allocate(device, rows: int = 1) -> SamplerParams:
        return SamplerParams(
            temperature=torch.ones(rows, dtype=torch.float32, device=device),
            # off until set(): past any vocabulary (sample clamps it to the vocabulary's size)
            top_k=torch.full((rows,), torch.iinfo(torch.int64).max, device=device),
            top_p=torch.ones(rows, dtype=torch.float32, device=device),
            seed=torch.zeros(rows, dtype=torch.int64, device=device),
            row=torch.arange(rows, dtype=torch.int64, device=device),
            step_offset=torch.zeros(rows, dtype=torch.int64, device=device),
        )

    def set(self, temperature, top_k, top_p, seed, vocab: int) -> None:
        """Each argument one value for every row or a sequence, one per row from the first
        (rows past it, which only fill the bucket, take the defaults); one copy per tensor.
        None is off: temperature and top_p 1.0, top_k the whole vocabulary."""
        rows = self.seed.shape[0]

        def put(buffer: torch.Tensor, value, default, convert) -> None:
            if not isinstance(value, (list, tuple)):  # one value: a fill, no host copy
                buffer.fill_(convert(value))
                return
            values = [convert(v) for v in value] + [convert(default)] * (rows - len(value))
            buffer.copy_(torch.tensor(values, dtype=buffer.dtype))

        def k(v) -> int:
            return int(v) if v and v > 0 else vocab

        def t(v) -> float:  # a greedy call's is never read, and need not fit a float32
            return 1.0 if v is None else min(max(float(v), 1e-30), 1e30)

        put(self.temperature, temperature, 1.0, t)
        put(self.top_k, top_k, vocab, k)
        put(self.top_p, top_p, 1.0, lambda p: 1.0 if p is None else float(p))
        put(self.seed, seed, 0, lambda v: seed_key(int(v)))
        if isinstance(seed, (list, tuple)):
            self.row.zero_()
        else:
            self.row.copy_(torch.arange(rows, device=self.row.device))
        self.step_offset.zero_()

    def copy_row(self, row: int, source: SamplerParams, source_row: int, step_offset: int) -> None:
        """Row `row` takes `source`'s row `source_row` (its own seed: noise keyed as if it
        were alone), its steps counted from `step_offset`."""
        for name in ("temperature", "top_k", "top_p", "seed"):
            getattr(self, name)[row].copy_(getattr(source, name)[source_row])
        self.row[row] = 0
        self.step_offset[row] = step_offset


def call_seed(seed, samples: bool):
    """A call's seed: as given, or, where it gives none (None) and samples, one drawn from
    torch's global CPU generator, as Hugging Face's sampling draws from it: two calls in a
    row differ, and `torch.manual_seed(n)` before a call repeats its draws. A greedy call
    draws nothing (the caller's RNG stream stays where it was, as HF's greedy leaves it)."""
    if seed is not None:
        return seed
    if not samples:
        return 0
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def checked_seed(seed):
    """The seed a call's arguments are checked with before its own is drawn (call_seed, once
    the call is taken): a refused call draws nothing from torch's RNG, as HF checks before it
    samples. A drawn seed is in range, as 0 is."""
    return 0 if seed is None else seed


def seed_key(seed: int) -> int:
    """The 32-bit key a seed in [0, 2**63) draws with. A seed below 2**32 is its own key (the
    draws of earlier versions); higher bits are hashed in rather than dropped, so that seed
    and seed + 2**32 draw differently (2**63 seeds still share 2**32 keys)."""
    return (seed & _MASK32) ^ _fmix32(seed >> 32)


def _fmix32(h):  # a tensor or an int
    h = h ^ (h >> 16)
    h = (h * _MIX1) & _MASK32
    h = h ^ (h >> 15)
    h = (h * _MIX2) & _MASK32
    return h ^ (h >> 16)


def uniform_noise(counter: torch.Tensor, seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Uniform floats in (0, 1), one per element of `counter` ([B, V] int64, distinct within
    a row, e.g. row * vocab + token), a function of (seed, step) only; `seed` holds one value
    or one per row, `step` one value or one per row ([B, 1])."""
    key = _fmix32((seed.view(-1, 1) * _SEED_MUL + step * _STEP_MUL) & _MASK32)
    h = _fmix32((counter ^ key) & _MASK32)
    h = _fmix32((h + key * 3 + 1) & _MASK32)
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    # The top value, (2**24 - 0.5) / 2**24, rounds to 1.0 in float32: its Gumbel noise was
    # +inf, and a token the filters had dropped (-inf) became NaN, which argmax picks (one
    # draw in 2**24: 0.8% of a 128k vocabulary's steps). Clamped, every other draw is kept.
    return u.clamp_(max=1.0 - 1.0 / (1 << 24))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary (first index among equal maxima, like torch.argmax), in two
    stages: one row of 128k logits is a single-block reduction on the GPU (~37 us on an H100),
    while chunks of a few hundred spread over the whole chip."""
    bsz, vocab = logits.shape
    chunk = _chunk_size(vocab)
    if chunk is None:
        return torch.argmax(logits, dim=-1)
    best, where = logits.view(bsz, vocab // chunk, chunk).max(dim=-1)
    which = torch.argmax(best, dim=-1, keepdim=True)  # first chunk holding the maximum
    return (which * chunk + where.gather(-1, which)).squeeze(-1)


def _chunk_size(vocab: int) -> int | None:
    """A divisor of `vocab` near its square root (None for small or prime-ish sizes)."""
    if vocab < 4096:
        return None
    for c in range(int(vocab**0.5), 63, -1):
        if vocab % c == 0:
            return c
    return None


def sample(logits: torch.Tensor, params: SamplerParams, step: torch.Tensor) -> torch.Tensor:
    """logits [B, V]. Per row: temperature, then top-k, then top-p (the smallest set of most
    likely tokens whose probability reaches top_p; the most likely token is always kept), as
    Hugging Face's warpers apply them; then a Gumbel-max draw keyed by (seed, step, row,
    token)."""
    scores = logits.float() / params.temperature[:, None]
    vocab = scores.shape[-1]
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=scores.device)
    # every token tied with the k-th kept, as Hugging Face's top-k keeps it (with fp16/bf16
    # logits ties are common; by rank alone, the tied tokens past k were dropped)
    kth = ordered.gather(-1, (params.top_k.clamp(1, vocab) - 1)[:, None])
    keep = ordered >= kth
    ordered = ordered.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    before = probs.cumsum(-1) - probs  # probability mass strictly ahead of each token
    top_p = params.top_p[:, None]
    keep = keep & ((before < top_p) | (top_p >= 1.0))
    keep[:, 0] = True
    keep = torch.zeros_like(keep).scatter(-1, order, keep)
    scores = scores.masked_fill(~keep, float("-inf"))
    counter = params.row[:, None] * vocab + ranks[None, :]
    steps = (step - params.step_offset).view(-1, 1)  # each row's own step count
    gumbel = -torch.log(-torch.log(uniform_noise(counter, params.seed, steps)))
    return torch.argmax(scores + gumbel, dim=-1)
