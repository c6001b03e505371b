"""Where one Llama-1B-shaped bf16 decode step goes, by kernel, for the compiler's choice of
decode kernels and for the fused alternatives it did not keep (issue 15: the fused kernels
save ~15% of the step's linear time in bench_decode_kernels.py, yet the whole-step timing at
compile saw ~1%).

    PYTHONPATH=$PWD python3 benchmarks/profile_decode_variants.py     # H200, ~2 min
    PYTHONPATH=$PWD python3 benchmarks/profile_decode_variants.py chosen  # only these variants

Compiles (with tuning) `batch=1 prompt=128 cache=512`, loads the artifact, then for each
variant recaptures the (batch 1, kv 512) decode step, times 200 replays with CUDA events
(each step writes the last slot, 511, so that attention reads the whole kv length, as the
compiler's timing does: kernl's decode attention skips the slots past the current one; its
launch config is the compiler's tile for batch 1 and kv 512 when the variant runs it) and
profiles 20 replays: kernel time per step, kernels per step, top kernels. Under PDL, the
weight-streaming kernels' trigger (kernels/pdl.py) is compared at their start and after their
main loop. A variant the
artifact holds no binary for runs with Triton's JIT (allow_jit), as in the compiler."""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 2048, 8192, 16, 32, 8, 128256


def main() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    work = tempfile.mkdtemp()
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(f"{work}/l")
    cmd = [sys.executable, "-m", "kernl.compiler", f"{work}/l", "-o", f"{work}/a"]
    cmd += ["--task", "causal-lm", "--dtype", "bf16", "--buckets", "batch=1 prompt=128 cache=512"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    print("\n".join(line for line in r.stdout.splitlines() if "decode step" in line))
    assert r.returncode == 0, r.stderr[-2000:]

    import kernl.runtime
    from kernl.artifacts.generation import DecodeKernels
    from kernl.compiler.tasks.causal_lm.decode_kernels import at_last_slot
    from kernl.kernels import pdl as kpdl
    from kernl.runtime.binaries import allow_jit

    gen = kernl.runtime.load(f"{work}/a")
    chosen = gen.decoder.kernels
    fused = dataclasses.replace(
        chosen, norm="fused", linear="fused", lm_head="triton", pdl=False, prefetch=False
    )
    pdl = dataclasses.replace(fused, pdl=True)
    after_loop, at_start = kpdl.TRIGGER_AFTER_LOOP, kpdl.TRIGGER_AT_START
    # (kernels, when the weight-streaming kernels let the next one launch under PDL)
    variants = {
        "torch": (DecodeKernels(), after_loop),
        "chosen": (chosen, after_loop),
        "fused, no pdl": (fused, after_loop),
        "fused + pdl, linears trigger at start": (pdl, at_start),
        "fused + pdl, linears trigger after their loop": (pdl, after_loop),
        "fused + pdl + prefetch, trigger at start": (
            dataclasses.replace(pdl, prefetch=True),
            at_start,
        ),
        "fused + pdl + prefetch, trigger after the loop": (
            dataclasses.replace(pdl, prefetch=True),
            after_loop,
        ),
    }
    wanted = sys.argv[1:]  # variant names (or their first word): all of them without any
    if wanted:
        variants = {k: v for k, v in variants.items() if k in wanted or k.split()[0] in wanted}
    gen._binaries = None  # the compiler's context: every kernel may JIT, not only the artifact's
    state = gen._states[1]
    for name, (kernels, trigger) in variants.items():
        kpdl.streaming_trigger = trigger  # read at each launch: the capture below compiles
        gen.decoder.kernels = kernels
        gen._steps.clear()
        with allow_jit(), torch.no_grad():
            step = gen._step(("decode", 1, 512, False))
            for _ in range(10):
                at_last_slot(state, 512)
                step.run()
            torch.cuda.synchronize()
            times = []
            for _ in range(200):
                at_last_slot(state, 512)
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                step.run()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    at_last_slot(state, 512)
                    step.run()
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        total = sum(e.self_device_time_total for e in events) / 20
        count = sum(e.count for e in events) / 20
        print(
            f"== {name}: {kernels.describe()}\n   step {statistics.median(times) * 1e3:.1f} us"
            f" (median of 200 replays); kernels {total:.1f} us in {count:.0f} kernels; "
            f"{statistics.median(times) * 1e3 - total:.1f} us of the step outside kernels"
        )
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:16]:
            per = e.self_device_time_total / 20
            print(f"   {per:8.1f} us  x{e.count / 20:5.1f}  {e.key[:90]}")


if __name__ == "__main__":
    main()
