"""A wide sweep of the fused decode kernels' configs at Llama-3.2-1B decode shapes (bf16, hidden
2048, intermediate 8192, 32 / 8 heads of 64, vocab 128256), batch 1, 4 and 8 (issue 15).

    PYTHONPATH=$PWD OUT=/tmp/out python benchmarks/sweep_decode_configs.py     # H200, < 4 min
    PYTHONPATH=$PWD TRITON_INTERPRET=1 python benchmarks/sweep_decode_configs.py --tiny  # CPU

Ops: `norm_linear` on QKV (N 3072) and gated gate/up (N 2 x 8192) from K 2048,
`skinny_linear_fused` on O (2048 x 2048) and down (2048 x 8192) with the residual,
`lm_head_argmax` (128256 x 2048, final norm folded in), each against the unfused sequences
it replaces (bench_decode_kernels.unfused_impls: kernl's unfused path and plain torch).
The space per kernel is its decode space (what the compiler searches per decode batch,
`*_decode_configs()`) and its general tuning space, plus a seeded sample of a wider one (BLOCK_K up
to 512, 2 to 8 warps, 2 to 6 stages, split-K 1 to 16), filtered by shared memory.

Timing as in bench_decode_kernels (imported): weights rotated over copies that together
exceed L2, a CUDA graph of >= 20 calls replayed, median of CUDA-event timings. Each config is
first run once and checked against a float64 reference (max error at most 2x stock torch's
bf16 error + 8e-3; lm_head: the chosen id's float64 logit within that tolerance of the
row's maximum); a failing config is kept in the JSON, marked, and never ranked.

Compilation dominates (each config compiles twice: Triton specialises M == 1), so the
configs are first compiled in parallel by `--jobs` worker processes that run each one once on
the GPU at the real shapes, filling Triton's on-disk cache; the timing process then only
loads binaries. A `--budget-s` deadline (shared out per op) skips what is left rather than
overrun; skipped configs are listed in the JSON.

Output: per op and batch the top 5 configs (us and % of the 4.26 TB/s copy ceiling) and the
unfused references; JSON to $OUT/sweep_decode_configs.json."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_decode_kernels as bdk  # noqa: E402

from kernl.kernels import lm_head_argmax as lm_mod  # noqa: E402
from kernl.kernels import norm_linear as nl_mod  # noqa: E402
from kernl.kernels import skinny_linear_fused as slf_mod  # noqa: E402

CEILING_GBPS = bdk.CEILING_GBPS
SMEM_BYTES = 200 * 1024  # stay under an H100/H200 SM's 227 KB, leaving the epilogue room


@dataclass(frozen=True)
class Shapes:
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def n_qkv(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim


LLAMA_1B = Shapes(2048, 8192, 32, 8, 64, 128256)
TINY = Shapes(64, 80, 4, 2, 16, 300)  # widths that are not multiples of the blocks


# -- the spaces ---------------------------------------------------------------------------------


def _smem(bn: int, bk: int, stages: int, n_weights: int) -> int:
    """Bytes of the pipelined loads: weight tile(s) plus the 16-row x tile, bf16."""
    return stages * (n_weights * bn * bk + 16 * bk) * 2


def _wide(
    make: Callable[..., object],
    today: list,
    split_choices: tuple[int, ...],
    n_weights: int,
    extra: int,
    seed: int,
) -> list:
    """Today's space first, then `extra` distinct configs sampled (seeded) from the wide one."""
    wide = []
    for bn in (16, 32, 64, 128, 256):
        for bk in (64, 128, 256, 512):
            for w in (2, 4, 8):
                for st in (2, 3, 4, 5, 6):
                    tile = bn * bk * n_weights
                    # shared memory of the pipeline, and <= 256 weight elements per thread
                    # in registers (more spills: slow to compile, slower to run)
                    if _smem(bn, bk, st, n_weights) > SMEM_BYTES or tile > 256 * 32 * w:
                        continue
                    for sk in split_choices:
                        wide.append(make(bn, bk, sk, w, st))
    today = list(dict.fromkeys(today))  # in order, once each
    seen = set(today)
    rest = [c for c in wide if c not in seen]
    random.Random(seed).shuffle(rest)
    return list(today) + rest[:extra]


def norm_linear_space(gated: bool, extra: int) -> list[nl_mod.NormLinearConfig]:
    return _wide(
        nl_mod.NormLinearConfig,
        nl_mod.norm_linear_decode_configs() + nl_mod.norm_linear_configs(),
        (0, 1, 2, 4, 8, 16),
        2 if gated else 1,
        extra,
        seed=1 + gated,
    )


def skinny_fused_space(extra: int) -> list[slf_mod.SkinnyLinearFusedConfig]:
    return _wide(
        slf_mod.SkinnyLinearFusedConfig,
        slf_mod.skinny_linear_fused_decode_configs() + slf_mod.skinny_linear_fused_configs(),
        (0, 1, 2, 4, 8, 16),
        1,
        extra,
        seed=3,
    )


def lm_head_space(extra: int) -> list[lm_mod.LmHeadArgmaxConfig]:
    make = lambda bn, bk, sk, w, st: lm_mod.LmHeadArgmaxConfig(bn, bk, w, st)  # noqa: E731
    today = lm_mod.lm_head_argmax_decode_configs() + lm_mod.lm_head_argmax_configs()
    return _wide(make, today, (0,), 1, extra, seed=4)


# -- the ops ------------------------------------------------------------------------------------


@dataclass
class Op:
    """One fused op at one batch: `fused(config)` returns fn(i) over weight copies; `check`
    runs a config once and says whether it is right; `unfused` are the references."""

    name: str
    kernel: str
    batch: int
    nbytes: float
    copies: int
    configs: list
    fused: Callable[[object], Callable[[int], object]]
    check: Callable[[object], tuple[bool, float]]
    unfused: list[tuple[str, int, Callable[[int], object]]]


def build_ops(S: Shapes, M: int, W: dict, spaces: dict, dev: str, dtype) -> list[Op]:
    b = torch.finfo(dtype).bits // 8
    rnd = lambda *s, scale=1.0: bdk.randn(*s, scale=scale, device=dev, dtype=dtype)  # noqa: E731
    g, x = W["g"], rnd(M, S.hidden)
    counters = nl_mod.new_counters(dev)
    d = lambda t: t.double()  # noqa: E731
    ops = []

    for name, gated in (("qkv", False), ("gate_up", True)):
        ws = W[name]
        n_out = ws[0].shape[0] // (2 if gated else 1)
        ref = nl_mod.norm_linear_reference(d(x), d(g), None, d(ws[0]), eps=bdk.EPS, gated=gated)
        stock = nl_mod.norm_linear_reference(x, g, None, ws[0], eps=bdk.EPS, gated=gated)

        def fused(c, ws=ws, gated=gated):
            return lambda i: nl_mod.norm_linear(
                x, g, None, ws[i], eps=bdk.EPS, gated=gated, counters=counters, config=c
            )

        def check(c, fused=fused, ref=ref, stock=stock):
            ok, err, _ = bdk.compare(fused(c)(0), ref, stock)
            return ok, err

        ops.append(
            Op(
                name,
                "norm_linear",
                M,
                (ws[0].numel() + M * S.hidden + M * n_out) * b,
                len(ws),
                spaces[name],
                fused,
                check,
                bdk.unfused_impls(name, x, g, ws),
            )
        )

    for name in ("o", "down"):
        ws = W[name]
        K = ws[0].shape[1]
        h, r = rnd(M, K), rnd(M, S.hidden)
        ref = slf_mod.skinny_linear_fused_reference(d(h), d(ws[0]), None, d(r))
        stock = slf_mod.skinny_linear_fused_reference(h, ws[0], None, r)

        def fused(c, ws=ws, h=h, r=r):
            return lambda i: slf_mod.skinny_linear_fused(
                h, ws[i], None, r, counters=counters, config=c
            )

        def check(c, fused=fused, ref=ref, stock=stock):
            ok, err, _ = bdk.compare(fused(c)(0), ref, stock)
            return ok, err

        ops.append(
            Op(
                name,
                "skinny_linear_fused",
                M,
                (ws[0].numel() + M * K + 2 * M * S.hidden) * b,
                len(ws),
                spaces["o_down"],
                fused,
                check,
                bdk.unfused_impls(name, x, g, ws, h, r),
            )
        )

    ws = W["lm_head"]
    workspace = lm_mod.new_workspace(dev)
    ref_ids, ref = lm_mod.lm_head_argmax_reference(d(x), d(ws[0]), d(g), bdk.EPS)
    _, stock = lm_mod.lm_head_argmax_reference(x, ws[0], g, bdk.EPS)
    tol = 2 * (stock.double() - ref).abs().max().item() + 8e-3

    def fused_lm(c):
        return lambda i: lm_mod.lm_head_argmax(
            x, ws[i], norm_weight=g, eps=bdk.EPS, workspace=workspace, config=c
        )

    def check_lm(c):
        # an id whose exact logit is within rounding of the row's maximum is a right answer;
        # a broken reduction picks one far below it
        ids, _ = fused_lm(c)(0)
        picked = ref.gather(1, ids.view(-1, 1)).squeeze(1)
        gap = (ref.max(-1).values - picked).max().item()
        return gap <= tol, gap

    ops.append(
        Op(
            "lm_head",
            "lm_head_argmax",
            M,
            (ws[0].numel() + M * S.hidden) * b,
            len(ws),
            spaces["lm_head"],
            fused_lm,
            check_lm,
            bdk.unfused_impls("lm_head", x, g, ws),
        )
    )
    return ops


def make_weights(S: Shapes, dev: str, dtype, l2_bytes: int) -> dict:
    rnd = lambda *s: bdk.randn(*s, scale=0.02, device=dev, dtype=dtype)  # noqa: E731
    copies = lambda *s: bdk.weight_copies(lambda: rnd(*s), l2_bytes)  # noqa: E731
    return {
        "g": (torch.rand(S.hidden, device=dev) + 0.5).to(dtype),
        "qkv": copies(S.n_qkv, S.hidden),
        "gate_up": copies(2 * S.inter, S.hidden),
        "o": copies(S.hidden, S.heads * S.head_dim),
        "down": copies(S.hidden, S.inter),
        "lm_head": [rnd(S.vocab, S.hidden)],  # 525 MB at Llama-1B: past L2 on its own
    }


# -- parallel compilation -----------------------------------------------------------------------

_WORKER: dict = {}


def _compile_one(op: str, config, M: int) -> str | None:
    """Worker: run one config once at the real shapes (empty tensors) so Triton compiles it
    into its on-disk cache. Returns an error string or None."""
    try:
        S, dev, dtype = LLAMA_1B, "cuda", torch.bfloat16
        key = (op, M)
        if key not in _WORKER:
            e = lambda *s: torch.empty(*s, device=dev, dtype=dtype).normal_(0, 0.02)  # noqa: E731
            K = {"o": S.hidden, "down": S.inter}.get(op, S.hidden)
            N = {"qkv": S.n_qkv, "gate_up": 2 * S.inter, "lm_head": S.vocab}.get(op, S.hidden)
            _WORKER[key] = (e(M, K), e(N, K), e(M, S.hidden), e(S.hidden) + 1)
        x, w, r, g = _WORKER[key]
        if op in ("qkv", "gate_up"):
            nl_mod.norm_linear(x, g, None, w, eps=1e-5, gated=op == "gate_up", config=config)
        elif op in ("o", "down"):
            slf_mod.skinny_linear_fused(x, w, None, r, config=config)
        else:
            lm_mod.lm_head_argmax(x, w, norm_weight=g, eps=1e-5, config=config)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # reported, and the timing process will skip it too
        return f"{type(e).__name__}: {str(e)[:200]}"


def precompile(tasks: list[tuple[str, object, int]], jobs: int, deadline: float) -> int:
    """Compile every (op, config, M) on `jobs` processes; returns how many failed."""
    import multiprocessing as mp

    failed = 0
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_compile_one, *t) for t in tasks]
        try:
            for f in as_completed(futures, timeout=max(1.0, deadline - time.time())):
                failed += f.result() is not None
        except TimeoutError:
            print("  precompile: deadline reached, the rest compiles while timing")
            for f in futures:
                f.cancel()
    return failed


# -- programmatic dependent launch ----------------------------------------------------------


def best_configs(tops: list[dict], M: int) -> dict[str, object]:
    """The sweep's fastest checked config per op at batch M (the kernels' defaults if none)."""
    types = {"qkv": nl_mod.NormLinearConfig, "gate_up": nl_mod.NormLinearConfig}
    types |= {"o": slf_mod.SkinnyLinearFusedConfig, "down": slf_mod.SkinnyLinearFusedConfig}
    types["lm_head"] = lm_mod.LmHeadArgmaxConfig
    best = {op: t() for op, t in types.items()}
    for t in tops:
        if t["batch"] == M and t["top"]:
            best[t["op"]] = types[t["op"]](**t["top"][0]["config"])
    return best


def pdl_probe(S: Shapes, M: int, configs: dict, dev: str, dtype, timer, layers: int) -> dict:
    """A decode step's fused kernels (per layer norm+QKV, O+residual, norm+gate/up+SiLU*up,
    down+residual; then norm+lm_head+argmax) over `layers` layers of distinct weights, in one
    CUDA graph, launched plainly, with PDL (each kernel `gdc_wait`s, then lets the next one
    launch) and with PDL plus the weight prefetch (L2 prefetches of each program's first
    weight lines before the wait). Attention and rope are left out: the O projection reads the first columns
    of the QKV output instead. All must give bitwise the same ids and residual stream (the
    split-K reductions are deterministic); the JSON says whether they did."""
    rnd = lambda *s: bdk.randn(*s, scale=0.02, device=dev, dtype=dtype)  # noqa: E731
    Lw = [
        (
            rnd(S.n_qkv, S.hidden),
            rnd(S.hidden, S.hidden),
            rnd(2 * S.inter, S.hidden),
            rnd(S.hidden, S.inter),
        )
        for _ in range(layers)
    ]
    lm = rnd(S.vocab, S.hidden)
    g = (torch.rand(S.hidden, device=dev) + 0.5).to(dtype)
    x0 = bdk.randn(M, S.hidden, device=dev, dtype=dtype)
    x, qkv = x0.clone(), torch.empty(M, S.n_qkv, device=dev, dtype=dtype)
    h = torch.empty(M, S.inter, device=dev, dtype=dtype)
    ids = torch.empty(M, dtype=torch.int64, device=dev)
    counters, workspace = nl_mod.new_counters(dev), lm_mod.new_workspace(dev)
    c = configs
    eps = bdk.EPS

    def step(pdl: bool, pf: bool = False) -> None:
        x.copy_(x0)
        for wqkv, wo, wgu, wd in Lw:
            nl_mod.norm_linear(
                x,
                g,
                None,
                wqkv,
                eps=eps,
                out=qkv,
                counters=counters,
                config=c["qkv"],
                pdl=pdl,
                prefetch=pf,
            )
            slf_mod.skinny_linear_fused(
                qkv[:, : S.hidden],
                wo,
                None,
                x,
                out=x,
                counters=counters,
                config=c["o"],
                pdl=pdl,
                prefetch=pf,
            )
            nl_mod.norm_linear(
                x,
                g,
                None,
                wgu,
                eps=eps,
                gated=True,
                out=h,
                counters=counters,
                config=c["gate_up"],
                pdl=pdl,
                prefetch=pf,
            )
            slf_mod.skinny_linear_fused(
                h, wd, None, x, out=x, counters=counters, config=c["down"], pdl=pdl, prefetch=pf
            )
        lm_mod.lm_head_argmax(
            x,
            lm,
            norm_weight=g,
            eps=eps,
            ids_out=ids,
            workspace=workspace,
            config=c["lm_head"],
            pdl=pdl,
            prefetch=pf,
        )

    results = {}
    variants = {"plain": (False, False), "pdl": (True, False), "pdl+prefetch": (True, True)}
    for name, (pdl, pf) in variants.items():
        step(pdl, pf)
        results[name] = (ids.clone(), x.clone())
    same = all(
        torch.equal(results["plain"][0], i) and torch.equal(results["plain"][1], r)
        for i, r in results.values()
    )
    kernels = 4 * layers + 1
    out = {"batch": M, "layers": layers, "kernels": kernels, "same_results": same}
    out["configs"] = {k: dataclasses.asdict(v) for k, v in configs.items()}
    for name, (pdl, pf) in variants.items():
        out[f"{name}_us"] = timer(lambda i, pdl=pdl, pf=pf: step(pdl, pf), 1) * 1000
    plain = out["plain_us"]
    print(
        f"PDL probe batch {M}: {kernels} kernels, plain {plain:.1f} us, PDL {out['pdl_us']:.1f} us "
        f"({(plain - out['pdl_us']) / kernels:+.2f} us per kernel saved), PDL+prefetch "
        f"{out['pdl+prefetch_us']:.1f} us ({(plain - out['pdl+prefetch_us']) / kernels:+.2f}); "
        f"same ids and residual: {same}"
    )
    return out


# -- the sweep ----------------------------------------------------------------------------------


def cpu_time_ms(fn: Callable[[int], object], copies: int, reps: int = 2) -> float:
    """--tiny: wall time of the interpreted calls; says the harness works, not how fast."""
    fn(0)
    t = time.perf_counter()
    for i in range(reps):
        fn(i % copies)
    return (time.perf_counter() - t) * 1000 / reps


def row(op: Op, impl: str, kernels: int, ms: float, config=None, **kw) -> dict:
    gbps = op.nbytes / ms / 1e6
    return {
        "op": op.name,
        "kernel": op.kernel,
        "batch": op.batch,
        "impl": impl,
        "kernels": kernels,
        "config": None if config is None else dataclasses.asdict(config),
        "us": ms * 1000,
        "GB/s": gbps,
        "pct_ceiling": 100 * gbps / CEILING_GBPS,
        **kw,
    }


def sweep_op(op: Op, timer, deadline: float, checked: dict) -> tuple[list[dict], list]:
    rows, skipped = [], []
    for impl, kernels, fn in op.unfused:
        try:
            rows.append(row(op, impl, kernels, timer(fn, op.copies), ok=True))
        except Exception as e:
            print(f"  {op.name} M={op.batch} {impl} failed: {type(e).__name__}: {str(e)[:120]}")
    for c in op.configs:
        if time.time() > deadline:
            skipped.append(dataclasses.asdict(c))
            continue
        try:
            key = (op.name, op.batch, c)
            ok, err = checked[key] if key in checked else op.check(c)
            checked[key] = (ok, err)
            ms = timer(op.fused(c), op.copies)
        except Exception as e:  # a config that does not compile or fit: skip it, say so
            rows.append(
                {
                    "op": op.name,
                    "batch": op.batch,
                    "config": dataclasses.asdict(c),
                    "error": f"{type(e).__name__}: {str(e)[:200]}",
                }
            )
            continue
        rows.append(row(op, f"fused {op.kernel}", 1, ms, c, ok=ok, max_err=err))
    return rows, skipped


def report(op: Op, rows: list[dict], top: int = 5) -> dict:
    fused = sorted(
        (r for r in rows if r.get("kernels") == 1 and r.get("config") and r["ok"]),
        key=lambda r: r["us"],
    )
    bad = sum(1 for r in rows if r.get("config") and (not r.get("ok") or "error" in r))
    print(f"{op.name} ({op.kernel}) batch {op.batch}: {len(fused)} configs ok, {bad} failed")
    for r in fused[:top]:
        print(f"  {r['us']:8.2f} us {r['pct_ceiling']:5.1f}%  {r['config']}")
    for r in rows:
        if not r.get("config") and "us" in r:
            print(f"  {r['us']:8.2f} us {r['pct_ceiling']:5.1f}%  {r['impl']} ({r['kernels']} k)")
    return {"op": op.name, "batch": op.batch, "top": fused[:top]}


def summarize(path: str, top: int = 3) -> None:
    """From a sweep's JSON: per op and batch the best fused config against the best unfused
    sequence, then per kernel every config in some (op, batch)'s top `top`, marked where the
    compiler's decode space (`*_decode_configs()`) holds it: what that space should cover."""
    with open(path) as f:
        res = json.load(f)
    rows = [r for r in res["rows"] if "us" in r]
    spaces = {
        "norm_linear": nl_mod.norm_linear_decode_configs(),
        "skinny_linear_fused": slf_mod.skinny_linear_fused_decode_configs(),
        "lm_head_argmax": lm_mod.lm_head_argmax_decode_configs(),
    }
    types = {k: type(v[0]) for k, v in spaces.items()}
    wanted: dict[str, dict] = {k: {} for k in spaces}
    print(f"{res['device']}, {res['date']}; {res['failed_checks']} configs failed their check")
    for op in dict.fromkeys(r["op"] for r in rows):
        for M in sorted({r["batch"] for r in rows if r["op"] == op}):
            here = [r for r in rows if r["op"] == op and r["batch"] == M]
            fused = sorted(
                (r for r in here if r.get("config") and r.get("ok")), key=lambda r: r["us"]
            )
            plain = sorted((r for r in here if not r.get("config")), key=lambda r: r["us"])
            if not fused:
                continue
            kernel = fused[0]["kernel"]
            line = (
                f"{op:<8} M={M:<2} fused {fused[0]['us']:7.2f} us {fused[0]['pct_ceiling']:5.1f}%"
            )
            if plain:
                line += f" | best unfused {plain[0]['us']:7.2f} us ({plain[0]['impl']})"
            in_space = [r for r in fused if types[kernel](**r["config"]) in spaces[kernel]]
            if in_space:
                line += f" | decode space's best {in_space[0]['us']:7.2f} us"
            print(line)
            for r in fused[:top]:
                key = json.dumps(r["config"], sort_keys=True)
                wanted[kernel].setdefault(key, []).append(f"{op}@{M}:{r['us']:.1f}")
    for kernel, configs in wanted.items():
        print(f"{kernel}: configs in some top {top}")
        for key, where in sorted(configs.items(), key=lambda kv: -len(kv[1])):
            held = types[kernel](**json.loads(key)) in spaces[kernel]
            print(f"  {'in space ' if held else 'NOT in   '} {key}  {' '.join(where)}")
    for p in res.get("pdl_probe", []):
        print(f"PDL probe: {p}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, small shapes, few configs")
    ap.add_argument("--budget-s", type=float, default=210.0, help="whole-run deadline")
    ap.add_argument("--jobs", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--extra", type=int, default=40, help="wide-space configs per kernel")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--no-pdl", action="store_true", help="skip the PDL probe")
    ap.add_argument("--pdl-reserve-s", type=float, default=60.0, help="budget kept for it")
    ap.add_argument("--summary", metavar="JSON", help="summarize a sweep's JSON, run nothing")
    args = ap.parse_args()
    if args.summary:
        return summarize(args.summary)
    t0 = time.time()
    deadline = t0 + args.budget_s - (0 if args.no_pdl else args.pdl_reserve_s)
    torch.manual_seed(0)
    import triton

    if args.tiny:
        assert os.environ.get("TRITON_INTERPRET") == "1", "--tiny runs under TRITON_INTERPRET=1"
        S, dev, dtype, l2, timer = TINY, "cpu", torch.float32, 4 * 2**10, cpu_time_ms
        batches, extra = (1, 3), 2
    else:
        assert torch.cuda.is_available(), "the sweep needs a CUDA GPU (or --tiny on the CPU)"
        S, dev, dtype, l2, timer = LLAMA_1B, "cuda", torch.bfloat16, bdk.L2_BYTES, bdk.time_ms
        batches, extra = tuple(int(b) for b in args.batches.split(",")), args.extra
    spaces = {
        "qkv": norm_linear_space(False, extra),
        "gate_up": norm_linear_space(True, extra),
        "o_down": skinny_fused_space(extra),
        "lm_head": lm_head_space(extra),
    }
    if args.tiny:  # today's defaults and the sampled extras, a handful per kernel
        spaces = {k: v[:1] + v[-extra:] for k, v in spaces.items()}
    info = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "shapes": dataclasses.asdict(S),
        "ceiling_GBps": CEILING_GBPS,
        "space_sizes": {k: len(v) for k, v in spaces.items()},
    }
    print(info)

    if dev == "cuda" and args.jobs > 0:
        op_space = {"qkv": "qkv", "gate_up": "gate_up", "o": "o_down", "down": "o_down"}
        op_space["lm_head"] = "lm_head"
        ms = sorted({1 if b == 1 else 2 for b in batches})  # Triton specialises M == 1 only
        tasks = [(op, c, m) for op, sp in op_space.items() for c in spaces[sp] for m in ms]
        t = time.time()
        try:
            failed = precompile(tasks, args.jobs, t0 + 0.45 * args.budget_s)
        except Exception as e:  # a worker died: the timing process compiles what is left
            print(f"precompile failed: {type(e).__name__}: {str(e)[:200]}")
            failed = -1
        info["precompile"] = {"tasks": len(tasks), "failed": failed, "s": time.time() - t}
        print(
            f"precompiled {len(tasks)} (op, config, M) on {args.jobs} processes in "
            f"{time.time() - t:.0f} s, {failed} failed"
        )

    W = make_weights(S, dev, dtype, l2)
    rows, tops, skipped, checked, pdl = [], [], {}, {}, []

    def dump(final: bool) -> None:
        """The JSON so far (rewritten after every op: a run cut short still leaves data)."""
        if not os.environ.get("OUT"):
            return
        failed = sum(1 for r in rows if r.get("config") and r.get("ok") is False)
        result = {**info, "complete": final, "rows": rows, "top": tops, "skipped": skipped}
        result |= {"failed_checks": failed, "pdl_probe": pdl, "seconds": time.time() - t0}
        os.makedirs(os.environ["OUT"], exist_ok=True)
        path = os.path.join(os.environ["OUT"], "sweep_decode_configs.json")
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)
        if final:
            print(f"wrote {path}")

    n_ops = 5 * len(batches)
    done = 0
    for M in batches:
        for op in build_ops(S, M, W, spaces, dev, dtype):
            # each (op, batch) may use its share of what is left of the budget
            share = (deadline - time.time()) / max(1, n_ops - done)
            op_rows, op_skipped = sweep_op(op, timer, time.time() + share, checked)
            done += 1
            rows += op_rows
            if op_skipped:
                skipped[f"{op.name} M={M}"] = op_skipped
                print(f"  budget: skipped {len(op_skipped)} configs of {op.name} M={M}")
            tops.append(report(op, op_rows))
            if dev == "cuda":
                torch.cuda.synchronize()
            dump(final=False)
    if not args.no_pdl:
        for M in batches:
            try:
                pdl.append(
                    pdl_probe(
                        S, M, best_configs(tops, M), dev, dtype, timer, 2 if args.tiny else 16
                    )
                )
            except Exception as e:  # e.g. PDL inside graph capture unsupported: say so
                print(f"PDL probe batch {M} failed: {type(e).__name__}: {str(e)[:300]}")
                pdl.append({"batch": M, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    dump(final=True)
    failed_checks = [r for r in rows if r.get("config") and r.get("ok") is False]
    print(f"done in {time.time() - t0:.0f} s; {len(failed_checks)} configs failed their check")


if __name__ == "__main__":
    main()
