"""Run by the end-to-end tests in a fresh interpreter: load an artifact with kernl.runtime
alone, serve the calls stored in a safetensors file, write the outputs to another."""

import sys

from safetensors.torch import load_file, save_file

import kernl.runtime

artifact, calls_file, out_file, device = sys.argv[1:5]
model = kernl.runtime.load(artifact, device=device)
calls = load_file(calls_file)
outputs = {}
for i in range(len({k.split("/")[0] for k in calls})):
    inputs = {k.split("/")[1]: v for k, v in calls.items() if k.startswith(f"{i}/")}
    for name, t in model(**inputs).items():
        outputs[f"{i}/{name}"] = t.cpu().contiguous()
heavy = sorted(m for m in ("transformers", "click", "kernl.compiler") if m in sys.modules)
if heavy:
    sys.exit(f"kernl.runtime imported {heavy}")
save_file(outputs, out_file)
