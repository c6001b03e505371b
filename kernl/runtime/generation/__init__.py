"""Causal-LM generation over a loaded artifact: `GenerativeModel.generate` / `.stream`.

Read in this order: model.py (the public API, request checks, bucket choice, the step loop),
state.py (one batch bucket's static buffers and the prefill/decode step functions captured as
graphs), decoder.py (the decoder forward over those buffers), sampling.py (greedy and seeded
sampling without host syncs)."""

from .model import GenerativeModel

__all__ = ["GenerativeModel"]
