"""`kernl.optimize`'s model after its `generation_config` is edited, as Hugging Face's idioms
edit it (Whisper's `.language`, mBART's forced BOS, EOS and pad ids): generate and stream
apply what they take as arguments, as HF's generate applies the config (a call's own argument
still wins), and refuse by name what the compiled artifact cannot change (those edits were
silently ignored: the artifact holds the config as compiled). Also: an explicit
`max_new_tokens=None` is HF's (20 new tokens), not the config's length."""

from __future__ import annotations

import pytest
import torch
from generation.tiny_models import mixed_prompts, tiny_model
from seq2seq.test_seq2seq_generate import sources, tiny_seq2seq
from seq2seq.test_whisper_generate import LANGS, TASKS, features, tiny_whisper

import kernl

PROMPT = 6  # mixed_prompts(2, [6, 4]) is padded to 6


def _greedy(hf, **kw):
    with torch.no_grad():
        return hf.generate(do_sample=False, **kw)


def _edit(models, **settings):
    for m in models:
        for key, value in settings.items():
            setattr(m.generation_config, key, value)


def test_a_causal_lm_applies_generation_config_edits_as_hugging_face(cache):
    hf = tiny_model("llama3")
    ids, mask = mixed_prompts(2, [6, 4], seed=6)
    full = _greedy(hf, input_ids=ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0)
    eos = int(full[0, PROMPT + 4])  # row 0 emits it at its 5th new token
    _edit([hf], eos_token_id=eos, pad_token_id=0)
    model = kernl.optimize(hf, "batch=1,2 prompt=8,16 cache=48", progress=False)
    call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24)

    def same_as_hf(**kw):
        got = model.generate(**call, **kw)
        ref = _greedy(hf, **call, **kw)
        assert torch.equal(got, ref), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"
        steps = list(model.stream(**call, **kw))
        assert torch.equal(torch.stack(steps, 1), ref[:, PROMPT : PROMPT + len(steps)])
        return got

    stops = same_as_hf()
    _edit([model, hf], eos_token_id=None)  # no EOS: row 0 goes on (kernl stopped at `eos`)
    assert not torch.equal(same_as_hf(), stops)
    _edit([model, hf], eos_token_id=eos, pad_token_id=5)  # finished rows padded with 5
    assert (same_as_hf()[0, PROMPT + 5 :] == 5).all()
    _edit([model, hf], pad_token_id=None)  # HF's None pad: the first EOS id
    same_as_hf()
    same_as_hf(pad_token_id=3, eos_token_id=[])  # the call's arguments win over the edits
    # an explicit max_new_tokens=None drops the config's length: HF's 20 new tokens
    _edit([model, hf], max_new_tokens=5)
    short = dict(input_ids=ids, attention_mask=mask, eos_token_id=[], pad_token_id=0)
    assert model.generate(**short).shape[1] == PROMPT + 5
    got = model.generate(**short, max_new_tokens=None)
    assert torch.equal(got, _greedy(hf, **short, max_new_tokens=None))
    assert got.shape[1] == PROMPT + 20
    assert len(list(model.stream(**short, max_new_tokens=None))) == 20
    # what the artifact compiled in, or kernl cannot do, is refused by name; undone, it serves
    model.generation_config.num_beams = 1  # what kernl does anyway: taken
    model.generate(**short)
    # so are the neutral values of options kernl does not take (HF's no-ops), as per call
    neutral = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
                   typical_p=1.0, epsilon_cutoff=0.0, guidance_scale=1.0)  # fmt: skip
    for key, value in neutral.items():
        before = getattr(model.generation_config, key)
        setattr(model.generation_config, key, value)
        assert model.generate(**short).shape[1] == PROMPT + 5, key
        setattr(model.generation_config, key, before)
    # a fresh GenerationConfig leaves use_cache, output_attentions, ... None: HF's defaults
    for key in ("use_cache", "output_attentions", "output_hidden_states", "num_beams"):
        before = getattr(model.generation_config, key)
        setattr(model.generation_config, key, None)
        assert model.generate(**short).shape[1] == PROMPT + 5, key
        setattr(model.generation_config, key, before)
    for key, value in (("bad_words_ids", [[7]]), ("num_beams", 3), ("repetition_penalty", 1.2)):
        before = getattr(model.generation_config, key)
        setattr(model.generation_config, key, value)
        with pytest.raises(ValueError, match=rf"edited after kernl.optimize \({key}="):
            model.generate(**short)
        with pytest.raises(ValueError, match=rf"\({key}=.*run kernl.optimize again"):
            model.stream(**short)
        setattr(model.generation_config, key, before)
    assert model.generate(**short).shape[1] == PROMPT + 5


def test_settings_hugging_face_applies_are_refused_where_set_before_kernl_optimize(cache):
    """return_dict_in_generate=True and max_time set on the generation config before
    kernl.optimize: the ids came back as a tensor and generation ran past max_time, as no edit
    since the compile was there for _config_edits to find (num_return_sequences=2 gave one row
    a prompt). Refused by name; the call's own default wins. use_cache=False and bos_token_id,
    which change no id (a KV cache is always used; a prompt is always given), are taken as in
    HF, where they were refused or unexpected."""
    hf = tiny_model("llama3")
    _edit([hf], return_dict_in_generate=True, max_time=30.0, pad_token_id=0)
    model = kernl.optimize(hf, "batch=1,2 prompt=8,16 cache=48", progress=False)
    ids, mask = mixed_prompts(2, [6, 4], seed=6)
    call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6)
    for method in (model.generate, model.stream):
        with pytest.raises(ValueError, match=r"sets return_dict_in_generate=True, max_time=30.0"):
            method(**call)
    with pytest.raises(ValueError, match=r"kernl's open_batch\(\) does not"):
        model.open_batch([[3, 4, 5]], max_new_tokens=6)
    defaults = dict(return_dict_in_generate=False, max_time=None, use_cache=False, bos_token_id=1)
    got = model.generate(**call, **defaults)
    assert torch.equal(got, _greedy(hf, **call, **defaults))
    with pytest.raises(ValueError, match=r"sets max_time=30.0, which"):
        model.generate(**call, return_dict_in_generate=False)


def test_a_seq2seq_model_with_such_settings_compiles_and_refuses_them_per_call(cache):
    """The same settings on a text encoder-decoder failed its compile, whose validation calls
    Hugging Face's generate with the model's config: an AttributeError on the
    ModelOutput that return_dict_in_generate gives, max_time's cut as a false validation
    error. The reference generate now runs at their neutral values."""
    hf = tiny_seq2seq("bart")
    _edit([hf], return_dict_in_generate=True, max_time=1e-9)
    model = kernl.optimize(hf, "batch=1,2 source=8,16 cache=32", progress=False)
    ids, mask = sources([7, 5])
    call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12)
    with pytest.raises(ValueError, match=r"sets return_dict_in_generate=True, max_time=1e-09"):
        model.generate(**call)
    defaults = dict(return_dict_in_generate=False, max_time=None)
    assert torch.equal(model.generate(**call, **defaults), _greedy(hf, **call, **defaults))


def test_a_config_length_cut_to_the_cache_forces_no_eos_at_the_cut(cache):
    """A BART whose generation config forces the EOS (BART, mBART and opus-mt's do) and sets a
    length past the decoder cache: the length is cut to the cache with a warning, and the
    forced EOS came at the cut, where HF's generate has an ordinary token (it forces the EOS
    at its own, uncut length). The cut ids are now HF's first ones."""
    hf = tiny_seq2seq("bart")
    _edit([hf], forced_eos_token_id=2, max_length=64)
    model = kernl.optimize(hf, "batch=1,2 source=8,16 cache=32", progress=False)
    ids, mask = sources([7, 5])
    with pytest.warns(UserWarning, match="max_length=64 asks for up to 63 new tokens"):
        got = model.generate(input_ids=ids, attention_mask=mask)
    ref = _greedy(hf, input_ids=ids, attention_mask=mask)
    assert got.shape[1] == 33 and ref.shape[1] == 64
    assert torch.equal(got, ref[:, :33]), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"
    with pytest.warns(UserWarning, match="holds 32"):
        steps = list(model.stream(input_ids=ids, attention_mask=mask))
    assert torch.equal(torch.stack(steps, 1), ref[:, 1:33])
    # a call's own length within the cache still ends at the forced EOS, as in HF
    short = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(short, _greedy(hf, input_ids=ids, attention_mask=mask, max_new_tokens=10))
    assert (short[:, -1] == 2).all()


def test_a_text_seq2seq_model_applies_forced_bos_and_eos_edits_as_hugging_face(cache):
    hf = tiny_seq2seq("bart")
    model = kernl.optimize(hf, "batch=1,2 source=8,16 cache=32", progress=False)
    ids, mask = sources([7, 5])
    call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12)
    full = model.generate(**call, eos_token_id=[])

    def same_as_hf(**kw):
        got = model.generate(**call, **kw)
        ref = _greedy(hf, **call, **kw)
        assert torch.equal(got, ref), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"
        return got

    _edit([model, hf], forced_bos_token_id=9)  # mBART's target language, set after optimize
    assert (same_as_hf()[:, 1] == 9).all()
    assert (same_as_hf(forced_bos_token_id=None)[:, 1] != 9).any()  # the call's wins
    _edit([model, hf], forced_bos_token_id=None, eos_token_id=int(full[0, 4]), pad_token_id=1)
    assert (same_as_hf()[0, 5:] == 1).all()
    _edit([model, hf], eos_token_id=None)  # no EOS
    assert same_as_hf().shape[1] == 13
    model.generation_config.forced_eos_token_id = 4
    with pytest.raises(ValueError, match=r"\(forced_eos_token_id=4\)"):
        model.generate(**call)


def test_whisper_applies_language_and_task_edits_as_hugging_face(cache):
    hf = tiny_whisper("forced")  # forced_decoder_ids: detect the language, then transcribe
    model = kernl.optimize(hf, "batch=1,2 cache=48", progress=False)
    x = features(2)

    def same_as_hf(**kw):
        got = model.generate(input_features=x, max_new_tokens=10, **kw)
        ref = _greedy(hf, input_features=x, max_new_tokens=10, **kw)
        assert torch.equal(got, ref), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"
        return got

    detected = same_as_hf()
    # HF's fine-tuning idiom: a language and task on the config, its forced ids dropped
    _edit([model, hf], language="fr", task="translate", forced_decoder_ids=None)
    assert not torch.equal(same_as_hf(), detected)
    per_call = dict(input_features=x, max_new_tokens=10, language="fr", task="translate")
    assert torch.equal(
        model.generate(input_features=x, max_new_tokens=10), model.runtime.generate(**per_call)
    )
    same_as_hf(language="de")  # the call's wins
    steps = list(model.stream(input_features=x, max_new_tokens=10))
    assert len(steps) >= 1
    # the forced ids dropped with no language or task named: applied as HF applies them (a
    # call's forced_decoder_ids; the edit was refused)
    _edit([model, hf], language=None, task=None)
    assert not torch.equal(same_as_hf(), detected)
    _edit([model, hf], forced_decoder_ids=[[1, None], [2, TASKS["translate"]]])
    same_as_hf()
    model.generation_config.forced_decoder_ids = [[1, None], [2, TASKS["transcribe"]]]
    assert torch.equal(model.generate(input_features=x, max_new_tokens=10), detected)
    model.generation_config.lang_to_id = {**LANGS, "<|es|>": 113}
    with pytest.raises(ValueError, match=r"\(lang_to_id="):
        model.generate(input_features=x, max_new_tokens=10)


def test_a_value_set_again_as_a_tuple_is_no_edit():
    """`bad_words_ids` set again to the same ids as tuples is the same setting (it was taken
    for an edit the artifact cannot follow, and refused)."""
    from kernl.compiler.optimize import _same

    assert _same([[5], [7]], ((5,), (7,)))
    assert _same({"a": [1, 2]}, {"a": (1, 2)})
    assert not _same([[5]], [[6]])
