"""The QKV linear + attention groups (compiler/passes/qkv_attention.py) and the choice after
tuning (compiler/tune_qkv_attention.py): which programs hold a group, the fused program
computing what the two launches did, the tuner's records following the instructions, and a
compile whose groups are fused loading in a fresh process and matching eager."""

from __future__ import annotations

import copy
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

import kernl.compiler
import kernl.compiler.tasks.encoder as encoder_task
import kernl.compiler.tune as tune
import kernl.compiler.tune_qkv_attention as tqa
from kernl.artifacts.reader import read_program
from kernl.artifacts.schema import Bucket
from kernl.compiler.lower import lower
from kernl.compiler.passes import rewrite
from kernl.compiler.passes.qkv_attention import fuse_qkv_attention, qkv_attention_groups
from kernl.compiler.trace import FlatModel, export_bucket, model_signature
from kernl.compiler.tune import TuneRecord, TuneSession, tune_program
from kernl.runtime.executor import Executor

sys.path.insert(0, str(Path(__file__).parents[2] / "e2e"))
from test_compile_load import assert_matches_eager, make_calls, serve_fresh  # noqa: E402

CPU = torch.device("cpu")
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def _bert_program(bucket: Bucket | None = None):
    bucket = bucket or Bucket(2, 8)
    torch.manual_seed(0)
    model = BertModel(BertConfig(**SMALL, vocab_size=100)).eval()
    sig = model_signature(model, CPU)
    flat = FlatModel(model, [s.name for s in sig.inputs], [s.name for s in sig.outputs])
    program, weights = lower(
        export_bucket(flat, bucket, 100, CPU), bucket, flat.input_names
    )  # fmt: skip
    weights = dict(weights)
    program = rewrite(program, weights)
    ids = torch.randint(0, 100, (bucket.batch, bucket.seq))
    mask = torch.ones_like(ids)
    mask[-1, bucket.seq // 2 :] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    return program, weights, inputs


def _ops(program):
    return Counter(i.op for i in program.instructions)


@pytest.mark.parametrize("impl", ["aten", "triton"])
def test_fused_groups_compute_what_the_two_launches_did(impl):
    program, weights, inputs = _bert_program()
    groups = qkv_attention_groups(program)
    assert len(groups) == 2 and all(g.num_heads == 4 for g in groups)
    before = _ops(program)
    fused = fuse_qkv_attention(copy.deepcopy(program), [])
    assert _ops(fused) == before  # nothing chosen: nothing changes
    fused = copy.deepcopy(program)
    fused = fuse_qkv_attention(fused, [(g, impl, None) for g in qkv_attention_groups(fused)])
    after = _ops(fused)
    assert after["kernl.qkv_attention"] == 2 and after["kernl.attention"] == 0
    assert after["kernl.linear"] == before["kernl.linear"] - 2
    assert "aten.split_with_sizes.default" not in after
    assert after["aten.transpose.int"] == before["aten.transpose.int"] - 6
    want = Executor(program, weights, CPU).run(inputs)
    got = Executor(fused, weights, CPU).run(inputs)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-5)


def test_a_head_read_elsewhere_or_a_long_sequence_is_no_group():
    program, _, _ = _bert_program()
    split = next(i for i in program.instructions if i.op == "aten.split_with_sizes.default")
    program.outputs.append(split.outputs[1])  # k is also a model output
    assert len(qkv_attention_groups(program)) == 1
    program, _, _ = _bert_program(Bucket(1, 130))
    assert qkv_attention_groups(program) == []  # longer than the kernel's one block


def test_nothing_timed_nothing_fused():
    program, weights, inputs = _bert_program()
    records = tune_program(program, weights, inputs, CPU, session=TuneSession())
    before = copy.deepcopy(program.instructions)
    assert tqa.tune_qkv_attention(program, weights, inputs, CPU, records, TuneSession()) == 0
    assert program.instructions == before


def test_records_follow_the_instructions_after_a_fusion(monkeypatch):
    program, weights, inputs = _bert_program()
    records = tune_program(program, weights, inputs, CPU, session=TuneSession())
    for n, r in enumerate(records):  # as a GPU tuner leaves them
        r.time_us, r.aten_time_us = 10.0 + n, 20.0 + n
    ops_of = {id(r): program.instructions[r.index].op for r in records}
    monkeypatch.setattr(tqa, "_timing_target", lambda device: "a GPU")
    config = {"block_k": 16, "num_warps": 4, "num_stages": 2}
    # the first group's fused kernel is faster than its two launches, the second's is not
    speeds = iter([1.0, 1e9])
    monkeypatch.setattr(tqa, "_best_fused", lambda *a: (config, next(speeds), False, [], 3))
    assert tqa.tune_qkv_attention(program, weights, inputs, CPU, records, TuneSession()) == 1
    assert _ops(program)["kernl.qkv_attention"] == 1 and _ops(program)["kernl.attention"] == 1
    fused = [r for r in records if r.op == "kernl.qkv_attention"]
    assert len(fused) == 1 and fused[0].time_us == 1.0 and fused[0].timed == 3
    for r in records:  # every record names its instruction in the fused program
        assert program.instructions[r.index].op == ops_of.get(id(r), "kernl.qkv_attention")
    ins = program.instructions[fused[0].index]
    assert ins.kwargs == {"impl": "triton", "config": [[k, v] for k, v in sorted(config.items())]}
    assert len(records) == len({r.index for r in records})
    assert isinstance(records[0], TuneRecord)


def test_a_compile_with_fused_groups_loads_in_a_fresh_process_and_matches_eager(
    tmp_path, monkeypatch
):
    def fuse_all(program, weights, inputs, device, records, session, benchmark=True):
        chosen = [(g, "triton", None) for g in qkv_attention_groups(program)]
        fuse_qkv_attention(program, chosen)
        records.clear()  # the report then lists no instruction of the old numbering
        return len(chosen)

    monkeypatch.setattr(encoder_task, "tune_qkv_attention", fuse_all)
    torch.manual_seed(0)
    model = BertModel(BertConfig(**SMALL, vocab_size=120, max_position_embeddings=80)).eval()
    artifact = tmp_path / "bert.kernl"
    kernl.compiler.compile(model, "batch=1,3 seq=8,32", artifact, dtype="fp32", device="cpu")
    for rel in (artifact / "programs").iterdir():
        ops = _ops(read_program(artifact, f"programs/{rel.name}"))
        assert ops["kernl.qkv_attention"] == 2 and "kernl.attention" not in ops, rel.name
    calls = make_calls([(3, 32), (1, 8), (2, 20)], 120, True)
    served = serve_fresh(artifact, calls, tmp_path)
    assert_matches_eager(model, calls, served, "fp32", 2e-5)


def test_the_fused_kernels_candidates_are_checked_timed_and_cached(tmp_path, monkeypatch):
    from kernl.kernels.qkv_attention import QKVAttentionConfig

    monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path))
    candidates = [QKVAttentionConfig(16, 4, 2), QKVAttentionConfig(32, 4, 2)]
    monkeypatch.setattr(tqa, "qkv_attention_configs", lambda: candidates)
    timed = []

    def fake_us(fn):  # the wider K step "times" faster; each candidate ran for real first
        out = fn()
        timed.append(out)
        return 50.0 - len(timed)

    monkeypatch.setattr(tune, "_bench_us", fake_us)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 8, 64, generator=g), torch.randn(192, 64, generator=g) / 8
    b = torch.randn(192, generator=g)
    mask = torch.zeros(2, 1, 1, 8).masked_fill(torch.arange(8) >= 5, float("-inf"))
    args = (x, w, b, mask, None, 4)
    session = TuneSession()
    config, us, cached, errors, count = tqa._best_fused(args, "a GPU", session)
    assert (config, us, cached, errors, count) == ({"block_k": 32, "num_warps": 4,
                                                   "num_stages": 2}, 48.0, False, [], 2)  # fmt: skip
    assert tqa._best_fused(args, "a GPU", session)[:3] == (config, 48.0, True)
    assert len(timed) == 2  # the second call read the cache
    # a candidate whose result differs from aten's is skipped, with its reason
    monkeypatch.setattr(tqa, "_read_cached", lambda path: None)

    def broken(*args, impl="aten", config=None):
        return torch.zeros(2, 4, 8, 16) if impl == "triton" else torch.ones(2, 4, 8, 16)

    monkeypatch.setattr(tqa, "kernl_ops_fn", lambda op: broken)
    config, us, _, errors, _ = tqa._best_fused(args, "a GPU", TuneSession())
    assert config is None and us == float("inf") and len(errors) == 2
    assert all("differs from aten" in e for e in errors)


def test_a_grid_far_smaller_than_the_gpu_is_not_compiled(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tqa, "sm_count", lambda device: 132)  # 2 x 4 programs: under 33
    monkeypatch.setattr(tune, "_bench_us", lambda fn: pytest.fail("nothing is timed"))
    x, w, b = torch.randn(2, 8, 64), torch.randn(192, 64) / 8, torch.randn(192)
    found = tqa._best_fused((x, w, b, None, None, 4), "a GPU", TuneSession())
    assert found == (None, float("inf"), False, [], 0)
