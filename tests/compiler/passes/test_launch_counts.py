"""Kernel launches per call (launch_counts.count_launches), on hand-built programs and on a
small BERT: what each implementation choice launches, copies counted only where a CUDA run
makes them, and what the passes save when the GEMMs stay on cuBLAS."""

import copy

import pytest
import torch
from program_builder import Builder
from transformers import BertConfig, BertModel

from kernl.artifacts.schema import Bucket
from kernl.compiler import passes as P
from kernl.compiler.launch_counts import count_launches
from kernl.compiler.lower import lower
from kernl.compiler.op_counts import count_ops
from kernl.compiler.trace import FlatModel, export_bucket, model_signature

CPU = torch.device("cpu")


def one_op(op, *args, shape, **kwargs):
    b = Builder("float16")
    ins = [b.input(f"a{i}", s) if isinstance(s, list) else s for i, s in enumerate(args)]
    return count_launches(b.program(b.op(op, *ins, shape=shape, **kwargs)))


@pytest.mark.parametrize(
    "activation, impl, residual, expected",
    [
        ("gelu", "aten", False, {"aten.addmm": 1, "aten.gelu": 1}),
        ("gelu_tanh", "aten", False, {"aten._addmm_activation": 1}),  # cuBLASLt epilogue
        ("relu", "aten", True, {"aten._addmm_activation": 1, "aten.add": 1}),
        ("none", "aten", True, {"aten.addmm": 1, "aten.add": 1}),
        ("gelu", "triton", True, {"triton": 1}),
    ],
)
def test_linear_launches_per_implementation(activation, impl, residual, expected):
    b = Builder("float16")
    x, w, bias = b.input("x", [2, 5, 8]), b.weight("w", [16, 8]), b.weight("b", [16])
    kw = {"activation": activation, "impl": impl}
    if residual:
        kw["residual"] = b.input("r", [2, 5, 16])
    y = b.op("kernl.linear", x, w, bias, shape=[2, 5, 16], **kw)
    c = count_launches(b.program(y))
    assert c.by_source == expected and c.total == sum(expected.values()) and c.exact


@pytest.mark.parametrize("impl, expected", [("aten", 2), ("triton", 1)])
def test_norm_with_residual_is_one_kernel_on_triton(impl, expected):
    b = Builder("float16")
    x, r = b.input("x", [2, 5, 16]), b.input("r", [2, 5, 16])
    y = b.op(
        "kernl.layer_norm",
        x,
        b.weight("w", [16]),
        b.weight("b", [16]),
        1e-5,
        shape=[2, 5, 16],
        residual=r,
        impl=impl,
    )
    assert count_launches(b.program(y)).total == expected


@pytest.mark.parametrize("attention, copies", [("kernl-triton", 0), ("aten", 0), ("contiguous", 1)])
def test_heads_merge_after_attention_copies_only_from_a_bhld_layout(attention, copies):
    b = Builder("float16")
    q = b.input("q", [2, 4, 5, 8])
    if attention == "kernl-triton":
        o = b.op("kernl.attention", q, q, q, None, None, False, shape=[2, 4, 5, 8], impl="triton")
    elif attention == "aten":
        o = b.op("aten.scaled_dot_product_attention.default", q, q, q, shape=[2, 4, 5, 8])
    else:
        o = b.op("aten.mul.Tensor", q, 2.0, shape=[2, 4, 5, 8])  # contiguous [B, H, L, D]
    t = b.op("aten.transpose.int", o, 1, 2, shape=[2, 5, 4, 8])
    m = b.op("aten.reshape.default", t, [2, 5, 32], shape=[2, 5, 32])
    c = count_launches(b.program(m))
    assert c.by_source.get("aten.clone", 0) == copies
    assert c.by_instruction["aten.reshape.default"] == copies
    assert c.total == 1 + copies


def test_views_launch_nothing():
    b = Builder()
    x = b.input("x", [2, 6])
    v = b.op("aten.view.default", x, [3, 4], shape=[3, 4])
    t = b.op("aten.transpose.int", v, 0, 1, shape=[4, 3])
    parts = b.op("aten.split_with_sizes.default", t, [1, 3], 0, shape=[[1, 3], [3, 3]])
    u = b.op("aten.unsqueeze.default", parts[1], 0, shape=[1, 3, 3])
    assert count_launches(b.program(u)).total == 0


@pytest.fixture(scope="module")
def bert_program():
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
    bucket = Bucket(2, 8)
    return lower(export_bucket(flat, bucket, 100, CPU), bucket, flat.input_names)


def _choose(program, linear, tanh=False):
    """Implementations as the H200 tuner chose them at BERT-base: GEMMs on cuBLAS, the rest on
    Triton; `tanh`: the FFN GELU taken as cuBLASLt's epilogue."""
    p = copy.deepcopy(program)
    for ins in p.instructions:
        if ins.op == "kernl.linear":
            ins.kwargs["impl"] = linear
            if tanh and ins.kwargs["activation"] == "gelu":
                ins.kwargs["activation"] = "gelu_tanh"
        elif ins.op != "kernl.mask_to_bias" and ins.op.startswith("kernl."):
            ins.kwargs["impl"] = "triton"
    return p


def test_bert_loses_the_neighbours_of_its_cublas_gemms(bert_program):
    program, weights = bert_program
    layers = 2
    # the order of passes before: linear epilogues took the residual adds
    old = P.fuse_qkv(copy.deepcopy(program), dict(weights))
    old = P.hoist_attention_mask(
        P.replace_attention(P.fuse_bert_embeddings(P.replace_layer_norm(P.fuse_linear(old))))
    )
    old = P.drop_dead(P.shorten_padding_mask(old))  # as `rewrite` does: only the order differs
    new = P.rewrite(copy.deepcopy(program), dict(weights))
    before = count_launches(_choose(old, "aten"))
    after = count_launches(_choose(new, "aten"))
    # two residual adds per layer no longer run as their own kernel on the aten GEMM path
    assert before.total - after.total == 2 * layers
    assert before.by_source["aten.add"] - after.by_source.get("aten.add", 0) == 2 * layers
    assert "aten.clone" not in after.by_source  # heads merge after attention: a view
    tanh = count_launches(_choose(new, "aten", tanh=True))
    # This program is fp32, where cuBLASLt's GELU epilogue is refused (13x stock PyTorch's
    # error on the H200): the GELUs stay apart; Triton's GEMM takes them in its epilogue.
    assert tanh.total == after.total
    # ... and the pooler's tanh (on cuBLAS the dense layer and its tanh stay two launches)
    assert count_launches(_choose(new, "triton")).total == after.total - layers - 1
    assert count_launches(program).total > before.total  # and all of it beats the aten graph


def test_compile_summary_counts_launches(bert_program):
    program, weights = bert_program
    new = _choose(P.rewrite(copy.deepcopy(program), dict(weights)), "triton")
    counts = count_ops(new)
    assert counts.launches == count_launches(new).total
    assert f"{counts.launches} kernel launches per call" in counts.describe()


@pytest.mark.gpu
@pytest.mark.slow  # about a minute on an H200
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_static_count_matches_what_the_profiler_sees(tmp_path, monkeypatch):
    """The compile summary's kernels/call against CUPTI's count of a loaded artifact's call.
    A call also copies its inputs in and its outputs out (a few kernels outside the graph),
    and cuBLAS may split a GEMM in two: the profiled count may exceed the static one a little,
    never fall below it."""
    from torch.profiler import ProfilerActivity, profile

    import kernl.compiler
    import kernl.runtime

    monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=2)).eval()
    out = tmp_path / "bert.kernl"
    report = kernl.compiler.compile(model, "batch=8 seq=128", out, dtype="fp16", device="cuda")
    static = report.buckets[0].counts.launches
    km = kernl.runtime.load(out)
    ids = torch.randint(0, 30000, (8, 128), device="cuda")
    x = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    for _ in range(3):
        km(**x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            km(**x)
        torch.cuda.synchronize()
    kernels = [
        e
        for e in prof.events()
        if e.device_type.name == "CUDA"
        and "memcpy" not in e.name.lower()
        and "memset" not in e.name.lower()
    ]
    profiled = len(kernels) / 5
    assert static <= profiled <= static + 8, (static, profiled, sorted({e.name for e in kernels}))
