"""cuBLAS's first use of an artifact's GEMM shapes, on a thread while load() reads the weights
(runtime/warm_gemms.py): which GEMMs a program's aten linears run, and on the GPU that a load
with the warming gives what a load without it gives, bit for bit."""

import json

import pytest
import torch

import kernl.compiler
import kernl.runtime
from kernl.artifacts.reader import read_manifest, read_program
from kernl.runtime import warm_gemms


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    return BertModel(cfg).eval()


@pytest.fixture(scope="module")
def cpu_programs(tmp_path_factory):
    path = tmp_path_factory.mktemp("warm") / "b.kernl"
    kernl.compiler.compile(_tiny_bert(), "batch=1,2 seq=8,16", path, device="cpu", tune=False)
    manifest = read_manifest(path)
    return [read_program(path, entry.program) for entry in manifest.buckets]


def _as_tuned_to_aten(programs):
    """The tuner's choice of cuBLAS for every linear, as a GPU compile of BERT-base makes it."""
    for p in programs:
        for ins in p.instructions:
            if ins.op == "kernl.linear":
                ins.kwargs["impl"] = "aten"
    return programs


def test_the_gemms_are_the_aten_linears_of_every_bucket(cpu_programs):
    assert warm_gemms.artifact_gemms(cpu_programs) == []  # untuned: every linear on Triton
    gemms = warm_gemms.artifact_gemms(_as_tuned_to_aten(cpu_programs))
    rows = {p.bucket.batch * p.bucket.seq for p in cpu_programs}  # 8, 16 and 32
    pooler = {p.bucket.batch for p in cpu_programs}  # one row per sequence
    assert {g.rows for g in gemms} == rows | pooler
    assert len(gemms) == len(set(gemms))
    # per bucket, every linear's (in, out): the fused QKV, the output projection, the FFN's
    # two (the first with its GELU, as the executor runs it), each with a bias
    layers = {(g.in_features, g.out_features, g.activation) for g in gemms if g.rows in rows}
    assert layers == {(64, 192, "none"), (64, 64, "none"), (64, 128, "gelu"), (128, 64, "none")}
    assert all(g.bias and g.dtype == "float16" for g in gemms)  # the compile's default dtype
    sizes = [g.rows * g.out_features for g in gemms]
    assert sizes == sorted(sizes, reverse=True)


def test_a_linear_without_recorded_shapes_is_left_cold(cpu_programs):
    programs = _as_tuned_to_aten(cpu_programs)
    before = warm_gemms.artifact_gemms(programs)
    for p in programs:
        p.meta = json.loads(json.dumps({k: v for k, v in p.meta.items() if k != "values"}))
    assert before and warm_gemms.artifact_gemms(programs) == []


@pytest.mark.gpu
def test_gpu_a_load_with_warming_gives_what_a_load_without_gives(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    path = tmp_path / "b.kernl"
    kernl.compiler.compile(_tiny_bert(), "batch=1,4 seq=16,64", path, dtype="fp16", device="cuda")
    made = []
    real = warm_gemms.GemmWarming
    monkeypatch.setattr(warm_gemms, "GemmWarming", lambda *a: made.append(real(*a)) or made[-1])
    warmed = []
    for when in ("before_check", "after_check"):
        monkeypatch.setattr(kernl.runtime, "_WARM_GEMMS", when)
        warmed.append(kernl.runtime.load(path))
    monkeypatch.setattr(kernl.runtime, "_WARM_GEMMS", "")
    cold = kernl.runtime.load(path)
    assert len(made) == 2 and all(w.error is None and w.gemms for w in made)
    for b, s in ((1, 16), (4, 64), (3, 40)):
        ids = torch.randint(0, 30000, (b, s), device="cuda")
        x = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        want = cold(**x)["last_hidden_state"]
        assert all(torch.equal(m(**x)["last_hidden_state"], want) for m in warmed)
