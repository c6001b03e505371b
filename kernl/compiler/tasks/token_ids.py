"""The EOS ids a generating model stops at, as the artifact can hold them (both generating
tasks: causal_lm/ and seq2seq/)."""

from __future__ import annotations

from kernl.artifacts.generation import MAX_EOS_IDS

from ..trace import UnsupportedModelError


def eos_token_ids(eos, vocab: int, task: str) -> list[int]:
    """`eos` (one id, a list of ids or None, as a config or generation config holds it) as
    distinct ids in [0, vocab), in order. Raises UnsupportedModelError, before anything is
    traced, for more ids than the runtime's EOS buffer holds: the artifact's reader refuses
    them, so the compile would otherwise fail only when it writes the artifact."""
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    ids = list(dict.fromkeys(int(e) for e in eos if 0 <= int(e) < vocab))
    if len(ids) > MAX_EOS_IDS:
        raise UnsupportedModelError(
            f"{task}: the model stops at {len(ids)} EOS ids ({ids}); kernl stops at "
            f"{MAX_EOS_IDS} at most. Set model.generation_config.eos_token_id to the ones "
            "you need before compiling."
        )
    return ids
