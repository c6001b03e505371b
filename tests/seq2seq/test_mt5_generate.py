"""mT5 (T5 v1.1's layers under model type "mt5") and the head's scaling of the decoder output,
which greedy ids cannot see: each streamed step's logits against Hugging Face's forward over
the same decoder prefix, tied and untied heads, T5 and mT5."""

import pytest
import torch

import kernl.compiler
import kernl.runtime

from .test_seq2seq_generate import hf_generate, sources

VOCAB = 96


def tiny(kind: str, tied: bool) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config_cls, model_cls = {
        "t5": (tf.T5Config, tf.T5ForConditionalGeneration),
        "mt5": (tf.MT5Config, tf.MT5ForConditionalGeneration),
    }[kind]
    cfg = config_cls(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=tied, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, initializer_factor=8.0,
    )  # fmt: skip
    model = model_cls(cfg)
    model.generation_config.forced_bos_token_id = None
    model.generation_config.forced_eos_token_id = None
    return model.eval()


@pytest.mark.parametrize("kind", ["mt5", "t5"])
@pytest.mark.parametrize("tied", [True, False])
def test_ids_and_each_step_s_logits_equal_hugging_face(kind, tied, tmp_path):
    hf = tiny(kind, tied)
    kernl.compiler.compile(hf, "batch=1,4 source=16 cache=16", tmp_path / "a", dtype="fp32")
    model = kernl.runtime.load(tmp_path / "a", device="cpu")
    ids, mask = sources([13, 5, 9])
    ids = ids % VOCAB
    got = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(got, hf_generate(hf, ids, mask, 8))
    steps = list(model.stream(ids, mask, max_new_tokens=6, eos_token_id=[], output_logits=True))
    prefix = torch.zeros(3, 1, dtype=torch.long)  # the decoder start token
    for new, logits in steps:
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=prefix).logits[:, -1]
        err = (logits - ref).abs().max() / ref.abs().max()
        assert err < 1e-4, f"{kind} tied={tied}: logits off by {err:.3g} of their scale"
        prefix = torch.cat([prefix, new.reshape(3, 1)], dim=1)


def test_an_unsupported_model_type_is_refused_from_its_config_before_any_weight_loads(tmp_path):
    """A folder holding a Pegasus config and no weights: refused by name (it was refused only
    after the whole checkpoint had loaded)."""
    import transformers as tf

    from kernl.compiler.trace import UnsupportedModelError

    tf.PegasusConfig(architectures=["PegasusForConditionalGeneration"]).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"seq2seq: model type 'pegasus' \(Pegasus"):
        kernl.compiler.compile(tmp_path, "batch=1 source=8 cache=8", tmp_path / "a",
                               dtype="fp32", device="cpu", task="seq2seq-lm")  # fmt: skip
