"""Tiny random decoder-only models of each supported family (fp32, CPU), built in-process:
nothing is downloaded; and the prompts and teacher-forced comparison their tests share."""

from __future__ import annotations

import torch

VOCAB = 97


def tiny_model(family: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    # A wide init keeps the random models from repeating one token forever.
    common = dict(
        vocab_size=VOCAB,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
        initializer_range=0.2,
    )
    if family == "llama3":  # GQA and Llama-3 rope scaling
        cfg = tf.LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            **common,
        )
        model = tf.LlamaForCausalLM(cfg)
    elif family in ("mistral", "mistral_window"):
        # "mistral_window": a window (8) shorter than the test prompts and caches, on every
        # layer; "mistral": Mistral-7B's window, longer than any test cache
        cfg = tf.MistralConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=96,
            sliding_window=8 if family == "mistral_window" else 4096,
            **common,
        )
        model = tf.MistralForCausalLM(cfg)
    elif family in ("qwen2", "qwen2_window"):  # q, k, v biases; tied embeddings
        # "qwen2_window": use_sliding_window with a window of 8 from layer max_window_layers
        # (1) on: a full-attention layer, then a windowed one
        window = {}
        if family == "qwen2_window":
            window = dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)
        cfg = tf.Qwen2Config(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            tie_word_embeddings=True,
            **window,
            **common,
        )
        model = tf.Qwen2ForCausalLM(cfg)
    elif family == "qwen3":  # per-head q and k norms; head_dim 32 with hidden 64 (as Qwen3's)
        cfg = tf.Qwen3Config(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=96,
            tie_word_embeddings=True,
            **common,
        )
        model = tf.Qwen3ForCausalLM(cfg)
    elif family == "phi3":  # fused qkv_proj and gate_up_proj
        cfg = tf.Phi3Config(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            **common,
        )
        model = tf.Phi3ForCausalLM(cfg)
    elif family in ("gemma", "gemma_head256"):
        # head_dim from the config (not hidden / heads), one KV head as Gemma-2B's, a hidden
        # size whose sqrt (the embedding scale) is not exact (sqrt(320) is 17.875 in bf16),
        # tanh-GELU, tied embeddings; "gemma_head256": Gemma-2B/7B's head_dim of 256
        wide = family == "gemma_head256"
        cfg = tf.GemmaConfig(
            hidden_size=320 if wide else 48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256 if wide else 32,
            intermediate_size=512 if wide else 96,
            hidden_act="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            **common,
        )
        model = tf.GemmaForCausalLM(cfg)
    elif family in ("gemma2", "gemma2_head256", "gemma2_window"):
        # softcaps low enough to bend these scores (up to ~10) and logits (up to ~0.7; real
        # checkpoints cap at 50 and 30), the sandwich norms' weights random (the loop below),
        # query_pre_attn_scalar 20 where head_dim is 32 (the scale is not head_dim ** -0.5),
        # sliding and full layers mixed, the window (96) as long as the test buckets' caches;
        # "gemma2_head256": Gemma2-2B's head_dim of 256; "gemma2_window": a window of 8,
        # shorter than the test prompts and caches, on layers 0 and 2
        wide = family == "gemma2_head256"
        cfg = tf.Gemma2Config(
            hidden_size=320 if wide else 48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=256 if wide else 32,
            intermediate_size=512 if wide else 96,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=20,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=0.5,
            sliding_window=8 if family == "gemma2_window" else 96,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            tie_word_embeddings=True,
            **common,
        )
        model = tf.Gemma2ForCausalLM(cfg)
        # Hugging Face's SDPA drops the attention softcap, and transformers 5.17 runs Gemma2
        # through SDPA by default: the reference is its eager attention, as Gemma2 is trained
        model.set_attn_implementation("eager")
    elif family == "gemma3":
        # Gemma3's text decoder: Gemma2's sandwich norms, per-head (1 + w) q and k norms, no
        # softcaps; a window of 8 (shorter than the test prompts and caches) on four of six
        # layers; a rotary table per layer type, their thetas as Gemma3's and the full layers'
        # with the linear scaling of Gemma3-4B and up (factor 8), so that one table for all
        # would rotate either kind wrongly; query_pre_attn_scalar 20 where head_dim is 32
        cfg = tf.Gemma3TextConfig(
            hidden_size=48,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=96,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=20,
            sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {
                    "rope_type": "linear",
                    "rope_theta": 1_000_000.0,
                    "factor": 8.0,
                },
            },
            tie_word_embeddings=True,
            **common,
        )
        model = tf.Gemma3ForCausalLM(cfg)
        # the reference is eager attention, as Gemma3 is trained (and as for Gemma2): SDPA's
        # default may differ by version, and eager's masked scores are what kernl computes
        model.set_attn_implementation("eager")
    elif family == "llama_dynamic":  # dynamic NTK: its own table up to 48 positions
        cfg = tf.LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            max_position_embeddings=48,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 100.0, "factor": 4.0},
            **common,
        )
        model = tf.LlamaForCausalLM(cfg)
    elif family == "phi3_longrope":  # Phi-3-128k's LongRoPE: short factors up to 48 positions
        cfg = tf.Phi3Config(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            max_position_embeddings=192,  # 4x: an attention scaling of 1.16
            original_max_position_embeddings=48,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 100.0,
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0],
                "original_max_position_embeddings": 48,
            },
            **common,
        )
        model = tf.Phi3ForCausalLM(cfg)
    elif family == "gpt2":  # learned positions, Conv1D weights, tied embeddings
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():  # random init has tiny biases; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # ones: they must matter
                p.normal_(1.0, 0.3)
            elif family.startswith("gemma") and name.endswith("norm.weight"):  # zeros: (1 + w) is 1
                p.normal_(0.0, 0.3)
            elif family.startswith("gemma") and name == "model.embed_tokens.weight":
                # scaled by sqrt(hidden) at run time: stored that much smaller, the tokens enter
                # the residual stream at the other families' size (at 0.2 the tied head
                # repeated the last token: 2 distinct ids in 64)
                p.normal_(0.0, 0.2 / model.config.hidden_size**0.5)
    return model.eval()


def mixed_prompts(batch: int, lengths: list[int], seed: int = 0):
    """Left-padded ids and attention mask (pad id 0) with the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.zeros(batch, longest, dtype=torch.int64)
    mask = torch.zeros(batch, longest, dtype=torch.int64)
    for i, n in enumerate(lengths):
        ids[i, longest - n :] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, longest - n :] = 1
    return ids, mask


def teacher_forced(model, hf, lengths: list[int], new: int):
    """(ids [rows, new], logits [rows, new, vocab]) streamed by kernl over mixed prompts of
    `lengths`, and Hugging Face's logits over the same ids, teacher-forced with its own
    left-padding mask and position ids."""
    from kernl.compiler.tasks.causal_lm.validate import reference_logits

    ids, mask = mixed_prompts(len(lengths), lengths)
    steps = list(model.stream(ids, mask, max_new_tokens=new, eos_token_id=[], output_logits=True))
    ours_ids = torch.stack([i for i, _ in steps], 1)
    ours = torch.stack([lg for _, lg in steps], 1)
    seqs = torch.cat([ids, ours_ids[:, :-1]], 1)
    valid = torch.cat([mask.bool(), torch.ones_like(ours_ids[:, :-1], dtype=torch.bool)], 1)
    keep = [ids.shape[1] - 1 + t for t in range(ours_ids.shape[1])]
    return ours_ids, ours, reference_logits(hf, seqs, valid, keep)
