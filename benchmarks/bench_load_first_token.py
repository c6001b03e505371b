"""A fresh process's import, `load()` (hashes verified) and first token, for a Llama-3.2-1B
shaped bf16 artifact of 12 graph entries (issue 15's target: load -> first token <= 2 s).

    PYTHONPATH=$PWD python3 benchmarks/bench_load_first_token.py WORK_DIR \\
        [--runs 3] [--checkout DIR ...]

Compiles (random weights, seed 0, --no-tune) `batch=1,4,8 prompt=128,512 cache=512,2048`
into WORK_DIR/llama.kernl unless it is there, then starts `--runs` fresh processes per
checkout (default: this one; `--checkout DIR` adds another source tree, e.g. an earlier
commit's `git archive`, measured on the same artifact in the same run), each timing
`import kernl.runtime` (torch's import included), `kernl.runtime.load(path)` and the first
generated token of a 100-token prompt. Prints one JSON line per process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BUCKETS = "batch=1,4,8 prompt=128,512 cache=512,2048"

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch, kernl.runtime
t1 = time.perf_counter()
model = kernl.runtime.load(sys.argv[1])
torch.cuda.synchronize()
t2 = time.perf_counter()
model.generate(torch.randint(5, 1000, (1, 100)), max_new_tokens=1)
torch.cuda.synchronize()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2,
                  "load_to_first_token_s": t3 - t1, "graphs": len(model._steps),
                  "triton_imported": "triton" in sys.modules}))
"""


def compile_llama(path: Path) -> None:
    import torch
    import transformers as tf

    import kernl.compiler

    sys.path.insert(0, str(Path(__file__).parent))
    from shapes import llama_1b_config

    cfg = llama_1b_config()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    start = time.perf_counter()
    kernl.compiler.compile(
        model, BUCKETS, path, dtype="bf16", device="cuda", task="causal-lm", tune=False
    )
    print(json.dumps({"compiled_s": time.perf_counter() - start}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("work", type=Path)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--checkout", action="append", default=[], help="another source tree")
    args = p.parse_args()
    path = args.work / "llama.kernl"
    if not path.exists():
        args.work.mkdir(parents=True, exist_ok=True)
        compile_llama(path)
    times: dict[str, list[float]] = {}
    # Runs alternate between checkouts: a drift of the machine (page cache, other load)
    # then lands on every checkout alike.
    for run in range(args.runs):
        for checkout in [os.getcwd(), *args.checkout]:
            env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve())}
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(path)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                print(json.dumps({"checkout": checkout, "error": out.stderr[-2000:]}))
                continue
            row = {
                "checkout": checkout,
                "run": run,
                **json.loads(out.stdout.strip().splitlines()[-1]),
            }
            print(json.dumps(row), flush=True)
            times.setdefault(checkout, []).append(row["load_to_first_token_s"])
    for checkout, xs in times.items():
        xs.sort()
        print(json.dumps({"checkout": checkout, "runs": len(xs), "median_s": xs[len(xs) // 2]}))


if __name__ == "__main__":
    main()
