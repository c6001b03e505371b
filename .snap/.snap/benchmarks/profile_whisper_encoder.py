"""Where Whisper-large-v3's encoder step goes (issue 16: at 8 windows the encoder is ~55 ms of
a 217 ms generate): the runtime's `encode_features` on random bf16 weights at real shapes,
eager (no artifact), per batch: median ms of 10 calls and the largest kernels of 3 profiled.

    PYTHONPATH=$PWD python3 benchmarks/profile_whisper_encoder.py [batch ...]"""

from __future__ import annotations

import os
import statistics
import sys

import torch
import transformers as tf
from torch.profiler import ProfilerActivity, profile

from kernl.compiler.tasks.seq2seq.describe import describe
from kernl.runtime.generation.encoder_decoder import EncoderDecoder, Seq2SeqCache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_seq2seq import build, whisper_config  # noqa: E402


def main() -> None:
    dev, dtype = torch.device("cuda"), torch.bfloat16
    cfg = whisper_config(False)
    hf = build(tf.WhisperForConditionalGeneration, cfg, dtype, dev)
    spec, weights = describe(hf, dtype)
    del hf
    model = EncoderDecoder(spec, weights, dtype, dev)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for batch in [int(b) for b in sys.argv[1:]] or [1, 8]:
        cache = Seq2SeqCache.allocate(spec, batch, 64, spec.source_positions, dtype, dev)
        x = torch.randn(batch, spec.num_mel_bins, spec.frames, device=dev, dtype=dtype)
        with torch.no_grad():
            for _ in range(3):
                model.encode_features(cache, x)
            times = []
            for _ in range(10):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                model.encode_features(cache, x)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    model.encode_features(cache, x)
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        total = sum(e.self_device_time_total for e in events) / 3e3
        print(f"batch {batch}: {statistics.median(times):.2f} ms per call, kernels {total:.2f} ms")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:18]:
            print(f"  {e.self_device_time_total / 3e3:8.3f} ms  x{e.count // 3:<4} {e.key[:110]}")
        del cache


if __name__ == "__main__":
    main()
