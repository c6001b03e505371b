"""cuBLAS's memset nodes as fill kernels (kernl/runtime/memset_nodes.py): which memsets a plan
replaces and how their values read as the fills' dtypes, on the CPU; on a GPU, a captured
graph of BERT-base's FFN1 GEMM at M = 4096 (cuBLAS zeroes its workspace first) edited, then
replayed bit for bit as captured, and a compiled BERT whose M = 4096 bucket has no memset."""

from __future__ import annotations

import pytest
import torch

from kernl.runtime.graph_edges import KERNEL, MEMSET
from kernl.runtime.memset_nodes import Fill, planned_fills


def test_one_row_memsets_are_planned_with_their_neighbours():
    # norm, memset, GEMM, then a two-row memset and a 16-byte-element one, which stay
    kinds = {1: KERNEL, 2: MEMSET, 3: KERNEL, 4: MEMSET, 5: MEMSET, 6: KERNEL}
    deps = {1: [], 2: [1], 3: [2], 4: [3], 5: [4], 6: [5]}
    memsets = {
        2: (0x1000, 4096, 0, 4, 1024, 1),
        4: (0x2000, 256, 0, 4, 64, 2),
        5: (0x3000, 64, 0, 16, 4, 1),
    }
    (fill,) = planned_fills(kinds, deps, memsets)
    assert fill == Fill(2, 0x1000, 4, 1024, 0, (1,), (3,))


def test_a_memset_with_several_dependents_keeps_them_all():
    kinds = {1: KERNEL, 2: MEMSET, 3: KERNEL, 4: KERNEL}
    deps = {1: [], 2: [1], 3: [2], 4: [2, 3]}
    (fill,) = planned_fills(kinds, deps, {2: (0x10, 2, 7, 2, 1, 1)})
    assert fill.before == (1,) and set(fill.after) == {3, 4}


@pytest.mark.parametrize(
    "size, value, want",
    [(4, 0, 0), (4, 0xFFFFFFFF, -1), (2, 0xFFFF, -1), (2, 0x7FFF, 0x7FFF), (1, 0x1FF, 0xFF)],
)
def test_the_memset_value_as_the_fill_dtype_holds_it(size, value, want):
    assert Fill(0, 0, size, 1, value, (), ()).signed_value() == want


def _hopper_or_newer() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper_or_newer(), reason="cuBLAS's memset GEMMs are Hopper's")
def test_gpu_ffn1_graph_without_memsets_replays_as_captured():
    from kernl.runtime.graph_edges import _Driver
    from kernl.runtime.graphs import capture_graph
    from kernl.runtime.memset_nodes import memsets_as_kernels

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 768, dtype=torch.float16, device="cuda", generator=g)
    w = torch.randn(3072, 768, dtype=torch.float16, device="cuda", generator=g) / 768**0.5
    b = torch.randn(3072, dtype=torch.float16, device="cuda", generator=g)

    def run():
        h = x
        for _ in range(3):
            h = torch._addmm_activation(b, h, w.t(), use_gelu=True)[:, :768].contiguous()
        return h

    def memsets(graph) -> int:
        driver = _Driver()
        return sum(driver.kind(n) == MEMSET for n in driver.nodes(graph.raw_cuda_graph()))

    found = {}

    def edit(graph):
        found["before"] = memsets(graph)
        found["replaced"] = memsets_as_kernels(graph, x.device)
        found["after"] = memsets(graph)

    pool = torch.cuda.graph_pool_handle()
    plain, want = capture_graph(run, pool)
    edited, got = capture_graph(run, torch.cuda.graph_pool_handle(), edit=edit)
    if not found["before"]:
        pytest.skip("this cuBLAS zeroes no workspace for this GEMM")
    assert found["replaced"] == found["before"] and found["after"] == 0
    for _ in range(3):
        plain.replay()
        edited.replay()
        torch.cuda.synchronize()
        assert torch.equal(want, got)
    assert torch.equal(got, run())


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper_or_newer(), reason="cuBLAS's memset GEMMs are Hopper's")
def test_gpu_bert_at_4096_tokens_loads_without_memsets(tmp_path):
    """Two BERT-base layers on aten (cuBLAS's GEMMs, no tuning) at 32x128: the loaded model's
    graphs hold no memset node, and its outputs equal those of the graphs as captured."""
    from transformers import BertConfig, BertModel

    import kernl.compiler
    import kernl.runtime
    from kernl.runtime.model import CompiledModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=2)).eval()
    path = tmp_path / "b.kernl"
    kernl.compiler.compile(model, "32x128", path, dtype="fp16", device="cuda", kernels=False)
    CompiledModel._memsets_as_kernels = False
    try:
        captured = kernl.runtime.load(path, device="cuda")
    finally:
        CompiledModel._memsets_as_kernels = True
    served = kernl.runtime.load(path, device="cuda")
    assert captured.memsets_replaced == 0 and served.side_work_error is None
    if not served.memsets_replaced:
        pytest.skip("this cuBLAS zeroes no workspace for BERT-base's GEMMs at 4096 tokens")
    ids = torch.randint(1000, 30000, (32, 128), device="cuda")
    mask = torch.ones_like(ids)
    mask[-1, 64:] = 0
    want = captured(input_ids=ids, attention_mask=mask).last_hidden_state
    got = served(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(want, got)
