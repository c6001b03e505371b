"""Serve a Whisper (speech-seq2seq) artifact: `model.generate(input_features=...)` and
`model.stream(input_features=...)` for one 30 s window per row.

The encoder, the static buffers and the step loop are generation/seq2seq.py's; this file holds
what Whisper's generate does on the host, as Hugging Face's WhisperGenerationMixin does it for
a window without timestamps: the decoder prompt (`<|startoftranscript|>`, then the language,
the task and `<|notimestamps|>` from the generation config or the caller's `language`/`task`;
a multilingual model told no language detects it per row from the first step's logits), and
the result: the new tokens only, each row cut before its EOS and right-padded with the pad id
to the longest. suppress_tokens and begin_suppress_tokens are applied inside the step."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from kernl.artifacts.seq2seq import DETECT, MAX_PROMPT, forced_ids_follow_prompt
from kernl.artifacts.speech_prompt import decoder_prompt, resolved_call

from .config_defaults import takes_generation_defaults
from .hf_options import LENGTH_IS_A_BOUND, refuse_hf_options, shown_value
from .model import (
    MODEL_DEFAULT,
    _generated_length,
    _is_number,
    asked_length,
    main_input,
    plain_numbers,
    take_decoder_start,
)
from .sampling import call_seed, checked_seed
from .seq2seq import Seq2SeqModel, _Plan


class SpeechSeq2SeqModel(Seq2SeqModel):
    """A loaded speech-seq2seq artifact (Whisper); see `generate` and `stream`."""

    @takes_generation_defaults
    @plain_numbers
    def generate(
        self,
        input_features=None,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | Sequence[float] | None = None,
        top_k: int | Sequence[int] = 50,
        top_p: float | Sequence[float] = 1.0,
        eos_token_id: int | Sequence[int] | None = MODEL_DEFAULT,
        pad_token_id: int | None = MODEL_DEFAULT,
        seed: int | Sequence[int] | None = None,
        language: str | Sequence[str] | None = None,
        task: str | None = None,
        return_timestamps: bool | None = None,
        max_length: int | None = None,
        attention_mask=None,
        forced_decoder_ids: Any = MODEL_DEFAULT,
        **hf_options: Any,
    ) -> torch.Tensor:
        """Like Hugging Face's Whisper `generate` on features of at most 30 s: `input_features`
        [batch, n_mels, 3000] (a feature extractor's output; shorter audio is padded to the
        window there) gives [batch, new] ids: the transcription tokens without the prompt and
        without the EOS, rows right-padded with `pad_token_id` (default: the model's). Up to
        `max_new_tokens` (default: as many as the decoder cache holds) until every row emitted
        an EOS (`eos_token_id`, default: the model's). An explicit None for either id does what
        it does in Hugging Face's Whisper, which is not what it does in text models: the steps
        still stop at the model's EOS and pad with its pad id, and only the cut differs
        (`_cut_like_hf`: with `eos_token_id=None` the EOS stays where the pad id is another
        id; with `pad_token_id=None` only a row's last EOS goes, and shorter rows are padded
        with 0). `max_length`, as in Hugging Face's Whisper, counts the new tokens only (not
        the decoder prompt), and `max_new_tokens` wins. `language` ("en", "<|en|>", or one
        per row) and `task` ("transcribe", "translate") as in Hugging Face; sampling as in
        the text models (`do_sample=True`), and, as in Hugging Face's Whisper, whenever a
        temperature above 0 is given without `do_sample` (a list of temperatures, HF's
        fallback schedule, is refused there: give do_sample=True for one per row). `attention_mask` (a feature extractor's, [batch, frames]) is taken
        and, as Hugging Face does within one window, not used; `input_features` may be
        passed as `inputs`. `forced_decoder_ids` replaces the generation config's for the
        call, as in Hugging Face (None: none; `processor.get_decoder_prompt_ids(...)`'s pairs;
        a `language` or `task` still takes their place). Timestamps are not supported. Raises
        ValueError, leaving the model usable, for a bad feature shape or more tokens than the
        decoder cache holds."""
        input_features = main_input("generate", input_features, hf_options, "input_features")
        take_decoder_start(
            "generate", hf_options, self.spec.decoder_start_token_id, _rows(input_features)
        )
        _take_whisper_options("generate", hf_options, self.speech, self.spec.frames)
        refuse_hf_options("generate", hf_options)
        plan = self._speech_plan(
            input_features,
            max_new_tokens,
            do_sample,
            (temperature, top_k, top_p, seed),
            eos_token_id,
            pad_token_id,
            language,
            task,
            return_timestamps,
            max_length,
            attention_mask,
            forced_decoder_ids,
        )
        new = self._generate(plan)[:, plan.prompt_len - 1 :]
        new = new[:, : _generated_length(new, plan.eos)]  # the steps HF's generate runs
        # the ids HF's Whisper cuts by: its own config's, where a call's None stays None
        eos = [] if eos_token_id is None else plan.eos
        pad = None if pad_token_id is None else plan.pad
        one_id = _one_eos_id(eos_token_id, plan.eos)
        return _cut_like_hf(new, eos, pad, one_id).to(_device(input_features))

    @takes_generation_defaults
    @plain_numbers
    def stream(
        self,
        input_features=None,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | Sequence[float] | None = None,
        top_k: int | Sequence[int] = 50,
        top_p: float | Sequence[float] = 1.0,
        eos_token_id: int | Sequence[int] | None = MODEL_DEFAULT,
        pad_token_id: int | None = MODEL_DEFAULT,
        seed: int | Sequence[int] | None = None,
        language: str | Sequence[str] | None = None,
        task: str | None = None,
        output_logits: bool = False,
        max_length: int | None = None,
        attention_mask=None,
        forced_decoder_ids: Any = MODEL_DEFAULT,
        **hf_options: Any,
    ) -> Iterator:
        """The same generation, yielding each new token's ids ([batch] on the CPU; a finished
        row yields the pad id), with `output_logits` pairs of ids and the step's float32
        logits (the model's raw ones, as Hugging Face's `output_logits`: before suppressed
        tokens and the decoder prompt's forced ids); stops after the step where every row has finished. An
        explicit None for `eos_token_id` or `pad_token_id` is the model's id here, as the
        steps of Hugging Face's Whisper take it (see `generate`)."""
        input_features = main_input("stream", input_features, hf_options, "input_features")
        take_decoder_start(
            "stream", hf_options, self.spec.decoder_start_token_id, _rows(input_features)
        )
        _take_whisper_options("stream", hf_options, self.speech, self.spec.frames)
        refuse_hf_options("stream", hf_options)
        plan = self._speech_plan(
            input_features,
            max_new_tokens,
            do_sample,
            (temperature, top_k, top_p, seed),
            eos_token_id,
            pad_token_id,
            language,
            task,
            None,
            max_length,
            attention_mask,
            forced_decoder_ids,
        )
        return self._stream(plan, output_logits)

    def _speech_plan(
        self,
        features,
        max_new_tokens,
        do_sample,
        sampler,
        eos_id,
        pad_id,
        language,
        task,
        return_timestamps,
        max_length=None,
        attention_mask=None,
        forced=MODEL_DEFAULT,
    ) -> _Plan:
        spec = self.spec
        self._refuse_reentry()  # before anything is drawn for the call (its seed)
        do_sample, sampler = _whisper_sampling(do_sample, sampler)
        seed, sampler = sampler[3], (*sampler[:3], checked_seed(sampler[3]))
        if return_timestamps:
            raise ValueError(
                "return_timestamps=True is not supported: kernl's Whisper generate transcribes "
                "one 30 s window without timestamps"
            )
        features = _as_features(features, spec.num_mel_bins, spec.frames)
        batch = features.shape[0]
        _check_mask(attention_mask, batch, spec.frames)
        speech = self.speech
        if forced is not MODEL_DEFAULT:
            ids = _forced_ids(forced, self.spec.vocab_size)
            speech = dataclasses.replace(speech, forced_decoder_ids=ids)
        language, task = resolved_call(speech, language, task)
        start = self.spec.decoder_start_token_id
        prompts = [
            decoder_prompt(speech, start, lang, task) for lang in _languages(language, batch)
        ]
        prompt_len = len(prompts[0])
        length_from_max_length = max_length is not None and max_new_tokens is None
        given_new_tokens = max_new_tokens
        if max_length is not None and max_new_tokens is not None:
            warnings.warn(
                "both max_new_tokens and max_length were given; max_new_tokens takes precedence",
                stacklevel=3,
            )
        elif max_length is not None:
            if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
                raise ValueError(
                    f"max_length must be a positive integer (for Whisper: the new tokens, "
                    f"the decoder prompt not counted), got {max_length!r}"
                )
            max_new_tokens = max_length
        bound = LENGTH_IS_A_BOUND.get() is not None or length_from_max_length
        if max_new_tokens is not None and bound:
            # a call's max_length, or the generation config's (kernl.optimize's): HF's Whisper
            # caps it at the decoder's positions, silently (checkpoints set max_length=448, all
            # of them, and pipelines pass it); past the cache, the config's is cut, with a
            # warning, and a call's refused (_check_cache)
            positions = spec.max_positions - prompt_len
            max_new_tokens = min(max_new_tokens, positions) if positions > 0 else max_new_tokens
        if max_new_tokens is None:  # a transcription runs to its EOS, as far as the cache goes
            max_new_tokens = self.buckets.cache_len - prompt_len + 1
            if max_new_tokens < 1:  # an artifact from before the compiler refused such caches
                raise ValueError(
                    f"this call's decoder prompt takes {prompt_len} tokens, more than the "
                    f"artifact's cache of {self.buckets.cache_len} leaves room for: name no "
                    "language or task, or recompile with a longer cache"
                )
        # Hugging Face's Whisper generate hands its config to GenerationMixin.generate, which
        # fills what is None there from the model's generation config (defaults_only): the
        # steps stop at the model's EOS and pad with its pad id whatever None the call passed
        eos_id = MODEL_DEFAULT if eos_id is None else eos_id
        pad_id = MODEL_DEFAULT if pad_id is None else pad_id
        bb, eos, pad = self._check(batch, max_new_tokens, do_sample, sampler, eos_id, pad_id)
        asked = asked_length(given_new_tokens, max_length, max_new_tokens)
        max_new_tokens = self._check_cache(prompt_len, max_new_tokens, asked)
        padded = torch.zeros((bb, *features.shape[1:]), dtype=self.dtype, device=features.device)
        padded[:batch] = features
        prompt = torch.full((bb, MAX_PROMPT), spec.decoder_start_token_id, dtype=torch.int64)
        prompt[:batch, :prompt_len] = torch.tensor(prompts, dtype=torch.int64)
        prompt[batch:, :prompt_len] = prompt[0, :prompt_len].clamp(min=0)
        # drawn once the call is checked: a refused call draws nothing from torch's RNG
        sampler = (*sampler[:3], call_seed(seed, do_sample))
        return _Plan(
            batch,
            bb,
            spec.source_positions,
            {"features": padded},
            prompt,
            prompt_len,
            max_new_tokens,
            do_sample,
            sampler,
            eos,
            pad,
        )

    def _prompt(self, language: str | None, task: str | None) -> list[int]:
        return decoder_prompt(self.speech, self.spec.decoder_start_token_id, language, task)


_LONG_FORM = (
    "it applies to long-form transcription (more than one 30 s window) and its temperature "
    "fallback, which kernl does not run"
)
# Hugging Face's Whisper generate arguments beyond GenerationMixin's: at their neutral value
# (None: unset) taken, otherwise a TypeError saying why (they were "unexpected keyword")
_WHISPER_OPTIONS = {
    "condition_on_prev_tokens": (False, _LONG_FORM),
    "compression_ratio_threshold": (None, _LONG_FORM),
    "logprob_threshold": (None, _LONG_FORM),
    "no_speech_threshold": (None, _LONG_FORM),
    "prompt_ids": (None, "a decoder prompt (previous text) is not supported"),
    "prompt_condition_type": (None, "a decoder prompt (previous text) is not supported"),
    "return_token_timestamps": (False, "token timestamps are not supported"),
    "monitor_progress": (None, _LONG_FORM),
    "force_unique_generate_call": (
        False,
        "generate returns the new tokens only (Hugging Face's then returns the decoder prompt "
        "before them)",
    ),
}
# ... that change nothing in one window without timestamps, whatever their value (the
# precisions place timestamps)
_INERT_WHISPER_OPTIONS = frozenset({"time_precision", "time_precision_features"})


def _take_whisper_options(method: str, options: dict, speech, frames: int) -> None:
    for name in [n for n in options if n in _WHISPER_OPTIONS or n in _INERT_WHISPER_OPTIONS]:
        value = options.pop(name)
        if name in _INERT_WHISPER_OPTIONS:
            continue
        neutral, why = _WHISPER_OPTIONS[name]
        if value is None or value is neutral:
            continue
        raise TypeError(f"{method}() does not take {name}={shown_value(value)}: {why}")
    # HF's defaults are the model's own: taken at them (they were "unexpected keyword")
    frames_given = options.pop("num_segment_frames", None)
    if frames_given is not None and frames_given != frames:
        raise TypeError(
            f"{method}() does not take num_segment_frames={shown_value(frames_given)}: the "
            f"model's window is {frames} frames, and {_LONG_FORM}"
        )
    multilingual = options.pop("is_multilingual", None)
    own = speech.is_multilingual
    if multilingual is not None and own is not None and bool(multilingual) != own:
        raise TypeError(
            f"{method}() does not take is_multilingual={multilingual!r}: the model was compiled "
            f"{'multilingual' if own else 'English-only'} (its generation config's "
            f"is_multilingual={own}), and its decoder prompts with it"
        )


def _forced_ids(given: Any, vocab: int) -> list[list[int]]:
    """A call's `forced_decoder_ids` as the artifact holds the config's: [position, id] pairs at
    positions 1, 2, ... (None: DETECT, the language detected); None or [] is none."""
    if isinstance(given, torch.Tensor):
        given = given.tolist()
    if given is None or (isinstance(given, (list, tuple)) and not given):
        return []
    ids = None
    if isinstance(given, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in given
    ):
        ids = [[p, DETECT if t is None else t] for p, t in given]
    if ids is None or not forced_ids_follow_prompt(ids, vocab):
        raise ValueError(
            f"forced_decoder_ids={shown_value(given)} do not follow Whisper's decoder prompt: "
            f"pairs [1, id], [2, id], ... (at most {MAX_PROMPT - 3}; id None detects the "
            "language), as processor.get_decoder_prompt_ids(language=..., task=...) gives (or "
            "pass language= and task=)"
        )
    return ids


def _one_eos_id(given: Any, model_eos: list[int]) -> bool:
    """Whether Hugging Face's Whisper generate holds the EOS as one id: it compares the last
    token with `generation_config.eos_token_id`, which is false for a list of ids (even of
    one), so an EOS given as a list is never cut (nor a pad-valued one kept)."""
    if given is MODEL_DEFAULT:
        return len(model_eos) == 1  # the checkpoints' own: one id
    if isinstance(given, torch.Tensor):
        return given.numel() == 1
    return not isinstance(given, (list, tuple))


def _cut_like_hf(
    new: torch.Tensor, eos: list[int], pad: int | None, one_id: bool = True
) -> torch.Tensor:
    """[batch, steps] new ids as Hugging Face's Whisper generate returns them (short-form,
    `generate_with_fallback` then `_pad_to_max_length`), by the EOS ids and pad id of its own
    config (a call's None stays None there): a row ending in the pad id loses every pad id it
    holds but one EOS (all of them where the pad id is no EOS id), then a last EOS id goes;
    rows are right-padded with the pad id (None: 0, as F.pad's value=None). Where the pad id
    is the EOS (every Whisper checkpoint), a row is cut before its EOS. An EOS given as a list
    (`one_id` False) is neither kept nor cut, as HF's comparisons with a list are false."""
    rows = []
    for row in new:
        if pad is not None and len(row) and int(row[-1]) == pad:
            keep = one_id and pad in eos
            row = row[: len(row) - int((row == pad).sum()) + keep]
        if one_id and len(row) and int(row[-1]) in eos:
            row = row[:-1]
        rows.append(row)
    fill = 0 if pad is None else pad
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _whisper_sampling(do_sample: bool | None, sampler: tuple) -> tuple[bool, tuple]:
    """Hugging Face's Whisper generate samples when, and only when, it is given a temperature
    above 0 (its do_sample is overwritten); kernl's also samples on an explicit
    do_sample=True, as its text models do, and greedy on an explicit False."""
    temperature, *rest = sampler
    if do_sample is None:
        if isinstance(temperature, (list, tuple)):
            raise ValueError(
                f"temperature={temperature!r} without do_sample: Hugging Face's Whisper "
                "generate reads a list of temperatures as a fallback schedule (long-form "
                "transcription), which kernl does not run; pass do_sample=True to sample each "
                "row at its own temperature, or one temperature"
            )
        do_sample = temperature is not None and not (_is_number(temperature) and temperature <= 0)
    if temperature is None:
        temperature = 1.0
    return bool(do_sample), (temperature, *rest)


def _languages(language, batch: int) -> list[str | None]:
    if language is None or isinstance(language, str):
        return [language] * batch
    if not isinstance(language, (list, tuple)):
        raise ValueError(f"language must be a string or {batch} strings, got {language!r}")
    language = list(language)
    if len(language) != batch or not all(isinstance(x, str) for x in language):
        raise ValueError(f"language must be a string or {batch} strings, one per row")
    return language


def _check_mask(mask, batch: int, frames: int) -> None:
    """A feature extractor's attention mask ([batch, frames], or [frames] for one row): within
    one 30 s window Hugging Face's Whisper does not use it (the encoder attends to every
    frame, padding included); kernl takes it likewise, once its shape is right."""
    if mask is None:
        return
    m = torch.as_tensor(mask)
    if m.dim() == 1:
        m = m[None]
    if tuple(m.shape) != (batch, frames):
        raise ValueError(
            f"attention_mask must be [batch, frames] = [{batch}, {frames}] (the feature "
            f"extractor's, one per input_features row), got {tuple(m.shape)}"
        )


def _as_features(features, mels: int, frames: int) -> torch.Tensor:
    """[B, mels, frames] floating point, where it lies ([mels, frames]: a batch of one); a
    window of 128 x 3000 is 1.5 MB: a round trip through the host would cost more than a
    decode step."""
    if features is None:
        raise ValueError("input_features is required: log-mel features [batch, n_mels, frames]")
    x = torch.as_tensor(features)
    if not x.dtype.is_floating_point:
        raise TypeError(f"input_features must be floating point, got {x.dtype}")
    if x.dim() == 2:
        x = x[None]
    if x.dim() == 3 and x.shape[1] == mels and x.shape[2] > frames:
        # HF's Whisper transcribes it long-form, window after window (its temperature fallback
        # and previous-text prompts): kernl serves one window
        raise ValueError(
            f"input_features of {x.shape[2]} frames hold more than one 30 s window ({frames} "
            "frames): long-form transcription is not supported; cut the audio into 30 s "
            "chunks (Hugging Face's pipeline: pipeline('automatic-speech-recognition', ..., "
            "chunk_length_s=30))"
        )
    if x.dim() != 3 or x.shape[0] == 0 or tuple(x.shape[1:]) != (mels, frames):
        raise ValueError(
            f"input_features must be [batch, {mels}, {frames}] (n_mels log-mel bins by one 30 s "
            f"window of frames, as the model's feature extractor pads it), got {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError("input_features hold NaN or infinite values")
    return x


def _device(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _rows(features) -> int | None:
    """[mels, frames] features are one row (as _as_features takes them)."""
    if not isinstance(features, torch.Tensor) or features.ndim < 2:
        return None
    return 1 if features.ndim == 2 else features.shape[0]
