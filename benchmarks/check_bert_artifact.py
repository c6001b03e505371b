"""The `bertc` stage's BERT-base artifact served from its binaries, against eager fp16 at the
shapes named (issue 14): a fresh process that loads the artifact (no JIT), runs each shape
with every fourth row right-padded to half its length, and prints the worst |diff| on the
rows' real tokens (which kernels each bucket took: the `bertc` log's choices).

    python benchmarks/check_bert_artifact.py /tmp/bench_bert_fusions_*/bert.kernl 8x512 1x512

The eager model is the one the artifact was compiled from (`bert` beside the artifact)."""

from __future__ import annotations

import json
import os
import sys

import torch
import transformers

import kernl.runtime as rt


def main() -> None:
    artifact, shapes = sys.argv[1], sys.argv[2:] or ["8x512"]
    served = rt.load(artifact)
    eager = transformers.BertModel.from_pretrained(os.path.join(os.path.dirname(artifact), "bert"))
    eager = eager.half().cuda().eval()
    for shape in shapes:
        batch, seq = map(int, shape.split("x"))
        g = torch.Generator().manual_seed(batch * 1000 + seq)
        ids = torch.randint(1000, 30000, (batch, seq), generator=g).cuda()
        mask = torch.ones(batch, seq, dtype=torch.long, device="cuda")
        mask[::4, seq // 2 :] = 0
        with torch.inference_mode():
            want = eager(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            got = served(input_ids=ids, attention_mask=mask)["last_hidden_state"].float()
        real = mask.bool()
        err = (got - want).abs()[real].max().item()
        print(json.dumps({"shape": shape, "max_abs_diff_real_tokens": err,
                          "finite": bool(got[real].isfinite().all())}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
