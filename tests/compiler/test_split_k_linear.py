"""The split-K linear in an encoder (fused_linear's `split_k` configs, skinny_linear_fused.py's
kernel): offered to the tuner where a call has few rows, and, once chosen, every such linear
of a program reads one arrival-counter buffer made by one zeros instruction
(compiler/passes/split_k_counters.py). On the CPU the tuner times nothing, so the end-to-end
test puts split-K configs on a compiled program's linears the way the tuner would, then
compiles, loads (the load-time check walks the new instruction and kwarg) and compares with
eager."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers as T

import kernl.compiler
import kernl.runtime
from kernl.artifacts.program import Instruction, Program
from kernl.artifacts.reader import read_program
from kernl.artifacts.schema import Bucket
from kernl.compiler.passes.split_k_counters import share_split_k_counters
from kernl.kernels.fused_linear import LinearConfig, linear_configs, split_k_configs
from kernl.kernels.skinny_linear_fused import MAX_COUNTERS


def _linear(config, out):
    return Instruction("kernl.linear", [], {"impl": "triton", "config": config}, [out])


def test_one_zeros_before_the_first_split_k_linear_serves_them_all():
    split = [["BLOCK_M", 16], ["split_k", 4]]
    tile = [["BLOCK_M", 64], ["split_k", 0]]
    ins = [
        Instruction("aten.add.Tensor", [], {}, [0]),
        _linear(tile, 1),
        _linear(split, 2),
        Instruction("kernl.linear", [], {"impl": "aten", "config": None}, [3]),
        _linear(split, 4),
    ]
    program = Program(Bucket(1, 16), 5, {}, {}, [4], ins)
    records = [SimpleNamespace(index=i) for i in (1, 2, 4)]  # the tuner's, by instruction
    named = [program.instructions[r.index] for r in records]
    assert share_split_k_counters(program, records) == 2
    assert [program.instructions[r.index] for r in records] == named
    assert program.num_values == 6
    ops = [i.op for i in program.instructions]
    assert ops[2] == "aten.zeros.default" and ops.count("aten.zeros.default") == 1
    zeros = program.instructions[2]
    assert zeros.outputs == [5] and zeros.args == [[MAX_COUNTERS]]
    assert zeros.kwargs["dtype"] == {"dtype": "int32"}
    readers = [i for i in program.instructions if "counters" in i.kwargs]
    assert [i.outputs for i in readers] == [[2], [4]]
    assert all(i.kwargs["counters"] == {"v": 5} for i in readers)
    # a program without split-K linears is left as it was
    plain = Program(Bucket(1, 16), 2, {}, {}, [1], [_linear(tile, 1)])
    assert share_split_k_counters(plain) == 0 and len(plain.instructions) == 1


def test_split_k_configs_are_offered_for_few_rows_only():
    assert split_k_configs(129) == []
    for rows, block in ((1, 16), (16, 16), (17, 32), (64, 64), (128, 64)):
        configs = split_k_configs(rows)
        assert configs and all(c.split_k > 0 and c.BLOCK_M == block for c in configs)
    few = linear_configs(torch.empty(1, 16, 64))
    many = linear_configs(torch.empty(4, 64, 64))
    assert len(few) == len(many) + len(split_k_configs(16))
    assert not any(c.split_k for c in many)


@pytest.fixture(scope="module")
def split_k_artifact(tmp_path_factory):
    """A small BERT compiled on the CPU whose linears the 'tuner' gave split-K configs."""
    torch.manual_seed(0)
    model = T.BertModel(
        T.BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=120,
            max_position_embeddings=64,
        )
    ).eval()
    from kernl.compiler.tasks import encoder
    from kernl.compiler.tune import encode_config

    real = encoder.tune_program

    def tune_as_if_split_k_won(program, *args, **kwargs):
        records = real(program, *args, **kwargs)
        for i, ins in enumerate(program.instructions):
            if ins.op == "kernl.linear":
                block = 16 if i % 2 else 32
                config = LinearConfig(block, 32, 32, 8, 4, 2, split_k=3)
                ins.kwargs.update(impl="triton", config=encode_config(vars(config)))
        return records

    path = tmp_path_factory.mktemp("split_k") / "b.kernl"
    mp = pytest.MonkeyPatch()
    mp.setattr(encoder, "tune_program", tune_as_if_split_k_won)
    try:
        kernl.compiler.compile(model, "batch=1,2 seq=16", path, dtype="fp32", device="cpu")
    finally:
        mp.undo()
    return model, path


def test_a_compiled_program_shares_one_counter_buffer(split_k_artifact):
    _, path = split_k_artifact
    programs = sorted((path / "programs").iterdir())
    assert len(programs) == 2
    for rel in programs:
        program = read_program(path, f"programs/{rel.name}")
        zeros = [i for i in program.instructions if i.op == "aten.zeros.default"]
        linears = [i for i in program.instructions if i.op == "kernl.linear"]
        assert len(zeros) == 1 and linears
        assert all(i.kwargs["counters"] == {"v": zeros[0].outputs[0]} for i in linears)


def test_split_k_linears_serve_what_eager_computes(split_k_artifact):
    model, path = split_k_artifact
    compiled = kernl.runtime.load(path)
    g = torch.Generator().manual_seed(1)
    for b, s in ((1, 16), (2, 16), (1, 9), (2, 5)):
        ids = torch.randint(3, 120, (b, s), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, s // 2 :] = 0
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
