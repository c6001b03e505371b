"""`kernl.optimize`'s causal LM (and encoder-decoder) takes what its generation config sets as Hugging Face's generate
takes it, without any edit: a `max_length` of 20 is a length (transformers 5 leaves it None
unless set), the config's `max_new_tokens` wins over a call's `max_length`, and its sampling
settings (`do_sample`, `temperature`, `top_k`, `top_p`) apply where the call leaves them out;
`open_batch` follows the config's edits as `generate` does."""

from __future__ import annotations

import warnings

import pytest
import torch
from generation.tiny_models import mixed_prompts, tiny_model
from seq2seq.test_seq2seq_generate import sources, tiny_seq2seq
from seq2seq.test_whisper_generate import features, tiny_whisper

import kernl

PROMPT = 6  # mixed_prompts(2, [6, 4]) is padded to 6
BUCKETS = "batch=1,2 prompt=8,16 cache=48"


def _hf(hf, **kw):
    with torch.no_grad():
        return hf.generate(**kw)


def test_a_config_max_length_of_20_counts_the_prompt_as_in_hugging_face(cache):
    hf = tiny_model("llama3")
    hf.generation_config.max_length = 20  # set: 20 ids in all, the prompt's 6 included
    model = kernl.optimize(hf, BUCKETS, progress=False)
    ids, mask = mixed_prompts(2, [6, 4], seed=6)
    got = model.generate(ids, attention_mask=mask)
    assert torch.equal(got, _hf(hf, input_ids=ids, attention_mask=mask))
    assert got.shape[1] == 20


def test_the_config_max_new_tokens_wins_over_a_call_max_length_as_in_hugging_face(cache):
    hf = tiny_model("llama3")
    hf.generation_config.max_new_tokens = 5
    model = kernl.optimize(hf, BUCKETS, progress=False)
    ids, mask = mixed_prompts(2, [6, 4], seed=6)
    got = model.generate(ids, attention_mask=mask, max_length=15)
    assert torch.equal(got, _hf(hf, input_ids=ids, attention_mask=mask, max_length=15))
    assert got.shape[1] == PROMPT + 5
    # a call's max_new_tokens wins over both
    assert model.generate(ids, attention_mask=mask, max_new_tokens=3).shape[1] == PROMPT + 3


def test_the_config_sampling_settings_apply_where_the_call_leaves_them_out(cache):
    """With top_k=1 in the config, HF's sampling is greedy decoding: kernl's must be too (it
    sampled with its own top_k=50), whether the call or the config turns sampling on."""
    hf = tiny_model("llama3")
    hf.generation_config.top_k = 1
    model = kernl.optimize(hf, BUCKETS, progress=False)
    ids, mask = mixed_prompts(2, [6, 4], seed=6)
    call = dict(attention_mask=mask, max_new_tokens=12)
    greedy = _hf(hf, input_ids=ids, **call)
    for seed in (1, 2):
        torch.manual_seed(seed)
        assert torch.equal(model.generate(ids, **call, do_sample=True), greedy)
    # the config's do_sample: sampling from the next call, its top_k=1 still applied
    for m in (hf, model):
        m.generation_config.do_sample = True
    assert torch.equal(model.generate(ids, **call), greedy)
    assert torch.equal(_hf(hf, input_ids=ids, **call), greedy)
    # the call's own arguments win: top_k=0 (off) at a high temperature leaves greedy
    hot = dict(temperature=50.0, top_k=0)
    assert not torch.equal(model.generate(ids, **call, **hot), greedy)
    assert torch.equal(model.generate(ids, **call, do_sample=False, **hot), greedy)


def test_config_top_k_none_is_hugging_face_default_not_off(cache):
    """HF fills a config's None top_k with its default 50; kernl's top_k=None is off (an edit
    to None was passed on as off). At a temperature that flattens the distribution, every
    draw must stay among the 50 best tokens of its step, as HF's would."""
    hf = tiny_model("llama3")
    hf.generation_config.top_k = 1  # compiled with a top_k, then edited to None
    model = kernl.optimize(hf, BUCKETS, progress=False)
    model.generation_config.top_k = None
    model.generation_config.temperature = 1000.0
    model.generation_config.do_sample = True
    ids, _ = mixed_prompts(1, [6], seed=3)
    vocab = hf.config.vocab_size
    assert vocab - 50 > 40  # a flat draw lands outside the top 50 about half the time
    outside = 0
    for seed in range(8):
        steps = list(model.stream(ids, max_new_tokens=1, seed=seed, output_logits=True))
        (token, logits) = steps[0]
        top = logits[0].topk(50).indices
        outside += int(token[0]) not in set(top.tolist())
    assert outside == 0


def test_open_batch_applies_generation_config_edits(cache):
    hf = tiny_model("llama3")
    model = kernl.optimize(hf, BUCKETS, progress=False)
    ids, mask = mixed_prompts(1, [6], seed=6)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    eos = int(free[0, PROMPT + 2])  # the third new token
    model.generation_config.eos_token_id = eos
    with model.open_batch([ids[0].tolist()], max_new_tokens=10) as batch:
        tokens = [t for _, t in batch.first]
        while batch.rows:
            tokens += [t for _, t in batch.step()]
    assert eos in tokens and tokens.index(eos) == 2
    assert len(tokens) == 3  # the edited EOS stopped it, as it stops generate


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_a_text_seq2seq_model_takes_the_config_length_as_hugging_face(cache, family):
    """An encoder-decoder's config length was applied only once edited after optimize: as
    compiled, generate ran its own 20 new tokens (Marian sets max_length=512, mBART-50 200)."""
    hf = tiny_seq2seq(family)
    hf.generation_config.max_length = 12  # counts the decoder start token
    hf.generation_config.eos_token_id = None
    model = kernl.optimize(hf, "batch=1,2 source=8,16 cache=32", progress=False)
    ids, mask = sources([7, 5])
    got = model.generate(ids, attention_mask=mask)
    assert torch.equal(got, _hf(hf, input_ids=ids, attention_mask=mask))
    assert got.shape[1] == 12
    for m in (hf, model):
        m.generation_config.max_new_tokens = 6
    got = model.generate(ids, attention_mask=mask, max_length=10)  # the config's wins
    assert torch.equal(got, _hf(hf, input_ids=ids, attention_mask=mask, max_length=10))
    assert got.shape[1] == 7
    # a config length past the decoder cache is a bound: cut to what it holds, said
    for m in (hf, model):
        m.generation_config.max_new_tokens = 500
    with pytest.warns(UserWarning, match="max_new_tokens=500 asks for up to 500"):
        assert model.generate(ids, attention_mask=mask).shape[1] == 1 + 32
    with pytest.raises(ValueError, match="exceeds the decoder cache"):
        model.generate(ids, attention_mask=mask, max_new_tokens=40)  # a call's is refused


def test_whisper_samples_as_hugging_faces_whisper(cache):
    """HF's Whisper samples on a call's temperature above 0 alone, with its config's top_k and
    top_p: kernl ignored the config's top_k, and an edited config temperature sampled."""
    hf = tiny_whisper("multilingual")
    hf.generation_config.top_k = 1  # sampling with top_k=1 is greedy decoding
    model = kernl.optimize(hf, "batch=1,2 cache=48", progress=False)
    x = features(2)
    greedy = model.generate(input_features=x, max_new_tokens=10)
    assert torch.equal(greedy, _hf(hf, input_features=x, max_new_tokens=10))
    for seed in (1, 2):
        torch.manual_seed(seed)
        assert torch.equal(
            model.generate(input_features=x, max_new_tokens=10, temperature=5.0), greedy
        )
    for m in (hf, model):
        m.generation_config.top_k = None  # HF's 50: a hot call samples now
        m.generation_config.temperature = 5.0  # not read by HF's Whisper: still greedy
        m.generation_config.do_sample = True
    assert torch.equal(model.generate(input_features=x, max_new_tokens=10), greedy)
    assert torch.equal(_hf(hf, input_features=x, max_new_tokens=10), greedy)
    torch.manual_seed(3)
    hot = model.generate(input_features=x, max_new_tokens=10, temperature=50.0)
    assert not torch.equal(hot, greedy)


def test_beam_search_in_the_config_is_said_not_silently_dropped(cache):
    """Marian, BART and mBART checkpoints set num_beams 4-6; kernl decodes greedily. The
    compile says so, and the optimized model warns at its first generate."""
    hf = tiny_seq2seq("bart")
    hf.generation_config.num_beams = 4
    said = []
    model = kernl.optimize(hf, "batch=1,2 source=8,16 cache=32", progress=said.append)
    assert any("num_beams=4 is not applied" in m for m in said)
    ids, mask = sources([7, 5])
    with pytest.warns(UserWarning, match="num_beams=4 is not applied"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once a model
        model.generate(ids, attention_mask=mask, max_new_tokens=4)


def test_whisper_takes_the_config_length_capped_at_its_positions_as_hugging_face(cache):
    """Whisper checkpoints set max_length to the decoder's positions (448): HF's Whisper caps
    it there silently, so a cache that holds as much serves it without a warning; a smaller
    config length is applied (it ran as far as the cache went)."""
    hf = tiny_whisper("multilingual")  # 64 decoder positions
    hf.generation_config.max_length = 64
    model = kernl.optimize(hf, "batch=1,2 cache=64", progress=False)
    x = features(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = model.generate(input_features=x, eos_token_id=[])
    assert torch.equal(full, _hf(hf, input_features=x, eos_token_id=[]))
    for m in (hf, model):
        m.generation_config.max_length = 9
    got = model.generate(input_features=x, eos_token_id=[])
    assert torch.equal(got, _hf(hf, input_features=x, eos_token_id=[]))
    assert got.shape[1] < full.shape[1]
    # no length in the config (one built from a WhisperConfig): HF's default of 20 new tokens
    # (kernl's ran to the cache)
    for m in (hf, model):
        m.generation_config.max_length = None
    got = model.generate(input_features=x, eos_token_id=[])
    assert got.shape[1] == 20 and torch.equal(got, _hf(hf, input_features=x, eos_token_id=[]))
    for none in (dict(max_length=None), dict(max_new_tokens=None)):  # HF's default too
        assert torch.equal(model.generate(input_features=x, eos_token_id=[], **none), got)


def test_open_batch_and_its_joiners_take_the_config_length_and_sampling(cache):
    """open_batch took the config's edits but not its length; a joiner sampled with join()'s
    own defaults (top_k 50) where the batch's opening rows took the config's; a positional
    do_sample=True dropped the config's sampling settings."""
    hf = tiny_model("llama3")
    model = kernl.optimize(hf, BUCKETS, progress=False)
    p0, p1 = [5, 6, 7, 8, 9], [11, 12, 13]
    greedy = {
        tuple(p): model.generate([p], max_new_tokens=8)[0, len(p) :].tolist() for p in (p0, p1)
    }
    model.generation_config.max_new_tokens = 3
    with model.open_batch([p0], rows=2) as batch:
        tokens = [t for _, t in batch.first]
        while batch.rows:
            tokens += [t for _, t in batch.step()]
    assert tokens == greedy[tuple(p0)][:3]
    # a config length past the cache is cut to it, as generate cuts it (the rows ran past
    # the cache: an IndexError on the CPU at its last slot)
    model.generation_config.max_new_tokens = 200
    with pytest.warns(UserWarning, match="asks for up to 200 new tokens"):
        want = model.generate([p0])[0, len(p0) :].tolist()
    with pytest.warns(UserWarning, match="asks for up to 200 new tokens"):
        batch = model.open_batch([p0], rows=2)
    with batch:
        tokens = [t for _, t in batch.first]
        while batch.rows:
            tokens += [t for _, t in batch.step()]
    assert tokens == want and len(want) < 48
    model.generation_config.max_new_tokens = None
    for key, value in (("do_sample", True), ("top_k", 1), ("temperature", 50.0)):
        setattr(model.generation_config, key, value)  # sampling that is greedy decoding
    torch.manual_seed(0)
    with model.open_batch([p0], max_new_tokens=8, rows=2) as batch:
        rows = {r: [t] for r, t in batch.first}
        row, first = batch.join(p1, max_new_tokens=8)
        rows[row] = [first]
        while batch.rows:
            for r, t in batch.step():
                rows[r].append(t)
    assert sorted(rows.values()) == sorted(greedy.values())
    ids = torch.tensor([p0])
    assert model.generate(ids, None, 8, True)[0, 5:].tolist() == greedy[tuple(p0)]
