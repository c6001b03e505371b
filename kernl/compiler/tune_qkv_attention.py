"""After tuning: an encoder layer's QKV linear and attention become one fused kernel
(kernl.qkv_attention, compiler/passes/qkv_attention.py) where that kernel is faster than the
two launches the tuner chose for them.

The fused kernel's candidates are timed on the group's real inputs (one walk of the tuned
program), like any instruction's, and cached on disk with the same key; the two launches'
time is the sum of what the tuner measured for them, each alone (which favours them: in one
graph the pair took 1.04x that sum, H100, 2026-12-05). Where nothing is timed (the CPU, or
tuning off) every group stays as it was."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import torch
import triton

from kernl.artifacts.program import Program
from kernl.kernels.launch import sm_count
from kernl.kernels.qkv_attention import qkv_attention_configs, qkv_attention_refusal
from kernl.runtime.binaries import allow_jit
from kernl.runtime.executor import Executor

from .compile_ahead import compile_ahead
from .passes.qkv_attention import fuse_qkv_attention, qkv_attention_groups
from .tune import (
    TuneRecord,
    TuneSession,
    _describe,
    _failure_key,
    _read_cached,
    _timing_target,
    _walk,
    cache_dir,
    encode_config,
    kernl_ops_fn,
    quiet_native_stderr,
    time_candidates,
    write_cache_record,
)

OP = "kernl.qkv_attention"


def tune_qkv_attention(
    program: Program,
    weights: dict,
    inputs: dict,
    device: torch.device,
    records: list[TuneRecord],
    session: TuneSession,
    benchmark: bool = True,
    progress=None,
) -> int:
    """Fuses (in place) each group of `program` whose fused kernel timed faster than its two
    tuned launches; `records` (tune_program's, for this program) then name the fused
    instruction instead of the two. Returns how many groups were fused."""
    groups = qkv_attention_groups(program)
    gpu = _timing_target(device)
    if not groups or gpu is None or not benchmark:
        return 0
    by_ins = {id(program.instructions[r.index]): r for r in records}
    wanted = {id(g.linear) for g in groups} | {id(g.attention) for g in groups}
    seen: dict[int, list] = {}
    env: dict = {}
    with allow_jit(), torch.no_grad():
        for i, _op, _outs, _ in _walk(Executor(program, weights, device), inputs, env):
            if id(program.instructions[i]) in wanted:
                seen[id(program.instructions[i])] = list(env["args"])
    chosen = []
    for group in groups:
        pair = [by_ins.get(id(group.linear)), by_ins.get(id(group.attention))]
        if any(r is None or r.time_us is None or r.aten_time_us is None for r in pair):
            continue
        x, w, b = seen[id(group.linear)][:3]
        mask, scale = seen[id(group.attention)][3:5]
        args = (x, w, b, mask, scale, group.num_heads)
        found = _best_fused(args, gpu, session)
        two_us = pair[0].time_us + pair[1].time_us
        if progress:
            progress(
                f"qkv+attention #{pair[1].index}: fused {found[1]:.1f}us vs {two_us:.1f}us "
                f"({pair[0].impl} linear + {pair[1].impl} attention)"
            )
        if found[0] is None or found[1] >= two_us:
            continue
        chosen.append((group, "triton", encode_config(found[0])))
        fused = TuneRecord(
            pair[1].index, OP, _describe(list(args)), "triton", found[0], found[1],
            pair[0].aten_time_us + pair[1].aten_time_us, cached=found[2], errors=found[3],
            timed=found[4],
        )  # fmt: skip
        records[records.index(pair[1])] = fused
        records.remove(pair[0])
    if chosen:
        order = [*program.instructions]
        fused_at = {id(g.attention) for g, _, _ in chosen}
        fuse_qkv_attention(program, chosen)
        position = {id(ins): n for n, ins in enumerate(program.instructions)}
        for record in records:
            ins = order[record.index]
            if id(ins) in fused_at:  # the fused instruction replaced its attention
                ins = program.instructions[_index_of_output(program, ins.outputs[0])]
            record.index = position.get(id(ins), record.index)
    return len(chosen)


def _index_of_output(program: Program, vid: int) -> int:
    return next(n for n, ins in enumerate(program.instructions) if vid in ins.outputs)


def _best_fused(args: tuple, gpu: str, session: TuneSession):
    """(config dict or None, µs, cached, errors, timed) of the fused kernel's best config on
    `args`, from the tuning cache where it has them."""
    fn = kernl_ops_fn(OP)
    described = _describe(list(args))
    key_src = json.dumps(
        [gpu, torch.__version__, triton.__version__, session.source_hash("qkv_attention"), OP,
         described]
    )  # fmt: skip
    path = cache_dir() / f"{hashlib.sha256(key_src.encode()).hexdigest()}.json"
    hit = _read_cached(path)
    if hit is not None:
        return hit["config"], hit["time_us"] or float("inf"), True, [], 0
    refusal = qkv_attention_refusal(args[0], args[1], args[5])
    # a grid of B x H programs under a quarter of the SMs cannot win (1x128 is 12 programs:
    # a twelfth of the GPU doing the GEMM cuBLAS spreads over all of it): not compiled
    few = args[0].shape[0] * args[5] < sm_count(args[0].device) // 4
    configs = [] if refusal or few else [dataclasses.asdict(c) for c in qkv_attention_configs()]
    if not configs:  # nothing timed: nothing to keep (a later rule may time these shapes)
        return None, float("inf"), False, [], 0
    if session.compile_threads:
        with quiet_native_stderr(session.verbose):
            session.compiled_ahead += compile_ahead(
                fn, list(args), {}, configs, session.compile_threads
            )
    t0 = time.perf_counter()
    config, us, timed, errors = time_candidates(
        lambda c: fn(*args, impl="triton", config=c), fn(*args, impl="aten"), configs,
        failure_key=lambda c: _failure_key(OP, c, list(args)), session=session,
    )  # fmt: skip
    found = {
        "impl": "triton" if config else "aten",
        "config": config,
        "time_us": us if config else None,
        "aten_time_us": None,
        "activation": None,
        "approximation": None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    try:
        write_cache_record(path, found)
    except OSError:
        pass  # tune_program warned of an unwritable cache already, or will
    return config, us, False, errors, timed
