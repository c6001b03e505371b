"""The seq2seq-lm room: encoder-decoder models (T5 v1.0 and v1.1/flan, BART) compiled for
generation. compile.py (the pipeline), buckets.py (batch / source / cache axes), describe.py
(HF model -> the runtime encoder-decoder's description and weights)."""

from .compile import Seq2SeqReport, compile_seq2seq

__all__ = ["Seq2SeqReport", "compile_seq2seq"]
