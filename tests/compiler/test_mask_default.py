"""A model that masks its own pad tokens when called without an attention mask (DPR's
encoders: `input_ids != pad_token_id`) gets a required mask: kernl's default of ones served
its pad tokens as real ones (7.9e-3 from eager on a tiny model, review 2026-12-07). A model
whose maskless call is its call with a mask of ones (BERT) keeps the default."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import kernl.compiler
import kernl.runtime
from kernl.artifacts import read_manifest
from kernl.serving.batching import measure_costs
from kernl.serving.protocol import ModelLimits, RequestError, parse_request

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=120,
    max_position_embeddings=80,
)


def _compile(model, tmp_path):
    out = tmp_path / "model.kernl"
    kernl.compiler.compile(model, "batch=1,2 seq=8,16", out, dtype="fp32", device="cpu")
    return out


def _defaults(path) -> dict[str, str]:
    return {s.name: s.default for s in read_manifest(path).inputs}


def test_dpr_requires_the_mask_it_would_derive_itself(tmp_path):
    torch.manual_seed(0)
    dpr = T.DPRQuestionEncoder(T.DPRConfig(**SMALL, pad_token_id=0)).eval()
    path = _compile(dpr, tmp_path)
    assert _defaults(path)["attention_mask"] == "required"

    model = kernl.runtime.load(path, device="cpu")
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[1, 7:] = 0  # right-padded as a tokenizer pads
    with pytest.raises(TypeError, match="missing required input 'attention_mask'"):
        model(input_ids=ids)
    mask = (ids != 0).long()
    with torch.no_grad():
        want = dpr(input_ids=ids).pooler_output  # eager masks the pads itself
    got = model(input_ids=ids, attention_mask=mask)["pooler_output"]
    assert (got - want).abs().max().item() < 2e-5

    limits = ModelLimits.from_manifest(model.manifest, max_rows=2)
    with pytest.raises(RequestError, match="lacks 'attention_mask', which this model requires"):
        parse_request(b'{"input_ids": [5, 6, 7]}', limits)
    assert parse_request(b'{"input_ids": [5, 6], "attention_mask": [1, 1]}', limits).rows
    assert set(measure_costs(model, repeats=1)) == set(model.buckets)


def test_bert_keeps_a_default_mask_of_ones(tmp_path):
    torch.manual_seed(0)
    bert = T.BertModel(T.BertConfig(**SMALL)).eval()
    assert _defaults(_compile(bert, tmp_path))["attention_mask"] == "ones"


MOBILE = dict(SMALL, hidden_size=32, num_attention_heads=2, intermediate_size=64)
MOBILE.update(embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16)


def test_a_model_reading_past_a_calls_end_is_refused_unless_its_pad_row_reads_as_zeros(tmp_path):
    """MobileBERT's trigram embeddings read the next token's row: eager reads zeros past a
    call's end, kernl the pad token's row where it pads a call to its bucket. A trained pad
    row (nonzero) served every shorter call wrong at its last token (0.17 from eager)."""
    torch.manual_seed(0)
    mobile = T.MobileBertModel(T.MobileBertConfig(**MOBILE)).eval()
    assert not mobile.embeddings.word_embeddings.weight[0].any()  # a fresh model's: zeros
    path = _compile(mobile, tmp_path)  # compiles: the zeros eager reads
    model = kernl.runtime.load(path, device="cpu")
    ids = torch.randint(3, 120, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = mobile(input_ids=ids).last_hidden_state
    assert (model(input_ids=ids)["last_hidden_state"] - want).abs().max().item() < 2e-4

    with torch.no_grad():
        mobile.embeddings.word_embeddings.weight[0].normal_()
    with pytest.raises(ValueError, match="depends on the padding.*MobileBERT's trigram"):
        kernl.compiler.compile(mobile, "batch=1 seq=8", tmp_path / "m2", dtype="fp32", device="cpu")
