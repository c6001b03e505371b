"""`kernl.compiler.compile` given a model object leaves it as it was (caller_model.py): its
parameters keep their objects, dtype and storage, its modules their training flags, the
caller's RNG stream goes on as if no compile ran, and no process setting is left changed."""

from __future__ import annotations

import os

import torch
import transformers as T

import kernl.runtime
from kernl.compiler import api

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=120,
    max_position_embeddings=32,
)


def test_compile_leaves_the_model_object_as_it_was(tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    torch.manual_seed(0)
    bert = T.BertModel(T.BertConfig(**SMALL))
    bert.train()
    bert.encoder.layer[1].eval()  # a mix of flags, each put back as it was
    flags = [m.training for m in bert.modules()]
    params = {n: (p, p.data_ptr(), p.dtype) for n, p in bert.named_parameters()}
    ids = torch.randint(3, 120, (1, 8), generator=torch.Generator().manual_seed(1))

    torch.manual_seed(7)
    said = []
    api.compile(
        bert, "batch=1 seq=8", tmp_path / "a", dtype="fp16", device="cpu", progress=said.append
    )
    after_compile = torch.rand(3)
    # compiled without dropout, as eval() runs: said (the difference from the original in
    # train() mode was silent)
    assert any("train() mode: compiled as in eval()" in line for line in said), said
    torch.manual_seed(7)
    assert torch.equal(after_compile, torch.rand(3))  # the caller's RNG stream, unmoved

    assert [m.training for m in bert.modules()] == flags
    for name, p in bert.named_parameters():
        assert (p, p.data_ptr(), p.dtype) == params[name], name
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    with torch.no_grad():
        want = bert.eval()(input_ids=ids).last_hidden_state
    assert want.dtype == torch.float32  # still the caller's fp32 model
    got = kernl.runtime.load(tmp_path / "a")(input_ids=ids)["last_hidden_state"]
    assert got.dtype == torch.float16
    assert (got.float() - want).abs().max() < 2e-2
