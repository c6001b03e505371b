"""Device benchmark of causal-LM generation on a Llama-3.2-1B-shaped random model (bf16).

    PYTHONUNBUFFERED=1 python benchmarks/bench_llama1b.py OUT_DIR [--skip-hf-static] [--skip-hf-eager] [--variants-only]

Measures, in one process (and fresh child processes for start-up): compile + validation of
12 buckets; per-step logits of kernl and HF eager (bf16) against an fp32 eager reference over
prefill + 64 decode steps; greedy tok/s at batch 1, 4, 8 (prompt 128, 256 new tokens) for
kernl, HF eager generate and HF static-cache generate; prefill 1x1024 latency; load() to first
token in a fresh process; GPU memory after load; tok/s of each decode-step variant
(`DecodeKernels`; `--variants-only` stops after them). Results go to OUT_DIR/results.json."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import llama_1b_config  # noqa: E402

# 12 buckets: 6 prefill (batch x prompt) and 6 decode (batch x kv length); a step with fewer
# than 512 tokens in the cache attends to 512 slots only.
BUCKETS = "batch=1,4,8 prompt=128,1024 cache=512,2048"
PROMPT, NEW = 128, 256
T0 = time.perf_counter()
RESULTS: dict = {}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def save(out: Path) -> None:
    (out / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def llama_1b():
    import transformers as tf

    cfg = llama_1b_config()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def timed(fn, repeat: int = 3) -> float:
    """Best wall time of `repeat` runs (after the caller's warm-up), synchronised."""
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def first_token_child(path: str, verify: bool) -> None:
    t_import = time.perf_counter()
    import kernl.runtime

    torch.cuda.init()
    t0 = time.perf_counter()
    model = kernl.runtime.load(path, verify=verify)
    t_load = time.perf_counter()
    out = model.generate(torch.randint(0, 128256, (1, 100)), max_new_tokens=1, eos_token_id=[])
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    print(
        json.dumps(
            {
                "import_s": t0 - t_import,
                "load_s": t_load - t0,
                "load_to_first_token_s": t1 - t0,
                "first_token": int(out[0, -1]),
                "allocated_GiB": torch.cuda.memory_allocated() / 2**30,
                "reserved_GiB": torch.cuda.memory_reserved() / 2**30,
                "device_used_GiB": (total - free) / 2**30,
                "verify": verify,
                "buckets": len(model.manifest.buckets),
                "graphs": len(model._steps),
                "kv_cache_GiB": sum(
                    st.cache.k.nbytes + st.cache.v.nbytes for st in model._states.values()
                )
                / 2**30,
                "weights_GiB": sum(t.nbytes for t in {id(t): t for t in _weights(model)}.values())
                / 2**30,
            }
        )
    )


def _weights(model):
    d = model.decoder
    yield d.embed
    yield d.final_norm_w
    if not d.spec.tied_embeddings:
        yield d.lm_head
    for lw in d.layers:
        yield from (t for t in vars(lw).values() if t is not None)


VARIANTS = {
    "torch": {},
    "attention=sdpa": {"attention": "sdpa"},
    "attention=triton": {"attention": "triton"},
    "norm=triton": {"norm": "triton"},
    "gated_mlp=triton": {"gated_mlp": "triton"},
    "linear=triton": {"linear": "triton"},
    "all triton": {
        "attention": "triton",
        "norm": "triton",
        "gated_mlp": "triton",
        "linear": "triton",
    },
}


def decode_variants(model, vocab: int, g: torch.Generator) -> None:
    """tok/s of each DecodeKernels variant (graphs captured afresh for each, Triton kernels
    JIT-compiled during the warm-up), and how many greedy ids agree with the torch step's
    (bf16: a different summation order may flip a near tie, after which the ids differ)."""
    from kernl.artifacts.generation import DecodeKernels
    from kernl.runtime.binaries import allow_jit

    res = RESULTS.setdefault("decode_variants", {})
    prompts = {b: torch.randint(0, vocab, (b, PROMPT), generator=g).cuda() for b in (1, 4)}
    reference = {}
    for name, choice in VARIANTS.items():
        model.decoder.kernels = DecodeKernels(**choice)
        model._steps.clear()  # captured again, lazily, with this variant
        row = res.setdefault(name, {})
        # variants the artifact holds no binaries for compile through Triton here
        try:
            with allow_jit():
                for b, ids in prompts.items():
                    got = model.generate(ids, max_new_tokens=NEW, eos_token_id=[])
                    reference.setdefault(b, got)
                    agree = (got[:, PROMPT:] == reference[b][:, PROMPT:]).int().cumprod(1).sum(1)
                    full = timed(lambda: model.generate(ids, max_new_tokens=NEW, eos_token_id=[]))
                    pre = timed(lambda: model.generate(ids, max_new_tokens=1, eos_token_id=[]))
                    step = (full - pre) / (NEW - 1)
                    row[f"b{b}"] = {
                        "tok_per_s": b * NEW / full,
                        "per_token_ms": step * 1e3,
                        "ids_agreeing_with_torch": agree.tolist(),
                    }
        except Exception as e:  # record and go on: one variant must not cost the others
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
        log(f"decode variant {name}: {row}")
    model.decoder.kernels = DecodeKernels()
    model._steps.clear()


def main(out: Path, skip_hf_static: bool, skip_hf_eager: bool, variants_only: bool) -> None:
    import transformers

    import kernl.compiler
    import kernl.runtime

    RESULTS["device"] = torch.cuda.get_device_name()
    RESULTS["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
    }
    log(f"{RESULTS}")
    hf = llama_1b()
    art = Path("/tmp/llama1b.kernl")
    log("compile")
    t = time.perf_counter()
    try:
        report = kernl.compiler.compile(
            hf, BUCKETS, art, dtype="bf16", task="causal-lm", progress=log
        )
    except AssertionError as e:  # validation failed: record it, compile anyway to go on
        RESULTS["validation_failure"] = str(e)
        log(f"VALIDATION FAILED: {e}")
        report = kernl.compiler.compile(
            hf, BUCKETS, art, dtype="bf16", task="causal-lm", atol=1e9, progress=log
        )
    RESULTS["compile_s"] = time.perf_counter() - t
    RESULTS["compile_table"] = report.table()
    log("\n" + report.table())
    save(out)

    model = kernl.runtime.load(art)
    vocab = 128256
    g = torch.Generator().manual_seed(0)

    # -- per-step logits vs eager, with an fp32 reference to size bf16 noise ---------------
    log("logits: kernl bf16 and HF eager bf16 vs HF fp32, prefill + 64 decode steps")
    from kernl.compiler.tasks.causal_lm.validate import reference_logits

    lengths = [128, 77, 100, 31]
    rows = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    steps = list(model.stream(rows, max_new_tokens=65, eos_token_id=[], output_logits=True))
    ours = torch.stack([lg for _, lg in steps], 1).cuda()  # [B, 65, V]
    seqs = torch.zeros(4, 128 + 64, dtype=torch.long)
    valid = torch.zeros_like(seqs, dtype=torch.bool)
    for i, r in enumerate(rows):
        seqs[i, 128 - len(r) : 128] = torch.tensor(r)
        valid[i, 128 - len(r) :] = True
    seqs[:, 128:] = torch.stack([ids for ids, _ in steps[:-1]], 1)
    keep = list(range(127, 127 + 65))
    ref_bf16 = reference_logits(hf, seqs.cuda(), valid.cuda(), keep)
    hf32 = copy.deepcopy(hf).float()
    ref_32 = reference_logits(hf32, seqs.cuda(), valid.cuda(), keep)
    del hf32
    torch.cuda.empty_cache()

    def err(a, b):
        d = (a - b).abs()
        return {
            "max_abs": float(d.max()),
            "mean_abs": float(d.mean()),
            "per_step_max": [round(float(x), 4) for x in d.amax(dim=(0, 2))],
        }

    RESULTS["logits"] = {
        "kernl_vs_hf_bf16": err(ours, ref_bf16),
        "kernl_vs_fp32": err(ours, ref_32),
        "hf_bf16_vs_fp32": err(ref_bf16, ref_32),
        "max_abs_logit": float(ref_32.abs().max()),
        "argmax_agree_kernl_fp32": float((ours.argmax(-1) == ref_32.argmax(-1)).float().mean()),
        "argmax_agree_hf_fp32": float((ref_bf16.argmax(-1) == ref_32.argmax(-1)).float().mean()),
    }
    log(
        json.dumps(
            {
                k: (
                    v
                    if not isinstance(v, dict)
                    else {a: b for a, b in v.items() if a != "per_step_max"}
                )
                for k, v in RESULTS["logits"].items()
            }
        )
    )
    del ours, ref_bf16, ref_32
    save(out)

    # -- throughput ------------------------------------------------------------------------
    tput = RESULTS.setdefault("throughput", {})
    for b in (1, 4, 8):
        ids = torch.randint(0, vocab, (b, PROMPT), generator=g).cuda()
        model.generate(ids, max_new_tokens=NEW, eos_token_id=[])
        full = timed(lambda: model.generate(ids, max_new_tokens=NEW, eos_token_id=[]))
        pre = timed(lambda: model.generate(ids, max_new_tokens=1, eos_token_id=[]))
        decode_tok = (full - pre) / (NEW - 1)
        tput[f"kernl_b{b}"] = {
            "total_s": full,
            "tok_per_s": b * NEW / full,
            "prefill_s": pre,
            "per_token_ms": decode_tok * 1e3,
            "decode_tok_per_s": b / decode_tok,
        }
        log(f"kernl batch {b}: {tput[f'kernl_b{b}']}")
    decode_variants(model, vocab, g)
    save(out)
    if variants_only:
        return
    same = torch.randint(0, vocab, (1, PROMPT), generator=g).cuda()
    with torch.no_grad():
        ref = hf.generate(same, max_new_tokens=64, do_sample=False, min_new_tokens=64)
    ours = model.generate(same, max_new_tokens=64, eos_token_id=[])
    agree = (ours[0, PROMPT:] == ref[0, PROMPT:]).int().cumprod(0).sum()
    RESULTS["greedy_prefix_agreement_b1"] = int(agree)
    save(out)

    hf_kw = dict(do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
    for b in () if skip_hf_eager else (1, 4, 8):
        ids = torch.randint(0, vocab, (b, PROMPT), generator=g).cuda()
        with torch.no_grad():
            hf.generate(ids, do_sample=False, max_new_tokens=8)
            s = timed(lambda: hf.generate(ids, **hf_kw), repeat=1)
        tput[f"hf_eager_b{b}"] = {"total_s": s, "tok_per_s": b * NEW / s}
        log(f"HF eager batch {b}: {tput[f'hf_eager_b{b}']}")
        save(out)

    # -- prefill 1x1024 --------------------------------------------------------------------
    ids = torch.randint(0, vocab, (1, 1024), generator=g).cuda()
    model.generate(ids, max_new_tokens=1, eos_token_id=[])
    pre = RESULTS.setdefault("prefill_1x1024_ms", {})
    pre["kernl_generate_1_token"] = (
        timed(lambda: model.generate(ids, max_new_tokens=1, eos_token_id=[]), 10) * 1e3
    )
    with torch.no_grad():
        hf(ids, logits_to_keep=1)
        pre["hf_eager_forward"] = timed(lambda: hf(ids, logits_to_keep=1), 10) * 1e3
    log(f"prefill: {pre}")
    save(out)

    # -- where a decode step's time goes: one eager (uncaptured) step under the profiler -----
    # (after every in-process timing: the profiler leaves CUPTI attached to the process,
    # pytorch/pytorch#144455, which slows every later launch, HF eager's most)
    eager = kernl.runtime.load(art, capture="never")
    ids = torch.randint(0, vocab, (1, PROMPT), generator=g).cuda()
    eager.generate(ids, max_new_tokens=4, eos_token_id=[])
    state = eager._states[1]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        state.decode(2048, False)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    RESULTS["decode_step_kernels"] = len(events)
    RESULTS["decode_step_kernel_us"] = sum(e.device_time for e in events)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    (out / "decode_profile.txt").write_text(table)
    log(
        f"decode step: {len(events)} kernels, {RESULTS['decode_step_kernel_us']:.0f} us of kernel time\n{table}"
    )
    del eager, state
    torch.cuda.empty_cache()
    save(out)

    # -- fresh process: load -> first token, memory -----------------------------------------
    model = None  # free its graphs and caches before the fresh processes
    torch.cuda.empty_cache()
    for verify in (True, False):
        run = subprocess.run(
            [sys.executable, __file__, "--first-token", str(art), str(verify)],
            capture_output=True,
            text=True,
        )
        line = [x for x in run.stdout.splitlines() if x.startswith("{")]
        RESULTS[f"fresh_process_verify_{verify}"] = (
            json.loads(line[-1]) if line else run.stderr[-2000:]
        )
        log(f"fresh process: {RESULTS[f'fresh_process_verify_{verify}']}")
        save(out)

    # -- HF with a static cache (generate compiles its decode step), then compiled prefill --
    if not skip_hf_static:
        for b in (1,):
            ids = torch.randint(0, vocab, (b, PROMPT), generator=g).cuda()
            kw = dict(hf_kw, cache_implementation="static")
            with torch.no_grad():
                first = timed(lambda: hf.generate(ids, **kw), repeat=1)
                s = timed(lambda: hf.generate(ids, **kw), repeat=2)
            tput[f"hf_static_b{b}"] = {
                "first_call_s": first,
                "total_s": s,
                "tok_per_s": b * NEW / s,
            }
            log(f"HF static batch {b}: {tput[f'hf_static_b{b}']}")
            save(out)
        if time.perf_counter() - T0 < 330:
            compiled = torch.compile(hf)
            with torch.no_grad():
                t = time.perf_counter()
                compiled(
                    ids := torch.randint(0, vocab, (1, 1024), generator=g).cuda(), logits_to_keep=1
                )
                pre["hf_torch_compile_first_call_s"] = time.perf_counter() - t
                pre["hf_torch_compile_forward"] = (
                    timed(lambda: compiled(ids, logits_to_keep=1), 10) * 1e3
                )
            log(f"prefill: {pre}")
    RESULTS["wall_s"] = time.perf_counter() - T0
    save(out)
    log("done")


if __name__ == "__main__":
    if sys.argv[1] == "--first-token":
        first_token_child(sys.argv[2], sys.argv[3] == "True")
    else:
        out_dir = Path(sys.argv[1])
        out_dir.mkdir(parents=True, exist_ok=True)
        main(
            out_dir,
            "--skip-hf-static" in sys.argv,
            "--skip-hf-eager" in sys.argv,
            "--variants-only" in sys.argv,
        )
