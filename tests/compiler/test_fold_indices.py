"""The lowering's index folds (compiler/fold.py `index_folds`): an index computed from
constants through a float (MPNet's relative position buckets) becomes a weight the reader can
bound; integer-only indices, indices that depend on an input, and indices whose memory an
in-place op writes stay as they were traced."""

import math

import torch

from kernl.artifacts.schema import Bucket
from kernl.compiler.lower import lower
from kernl.compiler.passes import drop_dead
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


def _index_weights(program, weights) -> list[str]:
    return [
        name
        for name in program.weights.values()
        if name.startswith("constant.") and not weights[name].dtype.is_floating_point
    ]


def test_buckets_made_through_a_float_become_one_weight():
    m = RelativeBuckets()
    x = torch.randn(2, 6, 3)
    program, weights, inputs = lowered(m, x)
    program = drop_dead(program)
    embedding = next(i for i in program.instructions if i.op == "aten.embedding.default")
    name = program.weights[embedding.args[1]["v"]]
    assert name.startswith("constant.") and weights[name].dtype == torch.int64
    assert weights[name].shape == (6, 6) and 0 <= weights[name].min() <= weights[name].max() < 8
    ops = {i.op for i in program.instructions}
    assert "aten.log.default" not in ops and "aten.arange.default" not in ops
    (got,) = Executor(program, weights, torch.device("cpu")).run(inputs)
    torch.testing.assert_close(got, m(x)[0])


def test_integer_indices_and_input_indices_stay():
    m = IntegerPositions()
    args = (torch.randn(2, 5, 3), torch.randint(0, 16, (2, 5)))
    program, weights, inputs = lowered(m, *args)
    assert _index_weights(program, weights) == []
    assert "aten.arange.default" in {i.op for i in program.instructions}
    (got,) = Executor(program, weights, torch.device("cpu")).run(inputs)
    torch.testing.assert_close(got, m(*args)[0])


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
    assert _index_weights(program, weights) == []
    (got,) = Executor(program, weights, torch.device("cpu")).run(inputs)
    torch.testing.assert_close(got, m(x)[0])


class ExpandedBuckets(torch.nn.Module):
    """DeBERTa's shape: float-made positions expanded over a batch before a gather: folded
    below the expand (the small tensor), the expand stays."""

    def forward(self, x):
        n = x.shape[1]
        rel = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).float()
        pos = (rel.abs().sqrt() * 2).long().clamp(max=n - 1)
        return (torch.gather(x, 2, pos[None].expand(x.shape[0], n, n)),)


def test_an_expanded_index_is_folded_below_its_views():
    m = ExpandedBuckets()
    x = torch.randn(3, 6, 6)
    program, weights, inputs = lowered(m, x)
    program = drop_dead(program)
    (name,) = _index_weights(program, weights)
    assert weights[name].shape == (6, 6)
    assert "aten.expand.default" in {i.op for i in program.instructions}
    (got,) = Executor(program, weights, torch.device("cpu")).run(inputs)
    torch.testing.assert_close(got, m(x)[0])


class InPlaceBuckets(torch.nn.Module):
    """MPNet's `ret += ...`: in-place adds (lowered as adds) inside the buckets' cone are
    computed as their functional twins, and the index is still folded."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(16, 4)

    def forward(self, x):
        n = x.shape[1]
        rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
        ret = (rel < 0).to(torch.long) * 8
        far = (torch.log(rel.abs().float().clamp(min=1)) * 2).to(torch.long)
        ret += torch.where(rel.abs() < 2, rel.abs(), far.clamp(max=7))
        return (x[..., None] + self.table(ret)[None],)


def test_in_place_adds_in_the_cone_are_folded_as_adds():
    m = InPlaceBuckets().eval()
    x = torch.randn(1, 6, 6)
    program, weights, inputs = lowered(m, x)
    (name,) = _index_weights(drop_dead(program), weights)
    assert weights[name].shape == (6, 6)
    (got,) = Executor(program, weights, torch.device("cpu")).run(inputs)
    torch.testing.assert_close(got, m(x)[0])
