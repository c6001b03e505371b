"""Encoder-decoder generation: kernl against HF eager `generate` and HF static-cache `generate`
(`cache_implementation="static"`, which compiles its own decode step), in one process, on
random models at real shapes in bf16: T5-base (128-token source) and Whisper-large-v3 (d_model
1280, 32+32 layers, 128 mel bins, vocab 51866; one 30 s window).

    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python benchmarks/bench_seq2seq.py $OUT
    PYTHONPATH=$PWD python benchmarks/bench_seq2seq.py /tmp/s2s --tiny    # CPU, tiny, fp32

Per model: kernl's compile time; a fresh process's import, `load()` and first generated token
(stream(), graphs captured on first use); tok/s at batch 1 and 8 with 64 new tokens (no EOS:
min_new_tokens / eos_token_id=[]) for kernl and both HF peers, as the issue's peer script
measures them (the whole generate: encoder included; tok/s = batch x 64 / seconds; HF static's
first call, its compile, reported apart) plus the decode step alone ((64-token generate -
1-token generate) / 63); for Whisper the encoder's ms per 30 s window, kernl (its captured
encoder step, the cross-attention K/V included) and HF eager. The random Whisper's generation
config has no language tables, as in the peer script: the prompt is the start token alone
(real checkpoints add 3 prompt tokens: 3 more decoder steps per request in kernl).

Writes OUT/seq2seq.json (one record per measurement, with device, date and versions) and
prints a table. About 5-6 minutes on an H200 (HF static-cache compiles are ~20 s each, four of
them)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

NEW = 64
RECORDS: list[dict] = []
START = time.perf_counter()
# HF static-cache generate compiles for ~20 s per shape; past this many seconds of the run the
# remaining ones are skipped (and logged as such) so that the whole run stays under 8 minutes.
STATIC_BUDGET_S = float(os.environ.get("KERNL_STATIC_BUDGET_S", 330))


def log(**record) -> None:
    RECORDS.append(record)
    print(json.dumps(record), flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], object], dev: torch.device, repeat: int = 1) -> float:
    """Seconds per call (median of `repeat`), after the caller's warm-up."""
    times = []
    for _ in range(repeat):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


# -- models ---------------------------------------------------------------------------------


def t5_config(tiny: bool):
    import transformers as tf

    if tiny:
        dims = dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=256)
    else:
        dims = dict(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64, vocab_size=32128)
    return tf.T5Config(**dims, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)


def whisper_config(tiny: bool):
    import transformers as tf

    if tiny:
        dims = dict(d_model=64, layers=2, heads=4, ffn=128, mels=16, vocab=300)
    else:
        dims = dict(d_model=1280, layers=32, heads=20, ffn=5120, mels=128, vocab=51866)
    return tf.WhisperConfig(
        d_model=dims["d_model"],
        encoder_layers=dims["layers"],
        decoder_layers=dims["layers"],
        encoder_attention_heads=dims["heads"],
        decoder_attention_heads=dims["heads"],
        encoder_ffn_dim=dims["ffn"],
        decoder_ffn_dim=dims["ffn"],
        num_mel_bins=dims["mels"],
        vocab_size=dims["vocab"],
        max_source_positions=1500,
        max_target_positions=448,
        decoder_start_token_id=dims["vocab"] - 2 if tiny else 50258,
        begin_suppress_tokens=[220, dims["vocab"] - 3 if tiny else 50257],
        eos_token_id=dims["vocab"] - 3 if tiny else 50257,
        pad_token_id=dims["vocab"] - 4 if tiny else 50256,
    )


def build(cls, cfg, dtype: torch.dtype, dev: torch.device):
    """Random weights, initialised on the device in `dtype` (a 1.5B model in seconds)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with dev:
            model = cls(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dev, dtype).eval()


def inputs(kind: str, cfg, batch: int, dtype, dev, tiny: bool) -> dict:
    g = torch.Generator().manual_seed(batch)
    if kind == "t5":
        ids = torch.randint(2, cfg.vocab_size - 100, (batch, 32 if tiny else 128), generator=g)
        return dict(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev))
    feats = torch.randn(batch, cfg.num_mel_bins, 3000, generator=g)
    return dict(input_features=feats.to(dev, dtype))


# -- measurements ---------------------------------------------------------------------------


def fresh_process_first_token(
    path: Path, kind: str, cfg, dev: torch.device, dtype: torch.dtype, source: int
) -> dict:
    """A new interpreter: import kernl.runtime, load(), then the first token out of stream()."""
    if kind == "t5":
        arg = f"input_ids=torch.randint(2, {cfg.vocab_size - 100}, (1, {source}), device={str(dev)!r})"
    else:
        arg = (
            f"input_features=torch.randn(1, {cfg.num_mel_bins}, 3000, device={str(dev)!r}, "
            f"dtype=torch.{str(dtype).removeprefix('torch.')})"
        )
    script = textwrap.dedent(f"""
        import json, time
        t0 = time.perf_counter()
        import torch, kernl.runtime
        t1 = time.perf_counter()
        m = kernl.runtime.load({str(path)!r}, device={str(dev)!r})
        t2 = time.perf_counter()
        next(iter(m.stream({arg}, max_new_tokens=8, eos_token_id=[])))
        t3 = time.perf_counter()
        print(json.dumps(dict(import_s=t1 - t0, load_s=t2 - t1, first_token_after_load_s=t3 - t2,
                              load_to_first_token_s=t3 - t1)))
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    if run.returncode != 0:
        return dict(error=run.stderr[-600:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def bench_generate(
    name: str, gen: Callable[[int], object], batch: int, dev, repeat: int, per_step: bool = True
) -> dict:
    """gen(n): one generate of n new tokens. First call timed apart (HF static compiles).
    per_step=False skips the 1-token generate (HF static would compile again for its cache)."""
    first = timed(lambda: gen(NEW), dev)
    gen(NEW)
    whole = timed(lambda: gen(NEW), dev, repeat)
    step = 0.0
    if per_step:
        gen(1)
        step = (whole - timed(lambda: gen(1), dev, repeat)) / (NEW - 1)
    return dict(
        what=name,
        batch=batch,
        new_tokens=NEW,
        tok_s=batch * NEW / whole,
        decode_tok_s=batch / step if step > 0 else None,  # (whole - 1-token) / 63
        whole_generate_s=whole,
        first_generate_s=first,
        decode_step_ms=step * 1e3 if step > 0 else None,
    )


def hf_runner(model, kw: dict, static: bool) -> Callable[[int], object]:
    extra = dict(cache_implementation="static") if static else {}

    def run(n: int):
        with torch.inference_mode():
            return model.generate(
                **kw, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1, **extra
            )

    return run


def kernl_runner(model, kw: dict) -> Callable[[int], object]:
    return lambda n: model.generate(**kw, max_new_tokens=n, eos_token_id=[])


def profile_decode_step(model, name: str, batch: int, dev: torch.device) -> Callable[[], None]:
    """Where one decode step goes: the step graph the last generate of this batch bucket
    replayed (the longest cache bucket), timed now over 50 replays and profiled over 20 by the
    returned function (its step counter reset before each replay, so every replay writes slot
    0 and attends over the whole bucket): kernels per step, their summed time, and the
    largest by time. The profile is left for the end of the run: the torch profiler leaves
    CUPTI attached to the process (pytorch/pytorch#144455), slowing every later CUDA launch,
    most of all the HF eager peers' hundreds a step."""
    key = [k for k in model._steps if k[0] == "decode" and k[1] == batch][-1]
    step, state = model._steps[key], model._states[batch]
    times = []
    for _ in range(50):
        state.reset_counters()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step.run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)

    def profiled() -> None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                state.reset_counters()
                step.run()
            sync(dev)
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        top = sorted(events, key=lambda e: -e.self_device_time_total)[:10]
        log(
            what=f"{name} decode step",
            batch=batch,
            step_us=sorted(times)[len(times) // 2],
            kernels=sum(e.count for e in events) / 20,
            kernel_us=sum(e.self_device_time_total for e in events) / 20,
            top=[(e.key[:80], e.self_device_time_total / 20, e.count / 20) for e in top],
        )

    return profiled


def run_model(
    kind: str, args, out: Path, dev: torch.device, dtype: torch.dtype
) -> list[Callable[[], None]]:
    """Every timing of one model; returns its profiles, to run once every model is timed."""
    import transformers as tf

    import kernl.compiler
    import kernl.runtime

    tiny = args.tiny
    name = ("t5-base" if kind == "t5" else "whisper-large-v3") + ("-tiny" if tiny else "")
    cfg = t5_config(tiny) if kind == "t5" else whisper_config(tiny)
    cls = tf.T5ForConditionalGeneration if kind == "t5" else tf.WhisperForConditionalGeneration
    hf = build(cls, cfg, dtype, dev)
    buckets = (
        f"batch=1,8 source={32 if tiny else 128} cache={NEW}"
        if kind == "t5"
        else f"batch=1,8 cache={NEW}"
    )
    path = out / f"{name}.kernl"
    t = time.perf_counter()
    report = kernl.compiler.compile(hf, buckets, path, dtype=args.dtype, device=dev.type)
    log(what=name, metric="compile_s", value=time.perf_counter() - t, buckets=buckets)
    log(what=name, compile_choice=report.decode)
    first = fresh_process_first_token(path, kind, cfg, dev, dtype, 32 if tiny else 128)
    log(what=name, metric="fresh_process", **first)

    model = kernl.runtime.load(path, device=dev.type)
    # The same model with the decode step kept on plain torch (--no-kernels), for the
    # same-run comparison with the compiler's choice.
    torch_path = out / f"{name}-torch-decode.kernl"
    kernl.compiler.compile(
        hf, buckets, torch_path, dtype=args.dtype, device=dev.type, kernels=False
    )
    torch_decode = kernl.runtime.load(torch_path, device=dev.type)
    repeat = 1 if tiny else 3
    profiles = []
    for batch in (1, 8):
        kw = inputs(kind, cfg, batch, dtype, dev, tiny)
        for label, m in ((f"{name} kernl", model), (f"{name} kernl torch-decode", torch_decode)):
            log(**bench_generate(label, kernl_runner(m, kw), batch, dev, repeat))
            if dev.type == "cuda":
                profiles.append(profile_decode_step(m, label, batch, dev))
        for static in (False, True) if not args.skip_hf_static else (False,):
            label = f"{name} HF {'static-cache' if static else 'eager'}"
            if static and time.perf_counter() - START > STATIC_BUDGET_S:
                log(what=label, batch=batch, error=f"skipped: past {STATIC_BUDGET_S} s of run")
                continue
            try:
                gen = hf_runner(hf, kw, static)
                log(**bench_generate(label, gen, batch, dev, repeat, per_step=not static))
            except Exception as e:  # a peer failing is a result, not the end of the run
                log(what=label, batch=batch, error=repr(e)[-1500:])
    if kind == "whisper":
        kw = inputs(kind, cfg, 1, dtype, dev, tiny)
        model.generate(**kw, max_new_tokens=1)
        state = model._states[1]  # the encoder step of batch bucket 1 (captured on CUDA)
        state.features.copy_(kw["input_features"])
        encode = model._step(("encode", 1, cfg.max_source_positions))
        encode.run()
        ms = timed(encode.run, dev, 10 if not tiny else 2) * 1e3
        log(what=name, metric="encoder_ms_per_30s_window", implementation="kernl", value=ms)
        with torch.inference_mode():
            enc = hf.model.encoder
            enc(kw["input_features"])
            ms = timed(lambda: enc(kw["input_features"]), dev, 10 if not tiny else 2) * 1e3
        log(what=name, metric="encoder_ms_per_30s_window", implementation="HF eager", value=ms)
    del model, torch_decode, hf  # the profiles keep the two kernl models until they run
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return profiles


def table() -> str:
    rows = [f"{'what':44} {'batch':>5} {'tok/s':>9} {'decode tok/s':>12} {'first call s':>12}"]
    for r in RECORDS:
        if "tok_s" in r:
            dec = f"{r['decode_tok_s']:.0f}" if r.get("decode_tok_s") else "-"
            rows.append(
                f"{r['what']:44} {r['batch']:>5} {r['tok_s']:>9.0f} {dec:>12} "
                f"{r['first_generate_s']:>12.2f}"
            )
        elif "compile_choice" in r:
            rows.append(f"{r['what']:44} {r['compile_choice']}")
        elif "error" in r:
            rows.append(f"{r['what']:44} {r.get('batch', ''):>5} error: {r['error'][:60]}")
        elif r.get("metric") == "fresh_process":
            rows.append(
                f"{r['what']:44} fresh process: import {r.get('import_s', 0):.2f} s, load() "
                f"{r.get('load_s', 0):.2f} s, load -> first token "
                f"{r.get('load_to_first_token_s', 0):.2f} s"
            )
        elif "value" in r:
            unit = "s" if r["metric"].endswith("_s") else "ms"
            impl = r.get("implementation", "")
            rows.append(f"{r['what']:44} {r['metric']} {impl}: {r['value']:.2f} {unit}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT", "."))
    parser.add_argument("--tiny", action="store_true", help="tiny models, fp32, on the CPU")
    parser.add_argument("--models", default="t5,whisper")
    parser.add_argument("--skip-hf-static", action="store_true")
    args = parser.parse_args()
    args.dtype = "fp32" if args.tiny else "bf16"
    dev = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    meta = dict(
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        transformers=transformers.__version__,
        dtype=args.dtype,
    )
    log(what="meta", **meta)
    with tempfile.TemporaryDirectory(prefix="bench_s2s_") as tmp:
        profiles = []
        for kind in args.models.split(","):
            try:
                profiles += run_model(kind, args, Path(tmp), dev, dtype)
            except Exception:
                log(what=kind, error=traceback.format_exc()[-3000:])
        for profiled in profiles:  # after every timing of every model
            try:
                profiled()
            except Exception:
                log(what="profile", error=traceback.format_exc()[-3000:])
        del profiles
    log(what="total", metric="bench_s", value=time.perf_counter() - START)
    (out / "seq2seq.json").write_text(json.dumps(RECORDS, indent=1))
    print(table())


if __name__ == "__main__":
    main()
