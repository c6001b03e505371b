"""Greedy generation of every supported family (Gemma also at its head_dim of 256; Gemma2 with
softcaps, sandwich norms and sliding layers whose window covers the cache, and again with a
window of 8; Gemma3's text decoder with a window of 8 and a rotary table per layer type;
Mistral with a window of 8, shorter than the prompts and the cache) matches
Hugging Face eager `generate` token for token: a batch of mixed prompt lengths, 64 new tokens,
then again with an EOS id that one row emits midway (each row stops on its own, finished rows
are padded)."""

from __future__ import annotations

import pytest
import torch

import kernl.compiler
import kernl.runtime
from kernl.compiler.tasks.causal_lm.validate import softcapped_attention

from .tiny_models import mixed_prompts, teacher_forced, tiny_model

BUCKETS = "batch=1,4 prompt=8,16 cache=48,96"
# The teacher-forced step tests' buckets: their 40 steps after prompts of 16 end at slot 55,
# past the smaller cache. The compile's check streams every step of the smallest prompt up to
# the largest cache, each one a few interpreted kernels per layer where the decode attention is
# Triton's: this cache of 64 instead of 96 is a third fewer of them.
STEP_BUCKETS = "batch=1,4 prompt=8,16 cache=32,64"
NEW = 64


FAMILIES = [
    "llama3",
    "mistral",
    "mistral_window",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma",
    "gemma_head256",
    "gemma2",
    "gemma2_window",
    "gemma3",
    "gpt2",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_ids_match_eager_generate(family, tmp_path):
    hf = tiny_model(family)
    report = kernl.compiler.compile(
        hf, BUCKETS, tmp_path / "lm.kernl", dtype="fp32", device="cpu", task="causal-lm"
    )
    assert "decode" in report.table()
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    ids, mask = mixed_prompts(3, [11, 4, 16])

    def hf_generate(**kw):
        with torch.no_grad(), softcapped_attention(hf):  # Gemma2 under transformers 5.17
            return hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=NEW,
                do_sample=False,
                pad_token_id=0,
                **kw,
            )

    ref = hf_generate()
    out = model.generate(ids, mask, max_new_tokens=NEW, pad_token_id=0, eos_token_id=[])
    assert out.shape == ref.shape == (3, 16 + NEW)
    assert torch.equal(out, ref), _first_difference(out, ref)

    # An id some row produces a few steps in, unseen before in that row: rows now finish at
    # different steps (or never), and the output stops when the last one finishes.
    r, step, eos = next(
        (r, i, t)
        for r in range(3)
        for i, t in enumerate(ref[r, 16:].tolist())
        if i >= 3 and t not in ref[r, 16 : 16 + i].tolist()
    )
    ref = hf_generate(eos_token_id=eos)
    out = model.generate(ids, mask, max_new_tokens=NEW, pad_token_id=0, eos_token_id=eos)
    assert torch.equal(out, ref), _first_difference(out, ref)
    assert out[r, 16 + step] == eos and (out[r, 16 + step + 1 :] == 0).all()


@pytest.mark.parametrize("family", ["llama3", "qwen3", "phi3", "gemma3"])
def test_the_torch_step_rotates_elementwise_where_the_matrices_would_not_fit(
    family, tmp_path, monkeypatch
):
    """The torch decode step rotates with a [D, D] matrix per position only while a table of
    them fits ROPE_MATRIX_BYTES (Gemma3's two at 32k positions and head_dim 256 were 8 GiB);
    beyond it, elementwise over the cos and sin tables, as Hugging Face does: greedy ids still
    equal eager's (Qwen3's normed q and k, Gemma3's two tables), and the plan leaves the
    matrices out."""
    import kernl.artifacts.generation as generation
    from kernl.artifacts.reader import check_artifact

    hf = tiny_model(family)
    path = tmp_path / "lm.kernl"
    kernl.compiler.compile(hf, BUCKETS, path, dtype="fp32", device="cpu", task="causal-lm")
    with_matrices = check_artifact(path, hash_files=False).memory.static_buffers
    # the runtime's choice and the plan read one rule (generation.rope_matrices_fit)
    monkeypatch.setattr(generation, "ROPE_MATRIX_BYTES", 0)
    model = kernl.runtime.load(path)
    assert model.decoder.kernels.rope == "torch" and model.decoder.rope is None
    ids, mask = mixed_prompts(3, [11, 4, 16])
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
    out = model.generate(ids, mask, max_new_tokens=NEW, pad_token_id=0, eos_token_id=[])
    assert torch.equal(out, ref), _first_difference(out, ref)
    spec = model.decoder.spec
    tables = 2 if spec.rope_local_layers else 1
    matrices = tables * 96 * spec.head_dim**2 * 4  # the cache's positions, float32
    assert check_artifact(path, hash_files=False).memory.static_buffers == with_matrices - matrices


def _first_difference(out: torch.Tensor, ref: torch.Tensor) -> str:
    if out.shape != ref.shape:
        return f"shapes differ: kernl {tuple(out.shape)}, eager {tuple(ref.shape)}"
    r, c = (out != ref).nonzero()[0].tolist()
    return f"first difference at row {r}, position {c}: kernl {out[r, c]}, eager {ref[r, c]}"


@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_gemma2_step_logits_match_eager_forward(tmp_path, attention):
    """Greedy ids cannot see Gemma2's final softcap (tanh is monotonic): each streamed step's
    logits (the prefill's, then every decode step's) against Hugging Face's forward over the
    same ids, teacher-forced. The tiny model's cap (0.5) bends its logits (up to ~0.7
    uncapped), so logits left uncapped, or capped at another value, differ by far more than
    float32 rounding; its attention cap (5) bends its scores, on torch and on kernl's decode
    attention kernel (Triton's interpreter here)."""
    from kernl.compiler.tasks.causal_lm import compile_causal_lm

    hf = tiny_model("gemma2")
    compile_causal_lm(
        hf,
        STEP_BUCKETS,
        tmp_path / "lm.kernl",
        dtype="fp32",
        device="cpu",
        decode_kernels={"attention": attention},
    )
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    assert model.decoder.kernels.attention == attention
    ours_ids, ours, ref = _teacher_forced(model, hf)  # ours, ref: [rows, steps, vocab]
    assert torch.equal(ours_ids, ref.argmax(-1))
    err = (ours - ref).abs().max().item()
    assert err < 1e-5, err


def test_gemma2_prefill_attention_in_blocks_of_queries_matches_eager(tmp_path, monkeypatch):
    """Gemma2's prefill attention (eager, for its softcap) goes through its queries in blocks
    whose float32 scores fit a budget (16 GiB in one piece at 8 rows, 8 heads and 8192
    tokens). Here the budget holds one query a block; with the window of 8 (shorter than the
    prompts) on two layers of three, each block's mask rows are its own queries'."""
    from kernl.runtime.generation import decoder

    blocks = []  # queries in each block of scores the prefills softcapped
    softcap = decoder._softcap

    def counted(x, cap):
        if x.dim() == 4:  # [B, heads, queries, keys]: the attention's (the logits' are 2-d)
            blocks.append(x.shape[2])
        return softcap(x, cap)

    monkeypatch.setattr(decoder, "PREFILL_SCORE_BYTES", 1)
    monkeypatch.setattr(decoder, "_softcap", counted)
    hf = tiny_model("gemma2_window")
    kernl.compiler.compile(
        hf, BUCKETS, tmp_path / "lm.kernl", dtype="fp32", device="cpu", task="causal-lm"
    )
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    ours_ids, ours, ref = _teacher_forced(model, hf)
    assert blocks and set(blocks) == {1}  # the prefills ran here, one query a block
    assert torch.equal(ours_ids, ref.argmax(-1))
    err = (ours - ref).abs().max().item()
    assert err < 1e-5, err


def test_softcapped_attention_blocks_equal_one_piece():
    from kernl.runtime.generation.decoder import _softcapped_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 16, generator=g) for _ in range(3))
    mask = (torch.rand(2, 1, 37, 37, generator=g) > 0.3) | torch.eye(37, dtype=torch.bool)
    whole = _softcapped_attention(q, k, v, mask, 0.25, 5.0, budget=1 << 30)
    for budget in (1, 2 * 4 * 37 * 4 * 5):  # one query a block; five, the last one short
        torch.testing.assert_close(
            _softcapped_attention(q, k, v, mask, 0.25, 5.0, budget=budget), whole, rtol=0, atol=1e-6
        )
    scores = torch.tanh(q.double() @ k.double().transpose(-1, -2) * 0.25 / 5.0) * 5.0
    exact = torch.softmax(scores.masked_fill(~mask, -torch.inf), -1) @ v.double()
    torch.testing.assert_close(whole.double(), exact, rtol=0, atol=1e-5)


# Both rotary paths on torch attention, and Triton's decode attention with the rotary kernel
# (Triton's attention reads the cache either path writes alike; the fourth pair took 4 of CI's
# minutes in the interpreter)
@pytest.mark.parametrize(
    "attention, rope", [("torch", "torch"), ("torch", "triton"), ("triton", "triton")]
)
def test_gemma3_step_logits_match_eager_forward(tmp_path, attention, rope):
    """Gemma3's text decoder, each streamed step's logits (the prefill's, then every decode
    step's, 40 of them: past its window of 8 and past the prompts) against Hugging Face's
    forward over the same ids, teacher-forced, on both decode attentions and both rotary paths
    (the torch step's per-position matrices, kernels/rotary.py on the normed q and k). Its
    sliding-window layers rotate with theta 1e4, its full-attention layers with theta 1e6 and
    linear scaling by 8: at position p the two tables' angles differ by up to p radians in
    their first pair (1 against 1/8 per position), so a step that rotated either kind of layer
    with the other's table is off by far more than this float32 tolerance (the greedy-ids test
    of the same model would go wrong within a few tokens; test_gemma3_one_rope_table_for_all
    shows it on the logits)."""
    from kernl.compiler.tasks.causal_lm import compile_causal_lm

    hf = tiny_model("gemma3")
    compile_causal_lm(
        hf,
        STEP_BUCKETS,
        tmp_path / "lm.kernl",
        dtype="fp32",
        device="cpu",
        decode_kernels={"attention": attention, "rope": rope},
    )
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    assert (model.decoder.kernels.attention, model.decoder.kernels.rope) == (attention, rope)
    ours_ids, ours, ref = _teacher_forced(model, hf)
    assert torch.equal(ours_ids, ref.argmax(-1))
    err = (ours - ref).abs().max().item()
    assert err < 1e-5, err


def test_gemma3_one_rope_table_for_all_would_be_caught(tmp_path):
    """The premise of the test above: the two tables differ, and kernl's decoder rotating every
    layer with one of them (as a runtime that read a single table would) is far off Hugging
    Face's logits, well past that test's tolerance, at prefill and at decode."""
    hf = tiny_model("gemma3")
    rotary = hf.model.rotary_emb
    assert not torch.allclose(rotary.sliding_attention_inv_freq, rotary.full_attention_inv_freq)
    kernl.compiler.compile(
        hf, BUCKETS, tmp_path / "lm.kernl", dtype="fp32", device="cpu", task="causal-lm"
    )
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    d = model.decoder
    assert d.spec.rope_local_layers == [0, 1, 3, 4] and d.two_rope_tables
    for table in (False, True):  # the full layers' table on every layer, then the local one
        d.rotates_local = [table] * d.spec.num_layers
        _, ours, ref = _teacher_forced(model, hf)
        assert (ours[:, 0] - ref[:, 0]).abs().max().item() > 1e-2  # the prefill's
        assert (ours[:, 1:] - ref[:, 1:]).abs().max().item() > 1e-2  # the steps'


def test_gemma3_compiles_in_bf16_with_both_rope_tables_in_float32(tmp_path):
    """Real Gemma3 checkpoints are bf16: both rotary frequency tables stay float32 in the
    artifact, as its reader requires (the local one was once cast to bf16, and every bf16
    Gemma3 compile failed its own read-back check, review); the bf16 decoder then streams."""
    from kernl.compiler.tasks.causal_lm.describe import describe

    hf = tiny_model("gemma3").to(torch.bfloat16)
    _, weights = describe(hf, 96, torch.bfloat16)
    rotary = hf.model.rotary_emb
    for name, freq in (
        ("rope.inv_freq", rotary.full_attention_inv_freq),
        ("rope.local_inv_freq", rotary.sliding_attention_inv_freq),
    ):
        assert weights[name].dtype == torch.float32, name
        assert torch.equal(weights[name], freq.float()), name
    kernl.compiler.compile(
        hf, BUCKETS, tmp_path / "lm.kernl", dtype="bf16", device="cpu", task="causal-lm"
    )
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    ids, mask = mixed_prompts(3, [11, 4, 16])
    out = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    assert out.shape == (3, 24)


def _teacher_forced(model, hf):
    return teacher_forced(model, hf, [11, 4, 16], 40)


def test_gemma2_under_sdpa_is_validated_against_its_softcapped_eager_attention(tmp_path):
    """transformers 5.17 runs Gemma2 through SDPA by default, which drops the attention softcap
    its checkpoints were trained with (later versions refuse SDPA for Gemma2). kernl keeps the
    softcap, so the compile's check must read eager attention, not the model's own: before,
    every Gemma2 compile failed its validation there. The model's setting is left as found."""
    from kernl.compiler.tasks.causal_lm.validate import drops_attention_softcap, reference_logits

    hf = tiny_model("gemma2")
    hf.config._attn_implementation = "sdpa"  # what transformers 5.17 picks for Gemma2
    assert drops_attention_softcap(hf)
    ids, mask = mixed_prompts(3, [11, 4, 16])
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    eager = reference_logits(hf, ids, mask.bool(), list(range(16)))
    assert hf.config._attn_implementation == "sdpa"
    try:  # the premise: SDPA drops the softcap (5.17) or refuses it (later versions)
        with torch.no_grad():
            sdpa = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        assert (sdpa[mask.bool()] - eager[mask.bool()]).abs().max() > 1e-2
    except ValueError as e:
        assert "softcap" in str(e)

    lines = []
    kernl.compiler.compile(
        hf,
        BUCKETS,
        tmp_path / "lm.kernl",
        dtype="fp32",
        device="cpu",
        task="causal-lm",
        progress=lines.append,
    )
    assert hf.config._attn_implementation == "sdpa"
    assert any("the reference is its eager attention" in line for line in lines), lines
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    out = model.generate(ids, mask, max_new_tokens=NEW, pad_token_id=0, eos_token_id=[])
    with torch.no_grad(), softcapped_attention(hf):
        ref = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
    assert hf.config._attn_implementation == "sdpa"
    assert torch.equal(out, ref), _first_difference(out, ref)


def test_a_rope_type_kernl_does_not_reproduce_is_refused_for_its_reason():
    """Every unknown type was refused for frequencies that change with the sequence length,
    false of transformers' fixed "proportional" tables."""
    import types

    from kernl.compiler.tasks.causal_lm.describe import _rotary_tables
    from kernl.compiler.trace import UnsupportedModelError

    rotary = types.SimpleNamespace(rope_type="proportional")
    cfg = types.SimpleNamespace(model_type="llama")
    with pytest.raises(UnsupportedModelError, match="rope type 'proportional'.*does not reproduce"):
        _rotary_tables(rotary, cfg, 2, 64)


@pytest.mark.parametrize("family", ["llama_dynamic", "phi3_longrope"])
def test_a_rope_that_changes_past_a_length_is_taken_for_caches_within_it(family, tmp_path):
    """Dynamic NTK and LongRoPE (Phi-3-mini-128k, Phi-3.5-mini) were refused outright; they
    keep their original table until a sequence passes a length (48 here), so a cache within
    it generates as Hugging Face does, and one past it is refused naming the limit."""
    from kernl.compiler.trace import UnsupportedModelError

    if family == "llama_dynamic":  # a longer call grows the table, and HF keeps it a while
        grown = tiny_model(family)
        with torch.no_grad():
            grown(torch.ones(1, 60, dtype=torch.int64))
        with pytest.raises(UnsupportedModelError, match="grew in an earlier call longer than"):
            kernl.compiler.compile(
                grown, "batch=4 prompt=16 cache=48", tmp_path / "grown.kernl", dtype="fp32",
                device="cpu", task="causal-lm",
            )  # fmt: skip
    hf = tiny_model(family)
    if family == "phi3_longrope":  # its buffer holds the long table after a long call, and
        with torch.no_grad():  # HF picks the short one again for every shorter call
            hf(torch.ones(1, 60, dtype=torch.int64))
    kernl.compiler.compile(
        hf, "batch=4 prompt=16 cache=48", tmp_path / "lm.kernl", dtype="fp32", device="cpu",
        task="causal-lm",
    )  # fmt: skip
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    ids, mask = mixed_prompts(3, [11, 4, 16])
    out = model.generate(ids, mask, max_new_tokens=32, pad_token_id=0, eos_token_id=[])
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0
        )
    assert torch.equal(out, ref), _first_difference(out, ref)
    with pytest.raises(UnsupportedModelError, match="kernl takes it with caches of at most 48"):
        kernl.compiler.compile(
            hf, "batch=4 prompt=16 cache=64", tmp_path / "long.kernl", dtype="fp32",
            device="cpu", task="causal-lm",
        )  # fmt: skip
