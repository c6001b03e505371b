"""shorten_padding_mask: the attention bias made from `attention_mask != 0` as [B, 1, 1, L]
where the traced mask is proved to be just that, and the mask's cone gone; masks that are
anything else (causal, reading a weight, read by another op) stay as they were."""

import copy
from collections import Counter

import pytest
import torch
from program_builder import Builder, run
from transformers import BertConfig, BertModel

from kernl.artifacts.schema import Bucket
from kernl.compiler.launch_counts import count_launches
from kernl.compiler.lower import lower
from kernl.compiler.passes import rewrite, shorten_padding_mask
from kernl.compiler.trace import FlatModel, export_bucket, model_signature
from kernl.runtime.executor import Executor

CPU = torch.device("cpu")
B, L, H = 2, 5, 4
QS = [B, H, L, 8]


def padding_mask_cone(b, mask, *, causal=False, weight=None):
    """What transformers' sdpa_mask traces to (an index of the [B, L] mask by batch and key
    aranges, and-ed with all-ones), optionally and-ed with a causal or a weight."""
    keep = b.op("aten.to.dtype", mask, {"dtype": "bool"}, shape=[B, L], dtype="bool")
    bi = b.op("aten.arange.default", B, shape=[B], dtype="int64")
    ki = b.op("aten.arange.default", L, shape=[L], dtype="int64")
    bi4 = b.op("aten.view.default", bi, [B, 1, 1, 1], shape=[B, 1, 1, 1], dtype="int64")
    ki4 = b.op("aten.view.default", ki, [1, 1, 1, L], shape=[1, 1, 1, L], dtype="int64")
    picked = b.op("aten.index.Tensor", keep, [bi4, ki4], shape=[B, 1, 1, L], dtype="bool")
    qi4 = b.op("aten.view.default", ki, [1, 1, L, 1], shape=[1, 1, L, 1], dtype="int64")
    ones = b.op("aten.ge.Scalar", qi4, 0, shape=[1, 1, L, 1], dtype="bool")
    m = b.op("aten.__and__.Tensor", ones, picked, shape=[B, 1, L, L], dtype="bool")
    if causal:
        tri = b.op("aten.le.Tensor", ki4, qi4, shape=[1, 1, L, L], dtype="bool")
        m = b.op("aten.__and__.Tensor", m, tri, shape=[B, 1, L, L], dtype="bool")
    if weight is not None:
        m = b.op("aten.__and__.Tensor", m, weight, shape=[B, 1, L, L], dtype="bool")
    return b.op("aten.expand.default", m, [B, H, L, L], shape=[B, H, L, L], dtype="bool")


def attention_over(b, q, mask, name="out"):
    bias = b.op("kernl.mask_to_bias", mask, {"dtype": "float32"}, shape=[B, H, L, L])
    return b.op("kernl.attention", q, q, q, bias, None, False, shape=QS, name=name), bias


def padded_masks():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return [right, right.flip(1), torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 1, 1]])]


def test_a_padding_mask_becomes_one_comparison_and_a_broadcast_bias():
    b = Builder()
    q, mask = b.input("q", QS), b.input("attention_mask", [B, L], dtype="int64")
    out, _ = attention_over(b, q, padding_mask_cone(b, mask))
    before = b.program(out)
    after = shorten_padding_mask(copy.deepcopy(before))
    ops = Counter(i.op for i in after.instructions)
    assert ops == {
        "aten.ne.Scalar": 1,
        "aten.unsqueeze.default": 2,
        "kernl.mask_to_bias": 1,
        "kernl.attention": 1,
    }
    (bias,) = [i.outputs[0] for i in after.instructions if i.op == "kernl.mask_to_bias"]
    assert after.meta["values"][bias] == [[B, 1, 1, L], "float32"]
    q_value = torch.randn(QS)
    for m in padded_masks():
        inputs = {"q": q_value, "attention_mask": m}
        (want,), (got,) = run(before, b.tensors, inputs), run(after, b.tensors, inputs)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["causal", "weight"])
def test_a_mask_that_is_more_than_padding_stays(kind):
    b = Builder()
    q, mask = b.input("q", QS), b.input("attention_mask", [B, L], dtype="int64")
    w = b.weight("w", [1, 1, L, L], dtype="bool") if kind == "weight" else None
    out, _ = attention_over(b, q, padding_mask_cone(b, mask, causal=kind == "causal", weight=w))
    before = b.program(out)
    after = shorten_padding_mask(copy.deepcopy(before))
    assert b.show(after) == b.show(before)


@pytest.mark.parametrize("reader", ["add", "attention's query"])
def test_a_bias_read_other_than_as_an_attention_mask_stays(reader):
    b = Builder()
    q, mask = b.input("q", QS), b.input("attention_mask", [B, L], dtype="int64")
    att, bias = attention_over(b, q, padding_mask_cone(b, mask))
    if reader == "add":
        out = b.op("aten.add.Tensor", att, bias, shape=QS, name="out")
    else:
        out = b.op("kernl.attention", bias, att, att, bias, None, False, shape=QS, name="out")
    before = b.program(out)
    assert b.show(shorten_padding_mask(copy.deepcopy(before))) == b.show(before)


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    cfg.vocab_size = 100
    model = BertModel(cfg).eval()
    sig = model_signature(model, CPU)
    flat = FlatModel(model, [s.name for s in sig.inputs], [s.name for s in sig.outputs])
    bucket = Bucket(2, 8)
    program, weights = lower(export_bucket(flat, bucket, 100, CPU), bucket, flat.input_names)
    return model, program, weights


def test_bert_mask_is_built_in_one_comparison_and_computes_the_same(bert):
    model, program, weights = bert
    weights = dict(weights)
    after = rewrite(copy.deepcopy(program), weights)
    ops = Counter(i.op for i in after.instructions)
    # transformers' mask code (aranges, index, ands, the head index it never reads) is gone
    assert "aten.arange.default" not in ops and "aten.index.Tensor" not in ops
    assert ops["aten.ne.Scalar"] == 1 and ops["kernl.mask_to_bias"] == 1
    launches = count_launches(after).by_source
    assert launches.get("aten.arange", 0) == 0 and launches.get("aten.__and__", 0) == 0
    ids = torch.randint(0, 100, (2, 8))
    for mask in (
        torch.ones(2, 8, dtype=torch.long),
        torch.tensor([[1] * 5 + [0] * 3, [0, 0] + [1] * 6]),
    ):
        inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
        got = Executor(after, weights, CPU).run(inputs)
        with torch.no_grad():
            want = model(**inputs)
        torch.testing.assert_close(got[0], want.last_hidden_state, atol=1e-5, rtol=1e-5)
