"""Ray Serve's own overhead in `kernl serve`, measured on the CPU with a stub model of fixed
latency standing for the GPU call (the GPU machine has no Ray; bench_serving_direct.py
measures kernl's in-process request path there, and the two add up).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_serving_ray_overhead.py [OUT_DIR] \
        [--generation-only | --encoder-only] [--ingress haproxy|python]

A tiny BERT artifact (CPU mode, plain aten, buckets `batch=1,4,16,64 seq=128`) gives the
deployment its manifest: limits, buckets, inputs, outputs. The stub replaces only the loaded
model (KernlServer._load, through deployment.application's `encoder_deployment`): each call
sleeps LATENCY and returns zeros of BERT-base's output shapes (hidden 768), so parsing,
batching (gather.BatchGatherer, up to 64 rows, --batch-wait-ms 2), bucket planning, JSON
answers, the HTTP ingress and Ray's routing are kernl serve's own (--ingress picks the ingress
as `kernl serve --ingress` does, and the same default; it is set before this process starts
Ray). For each latency (1 ms, 5 ms) and 1/16/64 concurrent clients of one 128-token request
each (kernl.serving.loadgen, asking for `pooler_output`), three measurements:
  direct   the stub called with C rows in one call (what the GPU would do): p50 = LATENCY
  path     kernl's in-process request path around the stub, no Ray or HTTP (as on the GPU)
  serve    HTTP through Ray Serve, 1 replica
Ray's share = serve - path (p50, ms); serve vs direct = the whole serving overhead.
Generation the same way: a tiny causal-LM artifact (`batch=1,4,16 prompt=128 cache=256`)
behind KernlGenerator with a stub whose every step sleeps STEP_MS (one decode step of the
batch), 16 clients asking for GEN_NEW tokens each, returned at the end or streamed as
server-sent events (one event per token through the ingress), with requests joining the
running batch (the default; the stub keeps the runtime's joining rules, a joiner's prefill
costs one step) and without (`--no-join`): direct = one stub call of 16 prompts; path =
GenerationBatcher in one process; serve = HTTP through Ray Serve. The
clients run in this process's threads, on the same cores as Ray: on a 2-core machine they
compete with the ingress and the replica, so these are upper bounds of Ray's cost.
Writes OUT_DIR/serving_ray_overhead.json (default: the current folder) and prints a table.
About 2-3 minutes on 2 cores (the python ingress; haproxy: about 1.5)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving_common import encoder_path  # noqa: E402

LATENCIES_MS = (1.0, 5.0)
CLIENTS = (1, 16, 64)
SEQ = 128
VOCAB = 1000
HIDDEN = 768  # BERT-base: the answers' size, as the GPU benchmark's
BUCKETS = "batch=1,4,16,64 seq=128"
WAIT_MS = 2.0
REQUESTS = {1: 300, 16: 40, 64: 12}  # timed requests per client
PATH_SECONDS = 3.0
STEP_MS = 2.0  # one decode step of a 16-row batch of a 1B model on a GPU, roughly
GEN_NEW = 64
GEN_CLIENTS = 16
GEN_REQUESTS = 4  # timed requests per client
GEN_BUCKETS = f"batch=1,4,16 prompt={SEQ} cache=256"


class StubModel:
    """Stands for a loaded encoder: `__call__` sleeps `latency_s` (the GPU call) and returns
    zeros shaped like the artifact's outputs with `hidden` features."""

    def __init__(self, manifest, latency_s: float, hidden: int = HIDDEN):
        self.manifest = manifest
        self.buckets = manifest.bucket_list()
        self.device = torch.device("cpu")
        self.input_names = [s.name for s in manifest.inputs]
        self.output_names = [o.name for o in manifest.outputs]
        self.latency_s = latency_s
        self.hidden = hidden
        self.calls = 0
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, **inputs):
        batch, seq = inputs["input_ids"].shape
        time.sleep(self.latency_s)
        self.calls += 1
        out = {}
        for spec in self.manifest.outputs:
            shape = [batch, self.hidden]
            if spec.seq_axis is not None:
                shape.insert(spec.seq_axis, seq)
            out[spec.name] = self._zeros(tuple(shape))
        return out

    def _zeros(self, shape: tuple) -> torch.Tensor:
        """Allocated once per shape: a GPU model's outputs live in its graph pool, so a fresh
        25 MB host allocation per call (last_hidden_state of 64x128x768) would be the stub's
        own cost, not one the real call has."""
        if shape not in self._cache:
            self._cache[shape] = torch.zeros(shape)
        return self._cache[shape]


class StubGenerator:
    """Stands for a loaded causal LM: every step sleeps `step_s` and emits token 7 in every
    row (no EOS), through `generate` (all steps, then the ids) or `stream` (ids per step)."""

    def __init__(self, manifest, step_s: float):
        self.manifest = manifest
        self.device = torch.device("cpu")
        self.step_s = step_s

    def generate(self, prompts, max_new_tokens: int = 20, **_):
        time.sleep(self.step_s * max_new_tokens)
        width = max(len(p) for p in prompts)
        return torch.cat(
            [torch.zeros(len(prompts), width, dtype=torch.long)]
            + [torch.full((len(prompts), max_new_tokens), 7)],
            dim=1,
        )

    def stream(self, prompts, max_new_tokens: int = 20, **_):
        for _ in range(max_new_tokens):
            time.sleep(self.step_s)
            yield torch.full((len(prompts),), 7)

    def open_batch(self, prompts, max_new_tokens, rows=None, **_):
        return StubOpenBatch(self, prompts, max_new_tokens, rows or len(prompts))


class StubOpenBatch:
    """The runtime's OpenBatch (runtime/generation/joining.py) with its rules (free rows, a
    joiner's prompt bucket before the current slot, its budget inside the cache) and the
    stub's costs: the opening prefill, each joiner's own prefill and each step sleep one
    step_s (a 128-token prefill of a 1B model takes about one 16-row decode step)."""

    def __init__(self, stub: StubGenerator, prompts, budgets, rows: int):
        from kernl.artifacts.schema import pick_size
        from kernl.serving.generation_protocol import GenerationLimits

        self.stub, self.limits = stub, GenerationLimits.from_manifest(stub.manifest)
        self.pick = pick_size
        self.bucket = pick_size(self.limits.batches, max(rows, len(prompts)))
        self.slot = pick_size(self.limits.prompts, max(len(p) for p in prompts))
        self._left = dict(enumerate(budgets))
        time.sleep(stub.step_s)
        self.first = self._emitted([(r, 7) for r in range(len(prompts))])

    @property
    def rows(self) -> list[int]:
        return sorted(self._left)

    def free_rows(self) -> int:
        return self.bucket - len(self._left)

    def can_join(self, prompt_length: int, max_new_tokens: int) -> bool:
        bucket = self.pick(self.limits.prompts, prompt_length)
        return (
            self.free_rows() > 0
            and bucket is not None
            and bucket <= self.slot
            and self.slot + max_new_tokens - 1 <= self.limits.cache_len
        )

    def join(self, prompt, max_new_tokens, **_):
        if not self.can_join(len(prompt), max_new_tokens):
            return None
        time.sleep(self.stub.step_s)
        row = min(set(range(self.bucket)) - set(self._left))
        self._left[row] = max_new_tokens
        return self._emitted([(row, 7)])[0]

    def steps(self, n: int):
        n = max(1, min(n, *self._left.values()))
        time.sleep(self.stub.step_s * n)
        self.slot += n
        return [self._emitted([(r, 7) for r in self.rows]) for _ in range(n)]

    def release(self, row: int) -> None:
        self._left.pop(row, None)

    def close(self) -> None:
        pass

    def _emitted(self, pairs):
        for row, _ in pairs:
            self._left[row] -= 1
            if self._left[row] == 0:
                self.release(row)
        return pairs


def stub_generator_deployment(step_s: float):
    """kernl serve's KernlGenerator with the stub loaded instead of the artifact's model."""
    from ray import serve

    from kernl.serving.generation import KernlGenerator

    class StubGeneratorServer(KernlGenerator.func_or_class):
        def _load(self) -> None:
            self.model = StubGenerator(self.manifest, step_s)

    return serve.deployment(StubGeneratorServer)


def stub_deployment(latency_s: float):
    """kernl serve's KernlServer with the stub loaded instead of the artifact's model."""
    from ray import serve

    from kernl.serving.batching import token_costs
    from kernl.serving.deployment import KernlServer

    class StubServer(KernlServer.func_or_class):
        def _load(self) -> None:
            self.costs = token_costs(self.manifest.bucket_list())
            self.model = StubModel(self.manifest, latency_s)

    return serve.deployment(StubServer)


def artifact(work: Path) -> Path:
    import transformers

    import kernl.compiler

    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
    )
    path = work / "stub.kernl"
    kernl.compiler.compile(
        transformers.BertModel(config).eval(),
        BUCKETS,
        path,
        dtype="fp32",
        device="cpu",
        kernels=False,
    )
    return path


def llama_artifact(work: Path) -> Path:
    import transformers

    import kernl.compiler

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=VOCAB,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    path = work / "stub-llama.kernl"
    kernl.compiler.compile(
        transformers.LlamaForCausalLM(config).eval(),
        GEN_BUCKETS,
        path,
        dtype="fp32",
        device="cpu",
        task="causal-lm",
    )
    return path


def stream_request(port: int, body: dict) -> int:
    """One streamed request; the number of token events before [DONE]."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/", body=json.dumps({**body, "stream": True}).encode())
    resp = conn.getresponse()
    n = 0
    for line in resp:
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            n += 1
    conn.close()
    return n


def post_request(port: int, body: dict) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/", body=json.dumps(body).encode())
    answer = json.loads(conn.getresponse().read())
    conn.close()
    return len(answer["generated_ids"])


def generation_rows(work: Path, port: int) -> list[dict]:
    """16 generation clients: direct stub call, in-process batcher, Ray Serve (returned and
    streamed)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from kernl.artifacts import read_manifest
    from kernl.serving.config import ServeConfig
    from kernl.serving.deployment import application
    from kernl.serving.generation_batcher import BatchPolicy, GenerationBatcher
    from kernl.serving.generation_protocol import GenerationLimits, parse_generation_request
    from kernl.serving.loadgen import percentile

    path = llama_artifact(work)
    manifest = read_manifest(path)
    limits = GenerationLimits.from_manifest(manifest)
    stub = StubGenerator(manifest, STEP_MS / 1000)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, VOCAB, (SEQ,), generator=g).tolist() for _ in range(16)]
    t = time.perf_counter()
    stub.generate(prompts, max_new_tokens=GEN_NEW)
    direct_s = time.perf_counter() - t
    rows = []

    async def in_process(stream: bool, join: bool) -> tuple[list[float], float, float]:
        records = []
        batcher = GenerationBatcher(
            stub, limits, BatchPolicy(16, WAIT_MS / 1000, join=join), on_batch=records.append
        )
        latencies = []

        async def client(k: int) -> None:
            for i in range(GEN_REQUESTS + 1):
                t = time.perf_counter()
                body = {"input_ids": prompts[k], "max_new_tokens": GEN_NEW, "stream": stream}
                ticket = batcher.submit(parse_generation_request(json.dumps(body).encode(), limits))
                await ticket.result()
                if i:
                    latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(GEN_CLIENTS)))
        per_batch = sum(r.requests for r in records) / len(records)
        return latencies, time.perf_counter() - start, per_batch

    def metrics() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            return json.loads(r.read())

    for stream, join in ((False, True), (True, True), (False, False), (True, False)):
        config = ServeConfig(artifact=str(path), batch_wait_ms=WAIT_MS, port=port, join=join)
        serve.run(
            application(config, stub_generator_deployment(STEP_MS / 1000)),
            name="kernl-gen",
            route_prefix="/",
        )
        wait_ready(port)
        lat, secs, path_per_batch = asyncio.run(in_process(stream, join))
        before = metrics()
        send = stream_request if stream else post_request
        served: list[float] = []
        tokens = [0]

        def client(k: int) -> None:
            body = {"input_ids": prompts[k], "max_new_tokens": GEN_NEW}
            for i in range(GEN_REQUESTS + 1):
                t = time.perf_counter()
                n = send(port, body)
                tokens[0] += n
                if i:
                    served.append(time.perf_counter() - t)

        start = time.perf_counter()
        with ThreadPoolExecutor(GEN_CLIENTS) as pool:
            list(pool.map(client, range(GEN_CLIENTS)))
        serve_s = time.perf_counter() - start
        after = metrics()
        batches = after["batches"] - before["batches"]
        row = {
            "step_ms": STEP_MS,
            "clients": GEN_CLIENTS,
            "new_tokens": GEN_NEW,
            "stream": stream,
            "join": join,
            "serve_joined_requests": after.get("joined_requests", 0)
            - before.get("joined_requests", 0),
            "direct_ms": 1000 * direct_s,
            "direct_tokens_per_s": 16 * GEN_NEW / direct_s,
            "path_p50_ms": 1000 * percentile(lat, 0.5),
            # every request, the first of each client included, over the whole run
            "path_tokens_per_s": GEN_CLIENTS * (GEN_REQUESTS + 1) * GEN_NEW / secs,
            "path_requests_per_batch": path_per_batch,
            "serve_p50_ms": 1000 * percentile(served, 0.5),
            "serve_p99_ms": 1000 * percentile(served, 0.99),
            "serve_tokens_per_s": tokens[0] / serve_s,
            "serve_requests": len(served),
            "serve_requests_per_batch": GEN_CLIENTS * (GEN_REQUESTS + 1) / batches,
        }
        row["ray_p50_ms"] = row["serve_p50_ms"] - row["path_p50_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        serve.delete("kernl-gen")
    return rows


def wait_ready(port: int, deadline_s: float = 180) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > end:
            raise TimeoutError("the stub server never became ready")
        time.sleep(0.2)  # polling interval


def parse_args() -> argparse.Namespace:
    from kernl.serving.ingress import INGRESSES

    p = argparse.ArgumentParser(description="Ray Serve's own overhead in kernl serve (CPU)")
    p.add_argument("out_dir", nargs="?", default=".", help="where the JSON goes (default .)")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--generation-only", action="store_true", help="skip the encoder")
    only.add_argument("--encoder-only", action="store_true", help="skip generation")
    p.add_argument(
        "--ingress", choices=INGRESSES, default=None, help="as kernl serve's (default: its)"
    )
    return p.parse_args()


def main() -> int:
    from kernl.serving.ingress import default_ingress, free_quiet_port, select_ingress

    args = parse_args()
    ingress = args.ingress or default_ingress()
    select_ingress(ingress)  # before Ray is imported and started, as kernl serve does

    import ray
    from ray import serve

    from kernl.serving.config import ServeConfig
    from kernl.serving.deployment import application
    from kernl.serving.loadgen import percentile, run_load
    from kernl.serving.protocol import ModelLimits

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"CPU, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),  # before the run: the cores may be shared
        "ray": ray.__version__,
        "ingress": ingress,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "buckets": BUCKETS,
        "batch_wait_ms": WAIT_MS,
        "rows": [],
    }
    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    path = artifact(work)
    from kernl.artifacts import read_manifest

    manifest = read_manifest(path)
    limits = ModelLimits.from_manifest(manifest, max_rows=64)
    g = torch.Generator().manual_seed(0)
    bodies = [
        json.dumps(
            {
                "input_ids": torch.randint(5, VOCAB, (SEQ,), generator=g).tolist(),
                "outputs": ["pooler_output"],
            }
        ).encode()
        for _ in range(64)
    ]
    port = free_quiet_port()  # not where Ray's own sockets may take it first
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for latency_ms in () if args.generation_only else LATENCIES_MS:
            stub = StubModel(manifest, latency_ms / 1000)
            config = ServeConfig(
                artifact=str(path), max_batch_size=64, batch_wait_ms=WAIT_MS, port=port
            )
            serve.run(
                application(config, stub_deployment(latency_ms / 1000)),
                name="kernl",
                route_prefix="/",
            )
            wait_ready(port)
            for clients in CLIENTS:
                ids = torch.randint(5, VOCAB, (clients, SEQ))
                times = []
                for _ in range(max(20, 200 // clients)):
                    t = time.perf_counter()
                    stub(input_ids=ids)
                    times.append(time.perf_counter() - t)
                direct_p50 = percentile(times, 0.5)
                lat, secs, per_batch = encoder_path(
                    stub, limits, bodies, clients, PATH_SECONDS, 64, WAIT_MS / 1000
                )
                served = run_load(
                    f"http://127.0.0.1:{port}/",
                    clients,
                    REQUESTS[clients],
                    SEQ,
                    VOCAB,
                    ["pooler_output"],
                    warmup=3,
                )
                row = {
                    "stub_ms": latency_ms,
                    "clients": clients,
                    "direct_p50_ms": 1000 * direct_p50,
                    "direct_seq_per_s": clients / direct_p50,
                    "path_p50_ms": 1000 * percentile(lat, 0.5),
                    "path_p99_ms": 1000 * percentile(lat, 0.99),
                    "path_seq_per_s": len(lat) / secs,
                    "path_requests_per_batch": per_batch,
                    "serve_p50_ms": served.p50_ms,
                    "serve_p99_ms": served.p99_ms,
                    "serve_seq_per_s": served.sequences_per_s,
                    "serve_requests": served.requests,
                    "serve_errors": served.errors,
                }
                row["ray_p50_ms"] = row["serve_p50_ms"] - row["path_p50_ms"]
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
            serve.delete("kernl")
        if not args.encoder_only:
            results["generation"] = generation_rows(work, port)
    finally:
        serve.shutdown()
        ray.shutdown()
    results["total_s"] = time.perf_counter() - t0
    (out_dir / "serving_ray_overhead.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


def table(results: dict) -> str:
    lines = [
        f"Ray Serve {results['ray']} ({results['ingress']} ingress) on {results['machine']} "
        f"(load {results['load_average'][0]:.2f}), stub model, "
        f"{results['buckets']}, --batch-wait-ms {results['batch_wait_ms']}",
        f"{'stub':>5} {'clients':>7} | {'direct p50':>10} {'seq/s':>7} | {'path p50':>8} "
        f"{'p99':>7} {'seq/s':>7} | {'serve p50':>9} {'p99':>7} {'seq/s':>7} | "
        f"{'Ray p50 ms':>10} {'serve/direct':>12}",
    ]
    for r in results["rows"]:
        lines.append(
            f"{r['stub_ms']:>4.0f}m {r['clients']:>7} | {r['direct_p50_ms']:>10.2f} "
            f"{r['direct_seq_per_s']:>7.0f} | {r['path_p50_ms']:>8.2f} {r['path_p99_ms']:>7.2f} "
            f"{r['path_seq_per_s']:>7.0f} | {r['serve_p50_ms']:>9.2f} {r['serve_p99_ms']:>7.2f} "
            f"{r['serve_seq_per_s']:>7.0f} | {r['ray_p50_ms']:>10.2f} "
            f"{r['serve_p50_ms'] / r['direct_p50_ms']:>11.2f}x"
        )
    lines += [
        "",
        f"generation: stub {STEP_MS} ms per step, {GEN_CLIENTS} clients, {GEN_NEW} new tokens",
        f"{'stream':>6} {'join':>5} | {'direct ms':>9} {'tok/s':>7} | {'path p50':>8} {'tok/s':>7} "
        f"{'req/call':>8} | {'serve p50':>9} {'p99':>7} {'tok/s':>7} {'req/call':>8} | "
        f"{'Ray p50 ms':>10} {'serve/direct tok/s':>18}",
    ]
    for r in results.get("generation", []):
        lines.append(
            f"{str(r['stream']):>6} {str(r['join']):>5} | {r['direct_ms']:>9.1f} "
            f"{r['direct_tokens_per_s']:>7.0f} | "
            f"{r['path_p50_ms']:>8.1f} {r['path_tokens_per_s']:>7.0f} "
            f"{r['path_requests_per_batch']:>8.1f} | {r['serve_p50_ms']:>9.1f} "
            f"{r['serve_p99_ms']:>7.1f} {r['serve_tokens_per_s']:>7.0f} "
            f"{r['serve_requests_per_batch']:>8.1f} | "
            f"{r['ray_p50_ms']:>10.1f} "
            f"{r['serve_tokens_per_s'] / r['direct_tokens_per_s']:>17.2f}x"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
