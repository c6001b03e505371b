"""Serve an encoder-decoder artifact: `model.generate(input_ids=..., ...)` and `model.stream(...)`
for seq2seq-lm (T5, BART, mBART, Marian); Whisper's speech-seq2seq builds on it in
generation/speech.py.

At load: the weights go to the device once and each batch bucket gets its static buffers
(`_State`: the decoder self-attention KV cache, the cross-attention keys and values for the
longest source bucket, the source of each source bucket, the decoder prompt, the generated
ids, the sampler). A call pads the source on the right into the smallest source bucket
(positions stay those of the caller's columns, as in Hugging Face), runs the encoder once —
which also writes every decoder layer's cross-attention K/V — then one decoder step per token
after the decoder start token: the first steps feed the rest of the prompt (Whisper's language
and task tokens; mBART-50's forced target-language token), the others choose a new token.
Steps are pure functions of the buffers; on CUDA they are captured as graphs on first use
(generation/model.py `_Step`)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kernl.artifacts.errors import ArtifactCorruptError
from kernl.artifacts.generation_defaults import generation_defaults_of
from kernl.artifacts.schema import Manifest, pick_size
from kernl.artifacts.seq2seq import (
    MAX_PROMPT,
    Seq2SeqBuckets,
    Seq2SeqSpec,
    SpeechSpec,
    speech_with_names,
)

from ..binaries import KernelBinaries, running_with
from ..model import new_call_lock
from .config_defaults import takes_generation_defaults
from .encoder_decoder import EncoderDecoder, Seq2SeqCache
from .hf_options import LENGTH_IS_A_BOUND, refuse_hf_options
from .model import (
    MODEL_DEFAULT,
    StepLoop,
    _as_batch,
    _device_of,
    _generated_length,
    _new_tokens,
    _Step,
    asked_length,
    check_options,
    main_input,
    plain_numbers,
    take_decoder_start,
)
from .sampling import SamplerParams, call_seed, checked_seed, greedy, sample
from .state import MAX_EOS_IDS


class _State:
    """One batch bucket's static buffers and its two step functions."""

    def __init__(
        self,
        model: EncoderDecoder,
        batch: int,
        b: Seq2SeqBuckets,
        pad: int,
        device,
        speech: SpeechSpec | None,
        shared: Seq2SeqCache | None = None,
    ):
        """`shared`: the largest bucket's cache, whose storage this bucket's views (requests
        run one at a time, under the model's lock, so no bucket's cache outlives its request:
        buckets 1, 8, 16 and 32 of Whisper-large-v3 held 57 rows of cross-attention K/V, 14
        GB, where 32 serve); None: a cache of its own."""
        spec = model.spec
        long = dict(dtype=torch.int64, device=device)
        self.model = model
        self.speech = speech
        self.cache = Seq2SeqCache.allocate(
            spec, batch, b.cache_len, max(b.sources), model.dtype, device, shared
        )
        self.src_valid = {
            s: torch.zeros(batch, s, dtype=torch.bool, device=device) for s in b.sources
        }
        if speech is None:
            self.src_ids = {s: torch.full((batch, s), pad, **long) for s in b.sources}
            # The single-token bad_words_ids (Marian's pad): never generated, except the
            # request's EOS ids, which Hugging Face's NoBadWordsLogitsProcessor drops from the
            # bad words (`exempt_eos` writes this mask per request).
            self.suppress = (
                _vocab_mask(spec.suppress_tokens, spec.vocab_size, device)
                if spec.suppress_tokens
                else None
            )
            self.exempt: tuple[int, ...] = ()  # the bad words `suppress` lets through
        else:  # one 30 s window of log-mel features; every encoder position is attended
            shape = (batch, spec.num_mel_bins, spec.frames)
            self.features = torch.zeros(shape, dtype=model.dtype, device=device)
            self.src_valid[spec.source_positions].fill_(True)
            self._masks(speech, spec.vocab_size, batch, device)
        # The decoder prompt: tokens forced at positions < prompt_len (position 0: the start).
        self.prompt = torch.full((batch, MAX_PROMPT), spec.decoder_start_token_id, **long)
        self.prompt_len = torch.ones(1, **long)
        self.tokens = torch.zeros(batch, **long)
        self.step = torch.zeros(1, **long)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.out = torch.zeros(batch, b.cache_len, **long)  # out[:, n]: the token at n + 1
        self.eos = torch.full((MAX_EOS_IDS,), -1, **long)
        # The step position forced to `forced_eos` (the request's last token; -1: none).
        self.forced_eos_at = torch.full((1,), -1, **long)
        self.forced_eos = torch.full((1,), spec.forced_eos_token_id or 0, **long)
        self.pad = torch.full((1,), pad, **long)
        self.sampler = SamplerParams.allocate(device, batch)

    def exempt_eos(self, eos: list[int]) -> None:
        """Suppress the bad words but the request's EOS ids (a bad word that is an EOS id can
        end a row in Hugging Face's generate: its NoBadWordsLogitsProcessor filters the call's
        EOS ids out of bad_words_ids; suppress_tokens have no such exception). The mask is
        rewritten in place, where the captured steps read it, only when that set changes."""
        if self.suppress is None:
            return
        spec = self.model.spec
        exempt = tuple(sorted(set(eos) & set(spec.suppress_tokens)))
        if exempt == self.exempt:
            return
        kept = [t for t in spec.suppress_tokens if t not in exempt]
        self.suppress.copy_(_vocab_mask(kept, spec.vocab_size, self.suppress.device))
        self.exempt = exempt

    def _masks(self, speech: SpeechSpec, vocab: int, batch: int, device) -> None:
        self.suppress = _vocab_mask(speech.suppress_tokens, vocab, device)
        self.begin_suppress = _vocab_mask(speech.begin_suppress_tokens, vocab, device)
        langs = speech.lang_to_id.values()
        self.languages = _vocab_mask(langs, vocab, device) if speech.lang_to_id else None
        self.detect = torch.zeros(batch, dtype=torch.bool, device=device)

    def reset_counters(self) -> None:
        self.step.zero_()

    def encode(self, source: int) -> torch.Tensor:
        # An earlier request's self-attention keys and values (any bucket's: they share one
        # storage) sit under the slots each decode step masks; 0 x NaN is NaN, so they go.
        self.cache.self_kv.zero_()
        if self.speech is None:
            self.model.encode(self.cache, self.src_ids[source], self.src_valid[source])
        else:
            self.model.encode_features(self.cache, self.features)
        self.tokens.copy_(self.prompt[:, 0])
        self.step.zero_()
        self.finished.copy_(~self.active)
        return self.tokens

    def decode(self, kv_len: int, source: int, do_sample: bool) -> torch.Tensor:
        """One step; the model's raw logits, as Hugging Face's `output_logits` gives them (the
        suppressed tokens and forced ids apply to the choice alone)."""
        logits = raw = self.model.decode(
            self.cache, self.tokens, self.step, kv_len, self.src_valid[source]
        )
        nxt = self.step + 1  # the position of the token this step chooses
        if self.speech is not None:
            logits = self._whisper_rules(logits, nxt)
        elif self.suppress is not None:
            logits = logits.masked_fill(self.suppress, float("-inf"))
        chosen = sample(logits, self.sampler, self.step) if do_sample else None
        chosen = greedy(logits) if chosen is None else chosen
        prompting = nxt < self.prompt_len
        # Prompt tokens after the start (Whisper's; mBART's forced BOS) replace the choice.
        forced = self.prompt.index_select(1, nxt.clamp(max=MAX_PROMPT - 1))[:, 0]
        chosen = torch.where(prompting, forced, chosen)
        if self.model.spec.forced_eos_token_id is not None:  # (no kernel spent otherwise)
            chosen = torch.where(nxt == self.forced_eos_at, self.forced_eos, chosen)
        chosen = torch.where(self.finished, self.pad, chosen)
        self.out.index_copy_(1, self.step, chosen[:, None])
        ended = (chosen[:, None] == self.eos[None, :]).any(-1)
        if self.speech is not None:  # Whisper's prompt is input; a forced BOS is output (HF)
            ended &= ~prompting
        self.finished |= ended
        self.tokens.copy_(chosen)
        self.step.add_(1)
        return raw

    def _whisper_rules(self, logits: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """Language detection (Hugging Face's detect_language: the most likely language token
        after the start token, before any suppression) fills prompt slot 1 of the rows that
        asked for it; then suppress_tokens always, begin_suppress_tokens at the first new
        token (SuppressTokens[AtBegin]LogitsProcessor)."""
        if self.languages is not None:
            lang = logits.masked_fill(~self.languages, float("-inf")).argmax(-1)
            fill = self.detect & (self.step == 0)
            self.prompt[:, 1].copy_(torch.where(fill, lang, self.prompt[:, 1]))
        logits = logits.masked_fill(self.suppress, float("-inf"))
        begin = self.begin_suppress & (nxt == self.prompt_len)
        return logits.masked_fill(begin, float("-inf"))


@dataclass
class _Plan:
    batch: int
    batch_bucket: int
    source_bucket: int
    source: dict[str, torch.Tensor]  # buffer name -> [batch bucket, ...] on the CPU
    prompt: torch.Tensor  # [batch bucket, MAX_PROMPT] int64
    prompt_len: int
    max_new_tokens: int
    do_sample: bool
    sampler: tuple  # temperature, top_k, top_p, seed
    eos: list[int]
    pad: int
    # the generation config's length was cut to the cache (_check_cache): HF's forced EOS
    # comes at the uncut length, past the last step here, so none is forced
    length_cut: bool = False

    @property
    def steps(self) -> int:
        return self.prompt_len - 1 + self.max_new_tokens


def _vocab_mask(ids, vocab: int, device) -> torch.Tensor:
    """[vocab] bool, True at `ids`."""
    m = torch.zeros(vocab, dtype=torch.bool)
    m[list(ids)] = True
    return m.to(device)


class Seq2SeqModel(StepLoop):
    """A loaded seq2seq-lm artifact (T5, BART, mBART, Marian); see `generate` and `stream`."""

    def __init__(
        self,
        manifest: Manifest,
        weights: dict[str, torch.Tensor],
        device: torch.device,
        capture: str = "lazy",
        binaries: KernelBinaries | None = None,
    ):
        if capture not in ("load", "lazy", "never"):
            raise ValueError(f"capture must be 'load', 'lazy' or 'never', not {capture!r}")
        self.manifest = manifest
        self.device = device
        # what generate/stream take where a call leaves them out (config_defaults.py)
        self.generation_defaults = generation_defaults_of(manifest.extra)
        self._binaries = binaries  # the decode step's kernl kernels, when it runs them
        try:
            self.spec = Seq2SeqSpec.from_dict(manifest.extra["seq2seq"])
            self.buckets = Seq2SeqBuckets.from_dict(manifest.extra["seq2seq_buckets"])
            speech = speech_with_names(manifest.extra)
            self.speech = SpeechSpec.from_dict(speech) if speech is not None else None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactCorruptError(
                f"the manifest's seq2seq description is invalid: {type(e).__name__}: {e}"
            ) from None
        if (self.speech is not None) != (manifest.task == "speech-seq2seq"):
            raise ArtifactCorruptError(
                f"the manifest's seq2seq description is invalid: task {manifest.task} with "
                f"model family {self.spec.family}"
            )
        self.dtype = getattr(torch, manifest.dtype)
        # Graphs are captured on first use ("load" captures nothing more up front).
        self.capture_mode = capture if device.type == "cuda" else "never"
        self._pool = torch.cuda.graph_pool_handle() if self.capture_mode != "never" else None
        self._lock = new_call_lock(self)
        spec = self.spec
        self.default_pad = (
            spec.pad_token_id
            if spec.pad_token_id is not None
            else (spec.eos_token_ids[0] if spec.eos_token_ids else 0)
        )
        self.model = EncoderDecoder(spec, weights, self.dtype, device)
        b = self.buckets
        largest = Seq2SeqCache.allocate(
            spec, max(b.batches), b.cache_len, max(b.sources), self.dtype, device
        )
        self._states = {
            n: _State(self.model, n, b, self.default_pad, device, self.speech, largest)
            for n in b.batches
        }
        self._steps: dict[tuple, _Step] = {}

    @takes_generation_defaults
    @plain_numbers
    def generate(
        self,
        input_ids=None,
        attention_mask=None,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 50,
        top_p: float | Sequence[float] = 1.0,
        eos_token_id: int | Sequence[int] | None = MODEL_DEFAULT,
        pad_token_id: int | None = MODEL_DEFAULT,
        seed: int | Sequence[int] | None = None,
        forced_bos_token_id: int | None = MODEL_DEFAULT,
        max_length: int | None = None,
        **hf_options: Any,
    ) -> torch.Tensor:
        """Like Hugging Face's encoder-decoder `generate`: returns [batch, 1 + new] ids, the
        decoder start token followed by the new tokens; a row that emitted an EOS id is padded
        with `pad_token_id` until every row has finished or `max_new_tokens` (default 20) were
        produced. `eos_token_id` and `pad_token_id` default to the model's (a model without a
        pad id pads with the first EOS id); as in Hugging Face, an explicit None is a value,
        not the default: `eos_token_id=None` stops at no EOS id, `pad_token_id=None` pads with
        the first EOS id. `attention_mask` zeros mark source padding; a list of token lists is
        padded on the right. `forced_bos_token_id` (default: the model's, e.g. mBART-50's
        target language; None: none, as in Hugging Face) is the first new token and the
        model's forced EOS id (mBART, Marian) the last one `max_new_tokens` allows, as in
        Hugging Face. Sampling (`do_sample=True`)
        applies temperature, top-k, top-p; the same `seed` gives the same ids (each of the
        four one value or a list of one per row, as for the causal LM; without a seed, one
        is drawn from torch's RNG, as there). `max_length`, as in
        Hugging Face, counts the decoder start token (max_length - 1 new tokens);
        `max_new_tokens` wins when both are given. `input_ids` may be passed as `inputs`.
        Raises ValueError, leaving the model usable, for a source longer than every source
        bucket or more new tokens than the decoder cache holds."""
        input_ids = main_input("generate", input_ids, hf_options)
        take_decoder_start(
            "generate",
            hf_options,
            self.spec.decoder_start_token_id,
            _rows(input_ids),
            decoder_ids=True,
        )
        refuse_hf_options("generate", hf_options)
        plan = self._text_plan(
            input_ids,
            attention_mask,
            max_new_tokens,
            do_sample,
            (temperature, top_k, top_p, seed),
            eos_token_id,
            pad_token_id,
            forced_bos_token_id,
            max_length,
        )
        new = self._generate(plan)
        new = new[:, : _generated_length(new, plan.eos)]
        start = torch.full((plan.batch, 1), self.spec.decoder_start_token_id, dtype=torch.int64)
        return torch.cat([start, new], dim=1).to(_device_of(input_ids))

    @takes_generation_defaults
    @plain_numbers
    def stream(
        self,
        input_ids=None,
        attention_mask=None,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 50,
        top_p: float | Sequence[float] = 1.0,
        eos_token_id: int | Sequence[int] | None = MODEL_DEFAULT,
        pad_token_id: int | None = MODEL_DEFAULT,
        seed: int | Sequence[int] | None = None,
        output_logits: bool = False,
        forced_bos_token_id: int | None = MODEL_DEFAULT,
        max_length: int | None = None,
        **hf_options: Any,
    ) -> Iterator:
        """The same generation, yielding each step's new ids ([batch] on the CPU) as they come
        (with `output_logits`, pairs of ids and that step's float32 logits [batch, vocab]: the
        model's raw logits, as Hugging Face's `output_logits`, before suppressed or forced ids);
        stops after the step where every row has finished. Arguments are checked before this
        returns; the model serves nothing else until the iterator is exhausted or closed."""
        input_ids = main_input("stream", input_ids, hf_options)
        take_decoder_start(
            "stream",
            hf_options,
            self.spec.decoder_start_token_id,
            _rows(input_ids),
            decoder_ids=True,
        )
        refuse_hf_options("stream", hf_options)
        plan = self._text_plan(
            input_ids,
            attention_mask,
            max_new_tokens,
            do_sample,
            (temperature, top_k, top_p, seed),
            eos_token_id,
            pad_token_id,
            forced_bos_token_id,
            max_length,
        )
        return self._stream(plan, output_logits)

    def __repr__(self) -> str:
        b = self.buckets
        return (
            f"{type(self).__name__}({self.manifest.model_type}, {self.manifest.dtype}, "
            f"device={self.device}, batch={b.batches}, source={b.sources}, cache={b.caches})"
        )

    # -- the step loop ----------------------------------------------------------------------

    def _generate(self, plan: _Plan) -> torch.Tensor:
        """[batch, steps run] the tokens at positions 1, 2, ... (the prompt's included)."""
        self._refuse_reentry()
        with self._lock:
            return self._collect(plan, self._start(plan), first=plan.prompt_len)

    def _stream(self, plan: _Plan, output_logits: bool) -> Iterator:
        start = lambda: self._start(plan)  # noqa: E731
        # Whisper's prompt is not part of its output; a forced BOS is a new token (as in HF).
        skip = plan.prompt_len - 1 if self.speech is not None else 0
        return self._stream_steps(plan, start, output_logits, steps=plan.steps, skip=skip)

    def _start(self, plan: _Plan) -> _State:
        """Write the request into its batch bucket's buffers (one copy per buffer)."""
        state = self._states[plan.batch_bucket]
        for name, value in plan.source.items():
            buffer = getattr(state, name)
            (buffer[plan.source_bucket] if isinstance(buffer, dict) else buffer).copy_(value)
        state.prompt.copy_(plan.prompt.clamp(min=0))
        state.prompt_len.fill_(plan.prompt_len)
        if state.speech is not None:
            state.detect.copy_(plan.prompt[:, 1] < 0)
        state.active.copy_(torch.arange(plan.batch_bucket) < plan.batch)
        eos = torch.full((MAX_EOS_IDS,), -1, dtype=torch.int64)
        eos[: len(plan.eos)] = torch.tensor(plan.eos, dtype=torch.int64)
        state.eos.copy_(eos)
        if state.speech is None:
            state.exempt_eos(plan.eos)
        forced_eos = self.spec.forced_eos_token_id is not None and state.speech is None
        forced_eos = forced_eos and not plan.length_cut
        state.forced_eos_at.fill_(plan.steps if forced_eos else -1)
        state.pad.fill_(plan.pad)
        state.sampler.set(*plan.sampler, self.spec.vocab_size)
        return state

    def _run(self, plan: _Plan, state: _State) -> Iterator[torch.Tensor]:
        """Replay the encoder, then one decoder step per token after the start token; yields
        each step's logits (device memory that the next step overwrites)."""
        bb, src = plan.batch_bucket, plan.source_bucket
        encode = self._step(("encode", bb, src))
        # Every step graph this request replays is captured before the encoder's replay: a
        # capture's warm-up runs the step for real (tokens, finished rows, cache slots), and
        # the encoder's replay is what puts the request's own state back.
        decodes = {
            kv: self._step(("decode", bb, kv, src, plan.do_sample))
            for kv in sorted({pick_size(self.buckets.caches, n) for n in range(1, plan.steps + 1)})
        }
        encode.run()
        for n in range(1, plan.steps + 1):
            yield decodes[pick_size(self.buckets.caches, n)].run()  # writes slot n - 1

    def _step(self, key: tuple) -> _Step:
        step = self._steps.get(key)
        if step is None:
            state = self._states[key[1]]
            if key[0] == "encode":
                fn = lambda: state.encode(key[2])  # noqa: E731
            else:
                fn = lambda: state.decode(key[2], key[3], key[4])  # noqa: E731
            # not the bound self._running: the model would hold itself in a cycle (its steps
            # -> the method -> the model), freed by gc only, so `del model` kept its memory
            running = functools.partial(running_with, self._binaries, self.device)
            step = _Step(fn, state.reset_counters, running)
            if self.capture_mode != "never":
                step.capture(self._pool, self.device)
            self._steps[key] = step
        return step

    # -- requests ---------------------------------------------------------------------------

    def _check(self, batch, max_new_tokens, do_sample, sampler, eos_token_id, pad_token_id):
        """The options shared by text and speech; returns (batch bucket, eos ids, pad id).
        `eos_token_id`/`pad_token_id` MODEL_DEFAULT: the model's (a model without a pad id:
        the first EOS id of the call, as Hugging Face's `_prepare_special_tokens`); None:
        Hugging Face's None (no EOS id; the pad id is the first EOS id)."""
        temperature, top_k, top_p, seed = sampler
        check_options(
            max_new_tokens,
            do_sample,
            temperature,
            top_k,
            top_p,
            None if eos_token_id is MODEL_DEFAULT else eos_token_id,
            None if pad_token_id is MODEL_DEFAULT else pad_token_id,
            seed,
            self.spec.vocab_size,
            batch,
        )
        batch_bucket = pick_size(self.buckets.batches, batch)
        if batch_bucket is None:
            raise ValueError(
                f"a batch of {batch} sources is larger than every batch bucket of this "
                f"artifact ({self.buckets.batches}); split the batch or recompile with a "
                "larger one"
            )
        if eos_token_id is MODEL_DEFAULT:
            eos = self.spec.eos_token_ids
        else:
            eos = [] if eos_token_id is None else eos_token_id
        eos = [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
        if len(eos) > MAX_EOS_IDS:
            raise ValueError(f"at most {MAX_EOS_IDS} EOS ids are supported, got {len(eos)}")
        if pad_token_id is MODEL_DEFAULT and self.spec.pad_token_id is not None:
            pad = self.spec.pad_token_id
        elif pad_token_id is MODEL_DEFAULT or pad_token_id is None:
            pad = eos[0] if eos else self.default_pad  # without EOS ids no row is padded
        else:
            pad = int(pad_token_id)
        return batch_bucket, eos, pad

    def _check_cache(self, prompt_len: int, max_new_tokens: int, asked: str | None = None) -> int:
        """`max_new_tokens` where the decoder cache holds them; a length from the generation
        config (LENGTH_IS_A_BOUND, kernl.optimize's) is cut to what it holds, with a warning,
        as on the causal LM; one a call asks for is refused with the room there is."""
        # The cache holds the tokens after the decoder start token: the rest of the prompt
        # (Whisper's language, task, ...) and the new tokens.
        cache = self.buckets.cache_len
        if prompt_len - 1 >= cache:  # an older Whisper artifact: the prompt fills the cache
            raise ValueError(
                f"the decoder cache (cache={cache}) has no room after this call's "
                f"{prompt_len}-token decoder prompt; recompile with a larger cache="
            )
        room = cache - prompt_len + 1
        if max_new_tokens > room and LENGTH_IS_A_BOUND.get() is not None:
            warnings.warn(
                f"{LENGTH_IS_A_BOUND.get()} asks for up to {max_new_tokens} new tokens; this "
                f"artifact's decoder cache of {cache} holds {room} after this call's decoder "
                "prompt: generating at most that many (pass max_new_tokens, or recompile with "
                "a larger cache=)",
                stacklevel=5,
            )
            return room
        if prompt_len - 1 + max_new_tokens > cache:
            prompt = (
                f", less the {prompt_len - 1} decoder prompt tokens after the start token"
                if prompt_len > 1
                else ""
            )
            raise ValueError(
                f"{asked or f'max_new_tokens {max_new_tokens}'} exceeds the decoder cache: it holds "
                f"{cache - prompt_len + 1} new tokens (cache={cache}{prompt}); recompile with a "
                "larger cache= to go further"
            )
        return max_new_tokens

    def _text_plan(
        self,
        input_ids,
        attention_mask,
        max_new_tokens,
        do_sample,
        sampler,
        eos_id,
        pad_id,
        bos,
        max_length=None,
    ) -> _Plan:
        """Check a request and pick its buckets before touching any state. A seed of None
        (sampler's last) is drawn once the request is checked: a refused call draws nothing
        from torch's RNG (nor does one refused for re-entry, checked here first)."""
        self._refuse_reentry()
        seed, sampler = sampler[3], (*sampler[:3], checked_seed(sampler[3]))
        if input_ids is None:
            raise TypeError("input_ids is required: the source token ids [batch, length]")
        ids, mask = _as_batch(input_ids, attention_mask, left=False)
        new = _new_tokens(max_new_tokens, max_length, 1, "the decoder start token")
        asked = asked_length(max_new_tokens, max_length, new)
        batch = ids.shape[0]
        bb, eos, pad = self._check(batch, new, do_sample, sampler, eos_id, pad_id)
        vocab = self.spec.vocab_size
        bos = self.spec.forced_bos_token_id if bos is MODEL_DEFAULT else bos
        if bos is not None and not (isinstance(bos, int) and 0 <= bos < vocab):
            raise ValueError(f"forced_bos_token_id must be a token id in [0, {vocab}), got {bos!r}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab}); got values in [{lo}, {hi}]")
        empty = [i for i in range(batch) if not bool(mask[i].any())]
        if empty:
            raise ValueError(f"row(s) {empty} of the batch have no tokens (attention_mask all 0)")
        # Columns after the last real token of every row are padding: drop them.
        length = int(mask.any(0).nonzero().max()) + 1
        source_bucket = pick_size(self.buckets.sources, length)
        if source_bucket is None:
            raise ValueError(
                f"a source of {length} tokens is longer than every source bucket of this "
                f"artifact ({self.buckets.sources}); shorten it or recompile with a longer "
                "source bucket"
            )
        max_new_tokens = self._check_cache(1, new, asked)
        padded = torch.full((bb, source_bucket), self.default_pad, dtype=torch.int64)
        valid = torch.zeros(bb, source_bucket, dtype=torch.bool)
        padded[:batch, :length] = ids[:, :length]
        valid[:batch, :length] = mask[:, :length]
        valid[batch:, 0] = True  # rows that only fill the bucket: one token each
        prompt = torch.full((bb, MAX_PROMPT), self.spec.decoder_start_token_id)
        prompt_len = 1
        if bos is not None:  # the first new token is forced: a two-token prompt
            prompt[:, 1], prompt_len = bos, 2
        source = {"src_ids": padded, "src_valid": valid}
        sampler = (*sampler[:3], call_seed(seed, do_sample is True))
        return _Plan(
            batch,
            bb,
            source_bucket,
            source,
            prompt,
            prompt_len,
            max_new_tokens - prompt_len + 1,
            do_sample,
            sampler,
            eos,
            pad,
            length_cut=max_new_tokens < new,
        )


def _rows(source) -> int | None:
    """The call's number of rows, where its source already says (its checks come later): one
    for a single sequence (a 1-D tensor or a flat list of ids, taken as one row)."""
    if isinstance(source, torch.Tensor):
        return 1 if source.ndim == 1 else (source.shape[0] if source.ndim else None)
    if isinstance(source, (list, tuple)):
        flat = bool(source) and not isinstance(source[0], (list, tuple, torch.Tensor))
        return 1 if flat else len(source)
    return None
