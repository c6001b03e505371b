"""fold_constant_indices alone: an index computed from constants through a float (MPNet's
relative position buckets) becomes a weight the reader can bound; integer-only indices, and
indices that depend on an input, stay as they were traced."""

import math

import torch

from kernl.artifacts.schema import Bucket
from kernl.compiler.lower import lower
from kernl.compiler.passes import drop_dead, fold_constant_indices
from kernl.runtime.executor import Executor


class RelativeBuckets(torch.nn.Module):
    """MPNet's bucketing, shortened: log-spaced buckets of relative positions."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(8, 3)

    def forward(self, x):
        n = x.shape[1]
        rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
        far = 2 + (torch.log(rel.abs().float().clamp(min=1)) / math.log(8) * 6).to(torch.long)
        buckets = torch.where(rel.abs() < 2, rel.abs(), far.clamp(max=7))
        return (x[:, :, None, :1] + self.table(buckets)[None].sum(-1, keepdim=True),)


class IntegerPositions(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(16, 3)

    def forward(self, x, ids):
        return (x + self.table(torch.arange(x.shape[1]) + 1)[None] + self.table(ids),)


def lowered(module, *args):
    ep = torch.export.export(module.eval(), args, strict=False)
    names = [f"x{i}" for i in range(len(args))]
    program, weights = lower(ep, Bucket(2, args[0].shape[1]), names)
    return program, dict(weights), dict(zip(names, args))


def test_buckets_made_through_a_float_become_one_weight():
    m = RelativeBuckets()
    x = torch.randn(2, 6, 3)
    program, weights, inputs = lowered(m, x)
    before = len(program.instructions)
    (want,) = Executor(program, weights, torch.device("cpu")).run(inputs)
    after = drop_dead(fold_constant_indices(program, weights))
    embedding = next(i for i in after.instructions if i.op == "aten.embedding.default")
    index = embedding.args[1]["v"]
    name = after.weights[index]
    assert name.startswith("constant.") and weights[name].dtype == torch.int64
    assert weights[name].shape == (6, 6) and 0 <= weights[name].min() <= weights[name].max() < 8
    ops = {i.op for i in after.instructions}
    assert "aten.log.default" not in ops and "aten.arange.default" not in ops
    assert len(after.instructions) < before - 5
    (got,) = Executor(after, weights, torch.device("cpu")).run(inputs)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, m(x)[0])


def test_integer_indices_and_input_indices_stay():
    m = IntegerPositions()
    args = (torch.randn(2, 5, 3), torch.randint(0, 16, (2, 5)))
    program, weights, _ = lowered(m, *args)
    before = [(i.op, i.args) for i in program.instructions]
    names = set(weights)
    after = fold_constant_indices(program, weights)
    assert [(i.op, i.args) for i in after.instructions] == before and set(weights) == names


class WrittenBuckets(torch.nn.Module):
    """Buckets made through a float whose row 0 an in-place fill_ (in the vocabulary: lowered
    as it is) overwrites: folded, they were the values before the write (2.97 off)."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(16, 4)

    def forward(self, x):
        n = x.shape[1]
        rel = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).float()
        rel[0].fill_(9.0)
        return (x[..., None] + self.table(rel.abs().long())[None],)


def test_an_index_whose_memory_is_written_in_place_is_not_folded():
    m = WrittenBuckets().eval()
    x = torch.randn(1, 6, 6)
    program, weights, inputs = lowered(m, x)
    names = set(weights)
    after = fold_constant_indices(program, weights)
    assert set(weights) == names
    (got,) = Executor(after, weights, torch.device("cpu")).run(inputs)
    torch.testing.assert_close(got, m(x)[0])
