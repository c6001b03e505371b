"""norm -> QKV -> rotary -> cache write in one kernel, against float64 references of the
unfused sequence (norm_linear's, then rope_cache_write's): q, and every slot of both caches
(the step's slot written, the others untouched)."""

import pytest
import torch
from kernel_check import DEVICE, assert_close

from kernl.kernels.norm_linear import NormLinearConfig, new_counters
from kernl.kernels.norm_linear_rope import norm_linear_rope, norm_linear_rope_reference
from kernl.kernels.rope_cache_write import RopeCacheTarget, rope_tables

CONFIGS = [
    NormLinearConfig(32, 64, 0, 4, 2),
    NormLinearConfig(16, 64, 1, 4, 2),
    NormLinearConfig(8, 32, 3, 4, 2),  # a tile narrower than a head: a head over programs
]
CONFIG_IDS = ["auto-split", "one-split", "three-splits"]


def _case(M, H, KV, D, K, dtype, norm, bias, rope, slot, slots=8, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    F = (H + 2 * KV) * D
    x = rnd(M, K) * 2 + 0.5
    nw = (torch.rand(K, generator=g) + 0.5).to(device=device, dtype=dtype)
    nb = rnd(K) if norm == "layer" else None
    w = rnd(F, K) * 0.5 / K**0.5
    b = rnd(F) if bias else None
    positions = torch.randint(0, 40, (M,), generator=g).to(device)
    cos = sin = None
    if rope:
        inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
        cos, sin = rope_tables(inv_freq, 48, scaling=1.1, dtype=dtype, device=device)
    k_cache, v_cache = rnd(M, KV, slots, D), rnd(M, KV, slots, D)
    slot_t = torch.tensor([slot], device=device)
    return x, nw, nb, w, b, positions, cos, sin, k_cache, v_cache, slot_t


def _target(case, H, KV, convert=lambda t: t):
    x, nw, nb, w, b, positions, cos, sin, k_cache, v_cache, slot = case
    c = lambda t: None if t is None else convert(t)  # noqa: E731
    return RopeCacheTarget(positions, c(cos), c(sin), c(k_cache), c(v_cache), slot, H, KV)


def _check(M, H, KV, D, K, dtype, norm, bias, rope, config, slot=3, counters=None):
    case = _case(M, H, KV, D, K, dtype, norm, bias, rope, slot)
    x, nw, nb, w, b = case[:5]
    target = _target(case, H, KV, lambda t: t.clone())
    q = norm_linear_rope(
        x, nw, nb, w, b, target, eps=1e-5, norm=norm, counters=counters, config=config
    )
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref_target = _target(case, H, KV, lambda t: t.double())
    ref = norm_linear_rope_reference(*map(d, case[:5]), ref_target, eps=1e-5, norm=norm)
    stock_target = _target(case, H, KV, lambda t: t.clone())
    stock = norm_linear_rope_reference(*case[:5], stock_target, eps=1e-5, norm=norm)
    assert q.shape == (M, H, 1, D)
    assert_close(q, ref, dtype, stock, name="q")
    assert_close(target.k_cache, ref_target.k_cache, dtype, stock_target.k_cache, name="k cache")
    assert_close(target.v_cache, ref_target.v_cache, dtype, stock_target.v_cache, name="v cache")
    others = [s for s in range(case[8].shape[2]) if s != slot]
    assert torch.equal(target.k_cache[:, :, others], case[8][:, :, others])  # untouched
    assert torch.equal(target.v_cache[:, :, others], case[9][:, :, others])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,H,KV,D,K", [(1, 4, 2, 8, 72), (3, 4, 1, 16, 136), (5, 2, 2, 8, 40)])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("norm,bias", [("rms", True), ("rms", False), ("layer", False)])
def test_norm_linear_rope(dtype, M, H, KV, D, K, config, norm, bias):
    _check(M, H, KV, D, K, dtype, norm, bias, True, config)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_without_rotary_only_the_cache_write(config):
    # learned positions (GPT-2): q, k and v split and written, nothing rotated
    _check(2, 4, 4, 8, 64, torch.float32, "layer", True, False, config)


def test_a_slot_past_the_cache_writes_nothing_and_counters_stay_zeroed():
    counters = new_counters(DEVICE)
    for slot in (7, 8, 12):  # the last slot, then past it (the write is dropped)
        _check(3, 4, 2, 8, 72, torch.float32, "rms", False, True, CONFIGS[2], slot, counters)
        assert int(counters.abs().sum()) == 0


def test_refuses_shapes_that_do_not_fit():
    case = _case(2, 4, 2, 8, 32, torch.float32, "rms", False, True, 0)
    x, nw, nb, w, b = case[:5]
    with pytest.raises(AssertionError):  # 3 heads' worth of rows where 4 + 2 * 2 are needed
        norm_linear_rope(x, nw, nb, w[:24], b, _target(case, 4, 2), eps=1e-5)
    with pytest.raises(AssertionError):  # a cache of another batch
        t = _target(case, 4, 2)
        t.k_cache = t.k_cache[:1]
        norm_linear_rope(x, nw, nb, w, b, t, eps=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize(
    "config", [None, NormLinearConfig(64, 64, 0, 4, 5)], ids=["default", "tuned"]
)
def test_gpu_llama1b_shapes(dtype, M, config):
    # 32 q heads, 8 kv heads of 64 over a 2048-wide residual stream; real concurrency in the
    # split-K reduce (the last program to arrive sums the partials)
    _check(M, 32, 8, 64, 2048, dtype, "rms", False, True, config, 5, new_counters("cuda"))
