"""The generation API on one compiled tiny Llama-3 artifact: sampling, streaming, padding on
either side, errors that leave the model usable, artifact checks, a fresh process that never
imports transformers, and the bucket syntax."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import kernl.compiler
import kernl.runtime
from kernl.compiler.buckets import BucketSyntaxError
from kernl.compiler.tasks.causal_lm.buckets import parse_generation_buckets
from kernl.compiler.tasks.causal_lm.describe import describe
from kernl.compiler.trace import UnsupportedModelError

from .tiny_models import VOCAB, mixed_prompts, tiny_model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "llama.kernl"
    kernl.compiler.compile(
        tiny_model("llama3"),
        "batch=1,4 prompt=8,16 cache=64",
        path,
        dtype="fp32",
        device="cpu",
        task="causal-lm",
    )
    return path


@pytest.fixture(scope="module")
def model(artifact):
    return kernl.runtime.load(artifact)


def test_seeded_sampling_repeats_and_filters(model):
    ids, mask = mixed_prompts(2, [5, 9])
    kw = dict(max_new_tokens=24, do_sample=True, temperature=1.5, eos_token_id=[])
    a = model.generate(ids, mask, seed=7, top_k=0, **kw)
    b = model.generate(ids, mask, seed=7, top_k=0, **kw)
    c = model.generate(ids, mask, seed=8, top_k=0, **kw)
    greedy = model.generate(ids, mask, max_new_tokens=24, eos_token_id=[])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, greedy)
    # A seed's bits above 32 count: seed and seed + 2**32 draw differently (they were cut).
    assert not torch.equal(a, model.generate(ids, mask, seed=7 + 2**32, top_k=0, **kw))
    # Keeping only the most likely token (top_k=1, or a tiny top_p) is greedy decoding.
    assert torch.equal(model.generate(ids, mask, seed=3, top_k=1, **kw), greedy)
    assert torch.equal(model.generate(ids, mask, seed=3, top_k=0, top_p=1e-6, **kw), greedy)


def test_per_row_sampling_arguments_give_each_row_its_call_alone(model):
    """Rows with their own temperature, top-k, top-p and seed share one call (how the serving
    batcher batches requests with different sampling arguments): with a seed per row, each
    row's ids are those of the row generated alone with its arguments."""
    lengths, rows = [5, 9, 7], []
    ids, mask = mixed_prompts(3, lengths, seed=4)
    per_row = dict(temperature=[1.5, 0.7, 1.0], top_k=[0, 20, 5], top_p=[1.0, 0.9, 0.8])
    seeds = [11, 12, 11]
    kw = dict(max_new_tokens=16, do_sample=True, eos_token_id=[])
    together = model.generate(ids, mask, seed=seeds, **per_row, **kw)
    for i, n in enumerate(lengths):
        alone = {k: v[i] for k, v in per_row.items()}
        row = ids[i : i + 1, ids.shape[1] - n :]
        rows.append(model.generate(row, seed=seeds[i], **alone, **kw)[0, n:])
    assert torch.equal(together[:, ids.shape[1] :], torch.stack(rows))
    assert len({tuple(r.tolist()) for r in rows}) == 3
    with pytest.raises(ValueError, match="seed holds 2 values for a batch of 3 rows"):
        model.generate(ids, mask, seed=[1, 2], **kw)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(ids, mask, temperature=[1.0, 0.0, 1.0], **kw)


def test_sampling_follows_the_distribution(model):
    """First sampled token over many seeds vs the softmax of the prefill logits."""
    ids = torch.tensor([[5, 17, 33]])
    ((_, logits),) = list(model.stream(ids, max_new_tokens=1, eos_token_id=[], output_logits=True))
    probs = torch.softmax(logits[0] / 0.7, -1)
    draws = torch.stack(
        [
            model.generate(ids, max_new_tokens=1, do_sample=True, temperature=0.7, top_k=0, seed=s)[
                0, -1
            ]
            for s in range(300)
        ]
    )
    freq = torch.bincount(draws, minlength=VOCAB).float() / len(draws)
    top = probs.argsort(descending=True)[:3]
    assert (freq[top] - probs[top]).abs().max() < 0.1, (freq[top], probs[top])


def test_stream_yields_the_generated_tokens(model):
    ids, mask = mixed_prompts(3, [3, 8, 6], seed=1)
    out = model.generate(ids, mask, max_new_tokens=20, eos_token_id=[])
    steps = list(model.stream(ids, mask, max_new_tokens=20, eos_token_id=[]))
    assert len(steps) == 20
    assert torch.equal(torch.stack(steps, dim=1), out[:, ids.shape[1] :])


def test_right_padding_and_token_lists_equal_left_padding(model):
    ids, mask = mixed_prompts(2, [4, 7], seed=2)
    left = model.generate(ids, mask, max_new_tokens=10, eos_token_id=[])
    rows = [ids[i][mask[i].bool()].tolist() for i in range(2)]
    right_ids = torch.zeros_like(ids)
    right_mask = torch.zeros_like(mask)
    for i, r in enumerate(rows):
        right_ids[i, : len(r)] = torch.tensor(r)
        right_mask[i, : len(r)] = 1
    right = model.generate(right_ids, right_mask, max_new_tokens=10, eos_token_id=[])
    listed = model.generate(rows, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(right[:, 7:], left[:, 7:])
    assert torch.equal(listed, left)


def test_errors_are_clear_and_leave_the_model_usable(model):
    ids, mask = mixed_prompts(2, [5, 3])
    before = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    with pytest.raises(ValueError, match=r"longer than every prompt bucket .*\[8, 16\]"):
        model.generate(torch.ones(1, 17, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"exceeds the KV cache of 64 slots; at most 57"):
        model.generate(ids, mask, max_new_tokens=58)
    # named as the call asked: max_length counts the prompt's 5 columns
    with pytest.raises(ValueError, match=r"\+ max_length 64 \(59 new tokens\) - 1 exceeds"):
        model.generate(ids, mask, max_length=64)
    with pytest.raises(ValueError, match=r"larger than every batch bucket"):
        model.generate(torch.ones(5, 4, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"must lie in \[0, 97\)"):
        model.generate(torch.tensor([[3, VOCAB]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="no tokens"):
        model.generate(ids, torch.zeros_like(mask), max_new_tokens=2)
    # Ids the GPU would index with are checked before anything runs: on CUDA an index error
    # is a device-side assert that poisons the whole process's context.
    bad_arguments = {
        "pad_token_id": [VOCAB, 5000, -1, 2**70, 1.5, True],
        "eos_token_id": [VOCAB, -1, 2**63, [3, 2**64]],
        "seed": [-1, 2**63, 2**70, "7"],
        "top_k": [-1, 2**40, 1.5],
        "top_p": [0.0, 1.5, float("nan")],
        "temperature": [float("inf"), float("nan"), "1", 10**400],  # 10**400: no float holds it
        "max_new_tokens": [0, True, 2.0],
        "do_sample": ["yes"],
    }
    for name, values in bad_arguments.items():
        for value in values:
            with pytest.raises(ValueError, match=name):
                model.generate(ids, mask, **{name: value})
    # Temperatures whose logits / T a float32 cannot hold: every token came out 0 (1e-45),
    # or torch's overflow error (1e308), or a silent uniform draw (a per-row 1e308).
    for t in (1e-45, 1e-320, 1e308, [1.0, 1e308]):
        with pytest.raises(ValueError, match=r"temperature must lie in \[1e-06, 1e\+06\]"):
            model.generate(ids, mask, do_sample=True, temperature=t, max_new_tokens=2)
    # Hugging Face generate arguments: neutral values are taken (code written for HF passes
    # them), the others say what kernl does instead (they were a bare "unexpected keyword")
    got = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[], use_cache=True,
                         num_beams=1, return_dict_in_generate=False)  # fmt: skip
    assert torch.equal(got, before)
    got = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[], use_cache=1)
    assert torch.equal(got, before)
    # options that change the ids: their neutral values (and None, HF's unset) are taken
    got = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[], repetition_penalty=1.0,
                         no_repeat_ngram_size=0, min_new_tokens=None)  # fmt: skip
    assert torch.equal(got, before)
    got = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[], length_penalty=1.0,
                         dola_layers=None, output_attentions=False, num_beam_groups=1,
                         diversity_penalty=0, cache_implementation=None)  # fmt: skip
    assert torch.equal(got, before)
    for kw, needle in [(dict(num_beams=2), "beam search"), (dict(streamer=object()), "stream"),
                       (dict(output_scores=True), "output_logits=True"),
                       # a bare "unexpected keyword argument" before
                       (dict(no_repeat_ngram_size=3), "no_repeat_ngram_size=3: kernl does not take it"),
                       (dict(repetition_penalty=1.2), "does not take repetition_penalty=1.2"),
                       # HF turns it off with None or []: kernl applies the config's
                       (dict(bad_words_ids=[]), "applies the model's generation config's"),
                       # HF options outside the tables were a bare "unexpected keyword"
                       (dict(dola_layers="high"), "does not take dola_layers='high'"),
                       (dict(forced_bos_token_id=3), "does not take forced_bos_token_id=3"),
                       (dict(forced_eos_token_id=None), "applies the model's generation config's"),
                       (dict(length_penalty=2.0), "beam search"),
                       (dict(output_attentions=True), "no attention weights"),
                       (dict(cache_implementation="dynamic"), "static KV cache"),
                       (dict(bogus=1), "unexpected keyword argument 'bogus'")]:  # fmt: skip
        with pytest.raises(TypeError, match=needle):
            model.generate(ids, mask, max_new_tokens=2, **kw)
    with pytest.raises(TypeError, match="stream\\(\\) does not take generation_config"):
        model.stream(ids, mask, generation_config=object())
    # Greedy decoding never reads it, as in Hugging Face (which warns).
    assert torch.equal(model.generate(ids, mask, temperature=1e308, max_new_tokens=12,
                                      eos_token_id=[]), before)  # fmt: skip
    # The longest request that fits still runs (prompt bucket 8: 57 new tokens).
    assert model.generate(ids, mask, max_new_tokens=57, eos_token_id=[]).shape == (2, 5 + 57)
    after = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(before, after)


def test_artifact_verifies_and_serves_without_transformers(artifact):
    from kernl.artifacts import verify_artifact

    manifest = verify_artifact(artifact)
    assert manifest.task == "causal-lm" and len(manifest.buckets) == 2 * 2 + 2
    script = textwrap.dedent(f"""
        import sys, torch, kernl.runtime
        m = kernl.runtime.load({str(artifact)!r}, device="cpu")
        out = m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, eos_token_id=[])
        assert out.shape == (1, 7), out.shape
        assert "transformers" not in sys.modules, "the runtime imported transformers"
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr


def test_unsupported_models_fail_at_compile_naming_why(tmp_path):
    import transformers as tf

    opt = tf.OPTForCausalLM(
        tf.OPTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=64,
            vocab_size=50,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        )
    )
    with pytest.raises(
        UnsupportedModelError, match="model type 'opt'.*llama, mistral, qwen2, qwen3, phi3"
    ):
        kernl.compiler.compile(
            opt, "batch=1 prompt=8", tmp_path / "a", dtype="fp32", device="cpu", task="causal-lm"
        )
    # A layer_types entry kernl has no attention for (Gemma3n's, Llama4's chunked attention)
    qwen2 = tiny_model("qwen2_window")
    qwen2.config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(UnsupportedModelError, match=r"layer_types .*'chunked_attention'"):
        kernl.compiler.compile(
            qwen2, "batch=1 prompt=8 cache=32", tmp_path / "b", dtype="fp32", device="cpu",
            task="causal-lm",
        )  # fmt: skip
    assert not (tmp_path / "b").exists()
    # More EOS ids than the runtime stops at: refused before tracing (it failed only when the
    # artifact was written, as "a bug in kernl"); repeated ids count once.
    llama = tiny_model("llama3")
    llama.generation_config.eos_token_id = list(range(2, 11))
    with pytest.raises(UnsupportedModelError, match=r"9 EOS ids .*at most"):
        kernl.compiler.compile(
            llama, "batch=1 prompt=8 cache=16", tmp_path / "c", dtype="fp32", device="cpu",
            task="causal-lm",
        )  # fmt: skip
    assert not any((tmp_path / n).exists() for n in "abc")
    llama.generation_config.eos_token_id = [3] * 9 + [4]
    assert describe(llama, 16, torch.float32)[0].eos_token_ids == [3, 4]
    # Options of Hugging Face's generate that kernl's does not apply: its ids would differ
    # (they were dropped without a word; validation compares logits, so it passed)
    llama.generation_config.repetition_penalty = 1.05  # Qwen2.5-Instruct's
    llama.generation_config.no_repeat_ngram_size = 2
    with pytest.raises(UnsupportedModelError, match=r"repetition_penalty=1.05, no_repeat_ngram"):
        describe(llama, 16, torch.float32)
    llama.generation_config.repetition_penalty = 1.0
    llama.generation_config.no_repeat_ngram_size = 0
    llama.generation_config.suppress_tokens = [5]
    with pytest.raises(UnsupportedModelError, match=r"suppress_tokens=\[5\]"):
        describe(llama, 16, torch.float32)
    llama.generation_config.suppress_tokens = None
    llama.generation_config.token_healing = True  # HF rewrites the prompt's end: dropped
    with pytest.raises(UnsupportedModelError, match=r"token_healing=True"):
        describe(llama, 16, torch.float32)
    llama.generation_config.token_healing = False
    describe(llama, 16, torch.float32)  # neutral values are fine
    # Phi-4-mini's partial rotary (3/4 of each head): its inv_freq is shorter than a head's
    # half, which the artifact's reader refuses; named at compile instead
    phi = tf.Phi3ForCausalLM(
        tf.Phi3Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, vocab_size=50,
                      partial_rotary_factor=0.75, pad_token_id=0)
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match=r"rotates 12 of each head's 16 dimensions"):
        describe(phi, 16, torch.float32)


def test_config_keys_a_family_ignores_are_ignored_or_refused_by_name(tmp_path):
    """A Llama converted from another family keeps that family's keys: kernl applied a
    softcap, another activation or a window Llama's modeling never reads, and the compile
    failed validation with a numeric mismatch (review). A stray window is refused by name:
    Hugging Face's forward ignores it but its generate's cache applies it."""
    import transformers as tf

    llama = tiny_model("llama3")
    llama.config.final_logit_softcapping = 0.5
    llama.config.attn_logit_softcapping = 1.0
    llama.config.hidden_activation = "gelu"  # Gemma2's key: Llama's MLP reads hidden_act
    spec = describe(llama, 16, torch.float32)[0]
    assert (spec.final_logit_softcap, spec.attn_logit_softcap) == (None, None)
    assert spec.activation == "silu"
    ids, mask = mixed_prompts(2, [5, 3], seed=3)
    out = tmp_path / "llama.kernl"
    kernl.compiler.compile(
        llama, "batch=2 prompt=8 cache=16", out, dtype="fp32", device="cpu", task="causal-lm"
    )
    with torch.no_grad():
        want = llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    got = kernl.runtime.load(out, device="cpu").generate(ids, mask, max_new_tokens=6)
    assert torch.equal(got, want)
    llama.config.sliding_window = 5
    with pytest.raises(UnsupportedModelError, match=r"sliding_window=5, which llama's attention"):
        describe(llama, 16, torch.float32)
    llama.config.sliding_window = 16  # as long as the cache: no slot ever leaves it
    assert describe(llama, 16, torch.float32)[0].sliding_window is None
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=0, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="gpt2 with 0 layers"):
        describe(gpt2, 16, torch.float32)


def test_eos_and_pad_come_from_the_generation_config_alone():
    """As Hugging Face's generate: a folder's generation_config.json that leaves an id out
    does not fall back to config.json's (kernl stopped at config.json's EOS, HF did not)."""
    from transformers import GenerationConfig

    llama = tiny_model("llama3")
    llama.config.eos_token_id, llama.config.pad_token_id = 7, 0
    llama.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[2, 9])
    spec = describe(llama, 16, torch.float32)[0]
    assert spec.eos_token_ids == [2, 9] and spec.pad_token_id is None  # pads with EOS 2
    llama.generation_config = GenerationConfig(bos_token_id=1, pad_token_id=3)
    spec = describe(llama, 16, torch.float32)[0]
    assert spec.eos_token_ids == [] and spec.pad_token_id == 3


def test_hooks_and_replaced_forwards_are_refused_by_name():
    """kernl rebuilds a causal LM from its weights: a hook would not run. One that acts only
    on one-token decode steps passed validation, then changed the ids in silence."""
    llama = tiny_model("llama3")
    mlp = llama.model.layers[0].mlp
    handle = mlp.register_forward_hook(lambda m, i, o: o + 1 if o.shape[1] == 1 else o)
    with pytest.raises(UnsupportedModelError, match=r"model.layers.0.mlp \(1 forward hook\)"):
        describe(llama, 16, torch.float32)
    handle.remove()
    describe(llama, 16, torch.float32)
    mlp.forward = lambda x: x
    with pytest.raises(UnsupportedModelError, match=r"model.layers.0.mlp \(a replaced forward\)"):
        describe(llama, 16, torch.float32)
    del mlp.forward
    # transformers 5.0 and 5.1 put each layer's forward back as `module.forward =
    # original_forward` after a forward with output_hidden_states: its own forward, not
    # replaced (refused, the model could not be compiled after once returning hidden states)
    for layer in llama.model.layers:
        layer.forward = layer.forward
    describe(llama, 16, torch.float32)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, i: None)
    try:
        with pytest.raises(UnsupportedModelError, match="global module hooks"):
            describe(llama, 16, torch.float32)
    finally:
        handle.remove()
    describe(llama, 16, torch.float32)
    # transformers' own hooks change no output: the capture hooks a forward asking for hidden
    # states leaves on every layer, enable_input_require_grads's on the embeddings
    llama(torch.tensor([[1, 2, 3]]), output_hidden_states=True, output_attentions=True)
    llama.enable_input_require_grads()
    assert any(m._forward_hooks for m in llama.modules())
    describe(llama, 16, torch.float32)


def test_generation_bucket_syntax():
    b = parse_generation_buckets("batch=1,4,8 prompt=16:128 cache=256:1024")
    assert b.batches == [1, 4, 8] and b.prompts == [16, 32, 64, 128]
    assert b.kv_lengths == [256, 512, 1024] and b.cache_len == 1024
    assert parse_generation_buckets("batch=2 prompt=100").kv_lengths == [200]
    for bad, msg in [
        ("batch=1 prompt=64 cache=32", "does not fit the cache"),
        ("batch=1 seq=16", "unknown axis 'seq' for causal-lm"),
        ("prompt=16", "missing axis batch"),
    ]:
        with pytest.raises(BucketSyntaxError, match=msg):
            parse_generation_buckets(bad)


def test_max_length_counts_the_prompt_like_hugging_face(model):
    ids, mask = mixed_prompts(2, [5, 3])  # padded prompt length 5
    by_length = model.generate(ids, mask, max_length=17, eos_token_id=[])
    assert by_length.shape == (2, 17)
    assert torch.equal(by_length, model.generate(ids, mask, max_new_tokens=12, eos_token_id=[]))
    with pytest.warns(UserWarning, match="max_new_tokens takes precedence"):
        both = model.generate(ids, mask, max_new_tokens=4, max_length=17, eos_token_id=[])
    assert both.shape == (2, 9)
    with pytest.raises(ValueError, match="max_length=5 leaves no room"):
        model.generate(ids, mask, max_length=5)
    steps = list(model.stream(ids, mask, max_length=8, eos_token_id=[]))
    assert len(steps) == 3


def test_generate_inside_an_open_stream_raises_instead_of_waiting_forever(model, monkeypatch):
    """The thread iterating a stream holds the model; calling it again from that thread
    used to wait for itself. Run in a daemon thread so the old behaviour fails, not hangs.
    (The call first waits a moment for another thread to pull the stream on: shortened.)"""
    import threading

    from kernl.runtime.generation import model as generation_model

    monkeypatch.setattr(generation_model, "STREAM_HANDOFF_WAIT_S", 0.3)

    ids, mask = mixed_prompts(2, [5, 3])
    outcome = {}

    def body():
        stream = model.stream(ids, mask, max_new_tokens=6, eos_token_id=[])
        next(stream)
        for call in (model.generate, model.stream):
            try:
                call(ids, mask, max_new_tokens=2)
                outcome[call.__name__] = "returned"
            except RuntimeError as e:
                outcome[call.__name__] = str(e)
        stream.close()  # closing releases the model: the same thread may generate again
        outcome["after"] = model.generate(ids, mask, max_new_tokens=3, eos_token_id=[]).shape

    worker = threading.Thread(target=body, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "generate() inside an open stream() waited forever"
    for name in ("generate", "stream"):
        assert "open stream()" in outcome[name] and "close()" in outcome[name]
        assert "contextlib.closing" in outcome[name]  # a `break` does not close a named one
    assert outcome["after"] == (2, 8)
    # Another thread is not refused: it waits for the stream, then runs.
    stream = model.stream(ids, mask, max_new_tokens=3, eos_token_id=[])
    next(stream)
    other = {}
    waiter = threading.Thread(
        target=lambda: other.setdefault("ids", model.generate(ids, mask, max_new_tokens=2)),
        daemon=True,
    )
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive(), "the other thread must wait for the open stream"
    list(stream)
    waiter.join(timeout=120)
    assert other["ids"].shape == (2, 7)


def test_a_stream_pulled_from_several_threads_lets_its_last_puller_generate(model):
    """A web server's thread pool pulls each step of a stream on whichever worker is free
    (Starlette's StreamingResponse), so the worker that pulled a step may next serve an
    unrelated generate() while another worker pulls the stream on. That generate() was
    refused as re-entry ("this thread pulled the last step of an open stream()"); it waits its
    turn."""
    import queue
    import threading

    ids, mask = mixed_prompts(2, [5, 3], seed=6)
    alone = model.generate(ids, mask, max_new_tokens=3, eos_token_id=[])
    streamed = model.generate(ids, mask, max_new_tokens=5, eos_token_id=[])
    stream = model.stream(ids, mask, max_new_tokens=5, eos_token_id=[])
    jobs, results = queue.Queue(), queue.Queue()

    def worker():  # one pool worker: runs its jobs one after another
        for job in iter(jobs.get, None):
            try:
                results.put(job())
            except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
                results.put(e)

    pool = threading.Thread(target=worker, daemon=True)
    pool.start()
    jobs.put(lambda: next(stream))
    steps = [results.get(timeout=120)]
    rest = threading.Thread(target=lambda: (time.sleep(0.3), steps.extend(stream)), daemon=True)
    rest.start()  # another worker pulls the rest of the stream a moment later
    jobs.put(lambda: model.generate(ids, mask, max_new_tokens=3, eos_token_id=[]))
    got = results.get(timeout=120)
    rest.join(timeout=120)
    jobs.put(None)
    assert not isinstance(got, Exception), got
    assert torch.equal(got, alone)
    assert torch.equal(torch.stack(steps, dim=1), streamed[:, ids.shape[1] :])


def test_a_stream_read_to_its_last_step_frees_the_model_without_another_pull(model, monkeypatch):
    """A consumer that takes the tokens it expects with next() (max_new_tokens of them, or up
    to the step where every row met its EOS) and pulls no further: the model used to stay
    held until one more pull found the stream done, so other threads waited and the same
    thread's next generate() was refused as re-entry. The last step is handed out free."""
    import threading

    from kernl.runtime.generation import model as generation_model

    monkeypatch.setattr(generation_model, "STREAM_HANDOFF_WAIT_S", 0.3)
    ids, mask = mixed_prompts(2, [5, 3], seed=7)
    whole = model.generate(ids, mask, max_new_tokens=4, eos_token_id=[])
    new = whole[:, ids.shape[1] :]
    for kwargs, n in (
        ({"max_new_tokens": 4, "eos_token_id": []}, 4),  # the step count
        ({"max_new_tokens": 4, "eos_token_id": new[:, 0].tolist()}, 1),  # both rows' EOS
    ):
        stream = model.stream(ids, mask, output_logits=True, **kwargs)
        steps = [next(stream) for _ in range(n)]
        assert all(torch.equal(got, new[:, t]) for t, (got, _) in enumerate(steps))
        other = {}
        waiter = threading.Thread(
            target=lambda: other.setdefault(
                "ids", model.generate(ids, mask, max_new_tokens=4, eos_token_id=[])
            ),
            daemon=True,
        )
        waiter.start()
        waiter.join(timeout=120)
        assert not waiter.is_alive(), "another thread waited for a stream already read out"
        assert torch.equal(other["ids"], whole)
        assert torch.equal(model.generate(ids, mask, max_new_tokens=4, eos_token_id=[]), whole)
        # the last step's logits were copied before the model went on to other requests
        assert torch.isfinite(steps[-1][1]).all() and steps[-1][1].shape == (2, VOCAB)
        assert next(stream, None) is None


def test_malformed_input_ids_are_refused_by_name_and_never_cast(model):
    """Token lists of floats or bools were cast to int64 without a word (5.9 served as 5); a
    complex tensor passed; an empty list, an empty row, a string or a tokenizer's output
    passed positionally were refused with messages about a mask or a dtype the caller never
    gave, or torch's own. Each is refused naming input_ids; the model serves on."""
    before = model.generate([[5, 6, 7]], max_new_tokens=3, eos_token_id=[])
    refused = [
        ([[5.9, 6.9, 7.9]], TypeError, "row 0 must hold integers, got torch.float32"),
        ([[5, 6], [True, False]], TypeError, "row 1 must hold integers, got torch.bool"),
        (torch.tensor([[5, 6]], dtype=torch.complex64), TypeError, "got torch.complex64"),
        ([], ValueError, "input_ids is empty"),
        ([[1, 2], []], ValueError, r"row\(s\) \[1\] are empty lists"),
        ("hello", TypeError, "input_ids must be token ids .* got a str"),
        ({"input_ids": [[1, 2]]}, TypeError, r"got a dict: pass the tokenizer's output as"),
    ]
    for bad, error, message in refused:
        for call in (model.generate, model.stream):
            with pytest.raises(error, match=message):
                call(bad, max_new_tokens=2, eos_token_id=[])
    assert torch.equal(model.generate([[5, 6, 7]], max_new_tokens=3, eos_token_id=[]), before)


def test_numpy_views_are_taken_and_a_positional_generation_config_is_named(model):
    """A reversed numpy view (which the encoder's call takes) failed in torch.as_tensor with
    torch's own words; Hugging Face's generate(ids, GenerationConfig(...)) put the config
    where kernl's attention_mask goes and failed with "Could not infer dtype" (review)."""
    import numpy as np
    from transformers import GenerationConfig

    ids = np.array([[7, 6, 5], [9, 8, 4]])
    want = model.generate(ids[:, ::-1].copy(), max_new_tokens=3, eos_token_id=[])
    for call in (
        model.generate,
        lambda *a, **k: torch.stack([s for s in model.stream(*a, **k)], 1),
    ):
        got = call(ids[:, ::-1], np.ones((2, 3))[:, ::-1], max_new_tokens=3, eos_token_id=[])
        assert torch.equal(got[:, -3:], want[:, -3:])
    with pytest.raises(TypeError, match="second positional argument is attention_mask"):
        model.generate(ids, GenerationConfig(max_new_tokens=2))
    with pytest.raises(TypeError, match="input 'attention_mask' must be a tensor"):
        model.generate(ids, object(), max_new_tokens=2)


@pytest.fixture(scope="module")
def hf():
    return tiny_model("llama3")  # the artifact's model: tiny_model seeds its weights


def _hf_generate(hf, ids, **kw):
    with torch.no_grad():
        return hf.generate(ids, do_sample=False, **kw)


def test_padded_ids_without_a_mask_get_hugging_face_s_inferred_mask(model, hf):
    """Hugging Face infers a decoder-only model's attention_mask from the pad id when none is
    given (its positions are padding, unless the pad id is an EOS id); kernl attended to the
    pads. The same holds for stream() and for the rows of an open batch."""
    ids, _ = mixed_prompts(3, [6, 2, 4], seed=7)  # left-padded with the model's pad id 0
    assert (ids == 0).any()
    ref = _hf_generate(hf, ids, max_new_tokens=10)
    got = model.generate(ids, max_new_tokens=10)
    assert torch.equal(got, ref), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"
    steps = list(model.stream(ids, max_new_tokens=10))
    assert torch.equal(torch.stack(steps, dim=1), ref[:, ids.shape[1] :])
    # The pad id the call gives is the one that marks padding.
    other = ids.masked_fill(ids == 0, 5)
    ref = _hf_generate(hf, other, max_new_tokens=6, pad_token_id=5)
    assert torch.equal(model.generate(other, max_new_tokens=6, pad_token_id=5), ref)
    # A pad id that is also an EOS id marks nothing: every position is attended, as in HF.
    ref = _hf_generate(hf, ids, max_new_tokens=6, eos_token_id=0)
    assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=0), ref)
    # An open batch's rows and joiners: each gives what generate gives its prompt.
    with model.open_batch(ids, max_new_tokens=4, eos_token_id=[], rows=4) as batch:
        first = dict(batch.first)
        joined = batch.join(ids[1], max_new_tokens=4)
    alone = model.generate(ids, max_new_tokens=1, eos_token_id=[])[:, -1].tolist()
    assert [first[r] for r in range(3)] == alone
    assert joined is not None and joined[1] == alone[1]
    # Lists of ids are taken as given (no tokenizer pads a list without saying where).
    listed = model.generate([ids[1].tolist()], max_new_tokens=4, eos_token_id=[])
    assert torch.equal(
        listed, model.generate(ids[1:2], torch.ones(1, 6), max_new_tokens=4, eos_token_id=[])
    )


def test_token_lists_come_back_padded_with_the_call_s_pad_id(model):
    """A ragged list of prompts is returned left-padded with the pad id the call resolves
    (the one its finished rows take), not with id 0."""
    rows = [[11, 12, 13, 14, 15], [21, 22]]
    out = model.generate(rows, max_new_tokens=4, eos_token_id=[], pad_token_id=7)
    assert out[1, :3].tolist() == [7, 7, 7]
    assert out[0, :5].tolist() == rows[0] and out[1, 3:5].tolist() == rows[1]
    ids = torch.tensor([[11, 12, 13, 14, 15], [0, 0, 0, 21, 22]])
    mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    padded = model.generate(ids, mask, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(out[:, 5:], padded[:, 5:])
    assert torch.equal(model.generate(rows, max_new_tokens=4, eos_token_id=[]), padded)  # pad 0


def test_hugging_face_spellings_of_the_defaults_are_taken(model):
    """temperature=None and top_p=None are off, as top_k=None was and as in Hugging Face
    (they were "must be a finite number, got None"); `inputs=` is input_ids' other name;
    decoder_input_ids says why it is not taken (it was a bare "unexpected keyword")."""
    ids, mask = mixed_prompts(2, [5, 3], seed=8)
    kw = dict(max_new_tokens=8, do_sample=True, seed=4, eos_token_id=[])
    ref = model.generate(ids, mask, temperature=1.0, top_k=0, top_p=1.0, **kw)
    assert torch.equal(
        model.generate(ids, mask, temperature=None, top_k=None, top_p=None, **kw), ref
    )
    per_row = dict(temperature=[None, 1.0], top_p=[1.0, None], top_k=0)
    assert torch.equal(model.generate(ids, mask, **per_row, **kw), ref)
    steps = list(model.stream(ids, mask, temperature=None, top_p=None, top_k=0, **kw))
    assert torch.equal(torch.stack(steps, dim=1), ref[:, ids.shape[1] :])
    greedy = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    by_name = model.generate(inputs=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(by_name, greedy)
    with pytest.raises(TypeError, match="got both input_ids and inputs"):
        model.generate(ids, inputs=ids)
    with pytest.raises(TypeError, match="input_ids is required"):
        model.generate(attention_mask=mask)
    with pytest.raises(
        TypeError, match="decoder_input_ids=<tensor \\(2, 1\\)>: the decoder starts"
    ):
        model.generate(ids, mask, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long))


def test_numpy_and_torch_scalars_are_taken_as_the_numbers_they_hold(model):
    """`for n in np.arange(...)` or a value read from a tensor: np.int64(8) was refused as
    "not an integer"."""
    import numpy as np

    ids, mask = mixed_prompts(2, [5, 3], seed=9)
    kw = dict(do_sample=True, top_k=0, eos_token_id=[])
    ref = model.generate(ids, mask, max_new_tokens=8, seed=4, temperature=0.5, top_p=0.9, **kw)
    got = model.generate(
        ids,
        mask,
        max_new_tokens=np.int64(8),
        seed=torch.tensor(4),
        temperature=np.float32(0.5),
        top_p=[np.float64(0.9), torch.tensor(0.9)],
        **kw,
    )
    assert torch.equal(got, ref)
    steps = list(model.stream(ids, mask, max_new_tokens=np.uint8(3), eos_token_id=[]))
    assert len(steps) == 3
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        model.generate(ids, mask, max_new_tokens=np.bool_(True))
    # passed by position, and to an open batch's join (both were refused, review)
    got = model.generate(ids, mask, np.int64(8), seed=np.int64(4), temperature=0.5, top_p=0.9, **kw)
    assert torch.equal(got, ref)
    with model.open_batch(ids, max_new_tokens=4, eos_token_id=[], rows=4) as batch:
        joined = batch.join(ids[1][mask[1].bool()], np.int64(4), seed=np.int64(3))
    assert joined is not None
    for rows in (0, -2, "4", 2.5):  # 0 and -2 once served as the prompts' count
        with pytest.raises(ValueError, match="rows must be a positive integer"):
            model.open_batch(ids, max_new_tokens=4, eos_token_id=[], rows=rows)
    with model.open_batch(ids, max_new_tokens=4, eos_token_id=[], rows=np.int64(4)) as batch:
        assert batch.bucket == 4


def test_a_prompt_bucket_equal_to_a_kv_length_loads(tmp_path):
    """prompt=32 and cache=32,64: a prefill and a decode entry of one (batch, 32) shape. The
    artifact was written, then refused at load as 'bucket b1_s32 is listed twice'."""
    path = tmp_path / "lm.kernl"
    kernl.compiler.compile(
        tiny_model("llama3"),
        "batch=1 prompt=16,32 cache=32,64",
        path,
        dtype="fp32",
        device="cpu",
        task="causal-lm",
    )
    model = kernl.runtime.load(path)
    ids, mask = mixed_prompts(1, [20])
    assert model.generate(ids, mask, max_new_tokens=30, eos_token_id=[]).shape == (1, 50)


GEMMA3_SIZES = dict(
    hidden_size=32,
    num_hidden_layers=6,  # five sliding-window layers, then one global
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    intermediate_size=64,
    vocab_size=50,
    sliding_window=16,
)


def test_gemma3_image_text_is_refused_from_its_config_naming_its_image_encoder(tmp_path):
    """Gemma3ForConditionalGeneration from a folder holding only config.json: the refusal comes
    before any weight is looked for (loading would fail on the missing weights) and names the
    image encoder, and the text decoder kernl serves instead, not what kernl has (the rotary
    table per layer type, softcapping, the norms after attention and around the MLP)."""
    import transformers as tf

    config = tf.Gemma3Config(text_config=tf.Gemma3TextConfig(**GEMMA3_SIZES))
    config.save_pretrained(tmp_path / "model")
    with pytest.raises(UnsupportedModelError, match=r"model type 'gemma3'") as refused:
        kernl.compiler.compile(
            tmp_path / "model", "batch=1 prompt=8", tmp_path / "a", dtype="fp32", device="cpu",
            task="causal-lm",
        )  # fmt: skip
    message = str(refused.value)
    assert "an image encoder" in message and "'gemma3_text', is served" in message, message
    assert "rotary table" not in message and "decoder layer" not in message, message
    assert "softcapping" not in message and "post_attention_layernorm" not in message, message
    assert not (tmp_path / "a").exists()


def test_a_gemma3_text_config_is_not_refused_from_its_config(tmp_path):
    """Gemma3's text decoder (its sliding-window and full-attention layers rotating with
    different rope_parameters) passes the config check, to the description of its weights;
    with use_bidirectional_attention it is refused, naming it."""
    import transformers as tf

    from kernl.compiler.tasks.causal_lm.describe import check_model_type

    config = tf.Gemma3TextConfig(**GEMMA3_SIZES)
    rope = config.rope_parameters
    assert rope["sliding_attention"]["rope_theta"] != rope["full_attention"]["rope_theta"]
    config.save_pretrained(tmp_path / "model")
    check_model_type(tmp_path / "model")
    tf.Gemma3TextConfig(**GEMMA3_SIZES, use_bidirectional_attention=True).save_pretrained(
        tmp_path / "bidirectional"
    )
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention=True"):
        check_model_type(tmp_path / "bidirectional")


def test_gemma3_attention_is_not_softcapped_whatever_its_config_says():
    """Gemma3Attention keeps attn_logit_softcapping from its config but never passes it to the
    attention function: Hugging Face's logits do not change with it, so kernl's description
    leaves the scores uncapped. Its final logit softcap is applied, as Gemma2's."""
    hf = tiny_model("gemma3")
    ids, mask = mixed_prompts(2, [9, 5])
    with torch.no_grad():
        before = hf(input_ids=ids, attention_mask=mask).logits
        hf.config.attn_logit_softcapping = 0.5
        after = hf(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    hf.config.final_logit_softcapping = 0.5
    spec, _ = describe(hf, 48, torch.float32)
    assert spec.attn_logit_softcap is None and spec.final_logit_softcap == 0.5
    assert spec.sandwich_norms and spec.qk_norm and spec.norm_plus_one
    assert spec.attention_scale == 20**-0.5  # query_pre_attn_scalar, not head_dim (32)


def test_a_gemma2_config_is_not_refused_from_its_config(tmp_path):
    """Gemma2 with Gemma2's defaults (softcaps 50 and 30, sliding window 4096 on every other
    layer): the config check lets it through, to the description of its weights."""
    import transformers as tf

    from kernl.compiler.tasks.causal_lm.describe import check_model_type

    tf.Gemma2Config(num_hidden_layers=2).save_pretrained(tmp_path / "model")
    check_model_type(tmp_path / "model")


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_a_sliding_window_shorter_than_the_cache_is_served(tmp_path, family):
    """Every other Gemma2 layer, every Mistral layer, attends to a window of the cache only:
    a cache longer than the window was refused ("use cache<=16"); it compiles now, the
    compile's own check against Hugging Face passing over prompts and steps past the window
    (tests/generation/test_sliding_window.py compares the ids)."""
    hf = tiny_model(family)
    hf.config.sliding_window = 16
    spec, _ = describe(hf, 32, torch.float32)
    assert spec.sliding_window == 16
    assert spec.sliding_layers == ([0, 2] if family == "gemma2" else [0, 1])
    kernl.compiler.compile(
        hf, "batch=1 prompt=8,24 cache=32", tmp_path / "a", dtype="fp32", device="cpu",
        task="causal-lm",
    )  # fmt: skip
    model = kernl.runtime.load(tmp_path / "a")
    assert model.decoder.window == 16
    ids, mask = mixed_prompts(1, [20])
    assert model.generate(ids, mask, max_new_tokens=9, eos_token_id=[]).shape == (1, 29)


@pytest.mark.parametrize(
    "forced,named",
    [
        ({"attention": "sdpa"}, "attention='sdpa' (no logit softcapping"),
        ({"lm_head": "triton", "norm": "triton"}, "lm_head='triton' (no final logit softcapping"),
        ({"step": "persistent"}, "step='persistent'"),
    ],
)
def test_decode_kernels_a_gemma2_would_not_run_are_refused_by_name(tmp_path, forced, named):
    """Told to use a kernel its step would replace by torch (no softcap in SDPA or
    lm_head_argmax), the compile says so, and writes nothing, rather than store a choice that
    does not run."""
    from kernl.compiler.tasks.causal_lm import compile_causal_lm

    with pytest.raises(ValueError, match=re.escape(named)):
        compile_causal_lm(
            tiny_model("gemma2"), "batch=1 prompt=8 cache=16", tmp_path / "a",
            dtype="fp32", device="cpu", decode_kernels=forced,
        )  # fmt: skip
    assert not (tmp_path / "a").exists()


def test_gemma2_description_and_its_weights_are_checked_together():
    """The softcaps and sandwich norms as the artifact describes them: the description of a
    Gemma2 and its weights pass; a norm weight missing, of another shape, or present without
    sandwich_norms is refused, as is a softcap that is not a finite positive number."""
    from kernl.artifacts import ArtifactError
    from kernl.artifacts.generation import check_generation

    hf = tiny_model("gemma2")
    spec, weights = describe(hf, 96, torch.float32)
    assert spec.attn_logit_softcap == 5.0 and spec.final_logit_softcap == 0.5
    assert spec.sandwich_norms and spec.norm_plus_one
    assert spec.attention_scale == 20**-0.5
    assert torch.equal(
        weights["layers.1.mlp_norm.weight"], hf.model.layers[1].pre_feedforward_layernorm.weight
    )
    assert torch.equal(
        weights["layers.1.post_attn_norm.weight"],
        hf.model.layers[1].post_attention_layernorm.weight,
    )
    header = {k: (list(v.shape), "float32") for k, v in weights.items()}

    def check(decoder=None, weights=header):
        extra = {
            "decoder": {**spec.to_dict(), **(decoder or {})},
            "generation_buckets": {"batches": [1], "prompts": [8], "kv_lengths": [96]},
            "decode_kernels": {},
        }
        return check_generation(extra, "float32", weights, "test")

    assert check().decoder == spec
    missing = {k: v for k, v in header.items() if k != "layers.2.post_mlp_norm.weight"}
    with pytest.raises(ArtifactError, match="reads weight 'layers.2.post_mlp_norm.weight'"):
        check(weights=missing)
    with pytest.raises(ArtifactError, match="post_attn_norm.weight' is float32 \\[47\\]"):
        check(weights={**header, "layers.0.post_attn_norm.weight": ([47], "float32")})
    with pytest.raises(ArtifactError, match="not part of the causal-LM description"):
        check({"sandwich_norms": False})
    for cap in (0.0, -1.0, float("nan"), float("inf"), True, "30"):
        with pytest.raises(ArtifactError, match="final_logit_softcap"):
            check({"final_logit_softcap": cap})
    assert check({"attn_logit_softcap": None}).decoder.attn_logit_softcap is None


def test_a_bidirectional_gemma_is_refused_from_its_config(tmp_path):
    import transformers as tf

    tf.GemmaConfig(use_bidirectional_attention=True).save_pretrained(tmp_path / "model")
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention=True"):
        kernl.compiler.compile(
            tmp_path / "model", "batch=1 prompt=8", tmp_path / "a", dtype="fp32", device="cpu",
            task="causal-lm",
        )  # fmt: skip


def test_a_hooked_causal_lm_is_refused_before_anything_is_compiled_in_place(tmp_path):
    """compile() on a model with hooks compiles the model itself (its modules cannot be
    copied over their tensors) and said so ("do not call it from another thread"), and then
    the causal-LM compile refused the hook: the refusal now comes first, alone."""
    import kernl.compiler

    llama = tiny_model("llama3")
    handle = llama.model.layers[0].mlp.register_forward_hook(lambda m, i, o: o)
    said = []
    try:
        with pytest.raises(UnsupportedModelError, match=r"1 forward hook"):
            kernl.compiler.compile(llama, "batch=1 prompt=4 cache=16", tmp_path / "a",
                                   dtype="fp32", device="cpu", progress=said.append)  # fmt: skip
    finally:
        handle.remove()
    assert not any("compiling the model itself" in m for m in said), said
    assert not (tmp_path / "a").exists()


def test_a_caller_s_autocast_does_not_reach_the_steps(model):
    """Under the caller's torch.autocast the eager steps cast their matmuls to its dtype while
    the KV cache kept the artifact's: the first decode step failed in index_copy_ (review
    2026-12-07). The steps run in the compiled dtype, as a replayed graph does."""
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    want = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=[]), want)
        steps = list(model.stream(ids, max_new_tokens=6, eos_token_id=[]))
    assert torch.equal(torch.stack(steps, 1), want[:, 3:])


def test_a_length_is_named_as_the_call_gave_it():
    """A call that gave no length was refused as "max_new_tokens 20 exceeds ...", an argument
    it never passed."""
    from kernl.runtime.generation.model import _new_tokens, asked_length

    assert _new_tokens(None, None, 4) == 20
    assert asked_length(None, None, 20) == "the default of 20 new tokens (no max_new_tokens given)"
    assert _new_tokens(None, 30, 4) == 26
    assert asked_length(None, 30, 26) == "max_length 30 (26 new tokens)"
    assert asked_length(7, 30, 7) == "max_new_tokens 7"


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_gemmas_embedding_scale_is_read_where_its_model_forward_applies_it(family, monkeypatch):
    """transformers before 5.4 scaled Gemma's and Gemma2's embeddings by sqrt(hidden_size) in
    the model's forward (no scaled embedding class): kernl read the embedding module's
    `embed_scale`, found none and left the scale out (validation refused every such model)."""
    import sys

    hf = tiny_model(family)
    scale = hf.config.hidden_size**0.5
    assert describe(hf, 16, torch.float32)[0].embed_scale == pytest.approx(scale)
    plain = torch.nn.Embedding.from_pretrained(hf.model.embed_tokens.weight.detach())
    hf.model.embed_tokens = plain  # an unscaled embedding, in a forward that does not scale
    assert describe(hf, 16, torch.float32)[0].embed_scale == 1.0
    modeling = sys.modules[type(hf.model).__module__]
    for name in [n for n in vars(modeling) if n.endswith("ScaledWordEmbedding")]:
        monkeypatch.delattr(modeling, name)  # as transformers 5.0-5.3's modeling module
    assert describe(hf, 16, torch.float32)[0].embed_scale == pytest.approx(scale)
