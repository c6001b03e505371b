"""Programmatic dependent launch (kernels/pdl.py): the decode kernels take a USE_PDL
constexpr (gdc_wait before any read; gdc_launch_dependents right after it, or for the
weight-streaming kernels after their main loop) and Triton's launch_pdl option; a loaded artifact launches such binaries through cuLaunchKernelEx with the
programmatic-stream-serialization attribute (runtime/binaries.py).

The interpreter runs no inline PTX: there PDL is off (the launchers still take `pdl`, so the
decoder's code is the same). On a GPU, a decode-like chain of kernels in one CUDA graph must
compute bitwise what it computes without PDL (every split-K reduction is deterministic), from
Triton's JIT and from recorded binaries alike."""

from __future__ import annotations

import ctypes

import pytest
import torch
from kernel_check import DEVICE

from kernl.kernels import decode_attention as da
from kernl.kernels import launch
from kernl.kernels import lm_head_argmax as lm
from kernl.kernels import norm_linear as nl
from kernl.kernels import pdl as kpdl
from kernl.kernels import rope_cache_write as rc
from kernl.kernels import skinny_linear_fused as slf


def test_pdl_kwargs_and_prefetch_lines():
    w = torch.empty(4, 8, dtype=torch.float16)
    assert kpdl.prefetch_lines(False, 2048, w, object()) == 0
    assert kpdl.prefetch_lines(True, 2048, w, object()) == kpdl.MAX_PREFETCH_LINES
    assert kpdl.prefetch_lines(True, 192, w, object()) == 4  # 3 lines of 128 B, rounded up
    assert kpdl.prefetch_lines(True, 192, w, nl._norm_linear_kernel) == (
        0 if launch.is_interpreted(nl._norm_linear_kernel) else 4
    )
    # off and at-start keep the launch keys (the constexpr's repr) of older artifacts
    assert repr(kpdl.pdl_kwargs(False)["USE_PDL"]) == "False"
    assert repr(kpdl.pdl_kwargs(True)["USE_PDL"]) == "True"
    assert kpdl.pdl_kwargs(False, streaming=True) == {"USE_PDL": False}
    assert kpdl.pdl_kwargs(True) == {"USE_PDL": kpdl.TRIGGER_AT_START, "launch_pdl": True}
    assert kpdl.pdl_kwargs(True, streaming=True) == {
        "USE_PDL": kpdl.streaming_trigger,
        "launch_pdl": True,
    }
    assert repr(kpdl.pdl_kwargs(True, interpreted=True)["USE_PDL"]) == "False"


def _chain(
    pdl: bool | str, M: int, K: int, inter: int, vocab: int, layers: int, dtype, device, seed=0
):
    """norm+QKV -> rope+cache write -> decode attention -> O+residual -> norm+gate/up ->
    down+residual per layer, then norm+lm_head+argmax: every PDL-able decode kernel, each
    reading what the one before it wrote. pdl "prefetch": PDL with the weight prefetch;
    "at start": PDL with every kernel's trigger at its start (the default's linears trigger
    after their main loop)."""
    pf = pdl == "prefetch"
    trigger = kpdl.TRIGGER_AT_START if pdl == "at start" else kpdl.TRIGGER_AFTER_LOOP
    pdl = bool(pdl)
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.1).to(device=device, dtype=dtype)  # noqa: E731
    H, KV, D, slots = 4, 2, 16, 32
    n_qkv = (H + 2 * KV) * D
    x = rnd(M, K)
    norm_w = rnd(K) + 1
    counters, ws = nl.new_counters(device), lm.new_workspace(device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = rc.rope_tables(inv_freq.to(device), 64, 1.0, dtype, device)
    pos = torch.arange(M, device=device) + 5
    slot = torch.tensor([7], device=device)
    kv_mask = torch.zeros(M, slots, dtype=torch.bool, device=device)
    kv_mask[:, :8] = True
    weights = [
        (
            rnd(n_qkv, K),
            rnd(K, H * D),
            rnd(2 * inter, K),
            rnd(K, inter),
            rnd(M, KV, slots, D),
            rnd(M, KV, slots, D),
        )
        for _ in range(layers)
    ]
    lm_w = rnd(vocab, K)
    ids = torch.empty(M, dtype=torch.int64, device=device)

    def run():
        kpdl.streaming_trigger, default = trigger, kpdl.streaming_trigger
        try:
            return layers_then_lm_head()
        finally:
            kpdl.streaming_trigger = default

    def layers_then_lm_head():
        for wqkv, wo, wgu, wd, kc, vc in weights:
            qkv = nl.norm_linear(
                x, norm_w, None, wqkv, eps=1e-5, counters=counters, pdl=pdl, prefetch=pf
            )
            q = rc.rope_cache_write(
                qkv, pos, cos, sin, kc, vc, slot, num_heads=H, num_kv_heads=KV, pdl=pdl
            )
            att = da.decode_attention(q, kc, vc, kv_mask=kv_mask, pdl=pdl)
            slf.skinny_linear_fused(
                att.reshape(M, H * D), wo, None, x, out=x, counters=counters, pdl=pdl, prefetch=pf
            )
            h = nl.norm_linear(
                x, norm_w, None, wgu, eps=1e-5, gated=True, counters=counters, pdl=pdl, prefetch=pf
            )
            slf.skinny_linear_fused(h, wd, None, x, out=x, counters=counters, pdl=pdl, prefetch=pf)
        lm.lm_head_argmax(
            x, lm_w, norm_weight=norm_w, eps=1e-5, ids_out=ids, workspace=ws, pdl=pdl, prefetch=pf
        )
        return ids, x

    return run


def test_pdl_launches_compute_what_plain_launches_compute():
    """On the CPU PDL is off: the same code path runs; on a GPU, launched eagerly with PDL."""
    dtype = torch.float32 if DEVICE == "cpu" else torch.float16
    shape = dict(M=3, K=64, inter=96, vocab=200, layers=2, dtype=dtype, device=DEVICE)
    plain_ids, plain_x = _chain(False, **shape)()
    for pdl in (True, "prefetch", "at start"):
        pdl_ids, pdl_x = _chain(pdl, **shape)()
        assert torch.equal(plain_ids, pdl_ids) and torch.equal(plain_x, pdl_x)


def test_binaries_launch_config_matches_cuda_h():
    """cuda.h: CUlaunchAttribute is 72 bytes (id, pad to 8, a 64-byte union); CUlaunchConfig
    56 (7 uints, the stream at 32, attrs at 40, numAttrs at 48)."""
    from kernl.runtime import binaries as b

    assert ctypes.sizeof(b._LaunchAttribute) == 72 and b._LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(b._LaunchConfig) == 56
    assert (b._LaunchConfig.hStream.offset, b._LaunchConfig.attrs.offset) == (32, 40)
    assert b._LaunchConfig.numAttrs.offset == 48
    config, attrs = b._ex_config((5, 2, 1), 128, 4096, ctypes.c_void_p(0x1234), True, False)
    assert (config.gridDimX, config.gridDimY, config.gridDimZ, config.blockDimX) == (5, 2, 1, 128)
    assert (config.sharedMemBytes, config.hStream, config.numAttrs) == (4096, 0x1234, 1)
    assert config.attrs[0].id == 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    assert bytes(config.attrs[0])[8:12] == (1).to_bytes(4, "little")
    config, attrs = b._ex_config((132, 1, 1), 128, 0, ctypes.c_void_p(0), True, True)
    assert config.numAttrs == 2 and [config.attrs[i].id for i in range(2)] == [6, 2]
    assert bytes(config.attrs[1])[8:12] == (1).to_bytes(4, "little")  # cooperative: int 1
    config, attrs = b._ex_config((132, 1, 1), 128, 0, ctypes.c_void_p(0), False, True)
    assert config.numAttrs == 1 and config.attrs[0].id == 2  # CU_LAUNCH_ATTRIBUTE_COOPERATIVE


def test_binaries_route_launch_pdl_to_the_pdl_launch(monkeypatch):
    """A launch whose options carry launch_pdl=True reaches the binary as a PDL launch."""
    import triton

    from kernl.runtime import binaries as b

    def _k(X, N, BLOCK: triton.language.constexpr, USE_PDL: triton.language.constexpr):
        pass

    jit_fn = triton.runtime.jit.JITFunction(_k)
    x = torch.zeros(4)
    seen = []

    class Fake:
        def launch(self, grid, bound, pdl=False, cooperative=False):
            seen.append((grid, bound["N"], pdl, cooperative))

    import contextlib

    monkeypatch.setattr(b.torch.cuda, "device", lambda _d: contextlib.nullcontext())
    kb = b.KernelBinaries(torch.device("cpu"))
    for pdl in (False, True):
        kwargs = {"BLOCK": 16, **kpdl.pdl_kwargs(pdl)}
        bound, options = b.bind(jit_fn, (x, 4), kwargs)
        kb.loaded[b.launch_key(jit_fn, bound, options)] = Fake()
        kb(jit_fn, (3,), (x, 4), kwargs)
    # a persistent kernel's cooperative grid (kernels/decode_step.py)
    kwargs = {"BLOCK": 16, "USE_PDL": False, "launch_cooperative_grid": True}
    bound, options = b.bind(jit_fn, (x, 4), kwargs)
    kb.loaded[b.launch_key(jit_fn, bound, options)] = Fake()
    kb(jit_fn, (3,), (x, 4), kwargs)
    assert seen == [
        ((3, 1, 1), 4, False, False),
        ((3, 1, 1), 4, True, False),
        ((3, 1, 1), 4, False, True),
    ]
    assert len(kb.loaded) == 3  # the options are part of the key: three binaries


def _graph_run(run):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="programmatic dependent launch needs Hopper or later",
)
def test_gpu_pdl_chain_in_a_cuda_graph_is_bitwise_the_plain_chain():
    shape = dict(M=4, K=2048, inter=8192, vocab=32000, layers=4, dtype=torch.bfloat16)
    results = []
    for pdl in (False, True, "prefetch", "at start"):
        graph, (ids, x) = _graph_run(_chain(pdl, device="cuda", **shape))
        for _ in range(3):  # replays restart from the state the last one left: compare the 3rd
            graph.replay()
        torch.cuda.synchronize()
        results.append((ids.clone(), x.clone()))
    for ids, x in results[1:]:
        assert torch.equal(results[0][0], ids) and torch.equal(results[0][1], x)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="programmatic dependent launch needs Hopper or later",
)
def test_gpu_recorded_pdl_binaries_launch_through_cuLaunchKernelEx():
    from kernl.runtime import binaries as b

    shape = dict(M=4, K=2048, inter=8192, vocab=32000, layers=2, dtype=torch.bfloat16)
    found = {}
    with b.allow_jit(lambda key, kernel: found.setdefault(key, kernel)):
        ref_ids, ref_x = (t.clone() for t in _chain(True, device="cuda", **shape)())
    assert any("launch_pdl=True" in k for k in found)
    kb = b.KernelBinaries(torch.device("cuda"))
    for key, kernel in found.items():
        kb.add(*b.spec_from_compiled(key, kernel))
    with launch.launching_with(kb):
        graph, (ids, x) = _graph_run(_chain(True, device="cuda", **shape))
    # the warm-up run outside the graph already did one step; the graph starts from there
    graph.replay()
    torch.cuda.synchronize()
    with b.allow_jit():  # the same two steps on Triton's own launcher
        run = _chain(True, device="cuda", **shape)
        run()
        jit_ids, jit_x = run()
    assert torch.equal(ids, jit_ids) and torch.equal(x, jit_x)
    assert not torch.equal(x, ref_x)  # the state did move on
