"""Generation served through Ray Serve on a GPU against the same batch generated directly
(issue 17): a Llama-3.2-1B-shaped model (random, bf16) compiled for `batch=1,4,8,16
prompt=128 cache=512` without tuning, then
  direct   kernl.runtime.load(...).generate(C prompts) in one process, C = 1 and 16: tok/s
           and the call's time (and stream(16 prompts), ids read back every step);
  serve    `python -m kernl.serving` (the HAProxy ingress, 1 replica, joining on) and
           1 / 16 / 64 concurrent clients, each sending one 128-token prompt at a time for
           NEW new tokens, answers returned at the end, then 16 clients streaming
           (server-sent events): tok/s over the whole run and per-request p50 / p99.
The issue's target: tok/s under 16 concurrent clients >= 80% of 16 prompts generated directly.
Clients are threads of this process (http.client), on the host's cores beside Ray.

Needs Ray Serve (benchmarks/ray_on_device.sh brings it to the GPU machine). Usage:
    PYTHONPATH=$PWD:$PYTHONPATH python3 benchmarks/bench_serving_gen_e2e.py OUT_DIR [--new N]
Writes OUT_DIR/serve_gen_bench.json and prints each row. `--tiny` runs the same on the CPU
with a two-layer model (fp32, Triton's interpreter), to check the script, not to time it."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serving_common import run_clients  # noqa: E402
from shapes import llama_1b_config  # noqa: E402

import kernl.compiler  # noqa: E402
import kernl.runtime  # noqa: E402
from kernl.serving.loadgen import percentile  # noqa: E402

BUCKETS = "batch=1,4,8,16 prompt=128 cache=512"
PROMPT = 128


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def model_config(tiny: bool):
    import transformers as tf

    if tiny:
        cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=96, vocab_size=97)  # fmt: skip
    else:
        cfg = llama_1b_config()
    cfg.pad_token_id = cfg.eos_token_id = cfg.bos_token_id = None  # no EOS: NEW tokens each
    return cfg


def compile_llama(path: Path, tiny: bool) -> float:
    import transformers as tf

    torch.manual_seed(0)
    with torch.device(DEVICE):
        hf = tf.LlamaForCausalLM(model_config(tiny)).eval()
    hf = hf if tiny else hf.to(torch.bfloat16)
    t = time.perf_counter()
    kernl.compiler.compile(
        hf, BUCKETS, path, dtype="fp32" if tiny else "bf16", device=DEVICE, task="causal-lm",
        tune=False,
    )  # fmt: skip
    del hf
    sync()
    return time.perf_counter() - t


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def direct(path: Path, prompts: list[list[int]], new: int) -> dict:
    model = kernl.runtime.load(path, device=DEVICE)
    out = {}
    for rows in (1, 16):
        model.generate(prompts[:rows], max_new_tokens=new)  # warm
        times = []
        for _ in range(5):
            sync()
            t = time.perf_counter()
            model.generate(prompts[:rows], max_new_tokens=new)
            sync()
            times.append(time.perf_counter() - t)
        p50 = percentile(times, 0.5)
        out[f"generate_{rows}"] = {"p50_ms": 1000 * p50, "tokens_per_s": rows * new / p50}
        log(f"direct generate {rows}: {out[f'generate_{rows}']}")
    times = []
    for _ in range(3):
        t = time.perf_counter()
        list(model.stream(prompts[:16], max_new_tokens=new))
        times.append(time.perf_counter() - t)
    p50 = percentile(times, 0.5)
    out["stream_16"] = {"p50_ms": 1000 * p50, "tokens_per_s": 16 * new / p50}
    log(f"direct stream 16: {out['stream_16']}")
    del model
    sync()
    return out


def request(port: int, prompt: list[int], new: int, stream: bool) -> int:
    """One request; the number of tokens that came back."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = {"input_ids": prompt, "max_new_tokens": new, "stream": stream}
    conn.request("POST", "/", body=json.dumps(body).encode())
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    if stream:
        n = sum(1 for line in resp if line.startswith(b"data: ") and b"[DONE]" not in line)
    else:
        n = len(json.loads(resp.read())["generated_ids"])
    conn.close()
    return n


def load(port: int, prompts: list[list[int]], clients: int, per_client: int, new: int,
         stream: bool) -> dict:  # fmt: skip
    """`clients` threads, each sending `per_client` requests one after another (the first
    not timed per request; every token counts in tok/s)."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(per_client):
            t = time.perf_counter()
            n = request(port, prompts[k % len(prompts)], new, stream)
            with lock:
                tokens[0] += n
                if i:
                    latencies.append(time.perf_counter() - t)

    secs = run_clients(client, clients)
    return {
        "clients": clients,
        "stream": stream,
        "requests": clients * per_client,
        "tokens_per_s": tokens[0] / secs,
        "p50_ms": 1000 * percentile(latencies, 0.5) if latencies else None,
        "p99_ms": 1000 * percentile(latencies, 0.99) if latencies else None,
        "seconds": secs,
    }


def serve(path: Path, prompts: list[list[int]], new: int, out_dir: Path) -> dict:
    from kernl.serving.ingress import free_quiet_port

    port = free_quiet_port()
    args = [sys.executable, "-m", "kernl.serving", str(path), "--port", str(port)]
    args += ["--ray-address", "local", "--max-batch-size", "16", "--device", DEVICE]
    logf = open(out_dir / "serve-gen.log", "w")
    proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT)
    out: dict = {"rows": []}
    try:
        start = time.perf_counter()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.perf_counter() - start > 300:
                raise RuntimeError(f"the server never became ready (rc {proc.poll()})")
            time.sleep(0.5)
        out["ready_s"] = time.perf_counter() - start
        log(f"serve ready in {out['ready_s']:.1f} s")
        for clients, per_client, stream in ((1, 4, False), (16, 3, False), (64, 2, False),
                                            (16, 3, True)):  # fmt: skip
            row = load(port, prompts, clients, per_client, new, stream)
            out["rows"].append(row)
            log(f"serve {row}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            out["metrics"] = json.loads(r.read())
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--new", type=int, default=128, help="new tokens per request (default 128)")
    ap.add_argument("--tiny", action="store_true", help="a two-layer model on the CPU")
    args = ap.parse_args()
    global DEVICE, BUCKETS, PROMPT
    if args.tiny:
        DEVICE, BUCKETS, PROMPT = "cpu", "batch=1,4,16 prompt=16 cache=64", 16
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import ray

    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    results: dict = {"device": name, "torch": torch.__version__}
    results |= {"ray": ray.__version__, "buckets": BUCKETS, "new_tokens": args.new}
    path = Path("/tmp/llama1b-serve.kernl")
    results["compile_s"] = compile_llama(path, args.tiny)
    log(f"compiled {BUCKETS} in {results['compile_s']:.0f} s (no tuning)")
    g = torch.Generator().manual_seed(3)
    vocab = model_config(args.tiny).vocab_size
    prompts = [torch.randint(5, vocab, (PROMPT,), generator=g).tolist() for _ in range(64)]
    results["direct"] = direct(path, prompts, args.new)
    results["serve"] = serve(path, prompts, args.new, out_dir)
    d16 = results["direct"]["generate_16"]["tokens_per_s"]
    for row in results["serve"]["rows"]:
        row["vs_direct_16"] = row["tokens_per_s"] / d16
    (out_dir / "serve_gen_bench.json").write_text(json.dumps(results, indent=1))
    log("clients stream   tok/s   p50 ms   p99 ms   vs direct generate(16 prompts)")
    for r in results["serve"]["rows"]:
        log(f"{r['clients']:7d} {str(r['stream']):6s} {r['tokens_per_s']:7.0f} "
            f"{r['p50_ms'] or 0:8.1f} {r['p99_ms'] or 0:8.1f}   {r['vs_direct_16']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
