"""The generation config's token ids as Hugging Face's generate applies them, on the CPU in
fp32: a bad word that is an EOS id of the call stays allowed (NoBadWordsLogitsProcessor drops
the call's EOS ids from bad_words_ids), and a list-valued decoder_start_token_id."""

from __future__ import annotations

import pytest
import torch

import kernl.compiler
import kernl.runtime

from .test_seq2seq_generate import sources, tiny_seq2seq

BUCKETS = "batch=1,4 source=8,16 cache=16"
EOS = 2  # tiny BART's (and its decoder start)


@pytest.fixture(scope="module")
def eos_is_a_bad_word(tmp_path_factory):
    """A BART whose generation config lists its EOS id and token 7 as bad words, both far more
    likely than any other token, 7 the most: which of them a call allows decides its ids."""
    hf = tiny_seq2seq("bart", inflated=False)
    with torch.no_grad():
        hf.final_logits_bias[0, EOS] = 3.0
        hf.final_logits_bias[0, 7] = 4.0
    hf.generation_config.bad_words_ids = [[EOS], [7]]
    path = tmp_path_factory.mktemp("s2s") / "bad_words"
    kernl.compiler.compile(hf, BUCKETS, path, dtype="fp32", device="cpu")
    return hf, kernl.runtime.load(path, device="cpu")


def _hf_generate(hf, ids, mask, new: int = 12, **options):
    with torch.no_grad():
        return hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            num_beams=1,
            **options,
        )


@pytest.mark.parametrize(
    "call_eos",
    [None, [EOS, 7], [7], None],  # the last one: the model's EOS again, after other calls
    ids=["the-model-s-eos", "eos-and-7", "7-alone", "the-model-s-eos-again"],
)
def test_a_bad_word_that_is_an_eos_id_of_the_call_ends_rows_as_in_hugging_face(
    eos_is_a_bad_word, call_eos
):
    """Before: kernl suppressed every compiled bad word, so with the model's EOS a bad word its
    rows never ended (HF ends them at once), and a call that made 7 an EOS id never saw it."""
    hf, model = eos_is_a_bad_word
    ids, mask = sources([12, 5, 9])
    eos = {} if call_eos is None else {"eos_token_id": call_eos}
    ref = _hf_generate(hf, ids, mask, **eos)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, **eos)
    assert torch.equal(got, ref), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"
    # each row ended at a token the call allows (this model prefers 7, then its EOS)
    assert ref.shape[1] == 2 and set(ref[:, 1].tolist()) <= {EOS, 7}
    steps = model.stream(input_ids=ids, attention_mask=mask, max_new_tokens=12, **eos)
    streamed = torch.stack(list(steps), 1)
    assert torch.equal(streamed, ref[:, 1:])


def test_bad_words_that_are_no_eos_id_of_the_call_stay_suppressed(eos_is_a_bad_word):
    """Neither bad word is an EOS id of this call: both stay suppressed, as in HF."""
    hf, model = eos_is_a_bad_word
    ids, mask = sources([12, 5, 9], seed=1)
    ref = _hf_generate(hf, ids, mask, eos_token_id=[5])
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[5])
    assert torch.equal(got, ref), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"
    assert not {EOS, 7} & set(ref[:, 1:].flatten().tolist())


@pytest.mark.parametrize("start", [[EOS], [EOS, EOS, EOS]], ids=["one-id", "one-id-per-row"])
def test_a_list_of_one_decoder_start_id_is_that_id(tmp_path, start):
    """Hugging Face takes a list of one start id per row; a list of one id (or of the same id
    for every row) starts every row with it. Before: a bare TypeError at compile."""
    hf = tiny_seq2seq("bart")
    hf.generation_config.decoder_start_token_id = start
    compile_ = kernl.compiler.compile
    compile_(hf, "batch=1,4 source=8 cache=8", tmp_path / "a", dtype="fp32", device="cpu")
    model = kernl.runtime.load(tmp_path / "a", device="cpu")
    assert model.spec.decoder_start_token_id == EOS
    ids, mask = sources([7, 4, 6])
    hf.generation_config.decoder_start_token_id = EOS
    ref = _hf_generate(hf, ids, mask, 8, eos_token_id=None, min_new_tokens=8, pad_token_id=0)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(got, ref), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"


@pytest.mark.parametrize(
    "start,named",
    [([2, 5], r"decoder_start_token_id=\[2, 5\].*different start ids per row"), ([], r"=\[\]")],
)
def test_a_decoder_start_list_of_different_ids_is_refused_by_name(tmp_path, start, named):
    from kernl.compiler.trace import UnsupportedModelError

    hf = tiny_seq2seq("bart")
    hf.generation_config.decoder_start_token_id = start
    with pytest.raises(UnsupportedModelError, match=named):
        kernl.compiler.compile(
            hf, "batch=1 source=8 cache=8", tmp_path / "a", dtype="fp32", device="cpu"
        )
    assert not (tmp_path / "a").exists()


def test_a_whisper_model_without_its_head_is_refused_naming_the_task_asked_for(tmp_path):
    """Before: "task 'seq2seq-lm' does not match the model given", a task nobody passed."""
    import transformers as tf

    from kernl.compiler.trace import UnsupportedModelError

    cfg = tf.WhisperConfig(
        vocab_size=120,
        num_mel_bins=16,
        encoder_layers=1,
        decoder_layers=1,
        d_model=32,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_source_positions=50,
        max_target_positions=64,
        decoder_start_token_id=116,
        pad_token_id=99,
        eos_token_id=99,
        bos_token_id=99,
    )
    with pytest.raises(UnsupportedModelError) as e:
        kernl.compiler.compile(
            tf.WhisperModel(cfg).eval(),
            "batch=1 cache=16",
            tmp_path / "a",
            dtype="fp32",
            device="cpu",
            task="speech-seq2seq",
        )
    message = str(e.value)
    assert "task 'speech-seq2seq' does not match the model given, a WhisperModel" in message
    assert "seq2seq-lm" not in message and "WhisperForConditionalGeneration" in message


@pytest.mark.gpu
def test_the_eos_exempt_bad_words_reach_the_replayed_graphs_on_the_gpu(tmp_path):
    """On the GPU every step is a replayed CUDA graph: the suppress mask each request rewrites
    in place (`_State.exempt_eos`) must be what the captured steps read, call after call with
    other EOS ids (a stale mask would keep suppressing 7 or the EOS)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    hf = tiny_seq2seq("bart", inflated=False)
    with torch.no_grad():
        hf.final_logits_bias[0, EOS] = 3.0
        hf.final_logits_bias[0, 7] = 4.0
    hf.generation_config.bad_words_ids = [[EOS], [7]]
    kernl.compiler.compile(hf, BUCKETS, tmp_path / "a", dtype="fp32", device="cuda")
    model = kernl.runtime.load(tmp_path / "a", device="cuda")
    ids, mask = sources([12, 5, 9])
    for call_eos in (None, [7], [EOS, 7], None):  # each ends its rows at once: no near ties
        eos = {} if call_eos is None else {"eos_token_id": call_eos}
        # compile() moved the model given to the GPU
        ref = _hf_generate(hf, ids.to(hf.device), mask.to(hf.device), **eos).cpu()
        got = model.generate(
            input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=12, **eos
        )
        assert torch.equal(got.cpu(), ref), f"{call_eos}\nkernl {got.tolist()}\nhf {ref.tolist()}"
