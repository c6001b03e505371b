"""The real all-MiniLM-L6-v2, compiled fp16 for batch 1-64 x seq 16-256 on a GPU: sentence
embeddings (mean pooling, L2 norm) against eager fp32 embeddings computed beforehand on the
CPU from the original fp32 weights (.carry/minilm_ref.safetensors).

    python benchmarks/check_minilm.py .carry/minilm .carry/minilm_ref.safetensors
"""

import sys
import time

import torch
from safetensors.torch import load_file

import kernl.compiler
import kernl.runtime

model_dir, ref_file = sys.argv[1], sys.argv[2]
out = "/tmp/minilm.kernl"
t0 = time.perf_counter()
report = kernl.compiler.compile(
    model_dir, "batch=1,8,64 seq=16,64,256", out, dtype="fp16", device="cuda"
)
print(report.table().splitlines()[-1], f"({time.perf_counter() - t0:.1f} s)")
model = kernl.runtime.load(out)
ref = load_file(ref_file)
worst = 1.0
for i in range(len(ref) // 3):
    ids, mask = ref[f"{i}/input_ids"].cuda(), ref[f"{i}/attention_mask"].cuda()
    h = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    m = mask[..., None].float()
    e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    cos = torch.nn.functional.cosine_similarity(e.cpu(), ref[f"{i}/embedding"], dim=-1)
    worst = min(worst, cos.min().item())
    print(f"batch {ids.shape[0]:3d} seq {ids.shape[1]:4d}: min cosine {cos.min().item():.6f}")
print(
    f"MiniLM fp16 vs eager fp32: worst cosine similarity over {len(ref) // 3} input sets {worst:.6f}"
)
assert worst >= 0.999
