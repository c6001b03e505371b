"""Run inside the runtime-only virtual environment: prove that transformers, click and Ray
are absent, that kernl comes from the installed package, then load the artifact and serve
calls (a direct call, and a JSON request through the serving protocol and batcher, which
need no Ray), writing the outputs for the test to compare."""

import importlib.util
import json
import sys

import torch
from safetensors.torch import save_file

import kernl
import kernl.runtime
from kernl.serving.batching import run_group
from kernl.serving.protocol import ModelLimits, parse_request

artifact, out_file = sys.argv[1:3]
absent = {name: importlib.util.find_spec(name) is None for name in ("transformers", "click", "ray")}
model = kernl.runtime.load(artifact, device="cpu")
ids = torch.tensor([[5, 9, 14, 3, 7]])
direct = model(input_ids=ids)

limits = ModelLimits(
    model.manifest.inputs,
    model.output_names,
    list(model.buckets),
    model.manifest.model_config.get("vocab_size"),
    max_rows=2,
)
request = parse_request(json.dumps({"input_ids": [[5, 9, 14, 3, 7], [8, 8]]}).encode(), limits)
served = run_group(model, request.rows)

outputs = {f"direct/{k}": v.contiguous() for k, v in direct.items()}
outputs.update(
    {f"served{i}/{k}": v.contiguous() for i, r in enumerate(served) for k, v in r.items()}
)
save_file(outputs, out_file)
print(
    json.dumps(
        {
            "absent": absent,
            "kernl_file": kernl.__file__,
            "heavy_modules_loaded": sorted(
                m for m in ("transformers", "click", "ray") if m in sys.modules
            ),
        }
    )
)
