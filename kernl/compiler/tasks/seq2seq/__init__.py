"""The seq2seq-lm and speech-seq2seq room: encoder-decoder models (T5 v1.0 and v1.1/flan,
BART, mBART, Marian; Whisper) compiled for generation. compile.py (the pipeline), buckets.py
(batch / source / cache axes), describe.py (HF model -> the runtime encoder-decoder's
description and weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from .compile import Seq2SeqReport, compile_seq2seq

__all__ = ["Seq2SeqReport", "compile_seq2seq", "is_speech_model"]


def is_speech_model(model_or_path) -> bool:
    """Whether a model (or a model folder's config) is Whisper, served as speech-seq2seq."""
    if isinstance(model_or_path, torch.nn.Module):
        config = getattr(model_or_path, "config", None)
    else:
        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(
                str(Path(str(model_or_path)).expanduser()), local_files_only=True
            )
        except (OSError, ValueError):
            return False
    return getattr(config, "model_type", None) == "whisper"
