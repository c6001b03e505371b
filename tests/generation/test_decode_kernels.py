"""A decode step on kernl's Triton kernels (Triton's interpreter on the CPU) or on SDPA computes
what the plain-torch step computes: same ids, logits within float32 rounding, for every
family, with a batch of mixed prompt lengths (left padding: the slot mask matters). Gemma2's
softcapped attention and logits stay on torch whatever the choice names; its sandwich norms
run on the norm kernel with norm "triton" or "fused"."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import kernl.compiler
import kernl.runtime
from kernl.artifacts.generation import DecodeKernels
from kernl.kernels.decode_step import (
    DecodeStepConfig,
    config_pairs,
    decode_step_choice_configs,
    decode_step_configs,
)

from .tiny_models import mixed_prompts, tiny_model

VARIANTS = [
    DecodeKernels(attention="triton"),
    DecodeKernels(attention="sdpa"),
    DecodeKernels(norm="triton", gated_mlp="triton"),
    DecodeKernels(linear="triton"),
    DecodeKernels(linear="fused"),
    DecodeKernels(norm="fused"),
    DecodeKernels(rope="triton"),
    DecodeKernels(lm_head="triton"),
    # the fused step: 7 kernels a layer on a Llama
    DecodeKernels(
        attention="triton", norm="fused", linear="fused", rope="triton", lm_head="triton"
    ),
    # rotary and the cache write in the QKV projection's epilogue: 6 a layer
    DecodeKernels(norm="fused", rope="fused"),
    DecodeKernels(rope="fused"),  # without the folded norm: rope_cache_write
    DecodeKernels(attention="triton", norm="fused", linear="fused", rope="fused", lm_head="triton"),
    # the whole step in one persistent kernel (the Llama family; GPT-2 keeps the pieces), on
    # its default config and on split K tiles flattened into their tasks' loops
    DecodeKernels(step="persistent"),
    DecodeKernels(
        step="persistent",
        step_config=config_pairs(
            DecodeStepConfig(
                QKV_N=32, O_N=64, UP_N=32, DOWN_N=64, SPLIT_O=4, SPLIT_DOWN=8, flatten=True
            )
        ),
    ),
]
# enough steps for every slot path (a cache write per step, the counters left for the next
# launch); the interpreter takes seconds a step
NEW = 6


# gemma3: two rotary tables (its window-8 layers' and its full layers'), under every variant
@pytest.fixture(
    scope="module", params=["llama3", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gpt2"]
)
def artifact(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "lm.kernl"
    kernl.compiler.compile(
        tiny_model(request.param),
        "batch=4 prompt=16 cache=32",
        out,
        dtype="fp32",
        device="cpu",
        task="causal-lm",
    )
    return out


def _steps(model, ids, mask):
    steps = list(
        model.stream(
            ids, mask, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0, output_logits=True
        )
    )
    return torch.stack([i for i, _ in steps], 1), torch.stack([lg for _, lg in steps], 1)


@pytest.mark.parametrize("kernels", VARIANTS, ids=lambda k: k.describe().replace(" ", ","))
def test_decode_variant_matches_torch_step(artifact, kernels):
    model = kernl.runtime.load(artifact)
    assert model.decoder.kernels == DecodeKernels()  # the artifact asks for nothing else
    ids, mask = mixed_prompts(3, [11, 4, 16])
    ref_ids, ref_logits = _steps(model, ids, mask)
    model.decoder.kernels = kernels
    out_ids, out_logits = _steps(model, ids, mask)
    assert out_logits.shape == ref_logits.shape == (3, NEW, 97)
    err = (out_logits - ref_logits).abs().max().item()
    assert err < 1e-4 * max(1.0, ref_logits.abs().max().item()), err
    assert torch.equal(out_ids, ref_ids)


def test_decode_kernels_are_checked():
    with pytest.raises(ValueError, match="attention must be one of"):
        DecodeKernels(attention="flash")
    assert DecodeKernels.from_dict({"norm": "triton"}) == DecodeKernels(norm="triton")
    assert DecodeKernels.from_dict(None) == DecodeKernels()


def test_forced_decode_kernels_are_stored_and_served(tmp_path):
    forced = {
        "attention": "triton",
        "norm": "fused",
        "gated_mlp": "triton",
        "linear": "fused",
        "rope": "triton",
        "lm_head": "triton",
    }
    from kernl.compiler.tasks.causal_lm import compile_causal_lm

    report = compile_causal_lm(
        tiny_model("llama3"),
        "batch=4 prompt=16 cache=24",  # the compile's check runs the forced step to the end
        tmp_path / "lm.kernl",
        dtype="fp32",
        device="cpu",
        decode_kernels=forced,
    )
    forced_k = DecodeKernels(**forced)
    assert report.decode_kernels == forced_k
    assert forced_k.describe() in report.table()
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    stored = model.manifest.extra["decode_kernels"]
    assert {k: stored[k] for k in forced} == forced and DecodeKernels.from_dict(stored) == forced_k
    assert model.decoder.kernels == DecodeKernels(**forced)
    assert not model.manifest.kernels  # binaries exist only for a GPU
    assert model.decoder.rope is None  # the torch path's [positions, D, D] matrices: unused
    ids, mask = mixed_prompts(3, [11, 4, 16])
    out_ids, out_logits = _steps(model, ids, mask)
    model.decoder.kernels = DecodeKernels()
    assert model.decoder.rope is not None  # made when a choice first needs them
    ref_ids, ref_logits = _steps(model, ids, mask)
    assert torch.equal(out_ids, ref_ids)
    assert (out_logits - ref_logits).abs().max() < 1e-4 * max(1.0, ref_logits.abs().max())


def test_a_forced_persistent_step_config_is_stored_and_served(tmp_path):
    """decode_kernels may name the persistent step's config, as the manifest stores it: the
    loaded decoder runs that config (split K, flattened loops) and computes the torch step."""
    from kernl.compiler.tasks.causal_lm import compile_causal_lm

    pairs = [["SPLIT_O", 2], ["SPLIT_DOWN", 3], ["BLOCK_K", 32], ["flatten", 1]]
    forced = {"step": "persistent", "step_config": pairs}
    compile_causal_lm(
        tiny_model("llama3"),
        "batch=4 prompt=16 cache=24",
        tmp_path / "lm.kernl",
        dtype="fp32",
        device="cpu",
        decode_kernels=forced,
    )
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    stored = model.manifest.extra["decode_kernels"]
    assert stored["step"] == "persistent" and [list(p) for p in stored["step_config"]] == pairs
    assert model.decoder.kernels.step_config == tuple(map(tuple, pairs))
    ids, mask = mixed_prompts(3, [11, 4, 16])
    out_ids, out_logits = _steps(model, ids, mask)
    assert {key[1].SPLIT_DOWN for key in model.decoder._step_buffers} == {3}  # that config ran
    model.decoder.kernels = DecodeKernels()
    ref_ids, ref_logits = _steps(model, ids, mask)
    assert torch.equal(out_ids, ref_ids)
    assert (out_logits - ref_logits).abs().max() < 1e-4 * max(1.0, ref_logits.abs().max())


def test_a_step_config_the_kernel_does_not_take_is_refused():
    with pytest.raises(ValueError, match="step_config"):
        DecodeKernels(step="persistent", step_config=(("BLOCK_K", 48),))
    with pytest.raises(ValueError, match="step_config"):
        DecodeKernels.from_dict({"step_config": [["__class__", 1]]})


def test_the_stored_step_config_names_every_field_of_the_kernel_config():
    from dataclasses import fields

    from kernl.artifacts.generation import STEP_CONFIG_FIELDS
    from kernl.kernels.decode_step import DecodeStepConfig, config_from_pairs

    assert [f.name for f in fields(DecodeStepConfig)] == list(STEP_CONFIG_FIELDS)
    for config in decode_step_configs():  # every config the compiler tries can be stored
        k = DecodeKernels(step="persistent", step_config=config_pairs(config))
        assert config_from_pairs(k.step_config) == config
    # a config stored before att_fill existed runs as it was timed (a fixed number of chunks);
    # no pairs at all is the default
    older = tuple(p for p in config_pairs(DecodeStepConfig()) if p[0] != "att_fill")
    assert config_from_pairs(older) == DecodeStepConfig(att_fill=False)
    assert config_from_pairs(()) == DecodeStepConfig()


def test_choice_keeps_an_alternative_only_when_measurably_faster(artifact):
    from kernl.compiler.tasks.causal_lm.decode_kernels import choose_decode_kernels

    model = kernl.runtime.load(artifact)
    gated = model.decoder.gated_silu_without_bias
    cost = {"torch": 10.0, "sdpa": 9.95, "triton": 8.0}  # sdpa: within MIN_GAIN, not kept
    said = []

    def fake_ms(gen):
        k = gen.decoder.kernels
        if k.norm == "triton":
            raise RuntimeError("no kernel for this shape")
        ms = cost[k.attention] - (1.0 if k.gated_mlp == "triton" else 0.0)
        ms += {"torch": 0.0, "triton": 0.5, "fused": -0.5}[k.linear]  # triton slower: not kept
        ms += 0.2 if k.norm == "fused" else 0.0  # slower: not kept
        ms -= 0.3 if k.rope != "torch" else 0.0  # kept (triton; fused is no faster)
        ms -= 0.01 if k.lm_head == "triton" else 0.0  # within MIN_GAIN: not kept
        ms += 1.0 if k.step == "persistent" else 0.0  # slower: not kept
        if k.step_config:  # one of its configs fails to launch here: reported, not kept
            if dict(k.step_config)["ATT_SPLITS"] == 16:
                raise RuntimeError("cooperative launch too large")
        return [ms]  # the artifact's one decode bucket

    chosen, timings = choose_decode_kernels(model, said.append, step_ms=fake_ms)
    mlp = "triton" if gated else "torch"
    # Gemma2's softcaps: kernl's decode attention but not SDPA, no lm_head kernel, nothing
    # timed that the step would not run
    sdpa_fits = model.decoder.sdpa_fits
    lm_head_fits = model.decoder.lm_head_kernel_fits
    att = "triton"
    # Qwen3's per-head norms sit between the projection and the rotary: its rotary kernel is
    # kernels/rotary.py after them, and no persistent step (which rotates what it projects)
    qk_norm = model.decoder.spec.qk_norm
    rope = "triton"
    persistent = gated and not qk_norm
    assert chosen == DecodeKernels(attention=att, gated_mlp=mlp, linear="fused", rope=rope)
    assert model.decoder.kernels == chosen and not model._steps
    k = [
        (
            t.kernels.attention,
            t.kernels.norm,
            t.kernels.gated_mlp,
            t.kernels.linear,
            t.kernels.rope,
            t.kernels.lm_head,
        )
        for t in timings
    ]
    t = "torch"
    expected = [(t, t, t, t, t, t)]
    if sdpa_fits:
        expected.append(("sdpa", t, t, t, t, t))
    expected.append(("triton", t, t, t, t, t))
    expected.append((att, "triton", t, t, t, t))  # fails: reported, not kept
    # folded into the next linear only where the norms fold (not Gemma's (1 + weight) ones,
    # nor an RMSNorm in fp16): elsewhere "fused" would time the unfolded pieces again
    folds = model.decoder.norm_folds
    if folds:
        expected.append((att, "fused", t, t, t, t))
    if gated:  # GPT-2's MLP is not gated: nothing to try
        expected.append((att, t, "triton", t, t, t))
    expected += [
        (att, t, mlp, "triton", t, t),
        (att, t, mlp, "fused", t, t),
    ]
    expected += [
        (att, t, mlp, "fused", "triton", t),
        (att, t, mlp, "fused", "fused", t),  # as fast as triton: not kept
    ]
    if lm_head_fits:
        expected.append((att, t, mlp, "fused", rope, "triton"))
    # then every piece on kernl's most fused kernel at once, in case they only pay together
    together = (att, "fused" if folds else "triton", "triton" if gated else t, "fused", "fused")
    expected.append((*together, "triton" if lm_head_fits else t))
    if persistent:  # the Llama family's persistent step: each of its configs, last
        expected += [(att, t, mlp, "fused", rope, t)] * len(decode_step_choice_configs())
    assert k == expected
    assert all(t.kernels.step == "pieces" for t in timings[: len(timings) - 3 * persistent])
    norm_triton = k.index((att, "triton", t, t, t, t))
    assert "failed (RuntimeError: no kernel for this shape)" in timings[norm_triton].describe()
    assert len(said) == len(timings) + persistent  # each timing, and why the persistent step lost
    if persistent:
        assert said[-1].endswith("not faster than the pieces at any decode bucket")
    failed = [t for t in timings if "cooperative launch too large" in t.describe()]
    assert len(failed) == (1 if persistent else 0)


@pytest.fixture(scope="module")
def four_buckets(tmp_path_factory):
    """A Llama with four decode buckets: batch 1 and 4, over 16 and 32 slots."""
    out = tmp_path_factory.mktemp("buckets") / "lm.kernl"
    kernl.compiler.compile(
        tiny_model("llama3"),
        "batch=1,4 prompt=8 cache=16,32",
        out,
        dtype="fp32",
        device="cpu",
        task="causal-lm",
    )
    return out


@pytest.mark.parametrize("mix_confirms", [True, False])
def test_the_persistent_step_is_kept_bucket_by_bucket(four_buckets, mix_confirms):
    """Each decode bucket takes the persistent step on its fastest config where that beats the
    pieces by MIN_GAIN; the others keep the pieces; the mix is timed once more and kept only
    if it is faster in total."""
    from kernl.compiler.tasks.causal_lm.decode_kernels import choose_decode_kernels

    model = kernl.runtime.load(four_buckets)
    shapes = model.buckets.decode_shapes()
    assert shapes == [(1, 16), (1, 32), (4, 16), (4, 32)]
    first, second, third = (config_pairs(c) for c in decode_step_choice_configs())
    per_config = {  # ms per bucket; the pieces chosen take 10 at each
        first: [9.5, 10.5, 9.95, 11.0],  # wins at 1x16 (5%); 4x16 within MIN_GAIN
        second: [9.6, 10.4, 9.0, 12.0],  # wins at 4x16 (10%)
        third: [9.9, 9.0, 12.0, 10.5],  # wins at 1x32
    }

    def fake_ms(gen):
        k = gen.decoder.kernels
        if k.step == "pieces":
            return [12.0 - 2.0 * (k.attention == "triton")] * 4
        if k.step_buckets:  # the mix: what each bucket chose, or slower in total
            return [9.0 if mix_confirms else 10.5] * 4
        return per_config[k.step_config]

    said = []
    chosen, timings = choose_decode_kernels(model, said.append, step_ms=fake_ms)
    assert chosen.attention == "triton"  # the pieces were chosen first, as always
    assert [t.kernels.step_config for t in timings[-4:-1]] == [first, second, third]
    mixed = timings[-1].kernels
    assert mixed.step == "persistent" and mixed.step_config == ()
    assert mixed.step_buckets == ((1, 16, first), (1, 32, third), (4, 16, second))
    line = next(m for m in said if "step_buckets=" in m)
    assert "step_buckets=1x16,1x32,4x16" in line
    assert (
        "(9.000 + 9.000 + 9.000 + 9.000)" if mix_confirms else "10.500 + "
    ) in line  # each bucket's time is reported
    assert chosen == (mixed if mix_confirms else dataclasses.replace(mixed, **PIECES))
    assert ("not faster in total" in said[-1]) is not mix_confirms
    assert model.decoder.kernels == chosen and not model._steps


PIECES = {"step": "pieces", "step_buckets": ()}


def test_the_persistent_step_serves_only_its_buckets(four_buckets):
    """A decoder whose persistent step serves some buckets runs it there, on each bucket's own
    config, and the pieces elsewhere; every bucket computes the plain torch step."""
    model = kernl.runtime.load(four_buckets)
    small = config_pairs(DecodeStepConfig(BLOCK_K=32, SPLIT_DOWN=2))
    other = config_pairs(DecodeStepConfig(BLOCK_K=32, SPLIT_O=2, flatten=True))
    k = DecodeKernels(step="persistent", step_buckets=((1, 16, small), (4, 32, other)))
    assert k.step_config_for(1, 16) == small and k.step_config_for(4, 32) == other
    assert k.step_config_for(1, 32) is None and k.step_config_for(4, 16) is None
    assert dataclasses.replace(k, step="pieces").step_config_for(1, 16) is None
    assert DecodeKernels(step="persistent").step_config_for(4, 16) == ()  # every bucket
    for batch, prompts in ((1, [5]), (4, [7, 3, 8, 2])):
        ids, mask = mixed_prompts(batch, prompts)
        # 12 new tokens: the first steps in the 16-slot bucket (the persistent step at 1x16,
        # the pieces at 4x16), the rest in the 32-slot one (the pieces at 1x32, the
        # persistent step at 4x32)
        model.decoder.kernels = DecodeKernels()
        model._steps.clear()
        ref = list(model.stream(ids, mask, max_new_tokens=12, eos_token_id=[], output_logits=True))
        model.decoder.kernels = k
        model._steps.clear()
        model.decoder._step_buffers.clear()
        out = list(model.stream(ids, mask, max_new_tokens=12, eos_token_id=[], output_logits=True))
        ran = {(rows, c.SPLIT_DOWN, c.SPLIT_O) for rows, c in model.decoder._step_buffers}
        assert ran == ({(1, 2, 4)} if batch == 1 else {(4, 8, 2)})
        assert len(out) == len(ref) == 12
        for (i, lg), (ri, rlg) in zip(out, ref):
            assert torch.equal(i, ri)
            assert (lg - rlg).abs().max() < 1e-4 * max(1.0, rlg.abs().max())


def test_a_step_bucket_the_artifact_does_not_have_is_refused(four_buckets, tmp_path):
    import shutil

    import msgpack

    from kernl.artifacts import ArtifactError, pack_manifest

    pairs = [list(p) for p in config_pairs(DecodeStepConfig())]
    root = Path(shutil.copytree(four_buckets, tmp_path / "copy"))
    m = msgpack.unpackb((root / "manifest.msgpack").read_bytes(), raw=False)
    m["extra"]["decode_kernels"] = {"step": "persistent", "step_buckets": [[4, 32, pairs]]}
    (root / "manifest.msgpack").write_bytes(pack_manifest(m))
    model = kernl.runtime.load(root)  # as a manifest stores it: lists
    assert model.decoder.kernels.step_config_for(4, 32) == config_pairs(DecodeStepConfig())
    m["extra"]["decode_kernels"]["step_buckets"] = [[2, 32, pairs]]
    (root / "manifest.msgpack").write_bytes(pack_manifest(m))
    with pytest.raises(ArtifactError, match="persistent step at 2x32, not a decode bucket"):
        kernl.runtime.load(root)


@pytest.mark.parametrize(
    "entries",
    [
        [[1, 16]],
        [[1, 16, [["BLOCK_K", 48]]]],
        [[17, 16, []]],
        [[1, 0, []]],
        [[True, 16, []]],
        [[1, 16, []], [1, 16, []]],
        "1x16",
        [[1, 16, [["x", 1]] * 33]],
    ],
    ids=["short", "bad-config", "too-many-rows", "no-slots", "bool", "twice", "text", "long"],
)
def test_malformed_step_buckets_are_refused(entries):
    with pytest.raises(ValueError, match="step_buckets|step_config"):
        DecodeKernels.from_dict({"step": "persistent", "step_buckets": entries})


def test_the_summary_gives_each_decode_buckets_step_time():
    from kernl.compiler.tasks.causal_lm.compile import CausalLMReport
    from kernl.compiler.tasks.causal_lm.decode_kernels import DecodeTiming

    k = DecodeKernels(step="persistent", step_buckets=((1, 512, ()),))
    report = CausalLMReport(Path("lm.kernl"), "causal-lm", "bf16", "cuda", decode_kernels=k)
    report.decode_buckets = ["1x512", "1x2048"]
    report.decode_timings = [
        DecodeTiming(DecodeKernels(), (1.25, 1.5)),
        DecodeTiming(k, (0.75, 1.5)),
        DecodeTiming(DecodeKernels(attention="triton"), None, "RuntimeError: no kernel"),
    ]
    lines = report.table().splitlines()
    start = lines.index("decode step timings, one step per decode bucket, ms (1x512 + 1x2048):")
    assert lines[start + 1].endswith("step=pieces: 2.750 ms (1.250 + 1.500)")
    assert lines[start + 2].endswith("step_buckets=1x512: 2.250 ms (0.750 + 1.500)")
    assert lines[start + 3].endswith("failed (RuntimeError: no kernel)")
    assert "decode step kernels: " in lines[start + 4] and "step_buckets=1x512" in lines[start + 4]


def test_step_timing_and_binary_recording_run_on_the_cpu(artifact):
    """The GPU paths' Python on the CPU: eager steps timed, no binaries (interpreter)."""
    from kernl.compiler.tasks.causal_lm.decode_kernels import _bucket_ms, record_decode_binaries

    model = kernl.runtime.load(artifact)
    model.decoder.kernels = DecodeKernels(attention="triton")
    ms = _bucket_ms(model, replays=2)
    assert len(ms) == len(model.buckets.decode_shapes()) and min(ms) > 0
    assert record_decode_binaries(model) == {}
    ids, mask = mixed_prompts(3, [11, 4, 16])
    assert model.generate(ids, mask, max_new_tokens=4).shape == (3, 20)


@pytest.mark.parametrize(
    "edit",
    [
        lambda e: e.update(decode_kernels={"attention": "os.system"}),
        lambda e: e.update(decode_kernels={"attention": "torch", "shell": "rm"}),
        lambda e: e.update(decode_kernels=["triton"]),
        lambda e: e.pop("decoder"),
        lambda e: e.update(generation_buckets={"batches": "x"}),
        lambda e: e["decoder"].update(qk_norm="yes"),
        lambda e: e["decoder"].update(qk_norm=True, norm="layer"),
        lambda e: e["decoder"].update(norm_plus_one=1),
        lambda e: e["decoder"].update(norm_plus_one=True, norm="layer"),
        lambda e: e["decoder"].update(embed_scale=float("nan")),
        lambda e: e["decoder"].update(attn_logit_softcap=0.0),
        lambda e: e["decoder"].update(final_logit_softcap=-30.0),
        lambda e: e["decoder"].update(final_logit_softcap=float("inf")),
        lambda e: e["decoder"].update(attn_logit_softcap="50"),
        lambda e: e["decoder"].update(sandwich_norms=1),
        lambda e: e["decoder"].update(sandwich_norms=True, norm="layer"),
        lambda e: e["decoder"].update(sliding_window=0, sliding_layers=[0]),
        lambda e: e["decoder"].update(sliding_window="8", sliding_layers=[0]),
        lambda e: e["decoder"].update(sliding_window=8, sliding_layers=[]),
        lambda e: e["decoder"].update(sliding_window=None, sliding_layers=[0]),
        lambda e: e["decoder"].update(sliding_window=8, sliding_layers=[0, 0]),
        lambda e: e["decoder"].update(sliding_window=8, sliding_layers=[1, 0]),
        lambda e: e["decoder"].update(sliding_window=8, sliding_layers=[99]),
        lambda e: e["decoder"].update(sliding_window=8, sliding_layers=0),
        lambda e: e["decoder"].update(rope_local_layers=[0, 0]),
        lambda e: e["decoder"].update(rope_local_layers=[99]),
        lambda e: e["decoder"].update(rope_local_layers=0),
        lambda e: e["decoder"].update(rope_local_attention_scaling=float("nan")),
    ],
    ids=[
        "unknown-choice",
        "unknown-field",
        "not-a-map",
        "no-decoder",
        "bad-buckets",
        "qk-norm-not-a-bool",
        "qk-norm-of-a-layer-norm",
        "norm-plus-one-not-a-bool",
        "norm-plus-one-of-a-layer-norm",
        "embed-scale-nan",
        "attn-softcap-zero",
        "final-softcap-negative",
        "final-softcap-inf",
        "attn-softcap-a-string",
        "sandwich-norms-not-a-bool",
        "sandwich-norms-of-a-layer-norm",
        "window-zero",
        "window-a-string",
        "window-without-layers",
        "layers-without-a-window",
        "window-layer-twice",
        "window-layers-out-of-order",
        "window-layer-out-of-range",
        "window-layers-not-a-list",
        "rope-local-layer-twice",
        "rope-local-layer-out-of-range",
        "rope-local-layers-not-a-list",
        "rope-local-scaling-nan",
    ],  # fmt: skip
)
def test_a_hostile_causal_lm_description_is_refused_as_an_artifact_error(artifact, tmp_path, edit):
    """A consistent (re-signed) manifest whose causal-LM description is not one kernl wrote."""
    import shutil

    import msgpack

    from kernl.artifacts import ArtifactError, pack_manifest

    root = Path(shutil.copytree(artifact, tmp_path / "copy"))
    m = msgpack.unpackb((root / "manifest.msgpack").read_bytes(), raw=False)
    edit(m["extra"])
    (root / "manifest.msgpack").write_bytes(pack_manifest(m))
    with pytest.raises(ArtifactError, match="causal-LM description is invalid"):
        kernl.runtime.load(root)


def test_a_description_written_before_gemmas_fields_loads_with_their_defaults(artifact, tmp_path):
    """embed_scale and norm_plus_one came with Gemma, the softcaps and sandwich_norms with
    Gemma2, sliding_window and sliding_layers after, rope_local_layers and its scaling with
    Gemma3: an artifact without them is a plain Llama-style decoder (scale 1, norms by their
    weight, no softcap, no norm of the attention or MLP output, no window, one rotary table),
    and serves as it did."""
    import shutil

    import msgpack

    from kernl.artifacts import pack_manifest

    root = Path(shutil.copytree(artifact, tmp_path / "copy"))
    m = msgpack.unpackb((root / "manifest.msgpack").read_bytes(), raw=False)
    if m["extra"]["decoder"]["model_type"] in ("gemma", "gemma2", "gemma3_text"):
        pytest.skip("a Gemma artifact needs both fields")
    assert m["extra"]["decoder"].pop("embed_scale") == 1.0
    assert m["extra"]["decoder"].pop("norm_plus_one") is False
    for name in ("attn_logit_softcap", "final_logit_softcap"):  # Gemma2's: after Gemma's
        assert m["extra"]["decoder"].pop(name) is None
    assert m["extra"]["decoder"].pop("sandwich_norms") is False
    assert m["extra"]["decoder"].pop("sliding_window") is None  # none of these families'
    assert m["extra"]["decoder"].pop("sliding_layers") == []
    assert m["extra"]["decoder"].pop("rope_local_layers") == []  # Gemma3's, after the window
    assert m["extra"]["decoder"].pop("rope_local_attention_scaling") == 1.0
    (root / "manifest.msgpack").write_bytes(pack_manifest(m))
    old, new = kernl.runtime.load(root), kernl.runtime.load(artifact)
    assert old.decoder.spec == new.decoder.spec
    ids, mask = mixed_prompts(3, [11, 4, 16])
    assert torch.equal(
        old.generate(ids, mask, max_new_tokens=4), new.generate(ids, mask, max_new_tokens=4)
    )


def test_gemma3_is_not_served_by_the_kernels_that_read_one_rotary_table():
    """Gemma3's sliding-window and full-attention layers rotate with two tables: the persistent
    step (one table in its weights) is refused naming them, and a step with rope "fused" runs
    kernels/rotary.py per layer, not the fused kernels that read `Decoder.cos` alone."""
    from kernl.compiler.tasks.causal_lm.describe import describe
    from kernl.runtime.generation.decoder import Decoder

    spec, weights = describe(tiny_model("gemma3"), 48, torch.float32)
    assert spec.rope_local_layers == [0, 1, 3, 4]
    decoder = Decoder(spec, weights, 48, torch.float32, torch.device("cpu"))
    assert decoder.two_rope_tables and not decoder.persistent_fits
    why = decoder.kernels_that_do_not_apply(DecodeKernels(step="persistent"))
    assert any("one rotary table" in w for w in why), why
    assert not torch.equal(decoder.cos, decoder.cos_local)


def test_the_persistent_step_is_refused_for_heads_that_are_not_a_power_of_two_wide():
    """Its head loops are tl.arange over the head: Phi-3-mini's 96 (here 24) was taken as
    fitting, failed in the tuner on the GPU, and crashed with Triton's error when forced
    (review)."""
    import transformers as tf

    from kernl.compiler.tasks.causal_lm.describe import describe
    from kernl.runtime.generation.decoder import Decoder

    for head_dim, fits in ((24, False), (16, True)):
        llama = tf.LlamaForCausalLM(
            tf.LlamaConfig(hidden_size=96, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=head_dim, intermediate_size=64,
                           vocab_size=50, pad_token_id=0)
        )  # fmt: skip
        spec, weights = describe(llama, 32, torch.float32)
        decoder = Decoder(spec, weights, 32, torch.float32, torch.device("cpu"))
        assert decoder.persistent_fits is fits
        why = decoder.kernels_that_do_not_apply(DecodeKernels(step="persistent"))
        assert any(f"heads are {head_dim} wide" in w for w in why) is not fits, why


def test_inspect_shows_the_decode_step_kernels(artifact):
    from kernl.compiler.inspect_report import inspect_artifact, render_text

    text = render_text(inspect_artifact(artifact))
    assert "decode step attention=torch norm=torch gated_mlp=torch linear=torch" in text


def test_choice_keeps_plain_torch_when_the_baseline_cannot_be_timed(artifact):
    from kernl.compiler.tasks.causal_lm.decode_kernels import choose_decode_kernels

    model = kernl.runtime.load(artifact)

    def broken(gen):
        raise RuntimeError("timer unavailable")

    chosen, timings = choose_decode_kernels(model, lambda _: None, step_ms=broken)
    assert chosen == DecodeKernels() and len(timings) == 1 and timings[0].error


def test_kernels_the_compiler_chose_that_fail_validation_fall_back_to_torch(monkeypatch):
    from types import SimpleNamespace

    from kernl.compiler.tasks.causal_lm import compile as causal_compile
    from kernl.compiler.validate import ValidationError

    def fake_validate(gen, model, atol, rtol, progress=None):
        if gen.decoder.kernels != DecodeKernels():
            raise ValidationError("logits differ from eager by 3.1 > atol 0.1")
        return ["plain torch passed"]

    monkeypatch.setattr(causal_compile, "validate_generation", fake_validate)
    fused = DecodeKernels(attention="triton", norm="fused", linear="fused", rope="fused")

    def gen():
        return SimpleNamespace(decoder=SimpleNamespace(kernels=None), _steps={"graph": 1})

    said, g = [], gen()
    chosen, stages = causal_compile.validated_choice(g, None, fused, True, 0.1, 0.0, said.append)
    assert chosen == DecodeKernels() and stages == ["plain torch passed"]
    assert g.decoder.kernels == DecodeKernels() and not g._steps  # recaptured on torch
    assert "failed validation" in said[-1] and "rope=fused" in said[-1]
    # kernels the user forced: the failure is the compile's
    with pytest.raises(ValidationError):
        causal_compile.validated_choice(gen(), None, fused, False, 0.1, 0.0, said.append)
    # a choice that validates is kept
    monkeypatch.setattr(causal_compile, "validate_generation", lambda *a, **k: ["ok"])
    assert causal_compile.validated_choice(gen(), None, fused, True, 0.1, 0.0, print) == (
        fused,
        ["ok"],
    )


def test_a_persistent_step_that_timed_out_fails_the_request_loudly(artifact):
    """A barrier wait of the persistent step that timed out (another kernel held the SMs it
    needed) flags its counters: the request raises instead of returning wrong tokens, and the
    flag is cleared for the next one. A flag an abandoned request left (a stream closed before
    its end checks nothing) fails no later request."""
    model = kernl.runtime.load(artifact)
    model.decoder.kernels = DecodeKernels(step="persistent")
    ids, mask = mixed_prompts(3, [11, 4, 16])
    if not model.decoder.persistent_fits:  # GPT-2 keeps the pieces: nothing can time out
        model.generate(ids, mask, max_new_tokens=2)
        return
    model.generate(ids, mask, max_new_tokens=2)
    step, times_out = model.decoder._persistent_decode, [False]

    def persistent_decode(*args, **kwargs):  # (CPU: steps run eagerly, no graph)
        out = step(*args, **kwargs)
        if times_out[0]:
            model.decoder._step_shared[-1][2] = 1  # what a timed-out wait leaves
        return out

    model.decoder._persistent_decode = persistent_decode
    times_out[0] = True
    with pytest.raises(RuntimeError, match="timed out waiting at a grid barrier"):
        model.generate(ids, mask, max_new_tokens=2)
    times_out[0] = False
    model.generate(ids, mask, max_new_tokens=2)  # cleared: the next request runs
    times_out[0] = True
    with pytest.raises(RuntimeError, match="timed out"):
        list(model.stream(ids, mask, max_new_tokens=2))
    with model.open_batch([[5, 6, 7]], max_new_tokens=4) as batch:  # what kernl serve runs
        with pytest.raises(RuntimeError, match="timed out"):
            batch.steps(2)
    times_out[0] = False
    model.decoder._step_shared[-1][2] = 1  # left by a request abandoned after its flag
    assert model.generate(ids, mask, max_new_tokens=2).shape[0] == 3


def test_the_runtime_takes_the_loaded_weights_before_the_persistent_step_stacks_them(
    four_buckets, monkeypatch
):
    """load() hands the model its dict of loaded tensors, and the persistent step stacks the
    layers' weights into new tensors: the dict is emptied first, so each loaded tensor dies
    as its stack replaces it instead of sitting beside the stacks through the graphs' capture
    (twice the weights at load, which the memory plan does not charge)."""
    import gc
    import weakref

    from safetensors.torch import load_file

    from kernl.artifacts import read_manifest
    from kernl.runtime.generation import GenerativeModel
    from kernl.runtime.generation.decoder import Decoder

    manifest = read_manifest(four_buckets)
    manifest.extra["decode_kernels"] = dataclasses.asdict(DecodeKernels(step="persistent"))
    weights = load_file(four_buckets / "weights.safetensors")
    stacked = ("qkv.weight", "o.weight", "gate_up.weight", "down.weight")
    loaded = [weakref.ref(t) for k, t in weights.items() if k.endswith(stacked)]
    assert len(loaded) == 4 * tiny_model("llama3").config.num_hidden_layers
    alive = []
    prepare = Decoder._prepare_persistent_step

    def counting(self):
        prepare(self)
        gc.collect()
        alive.append(sum(ref() is not None for ref in loaded))

    monkeypatch.setattr(Decoder, "_prepare_persistent_step", counting)
    model = GenerativeModel(manifest, weights, torch.device("cpu"))
    assert model.decoder.kernels.step == "persistent"
    assert alive == [0] and not weights
    ids, mask = mixed_prompts(4, [8, 3, 5, 8])
    monkeypatch.undo()
    same = kernl.runtime.load(four_buckets)
    same.decoder.kernels = DecodeKernels(step="persistent")
    assert torch.equal(
        model.generate(ids, mask, max_new_tokens=6), same.generate(ids, mask, max_new_tokens=6)
    )


def test_an_fp16_rms_norm_is_not_folded_where_x_times_its_gain_passes_65504(tmp_path):
    """The folding kernels round x * g to fp16 before RMSNorm's deferred 1 / rms: a massive
    activation (3000 on one channel) times a gain of 30 passed 65504, and every decode step's
    logits were NaN (id 0 each step) where eager fp16 stays finite (review 2026-12-07). In
    fp16 an RMSNorm is not folded: norm "fused", the final norm in lm_head "triton" and the
    persistent step run their unfolded pieces."""
    import copy

    import transformers as T

    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=120,
                        max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    hf = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, 3] = 3000.0
        hf.model.layers[0].input_layernorm.weight[3] = 30.0
    out = tmp_path / "llama.kernl"
    kernl.compiler.compile(hf, "batch=1 prompt=8 cache=32", out, dtype="fp16", device="cpu",
                           task="causal-lm")  # fmt: skip
    model = kernl.runtime.load(out, device="cpu")
    assert not model.decoder.norm_folds and not model.decoder.final_norm_folds
    assert not model.decoder.persistent_fits
    prompt = [[5, 9, 7, 11, 7]]
    with torch.no_grad():
        want = (
            copy.deepcopy(hf)
            .half()
            .generate(torch.tensor(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)[
                0, 5:
            ]
        )
    for kernels in (DecodeKernels(norm="fused"), DecodeKernels(lm_head="triton"),
                    DecodeKernels(step="persistent")):  # fmt: skip
        model.decoder.kernels = kernels
        steps = list(model.stream(prompt, max_new_tokens=6, eos_token_id=[], output_logits=True))
        assert all(bool(torch.isfinite(logits).all()) for _, logits in steps), kernels
        assert [int(ids[0]) for ids, _ in steps] == want.tolist(), kernels
