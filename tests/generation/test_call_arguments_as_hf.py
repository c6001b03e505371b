"""A causal LM's call arguments read as Hugging Face reads them, on a tiny Llama-3 whose
generation config sets an EOS id: an explicit None (eos_token_id, pad_token_id, an open
batch's max_new_tokens) is a value, not "the model's default"; an attention_mask of other
values than 0 and 1 is refused by value; numpy integers are numbers for an open batch's
steps(); and the refusal of num_beams names the pipeline that passes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernl.compiler
import kernl.runtime
from kernl.runtime.generation import joining
from kernl.runtime.generation.hf_options import refuse_hf_options

from .tiny_models import mixed_prompts, tiny_model

PROMPT = 6  # the prompts' padded length (mixed_prompts(2, [6, 4]))
NEW = 30


@pytest.fixture(scope="module")
def hf():
    """The tiny Llama with an EOS id that row 0 of PROMPTS emits at its 5th new token (and
    row 1 never), and pad 0, in its generation config."""
    model = tiny_model("llama3")
    ids, mask = mixed_prompts(2, [6, 4], seed=6)
    with torch.no_grad():
        full = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0)
    model.generation_config.eos_token_id = int(full[0, PROMPT + 4])
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def model(hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("as_hf") / "llama.kernl"
    kernl.compiler.compile(
        hf, "batch=1,4 prompt=8,16 cache=64", path, dtype="fp32", device="cpu", task="causal-lm"
    )
    return kernl.runtime.load(path)


def _hf_generate(hf, ids, mask=None, **kw):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, do_sample=False, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(eos_token_id=None),
        dict(pad_token_id=None),
        dict(eos_token_id=None, pad_token_id=None),
    ],
    ids=["defaults", "eos_none", "pad_none", "both_none"],
)
def test_an_explicit_none_eos_or_pad_is_hugging_face_s_none(model, hf, kw):
    """transformers 5.x applies a generate keyword even when it is None: eos_token_id=None
    stops at no EOS id, pad_token_id=None pads with the first EOS id. kernl took None as the
    model's own ids (row 0 stopped at the config's EOS, padded with the config's pad 0)."""
    ids, mask = mixed_prompts(2, [6, 4], seed=6)
    ref = _hf_generate(hf, ids, mask, max_new_tokens=NEW, **kw)
    got = model.generate(ids, mask, max_new_tokens=NEW, **kw)
    assert torch.equal(got, ref), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"
    steps = list(model.stream(ids, mask, max_new_tokens=NEW, **kw))
    assert torch.equal(torch.stack(steps, dim=1), ref[:, PROMPT : PROMPT + len(steps)])


def test_an_explicit_none_pad_infers_no_mask_from_the_pad_id(model, hf):
    """Without an attention_mask HF masks the pad id's positions; with pad_token_id=None its
    pad is the EOS id, which marks nothing: every position is attended."""
    ids, _ = mixed_prompts(2, [6, 3], seed=7)  # left-padded with 0, the config's pad
    for kw in ({}, dict(pad_token_id=None), dict(eos_token_id=None, pad_token_id=None)):
        ref = _hf_generate(hf, ids, max_new_tokens=8, **kw)
        assert torch.equal(model.generate(ids, max_new_tokens=8, **kw), ref), kw


def test_an_open_batch_takes_eos_none_as_generate_does(model):
    ids, mask = mixed_prompts(2, [6, 4], seed=6)
    want = model.generate(ids, mask, max_new_tokens=8, eos_token_id=None)[0, PROMPT:].tolist()
    row0 = ids[0].tolist()
    with model.open_batch([row0], max_new_tokens=8, eos_token_id=None, rows=4) as batch:
        tokens = [t for _, t in batch.first]
        while batch.rows:
            tokens += [t for _, t in batch.step()]
    assert tokens == want  # past the config's EOS, which it emits at its 5th token


def test_open_batch_takes_max_new_tokens_none_as_generate_does(model):
    """generate() takes max_new_tokens=None as 20; open_batch ran the prefill holding the
    model, then failed on `None - 1` outside the code that closes the batch."""
    prompt = [5, 6, 7, 8, 9]
    want = model.generate([prompt], max_new_tokens=None, eos_token_id=[])[0, 5:].tolist()
    assert len(want) == 20
    with model.open_batch([prompt], max_new_tokens=None, eos_token_id=[], rows=4) as batch:
        tokens = [t for _, t in batch.first]
        while batch.rows:
            tokens += [t for step in batch.steps(np.int64(8)) for _, t in step]
    assert tokens == want


def test_a_failure_after_the_batch_takes_the_model_frees_it(model, monkeypatch):
    """Any failure once the lock is taken closes the batch: one raised after the prefill
    (counting the first tokens) left it open, so while its traceback lived (a notebook keeps
    the last one) other threads' calls waited and this thread's were refused."""
    prompt = [5, 6, 7, 8, 9]
    want = model.generate([prompt], max_new_tokens=3, eos_token_id=[])

    def failing(self, pairs):
        raise ValueError("counting failed")

    monkeypatch.setattr(joining.OpenBatch, "_emitted", failing)
    kept = None
    try:
        model.open_batch([prompt], max_new_tokens=3, eos_token_id=[], rows=4)
    except ValueError as e:
        kept = e  # the traceback holds the half-built batch
    monkeypatch.undo()
    assert kept is not None
    assert not model._lock.locked()
    assert torch.equal(model.generate([prompt], max_new_tokens=3, eos_token_id=[]), want)


@pytest.mark.parametrize(
    "mask_of, shown",
    [
        (lambda m: m * 2, "got 2"),
        (lambda m: -m, "got -1"),
        (lambda m: m.float() * 0.5, "got 0.5"),
        (lambda m: m.float().masked_fill(m == 0, float("nan")), "got nan"),
    ],
    ids=["int_2", "int_minus_1", "float_half", "float_nan"],
)
def test_a_mask_of_other_values_than_0_and_1_is_refused_naming_them(model, hf, mask_of, shown):
    """HF builds a decoder's positions from cumsum(mask): a 2 or a 0.5 is not a "keep" there,
    and kernl (which took any non-zero value as one) gave other ids. Refused, as the encoder
    path refuses them; 0 and 1 in any dtype are taken."""
    ids, mask = mixed_prompts(2, [6, 4], seed=6)
    with pytest.raises(ValueError, match=f"attention_mask must hold 0 and 1 only.*{shown}"):
        model.generate(ids, mask_of(mask), max_new_tokens=4)
    with pytest.raises(ValueError, match="attention_mask must hold 0 and 1 only"):
        model.stream(ids, mask_of(mask), max_new_tokens=4)
    want = model.generate(ids, mask, max_new_tokens=4)
    for same in (mask.bool(), mask.float(), mask.to(torch.uint8), mask.numpy()):
        assert torch.equal(model.generate(ids, same, max_new_tokens=4), want)


def test_an_open_batch_steps_takes_numpy_and_torch_integers(model):
    """join(), can_join() and generate() took np.int64; steps() said "takes a positive
    integer, got 2"."""
    with model.open_batch([[5, 6, 7]], max_new_tokens=10, eos_token_id=[], rows=4) as batch:
        assert len(batch.steps(np.int64(2))) == 2
        assert len(batch.steps(torch.tensor(3))) == 3
        with pytest.raises(ValueError, match="positive integer"):
            batch.steps(np.bool_(True))


def test_num_beams_is_refused_naming_the_speech_pipeline_that_passes_it():
    """HF's automatic-speech-recognition pipeline adds num_beams=5 to every generate call:
    the refusal says how to turn it off there."""
    with pytest.raises(TypeError, match=r"num_beams=5.*generate_kwargs=\{\"num_beams\": 1\}"):
        refuse_hf_options("generate", {"num_beams": 5})
    refuse_hf_options("generate", {"num_beams": 1})  # the neutral value is taken


def test_sampling_without_a_seed_draws_from_torch_rng_as_hugging_face(model):
    """Without a seed, a sampled call drew with seed 0: two calls in a row gave one answer
    and torch.manual_seed changed nothing. As in HF, the draws follow torch's RNG now."""
    prompt = [[5, 6, 7, 8, 9]]
    kw = dict(max_new_tokens=12, do_sample=True, temperature=3.0, top_k=0, eos_token_id=[])
    torch.manual_seed(1)
    first = model.generate(prompt, **kw)
    assert not torch.equal(model.generate(prompt, **kw), first)  # the next call draws anew
    torch.manual_seed(1)
    assert torch.equal(model.generate(prompt, **kw), first)  # manual_seed repeats it
    torch.manual_seed(1)
    assert torch.equal(torch.stack(list(model.stream(prompt, **kw)), 1), first[:, 5:])
    torch.manual_seed(2)
    assert not torch.equal(model.generate(prompt, **kw), first)
    assert torch.equal(model.generate(prompt, **kw, seed=7), model.generate(prompt, **kw, seed=7))
    torch.manual_seed(3)
    model.generate(prompt, max_new_tokens=3)  # greedy: the caller's RNG stream is untouched
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(4), after)


def _rng_untouched(call) -> None:
    torch.manual_seed(5)
    want = torch.rand(4)
    torch.manual_seed(5)
    call()
    assert torch.equal(torch.rand(4), want)


@pytest.mark.parametrize("method", ["generate", "stream", "open_batch"])
@pytest.mark.parametrize(
    "bad",
    [dict(max_new_tokens=1000), dict(temperature=-1.0), dict(input_ids=[[5, 500]])],
    ids=["past_the_cache", "temperature", "id_out_of_range"],
)
def test_a_refused_sampled_call_leaves_torchs_rng_where_it_was(model, method, bad):
    """The seed of an unseeded sampled call was drawn before its arguments were checked: a
    refused call moved torch's global RNG, so the next unseeded call (and the caller's own
    draws) differed from a process that never saw it. HF checks before it samples."""
    kw = dict(input_ids=[[5, 6, 7]], max_new_tokens=4, do_sample=True) | bad

    def refused():
        with pytest.raises(ValueError):
            getattr(model, method)(**kw)

    _rng_untouched(refused)
    # a join refused, or told "not now" (None), draws nothing either
    with model.open_batch([[5, 6, 7]], max_new_tokens=8, rows=4, do_sample=True) as batch:
        _rng_untouched(lambda: pytest.raises(ValueError, batch.join, [5, 500], 3))
        # a prompt longer than the batch's slot (8): not now
        long_prompt = list(range(5, 15))
        _rng_untouched(lambda: batch.join(long_prompt, 3) is None or pytest.fail("joined"))


def test_a_joiner_samples_with_the_batch_arguments_unless_it_gives_its_own(model):
    """join() left its temperature, top-k and top-p at generate's defaults (top_k 50) whatever
    the batch was opened with: top_k=1 makes the batch's sampling greedy decoding, and a
    joiner that names none samples as the batch does."""
    p0, p1 = [5, 6, 7, 8, 9], [11, 12, 13]
    want = model.generate([p1], max_new_tokens=6, eos_token_id=[])[0, 3:].tolist()
    hot = dict(do_sample=True, temperature=50.0, top_k=1, eos_token_id=[])
    for own, same in (({}, True), ({"top_k": 0}, False)):
        with model.open_batch([p0], max_new_tokens=6, rows=4, **hot) as batch:
            row, first = batch.join(p1, max_new_tokens=6, seed=3, **own)
            tokens = [first]
            while row in batch.rows:
                tokens += [t for r, t in batch.step() if r == row]
        assert (tokens == want) is same


def test_compile_from_python_warns_that_beam_search_is_not_run(tmp_path):
    """The compile said "num_beams=4 is not applied" to its progress only: compile() from
    Python, with no progress, said nothing, and kernl's greedy ids then differed from HF's
    beam search without a word (kernl-compile printed it)."""
    model = tiny_model("llama3")
    model.generation_config.num_beams = 4
    with pytest.warns(UserWarning, match="num_beams=4 is not applied"):
        kernl.compiler.compile(
            model, "batch=1 prompt=8 cache=16", tmp_path / "a", dtype="fp32", device="cpu"
        )
    said = []
    kernl.compiler.compile(
        model, "batch=1 prompt=8 cache=16", tmp_path / "b", dtype="fp32", device="cpu",
        progress=said.append,
    )  # fmt: skip
    assert any("num_beams=4 is not applied" in line for line in said)
