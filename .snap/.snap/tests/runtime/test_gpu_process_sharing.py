"""On a GPU, one process with many users: two artifacts (same and different GPUs), the
compiler and plain Triton code next to a loaded model, and kernl graphs next to
torch.compile's CUDA-graph trees (Hugging Face's static-cache generate)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import kernl.compiler
import kernl.runtime


def _bert(seed: int):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.BertConfig(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024
    )
    return T.BertModel(cfg).eval()


def _check(model, compiled, ids, device) -> None:
    with torch.no_grad():
        want = model(input_ids=ids.to(device)).last_hidden_state.float()
    got = compiled(input_ids=ids).last_hidden_state.float()
    assert (got - want).abs().max().item() < 3e-2


@pytest.mark.gpu
def test_two_artifacts_the_compiler_and_plain_triton_share_a_process(tmp_path):
    from kernl.kernels.norm import layer_norm, layer_norm_reference

    devices = ["cuda:0", "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"]
    eager, loaded = [], []
    for i, device in enumerate(devices):
        model = _bert(i)
        # tune=False: every kernl op on its Triton kernel, so both artifacts hold binaries,
        # many under the same launch keys (same shapes, same default configs).
        kernl.compiler.compile(
            model, "batch=2 seq=64", tmp_path / f"m{i}", dtype="fp16", device="cuda", tune=False
        )
        loaded.append(kernl.runtime.load(tmp_path / f"m{i}", device=device, capture="never"))
        eager.append(model.half().to(device))
    assert all(m.manifest.kernels for m in loaded)
    ids = torch.randint(1000, 30000, (2, 50))
    for attempt in range(2):
        for model, compiled, device in zip(eager, loaded, devices):
            _check(model, compiled, ids, device)
        # Plain Triton after a load: kernl's own kernel through the JIT, at a shape no
        # artifact has a binary for.
        x = torch.randn(7, 300, device="cuda", dtype=torch.float16)
        w, b = torch.randn(300, device="cuda"), torch.randn(300, device="cuda")
        got = layer_norm(x, w.half(), b.half(), 1e-5).float()
        want = layer_norm_reference(x.double(), w.double(), b.double(), 1e-5)
        assert (got - want).abs().max().item() < 1e-2
        # The compiler next to loaded models: compiles (JIT) and records binaries.
        kernl.compiler.compile(
            _bert(5),
            "batch=1 seq=16",
            tmp_path / f"again{attempt}",
            dtype="fp16",
            device="cuda",
            tune=False,
        )
    graphed = kernl.runtime.load(tmp_path / "m0", device="cuda:0")
    _check(eager[0], graphed, ids, "cuda:0")


HF_STATIC_THEN_KERNL = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    import kernl.compiler, kernl.runtime
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval().cuda()
    kernl.compiler.compile(hf, "batch=1 prompt=128 cache=512,2048", sys.argv[1], dtype="bf16",
                           device="cuda", task="causal-lm", kernels=False)
    km = kernl.runtime.load(sys.argv[1])
    p = torch.randint(0, 128000, (1, 128), device="cuda")
    a = km.generate(p, max_new_tokens=64, eos_token_id=[]).clone()
    torch.cuda.synchronize()
    hf.generation_config.cache_implementation = "static"
    kw = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, eos_token_id=None,
              pad_token_id=0)
    with torch.inference_mode():
        for _ in range(2):
            hf.generate(p, **kw)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # hand every freed block back: a dangling graph now faults
    b = km.generate(p, max_new_tokens=64, eos_token_id=[])
    torch.cuda.synchronize()
    print(json.dumps({"same_ids": bool((a == b).all())}))
    """
)


@pytest.mark.gpu
@pytest.mark.slow
def test_kernl_generates_after_hugging_face_static_cache_generate(tmp_path):
    """torch.compile's CUDA-graph trees clear cuBLAS's workspaces around each recording; kernl
    graphs that captured the cached workspace then replayed into freed memory ("illegal memory
    access", Llama-1B shape, two runs out of two). A fresh process: a fault poisons it."""
    run = subprocess.run(
        [sys.executable, "-c", HF_STATIC_THEN_KERNL, str(tmp_path / "lm.kernl")],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"same_ids": True}


@pytest.mark.gpu
def test_graph_scratch_is_not_memory_anyone_else_owns(tmp_path):
    """After cuBLAS's cached workspaces are dropped (as torch.compile's graph trees do) and
    their memory handed to new tensors, replays must neither write into those tensors nor
    change their own results."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
    )
    hf = T.LlamaForCausalLM(cfg).eval().to("cuda", torch.bfloat16)
    kernl.compiler.compile(
        hf,
        "batch=1,4 prompt=32 cache=128",
        tmp_path / "lm",
        dtype="bf16",
        device="cuda",
        task="causal-lm",
        kernels=False,
    )
    model = kernl.runtime.load(tmp_path / "lm")
    ids = torch.randint(0, 4096, (4, 32), device="cuda")
    before = model.generate(ids, max_new_tokens=32, eos_token_id=[]).clone()
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()
    # Take the freed blocks: the allocator hands the same addresses out again.
    sentinels = [torch.full((1 << 23,), 7.0, device="cuda") for _ in range(16)]
    after = model.generate(ids, max_new_tokens=32, eos_token_id=[])
    torch.cuda.synchronize()
    assert torch.equal(before, after)
    assert all(bool((s == 7.0).all()) for s in sentinels)
