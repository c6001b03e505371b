"""Whether a validation failure of a base-sized random encoder is kernl's error or its dtype's:
the model compiled with a loose tolerance, then at the bucket's shape, on validation's inputs,
max |diff| of last_hidden_state for kernl against eager in the same dtype and against eager
fp32, and for eager in the dtype against eager fp32.

    python benchmarks/diag_family_accuracy.py modernbert fp16 4 128 [--no-rotary]
    python benchmarks/diag_family_accuracy.py deberta-v3 bf16 4 32

Prints one JSON line. A plain script, not collected by pytest."""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "e2e")
)


def main() -> None:
    from test_gpu_encoder_families import FAMILIES

    import kernl.compiler
    import kernl.compiler.passes as passes
    import kernl.runtime

    name, dtype, batch, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if "--no-rotary" in sys.argv:
        passes.fuse_rotary = lambda program: program
    torch.manual_seed(0)
    model = FAMILIES[name]().eval()
    path = os.path.join(tempfile.mkdtemp(), "m")
    kernl.compiler.compile(model, f"batch={batch} seq={seq}", path, dtype=dtype, device="cuda",
                           atol=1.0, rtol=1.0)  # fmt: skip
    served = kernl.runtime.load(path, device="cuda")
    g = torch.Generator().manual_seed(1234 + batch * 7919 + seq)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[-1, seq // 2 :] = 0
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    with torch.no_grad():
        ref32 = model.float().cuda()(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = model.to(torch_dtype)(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    got = served(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    real = mask.bool()

    def diff(a, b):
        return round(float((a[real] - b[real]).abs().max()), 5)

    print(json.dumps({
        "family": name, "dtype": dtype, "shape": f"{batch}x{seq}",
        "rotary_pass": "--no-rotary" not in sys.argv,
        "fp32_scale": round(float(ref32[real].abs().max()), 3),
        "kernl_vs_eager_same_dtype": diff(got, ref),
        "kernl_vs_eager_fp32": diff(got, ref32),
        "eager_same_dtype_vs_eager_fp32": diff(ref, ref32),
        "device": torch.cuda.get_device_name(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
