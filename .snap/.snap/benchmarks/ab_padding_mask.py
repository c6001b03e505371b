"""The padding mask built in one comparison (compiler/passes/padding_mask.py) against the mask
transformers traces (a dozen launches), same process: BERT-base fp16 compiled twice for the
issue-14 buckets, once with the pass and once without it (shorten_padding_mask and drop_dead
made no-ops: the programs the parent commit wrote), both against torch.compile reduce-overhead,
interleaved, three rounds of 200 calls per shape, inputs on the GPU. Then, after every
timing, kernels and kernel time per call for both (the profiler slows what runs after it).

    OUT=/tmp/out python benchmarks/ab_padding_mask.py

The second compile finds the first one's tuning cache: both keep the same choices for
everything but attention, whose bias changed shape (re-tuned)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import torch
import transformers as T

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bert_fusions import BUCKETS, SHAPES, inputs, kernels_per_call, time_ms  # noqa: E402

import kernl.compiler  # noqa: E402
import kernl.compiler.passes as passes  # noqa: E402
import kernl.runtime as rt  # noqa: E402


def compile_variant(folder: str, out: str, with_pass: bool) -> tuple[float, dict]:
    saved = passes.shorten_padding_mask, passes.drop_dead
    if not with_pass:
        passes.shorten_padding_mask = passes.drop_dead = lambda program: program
    try:
        t0 = time.perf_counter()
        report = kernl.compiler.compile(folder, BUCKETS, out, dtype="fp16", device="cuda")
        seconds = time.perf_counter() - t0
    finally:
        passes.shorten_padding_mask, passes.drop_dead = saved
    launches = {f"{b.bucket.batch}x{b.bucket.seq}": b.counts.launches for b in report.buckets}
    return seconds, launches


def main() -> None:
    work = tempfile.mkdtemp(prefix="ab_padding_mask_")
    os.environ["KERNL_CACHE_DIR"] = f"{work}/cache"
    torch.manual_seed(0)
    T.BertModel(T.BertConfig()).eval().save_pretrained(f"{work}/bert")
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, with_pass in (("new", True), ("old", False)):
        s, launches = compile_variant(f"{work}/bert", f"{work}/{name}.kernl", with_pass)
        result[f"{name}_compile_s"], result[f"{name}_launches"] = s, launches
        print(f"{name}: compiled in {s:.1f} s, launches per call {launches}", flush=True)
    new, old = rt.load(f"{work}/new.kernl"), rt.load(f"{work}/old.kernl")
    model = T.BertModel.from_pretrained(f"{work}/bert", dtype=torch.float16).cuda().eval()

    # padded inputs: the two programs agree (the bias differs in shape only) and match eager
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (8, 128), generator=g).cuda()
    mask = torch.ones_like(ids)
    for row in range(8):
        mask[row, 128 - 13 * row :] = 0
    padded = dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=mask)
    with torch.inference_mode():
        a, b = new(**padded)[0].float(), old(**padded)[0].float()
        ref = model(**padded).last_hidden_state.float()
    keep = mask.bool()[..., None].expand_as(ref)  # padded positions' outputs are not compared
    result["padded_new_vs_old_max_abs"] = (a - b)[keep].abs().max().item()
    result["padded_new_vs_eager_max_abs"] = (a - ref)[keep].abs().max().item()
    print(
        f"padded 8x128: new vs old {result['padded_new_vs_old_max_abs']:.4f}, "
        f"new vs eager fp16 {result['padded_new_vs_eager_max_abs']:.4f}",
        flush=True,
    )

    rows, shape_inputs = [], []
    print("shape   new ms   old ms    r-o ms  new/old  r-o/new  r-o/old  rounds")
    for bsz, seq in SHAPES:
        x = inputs(bsz, seq)
        shape_inputs.append(x)
        torch._dynamo.reset()  # one compiled model at a time: dynamo's limit is per frame
        ro = torch.compile(model, mode="reduce-overhead", dynamic=False)
        rounds: dict[str, list[float]] = {"new": [], "old": [], "ro": []}
        with torch.inference_mode():
            for _ in range(3):
                ro(**x)
            for _ in range(3):
                rounds["new"].append(time_ms(lambda: new(**x), 200))
                rounds["old"].append(time_ms(lambda: old(**x), 200))
                rounds["ro"].append(time_ms(lambda: ro(**x), 200))
        med = {k: statistics.median(v) for k, v in rounds.items()}
        row = {"shape": f"{bsz}x{seq}", **{f"{k}_ms": v for k, v in med.items()}, "rounds": rounds}
        rows.append(row)
        print(
            f"{bsz}x{seq:<5} {med['new']:7.3f} {med['old']:8.3f} {med['ro']:9.3f} "
            f"{med['new'] / med['old']:7.3f} {med['ro'] / med['new']:7.2f}x "
            f"{med['ro'] / med['old']:7.2f}x  {rounds}",
            flush=True,
        )
    print("kernels per call (profiler) and kernel ms: new / old")
    with torch.inference_mode():
        for row, x in zip(rows, shape_inputs):
            row["new_kernels"], row["new_kernel_ms"] = kernels_per_call(lambda: new(**x))
            row["old_kernels"], row["old_kernel_ms"] = kernels_per_call(lambda: old(**x))
            print(
                f"{row['shape']:>7} {row['new_kernels']}/{row['old_kernels']} "
                f"{row['new_kernel_ms']:.3f}/{row['old_kernel_ms']:.3f}",
                flush=True,
            )
    result["shapes"] = rows
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "ab_padding_mask.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
