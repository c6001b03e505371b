"""compile() on several threads at once: torch.export is not thread-safe, and three compiles
started together all failed ("ProxyTorchDispatchMode slot already occupied",
"_EXPORT_MODULE_HIERARCHY must not be None") and could leave sys.stderr on one compile's
held-back buffer (review, 2026-12-07). They now run one after the other."""

from __future__ import annotations

import sys
import threading

import torch
import transformers as T

import kernl.compiler
import kernl.runtime


def test_compiles_started_on_three_threads_at_once_all_succeed(tmp_path):
    torch.manual_seed(0)
    config = T.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=80,
        max_position_embeddings=32,
    )
    models = [T.BertModel(config).eval() for _ in range(3)]
    stderr = sys.stderr
    errors: list[str] = []
    start = threading.Barrier(3)

    def compile_one(i: int) -> None:
        start.wait()
        try:
            kernl.compiler.compile(
                models[i],
                "batch=1,2 seq=8,16",
                tmp_path / f"m{i}.kernl",
                dtype="fp32",
                device="cpu",
            )
        except Exception as e:  # noqa: BLE001 - reported below, with its thread
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=compile_one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sys.stderr is stderr
    ids = torch.randint(3, 80, (2, 11), generator=torch.Generator().manual_seed(1))
    for i, model in enumerate(models):
        got = kernl.runtime.load(tmp_path / f"m{i}.kernl", device="cpu")(ids).last_hidden_state
        with torch.no_grad():
            want = model(ids).last_hidden_state
        assert (got - want).abs().max().item() < 2e-5
