"""Bad input at call time: each bad call is served correctly or refused with a clear error,
and a good call after it still matches eager PyTorch (no call leaves the model unusable)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import kernl.artifacts
import kernl.compiler
import kernl.runtime

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=120,
    max_position_embeddings=80,
)
TOL = 2e-5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(**SMALL)).eval()
    out = tmp_path_factory.mktemp("bad_inputs") / "bert.kernl"
    kernl.compiler.compile(model, "batch=1,2 seq=8,16", out, dtype="fp32", device="cpu")
    return model, kernl.runtime.load(out, device="cpu")


NAN = float("nan")


def _ids(b, s, seed=1):
    return torch.randint(3, 120, (b, s), generator=torch.Generator().manual_seed(seed))


def _assert_matches_eager(model, compiled, **inputs):
    got = compiled(**inputs)
    with torch.no_grad():
        want = model(**inputs)
    for name in ("last_hidden_state", "pooler_output"):
        err = (got[name] - want[name]).abs().max().item()
        assert err < TOL, f"{name}: max |error| {err}"


def _good_call_after(served):
    model, compiled = served
    ids = _ids(2, 11, seed=7)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    _assert_matches_eager(model, compiled, input_ids=ids, attention_mask=mask)


REFUSED = {
    "missing input_ids": (
        lambda: dict(attention_mask=torch.ones(1, 4, dtype=torch.long)),
        TypeError,
        "missing required input 'input_ids'",
    ),
    "unexpected keyword": (
        lambda: dict(input_ids=_ids(1, 4), labels=_ids(1, 4)),
        TypeError,
        "unexpected input(s) ['labels']; this model takes ['input_ids', 'attention_mask', "
        "'token_type_ids'] (kernl serves inference: it computes no loss",
    ),
    "float ids": (
        lambda: dict(input_ids=_ids(1, 4).float()),
        TypeError,
        "must hold integers, got torch.float32",
    ),
    "rank 1": (lambda: dict(input_ids=_ids(1, 4)[0]), ValueError, "must have 2 dimensions"),
    "rank 3": (lambda: dict(input_ids=_ids(1, 4)[None]), ValueError, "must have 2 dimensions"),
    "tensor on another device": (
        lambda: dict(input_ids=torch.zeros(1, 4, dtype=torch.long, device="meta")),
        ValueError,
        "is on meta; this model runs on cpu and takes tensors on the CPU",
    ),
    "batch 0": (
        lambda: dict(input_ids=torch.zeros(0, 4, dtype=torch.long)),
        ValueError,
        "empty input",
    ),
    "sequence 0": (
        lambda: dict(input_ids=torch.zeros(1, 0, dtype=torch.long)),
        ValueError,
        "empty input",
    ),
    "longer than every bucket": (
        lambda: dict(input_ids=_ids(1, 17)),
        ValueError,
        "larger than every bucket",
    ),
    "batch larger than every bucket": (
        lambda: dict(input_ids=_ids(3, 8)),
        ValueError,
        "1x8, 1x16, 2x8, 2x16",
    ),
    "token id past the vocabulary": (
        lambda: dict(input_ids=torch.tensor([[5, 120]])),
        ValueError,
        "input_ids must lie in [0, 120)",
    ),
    "negative token id": (
        lambda: dict(input_ids=torch.tensor([[-1, 5]])),
        ValueError,
        "input_ids must lie in [0, 120)",
    ),
    "token type past its table": (
        lambda: dict(input_ids=_ids(1, 4), token_type_ids=torch.full((1, 4), 2)),
        ValueError,
        "token_type_ids must lie in [0, 2)",
    ),
    "mask of twos": (
        lambda: dict(input_ids=_ids(1, 4), attention_mask=torch.full((1, 4), 2)),
        ValueError,
        "attention_mask must lie in [0, 2)",
    ),
    "mask of another shape": (
        lambda: dict(input_ids=_ids(1, 4), attention_mask=torch.ones(1, 5, dtype=torch.long)),
        ValueError,
        "has shape (1, 5), input_ids has (1, 4)",
    ),
    "a string": (lambda: dict(input_ids="hello"), TypeError, "must be a tensor"),
    "attentions asked for": (
        lambda: dict(input_ids=_ids(1, 4), output_attentions=True),
        ValueError,
        "output_attentions=True: a kernl artifact returns the model's outputs only",
    ),
    "hidden states asked for": (
        lambda: dict(input_ids=_ids(1, 4), output_hidden_states=True),
        ValueError,
        "output_hidden_states=True",
    ),
    # Hugging Face's models differ on a float mask's other values (BERT keeps any nonzero key,
    # ESM and DeBERTa weigh keys by the value): refused as an integer mask holding them is
    "a float mask holding 2": (
        lambda: dict(input_ids=_ids(1, 4), attention_mask=torch.tensor([[1.0, 1.0, 2.0, 0.0]])),
        ValueError,
        "attention_mask must hold 0 and 1 only, got values in [0, 2]",
    ),
    "a float mask holding 0.5": (
        lambda: dict(input_ids=_ids(1, 4), attention_mask=torch.tensor([[1.0, 0.5, 1.0, 0.0]])),
        ValueError,
        "attention_mask must hold 0 and 1 only, got values in [0, 1]",
    ),
    "a float mask holding NaN": (  # its range was shown as [nan, nan]
        lambda: dict(input_ids=_ids(1, 4), attention_mask=torch.tensor([[1.0, 1.0, 1.0, NAN]])),
        ValueError,
        "attention_mask must hold 0 and 1 only, and it holds NaN",
    ),
    "bool ids": (  # eager's embedding refuses them; here a mask passed as the ids
        lambda: dict(input_ids=torch.tensor([[True, False, True, True]])),
        TypeError,
        "input 'input_ids' must hold integers, got torch.bool",
    ),
    "bool token types": (
        lambda: dict(input_ids=_ids(1, 4), token_type_ids=torch.zeros(1, 4, dtype=torch.bool)),
        TypeError,
        "input 'token_type_ids' must hold integers, got torch.bool",
    ),
    "a complex mask": (  # float masks of 0 and 1 are taken as HF takes them, not these
        lambda: dict(input_ids=_ids(1, 4), attention_mask=torch.full((1, 4), 0.5j)),
        TypeError,
        "attention_mask' must hold integers, got torch.complex64",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_bad_call_is_refused_clearly_and_the_next_call_is_right(name, served):
    make, error, message = REFUSED[name]
    with pytest.raises(error) as info:
        served[1](**make())
    assert message in str(info.value)
    _good_call_after(served)


def _non_contiguous():
    ids = _ids(9, 2).t()  # a (2, 9) view with strides (1, 2)
    assert not ids.is_contiguous()
    return dict(input_ids=ids)


def _all_zero_mask():
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1] = 0
    return dict(input_ids=ids, attention_mask=mask)


SERVED = {
    "non-contiguous tensor": _non_contiguous,
    "int32 ids": lambda: dict(input_ids=_ids(2, 5).int()),
    "bool mask": lambda: dict(
        input_ids=_ids(1, 5), attention_mask=torch.tensor([[True] * 3 + [False] * 2])
    ),
    "python lists": lambda: dict(input_ids=[[5, 6, 7]], attention_mask=[[1, 1, 0]]),
    "a row whose mask is all zeros": _all_zero_mask,
    "a mask of all zeros": lambda: dict(
        input_ids=_ids(1, 4), attention_mask=torch.zeros(1, 4, dtype=torch.long)
    ),
    "exactly the largest bucket": lambda: dict(input_ids=_ids(2, 16)),
    # Hugging Face takes these; they were refused ("must hold integers") or crashed in the
    # range check (torch has no aminmax for wide unsigned integers)
    "float mask": lambda: dict(
        input_ids=_ids(1, 5), attention_mask=torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    ),
    "uint16 ids": lambda: dict(input_ids=_ids(2, 5).to(torch.uint16)),
    "uint32 ids": lambda: dict(input_ids=_ids(2, 5).to(torch.uint32)),
    "a reversed numpy view": lambda: dict(input_ids=_ids(1, 6).numpy()[:, ::-1]),
    "neutral Hugging Face options": lambda: dict(
        input_ids=_ids(1, 5), output_attentions=False, output_hidden_states=None
    ),
    # `model(**tokenizer(texts, return_offsets_mapping=True, return_special_tokens_mask=True,
    # return_length=True))`: HF's forward swallows them (they were "unexpected input(s)")
    "a tokenizer's extra outputs": lambda: dict(
        input_ids=_ids(2, 5),
        attention_mask=torch.ones(2, 5, dtype=torch.long),
        special_tokens_mask=torch.zeros(2, 5, dtype=torch.long),
        offset_mapping=torch.zeros(2, 5, 2, dtype=torch.long),
        length=torch.tensor([5, 5]),
    ),
}


@pytest.mark.parametrize("name", list(SERVED))
def test_unusual_call_is_served_like_eager(name, served):
    model, compiled = served
    inputs = SERVED[name]()
    eager_inputs = {
        k: torch.tensor(v.tolist() if hasattr(v, "tolist") else v).long()
        for k, v in inputs.items()
        if not k.startswith("output_")
    }
    got = compiled(**inputs)
    with torch.no_grad():
        want = model(**eager_inputs)
    err = (got.last_hidden_state - want.last_hidden_state).abs().max().item()
    assert err < TOL, f"max |error| {err}"
    _good_call_after(served)


def test_an_error_inside_a_run_leaves_the_model_usable(served, monkeypatch):
    """A failure in the middle of a replay (here: an op raising) must not poison the static
    buffers or the lock."""
    model, compiled = served
    runner = compiled._runners[compiled.buckets[0]]

    def boom(_inputs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(runner.executor, "run", boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        compiled(input_ids=_ids(1, 3))
    monkeypatch.undo()
    _assert_matches_eager(model, compiled, input_ids=_ids(1, 3))
    _good_call_after(served)


def test_inputs_can_be_given_positionally_in_hugging_faces_order(served):
    """`model(ids)` and `model(ids, mask)` as Hugging Face users call it."""
    model, compiled = served
    ids = _ids(2, 11, seed=5)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    # HF's position_ids and head_mask as None: not given (they were "at most 3 positional")
    for args in [(ids,), (ids, mask), (ids, mask, types), (ids, mask, types, None, None)]:
        got = compiled(*args).last_hidden_state
        with torch.no_grad():
            want = model(*args).last_hidden_state
        assert (got - want).abs().max().item() < TOL
    assert torch.equal(
        compiled(ids, attention_mask=mask).last_hidden_state,
        compiled(input_ids=ids, attention_mask=mask).last_hidden_state,
    )
    with pytest.raises(TypeError, match="at most 3 positional input"):
        compiled(ids, mask, types, types)
    with pytest.raises(TypeError, match="'input_ids' given both positionally and by name"):
        compiled(ids, input_ids=ids)
    _good_call_after(served)


def test_positional_inputs_follow_the_models_own_order(tmp_path):
    """RoCBert's forward takes (input_ids, input_shape_ids, input_pronunciation_ids,
    attention_mask, token_type_ids): kernl read any model's positional inputs as (input_ids,
    attention_mask, token_type_ids), so `model(ids, shape_ids, pronunciation_ids)` served the
    shape ids as the mask, silently (3.5 off). The compiler records the model's order."""
    torch.manual_seed(0)
    config = T.RoCBertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=32,
        shape_vocab_size=20,
        pronunciation_vocab_size=20,
    )
    model = T.RoCBertModel(config).eval()
    out = tmp_path / "rocbert.kernl"
    kernl.compiler.compile(model, "batch=2 seq=16", out, dtype="fp32", device="cpu")
    assert kernl.artifacts.read_manifest(out).format_version == 2  # older readers refuse it
    compiled = kernl.runtime.load(out)
    ids = _ids(2, 11, seed=5)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    zeros = torch.zeros_like(ids)
    for args in [(ids,), (ids, None, None, mask), (ids, None, None, mask, zeros)]:
        with torch.no_grad():
            want = model(*args).last_hidden_state
        assert (compiled(*args).last_hidden_state - want).abs().max().item() < TOL
    with pytest.raises(TypeError, match="input_shape_ids"):  # not an input it serves
        compiled(ids, zeros, zeros)
    # compiled before kernl recorded the order: `model(ids, mask)` read the mask as
    # attention_mask where RoCBert's forward takes it as input_shape_ids (review 2026-12-07)
    import msgpack

    from kernl.artifacts import pack_manifest

    manifest = msgpack.unpackb((out / "manifest.msgpack").read_bytes(), raw=False)
    manifest["extra"].pop("positional_inputs")
    manifest["format_version"] = 1
    (out / "manifest.msgpack").write_bytes(pack_manifest(manifest))
    older = kernl.runtime.load(out)
    with pytest.raises(TypeError, match="does not record its forward's order.*by name"):
        older(ids, mask)
    want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    got = older(ids, attention_mask=mask).last_hidden_state
    assert (got - want).abs().max().item() < TOL


class _Gpt2Pooled(torch.nn.Module):
    """A user's wrapper over GPT-2 (whose own forward takes the cache second) that takes
    (input_ids, attention_mask): the usual order, for a family the runtime knows as unusual."""

    def __init__(self):
        super().__init__()
        config = T.GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=120, n_positions=32)
        self.gpt = T.GPT2Model(config)
        self.config = config

    def forward(self, input_ids, attention_mask=None, return_dict=True):
        return self.gpt(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)


def test_the_usual_order_is_recorded_too_and_stays_format_1(served, tmp_path):
    """Unrecorded, a new artifact of a family whose forward's order is unusual (GPT-2) read as
    one from an older kernl: the wrapper's `model(ids, mask)` was refused, telling the user to
    recompile (review 2026-12-07). A usual order is recorded too, in a version-1 artifact."""
    _, compiled = served
    assert compiled.manifest.extra["positional_inputs"] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    assert compiled.manifest.format_version == 1
    torch.manual_seed(0)
    wrapper = _Gpt2Pooled().eval()
    out = tmp_path / "gpt2.kernl"
    kernl.compiler.compile(wrapper, "batch=2 seq=16", out, dtype="fp32", device="cpu")
    assert kernl.artifacts.read_manifest(out).format_version == 1
    ids = _ids(2, 11, seed=4)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = wrapper(ids, mask)["last_hidden_state"]
    got = kernl.runtime.load(out, device="cpu")(ids, mask).last_hidden_state
    assert (got - want)[mask.bool()].abs().max().item() < TOL


class _MaskFirst(torch.nn.Module):
    """A user's wrapper whose forward takes the mask before the ids."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert
        self.config = bert.config

    def forward(self, attention_mask=None, input_ids=None, return_dict=True):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask)


def test_a_forward_taking_input_ids_after_another_input_compiles_and_reads_its_order(
    served, tmp_path
):
    """The manifest check wanted a recorded positional order to start with input_ids: a
    wrapper `forward(attention_mask, input_ids)` failed its compile on kernl's own artifact."""
    model, _ = served
    out = tmp_path / "mask_first.kernl"
    kernl.compiler.compile(
        _MaskFirst(model).eval(), "batch=2 seq=16", out, dtype="fp32", device="cpu"
    )
    compiled = kernl.runtime.load(out, device="cpu")
    ids = _ids(2, 11, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    got = compiled(mask, ids).last_hidden_state
    assert (got - want).abs().max().item() < TOL


def test_a_call_too_long_only_by_its_padding_is_told_to_pad_to_the_longest(served):
    """A tokenizer's padding="max_length" makes a 12-token text 32 long: the refusal named the
    buckets only, not why a short text did not fit."""
    _, compiled = served
    ids = _ids(1, 32)
    mask = torch.zeros_like(ids)
    mask[:, :12] = 1
    with pytest.raises(ValueError, match=r"at most 12 real tokens a row: pad to the longest"):
        compiled(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"recompile with a larger bucket$"):
        compiled(input_ids=ids, attention_mask=torch.ones_like(ids))  # all real: no hint
    mask[:, :20] = 1  # 20 real tokens: padding to the longest would not fit either
    with pytest.raises(ValueError, match=r"recompile with a larger bucket$"):
        compiled(input_ids=ids, attention_mask=mask)
    ids = _ids(4, 16)  # batch 4 fits no bucket at any length: the padding is not the cause
    mask = torch.zeros_like(ids)
    mask[:, :6] = 1
    with pytest.raises(ValueError, match=r"recompile with a larger bucket$"):
        compiled(input_ids=ids, attention_mask=mask)
    _good_call_after(served)


def test_return_dict_false_gives_a_tuple_as_in_hugging_face(served):
    model, compiled = served
    ids = _ids(2, 7)
    got = compiled(ids, return_dict=False)
    want = compiled(ids)
    assert isinstance(got, tuple) and len(got) == len(want)
    for g, w in zip(got, want.to_tuple()):
        assert torch.equal(g, w)
    assert compiled(input_ids=ids, return_dict=True).keys() == want.keys()
    with pytest.raises(TypeError, match="return_dict must be True, False or None"):
        compiled(ids, return_dict="no")


def test_a_model_loaded_under_inference_mode_serves_other_threads(served, tmp_path):
    """A server that loads under @torch.inference_mode() and calls from worker threads: every
    call failed ("Inplace update to inference tensor outside InferenceMode")."""
    import threading

    model = served[0]
    out = tmp_path / "bert.kernl"
    kernl.compiler.compile(model, "batch=1,2 seq=8", out, dtype="fp32", device="cpu")
    with torch.inference_mode():
        compiled = kernl.runtime.load(out, device="cpu")
        compiled(input_ids=_ids(1, 8))
    results = []
    worker = threading.Thread(target=lambda: results.append(compiled(input_ids=_ids(2, 5))))
    worker.start()
    worker.join()
    with torch.no_grad():
        want = model(input_ids=_ids(2, 5)).last_hidden_state
    assert (results[0].last_hidden_state - want).abs().max().item() < TOL
    _assert_matches_eager(model, compiled, input_ids=_ids(1, 8))


@pytest.mark.parametrize("device", ["meta", "mps", "CPU", "gpu", "", "cpu:1"])
def test_a_device_kernl_does_not_run_on_is_refused_before_reading(device, tmp_path):
    """mps was reported as a corrupt weights file, meta, "CPU", "gpu" and "" as torch's
    list of every device type; "cpu:1" was taken as the CPU."""
    with pytest.raises(ValueError, match=f"device='{device}': kernl runs artifacts on"):
        kernl.runtime.load(tmp_path / "missing", device=device)


def test_a_gpu_index_is_a_cuda_device(tmp_path):
    """device=0 is torch's accelerator index: a GPU, refused as such without one (it was
    torch's "Cannot access accelerator device")."""
    if torch.cuda.is_available():
        with pytest.raises(kernl.artifacts.ArtifactMissingError):
            kernl.runtime.load(tmp_path / "missing", device=0)
    else:
        with pytest.raises(RuntimeError, match="device='cuda' was asked for"):
            kernl.runtime.load(tmp_path / "missing", device=0)


def test_token_type_ids_for_a_model_without_token_types_are_ignored_as_in_hf(tmp_path):
    """A BERT-vocabulary tokenizer gives DistilBERT token_type_ids (1s for a pair's second
    text): HF's forward takes and ignores them; kernl refused every such call."""
    torch.manual_seed(0)
    config = T.DistilBertConfig(
        vocab_size=120, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=80
    )
    model = T.DistilBertModel(config).eval()
    kernl.compiler.compile(model, "batch=2 seq=8", tmp_path / "d", dtype="fp32", device="cpu")
    compiled = kernl.runtime.load(tmp_path / "d", device="cpu")
    ids = _ids(2, 7)
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    got = compiled(input_ids=ids, token_type_ids=types).last_hidden_state
    with torch.no_grad():
        want = model(input_ids=ids, token_type_ids=types).last_hidden_state
    assert (got - want).abs().max().item() < TOL
    with pytest.raises(TypeError, match=r"unexpected input\(s\) \['labels'\]"):
        compiled(input_ids=ids, token_type_ids=types, labels=ids)
    # GPT-2's forward adds them (through its word embeddings) and its artifact takes none:
    # still refused, not ignored
    gpt2 = T.GPT2ForSequenceClassification(
        T.GPT2Config(vocab_size=120, n_embd=64, n_layer=2, n_head=4, n_positions=80, num_labels=3)
    ).eval()
    gpt2.config.pad_token_id = 0
    kernl.compiler.compile(gpt2, "batch=2 seq=8", tmp_path / "g", dtype="fp32", device="cpu")
    compiled = kernl.runtime.load(tmp_path / "g", device="cpu")
    with pytest.raises(TypeError, match=r"unexpected input\(s\) \['token_type_ids'\]"):
        compiled(input_ids=ids, token_type_ids=types)


@pytest.mark.parametrize("family", ["EuroBert", "Ultrabert"])
def test_token_type_ids_are_ignored_for_newer_families_whose_forward_ignores_them(tmp_path, family):
    """EuroBERT's and Ultrabert's forwards take **kwargs and ignore token_type_ids (as
    ModernBERT's): kernl refused a tokenizer's whole output for them."""
    if not hasattr(T, f"{family}Config"):
        pytest.skip(f"{family} is not in transformers {T.__version__} (an older 5.x)")
    torch.manual_seed(0)
    config = getattr(T, f"{family}Config")(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    model = getattr(T, f"{family}Model")(config).eval()
    kernl.compiler.compile(model, "batch=2 seq=8", tmp_path / "m", dtype="fp32", device="cpu")
    compiled = kernl.runtime.load(tmp_path / "m", device="cpu")
    ids = _ids(2, 7)
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    got = compiled(input_ids=ids, token_type_ids=types).last_hidden_state
    with torch.no_grad():
        want = model(input_ids=ids, token_type_ids=types).last_hidden_state
    assert (got - want).abs().max().item() < TOL
