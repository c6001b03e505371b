"""Causal-LM generation over a loaded artifact: `GenerativeModel.generate` / `.stream`.

Read in this order: model.py (the public API, request checks, bucket choice, the step loop),
state.py (one batch bucket's static buffers and the prefill/decode step functions captured as
graphs), decoder.py (the decoder forward over those buffers), sampling.py (greedy and seeded
sampling without host syncs), joining.py (a running batch that prompts join between steps:
`GenerativeModel.open_batch`, what the serving batcher runs)."""

from .model import GenerativeModel

__all__ = ["GenerativeModel"]
