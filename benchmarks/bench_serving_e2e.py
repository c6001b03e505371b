"""GPU script for a machine WITH Ray Serve (`kernl[serve]`): BERT-base fp16 (random weights,
BertConfig()) compiled for batch=1,8,16,64 seq=128, then
  direct    kernl.runtime.load(...) called with CPU tensors of (batch, 128), outputs to CPU;
  threads   1 / 16 / 64 threads of one process, each calling that model with one 128-token
            sequence at a time (CPU in, pooler output out): the same clients with no server,
            every call batch 1;
  layer     kernl.serving's request path in one process, no Ray or HTTP: N JSON bodies
            parsed, served by encoder.serve_batch_bytes (the deployment's call, answers
            encoded to the bytes the server sends; N = batch);
  serve     `python -m kernl.serving` on Ray Serve (only when Ray is importable), N
            concurrent clients of one 128-token sequence each (kernl.serving.loadgen).
Writes OUT_DIR/serve_bench.json and prints each row. Usage (from the repository root):
    PYTHONPATH=$PWD python3 benchmarks/bench_serving_e2e.py OUT_DIR [--servers SPEC]
(--servers: the kernl serve configurations measured, default haproxy:1,python:1,haproxy:2 —
ingress and replicas, the replicas sharing the one GPU; the batch wait is kernl serve's.)
The device machine of this project has no Ray: benchmarks/ray_on_device.sh brings its wheels
there in two consecutive calls (see its header). Without it, bench_serving_direct.py measures
the in-process path with concurrent clients and generation, and bench_serving_ray_overhead.py
measures Ray Serve's share on the CPU. (Moved here from tests/serving/device_bench.py.)"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers as T

import kernl.compiler
import kernl.runtime

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving_common import run_clients  # noqa: E402

from kernl.serving.encoder import serve_batch_bytes
from kernl.serving.loadgen import percentile
from kernl.serving.protocol import ModelLimits, parse_request

_parser = argparse.ArgumentParser(description="kernl serve end to end on a GPU")
_parser.add_argument("out_dir")
_parser.add_argument(
    "--servers",
    default="haproxy:1,python:1,haproxy:2",
    help="servers measured one after another, INGRESS:REPLICAS (replicas share the GPU)",
)
ARGS = _parser.parse_args()
OUT = Path(ARGS.out_dir)
SIZES = (1, 8, 16, 64)
SEQ = 128
OUTPUTS = ["pooler_output"]


def timed(fn, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def summary(times, batch):
    p50 = percentile(times, 0.5)
    return {
        "batch": batch,
        "p50_ms": 1000 * p50,
        "p99_ms": 1000 * percentile(times, 0.99),
        "sequences_per_s": batch / p50,
        "calls": len(times),
    }


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401

        results["ray"] = ray.__version__
    except Exception as e:
        results["ray"] = None
        results["ray_error"] = f"{type(e).__name__}: {e}"
    print("ray:", results["ray"], results.get("ray_error", ""), flush=True)

    torch.manual_seed(0)
    art = Path("/tmp/bert-base-serve.kernl")
    t0 = time.perf_counter()
    kernl.compiler.compile(
        T.BertModel(T.BertConfig()).eval(),
        f"batch={','.join(map(str, SIZES))} seq={SEQ}",
        art,
        dtype="fp16",
    )
    results["compile_s"] = time.perf_counter() - t0
    print(f"compiled in {results['compile_s']:.0f} s", flush=True)
    model = kernl.runtime.load(art)
    g = torch.Generator().manual_seed(1)

    results["direct"] = []
    for b in SIZES:
        ids = torch.randint(5, 30000, (b, SEQ), generator=g)
        call = lambda: model(input_ids=ids)["pooler_output"].cpu()
        timed(call, 5)
        results["direct"].append(summary(timed(call, 100), b))
        print("direct", results["direct"][-1], flush=True)

    results["threads"] = [direct_threads(model, c, g) for c in (1, 16, 64)]

    limits = ModelLimits(
        model.manifest.inputs, model.output_names, list(model.buckets), 30522, max_rows=64
    )
    results["layer"] = []
    for b in SIZES:
        bodies = [
            json.dumps(
                {
                    "input_ids": torch.randint(5, 30000, (SEQ,), generator=g).tolist(),
                    "outputs": OUTPUTS,
                }
            ).encode()
            for _ in range(b)
        ]

        def serve_layer():
            reqs = [parse_request(x, limits) for x in bodies]
            return serve_batch_bytes(model, reqs)

        timed(serve_layer, 3)
        results["layer"].append(summary(timed(serve_layer, 50), b))
        print("layer", results["layer"][-1], flush=True)

    if results["ray"]:
        results["serve"] = {}
        for spec in ARGS.servers.split(","):
            ingress, replicas = spec.split(":")
            results["serve"][spec] = serve_run(art, ingress, int(replicas))
    (OUT / "serve_bench.json").write_text(json.dumps(results, indent=1))


def direct_threads(model, clients: int, g: torch.Generator) -> dict:
    """`clients` threads each calling `model` on one sequence, one call after another."""
    import threading

    calls = {1: 300, 16: 30, 64: 10}[clients]
    ids = [torch.randint(5, 30000, (1, SEQ), generator=g) for _ in range(clients)]
    latencies: list[float] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(calls):
            t = time.perf_counter()
            model(input_ids=ids[k])["pooler_output"].cpu()
            if i:
                with lock:
                    latencies.append(time.perf_counter() - t)

    client(0)  # warm
    secs = run_clients(client, clients)
    row = {
        "clients": clients,
        "sequences_per_s": clients * calls / secs,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }
    print("threads", row, flush=True)
    return row


def serve_run(art: Path, ingress: str, replicas: int) -> dict:
    """`python -m kernl.serving` with this ingress and replicas sharing the GPU, under 1, 16
    and 64 concurrent clients (pooler output), then 16 asking for every output."""
    import urllib.request

    from kernl.serving.ingress import free_quiet_port
    from kernl.serving.loadgen import run_load

    port = free_quiet_port()  # not where Ray's own sockets may take it first
    name = f"{ingress}-{replicas}"
    log = open(OUT / f"serve-{name}.log", "w")
    args = [sys.executable, "-m", "kernl.serving", str(art), "--port", str(port)]
    args += ["--max-batch-size", "64", "--ray-address", "local", "--ingress", ingress]
    args += ["--replicas", str(replicas), "--gpus-per-replica", str(1 / replicas)]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    out = {"ingress": ingress, "replicas": replicas, "batch_wait_ms": "default (0)"}
    try:
        start = time.perf_counter()
        for _ in range(480):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        out["ready_s"] = time.perf_counter() - start
        out["clients"] = []
        for clients in (1, 16, 64):
            n = {1: 300, 16: 60, 64: 30}[clients]
            r = run_load(f"http://127.0.0.1:{port}/", clients, n, SEQ, 30000, OUTPUTS)
            out["clients"].append(r.__dict__)
            print("serve", name, r, flush=True)
        r = run_load(f"http://127.0.0.1:{port}/", 16, 20, SEQ, 30000, None)
        out["all_outputs_16"] = r.__dict__
        print("serve", name, "all outputs", r, flush=True)
        out["metrics"] = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read()
        )
    finally:
        proc.send_signal(2)
        proc.wait(timeout=90)
    return out


if __name__ == "__main__":
    main()
