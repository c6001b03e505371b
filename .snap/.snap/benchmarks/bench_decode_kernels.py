"""The fused decode-step kernels against the sequences they replace, at Llama-3.2-1B decode
shapes (bf16, hidden 2048, intermediate 8192, 32 heads / 8 kv heads of 64, vocab 128256),
batch 1, 4 and 8, on one GPU.

    python benchmarks/bench_decode_kernels.py            # JSON to $OUT/bench_decode_kernels.json

Per op: the fused kernel (a few configs, best printed) vs the unfused kernl sequence the
decoder runs today (Triton norm + split-K skinny_linear + its reduce, gated_mlp, ...) and vs
plain torch. Times are medians of CUDA-event timings of CUDA-graph replays, per call. Weights
are rotated over enough copies to exceed L2 (a decode step streams 2.5 GB of weights through
a 50-60 MB L2, so no layer finds its weights cached); GB/s counts the bytes each op must move
and is compared with the 4.26 TB/s copy ceiling measured on an H200. Before timing, each fused
kernel is checked once in bf16 against a float64 reference (at most 2x stock torch's error).
Runs in well under 3 minutes; a plain script, not collected by pytest."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernl.kernels import gated_mlp as mlp_mod  # noqa: E402
from kernl.kernels import lm_head_argmax as lm_mod  # noqa: E402
from kernl.kernels import norm as norm_mod  # noqa: E402
from kernl.kernels import norm_linear as nl_mod  # noqa: E402
from kernl.kernels import norm_linear_rope as nlr_mod  # noqa: E402
from kernl.kernels import rope_cache_write as rope_mod  # noqa: E402
from kernl.kernels import skinny_linear as skinny_mod  # noqa: E402
from kernl.kernels import skinny_linear_fused as slf_mod  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 2048, 8192, 32, 8, 64, 128256, 16
EPS, SLOTS, DTYPE = 1e-5, 2048, torch.bfloat16
BATCHES = (1, 4, 8)
CEILING_GBPS = 4260.0  # H200 device-to-device copy, measured (issue 15)
L2_BYTES = 256 * 2**20  # rotate weights over at least this many bytes
DEV = "cuda"

# configs tried per fused kernel: the space the compiler searches per decode batch and call
# site (compiler/tasks/causal_lm/decode_tiles.py); benchmarks/sweep_decode_configs.py goes wider
NORM_LINEAR_CONFIGS = nl_mod.norm_linear_decode_configs()
FUSED_LINEAR_CONFIGS = slf_mod.skinny_linear_fused_decode_configs()
ROPE_CONFIGS = rope_mod.rope_cache_write_configs()
LM_HEAD_CONFIGS = lm_mod.lm_head_argmax_decode_configs()


def randn(*shape, scale: float = 1.0, device: str | None = None, dtype=None) -> torch.Tensor:
    t = torch.randn(*shape, device=device or DEV, dtype=torch.float32) * scale
    return t.to(dtype or DTYPE)


def weight_copies(make: Callable[[], torch.Tensor], l2_bytes: int = L2_BYTES) -> list[torch.Tensor]:
    first = make()
    n = max(1, min(32, math.ceil(l2_bytes / (first.numel() * first.element_size()))))
    return [first] + [make() for _ in range(n - 1)]


def time_ms(fn: Callable[[int], object], copies: int, reps: int = 15) -> float:
    """Median per-call time of `fn(i)` replayed from a CUDA graph of max(copies, 20) calls
    cycling over the weight copies."""
    calls = max(copies, 20)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):  # compile and warm outside the capture
            fn(i % copies)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % copies)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def compare(
    out: torch.Tensor, ref64: torch.Tensor, stock: torch.Tensor
) -> tuple[bool, float, float]:
    """(ok, kernl's max error vs float64, stock torch's): ok when at most 2x stock's + 8e-3."""
    err = (out.double() - ref64).abs().max().item()
    stock_err = (stock.double() - ref64).abs().max().item()
    ok = bool(err <= 2 * stock_err + 8e-3) and not out.isnan().any().item()
    return ok, err, stock_err


def check(name: str, out: torch.Tensor, ref64: torch.Tensor, stock: torch.Tensor) -> dict:
    ok, err, stock_err = compare(out, ref64, stock)
    print(
        f"  check {name:<28} max err {err:.3g} (stock bf16 {stock_err:.3g}) "
        f"{'ok' if ok else 'FAILED'}"
    )
    return {"op": name, "max_err": err, "stock_err": stock_err, "ok": ok}


def correctness(M: int = 4) -> list[dict]:
    """Each fused kernel once at real shapes in bf16 against float64 (and stock torch in bf16)."""
    print(f"correctness at Llama-1B shapes, bf16, batch {M}")
    res = []
    x = randn(M, HIDDEN)
    g = (torch.rand(HIDDEN, device=DEV) + 0.5).to(DTYPE)
    counters = nl_mod.new_counters(DEV)
    d = lambda t: t.double()  # noqa: E731
    for name, n_w, gated in [
        ("norm_linear qkv", 3072, False),
        ("norm_linear gate_up", 2 * INTER, True),
    ]:
        w = randn(n_w, HIDDEN, scale=HIDDEN**-0.5)
        out = nl_mod.norm_linear(x, g, None, w, eps=EPS, gated=gated, counters=counters)
        ref = nl_mod.norm_linear_reference(d(x), d(g), None, d(w), eps=EPS, gated=gated)
        stock = nl_mod.norm_linear_reference(x, g, None, w, eps=EPS, gated=gated)
        res.append(check(name, out, ref, stock))
    for name, K in [("skinny_linear_fused o", HIDDEN), ("skinny_linear_fused down", INTER)]:
        h, w, r = randn(M, K), randn(HIDDEN, K, scale=K**-0.5), randn(M, HIDDEN)
        out = slf_mod.skinny_linear_fused(h, w, None, r, counters=counters)
        ref = slf_mod.skinny_linear_fused_reference(d(h), d(w), None, d(r))
        res.append(check(name, out, ref, slf_mod.skinny_linear_fused_reference(h, w, None, r)))
    qkv = randn(M, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    pos = torch.arange(M, device=DEV) + 100
    inv_freq = 1.0 / (500000 ** (torch.arange(0, HEAD_DIM, 2, device=DEV).float() / HEAD_DIM))
    cos, sin = rope_mod.rope_tables(inv_freq, 4096, 1.0, DTYPE)
    kc, vc = randn(M, KV_HEADS, SLOTS, HEAD_DIM), randn(M, KV_HEADS, SLOTS, HEAD_DIM)
    k64, v64 = d(kc), d(vc)
    slot = torch.tensor([123], device=DEV)
    kw = dict(num_heads=HEADS, num_kv_heads=KV_HEADS)
    kcs, vcs = kc.clone(), vc.clone()  # stock torch (bf16) writes these
    qs = rope_mod.rope_cache_write_reference(qkv, pos, cos, sin, kcs, vcs, slot, **kw)
    q64 = rope_mod.rope_cache_write_reference(d(qkv), pos, d(cos), d(sin), k64, v64, slot, **kw)
    q = rope_mod.rope_cache_write(qkv, pos, cos, sin, kc, vc, slot, **kw)
    res.append(check("rope_cache_write q", q, q64, qs))
    res.append(check("rope_cache_write k cache", kc, k64, kcs))
    res.append(check("rope_cache_write v cache", vc, v64, vcs))
    w = randn(VOCAB, HIDDEN, scale=HIDDEN**-0.5)
    ids, logits = lm_mod.lm_head_argmax(x, w, norm_weight=g, eps=EPS, return_logits=True)
    ref_ids, ref = lm_mod.lm_head_argmax_reference(d(x), d(w), d(g), EPS)
    _, stock = lm_mod.lm_head_argmax_reference(x, w, g, EPS)
    res.append(check("lm_head_argmax logits", logits, ref, stock))
    same = bool(torch.equal(ids, logits.argmax(-1)))
    print(
        f"  check lm_head_argmax ids == argmax(logits): {same}; == float64 argmax: "
        f"{int((ids == ref_ids).sum())}/{M}"
    )
    res.append({"op": "lm_head_argmax ids", "ok": same})
    return res


class Bench:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def run(
        self,
        op: str,
        M: int,
        impl: str,
        kernels: int,
        nbytes: float,
        fn: Callable[[int], object],
        copies: int,
        config=None,
    ) -> dict | None:
        try:
            ms = time_ms(fn, copies)
        except Exception as e:  # a config that does not compile or fit: skip it, say so
            print(f"  {op:<9} M={M:<2} {impl:<26} failed: {type(e).__name__}: {str(e)[:120]}")
            return None
        gbps = nbytes / ms / 1e6
        row = {
            "op": op,
            "batch": M,
            "impl": impl,
            "kernels": kernels,
            "ms": ms,
            "GB/s": gbps,
            "pct_ceiling": 100 * gbps / CEILING_GBPS,
            "config": None if config is None else repr(config),
        }
        self.rows.append(row)
        return row

    def best(
        self,
        op: str,
        M: int,
        impl: str,
        kernels: int,
        nbytes: float,
        make: Callable[[object], Callable[[int], object]],
        copies: int,
        configs,
    ) -> dict | None:
        rows = [self.run(op, M, impl, kernels, nbytes, make(c), copies, c) for c in configs]
        rows = [r for r in rows if r is not None]
        if not rows:
            return None
        best = min(rows, key=lambda r: r["ms"])
        best["best"] = True
        return best


def report(rows: list[dict]) -> None:
    for r in rows:
        print(
            f"  {r['op']:<9} M={r['batch']:<2} {r['impl']:<26} {r['kernels']} kernel(s) "
            f"{r['ms'] * 1000:8.2f} us {r['GB/s']:7.0f} GB/s {r['pct_ceiling']:5.1f}%"
            + (f"  {r['config']}" if r.get("config") else "")
        )


def unfused_impls(
    op: str,
    x: torch.Tensor,
    g: torch.Tensor,
    ws: list[torch.Tensor],
    h: torch.Tensor | None = None,
    r: torch.Tensor | None = None,
) -> list[tuple[str, int, Callable[[int], object]]]:
    """The sequences a fused kernel replaces, as (impl, kernels per call, fn(i) over the weight
    copies ws[i]): kernl's unfused path as the decoder runs it, and plain torch. op: "qkv",
    "gate_up" (ws are [gate; up]), "o"/"down" (h the input, r the residual) or "lm_head".
    Shape-agnostic: widths come from the tensors."""
    K = x.shape[1]
    if op == "qkv":
        return [
            (
                "kernl norm+skinny(+reduce)",
                3,
                lambda i: skinny_mod.skinny_linear(norm_mod.rms_norm(x, g, None, EPS), ws[i]),
            ),
            ("torch rms_norm+linear", 2, lambda i: F.linear(F.rms_norm(x, (K,), g, EPS), ws[i])),
        ]
    if op == "gate_up":
        inter = ws[0].shape[0] // 2
        tile = mlp_mod.gated_mlp_decode_configs()[0]  # the decoder's untuned tile

        def torch_gated(i: int) -> torch.Tensor:
            gate, up = F.linear(F.rms_norm(x, (K,), g, EPS), ws[i]).chunk(2, dim=-1)
            return F.silu(gate) * up

        return [
            (
                "kernl norm+gated_mlp",
                2,
                lambda i: mlp_mod.gated_mlp(
                    norm_mod.rms_norm(x, g, None, EPS), ws[i][:inter], ws[i][inter:], config=tile
                ),
            ),
            ("torch norm+linear+silu*up", 4, torch_gated),
        ]
    if op in ("o", "down"):
        assert h is not None and r is not None
        return [
            ("kernl skinny(+reduce)", 2, lambda i: skinny_mod.skinny_linear(h, ws[i], None, r)),
            ("torch addmm", 1, lambda i: torch.addmm(r, h, ws[i].t())),
        ]
    assert op == "lm_head", op
    return [
        (
            "kernl norm+skinny+argmax",
            4,
            lambda i: skinny_mod.skinny_linear(norm_mod.rms_norm(x, g, None, EPS), ws[i]).argmax(
                -1
            ),
        ),
        (
            "torch norm+linear+argmax",
            3,
            lambda i: F.linear(F.rms_norm(x, (K,), g, EPS), ws[i]).argmax(-1),
        ),
    ]


def bench_batch(bench: Bench, M: int, W: dict) -> dict[str, dict[str, float]]:
    """All ops at batch M; returns {op: {impl: best ms}} for the step estimate."""
    out: dict[str, dict[str, float]] = {}
    counters = nl_mod.new_counters(DEV)
    g = W["g"]
    x = randn(M, HIDDEN)
    b2 = 2  # bytes per bf16 element

    def keep(op: str, rows: list[dict]) -> None:
        report(rows)
        out[op] = {r["impl"]: r["ms"] for r in rows}

    # -- attention norm + QKV ----------------------------------------------------------------
    ws, n_qkv = W["qkv"], (HEADS + 2 * KV_HEADS) * HEAD_DIM
    nbytes = (n_qkv * HIDDEN + M * HIDDEN + M * n_qkv) * b2
    make = lambda c: (
        lambda i: nl_mod.norm_linear(x, g, None, ws[i], eps=EPS, counters=counters, config=c)
    )
    rows = [
        bench.best("qkv", M, "fused norm_linear", 1, nbytes, make, len(ws), NORM_LINEAR_CONFIGS)
    ]
    for impl, kernels, fn in unfused_impls("qkv", x, g, ws):
        rows.append(bench.run("qkv", M, impl, kernels, nbytes, fn, len(ws)))
    keep("qkv", [r for r in rows if r])

    # -- MLP norm + gate/up + SiLU * up --------------------------------------------------------
    ws = W["gate_up"]
    nbytes = (2 * INTER * HIDDEN + M * HIDDEN + M * INTER) * b2
    make = lambda c: (
        lambda i: nl_mod.norm_linear(
            x, g, None, ws[i], eps=EPS, gated=True, counters=counters, config=c
        )
    )
    rows = [
        bench.best(
            "gate_up", M, "fused norm_linear gated", 1, nbytes, make, len(ws), NORM_LINEAR_CONFIGS
        )
    ]
    for impl, kernels, fn in unfused_impls("gate_up", x, g, ws):
        rows.append(bench.run("gate_up", M, impl, kernels, nbytes, fn, len(ws)))
    keep("gate_up", [r for r in rows if r])

    # -- O and down projections + residual -----------------------------------------------------
    for op, K in [("o", HEADS * HEAD_DIM), ("down", INTER)]:
        ws = W[op]
        h, r = randn(M, K), randn(M, HIDDEN)
        nbytes = (HIDDEN * K + M * K + 2 * M * HIDDEN) * b2
        make = lambda c, ws=ws, h=h, r=r: (
            lambda i: slf_mod.skinny_linear_fused(h, ws[i], None, r, counters=counters, config=c)
        )
        rows = [
            bench.best(
                op, M, "fused skinny_linear_fused", 1, nbytes, make, len(ws), FUSED_LINEAR_CONFIGS
            )
        ]
        for impl, kernels, fn in unfused_impls(op, x, g, ws, h, r):
            rows.append(bench.run(op, M, impl, kernels, nbytes, fn, len(ws)))
        keep(op, [r for r in rows if r])

    # -- rope + KV-cache write -----------------------------------------------------------------
    qkv = randn(M, n_qkv)
    pos = torch.arange(M, device=DEV) + SLOTS // 3
    slot = torch.tensor([SLOTS // 3], device=DEV)
    caches = [
        (randn(M, KV_HEADS, SLOTS, HEAD_DIM), randn(M, KV_HEADS, SLOTS, HEAD_DIM)) for _ in range(4)
    ]
    nbytes = (M * n_qkv * 2 + 2 * HEAD_DIM) * b2  # qkv in; q, k, v out; one cos/sin row
    make = lambda c: (
        lambda i: rope_mod.rope_cache_write(
            qkv,
            pos,
            W["cos"],
            W["sin"],
            caches[i][0],
            caches[i][1],
            slot,
            num_heads=HEADS,
            num_kv_heads=KV_HEADS,
            config=c,
        )
    )
    rows = [
        bench.best("rope", M, "fused rope_cache_write", 1, nbytes, make, len(caches), ROPE_CONFIGS)
    ]
    rope_m = W["rope_m"].index_select(0, pos)  # gathered once per step by the decoder

    def torch_rope(i: int) -> torch.Tensor:
        qk = torch.bmm(
            qkv[:, : (HEADS + KV_HEADS) * HEAD_DIM].view(M, HEADS + KV_HEADS, HEAD_DIM), rope_m
        )
        caches[i][0].index_copy_(2, slot, qk[:, HEADS:].unsqueeze(2))
        caches[i][1].index_copy_(
            2, slot, qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(M, KV_HEADS, 1, HEAD_DIM)
        )
        return qk

    rows.append(bench.run("rope", M, "torch bmm+index_copy x2", 3, nbytes, torch_rope, len(caches)))
    keep("rope", [r for r in rows if r])

    # -- attention norm + QKV + rope + KV-cache write: one kernel against the pair -------------
    ws = W["qkv"]
    targets = [
        nlr_mod.RopeCacheTarget(pos, W["cos"], W["sin"], k, v, slot, HEADS, KV_HEADS)
        for k, v in caches
    ]
    nbytes = (n_qkv * HIDDEN + M * HIDDEN + M * n_qkv) * b2
    make = lambda c: (
        lambda i: nlr_mod.norm_linear_rope(
            x, g, None, ws[i], None, targets[i % len(targets)], eps=EPS, counters=counters, config=c
        )
    )
    rows = [
        bench.best(
            "qkv_rope", M, "fused norm_linear_rope", 1, nbytes, make, len(ws), NORM_LINEAR_CONFIGS
        )
    ]
    qkv_best = min(
        (
            r
            for r in bench.rows
            if r["op"] == "qkv" and r["batch"] == M and "norm_linear" in r["impl"]
        ),
        key=lambda r: r["ms"],
        default=None,
    )
    qkv_config = next(
        (c for c in NORM_LINEAR_CONFIGS if qkv_best and repr(c) == qkv_best["config"]), None
    )

    def pair(i: int) -> torch.Tensor:
        out = nl_mod.norm_linear(x, g, None, ws[i], eps=EPS, counters=counters, config=qkv_config)
        t = targets[i % len(targets)]
        return rope_mod.rope_cache_write(
            out,
            pos,
            t.cos,
            t.sin,
            t.k_cache,
            t.v_cache,
            slot,
            num_heads=HEADS,
            num_kv_heads=KV_HEADS,
        )

    rows.append(
        bench.run("qkv_rope", M, "norm_linear + rope_cache_write", 2, nbytes, pair, len(ws))
    )
    keep("qkv_rope", [r for r in rows if r])

    # -- final norm + lm_head + argmax ---------------------------------------------------------
    ws = W["lm_head"]
    ws_ = lm_mod.new_workspace(DEV)
    logits_buf = torch.empty(M, VOCAB, device=DEV, dtype=DTYPE)
    nbytes = (VOCAB * HIDDEN + M * HIDDEN) * b2
    rows = []
    for impl, with_logits in [
        ("fused lm_head_argmax", False),
        ("fused lm_head_argmax+logits", True),
    ]:
        make = lambda c, wl=with_logits: (
            lambda i: lm_mod.lm_head_argmax(
                x,
                ws[i],
                norm_weight=g,
                eps=EPS,
                logits_out=logits_buf if wl else None,
                workspace=ws_,
                config=c,
            )
        )
        rows.append(
            bench.best(
                "lm_head",
                M,
                impl,
                1,
                nbytes + with_logits * M * VOCAB * b2,
                make,
                len(ws),
                LM_HEAD_CONFIGS,
            )
        )
    for impl, kernels, fn in unfused_impls("lm_head", x, g, ws):
        rows.append(bench.run("lm_head", M, impl, kernels, nbytes + M * VOCAB * b2, fn, len(ws)))
    keep("lm_head", [r for r in rows if r])
    return out


def step_estimate(times: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per-step time of these ops alone (16 layers + lm_head; attention, embedding not
    included): fused vs the unfused kernl sequence."""
    layer_ops = ("qkv", "rope", "o", "gate_up", "down")

    def pick(op: str, prefix: str) -> float:
        return min(
            (ms for impl, ms in times[op].items() if impl.startswith(prefix)), default=float("nan")
        )

    fused = LAYERS * sum(pick(op, "fused") for op in layer_ops)
    fused += times["lm_head"].get("fused lm_head_argmax", float("nan"))
    # the decoder's rope is plain torch whatever the kernel choice
    kernl = LAYERS * sum(pick(op, "kernl" if op != "rope" else "torch") for op in layer_ops)
    kernl += times["lm_head"].get("kernl norm+skinny+argmax", float("nan"))
    return {"fused_ms": fused, "unfused_kernl_ms": kernl}


def main() -> None:
    assert torch.cuda.is_available(), "bench_decode_kernels needs a CUDA GPU"
    t0 = time.time()
    torch.manual_seed(0)
    import triton

    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "ceiling_GBps": CEILING_GBPS,
    }
    print(info)
    checks = correctness()
    W = {
        "g": (torch.rand(HIDDEN, device=DEV) + 0.5).to(DTYPE),
        "qkv": weight_copies(lambda: randn((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, scale=0.02)),
        "gate_up": weight_copies(lambda: randn(2 * INTER, HIDDEN, scale=0.02)),
        "o": weight_copies(lambda: randn(HIDDEN, HEADS * HEAD_DIM, scale=0.02)),
        "down": weight_copies(lambda: randn(HIDDEN, INTER, scale=0.02)),
        "lm_head": [randn(VOCAB, HIDDEN, scale=0.02)],  # 525 MB: far past L2 on its own
    }
    inv_freq = 1.0 / (500000 ** (torch.arange(0, HEAD_DIM, 2, device=DEV).float() / HEAD_DIM))
    W["cos"], W["sin"] = rope_mod.rope_tables(inv_freq, 4096, 1.0, DTYPE)
    W["rope_m"] = _rope_matrices(W["cos"], W["sin"])
    bench = Bench()
    estimates = {}
    for M in BATCHES:
        print(f"batch {M} ({time.time() - t0:.0f} s)")
        estimates[M] = step_estimate(bench_batch(bench, M, W))
        e = estimates[M]
        print(
            f"  step estimate (16 layers of qkv+rope+o+gate_up+down, + lm_head; no attention):"
            f" fused {e['fused_ms'] * 1000:.0f} us vs unfused kernl {e['unfused_kernl_ms'] * 1000:.0f} us"
        )
    result = {
        **info,
        "checks": checks,
        "rows": bench.rows,
        "step_estimates": estimates,
        "seconds": time.time() - t0,
    }
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "bench_decode_kernels.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")
    print(
        f"done in {time.time() - t0:.0f} s; checks {'ok' if all(c['ok'] for c in checks) else 'FAILED'}"
    )


def _rope_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The decoder's per-position D x D rope matrices (runtime/generation/decoder.py rope_matrices)."""
    P, D = cos.shape
    half = D // 2
    m = torch.zeros(P, D, D, dtype=cos.dtype, device=cos.device)
    idx = torch.arange(D, device=cos.device)
    m[:, idx, idx] = cos
    lo = torch.arange(half, device=cos.device)
    m[:, lo + half, lo] = -sin[:, :half]
    m[:, lo, lo + half] = sin[:, half:]
    return m


if __name__ == "__main__":
    main()
