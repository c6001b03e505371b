"""A CPU artifact loaded in a process that has a GPU leaves Triton as it found it.

TRITON_INTERPRET is the whole process's: set, every Triton kernel made after it (the user's
own, torch.compile's) would run through the interpreter. So load() and the compiler set it
only in a process without a GPU; with one, kernl's ops take their aten path on the CPU.
The GPU is pretended here (torch.cuda.is_available), in a fresh process whose Triton is not
yet imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import transformers as T

import kernl.compiler

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=120,
    max_position_embeddings=80,
)

_CHILD = r"""
import json, os, sys
import torch
torch.cuda.is_available = lambda: True  # a GPU machine, as far as kernl can tell
import kernl.runtime

path, mode = sys.argv[1], sys.argv[2]
ids = torch.arange(3, 3 + 2 * 11).reshape(2, 11) % 120
mask = torch.ones_like(ids)
mask[1, 6:] = 0
if mode == "load":
    model = kernl.runtime.load(path, device="cpu")
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.save(out, os.path.join(os.path.dirname(path), "out.pt"))
else:
    import transformers as T
    import kernl.compiler
    torch.manual_seed(0)
    bert = T.BertModel(T.BertConfig(**json.loads(sys.argv[3]))).eval()
    kernl.compiler.compile(bert, "batch=2 seq=16", path, dtype="fp32", device="cpu")
print("TRITON_INTERPRET=" + repr(os.environ.get("TRITON_INTERPRET")))
"""


def _run_child(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_load_of_a_cpu_artifact_beside_a_gpu_leaves_triton_compiled(tmp_path):
    torch.manual_seed(0)
    bert = T.BertModel(T.BertConfig(**SMALL)).eval()
    path = tmp_path / "bert.kernl"
    kernl.compiler.compile(bert, "batch=2 seq=16", path, dtype="fp32", device="cpu")

    out = _run_child(str(path), "load")

    assert "TRITON_INTERPRET=None" in out
    ids = torch.arange(3, 3 + 2 * 11).reshape(2, 11) % 120
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    got = torch.load(tmp_path / "out.pt")
    assert (got - want)[mask.bool()].abs().max().item() < 2e-5


def test_cpu_compile_beside_a_gpu_leaves_triton_compiled(tmp_path):
    out = _run_child(str(tmp_path / "bert.kernl"), "compile", json.dumps(SMALL))

    assert "TRITON_INTERPRET=None" in out
    assert (tmp_path / "bert.kernl" / "manifest.msgpack").is_file()
