#!/usr/bin/env bash
# A session's GPU work as one detached job on the device machine, so that one pytest process
# and several benchmarks can outlast the device tool's 10-minute limit per command.
#
# From the repository root on the GPU machine (the reference benchmarks copied into .bench,
# see README "Benchmarks"):
#   bash benchmarks/device_run.sh start tests gen bert decode   # starts the stages, waits
#   bash benchmarks/device_run.sh wait                          # waits again (next command)
# On a machine with several GPUs, `--` splits the stages into chains that run side by side,
# chain i on GPU i (each stage still alone on its GPU, so timings stay comparable):
#   bash benchmarks/device_run.sh start tests gen -- bert seq2seq serving
# The stages run from a copy of the tree in $RUN/tree, which later calls do not touch.
# Each `start`/`wait` returns after at most WAIT seconds (default 480: `start` copies the tree
# first and both collect the logs after, and the device tool stops a command at 600 s; with
# 540 a `start` was stopped there, 2026-12-02) with every log and
# JSON so far copied to $OUT and the last lines of each log printed; call `wait` again
# within the machine's idle time until it prints "all stages done".
#
# Stages:
#   tests   the whole GPU suite in one pytest process (`make test-gpu` without the venv)
#   testsfast the GPU suite without its `slow` tests (~9 of its ~15.5 min: the bench-only
#           persistent-step configs, the launch-count profile, the twenty-bucket memory test,
#           the static-cache process-sharing test)
#   testsmost the whole GPU suite in one process but the persistent-step configs that only
#           the bench runs (the slow tests of the runtime and the compiler included)
#   testsone `testsmost` bounded at 27 min instead of 20 (the suite outgrew 20 min)
#   testsnew `testsmost` without the process-sharing and twenty-bucket memory tests (~17 min)
#   testsgen the GPU tests of generation, seq2seq, runtime, e2e, compiler, artifacts, optimize,
#           decode attention and the persistent step (~10 min, 142 tests, 2026-12-06)
#   testsfirst / testskernels / testsrest  `testsmost` in three parts, each within one device
#           call (WAIT=480): artifacts, compiler, e2e, generation; then tests/kernels (with
#           them testsfirst outgrew 600 s on an H100, 2026-12-07); then runtime, seq2seq,
#           optimize, packaging, serving and the kernel
#           benchmarks (~6 min: 69 tests in 3.3 min, the benchmarks' 136 in 2.3 min). A
#           `wait` that comes after the machine's 30 s idle release finds a fresh machine and
#           nothing running: stages that end within their call lose nothing then
#   attkernels every attention kernel's GPU tests (flash, short-key, TMA, Gluon, QKV fused)
#   enctests the GPU tests of the encoder path (compile, runtime, artifacts, its kernels), the
#           launch-count profile included (~4 min)
#   bertro  the `bert` stage's artifact against reduce-overhead, interleaved in one process
#           (benchmarks/bench_bert_artifact_vs_ro.py; run it right after `bert`)
#   abmask  the padding mask in one comparison against transformers' traced mask, same
#           process, both against reduce-overhead (benchmarks/ab_padding_mask.py, ~4 min)
#   abatt   the attention kernel at BERT-base's shapes with its padding bias, before and after
#           the bias became one row per key block (benchmarks/ab_attention_bias.py; needs
#           .diag/attention_before.py, see the script)
#   abcheck the `bert` stage's artifact with the input range checks in its graphs against the
#           same checks launched by each call, one process (benchmarks/ab_checks_in_graph.py;
#           run it after `bert`)
#   abside  the `bert` stage's artifact with each graph's side work (the check's copy) beside
#           its path and cuBLAS's memsets as fill kernels, against the graphs as captured
#           (benchmarks/ab_graph_side_work.py; after `bert` or `bertc`)
#   coldab  the `bert` stage's artifact in fresh processes: import, load, a first call per
#           bucket, checks in the graphs or not (benchmarks/ab_cold_start.py; after `bert`)
#   bertc   the `bert` stage's compile alone: its artifact for the stages that follow it
#   coldprof coldab once per mode after one fresh process with its phases apart and load()
#           under cProfile (after `bert` or `bertc`)
#   coldphases load()'s phases timed in fresh processes, per variant of load() (one warm-up per
#           model or per capture, Triton imported before the clock), outputs compared
#           (benchmarks/ab_cold_start.py --phases; after `bertc`)
#   coldpyc whether the environment keeps bytecode, `import kernl.runtime` by module, then
#           coldphases as the environment runs it and with a bytecode cache (after `bertc`)
#   coldlazy load() with its kernels made on first use (kernels/jit.py: no Triton import) against
#           Triton imported inside load()'s clock as before, with and without a bytecode cache
#           (benchmarks/ab_cold_start.py --phases; after `bertc`)
#   families the encoder families learned from traced code (MPNet's bias on kernl.attention,
#           DeBERTa-v3's folded positions, ModernBERT's kernl.rotary), base-sized, tuned on the GPU, against eager, with
#           the attention kernels' own tests (four base-sized compiles: ~5-8 min, not yet run)
#   modernbert ModernBERT-base fp16: kernl, kernl without the constant fold and attention window,
#           reduce-overhead and eager at 1x128, 8x128, 8x512, 1x2048, 8x2048 (bench_modernbert.py,
#           ~6-8 min)
#   winsoft decode attention with a window and with Gemma2's softcap, against the mask-only
#           kernel, SDPA and the torch path (benchmarks/bench_decode_window_softcap.py, ~20 s)
#   wingen  whole-model generation at a 4096-token prompt, 8192-slot cache: a windowed Mistral,
#           the same without its window, Gemma2; each attention implementation
#           (benchmarks/bench_window_generation.py, ~4-6 min)
#   llama8b a Llama-3-8B-shaped bf16 model end to end: compile, load, the memory plan against
#           the allocator's peak, steps at batch 1 and 8 against HF eager (bench_llama8b.py,
#           ~4-6 min, not yet run)
#   newkernels the GPU tests of kernl.rotary's and kernl.gated_linear's kernels (~30 s)
#   famacc  a base-sized random family's error against eager fp32 beside eager's own
#           (benchmarks/diag_family_accuracy.py: ModernBERT fp16 with and without
#           kernl.rotary, DeBERTa-v3 bf16)
#   qkvatt  BERT-base's QKV projection + attention as one kernel against cuBLAS's GEMM and the
#           tuner's best attention, its 14-config sweep (benchmarks/bench_qkv_attention.py, ~2 min)
#   qkvtests the fused kernel's GPU tests and BERT-base's end to end with it (~2.5 min)
#   attshort BERT's encoder attention, every tuning candidate timed: the flash kernel against the
#           short-key persistent kernel and the TMA one, and SDPA
#           (benchmarks/bench_attention_short.py, ~1.5 min)
#   attwgmma a Gluon attention whose next q k^T overlaps this block's softmax (FA3's schedule)
#           against the tuner's kernels at 8x512, 4x256 and 32x128
#           (benchmarks/bench_attention_wgmma.py, ~1 min)
#   linwgmma the Gluon linears (kernels/linear_wgmma.py over a sweep of tiles, the
#           warp-specialised kernels/linear_pingpong.py) against cuBLAS at BERT-base's GEMMs,
#           M = 4096 and 1024 (benchmarks/bench_linear_wgmma.py, ~1.5 min)
#   linpp   the same for cuBLAS and the ping-pong kernel only, under a short timeout (its
#           first GPU run: a barrier bug hangs rather than fails)
#   diagpp  the ping-pong linear at FFN1 alone and between layer norms and FFN2, JIT and
#           binary launches, against cuBLASLt (benchmarks/diag_pingpong_in_model.py, ~1 min)
#   memsettests the GPU tests of cuBLAS's memsets as fills, the graph edits, the input paths
#           and e2e
#   memsetnodes a memset node in a CUDA graph against a kernel writing the same zeros, twelve
#           times between a layer norm and a GEMM (benchmarks/diag_memset_nodes.py, ~10 s)
#   wgmmatests the Gluon attention's and linears' GPU tests (their binaries in a graph
#           included) and the no-JIT serving test
#   bertcheck the `bertc` artifact from its binaries against eager fp16 at 8x512, 1x512 and
#           32x128, right-padded rows (benchmarks/check_bert_artifact.py; after `bertc`)
#   atttma  the GPU tests of the TMA attention, the short-key one, the TMA linear and e2e
#   profbert the `bertc` artifact's kernel time by kernel name at 32x128, 8x512, 8x128, 1x128
#           (benchmarks/profile_bert_kernels.py; after `bert` or `bertc`)
#   coldwarm the cold start as shipped and in a process that loaded and ran the artifact once
#           before the clock, the bound on any warming (ab_cold_start.py; COLD_VARIANTS picks;
#           after `bertc`)
#   s2sgen  the GPU tests of seq2seq and optimize (the encoders tuned with the short-key kernel)
#   coldnow load()'s phases and the cold start as shipped, five fresh processes (after `bertc`)
#   peers   the issue's own bench: kernl vs reduce-overhead vs eager, and its cold start
#           (.bench/kernl_vs_peers.py)
#   coldphasesprof  a load() under cProfile, then coldphases twice per variant
#   gaps    the `bert` stage's artifact: call vs graph replay vs kernels' busy time, and the idle
#           time between kernels (benchmarks/diag_call_gaps.py; run it after `bert`)
#   hostpath a call's host time before its graph replay, step by step, per BERT shape, lean
#           call (the default) against every call under the launcher context, same run
#           (benchmarks/diag_host_path.py; after `bert` or `bertc`)
#   gemms   BERT-base's GEMMs one by one in CUDA graphs: which add a cuBLAS memset, and at
#           what speed, per way of calling them (benchmarks/diag_gemm_memsets.py)
#   gen     Llama-1B-shaped bf16 generation vs HF eager and HF static-cache generate
#           (.bench/kernl_gen_vs_peers.py, batches 1 4 8; kernl generates after HF's
#           torch.compile too, the process-sharing crash of issue 12)
#   bert    BERT-base fp16 kernl vs torch.compile reduce-overhead vs eager
#           (benchmarks/bench_bert_fusions.py)
#   decode  the fused decode kernels vs the sequences they replace
#           (benchmarks/bench_decode_kernels.py)
#   sweep   the fused decode kernels' configs, widely (benchmarks/sweep_decode_configs.py)
#   seq2seq T5-base and Whisper-large-v3 shapes vs HF eager / static-cache generate
#           (benchmarks/bench_seq2seq.py)
#   whisper / t5  bench_seq2seq for one model alone (its HF static-cache peers never skipped)
#   serving kernl's in-process request path vs direct calls, BERT-base and Llama-1B
#           (benchmarks/bench_serving_direct.py)
#   profllama where one Llama-1B decode step goes, by kernel (.bench/profile_llama.py)
#   profdecode one Llama-1B decode step by kernel, for torch / chosen / fused / fused + PDL
#           (benchmarks/profile_decode_variants.py)
#   profwenc Whisper-large-v3's encoder step by kernel, batch 1 and 8
#           (benchmarks/profile_whisper_encoder.py)
#   s2stests the GPU tests of seq2seq, optimize and the runtime
#   gpuquick the GPU tests of kernels, runtime and generation only (a smoke run)
#   persist the persistent decode step's GPU tests, the kernels it shares and its serving path
#           (forced, from binaries, in a graph), each run bounded
#   buckets the persistent step served at some decode buckets only (from binaries), and the
#           config added last, at Llama-1B shapes
#   step    the persistent decode step's configs at Llama-1B shapes (benchmarks/bench_decode_step.py)
#   stepnew the compiler's three choice configs and the two QKV_PAIRS configs only (~2 min)
#   stepx   variants of one persistent step config, batch 1 and 8, with their traces
#   stream  the persistent step's norm-folded pair loops, norm in or out of the loop
#           (benchmarks/bench_stream_linear.py)
#   streamgluon can the weight stream cross a grid barrier: a Gluon ring (cp.async or TMA)
#           against Triton's persistent stream (benchmarks/bench_stream_gluon.py, ~1 min)
#   streamsweep how fast a persistent grid streams decode weights, by loop shape (the same)
#   split   BERT-base 32x128 and 8x512 as two or four part-batches on forked streams of one
#           graph against the bucket's own graph (benchmarks/bench_split_batch.py, ~2 min)
#   compileab the BERT-base compile serially and with 16 compile-ahead threads (~4 min)
#   lft     fresh-process load -> first token of a 12-entry Llama-1B artifact
#           (benchmarks/bench_load_first_token.py; also for the tree in .old when present)
#   lintma  BERT-base's GEMMs (M 4096 and 1024): the persistent TMA linear over a sweep of tiles
#           and modes against cuBLAS as kernl calls it (benchmarks/bench_linear_tma.py, ~4 min)
#   tmatests the GPU tests of the linear kernels (the TMA one through Triton and through kernl's
#           binaries in a graph) and of the binaries, and the sm_90 compile test
#   servegen Llama-1B-shaped generation served through Ray Serve (1/16/64 clients, returned and
#           streamed) against generate() of the same prompts in one process
#           (benchmarks/bench_serving_gen_e2e.py; needs Ray: ray_on_device.sh install first)
#   servebert BERT-base served through Ray Serve (HAProxy, 1 and 2 replicas; 1/16/64 clients)
#           against direct calls: one batch, and 1/16/64 threads calling the model in one process
#           (benchmarks/bench_serving_e2e.py; needs Ray: ray_on_device.sh install first)
#   ltalgos BERT-base's linears through cuBLASLt with every algorithm its heuristic offers,
#           against torch's call (benchmarks/bench_cublaslt_algos.py, ~2 min)
#   profserve where the host's CPU goes in kernl's in-process encoder request path, by
#           function (benchmarks/profile_serving_path.py under yappi, from .whl)
set -uo pipefail
RUN=${KERNL_RUN_DIR:-/tmp/kernl-run}
WAIT=${WAIT:-480}
# what `source benchmarks/ray_on_device.sh install` exported (Ray in /tmp/site) stays behind
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

stage() {
  case "$1" in
    tests) timeout 1500 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=40 ;;
    testsmost) # the whole suite but the persistent-step configs only the bench runs (~2.5 min)
      timeout 1200 python3 -m pytest -q -m "gpu and not bench_only" -p no:cacheprovider \
        --durations=25 ;;
    testsone) # `testsmost` under a longer bound: ~600 tests outgrew its 1200 s (the fortieth
      # session's 489 took 19 min 56 s on an H100); spans several `wait` calls
      timeout 1620 python3 -m pytest -q -m "gpu and not bench_only" -p no:cacheprovider \
        --durations=25 ;;
    testsnew) # `testsmost` without two slow tests that exercise nothing changed since they last
      # passed (the static-cache process-sharing test, ~2 min; the twenty-bucket memory test)
      timeout 1200 python3 -m pytest -q -m "gpu and not bench_only" -p no:cacheprovider \
        --durations=25 -k "not process_sharing and not twenty_bert_base_buckets" ;;
    testsgen) # the GPU tests of what the 42nd and 43rd sessions changed (~10 min): generation,
      # seq2seq, runtime, e2e, compiler, artifacts, optimize, decode attention and the
      # persistent step; not the encoder kernels, PDL, launch counts or kernel benchmarks
      timeout 1200 python3 -m pytest -q -m "gpu and not bench_only" -p no:cacheprovider \
        --durations=25 -k "not process_sharing and not twenty_bert_base_buckets" \
        tests/generation tests/seq2seq tests/runtime tests/e2e tests/compiler tests/artifacts \
        tests/optimize tests/kernels/test_decode_attention.py tests/kernels/test_decode_step.py ;;
    testsfirst) # `testsmost` in three parts that each end within one device call: with
      # tests/kernels this one outgrew its 600 s on an H100 (2026-12-07: 153 of 300 tests)
      timeout 600 python3 -m pytest -q -m "gpu and not bench_only" -p no:cacheprovider \
        --durations=15 tests/artifacts tests/compiler tests/e2e tests/generation ;;
    testskernels) # the kernels' GPU tests (2026-12-07, H100: 225 in 97 s, plus decode attention
      # and the persistent step's)
      timeout 600 python3 -m pytest -q -m "gpu and not bench_only" -p no:cacheprovider \
        --durations=15 tests/kernels ;;
    testsrest) # the other half (~6 min): runtime, seq2seq, optimize, the kernel benchmarks
      timeout 600 python3 -m pytest -q -m "gpu and not bench_only" -p no:cacheprovider \
        --durations=15 tests/runtime tests/seq2seq tests/optimize tests/packaging \
        tests/serving benchmarks ;;
    testsfast) timeout 1200 python3 -m pytest -q -m "gpu and not slow" -p no:cacheprovider \
      --durations=25 ;;
    attkernels) # every attention kernel's GPU tests, the fused QKV + attention's too (~2 min)
      timeout 600 python3 -m pytest -q -m "gpu and not bench_only" -p no:cacheprovider \
        tests/kernels/test_attention.py tests/kernels/test_attention_short.py \
        tests/kernels/test_attention_tma.py tests/kernels/test_attention_wgmma.py \
        tests/kernels/test_qkv_attention.py ;;
    enctests) timeout 600 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=15 \
      tests/e2e tests/runtime tests/compiler tests/artifacts tests/kernels/test_attention.py \
      tests/kernels/test_norm.py tests/kernels/test_fused_linear.py \
      tests/kernels/test_bert_embeddings.py tests/kernels/test_attention_short.py \
      tests/kernels/test_attention_tma.py -k "not process_sharing" ;;
    bertro) timeout 300 python3 benchmarks/bench_bert_artifact_vs_ro.py \
      "$(ls -td /tmp/bench_bert_fusions_*/bert.kernl | head -1)" ;;
    abmask) OUT=$RUN timeout 540 python3 benchmarks/ab_padding_mask.py ;;
    abatt) timeout 300 python3 benchmarks/ab_attention_bias.py .diag/attention_before.py ;;
    gemms) timeout 200 python3 benchmarks/diag_gemm_memsets.py ;;
    abcheck) timeout 300 python3 benchmarks/ab_checks_in_graph.py \
      "$(ls -td /tmp/bench_bert_fusions_*/bert.kernl | head -1)" ;;
    abside) timeout 300 python3 benchmarks/ab_graph_side_work.py \
      "$(ls -td /tmp/bench_bert_fusions_*/bert.kernl | head -1)" ;;
    coldab) timeout 300 python3 benchmarks/ab_cold_start.py \
      "$(ls -td /tmp/bench_bert_fusions_*/bert.kernl | head -1)" ;;
    bertc) OUT=$RUN timeout 300 python3 benchmarks/bench_bert_fusions.py --compile-only ;;
    coldpyc) # the environment's bytecode caching, where `import kernl.runtime` goes, then
      # coldphases as the environment runs it and with a bytecode cache (--pycache)
      art="$(ls -td /tmp/bench_bert_fusions_*/bert.kernl | head -1)"
      python3 -c "import sys, os, triton; print('dont_write_bytecode', sys.flags.dont_write_bytecode, 'triton pyc', os.path.isdir(os.path.join(os.path.dirname(triton.__file__), '__pycache__')))"
      python3 -X importtime -c "import kernl.runtime" 2>&1 | sort -t'|' -k2 -n | tail -12
      for cache in "" "--pycache=$RUN/pycache"; do
        timeout 200 python3 benchmarks/ab_cold_start.py --phases --runs 3 $cache \
          --variants now,triton_first "$art"
      done ;;
    coldlazy)
      art="$(ls -td /tmp/bench_bert_fusions_*/bert.kernl | head -1)"
      for cache in "" "--pycache=$RUN/pycache"; do
        timeout 240 python3 benchmarks/ab_cold_start.py --phases --runs 4 $cache \
          --variants now,triton_in_load "$art"
      done ;;
    coldwarm) timeout 300 python3 benchmarks/ab_cold_start.py --phases --runs 4 \
      --variants ${COLD_VARIANTS:-now,warm_process} "$(ls -td /tmp/bench_bert_fusions_*/bert.kernl | head -1)" ;;
    s2sgen) timeout 560 python3 -m pytest -q -m "gpu and not bench_only" -p no:cacheprovider \
      --durations=12 tests/seq2seq tests/optimize ;;
    coldnow) timeout 240 python3 benchmarks/ab_cold_start.py --phases --runs 5 --variants now \
      "$(ls -td /tmp/bench_bert_fusions_*/bert.kernl | head -1)" ;;
    hostpath) timeout 200 python3 benchmarks/diag_host_path.py \
      "$(ls -td /tmp/bench_bert_fusions_*/bert.kernl | head -1)" ;;
    peers) timeout 540 python3 .bench/kernl_vs_peers.py ;;
    qkvatt) timeout 300 python3 benchmarks/bench_qkv_attention.py ;;
    qkvtests) timeout 300 python3 -m pytest -q -m gpu -s -p no:cacheprovider --durations=5 \
      tests/kernels/test_qkv_attention.py tests/e2e/test_gpu_qkv_attention.py ;;
    families) timeout 560 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5 \
      tests/e2e/test_gpu_encoder_families.py tests/kernels/test_attention.py \
      tests/kernels/test_attention_short.py tests/kernels/test_attention_tma.py \
      tests/kernels/test_rotary.py tests/kernels/test_gated_mlp.py \
      tests/generation/test_gpu_generation.py::test_cuda_graph_generation_matches_eager ;;
    modernbert) timeout 900 python3 benchmarks/bench_modernbert.py ;;
    winsoft) OUT=$RUN timeout 200 python3 benchmarks/bench_decode_window_softcap.py ;;
    wingen) OUT=$RUN timeout 600 python3 benchmarks/bench_window_generation.py ;;
    llama8b) OUT=$RUN timeout 600 python3 benchmarks/bench_llama8b.py ;;
    newkernels) timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider \
      tests/kernels/test_gated_mlp.py tests/kernels/test_rotary.py tests/kernels/test_attention.py ;;
    famacc) for a in "modernbert fp16 4 128" "modernbert fp16 4 128 --no-rotary" \
              "deberta-v3 bf16 4 32"; do timeout 200 python3 benchmarks/diag_family_accuracy.py $a; done ;;
    attshort) OUT=$RUN timeout 300 python3 benchmarks/bench_attention_short.py ;;
    attwgmma) timeout 240 python3 benchmarks/bench_attention_wgmma.py ;;
    linwgmma) timeout 300 python3 benchmarks/bench_linear_wgmma.py ;;
    linpp) timeout 120 python3 benchmarks/bench_linear_wgmma.py --only pingpong ;;
    diagpp) timeout 180 python3 benchmarks/diag_pingpong_in_model.py ;;
    memsetnodes) timeout 120 python3 benchmarks/diag_memset_nodes.py ;;
    memsettests) timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5 \
      tests/runtime/test_memset_nodes.py tests/runtime/test_graph_edges.py \
      tests/runtime/test_gpu_input_paths.py tests/e2e ;;
    wgmmatests) timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5 \
      tests/kernels/test_linear_wgmma.py tests/kernels/test_linear_pingpong.py \
      tests/kernels/test_attention_wgmma.py \
      tests/runtime/test_gpu_no_jit.py ;;
    bertcheck) timeout 120 python3 benchmarks/check_bert_artifact.py \
      "$(ls -td /tmp/bench_bert_fusions_*/bert.kernl | head -1)" 8x512 1x512 32x128 ;;
    atttma) timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=10 \
      tests/kernels/test_attention_tma.py tests/kernels/test_attention_short.py \
      tests/kernels/test_linear_tma.py tests/e2e ;;
    profbert) timeout 200 python3 benchmarks/profile_bert_kernels.py \
      "$(ls -td /tmp/bench_bert_fusions_*/bert.kernl | head -1)" 32x128 8x512 8x128 1x128 ;;
    coldphases) timeout 300 python3 benchmarks/ab_cold_start.py --phases --runs 3 \
      "$(ls -td /tmp/bench_bert_fusions_*/bert.kernl | head -1)" ;;
    coldphasesprof) timeout 300 python3 benchmarks/ab_cold_start.py --profile --phases --runs 2 \
      "$(ls -td /tmp/bench_bert_fusions_*/bert.kernl | head -1)" ;;
    coldprof) timeout 300 python3 benchmarks/ab_cold_start.py --profile --runs 1 \
      "$(ls -td /tmp/bench_bert_fusions_*/bert.kernl | head -1)" ;;
    gaps) timeout 300 python3 benchmarks/diag_call_gaps.py \
      "$(ls -td /tmp/bench_bert_fusions_*/bert.kernl | head -1)" ;;
    gen) timeout 900 python3 .bench/kernl_gen_vs_peers.py 1 4 8 ;;
    bert) OUT=$RUN timeout 600 python3 benchmarks/bench_bert_fusions.py ;;
    decode) OUT=$RUN timeout 300 python3 benchmarks/bench_decode_kernels.py ;;
    sweep) OUT=$RUN timeout 360 python3 benchmarks/sweep_decode_configs.py ;;
    seq2seq) OUT=$RUN timeout 600 python3 benchmarks/bench_seq2seq.py ;;
    whisper | t5)
      KERNL_STATIC_BUDGET_S=900 timeout 900 python3 benchmarks/bench_seq2seq.py "$RUN/$1" \
        --models "$1"
      cp "$RUN/$1/seq2seq.json" "$RUN/seq2seq-$1.json" ;;
    serving) OUT=$RUN timeout 540 python3 benchmarks/bench_serving_direct.py ;;
    profllama) timeout 300 python3 .bench/profile_llama.py ;;
    profdecode) timeout 300 python3 benchmarks/profile_decode_variants.py ;;
    profwenc) timeout 300 python3 benchmarks/profile_whisper_encoder.py 1 8 ;;
    s2stests) timeout 600 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=15 \
      tests/seq2seq tests/optimize tests/runtime tests/kernels/test_norm_linear.py \
      tests/kernels/test_skinny_linear_fused.py ;;
    gpuquick) timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=20 \
      tests/kernels tests/runtime tests/generation/test_decode_kernels.py ;;
    persist) timeout 480 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=15 -x \
      tests/kernels/test_decode_step.py \
      "tests/generation/test_gpu_generation.py::test_triton_decode_kernels_run_from_binaries_and_match_torch[persistent]" \
      tests/kernels/test_pdl.py tests/kernels/test_decode_attention.py tests/kernels/test_lm_head_argmax.py ;;
    buckets) timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5 \
      tests/generation/test_gpu_generation.py tests/kernels/test_decode_step.py \
      -k "persistent_buckets or dtype17" ;;
    step) OUT=$RUN timeout 600 python3 benchmarks/bench_decode_step.py ;;
    stepnew) STEP_CONFIGS=1,8,17,18,19 STEP_NO_DIAGNOSTIC=1 OUT=$RUN timeout 300 \
      python3 benchmarks/bench_decode_step.py ;;
    stepx) STEP_EXPLORE=0 OUT=$RUN timeout 300 python3 benchmarks/bench_decode_step.py ;;
    stream) OUT=$RUN timeout 480 python3 benchmarks/bench_stream_linear.py ;;
    streamgluon) OUT=$RUN timeout 300 python3 benchmarks/bench_stream_gluon.py ;;
    ring) OUT=$RUN timeout 300 python3 benchmarks/bench_weight_ring.py ;;
    split) OUT=$RUN timeout 400 python3 benchmarks/bench_split_batch.py ;;
    streamsweep) STREAM_PART=sweep OUT=$RUN timeout 480 python3 benchmarks/bench_stream_linear.py ;;
    compileab) # the BERT-base compile of `bert` (9 buckets) with 16 threads compiling the
      # candidates ahead (kernl/compiler/compile_ahead.py), then serially (second: whatever a
      # first run leaves warm favours the serial one), each from empty tuning and Triton
      # caches; the compile time is in the log, and the choices per bucket
      for threads in 16 0; do
        mkdir -p "$RUN/threads$threads"
        KERNL_COMPILE_THREADS=$threads TRITON_CACHE_DIR=$(mktemp -d) OUT=$RUN/threads$threads \
          timeout 400 python3 benchmarks/bench_bert_fusions.py --shapes 1x16 --no-peers
        cp "$RUN/threads$threads/bench_bert_fusions.json" "$RUN/compile-threads$threads.json"
      done ;;
    lft) # fresh-process load -> first token; .old (a `git archive` of an earlier kernl/), if
      # carried in the snapshot, is timed in the same run
      timeout 480 python3 benchmarks/bench_load_first_token.py "$RUN/lft" --runs 5 \
        $([ -d .old ] && echo --checkout .old) ;;
    profserve) # yappi travels as a wheel in .whl (benchmarks/README.md)
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/yappi-*.whl &&
        PYTHONPATH=$PWD:/tmp/site timeout 300 python3 benchmarks/profile_serving_path.py \
          --switch-intervals 1,0.2 ;;
    lintma) OUT=$RUN timeout 420 python3 benchmarks/bench_linear_tma.py ;;
    servegen) timeout 540 python3 benchmarks/bench_serving_gen_e2e.py "$RUN/servegen" &&
      cp "$RUN/servegen/"*.json "$RUN/servegen/"*.log "$RUN/" ;;
    servebert) timeout 540 python3 benchmarks/bench_serving_e2e.py "$RUN/servebert" \
      --servers haproxy:1,haproxy:2 && cp "$RUN/servebert/"* "$RUN/" ;;
    ltalgos) OUT=$RUN timeout 300 python3 benchmarks/bench_cublaslt_algos.py ;;
    tmatests) timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=10 \
      tests/kernels/test_linear_tma.py tests/kernels/test_fused_linear.py \
      tests/kernels/test_pdl.py tests/runtime/test_missing_binary.py ;;
    *) echo "unknown stage $1" ;;
  esac
}

collect() {
  mkdir -p "${OUT:-/tmp/kernl-out}"
  cp "$RUN"/*.log "$RUN"/*.json "${OUT:-/tmp/kernl-out}/" 2>/dev/null
  for f in "$RUN"/*.log; do
    [ -e "$f" ] || continue
    echo "=== $(basename "$f") (last lines)"
    tail -n 25 "$f"
  done
}

wait_for_job() {
  # WAIT counts from the script's start ($SECONDS), the tree's copy and the first import of
  # torch included: a `start` with WAIT=470, counted from the first sleep, ran past the device
  # tool's 560 s and came back with no output (2026-12-03, cause not found; use WAIT=420)
  while [ ! -e "$RUN/all.done" ] && [ "$SECONDS" -lt "$WAIT" ]; do
    sleep 5
  done
  collect
  if [ -e "$RUN/all.done" ]; then echo "all stages done"; else echo "still running"; fi
}

case "${1:-}" in
  start)
    shift
    rm -rf "$RUN" && mkdir -p "$RUN"
    {
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
      date -u
    } >"$RUN/device.log" 2>&1
    # The stages run from a copy of this tree: the device tool re-sends the working tree (and
    # the carried paths) at each call, so a later `wait` call could swap files under a stage
    # that is running (a stage once found its script missing).
    rm -rf "$RUN/tree" && mkdir -p "$RUN/tree" && cp -r . "$RUN/tree/"
    (cd "$RUN/tree" && setsid nohup bash benchmarks/device_run.sh stages "$@" \
      >>"$RUN/stages.log" 2>&1 </dev/null &)
    wait_for_job
    ;;
  stages)
    shift
    gpu=0 chain=() pids=()
    run_chain() {
      for s in "$@"; do
        echo "$(date -u +%T) gpu $gpu stage $s"
        CUDA_VISIBLE_DEVICES=$gpu stage "$s" >"$RUN/$s.log" 2>&1
        echo "$(date -u +%T) gpu $gpu stage $s rc=$?"
      done
    }
    for s in "$@" --; do
      if [ "$s" = "--" ]; then
        if [ ${#chain[@]} -gt 0 ]; then
          run_chain "${chain[@]}" &
          pids+=($!)
          gpu=$((gpu + 1))
        fi
        chain=()
      else
        chain+=("$s")
      fi
    done
    wait "${pids[@]}"
    touch "$RUN/all.done"
    ;;
  wait) wait_for_job ;;
  *)
    echo "usage: bash benchmarks/device_run.sh start STAGE... | wait" >&2
    exit 2
    ;;
esac
