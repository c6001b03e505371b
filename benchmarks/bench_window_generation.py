"""Whole-model generation with sliding windows and Gemma2's softcap, bf16, one GPU: what the
decode step costs at a long cache with each attention kernl can run there.

    python benchmarks/bench_window_generation.py     # JSON to $OUT/bench_window_generation.json
    MODELS=gemma2 python benchmarks/bench_window_generation.py     # some of the models only

Models (random weights, seed 0), each compiled with `--task causal-lm --dtype bf16 --buckets
"batch=1,8 prompt=4096 cache=8192"`, then a 4096-token prompt and 128 new tokens, greedy:
  mistral-window  Mistral-shaped (hidden 2048, 16 layers, 32 heads, 8 KV heads of 64),
                  every layer windowed to 1024 slots
  mistral-full    the same model without the window (every layer reads the whole cache)
  gemma2          Gemma2-shaped (hidden 2304, 8 layers, 8 heads, 4 KV heads of 256, softcaps
                  50 and 30, query_pre_attn_scalar 256, vocab 256000), sliding and full
                  layers alternating, window 1024
For each: the step the compiler chose, then the same step with its attention on each of
kernl's implementations (torch, sdpa where the model allows it, triton), the rest of the
step as compiled (pieces, not the persistent step, so that the attention is the variable).
Step ms = (time of generate(128) - time of generate(1)) / 127, best of 3, host synchronised.
Not collected by pytest; a few minutes (three compiles with validation)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_llama1b import timed  # noqa: E402  (best of 3 runs, host synchronised)

BUCKETS = "batch=1,8 prompt=4096 cache=8192"
PROMPT, NEW = 4096, 128
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def build(name: str):
    import transformers as tf

    torch.manual_seed(0)
    if name.startswith("mistral"):
        cfg = tf.MistralConfig(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            intermediate_size=5632,
            vocab_size=32000,
            max_position_embeddings=8192,
            sliding_window=1024 if name == "mistral-window" else None,
        )
        with torch.device("cuda"):
            model = tf.MistralForCausalLM(cfg).to(torch.bfloat16)
    else:
        cfg = tf.Gemma2Config(
            hidden_size=2304,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            intermediate_size=9216,
            vocab_size=256000,
            max_position_embeddings=8192,
            query_pre_attn_scalar=256,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            sliding_window=1024,
            layer_types=["sliding_attention", "full_attention"] * 4,
        )
        with torch.device("cuda"):
            model = tf.Gemma2ForCausalLM(cfg).to(torch.bfloat16)
        model.set_attn_implementation("eager")  # the softcapped reference
    return model.eval(), cfg.vocab_size


def step_ms(model, ids) -> dict:
    def gen(n):
        return model.generate(ids, max_new_tokens=n, eos_token_id=[])

    out = gen(NEW)  # warm-up: captures the graphs (and JIT-compiles a variant's kernels)
    full, first = timed(lambda: gen(NEW)), timed(lambda: gen(1))
    return {"step_ms": round((full - first) / (NEW - 1) * 1e3, 4), "ids": out[:, PROMPT:]}


def run_model(name: str, results: dict) -> None:
    import kernl.compiler
    import kernl.runtime
    from kernl.runtime.binaries import allow_jit

    hf, vocab = build(name)
    art = Path(f"/tmp/window_{name}.kernl")
    t = time.perf_counter()
    report = kernl.compiler.compile(hf, BUCKETS, art, dtype="bf16", task="causal-lm", progress=log)
    row = results.setdefault(name, {})
    row["compile_s"] = round(time.perf_counter() - t, 1)
    log("\n" + report.table())
    del hf
    torch.cuda.empty_cache()
    model = kernl.runtime.load(art)
    compiled = model.decoder.kernels
    row["compiled_kernels"] = {
        f.name: getattr(compiled, f.name)
        for f in dataclasses.fields(compiled)
        if f.name not in ("tiles", "step_config", "step_buckets")
    }
    g = torch.Generator().manual_seed(0)
    attentions = ["torch", "triton"] + ([] if name == "gemma2" else ["sdpa"])
    for batch in (1, 8):
        ids = torch.randint(0, vocab, (batch, PROMPT), generator=g).cuda()
        cases = {"compiled": compiled}
        cases |= {
            f"attention={a}": dataclasses.replace(compiled, attention=a, step="pieces")
            for a in attentions
        }
        reference = None
        for case, kernels in cases.items():
            model.decoder.kernels = kernels
            model._steps.clear()  # captured again, lazily, with this variant
            try:
                with allow_jit():
                    got = step_ms(model, ids)
            except Exception as e:  # one variant must not cost the others
                row[f"b{batch} {case}"] = {"error": f"{type(e).__name__}: {e}"[:1000]}
                log(f"{name} b{batch} {case}: {row[f'b{batch} {case}']}")
                continue
            ids_out = got.pop("ids")
            if reference is None:
                reference = ids_out
            # bf16: another summation order may flip a near tie, after which the ids differ
            got["ids_agreeing_with_compiled"] = (
                (ids_out == reference).int().cumprod(1).sum(1).tolist()
            )
            row[f"b{batch} {case}"] = got
            log(f"{name} b{batch} {case}: {got}")
    model.decoder.kernels = compiled
    del model
    torch.cuda.empty_cache()


def main() -> None:
    import transformers

    results = {
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "buckets": BUCKETS,
        "prompt": PROMPT,
        "new_tokens": NEW,
    }
    out = Path(os.environ.get("OUT", ".")) / "bench_window_generation.json"
    names = os.environ.get("MODELS", "mistral-window,mistral-full,gemma2").split(",")
    for name in names:
        try:
            run_model(name, results)
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            log(f"{name}: {results[name]}")
        out.write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
