"""Text requests, when the artifact folder carries a `tokenizer.json` (Hugging Face's fast
tokenizer file) and the `tokenizers` package is installed. Optional: without either, the
server takes token ids only. transformers is never needed."""

from __future__ import annotations

from pathlib import Path

from .protocol import Tokenize

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(artifact: str | Path) -> Tokenize | None:
    """A function from texts to per-text inputs (input_ids, attention_mask, token_type_ids),
    or None when the artifact has no tokenizer file or `tokenizers` is missing."""
    path = Path(artifact) / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()  # the batcher pads; each text keeps its own length

    def tokenize(texts: list[str]) -> list[dict[str, list[int]]]:
        return [
            {"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}
            for e in tokenizer.encode_batch(texts)
        ]

    return tokenize
