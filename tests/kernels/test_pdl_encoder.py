"""Programmatic dependent launch in an encoder's graph (compiler/launch_dependent.py): the
layer norm and every attention kernel (short-key, TMA, Gluon wgmma, flash) take a config
`pdl`, begin with griddepcontrol.wait and launch with programmatic stream serialization, so a
graph captures them behind programmatic edges from cuBLAS's GEMMs. A BERT-like chain of
layers (cuBLAS GEMMs between kernl's kernels, each reading what the one before wrote) must
compute bit for bit what it computes without PDL, from Triton's JIT and from recorded
binaries alike. On the CPU the interpreter runs no inline PTX: there `pdl` changes nothing."""

from __future__ import annotations

import pytest
import torch
from kernel_check import DEVICE

from kernl.kernels import launch
from kernl.runtime import kernl_ops

# (name, attention config) of every encoder attention kernel, at 128 keys
ATTENTION_KINDS = [
    ("short", dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2, programs_per_sm=2)),
    ("tma", dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2, programs_per_sm=2, tma=True)),
    ("wgmma", dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, wgmma=True)),
    ("flash", dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)),
]

hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="programmatic dependent launch needs Hopper or later",
)


def _encoder_chain(attention: dict, pdl: bool, B, S, H, layers, dtype, device, seed=0):
    """`layers` BERT layers: QKV, attention, O, add+norm, FFN1 with GELU, FFN2, add+norm; the
    GEMMs on cuBLAS (kernl.linear's aten path), the norms and attention on kernl's kernels
    with `pdl` in their configs."""
    D, hidden = 64, H * 64
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.05).to(device=device, dtype=dtype)  # noqa: E731
    x0 = rnd(B * S, hidden) * 10
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[-1, S // 3 :] = False
    bias = kernl_ops.mask_to_bias(mask.to(device), torch.float32)[:, None, None, :]
    weights = [
        (rnd(3 * hidden, hidden), rnd(3 * hidden), rnd(hidden, hidden), rnd(hidden))
        + (rnd(hidden) + 1, rnd(hidden), rnd(4 * hidden, hidden), rnd(4 * hidden))
        + (rnd(hidden, 4 * hidden), rnd(hidden), rnd(hidden) + 1, rnd(hidden))
        for _ in range(layers)
    ]
    att_config = list({**attention, "pdl": pdl}.items())
    norm_config = [["BLOCK_M", 2], ["num_warps", 4], ["pdl", pdl]]
    gelu = "gelu_tanh" if device != "cpu" else "gelu"

    def run():
        x = x0
        for wqkv, bqkv, wo, bo, g1, b1, w1, c1, w2, c2, g2, b2 in weights:
            qkv = kernl_ops.linear(x, wqkv, bqkv)
            q, k, v = qkv.view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)
            a = kernl_ops.attention(q, k, v, bias, impl="triton", config=att_config)
            o = kernl_ops.linear(a.transpose(1, 2).reshape(B * S, hidden), wo, bo)
            x = kernl_ops.layer_norm(o, g1, b1, 1e-12, x, impl="triton", config=norm_config)
            h = kernl_ops.linear(x, w1, c1, activation=gelu)
            f = kernl_ops.linear(h, w2, c2)
            x = kernl_ops.layer_norm(f, g2, b2, 1e-12, x, impl="triton", config=norm_config)
        return x

    return run


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


@pytest.mark.parametrize("name,attention", ATTENTION_KINDS[:2] + ATTENTION_KINDS[3:])
def test_pdl_in_the_configs_computes_what_plain_configs_compute(name, attention):
    """On the CPU (interpreter) PDL is off, through the same code path; on a GPU, eager
    launches with PDL."""
    dtype = torch.float32 if DEVICE == "cpu" else torch.float16
    shape = dict(B=2, S=32 if DEVICE == "cpu" else 128, H=2, layers=2, dtype=dtype, device=DEVICE)
    plain = _encoder_chain(attention, False, **shape)()
    assert torch.equal(_encoder_chain(attention, True, **shape)(), plain)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("name,attention", ATTENTION_KINDS)
def test_gpu_encoder_chain_with_pdl_in_a_cuda_graph_is_bitwise_the_plain_chain(name, attention):
    shape = dict(B=4, S=128, H=12, layers=3, dtype=torch.float16, device="cuda")
    outs = []
    for pdl in (False, True):
        graph, out = _graph_run(_encoder_chain(attention, pdl, **shape))
        graph.replay()
        torch.cuda.synchronize()
        outs.append(out.clone())
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("dependent", [True, False])
def test_gpu_recorded_pdl_binaries_in_a_graph_compute_what_the_jit_computes(dependent):
    """The binaries a compile records for PDL configs, launched by a loaded model's launcher
    (cuLaunchKernelEx with the PDL attribute; or, with `launch_dependent` off, a plain launch
    whose griddepcontrol.wait returns at once) inside a CUDA graph."""
    from kernl.runtime import binaries as b

    shape = dict(B=4, S=128, H=12, layers=2, dtype=torch.float16, device="cuda")
    attention = ATTENTION_KINDS[1][1]
    found = {}
    with b.allow_jit(lambda key, kernel: found.setdefault(key, kernel)):
        want = _encoder_chain(attention, True, **shape)().clone()
    assert sum("launch_pdl=True" in k for k in found) == 2, list(found)  # norm and attention
    kb = b.KernelBinaries(torch.device("cuda"))
    for key, kernel in found.items():
        kb.add(*b.spec_from_compiled(key, kernel))
    kb.launch_dependent = dependent
    with launch.launching_with(kb):
        graph, out = _graph_run(_encoder_chain(attention, True, **shape))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
