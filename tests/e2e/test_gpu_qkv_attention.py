"""On a GPU: BERT-base fp16 with its attention blocks on the fused QKV + attention kernel
(kernl.qkv_attention), compiled for CUDA, loaded with graphs from its binaries, equal to
eager; and the tuner's own choice at a bucket where the fused kernel timed faster (H100,
2026-12-05)."""

import pytest
import torch
from test_gpu_bert_base import check_bert_against_eager

import kernl.compiler
import kernl.compiler.tasks.encoder as encoder_task
import kernl.runtime
from kernl.artifacts.reader import read_program
from kernl.compiler.passes.qkv_attention import fuse_qkv_attention, qkv_attention_groups


def _fused_ops(artifact) -> list[int]:
    return [
        sum(i.op == "kernl.qkv_attention" for i in read_program(artifact, f"programs/{p.name}").instructions)
        for p in sorted((artifact / "programs").iterdir())
    ]  # fmt: skip


@pytest.mark.gpu
def test_bert_base_with_every_block_fused_matches_eager(tmp_path, monkeypatch):
    from transformers import BertConfig, BertModel

    def fuse_all(program, weights, inputs, device, records, session, benchmark=True):
        chosen = [(g, "triton", None) for g in qkv_attention_groups(program)]
        fuse_qkv_attention(program, chosen)
        records.clear()
        return len(chosen)

    monkeypatch.setattr(encoder_task, "tune_qkv_attention", fuse_all)
    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    artifact = tmp_path / "b.kernl"
    kernl.compiler.compile(model, "batch=2,8 seq=16,100", artifact, dtype="fp16", device="cuda")
    assert _fused_ops(artifact) == [12] * 4
    check_bert_against_eager(
        model, kernl.runtime.load(artifact, device="cuda"), [(2, 16), (8, 100), (5, 64), (1, 9)]
    )


@pytest.mark.gpu
def test_the_tuner_chooses_per_bucket_and_the_result_matches_eager(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    artifact = tmp_path / "b.kernl"
    kernl.compiler.compile(model, "batch=1,32 seq=128", artifact, dtype="fp16", device="cuda")
    fused = _fused_ops(artifact)
    # a bucket's twelve blocks have one shape: one timing (then the cache) decides them all;
    # 1x128's 12 programs are under a quarter of any GPU's SMs: never compiled nor fused
    assert all(n in (0, 12) for n in fused) and fused[0] == 0, fused
    print("fused blocks per bucket (1x128, 32x128):", fused)
    check_bert_against_eager(
        model, kernl.runtime.load(artifact, device="cuda"), [(1, 128), (32, 128), (20, 77)]
    )
