"""A whole decode step in one persistent kernel against a float64 plain-PyTorch step: logits,
greedy ids, and the cache slot written (the others untouched), over consecutive steps (the
counters it leaves must be ready for the next launch). On the CPU the interpreter runs a grid
of one program; the GPU tests run one program per SM, the real barriers."""

from dataclasses import replace

import pytest
import torch
from kernel_check import DEVICE, assert_close

from kernl.kernels.decode_step import (
    DecodeStepBuffers,
    DecodeStepConfig,
    DecodeStepWeights,
    decode_step,
    decode_step_choice_configs,
    decode_step_configs,
    decode_step_reference,
)
from kernl.kernels.rope_cache_write import rope_tables

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _weights(L, H, NH, KVH, D, I, V, dtype, bias=False, device=DEVICE, seed=0):  # noqa: E741
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
    norm = lambda *s: (torch.rand(*s, generator=g) + 0.5).to(device, dtype)  # noqa: E731
    F = (NH + 2 * KVH) * D
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    cos, sin = rope_tables(inv_freq, 256, scaling=1.0, dtype=dtype, device=device)
    return DecodeStepWeights(
        embed=rnd(V, H),
        attn_norm=norm(L, H),
        qkv=rnd(L, F, H, scale=H**-0.5),
        qkv_bias=rnd(L, F, scale=0.1) if bias else None,
        o=rnd(L, H, NH * D, scale=(NH * D) ** -0.5),
        mlp_norm=norm(L, H),
        gate_up=rnd(L, 2 * I, H, scale=H**-0.5),
        down=rnd(L, H, I, scale=I**-0.5),
        final_norm=norm(H),
        lm_head=rnd(V, H, scale=H**-0.5),
        cos=cos,
        sin=sin,
        num_heads=NH,
        num_kv_heads=KVH,
        eps=1e-5,
        sm_scale=D**-0.5,
    )


def _double(w: DecodeStepWeights) -> DecodeStepWeights:
    conv = {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in vars(w).items()
    }
    return DecodeStepWeights(**conv)


def _run_steps(
    w, B, slots, kv_len, first_slot, steps, dtype, config, whole_model_bound=False, seed=1
):
    device = DEVICE
    g = torch.Generator().manual_seed(seed)
    L, KVH, D, V = w.num_layers, w.num_kv_heads, w.head_dim, w.embed.shape[0]
    k_cache = torch.randn(L, B, KVH, slots, D, generator=g).to(device, dtype)
    v_cache = torch.randn(L, B, KVH, slots, D, generator=g).to(device, dtype)
    ref_k, ref_v = k_cache.double(), v_cache.double()
    stock_k, stock_v = k_cache.clone(), v_cache.clone()
    kv_valid = torch.ones(B, kv_len, dtype=torch.bool)
    kv_valid[-1, :2] = False  # the last row's prompt was left-padded
    kv_valid = kv_valid.to(device)
    buffers = DecodeStepBuffers.allocate(w, B, config)
    w64 = _double(w)
    for step in range(steps):
        tokens = torch.randint(0, V, (B,), generator=g).to(device)
        positions = torch.randint(0, 60, (B,), generator=g).to(device)
        slot = torch.tensor([first_slot + step], device=device)
        logits, ids = decode_step(
            w, buffers, tokens, positions, slot, kv_valid, k_cache, v_cache, config=config
        )
        ref_logits, ref_ids = decode_step_reference(
            w64, tokens, positions, slot, kv_valid, ref_k, ref_v
        )
        if whole_model_bound:
            # a whole model in bf16: no elementwise bound survives its layers; the bar is
            # the same step in stock PyTorch in the same dtype, its error at most doubled
            stock_logits, _ = decode_step_reference(
                w, tokens, positions, slot, kv_valid, stock_k, stock_v
            )
            for name, ours, stock, ref in (
                ("logits", logits, stock_logits, ref_logits),
                ("k cache", k_cache, stock_k, ref_k),
                ("v cache", v_cache, stock_v, ref_v),
            ):
                err = (ours.double() - ref).abs().max().item()
                bar = 2 * (stock.double() - ref).abs().max().item() + 1e-2
                assert err <= bar, f"{name}, step {step}: max err {err:.3g} > {bar:.3g}"
            gap = 4 * (stock_logits.double() - ref_logits).abs().max().item()
        else:
            assert_close(logits, ref_logits, dtype, name=f"logits, step {step}")
            assert_close(k_cache, ref_k, dtype, name=f"k cache, step {step}")
            assert_close(v_cache, ref_v, dtype, name=f"v cache, step {step}")
            gap = 1e-2
        top2 = ref_logits.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > gap  # no near-tie the rounding may flip
        assert torch.equal(ids[clear], ref_ids[clear].to(ids.device)), step
    # left ready for the next launch
    # no barrier timed out, every counter is zero again
    assert not buffers.sync.any() and not buffers.att_counters.any()
    assert not buffers.tile_counters.any()
    assert int(buffers.best[-1]) == 0


SMALL = dict(L=2, H=64, NH=4, KVH=2, D=32, I=96, V=160)
# whole K: no op split
CONFIG = DecodeStepConfig(BLOCK_K=32, QKV_N=16, O_N=16, UP_N=16, DOWN_N=16, LM_N=32, num_stages=3)
CONFIG = replace(CONFIG, SPLIT_QKV=1, SPLIT_O=1, SPLIT_DOWN=1, ATT_SPLITS=4, ATT_BLOCK=16)
# (att_fill would chunk the cache once: the interpreter's grid is one program)
CONFIG = replace(CONFIG, att_fill=False)


# every linear op's K split over programs, reduced by the last split to arrive (3 does not
# divide the K blocks: the last chunk is short or empty)
SPLIT = replace(CONFIG, SPLIT_QKV=2, SPLIT_O=2, SPLIT_UP=3, SPLIT_DOWN=3)


# each config at batch 1 without biases and at batch 3 (a left-padded row) with them, not at
# all four pairings: the interpreter takes ~10 s a step of this kernel
@pytest.mark.parametrize("B, bias", [(1, False), (3, True)], ids=["b1", "b3-bias"])
@pytest.mark.parametrize(
    "config",
    [
        CONFIG,
        SPLIT,
        replace(SPLIT, flatten=True),
        replace(SPLIT, o_waits_group=True),
        # the default's tiles and splits (empty splits: K chunks past the model's K), its
        # 64-slot attention blocks wider than the cache, in one chunk (att_fill, one program)
        replace(DecodeStepConfig(), BLOCK_K=32),
        # the down projection's own K block (its third split empty)
        replace(SPLIT, DOWN_BLOCK_K=64),
        replace(SPLIT, o_waits_group=True, att_waits_qkv=True),
        # QKV tiles of 12 pairs in 16 lanes (the last tile 8 pairs), each split 2
        replace(SPLIT, QKV_PAIRS=12),
    ],
    ids=[
        "whole-k",
        "split-k",
        "split-k-flat",
        "o-waits-group",
        "default-tiles",
        "down-block-k",
        "no-attention-barriers",
        "qkv-pairs",
    ],
)
def test_decode_step_matches_float64_over_steps(B, bias, config):
    w = _weights(**SMALL, dtype=torch.float32, bias=bias)
    _run_steps(w, B, slots=24, kv_len=20, first_slot=9, steps=3, dtype=torch.float32, config=config)


@pytest.mark.parametrize(
    "config", [CONFIG, replace(SPLIT, o_waits_group=True), replace(CONFIG, att_waits_qkv=True)]
)
def test_decode_step_merges_several_attention_chunks(config):
    # 41+ valid slots in chunks of 16: three chunks of each (row, kv head) hold slots, and
    # their merge weighs them by their maxima (the cases above fit one chunk)
    w = _weights(**SMALL, dtype=torch.float32, bias=False)
    _run_steps(
        w, 2, slots=64, kv_len=60, first_slot=40, steps=2, dtype=torch.float32, config=config
    )


def test_decode_step_fp16_tiles_wider_than_the_model():
    # tiles wider than the hidden size (masked rows and columns everywhere) and than a head
    # (a QKV tile over two heads' pairs)
    w = _weights(L=1, H=48, NH=3, KVH=1, D=16, I=80, V=100, dtype=torch.float16)
    config = replace(CONFIG, O_N=64, UP_N=64, DOWN_N=64, LM_N=64, BLOCK_K=64, ATT_SPLITS=2)
    _run_steps(
        w, 2, slots=16, kv_len=16, first_slot=15, steps=1, dtype=torch.float16, config=config
    )


# every config the compiler and the bench may run, at batch 4 in bf16; the default in fp16
# and at batch 1 too. The configs only the bench runs are `slow` and `bench_only` (7-10 s
# each on an H200): `-m "gpu and not slow"` keeps the default and the compiler's choice
# configs, `-m "gpu and not bench_only"` every other slow test too.
_CHOSEN = {i for i, c in enumerate(decode_step_configs()) if c in decode_step_choice_configs()}
_BENCH_ONLY = (pytest.mark.slow, pytest.mark.bench_only)
GPU_CASES = [
    pytest.param(4, torch.bfloat16, i, marks=() if i in _CHOSEN | {0} else _BENCH_ONLY)
    for i in range(len(decode_step_configs()))
]
GPU_CASES += [(1, torch.bfloat16, 0), (1, torch.float16, 0), (4, torch.float16, 0)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("B, dtype, config_index", GPU_CASES)
def test_gpu_decode_step_llama1b_shapes(B, dtype, config_index):
    w = _weights(L=4, H=2048, NH=32, KVH=8, D=64, I=8192, V=32000, dtype=dtype)
    config = decode_step_configs()[config_index]
    try:
        _run_steps(w, B, 512, 512, 300, 3, dtype, config, whole_model_bound=True)
    except RuntimeError as e:  # more programs per SM than this GPU holds at once
        if "cooperative" in str(e).lower() or "too many blocks" in str(e).lower():
            pytest.skip(f"{config} does not fit this GPU: {e}")
        raise


@gpu
@pytest.mark.gpu
def test_gpu_decode_step_replays_from_a_cuda_graph():
    """Captured once, replayed at consecutive slots (the graph's inputs updated in place), the
    step computes what it computes launched directly: its counters reset themselves."""
    dtype, B = torch.bfloat16, 2
    w = _weights(L=2, H=1024, NH=16, KVH=4, D=64, I=2048, V=5000, dtype=dtype)
    L, KVH, D = w.num_layers, w.num_kv_heads, w.head_dim
    g = torch.Generator().manual_seed(3)
    caches = [torch.randn(L, B, KVH, 256, D, generator=g).to(DEVICE, dtype) for _ in range(2)]
    kv_valid = torch.ones(B, 256, dtype=torch.bool, device=DEVICE)
    tokens = torch.tensor([5, 7], device=DEVICE)
    positions = torch.tensor([100, 90], device=DEVICE)
    slot = torch.tensor([100], device=DEVICE)
    buffers = DecodeStepBuffers.allocate(w, B, DecodeStepConfig())
    decode_step(w, buffers, tokens, positions, slot, kv_valid, *caches)  # compile, warm up
    direct = [c.clone() for c in caches]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits, ids = decode_step(w, buffers, tokens, positions, slot, kv_valid, *caches)
    direct_buffers = DecodeStepBuffers.allocate(w, B, DecodeStepConfig())
    for step in range(3):
        slot.fill_(101 + step)
        positions.add_(1)
        graph.replay()
        want_logits, want_ids = decode_step(
            w, direct_buffers, tokens, positions, slot, kv_valid, *direct
        )
        torch.cuda.synchronize()
        assert torch.equal(logits, want_logits) and torch.equal(ids, want_ids), step
        assert torch.equal(caches[0], direct[0]) and torch.equal(caches[1], direct[1]), step
        tokens.copy_(ids)
    assert not buffers.sync.any() and not buffers.att_counters.any()
