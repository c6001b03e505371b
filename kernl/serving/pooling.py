"""Sentence embeddings made by the server: a request's `"pooling"` turns each sequence's
`last_hidden_state` into one vector, `sentence_embedding`, as sentence-transformers' Pooling
(and Normalize) modules do after the model. An embedding client then receives 384 numbers a
sequence (all-MiniLM-L6-v2) instead of 384 per token, and pools nothing itself.

    {"text": [...], "pooling": "mean", "normalize": true}
      -> {"outputs": {"sentence_embedding": [[...], ...]}, ...}

"mean": the mean over the sequence's real tokens (attention_mask 1), in float32;
"cls": the first token's vector (BGE, GTE and other CLS-pooled models). `normalize`: divided
by its L2 norm, so a dot product is the cosine similarity. The embedding is float32 whatever
the model's dtype, as sentence-transformers returns it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SENTENCE_EMBEDDING = "sentence_embedding"
POOLED = "last_hidden_state"  # the output a sentence embedding is pooled from
POOLING_MODES = ("mean", "cls")


class PoolingError(ValueError):
    """A request's pooling fields that do not make a pooling: str() says what to change."""


@dataclass(frozen=True)
class Pooling:
    mode: str  # one of POOLING_MODES
    normalize: bool = False


def parse_pooling(data: dict, output_names: list[str]) -> Pooling | None:
    """The request's pooling (None when it asks for none); PoolingError for a bad one."""
    mode, normalize = data.get("pooling"), data.get("normalize")
    if mode is None:
        if normalize is not None:
            raise PoolingError("'normalize' applies to a pooled embedding: add 'pooling'")
        return None
    if mode not in POOLING_MODES:
        raise PoolingError(f"'pooling' must be one of {list(POOLING_MODES)}")
    if POOLED not in output_names:
        raise PoolingError(f"this model has no {POOLED!r} to pool (its outputs: {output_names})")
    if normalize is not None and not isinstance(normalize, bool):
        raise PoolingError("'normalize' must be true or false")
    return Pooling(mode, bool(normalize))


def pool(
    hidden: torch.Tensor, attention_mask: tuple[int, ...] | None, how: Pooling
) -> torch.Tensor:
    """One sequence's embedding from its `last_hidden_state` ([tokens, hidden], cut to the
    sequence's length) and its attention mask (None: every token is real)."""
    hidden = hidden.float()
    if how.mode == "cls":
        vector = hidden[0]
    elif attention_mask is None:
        vector = hidden.mean(0)
    else:
        mask = torch.tensor(attention_mask, dtype=torch.float32).unsqueeze(1)
        # sentence-transformers' clamp: a sequence with no real token pools to zeros, not NaN
        vector = (hidden * mask).sum(0) / mask.sum().clamp(min=1e-9)
    if how.normalize:
        vector = torch.nn.functional.normalize(vector, p=2, dim=0)
    return vector
