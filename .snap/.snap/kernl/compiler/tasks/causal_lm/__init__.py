"""The causal-LM room: decoder-only models (Llama, Mistral, Qwen2, GPT-2) compiled for
generation. compile.py (the pipeline), buckets.py (batch / prompt / cache axes),
describe.py (HF model -> the runtime decoder's description and weights), decode_kernels.py
(the decode step's kernels chosen by timing), validate.py (prefill and decode steps against
eager)."""

from .compile import CausalLMReport, compile_causal_lm

__all__ = ["CausalLMReport", "compile_causal_lm"]
