"""The tuner's step-by-step walk of a program (`tune._walk`, also the validation's
first-divergence search) drops each intermediate after its last use, as the runtime's
executor does: kept, every value of a deep encoder stayed alive through tuning (ModernBERT-large
at 8x8192 would have held ~59 GB). Its results are those of `Executor.run`."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel

from kernl.artifacts.schema import Bucket
from kernl.compiler.lower import lower
from kernl.compiler.passes import rewrite
from kernl.compiler.trace import FlatModel, example_inputs, export_bucket, model_signature
from kernl.compiler.tune import _walk
from kernl.runtime.executor import Executor


def test_the_walk_keeps_only_what_the_program_still_reads():
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
    )
    model = BertModel(config).eval()
    cpu = torch.device("cpu")
    sig = model_signature(model, cpu)
    flat = FlatModel(model, [s.name for s in sig.inputs], [s.name for s in sig.outputs])
    bucket = Bucket(2, 16)
    program, weights = lower(export_bucket(flat, bucket, 100, cpu), bucket, flat.input_names)
    program = rewrite(program, weights)
    inputs = dict(zip(flat.input_names, example_inputs(flat.input_names, bucket, 100, cpu)))

    executor = Executor(program, weights, cpu)
    envs = []
    initial_env = executor.initial_env
    executor.initial_env = lambda given: envs.append(initial_env(given)) or envs[-1]
    most_alive = 0
    with torch.no_grad():
        for _ in _walk(executor, inputs, {}):
            most_alive = max(most_alive, sum(v is not None for v in envs[0]))
    env = envs[0]
    keep = set(program.outputs) | set(program.weights) | set(program.inputs.values())
    alive = {i for i, v in enumerate(env) if v is not None}
    assert alive <= keep, sorted(alive - keep)
    assert most_alive < len(keep) + len(program.instructions) // 2  # not every value at once
    with torch.no_grad():
        expected = Executor(program, weights, cpu).run(inputs)
    for vid, want in zip(program.outputs, expected):
        torch.testing.assert_close(env[vid], want, rtol=0, atol=0)
