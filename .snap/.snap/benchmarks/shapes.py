"""Model shapes the GPU benchmarks share, built from configs with random weights (nothing is
downloaded)."""

from __future__ import annotations


def llama_1b_config():
    """Llama-3.2-1B's shape (16 layers, hidden 2048, GQA 32/8, vocab 128256, tied embeddings,
    llama3 rope scaling), with no pad, EOS or BOS id: a generation runs every new token."""
    import transformers as tf

    return tf.LlamaConfig(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        head_dim=64,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        pad_token_id=None,
        eos_token_id=None,
        bos_token_id=None,
    )
