"""The generation config's decoding settings, as a generating artifact holds them
(`extra.generation_defaults`): what `generate`, `stream` and `open_batch` take where a call
leaves them out, as Hugging Face's generate takes its model's generation config. An instruct
checkpoint's `do_sample=True, temperature=0.6, top_p=0.9` then samples from a loaded artifact
as from the model (a loaded artifact decoded greedily, silently); a `max_new_tokens` there is
the default length. The options kernl's generate does not apply (`num_return_sequences`,
`return_dict_in_generate`, `max_time`, `stop_strings`, `dola_layers`) are held too, so that
a call which does not override them is refused rather than served otherwise.

Every compile of a generating model writes it (empty where the config sets nothing: then
Hugging Face's own defaults apply, as for its generate). An artifact without it (compiled
before it was recorded) decodes from the call's arguments alone, as then documented. An
addition under `extra`, so the format version stays: a reader older than it ignores it and
decodes as it was documented to."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from .errors import ArtifactCorruptError

GENERATION_DEFAULTS_KEY = "generation_defaults"
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024


@dataclass(frozen=True)
class GenerationDefaults:
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None
    # options kernl's generate does not apply: refused per call unless the call overrides them
    return_dict_in_generate: bool | None = None
    num_return_sequences: int | None = None
    max_time: float | None = None
    stop_strings: str | list[str] | None = None
    dola_layers: str | list[int] | None = None

    @staticmethod
    def from_dict(d: Any, where: str = "the manifest") -> GenerationDefaults:
        """Checked: a value Hugging Face's generate would refuse is damage, not a setting."""

        def bad(what: str) -> ArtifactCorruptError:
            return ArtifactCorruptError(f"{where}: extra.{GENERATION_DEFAULTS_KEY} {what}")

        if not isinstance(d, dict):
            raise bad("is not a map")
        names = {f.name for f in fields(GenerationDefaults)}
        unknown = sorted(str(k) for k in d if k not in names)
        if unknown:  # a newer kernl's setting: ignoring it would decode otherwise
            raise bad(f"has unknown settings {unknown} (an artifact built by a newer kernl?)")
        for name, ok, what in _CHECKS:
            if d.get(name) is not None and not ok(d[name]):
                raise bad(f"{name} is {d[name]!r}, not {what}")
        return GenerationDefaults(**d)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _stop_strings(v: Any) -> bool:
    items = [v] if isinstance(v, str) else v
    return (
        isinstance(items, list)
        and len(items) <= MAX_STOP_STRINGS
        and all(isinstance(s, str) and len(s) <= MAX_STOP_STRING_CHARS for s in items)
    )


def _dola_layers(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and len(v) <= 4096 and all(map(_int, v)))


_CHECKS = (
    ("do_sample", lambda v: isinstance(v, bool), "true or false"),
    ("temperature", lambda v: _real(v) and v >= 0, "a finite number >= 0"),
    ("top_k", lambda v: _int(v) and v >= 0, "an integer >= 0"),
    ("top_p", lambda v: _real(v) and 0 <= v <= 1, "a number in [0, 1]"),
    ("max_new_tokens", lambda v: _int(v) and v >= 0, "an integer >= 0"),
    ("max_length", lambda v: _int(v) and v >= 0, "an integer >= 0"),
    ("return_dict_in_generate", lambda v: isinstance(v, bool), "true or false"),
    ("num_return_sequences", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("max_time", lambda v: _real(v) and v >= 0, "a finite number >= 0"),
    ("stop_strings", _stop_strings, f"a string or at most {MAX_STOP_STRINGS} strings"),
    ("dola_layers", _dola_layers, "a string or a list of layer indices"),
)


def generation_defaults_of(extra: dict, where: str = "the manifest") -> GenerationDefaults | None:
    """The artifact's generation defaults; None for an artifact compiled before they were
    recorded."""
    d = extra.get(GENERATION_DEFAULTS_KEY)
    return None if d is None else GenerationDefaults.from_dict(d, where)
