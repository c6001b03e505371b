"""The persistent decode step (kernels/decode_step.py) at Llama-3.2-1B's shapes (bf16, 16
layers, hidden 2048, intermediate 8192, 32 heads / 8 kv heads of 64, vocab 128256, random
weights), for each config of `decode_step_configs()`, batch 1, 4 and 8, a cache of 512 and
2048 slots (the step at the last slot: attention reads the whole cache).

    python benchmarks/bench_decode_step.py        # JSON to $OUT/bench_decode_step.json
    STEP_CONFIGS=1,8,17,18,19 STEP_NO_DIAGNOSTIC=1 python benchmarks/bench_decode_step.py
                                                  # those configs only, no layer diagnostic

Each case: one step captured in a CUDA graph, replayed 30 times to warm up, then the median
of 200 replays timed one by one with CUDA events. GB/s counts the weight bytes a step must
stream (2.47 GB) and is compared with the 4.26 TB/s copy ceiling measured on an H200; tok/s
per row is 1 / step. Before timing, each batch's step is checked once against the plain
PyTorch step in float32 (logits, ids). A plain script, not collected by pytest."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernl.kernels.decode_step import (  # noqa: E402
    DecodeStepBuffers,
    DecodeStepConfig,
    DecodeStepWeights,
    decode_step,
    decode_step_configs,
    decode_step_reference,
    sm_count,
    trace_shape,
)
from kernl.kernels.rope_cache_write import rope_tables  # noqa: E402

L, H, NH, KVH, D, I, V = 16, 2048, 32, 8, 64, 8192, 128256  # noqa: E741
CEILING_GBPS = 4260.0
DEV, DTYPE = "cuda", torch.bfloat16


def weights() -> DecodeStepWeights:
    g = torch.Generator(device=DEV).manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device=DEV) * scale).to(DTYPE)

    def norm(*s):
        return (torch.rand(*s, generator=g, device=DEV) + 0.5).to(DTYPE)

    inv_freq = 1.0 / 500000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    cos, sin = rope_tables(inv_freq, 4096, dtype=DTYPE, device=DEV)
    embed = rnd(V, H)
    return DecodeStepWeights(
        embed=embed,
        attn_norm=norm(L, H),
        qkv=rnd(L, (NH + 2 * KVH) * D, H, scale=H**-0.5),
        qkv_bias=None,
        o=rnd(L, H, NH * D, scale=(NH * D) ** -0.5),
        mlp_norm=norm(L, H),
        gate_up=rnd(L, 2 * I, H, scale=H**-0.5),
        down=rnd(L, H, I, scale=I**-0.5),
        final_norm=norm(H),
        lm_head=embed,  # tied, as Llama-3.2-1B
        cos=cos,
        sin=sin,
        num_heads=NH,
        num_kv_heads=KVH,
        eps=1e-5,
        sm_scale=D**-0.5,
    )


def weight_bytes(w: DecodeStepWeights) -> int:
    kinds = (w.qkv, w.o, w.gate_up, w.down, w.lm_head, w.attn_norm, w.mlp_norm)
    return sum(t.numel() * t.element_size() for t in kinds)


def inputs(B: int, slots: int):
    g = torch.Generator(device=DEV).manual_seed(1)
    k = (torch.randn(L, B, KVH, slots, D, generator=g, device=DEV) * 0.5).to(DTYPE)
    v = (torch.randn(L, B, KVH, slots, D, generator=g, device=DEV) * 0.5).to(DTYPE)
    tokens = torch.randint(0, V, (B,), generator=g, device=DEV)
    positions = torch.full((B,), slots - 1, dtype=torch.int64, device=DEV)
    slot = torch.tensor([slots - 1], device=DEV)
    kv_valid = torch.ones(B, slots, dtype=torch.bool, device=DEV)
    return tokens, positions, slot, kv_valid, k, v


def check(w: DecodeStepWeights, B: int) -> dict:
    tokens, positions, slot, kv_valid, k, v = inputs(B, 512)
    buffers = DecodeStepBuffers.allocate(w, B, decode_step_configs()[0])
    logits, ids = decode_step(w, buffers, tokens, positions, slot, kv_valid, k.clone(), v.clone())
    w32 = DecodeStepWeights(
        **{
            n: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for n, t in vars(w).items()
        }
    )
    ref_logits, ref_ids = decode_step_reference(
        w32, tokens, positions, slot, kv_valid, k.float(), v.float()
    )
    err = (logits.float() - ref_logits).abs().max().item()
    return {
        "batch": B,
        "max_abs_logit_err": err,
        "max_abs_logit": ref_logits.abs().max().item(),
        "ids_equal": int((ids == ref_ids).sum()),
        "timed_out_barrier": int(buffers.sync[2]),
    }


def time_step(w, B: int, slots: int, config, prefetch: bool = False) -> float:
    tokens, positions, slot, kv_valid, k, v = inputs(B, slots)
    buffers = DecodeStepBuffers.allocate(w, B, config)
    run = lambda: decode_step(  # noqa: E731
        w, buffers, tokens, positions, slot, kv_valid, k, v, config=config, prefetch=prefetch
    )
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(30):
        graph.replay()
    times = []
    for _ in range(200):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    assert int(buffers.sync[2]) == 0, "a barrier wait timed out"
    return statistics.median(times)


OPS = ("qkv", "attention", "o", "gate_up", "down")


def trace_report(w, B: int, slots: int, config) -> dict:
    """Where one step's time goes, from the kernel's own barrier timestamps: per op kind, the
    mean over layers of its span (one barrier's opening to the next's), of its slowest
    program's work, of the barrier's latency (last arrival to first departure) and of a
    program's work; then lm_head (the last opening to the last program's end)."""
    tokens, positions, slot, kv_valid, k, v = inputs(B, slots)
    buffers = DecodeStepBuffers.allocate(w, B, config)
    programs = config.programs_per_sm * sm_count(torch.device(DEV))
    trace = torch.zeros(trace_shape(L, programs), dtype=torch.int64, device=DEV)
    for _ in range(3):  # the last run's times stay
        decode_step(w, buffers, tokens, positions, slot, kv_valid, k, v, config=config, trace=trace)
    torch.cuda.synchronize()
    return summarize(trace.cpu())


def summarize(trace: torch.Tensor) -> dict:
    """trace_report's figures from a trace [programs, barriers + 1, 2] in ns."""
    t = trace.double() / 1e3  # µs
    arrive, leave = t[:, :-1, 0], t[:, :-1, 1]
    start, end = t[:, -1, 0], t[:, -1, 1]
    opened = leave.min(0).values  # each barrier's first departure
    before = torch.cat([start.min().reshape(1), opened[:-1]])
    prev_leave = torch.cat([start[:, None], leave[:, :-1]], 1)
    rows = {
        "span": opened - before,
        "slowest_work": arrive.max(0).values - before,
        "barrier": opened - arrive.max(0).values,
        "mean_work": (arrive - prev_leave).mean(0),
    }
    report = {"step_us": float(end.max() - start.min()), "embed": float(rows["span"][0])}
    for i, op in enumerate(OPS):
        report[op] = {name: float(r[1 + i :: 5].mean()) for name, r in rows.items()}
    report["lm_head"] = float(end.max() - opened[-1])
    return report


def print_trace(name: str, r: dict) -> None:
    print(
        f"trace {name}: step {r['step_us']:.0f} us, embed {r['embed']:.1f},"
        f" lm_head {r['lm_head']:.1f}",
        flush=True,
    )
    for op in OPS:
        print(f"  {op:9s} " + "  ".join(f"{k} {v:6.1f}" for k, v in r[op].items()), flush=True)


def explore(w: DecodeStepWeights, base: DecodeStepConfig, out: str) -> None:
    """`STEP_EXPLORE=i`: variants of config i (attention chunking, unsplit down tiles, gate/up
    asked of L2 ahead) at batch 1 and 8 over 512 slots, and the traces of config i at both
    batches: a short run."""
    variants = [
        base,
        replace(base, att_fill=not base.att_fill),
        replace(base, ATT_SPLITS=16, ATT_BLOCK=32),
        replace(base, DOWN_N=16, SPLIT_DOWN=1, DOWN_BLOCK_K=512),
        replace(base, DOWN_N=16, SPLIT_DOWN=1, DOWN_BLOCK_K=256),
        replace(base, up_ahead_k=1024),
        replace(base, up_ahead_k=2048),
    ]
    rows, traces = [], {}
    for B in (1, 8):
        for config in variants:
            try:
                ms = time_step(w, B, 512, config)
            except Exception as e:  # noqa: BLE001 - reported, the others still run
                print(f"B={B} {config}: failed {type(e).__name__}: {e}"[:400])
                continue
            rows.append(dict(batch=B, slots=512, config=repr(config), ms=ms))
            print(f"B={B} slots=512 {ms * 1e3:7.1f} us  {config}", flush=True)
        traces[B] = trace_report(w, B, 512, base)
        print_trace(f"B={B} slots=512 base", traces[B])
    with open(os.path.join(out, "bench_decode_step_explore.json"), "w") as f:
        json.dump({"rows": rows, "traces": traces}, f, indent=1)


def config_spec(entry: str, every: list[DecodeStepConfig]) -> tuple[int, DecodeStepConfig]:
    """'8' -> (8, config 8); '8:num_warps=8:ahead_k=128' -> (8, config 8 with those fields)."""
    index, *changes = entry.split(":")
    config = every[int(index)]
    for change in changes:
        field, value = change.split("=")
        config = replace(config, **{field: type(getattr(config, field))(int(value))})
    return int(index), config


def main() -> None:
    out = os.environ.get("OUT", ".")
    w = weights()
    nbytes = weight_bytes(w)
    if os.environ.get("STEP_EXPLORE"):
        explore(w, decode_step_configs()[int(os.environ["STEP_EXPLORE"])], out)
        return
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "weight_bytes": nbytes,
    }
    print(info, flush=True)
    checks = [check(w, B) for B in (1, 4, 8)]
    for c in checks:
        print("check", c, flush=True)
    rows = []
    # STEP_CONFIGS=1,8,18 times those configs only (the L2 prefetch variant with 0 among them);
    # an entry 8:num_warps=8:ahead_k=128 times config 8 with those fields changed
    chosen = os.environ.get("STEP_CONFIGS")
    every = decode_step_configs()
    specs = [config_spec(e, every) for e in chosen.split(",")] if chosen else None
    indices = [i for i, _ in specs] if specs else None
    for B in (1, 4, 8):
        for slots in (512, 2048):
            variants = [(i, c, False) for i, c in (specs or enumerate(every))]
            if indices is None or 0 in indices:  # what the L2 prefetch buys
                variants.append((0, decode_step_configs()[0], True))
            for index, config, prefetch in variants:
                try:
                    ms = time_step(w, B, slots, config, prefetch)
                except Exception as e:  # noqa: BLE001 - reported, the others still run
                    print(f"B={B} slots={slots} {config}: failed {type(e).__name__}: {e}"[:400])
                    continue
                row = dict(batch=B, slots=slots, index=index, config=repr(config), ms=ms)
                row["prefetch"] = prefetch
                row["gbps"] = nbytes / ms / 1e6
                row["tok_s_per_row"] = 1e3 / ms
                rows.append(row)
                print(
                    f"B={B} slots={slots} {ms * 1e3:7.1f} us  {row['gbps']:6.0f} GB/s "
                    f"({row['gbps'] / CEILING_GBPS:.0%})  {row['tok_s_per_row']:6.0f} tok/s/row  "
                    f"{'PREFETCH ' if prefetch else ''}{config}",
                    flush=True,
                )
    # where a layer's time goes: the step over the first n layers (the stacks sliced), batch 1,
    # on the config fastest at batch 1 over 512 slots
    timed = [r for r in rows if (r["batch"], r["slots"], r["prefetch"]) == (1, 512, False)]
    by_repr = {repr(c): c for _, c in (specs or enumerate(every))}
    best = by_repr[min(timed, key=lambda r: r["ms"])["config"]] if timed else every[0]
    if os.environ.get("STEP_NO_DIAGNOSTIC"):  # the configs' times only
        with open(os.path.join(out, "bench_decode_step.json"), "w") as f:
            json.dump({"info": info, "checks": checks, "rows": rows}, f, indent=1)
        return
    print("layers diagnostic on", best, flush=True)
    for n in (2, 8):
        part = DecodeStepWeights(
            **{
                k: t[:n] if k in ("attn_norm", "qkv", "o", "mlp_norm", "gate_up", "down") else t
                for k, t in vars(w).items()
            }
        )
        global L
        full, L = L, n
        try:
            ms = time_step(part, 1, 512, best)
        finally:
            L = full
        rows.append(dict(batch=1, slots=512, layers=n, ms=ms))
        print(f"B=1 slots=512 first {n} layers: {ms * 1e3:7.1f} us", flush=True)
    traces = {}
    for name, config in (("default", decode_step_configs()[0]), ("fastest", best)):
        try:
            traces[name] = trace_report(w, 1, 512, config)
        except Exception as e:  # noqa: BLE001 - reported
            print(f"trace {name} failed: {type(e).__name__}: {e}"[:300])
            continue
        print_trace(f"B=1 slots=512 {name}", traces[name])
    with open(os.path.join(out, "bench_decode_step.json"), "w") as f:
        json.dump({"info": info, "checks": checks, "rows": rows, "traces": traces}, f, indent=1)


if __name__ == "__main__":
    main()
