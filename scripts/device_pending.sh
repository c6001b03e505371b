#!/usr/bin/env bash
# What the 2026-11-25 session wrote but could not run on a GPU (no device time was left), in
# four device calls of under 10 minutes each. Run from the repository root on the device:
#
#   OUT=$OUT bash scripts/device_pending.sh tests   # every GPU test, the memory bound included
#   OUT=$OUT bash scripts/device_pending.sh llama   # compile-time decode kernel choice + tok/s per variant
#   OUT=$OUT bash scripts/device_pending.sh bert    # BERT-base latency after the host-path change
#   OUT=$OUT bash scripts/device_pending.sh kernels # skinny_linear vs cuBLAS at decode shapes
#
# Logs and JSON land in $OUT. Each stage stops itself before the device's 10-minute limit.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kernl-device}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/device.txt"

case "${1:-}" in
  tests)
    # memory bound first: it is the one figure issue 5 still lacks
    timeout 560 python -m pytest -m gpu -o addopts="" -q -s -p no:cacheprovider \
      tests/runtime/test_gpu_memory.py tests/generation tests/runtime tests/e2e tests/kernels \
      2>&1 | tee "$OUT/gpu_tests.log"
    ;;
  llama)
    timeout 560 python tests/generation/bench_llama1b_device.py "$OUT/llama" --variants-only \
      2>&1 | tee "$OUT/llama.log"
    ;;
  bert)
    timeout 560 python scripts/bench_bert_e2e.py --out "$OUT/bert" --peers reduce-overhead \
      --iters 200 --no-cold 2>&1 | tee "$OUT/bert.log"
    ;;
  kernels)
    timeout 560 python -m pytest -m gpu -o addopts="" -q -p no:cacheprovider \
      benchmarks/test_benchmark_skinny_linear.py --benchmark-json "$OUT/skinny.json" \
      2>&1 | tee "$OUT/kernels.log"
    ;;
  *)
    echo "usage: OUT=DIR bash scripts/device_pending.sh tests|llama|bert|kernels" >&2
    exit 2
    ;;
esac
