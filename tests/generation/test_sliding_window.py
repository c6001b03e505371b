"""Sliding-window attention with a window (8) shorter than the prompts and the KV cache: Mistral
(every layer), Qwen2 under max_window_layers (a full layer, then a windowed one) and Gemma2
(every other layer, with its softcaps). Greedy ids equal Hugging Face eager `generate` for
left-padded prompts of mixed lengths and generations well past the window, on the torch, SDPA
and Triton (interpreter) decode attention and, where every layer has the window, the
persistent step; each step's logits equal Hugging Face's teacher-forced forward; a joining row
keeps its own window. Hugging Face's window (masking_utils.sliding_window_overlay): the query
at index i sees key j where j <= i and j > i - window, i.e. i - j < window."""

from __future__ import annotations

import re

import pytest
import torch

import kernl.compiler
import kernl.runtime
from kernl.artifacts.generation import DecodeKernels
from kernl.compiler.tasks.causal_lm.describe import describe

from .test_open_batch import alone, prompt, run
from .tiny_models import mixed_prompts, teacher_forced, tiny_model

WINDOW = 8
BUCKETS = "batch=1,4 prompt=8,16 cache=24,40"
NEW = 24  # past the window and across both kv buckets: 16 + 24 = 40 slots
LENGTHS = [11, 4, 16]  # two prompts longer than the window: the prefill's band matters
FAMILIES = ["mistral_window", "qwen2_window", "gemma2_window"]


@pytest.fixture(scope="module", params=FAMILIES)
def compiled(request, tmp_path_factory):
    """(family, the Hugging Face model, the artifact, Hugging Face's greedy ids)."""
    hf = tiny_model(request.param)
    out = tmp_path_factory.mktemp(request.param) / "lm.kernl"
    kernl.compiler.compile(hf, BUCKETS, out, dtype="fp32", device="cpu", task="causal-lm")
    ids, mask = mixed_prompts(3, LENGTHS)
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
    return request.param, hf, out, ref


def _first_difference(out: torch.Tensor, ref: torch.Tensor) -> str:
    r, c = (out != ref).nonzero()[0].tolist()
    return f"first difference at row {r}, position {c}: kernl {out[r, c]}, eager {ref[r, c]}"


@pytest.mark.parametrize("attention", ["torch", "sdpa", "triton"])
def test_greedy_ids_match_eager_generate_past_the_window(compiled, attention):
    family, _, path, ref = compiled
    model = kernl.runtime.load(path)
    assert model.decoder.window == WINDOW
    model.decoder.kernels = DecodeKernels(attention=attention)
    ids, mask = mixed_prompts(3, LENGTHS)
    out = model.generate(ids, mask, max_new_tokens=NEW, pad_token_id=0, eos_token_id=[])
    assert out.shape == ref.shape == (3, 16 + NEW)
    assert torch.equal(out, ref), _first_difference(out, ref)


def test_without_the_window_the_ids_differ(compiled):
    """The test above can fail: the same artifact with its window dropped (every layer sees
    the whole cache) generates other ids."""
    _, _, path, ref = compiled
    model = kernl.runtime.load(path)
    model.decoder.window = None
    model.decoder.windowed = [False] * len(model.decoder.windowed)
    ids, mask = mixed_prompts(3, LENGTHS)
    out = model.generate(ids, mask, max_new_tokens=NEW, pad_token_id=0, eos_token_id=[])
    assert not torch.equal(out, ref)


def test_step_logits_match_eager_forward(compiled):
    """Each streamed step's logits (the prefill's, then every decode step's) against Hugging
    Face's forward over the same ids, teacher-forced with its own left-padding mask."""
    _, hf, path, _ = compiled
    model = kernl.runtime.load(path)
    ours_ids, ours, ref = teacher_forced(model, hf, LENGTHS, NEW)  # [rows, steps, vocab]
    assert torch.equal(ours_ids, ref.argmax(-1))
    err = (ours - ref).abs().max().item()
    assert err < 1e-5, err


def test_the_description_names_the_window_and_its_layers():
    """Mistral windows every layer, Qwen2 the layers from max_window_layers on, Gemma2 the
    sliding_attention layers of layer_types; Qwen2 without use_sliding_window has none."""
    expected = {
        "mistral_window": (WINDOW, [0, 1]),
        "qwen2_window": (WINDOW, [1]),
        "gemma2_window": (WINDOW, [0, 2]),
        "mistral": (4096, [0, 1]),
        "qwen2": (None, []),
        "llama3": (None, []),
    }
    for family, (window, layers) in expected.items():
        spec, _ = describe(tiny_model(family), 40, torch.float32)
        assert (spec.sliding_window, spec.sliding_layers) == (window, layers), family
    phi3 = tiny_model("phi3")  # Phi-3-mini-4k's config sets a window (2047): every layer
    phi3.config.sliding_window = WINDOW
    spec, _ = describe(phi3, 40, torch.float32)
    assert (spec.sliding_window, spec.sliding_layers) == (WINDOW, [0, 1])
    qwen3 = tiny_model("qwen3")  # as use_sliding_window with max_window_layers=1 sets it
    qwen3.config.sliding_window = WINDOW
    qwen3.config.layer_types = ["full_attention", "sliding_attention"]
    spec, _ = describe(qwen3, 40, torch.float32)
    assert (spec.sliding_window, spec.sliding_layers) == (WINDOW, [1])


def test_a_window_no_shorter_than_the_cache_makes_no_mask(tmp_path):
    """Mistral-7B's window (4096) over a 32-slot cache masks nothing: the step makes no mask
    for it, and the persistent step still serves it."""
    kernl.compiler.compile(
        tiny_model("mistral"), "batch=1 prompt=8 cache=32", tmp_path / "lm.kernl",
        dtype="fp32", device="cpu", task="causal-lm",
    )  # fmt: skip
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    assert model.spec.sliding_window == 4096
    assert model.decoder.window is None and model.decoder.persistent_fits


def test_the_persistent_step_reads_the_window_where_every_layer_has_it(tmp_path):
    """Mistral's layers all have the window: the persistent step takes the windowed slot mask
    and generates Hugging Face's ids."""
    hf = tiny_model("mistral_window")
    kernl.compiler.compile(
        hf, "batch=4 prompt=16 cache=24", tmp_path / "lm.kernl", dtype="fp32", device="cpu",
        task="causal-lm",
    )  # fmt: skip
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    assert model.decoder.persistent_fits
    model.decoder.kernels = DecodeKernels(step="persistent")
    ids, mask = mixed_prompts(3, LENGTHS)
    new = 8
    out = model.generate(ids, mask, max_new_tokens=new, pad_token_id=0, eos_token_id=[])
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0
        )
    assert model.decoder._step_weights is not None  # the step ran persistent
    assert torch.equal(out, ref), _first_difference(out, ref)


def test_a_persistent_step_over_windowed_and_full_layers_is_refused_by_name(tmp_path):
    """Qwen2's full layer and windowed layer need two slot masks; the persistent step reads
    one: forced, the compile says so and writes nothing. The compiler never times it."""
    from kernl.compiler.tasks.causal_lm import compile_causal_lm

    with pytest.raises(ValueError, match=re.escape("step='persistent' (it reads one slot mask")):
        compile_causal_lm(
            tiny_model("qwen2_window"), "batch=1 prompt=8 cache=24", tmp_path / "a",
            dtype="fp32", device="cpu", decode_kernels={"step": "persistent"},
        )  # fmt: skip
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("family,persistent", [("qwen2_window", False), ("mistral_window", True)])
def test_the_compiler_times_the_persistent_step_only_where_one_mask_serves(
    tmp_path, family, persistent
):
    """The compiler's search times (and may choose) the persistent step for a windowed
    Mistral, never for Qwen2's mix of windowed and full layers."""
    from kernl.compiler.tasks.causal_lm.decode_kernels import choose_decode_kernels

    kernl.compiler.compile(
        tiny_model(family), "batch=1 prompt=8 cache=24", tmp_path / "lm.kernl", dtype="fp32",
        device="cpu", task="causal-lm",
    )  # fmt: skip
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    timed = []

    def fake_ms(gen):
        timed.append(gen.decoder.kernels.step)
        return [0.5 if gen.decoder.kernels.step == "persistent" else 1.0]  # it would win

    chosen, _ = choose_decode_kernels(model, lambda _msg: None, step_ms=fake_ms)
    assert ("persistent" in timed) is persistent
    assert (chosen.step == "persistent") is persistent


def test_a_joining_row_keeps_its_own_window(tmp_path):
    """A request that joins a running batch sits at other cache slots than alone: its window
    follows its own tokens, so its ids are those of its prompt alone (and Hugging Face's)."""
    hf = tiny_model("mistral_window")
    path = tmp_path / "lm.kernl"
    kernl.compiler.compile(
        hf, "batch=1,4 prompt=8,16 cache=48", path, dtype="fp32", device="cpu", task="causal-lm"
    )
    model = kernl.runtime.load(path)
    a, b, c = prompt(5, 1), prompt(7, 2), prompt(12, 3)
    with model.open_batch([a], max_new_tokens=30, eos_token_id=[], rows=4) as batch:
        got = run(batch, {3: (b, 20, {}), 9: (c, 20, {})})
    assert got[("open", 0)] == alone(model, a, 30)
    assert got[("join", 3)] == alone(model, b, 20)
    assert got[("join", 9)] == alone(model, c, 20)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor([c]), max_new_tokens=20, do_sample=False)
    assert got[("join", 9)] == ref[0, len(c) :].tolist()
