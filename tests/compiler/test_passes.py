"""Each rewrite pass on its own: program before -> program after, and the rewritten program
computes what the original did. Patterns a pass cannot prove safe stay as they were."""

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from kernl.artifacts.schema import Bucket
from kernl.compiler.lower import lower
from kernl.compiler.passes import (
    fuse_linear,
    fuse_qkv,
    replace_attention,
    replace_layer_norm,
    rewrite,
)
from kernl.compiler.trace import FlatModel, export_bucket, model_signature
from kernl.runtime.executor import Executor

CPU = torch.device("cpu")


def ops(program):
    return Counter(i.op for i in program.instructions)


def export_module(module, *args):
    ep = torch.export.export(module.eval(), args, strict=False)
    names = [f"x{i}" for i in range(len(args))]
    program, weights = lower(ep, Bucket(1, 1), names)
    return program, weights, dict(zip(names, args))


def run(program, weights, inputs):
    return Executor(program, weights, CPU).run(inputs)


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
    )
    model = BertModel(cfg).eval()
    sig = model_signature(model, CPU)
    flat = FlatModel(model, [s.name for s in sig.inputs], [s.name for s in sig.outputs])
    program, weights = lower(
        export_bucket(flat, Bucket(2, 8), 100, CPU), Bucket(2, 8), flat.input_names
    )
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    return program, weights, inputs


def test_fuse_qkv_makes_one_linear_per_attention_block(bert):
    program, weights, inputs = bert
    weights = dict(weights)
    after = fuse_qkv(copy.deepcopy(program), weights)
    before_ops, after_ops = ops(program), ops(after)
    assert before_ops["aten.linear.default"] == 13  # 2 x (q, k, v, o, up, down) + pooler
    assert after_ops["aten.linear.default"] == 13 - 2 * 2
    assert after_ops["aten.split_with_sizes.default"] == 2
    fused = [n for n in weights if n.startswith("fused.")]
    assert len(fused) == 4 and weights[fused[0]].shape[0] == 3 * 64
    for a, b in zip(run(program, weights, inputs), run(after, weights, inputs)):
        torch.testing.assert_close(a, b)


def test_full_rewrite_of_bert(bert):
    program, weights, inputs = bert
    weights = dict(weights)
    after = rewrite(copy.deepcopy(program), weights)
    o = ops(after)
    assert o["kernl.linear"] == 2 * 4 + 1  # qkv, out, up, down per layer + pooler
    assert o["kernl.attention"] == 2 and o["kernl.layer_norm"] == 4
    assert o["kernl.bert_embeddings"] == 1 and "aten.embedding.default" not in o
    assert o["kernl.mask_to_bias"] == 1  # both layers read one bias
    biases = {i.args[3]["v"] for i in after.instructions if i.op == "kernl.attention"}
    assert len(biases) == 1
    assert "aten.linear.default" not in o and "aten.gelu.default" not in o
    assert "aten.scaled_dot_product_attention.default" not in o
    epilogues = Counter(
        (i.kwargs.get("activation"), "residual" in i.kwargs)
        for i in after.instructions
        if i.op == "kernl.linear"
    )
    # every residual add goes into the norm after it, so no GEMM carries one (one launch
    # fewer per add when the tuner keeps the GEMM on cuBLAS)
    # and the pooler's tanh goes into its dense layer
    assert epilogues == {("none", False): 6, ("gelu", False): 2, ("tanh", False): 1}
    norms = [i for i in after.instructions if i.op == "kernl.layer_norm"]
    assert sum("residual" in i.kwargs for i in norms) == 4
    float_adds = [
        i
        for i in after.instructions
        if i.op == "aten.add.Tensor" and after.meta["values"][i.outputs[0]][1] != "int64"
    ]
    assert float_adds == []  # the adds that remain build position ids
    assert len(after.instructions) < len(program.instructions)
    for a, b in zip(run(program, weights, inputs), run(after, weights, inputs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class LinearUsedTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        return (F.gelu(y) + y,)


def test_linear_whose_output_is_read_twice_keeps_its_activation_separate():
    program, weights, inputs = export_module(LinearUsedTwice(), torch.randn(3, 8))
    after = fuse_linear(copy.deepcopy(program))
    lin = [i for i in after.instructions if i.op == "kernl.linear"]
    assert len(lin) == 1 and lin[0].kwargs["activation"] == "none"
    assert "residual" not in lin[0].kwargs
    assert ops(after)["aten.gelu.default"] == 1
    torch.testing.assert_close(run(after, weights, inputs)[0], run(program, weights, inputs)[0])


class BroadcastAdd(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, r):
        return (torch.relu(self.lin(x)) + r,)


def test_residual_that_broadcasts_is_not_fused_but_the_activation_is():
    program, weights, inputs = export_module(BroadcastAdd(), torch.randn(3, 8), torch.randn(8))
    after = fuse_linear(copy.deepcopy(program))
    (lin,) = [i for i in after.instructions if i.op == "kernl.linear"]
    assert lin.kwargs["activation"] == "relu" and "residual" not in lin.kwargs
    assert ops(after)["aten.add.Tensor"] == 1
    torch.testing.assert_close(run(after, weights, inputs)[0], run(program, weights, inputs)[0])


class NormAndAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(16)

    def forward(self, x, r, q, float_mask):
        a = self.ln(x + r)
        b = F.layer_norm(x, (4, 16))  # over two axes: stays aten
        c = F.scaled_dot_product_attention(q, q, q, attn_mask=float_mask)  # additive
        d = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return (a, b, c, d)


def test_layer_norm_absorbs_the_residual_add_and_attention_takes_additive_masks():
    args = (
        torch.randn(2, 4, 16),
        torch.randn(2, 4, 16),
        torch.randn(1, 2, 5, 8),
        torch.randn(5, 5),
    )
    program, weights, inputs = export_module(NormAndAttention(), *args)
    after = replace_attention(replace_layer_norm(copy.deepcopy(program)))
    o = ops(after)
    assert o["kernl.layer_norm"] == 1 and o["aten.layer_norm.default"] == 1
    (ln,) = [i for i in after.instructions if i.op == "kernl.layer_norm"]
    assert "residual" in ln.kwargs and "aten.add.Tensor" not in o
    assert o["kernl.attention"] == 2 and o["aten.scaled_dot_product_attention.default"] == 0
    additive, causal = [i for i in after.instructions if i.op == "kernl.attention"]
    assert causal.args[5] is True and additive.args[3] is not None
    for a, b in zip(run(after, weights, inputs), run(program, weights, inputs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lq, lk", [(5, 5), (5, 9), (1, 7)])
def test_kernl_attention_aten_and_triton_agree_on_causal_with_mask(lq, lk):
    from kernl.runtime.kernl_ops import attention

    q, k, v = torch.randn(2, 4, lq, 32), torch.randn(2, 4, lk, 32), torch.randn(2, 4, lk, 32)
    mask = torch.rand(2, 1, lq, lk) > 0.3
    mask[..., 0] = True
    for m in (None, mask):
        a = attention(q, k, v, m, None, True, impl="aten")
        b = attention(q, k, v, m, None, True, impl="triton")
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
