"""Whisper's decoder prompt, built from an artifact's SpeechSpec: the runtime builds each call's
from it, and the compiler asks it for the longest any call can build (a cache shorter than
that serves no call that reaches it), so the two never disagree."""

from __future__ import annotations

from .seq2seq import DETECT, MAX_PROMPT, SpeechSpec


def decoder_prompt(
    speech: SpeechSpec, start: int, language: str | None, task: str | None
) -> list[int]:
    """Hugging Face's `_retrieve_init_tokens` for one row (DETECT: detect the language), for
    the language and task the call resolved (the config's already put in where it named none)."""
    s = speech
    if s.is_multilingual is False and (language is not None or task is not None):
        raise ValueError("cannot set the language or task of an English-only Whisper model")
    tokens = [start]
    if language is None and task is None:  # the config's forced ids, else nothing
        tokens += [t for _, t in s.forced_decoder_ids]
    lang_undefined = len(tokens) <= 1 or tokens[1] == DETECT
    lang = None
    if language is not None:
        lang = language_id(s, language)
    elif s.lang_to_id and lang_undefined:
        lang = DETECT
    if lang is not None:
        tokens[1:2] = [lang]
    if task is not None:
        if not isinstance(task, str) or task not in s.task_to_id:
            raise ValueError(
                f"task must be one of {sorted(s.task_to_id)} for this model, not {task!r}"
            )
        tokens.append(s.task_to_id[task])
    elif language is not None and s.task_to_id:
        if not any(t in tokens for t in s.task_to_id.values()):
            tokens.append(s.task_to_id["transcribe"])
    if s.no_timestamps_token_id is not None and tokens[-1] != s.no_timestamps_token_id:
        tokens.append(s.no_timestamps_token_id)
    tokens = [t for t in tokens if t != DETECT or lang == DETECT]
    if len(tokens) > MAX_PROMPT:
        raise ValueError(f"a decoder prompt of {len(tokens)} tokens is over {MAX_PROMPT}")
    return tokens


def language_id(speech: SpeechSpec, language: str) -> int:
    table = speech.lang_to_id
    if not table:
        raise ValueError("this Whisper model's generation config has no languages (lang_to_id)")
    lower = language.lower()
    for key in (language, lower, f"<|{lower}|>", speech.language_names.get(lower)):
        if key in table:
            return table[key]
    names = f" (or their names: {', '.join(sorted(speech.language_names))[:200]})"
    raise ValueError(
        f"language {language!r} is not one of this model's: {', '.join(sorted(table))[:300]}"
        + (names if speech.language_names else "")
    )


def resolved_call(speech: SpeechSpec, language, task) -> tuple[object, str | None]:
    """A call's language (one, or one per row) and task, the config's where it names none (as
    Hugging Face takes `generation_config.language`/`.task`; English-only models take none)."""
    if speech.is_multilingual is not False:
        language = speech.language if language is None else language
        task = speech.task if task is None else task
    return language, task


def longest_decoder_prompt(speech: SpeechSpec, start: int) -> int:
    """The most tokens a call's decoder prompt takes: every language is one token and every
    task one, so one of each stands for all of them."""
    languages: list[str | None] = [None]
    tasks: list[str | None] = [None]
    if speech.is_multilingual is not False:
        languages += sorted(speech.lang_to_id)[:1]
        tasks += sorted(speech.task_to_id)[:1]
    longest = 0
    for named_language in languages:
        for named_task in tasks:
            language, task = resolved_call(speech, named_language, named_task)
            rows = language if isinstance(language, (list, tuple)) else [language]
            for row in rows:
                longest = max(longest, len(decoder_prompt(speech, start, row, task)))
    return longest
