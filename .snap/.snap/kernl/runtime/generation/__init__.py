"""Generation over a loaded artifact: `GenerativeModel.generate` / `.stream` for a causal LM,
`Seq2SeqModel` (text) and `SpeechSeq2SeqModel` (Whisper) for an encoder-decoder.

Read in this order: model.py (the public API, request checks, bucket choice, the step loop),
state.py (one batch bucket's static buffers and the prefill/decode step functions captured as
graphs), decoder.py (the decoder forward over those buffers), sampling.py (greedy and seeded
sampling without host syncs), joining.py (a running batch that prompts join between steps:
`GenerativeModel.open_batch`, what the serving batcher runs); then encoder_decoder.py,
seq2seq.py and speech.py for the encoder-decoders."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .model import GenerativeModel

if TYPE_CHECKING:
    import torch

    from kernl.artifacts.schema import Manifest

    from ..binaries import KernelBinaries
    from .seq2seq import Seq2SeqModel

__all__ = ["GenerativeModel", "open_seq2seq"]


def open_seq2seq(
    manifest: Manifest,
    weights: dict[str, torch.Tensor],
    device: torch.device,
    capture: str,
    binaries: KernelBinaries | None = None,
) -> Seq2SeqModel:
    """The model of an encoder-decoder artifact's task: speech (Whisper) or text (T5, BART).
    Here rather than in seq2seq.py, which speech.py builds on, so neither imports the other
    back."""
    from .seq2seq import Seq2SeqModel
    from .speech import SpeechSeq2SeqModel

    model_class = SpeechSeq2SeqModel if manifest.task == "speech-seq2seq" else Seq2SeqModel
    return model_class(manifest, weights, device, capture=capture, binaries=binaries)
