"""A process that compiles again and again (kernl.optimize in a notebook or a server) keeps
nothing of each compile: torch.fx's cache of generated source grew by every graph module the
export and the passes made (~1 MiB per compile of a 12-layer model), for good."""

from __future__ import annotations

import linecache

import pytest
import torch
import transformers as T

import kernl.compiler
from kernl.compiler.trace import generated_source_forgotten

cache = torch.fx.graph_module._loader.eval_cache


def _bert():
    torch.manual_seed(0)
    config = T.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=50, max_position_embeddings=16,
    )  # fmt: skip
    return T.BertModel(config).eval()


@pytest.mark.parametrize("kernels", [False, True])
def test_a_compile_leaves_no_generated_source_behind(tmp_path, kernels):
    out = tmp_path / "a.kernl"
    kernl.compiler.compile(_bert(), "batch=1 seq=8", out, dtype="fp32", device="cpu",
                           kernels=kernels)  # fmt: skip
    before = (set(cache), {k for k in linecache.cache if k.startswith("<eval_with_key>")})
    for _ in range(2):
        kernl.compiler.compile(_bert(), "batch=1,2 seq=8", out, dtype="fp32", device="cpu",
                               kernels=kernels)  # fmt: skip
    after = (set(cache), {k for k in linecache.cache if k.startswith("<eval_with_key>")})
    assert after == before


def test_what_the_block_did_not_add_stays():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))  # made before: the caller's own
    key = gm.forward.__code__.co_filename
    with generated_source_forgotten():
        inner = torch.fx.symbolic_trace(torch.nn.ReLU())
        assert inner.forward.__code__.co_filename in cache
    assert key in cache and inner.forward.__code__.co_filename not in cache
    assert inner(torch.tensor([-1.0, 2.0])).tolist() == [0.0, 2.0]  # its code still runs
