"""Encoder-decoder generation (T5 v1.0, T5 v1.1, BART) on the CPU in fp32: kernl's greedy ids
against Hugging Face `generate`, request errors, a hostile manifest, a transformers-free load."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kernl.compiler
import kernl.runtime

VOCAB = 97
BUCKETS = "batch=1,4 source=8,16 cache=48"
FAMILIES = ("t5", "t5_gated", "bart")


def tiny_seq2seq(
    family: str,
    d_model: int = 32,
    heads: int = 4,
    ffn: int = 48,
    layers: int = 2,
    vocab: int = VOCAB,
    inflated: bool = True,
) -> torch.nn.Module:
    """A random T5 (v1.0, or v1.1 gated) or BART. `inflated`: weights and biases far above a
    trained model's scale, so that every layout mistake shows in fp32 ids (the default);
    otherwise a trained model's initialisation scale (what bf16 tests need: inflated weights
    flip bf16 greedy ids at near-ties within a few tokens)."""
    import transformers as tf

    torch.manual_seed(0)
    if family in ("t5", "t5_gated"):
        gated = family == "t5_gated"
        buckets = dict(relative_attention_num_buckets=8, relative_attention_max_distance=16)
        cfg = tf.T5Config(
            vocab_size=vocab,
            d_model=d_model,
            d_kv=d_model // heads,
            d_ff=ffn,
            num_layers=layers,
            num_heads=heads,
            feed_forward_proj="gated-gelu" if gated else "relu",
            tie_word_embeddings=not gated,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            **(dict(buckets, initializer_factor=8.0) if inflated else {}),
        )
        model = tf.T5ForConditionalGeneration(cfg)
    else:
        cfg = tf.BartConfig(
            vocab_size=vocab,
            d_model=d_model,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            encoder_ffn_dim=ffn,
            decoder_ffn_dim=ffn,
            max_position_embeddings=64 if inflated else 128,
            scale_embedding=True,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_bos_token_id=None,
            forced_eos_token_id=None,
            init_std=0.5 if inflated else 0.05,
        )
        model = tf.BartForConditionalGeneration(cfg)
        if inflated:
            with torch.no_grad():
                model.final_logits_bias.normal_(0, 0.05)
    model.generation_config.forced_bos_token_id = None
    model.generation_config.forced_eos_token_id = None
    if inflated:
        with torch.no_grad():  # random init has tiny biases; make them matter
            for name, p in model.named_parameters():
                if name.endswith("bias") or "layer_norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        hf = tiny_seq2seq(family)
        path = tmp_path_factory.mktemp("s2s") / family
        kernl.compiler.compile(hf, BUCKETS, path, dtype="fp32", device="cpu")
        out[family] = (hf, path, kernl.runtime.load(path, device="cpu"))
    return out


def sources(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad 0) and mask with the given real lengths (ids avoid 0..2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def hf_generate(hf, ids, mask, new, eos=None, pad=0):
    with torch.no_grad():
        return hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=pad,
            decoder_start_token_id=hf.config.decoder_start_token_id,
            min_new_tokens=new if eos is None else 0,
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_ids_equal_hugging_face_on_mixed_source_lengths(compiled, family):
    hf, _, model = compiled[family]
    ids, mask = sources([13, 5, 9])
    ref = hf_generate(hf, ids, mask, 40)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[])
    # (tiny post-norm BART settles on one token per row; T5 varies)
    assert ref.shape == (3, 41) and len(set(ref.flatten().tolist())) > (
        2 if family == "bart" else 3
    )
    assert torch.equal(got, ref), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"


@pytest.mark.parametrize("family", FAMILIES)
def test_per_row_eos_pads_finished_rows_like_hugging_face(compiled, family):
    hf, _, model = compiled[family]
    ids, mask = sources([16, 3, 7, 11], seed=1)
    free = hf_generate(hf, ids, mask, 24)
    eos = int(free[0, 6])  # a token row 0 emits mid-way, so rows finish at different steps
    ref = hf_generate(hf, ids, mask, 24, eos=eos, pad=5)
    got = model.generate(ids, mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=5)
    assert (ref == 5).any()
    assert torch.equal(got, ref), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"


def test_seeded_sampling_repeats_and_differs_across_seeds(compiled):
    _, _, model = compiled["t5"]
    ids, mask = sources([6, 10])
    kw = dict(max_new_tokens=16, do_sample=True, top_k=20, eos_token_id=[])
    a = model.generate(ids, mask, seed=3, **kw)
    assert torch.equal(a, model.generate(ids, mask, seed=3, **kw))
    assert not torch.equal(a, model.generate(ids, mask, seed=4, **kw))
    # without a seed, torch's RNG draws one, as HF samples (it was always seed 0)
    torch.manual_seed(3)
    b = model.generate(ids, mask, **kw)
    assert not torch.equal(b, model.generate(ids, mask, **kw))
    torch.manual_seed(3)
    assert torch.equal(b, model.generate(ids, mask, **kw))


@pytest.mark.parametrize("method", ["generate", "stream"])
def test_a_refused_sampled_call_leaves_torchs_rng_where_it_was(compiled, method):
    """An unseeded sampled call drew its seed before its arguments were checked: a refused
    one moved torch's global RNG (HF checks before it samples)."""
    _, _, model = compiled["t5"]
    ids, mask = sources([5])
    torch.manual_seed(5)
    want = torch.rand(4)
    torch.manual_seed(5)
    with pytest.raises(ValueError, match="exceeds the decoder cache"):
        getattr(model, method)(ids, mask, max_new_tokens=49, do_sample=True)
    assert torch.equal(torch.rand(4), want)
    stream = model.stream(ids, mask, max_new_tokens=4, seed=1)
    next(stream)  # this thread holds the model: a call of its own is refused for re-entry
    torch.manual_seed(5)
    with pytest.raises(RuntimeError, match="pulled the last step of an open stream"):
        getattr(model, method)(ids, mask, max_new_tokens=4, do_sample=True)
    assert torch.equal(torch.rand(4), want)
    stream.close()


def test_errors_are_clear_and_leave_the_model_usable(compiled):
    hf, _, model = compiled["bart"]
    ids, mask = sources([5])
    before = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    with pytest.raises(ValueError, match="longer than every source bucket"):
        model.generate(torch.full((1, 17), 7), max_new_tokens=4)
    with pytest.raises(
        ValueError, match=r"exceeds the decoder cache: it holds 48 new tokens \(cache=48\)"
    ):
        model.generate(ids, mask, max_new_tokens=49)
    with pytest.raises(ValueError, match="larger than every batch bucket"):
        model.generate(torch.full((5, 4), 7), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 97\)"):
        model.generate(torch.full((1, 4), VOCAB), max_new_tokens=4)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=8, eos_token_id=[]), before)
    assert torch.equal(before, hf_generate(hf, ids, mask, 8))


@pytest.mark.parametrize("family", ("t5", "bart"))
def test_max_length_counts_the_decoder_start_token_like_hugging_face(compiled, family):
    """max_length, the usual way to bound a summary or a translation, was refused (the
    causal LM took it); as in Hugging Face it counts the decoder start token."""
    hf, _, model = compiled[family]
    ids, mask = sources([13, 5, 9], seed=3)
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids, attention_mask=mask, max_length=9, do_sample=False, num_beams=1
        )
    got = model.generate(ids, mask, max_length=9)
    assert torch.equal(got, ref), f"\nkernl {got.tolist()}\nhf    {ref.tolist()}"
    by_length = model.generate(ids, mask, max_length=9, eos_token_id=[])
    assert by_length.shape == (3, 9)
    assert torch.equal(by_length, model.generate(ids, mask, max_new_tokens=8, eos_token_id=[]))
    steps = list(model.stream(ids, mask, max_length=9, eos_token_id=[]))
    assert torch.equal(torch.stack(steps, dim=1), by_length[:, 1:])
    with pytest.warns(UserWarning, match="max_new_tokens takes precedence"):
        both = model.generate(ids, mask, max_new_tokens=3, max_length=9, eos_token_id=[])
    assert both.shape == (3, 4)
    with pytest.raises(ValueError, match="max_length=1 leaves no room after the decoder start"):
        model.generate(ids, mask, max_length=1)
    # named as the call asked (it said "max_new_tokens 49", an argument never passed)
    with pytest.raises(
        ValueError,
        match=r"^max_length 50 \(49 new tokens\) exceeds the decoder cache: it holds 48 new "
        r"tokens \(cache=48\)",
    ):
        model.generate(ids, mask, max_length=50)
    with pytest.raises(ValueError, match=r"^max_new_tokens 49 exceeds the decoder cache"):
        model.generate(ids, mask, max_new_tokens=49)  # the last call's words are not kept


def test_hugging_face_argument_names_are_taken_or_explained(compiled):
    """`inputs=` is input_ids' other name in Hugging Face; decoder_input_ids says that a
    decoder prompt is not supported, and None sampling arguments are off (both were bare
    errors: "unexpected keyword argument", "must be a finite number, got None")."""
    _, _, model = compiled["t5"]
    ids, mask = sources([6, 10], seed=4)
    ref = model.generate(ids, mask, max_new_tokens=6)
    assert torch.equal(model.generate(inputs=ids, attention_mask=mask, max_new_tokens=6), ref)
    steps = list(model.stream(inputs=ids, attention_mask=mask, max_new_tokens=6))
    assert torch.equal(torch.stack(steps, dim=1), ref[:, 1 : 1 + len(steps)])
    own = model.spec.decoder_start_token_id
    prompt = torch.tensor([[own, 5], [own, 7]])
    with pytest.raises(TypeError, match="decoder_input_ids=.*a decoder prompt is not supported"):
        model.generate(ids, mask, decoder_input_ids=prompt)
    # the start token alone is HF's decoding without them (it was refused as a prompt)
    for start in (prompt[:, :1], [[own], [own]]):
        assert torch.equal(
            model.generate(ids, mask, max_new_tokens=6, decoder_input_ids=start), ref
        )
    with pytest.raises(TypeError, match="decoder_input_ids=<tensor \\(3, 1\\)>: the decoder"):
        model.generate(ids, mask, decoder_input_ids=torch.full((3, 1), own))  # not one per row
    # HF's encoder_outputs and decoder_attention_mask were "unexpected keyword argument"
    with pytest.raises(TypeError, match=r"encoder_outputs=<tuple of tensors>: the compiled enc"):
        model.generate(ids, mask, encoder_outputs=(torch.zeros(2, 10, 32),))
    with pytest.raises(TypeError, match=r"decoder_attention_mask=<tensor \(2, 1\)>: the decoder"):
        model.stream(ids, mask, decoder_attention_mask=torch.ones(2, 1))
    assert torch.equal(model.generate(ids, mask, max_new_tokens=6, encoder_outputs=None), ref)
    with pytest.raises(TypeError, match="input_ids is required"):
        model.generate(attention_mask=mask)
    # the model's own decoder start token (or None, HF's "the config's") is taken, as HF
    # code passes it; another is refused by name (both were "unexpected keyword argument")
    for given in (own, None, torch.tensor(own), [own, own], torch.tensor([own, own])):
        got = model.generate(ids, mask, max_new_tokens=6, decoder_start_token_id=given)
        assert torch.equal(got, ref)  # one per row, as HF takes it (a list was refused)
    with pytest.raises(TypeError, match=f"decoder_start_token_id=5: .* token, {own}, as compiled"):
        list(model.stream(ids, mask, max_new_tokens=6, decoder_start_token_id=5))
    with pytest.raises(TypeError, match=r"=<tensor \(\)>: .* as compiled$"):  # not len()'s error
        model.generate(ids, mask, decoder_start_token_id=torch.tensor(5))
    with pytest.raises(TypeError, match=rf"\[{own}, 5\]: .* as compiled$"):
        model.generate(ids, mask, decoder_start_token_id=[own, 5])
    with pytest.raises(TypeError, match=r"holds one per row: 2, got 3\)$"):
        model.generate(ids, mask, decoder_start_token_id=[own] * 3)
    one = ids[0, : int(mask[0].sum())]  # one source as a 1-D tensor or a flat list: one row
    for source in (one, one.tolist()):
        alone = model.generate(source, max_new_tokens=6)
        for kw in (dict(decoder_start_token_id=[own]), dict(decoder_input_ids=[[own]])):
            assert torch.equal(model.generate(source, max_new_tokens=6, **kw), alone)
    kw = dict(max_new_tokens=6, do_sample=True, seed=2, eos_token_id=[])
    sampled = model.generate(ids, mask, temperature=1.0, top_p=1.0, top_k=0, **kw)
    off = model.generate(ids, mask, temperature=None, top_p=None, top_k=None, **kw)
    assert torch.equal(off, sampled)


@pytest.mark.parametrize(
    "edit",
    [
        lambda e: e["seq2seq"].update(num_heads=-1),
        lambda e: e["seq2seq"].update(activation="os.system"),
        lambda e: e["seq2seq"].update(d_model=48),  # weights no longer match
        lambda e: e["seq2seq"].update(decoder_start_token_id=VOCAB),
        lambda e: e["seq2seq_buckets"].update(caches=[0]),
        lambda e: e["seq2seq"].update(surprise=1),
        lambda e: e.pop("seq2seq"),
        lambda e: e["seq2seq"].update(decode_kernels="cuda-magic"),
        lambda e: e["seq2seq"].update(decode_tile=[3, 64, 0, 4, 5]),
        lambda e: e["seq2seq"].update(decode_tile=[64, 64, 0, 4]),
    ],
)
def test_a_hostile_seq2seq_description_is_refused(compiled, tmp_path, edit):
    import msgpack

    from kernl.artifacts import ArtifactError, pack_manifest, verify_artifact

    root = Path(shutil.copytree(compiled["t5"][1], tmp_path / "copy"))
    m = msgpack.unpackb((root / "manifest.msgpack").read_bytes(), raw=False)
    edit(m["extra"])
    (root / "manifest.msgpack").write_bytes(pack_manifest(m))
    with pytest.raises(ArtifactError, match="seq2seq description is invalid"):
        kernl.runtime.load(root, device="cpu")
    with pytest.raises(ArtifactError, match="seq2seq description is invalid"):
        verify_artifact(root)


def test_a_fresh_process_loads_and_generates_without_transformers(compiled):
    hf, path, _ = compiled["t5_gated"]
    ids, mask = sources([4])
    expected = hf_generate(hf, ids, mask, 6).tolist()
    script = textwrap.dedent(f"""
        import sys, torch, kernl.runtime
        m = kernl.runtime.load({str(path)!r}, device="cpu")
        out = m.generate(torch.tensor({ids.tolist()}), max_new_tokens=6, eos_token_id=[])
        assert out.tolist() == {expected}, out.tolist()
        assert "transformers" not in sys.modules, "the runtime imported transformers"
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr


def test_start_eos_and_pad_come_from_the_generation_config_alone():
    """As Hugging Face's generate: ids a generation config leaves out are not taken from
    config.json, and the start id falls back to the generation config's BOS id."""
    from transformers import GenerationConfig

    from kernl.compiler.tasks.seq2seq.describe import _token_ids

    model = tiny_seq2seq("bart")
    model.config.eos_token_id, model.config.decoder_start_token_id = 7, 5
    model.generation_config = GenerationConfig(bos_token_id=0, pad_token_id=1)
    ids = _token_ids(model)
    assert ids["eos_token_ids"] == [] and ids["decoder_start_token_id"] == 0
    assert ids["pad_token_id"] == 1
    model.generation_config = GenerationConfig(decoder_start_token_id=2, eos_token_id=[2, 3])
    ids = _token_ids(model)
    assert ids["eos_token_ids"] == [2, 3] and ids["decoder_start_token_id"] == 2
    assert ids["pad_token_id"] is None


def test_a_hooked_model_or_a_t5_with_more_decoder_layers_is_refused_by_name():
    from kernl.compiler.tasks.seq2seq.describe import describe
    from kernl.compiler.trace import UnsupportedModelError

    model = tiny_seq2seq("t5")
    handle = model.decoder.block[0].register_forward_pre_hook(lambda m, i: None)
    with pytest.raises(UnsupportedModelError, match=r"seq2seq: decoder.block.0 \(1 forward"):
        describe(model, torch.float32)
    handle.remove()
    describe(model, torch.float32)
    # more decoder than encoder layers: refused exactly where Hugging Face's own generate
    # fails on it (transformers 5.2x sizes its cache from num_layers), served where it runs
    import transformers as tf

    deeper = tf.T5ForConditionalGeneration(
        tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                    num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)
    )  # fmt: skip
    try:
        deeper.generate(input_ids=torch.tensor([[3, 4]]), max_new_tokens=2, do_sample=False)
    except Exception:  # noqa: BLE001
        with pytest.raises(UnsupportedModelError, match=r"more decoder layers \(2\) than enc"):
            describe(deeper, torch.float32)
    else:
        describe(deeper, torch.float32)


def test_a_t5_with_its_own_encoder_embedding_table_is_refused_by_name():
    """An encoder.embed_tokens that is not model.shared (a model built after
    `config.tie_word_embeddings = False`): kernl's T5 read shared for both sides and the
    compile failed validation on "greedy ids differ", saying nothing of why."""
    from kernl.compiler.tasks.seq2seq.describe import describe
    from kernl.compiler.trace import UnsupportedModelError

    model = tiny_seq2seq("t5")
    model.encoder.embed_tokens = torch.nn.Embedding(*model.shared.weight.shape)
    with pytest.raises(UnsupportedModelError, match=r"encoder.embed_tokens is not its shared"):
        describe(model, torch.float32)
    model.encoder.embed_tokens.weight.data.copy_(model.shared.weight)  # equal: one table
    describe(model, torch.float32)


@pytest.mark.parametrize("task", [None, "base", "seq2seq-lm"])
def test_a_composed_encoder_decoder_model_is_refused_as_such(tmp_path, task):
    """EncoderDecoderModel (bert2bert): inferred as an encoder, it was refused as a model "of
    characters or bytes, as CANINE"; with source= buckets, "unknown axis 'source'"."""
    import transformers as tf

    from kernl.compiler.trace import UnsupportedModelError

    bert = tf.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=32,
    )  # fmt: skip
    model = tf.EncoderDecoderModel(
        config=tf.EncoderDecoderConfig.from_encoder_decoder_configs(bert, bert)
    ).eval()
    buckets = "batch=1 seq=8" if task in (None, "base") else "batch=1 source=8 cache=16"
    with pytest.raises(UnsupportedModelError, match=r"'encoder-decoder'.* is not supported"):
        kernl.compiler.compile(model, buckets, tmp_path / "a", device="cpu", task=task)


def test_task_is_inferred_and_buckets_name_their_axes(tmp_path):
    from kernl.compiler.buckets import BucketSyntaxError
    from kernl.compiler.tasks.seq2seq.buckets import parse_seq2seq_buckets
    from kernl.compiler.trace import task_of

    bart = tiny_seq2seq("bart")
    assert task_of(bart.config, bart) == "seq2seq-lm"
    b = parse_seq2seq_buckets("batch=1,8 source=16:64 cache=32,128")
    assert (b.batches, b.sources, b.caches, b.cache_len) == ([1, 8], [16, 32, 64], [32, 128], 128)
    with pytest.raises(BucketSyntaxError, match="unknown axis 'seq' for seq2seq-lm"):
        parse_seq2seq_buckets("batch=1 seq=16")
    with pytest.raises(BucketSyntaxError, match="missing axis source"):
        parse_seq2seq_buckets("batch=1 cache=16")


def test_buckets_past_the_position_table_and_unapplied_options_are_named(tmp_path):
    """Compile (not only kernl.optimize) names the axis and the config's table: it reported
    "the seq2seq description is invalid", as if the artifact were corrupt."""
    import transformers as tf

    from kernl.compiler.buckets import BucketLimitError
    from kernl.compiler.trace import UnsupportedModelError

    bart = tiny_seq2seq("bart")  # 64 learned positions
    compile_ = functools.partial(kernl.compiler.compile, device="cpu", dtype="fp32")
    with pytest.raises(BucketLimitError, match=r"128 positions \(cache defaults to 128\)"):
        compile_(bart, "batch=1 source=16", tmp_path / "a")
    with pytest.raises(BucketLimitError, match="max_position_embeddings=64"):
        compile_(bart, "batch=1 source=128 cache=16", tmp_path / "a")
    bart.generation_config.watermarking_config = tf.WatermarkingConfig(bias=2.5)
    with pytest.raises(UnsupportedModelError, match="sets watermarking_config="):
        compile_(bart, "batch=1 source=16 cache=16", tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("fold_norms", [True, False], ids=["kernl", "kernl-linear"])
@pytest.mark.parametrize("family", FAMILIES)
def test_decode_on_kernl_kernels_gives_hugging_face_ids(compiled, family, fold_norms):
    """The decode step on kernl's few-rows kernels (what a GPU compile keeps when faster:
    norms folded into the next linear, bias and residual in the projections' epilogues),
    here through Triton's interpreter: the same greedy ids as Hugging Face."""
    hf, path, _ = compiled[family]
    model = kernl.runtime.load(path, device="cpu")
    model.model.kernels, model.model.fold_norms = True, fold_norms
    ids, mask = sources([13, 5, 9])
    got = model.generate(ids, mask, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(got, hf_generate(hf, ids, mask, 16))


@pytest.mark.parametrize("family,fold_norms", [("t5", True), ("bart", False)])
def test_decode_on_kernl_kernels_with_a_tuned_tile(compiled, family, fold_norms):
    """The launch tile the compiler may keep (TILES of its decode-kernel choice) reaches both
    few-rows kernels and changes no id."""
    from kernl.compiler.tasks.seq2seq.decode_kernels import TILES

    hf, path, _ = compiled[family]
    model = kernl.runtime.load(path, device="cpu")
    model.model.kernels, model.model.fold_norms = True, fold_norms
    model.model.set_tile(TILES[1])
    ids, mask = sources([13, 5, 9])
    got = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(got, hf_generate(hf, ids, mask, 12))


def _held_bytes(states) -> int:
    """Bytes of every storage the batch buckets' states hold (their KV caches, views of one
    storage, counted once)."""
    seen, total = set(), 0
    for state in states:
        values = [*vars(state).values(), *vars(state.cache).values(), *vars(state.sampler).values()]
        for v in values:
            for t in v.values() if isinstance(v, dict) else [v]:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in seen:
                        seen.add(storage.data_ptr())
                        total += storage.nbytes()
    return total


@pytest.mark.parametrize("family", FAMILIES)
def test_the_memory_plan_covers_the_buffers_and_refuses_a_small_device(compiled, family):
    """load() refuses an artifact whose buffers (Whisper-large-v3 at batch 64: ~16 GB of
    cross-attention keys and values) would not fit, before allocating them."""
    from kernl.artifacts import ArtifactUnsafeError
    from kernl.artifacts.reader import check_artifact

    _, path, model = compiled[family]
    plan = check_artifact(path, hash_files=False).memory
    held = _held_bytes(model._states.values())
    assert held <= plan.static_buffers <= 2 * held
    with pytest.raises(ArtifactUnsafeError, match="needs .* the device has"):
        check_artifact(path, hash_files=False, free_bytes=plan.total - 1)


def _t5_near_fp16_overflow(scale: float) -> torch.nn.Module:
    """A tiny T5 v1.1 whose feed-forward output is scaled so that its fp16 residual stream
    reaches tens of thousands (T5's known fp16 trouble)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.T5Config(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=256,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    model = tf.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("wo.weight"):
                p.mul_(scale)
    return model


def test_t5_in_fp16_near_its_range_gives_hugging_face_ids(tmp_path):
    """Activations of ~43k: squared in fp16 they overflow, so the norm keeps its variance in
    float32 as Hugging Face does (torch's RMSNorm squares in fp16 on the CPU: NaN)."""
    hf = _t5_near_fp16_overflow(2e4).half()
    ids, mask = sources([13, 5, 9])
    kernl.compiler.compile(hf, "batch=1,4 source=16 cache=32", tmp_path / "a", dtype="fp16")
    model = kernl.runtime.load(tmp_path / "a", device="cpu")
    got = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(got, hf_generate(hf, ids, mask, 12))


def test_t5_in_fp16_past_its_range_is_clamped_like_hugging_face(tmp_path):
    """Past 65504 the residual stream overflows: each block's output is clamped as Hugging
    Face's T5Block does, and the logits stay finite (they were NaN: every id 0). Built from an
    fp32 artifact cast to fp16, since in this regime fp16 itself (HF's too) leaves fp32's ids
    after a token or two and the compiler's validation would refuse it."""
    from kernl.artifacts import read_manifest
    from kernl.artifacts.reader import read_weights
    from kernl.runtime.generation.seq2seq import Seq2SeqModel

    hf = _t5_near_fp16_overflow(6e4)
    kernl.compiler.compile(hf, "batch=1,4 source=16 cache=32", tmp_path / "a", dtype="fp32")
    manifest = read_manifest(tmp_path / "a")
    manifest.dtype = "float16"
    weights = {k: v.half() for k, v in read_weights(tmp_path / "a", device="cpu").items()}
    model = Seq2SeqModel(manifest, weights, torch.device("cpu"), capture="never")
    ids, mask = sources([13, 5, 9])
    hf16 = hf.half()
    with torch.no_grad():
        hidden = hf16.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    clamped = torch.tensor(65504 - 1000, dtype=torch.float16).item()
    assert max(h.abs().max().item() for h in hidden.hidden_states) == clamped  # HF clamps too
    steps = list(model.stream(ids, mask, max_new_tokens=8, eos_token_id=[], output_logits=True))
    assert torch.isfinite(torch.stack([s[1] for s in steps])).all()
    # (which ids: in this regime fp16 leaves fp32 after a token or two, HF's fp16 as well)
    assert len(set(torch.stack([s[0] for s in steps]).flatten().tolist())) > 3


def test_per_row_seeds_give_each_row_its_call_alone(compiled):
    _, _, model = compiled["bart"]
    ids, mask = sources([9, 4, 12], seed=5)
    kw = dict(max_new_tokens=10, do_sample=True, eos_token_id=[])
    together = model.generate(ids, mask, seed=[3, 4, 3], temperature=[1.0, 0.7, 1.0], **kw)
    for i, (seed, t) in enumerate(zip([3, 4, 3], [1.0, 0.7, 1.0])):
        n = int(mask[i].sum())
        alone = model.generate(ids[i : i + 1, :n], seed=seed, temperature=t, **kw)
        assert torch.equal(together[i], alone[0])


def test_inspect_shows_the_decode_step_choice(compiled):
    from kernl.artifacts import read_manifest
    from kernl.compiler.inspect_report import inspect_artifact, render_text

    report = inspect_artifact(compiled["t5"][1])
    text = render_text(report)
    assert "decode step kernels=torch tile=default" in text  # a CPU build: plain torch
    # Its bucket axes, and no made-up error figure: every bucket showed "max |err| vs eager
    # 0" (a constant the compiler wrote; validation compares ids) and no cache axis.
    b = read_manifest(compiled["t5"][1]).extra["seq2seq_buckets"]
    assert f"cache       {', '.join(map(str, b['caches']))} (" in text
    assert f"source      {', '.join(map(str, b['sources']))}" in text
    assert "no error figure is recorded" in text and "max |err|" not in text
    assert all(bucket.max_abs_error is None for bucket in report.buckets)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_batch_buckets_view_one_cache_and_each_generates_as_hugging_face(compiled, family):
    """Every batch bucket's self- and cross-attention K/V are views of the largest bucket's
    storage (requests run one at a time); a bucket-1 request between two bucket-4 ones, each
    writing the same storage, changes neither, and all equal Hugging Face's ids."""
    hf, _, model = compiled[family]
    one, four = model._states[1].cache, model._states[4].cache
    for a, b in ((one.self_kv, four.self_kv), (one.cross_k, four.cross_k)):
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    ids, mask = sources([13, 5, 9, 16], seed=2)
    alone_ids, alone_mask = sources([7], seed=3)
    first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    single = model.generate(
        input_ids=alone_ids, attention_mask=alone_mask, max_new_tokens=20, eos_token_id=[]
    )
    again = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(again, first)
    assert torch.equal(first, hf_generate(hf, ids, mask, 20))
    assert torch.equal(single, hf_generate(hf, alone_ids, alone_mask, 20))


def test_non_finite_self_attention_values_an_earlier_request_left_reach_no_later_one(compiled):
    """Each decode step reads every self-attention slot of its bucket's length, masked or not,
    and 0 x NaN is NaN: a request starts from zeros there, whatever the storage held."""
    hf, _, model = compiled["t5"]
    ids, mask = sources([13, 5, 9, 16], seed=2)
    clean = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    for state in model._states.values():
        state.cache.self_kv.fill_(float("nan"))
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(got, clean)


def test_a_bart_config_with_fairseqs_pre_norm_keys_compiles_as_hugging_face_runs_it(tmp_path):
    """normalize_before=True and add_final_layer_norm=True, which old fairseq-converted BART
    configs carry, were refused; no transformers BART reads them (HF's runs post-norm), and
    kernl's ids equal HF's. Head counts that differ are named as such, not as widths."""
    from kernl.compiler.trace import UnsupportedModelError

    hf = tiny_seq2seq("bart")
    hf.config.normalize_before = hf.config.add_final_layer_norm = True
    kernl.compiler.compile(hf, BUCKETS, tmp_path / "a", dtype="fp32", device="cpu")
    model = kernl.runtime.load(tmp_path / "a", device="cpu")
    ids, mask = sources([9, 6])
    got = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(got, hf_generate(hf, ids, mask, 8))
    hf.config.decoder_attention_heads = 2
    with pytest.raises(UnsupportedModelError, match=r"different encoder and decoder head counts"):
        kernl.compiler.compile(hf, BUCKETS, tmp_path / "b", dtype="fp32", device="cpu")


def test_the_generation_configs_sampling_and_length_apply_where_a_call_leaves_them_out(tmp_path):
    """A loaded encoder-decoder decoded greedily for 20 tokens whatever its generation config
    said; it now takes the config's settings as Hugging Face's generate does (a call's own
    win), and refuses what kernl does not apply unless the call overrides it."""
    hf = tiny_seq2seq("bart")
    gen = hf.generation_config
    gen.do_sample, gen.top_k, gen.max_new_tokens, gen.num_return_sequences = True, 1, 6, 2
    gen.eos_token_id = None  # every row runs its whole length
    kernl.compiler.compile(hf, BUCKETS, tmp_path / "a", dtype="fp32", device="cpu")
    model = kernl.runtime.load(tmp_path / "a", device="cpu")
    ids, mask = sources([7, 12])
    with pytest.raises(ValueError, match="sets num_return_sequences=2"):
        model.generate(ids, mask)
    got = model.generate(ids, mask, num_return_sequences=1)  # top_k=1: sampling is greedy
    gen.num_return_sequences = None  # HF's greedy reference refuses it
    assert torch.equal(got, hf_generate(hf, ids, mask, 6, pad=hf.config.pad_token_id))
    assert model.generate(ids, mask, num_return_sequences=1, max_new_tokens=3).shape[1] == 4
