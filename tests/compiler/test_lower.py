"""The lowering from an exported graph to a program, on its own."""

import pytest
import torch

from kernl.artifacts.program import Program
from kernl.artifacts.schema import Bucket
from kernl.compiler.lower import UnsupportedOpError, lower
from kernl.runtime.executor import Executor


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        a, b = torch.split(self.lin(x), 2, dim=-1)
        y = torch.nn.functional.dropout(a * self.scale, 0.1, training=False)
        return (torch.relu(y) + b,)


def test_program_runs_like_the_module_and_round_trips_through_msgpack_dict():
    m = Tiny().eval()
    x = torch.randn(3, 8)
    ep = torch.export.export(m, (x,), strict=False)
    program, weights = lower(ep, Bucket(3, 8), ["x"])
    ops = [i.op for i in program.instructions]
    assert "aten.dropout.default" not in ops  # inference dropout is an identity
    assert "aten.split.Tensor" in ops
    assert set(weights) == {"lin.weight", "lin.bias", "scale"}
    again = Program.from_dict(program.to_dict())
    x2 = torch.randn(3, 8)
    (got,) = Executor(again, weights, torch.device("cpu")).run({"x": x2})
    torch.testing.assert_close(got, m(x2)[0])


class UsesUnknownOp(torch.nn.Module):
    def forward(self, x):
        return (torch.fft.fft(x).real,)


def test_an_op_outside_the_vocabulary_is_named_at_compile_time():
    ep = torch.export.export(UsesUnknownOp(), (torch.randn(4, 4),), strict=False)
    try:
        lower(ep, Bucket(4, 4), ["x"])
    except UnsupportedOpError as e:
        assert "fft" in str(e) and "kernl does not support" in str(e)
    else:
        raise AssertionError("lowering accepted an unsupported op")


class ScalarConstants(torch.nn.Module):
    """Constants made inside forward become the exported program's constant tensors: a 0-dim
    one (DeBERTa-v2's scale) crashed the lowering's content hash, and one of the same bytes
    but another shape must stay a weight of its own."""

    def forward(self, x):
        return (x * torch.tensor(0.0) + x * torch.tensor([0.0]) + torch.tensor(3.0),)


def test_zero_dim_constants_lower_each_as_its_own_weight():
    m = ScalarConstants()
    ep = torch.export.export(m, (torch.randn(2, 4),), strict=False)
    program, weights = lower(ep, Bucket(2, 4), ["x"])
    shapes = sorted(tuple(w.shape) for w in weights.values())
    assert shapes == [(), (), (1,)], shapes
    x = torch.randn(2, 4)
    (got,) = Executor(program, weights, torch.device("cpu")).run({"x": x})
    torch.testing.assert_close(got, m(x)[0])


class InPlaceAdds(torch.nn.Module):
    """MegatronBERT's `embeddings += position_embeddings` on a tensor forward made: lowered as
    an add whose result the later readers read (aten.add_ is outside the vocabulary)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        before = h * 2  # read before the add: sees the old value
        h += x
        h.mul_(3)
        return (h + before, h)


def test_in_place_ops_on_a_fresh_tensor_lower_as_their_functional_twins():
    m = InPlaceAdds().eval()
    ep = torch.export.export(m, (torch.randn(2, 4),), strict=False)
    program, weights = lower(ep, Bucket(2, 4), ["x"])
    ops = [i.op for i in program.instructions]
    assert "aten.add.Tensor" in ops and "aten.mul.Tensor" in ops
    assert not any(op.split(".")[1].endswith("_") for op in ops)
    x = torch.randn(2, 4)
    got = Executor(program, weights, torch.device("cpu")).run({"x": x})
    for a, b in zip(got, m(x)):
        torch.testing.assert_close(a, b)


class WritesAView(torch.nn.Module):
    def forward(self, x):
        h = x * 1.0
        row = h[0]
        row += 1.0  # writes h through a view: h's readers must see it
        return (h,)


class WritesItsInput(torch.nn.Module):
    def forward(self, x):
        x += 1.0
        return (x * 2,)


class WritesAfterAView(torch.nn.Module):
    def forward(self, x):
        h = x * 1.0
        view = h.view(-1)
        h += 1.0  # view, read afterwards, shares h's memory
        return (view * 2,)


@pytest.mark.parametrize("module", [WritesAView, WritesItsInput, WritesAfterAView])
def test_in_place_ops_others_could_see_are_refused_by_name(module):
    ep = torch.export.export(module(), (torch.randn(2, 4),), strict=False)
    with pytest.raises(UnsupportedOpError, match=r"aten\.add_\.Tensor on an input, a weight or"):
        lower(ep, Bucket(2, 4), ["x"])


class SignOfPositions(torch.nn.Module):
    """DeBERTa-v2's log buckets: `sign` and `ceil` (outside the vocabulary) on positions made
    from the length alone are computed at compile time; on an input they are refused."""

    def forward(self, x):
        rel = torch.arange(x.shape[1])[None, :] - torch.arange(x.shape[1])[:, None]
        buckets = torch.sign(rel) * torch.ceil(rel.abs().float().sqrt())
        return (x + buckets[None],)


class SignOfInput(torch.nn.Module):
    def forward(self, x):
        return (torch.sign(x),)


def test_ops_outside_the_vocabulary_on_constants_are_computed_at_compile_time():
    m = SignOfPositions()
    x = torch.randn(2, 5, 5)
    ep = torch.export.export(m, (x,), strict=False)
    program, weights = lower(ep, Bucket(2, 5), ["x"])
    ops = {i.op for i in program.instructions}
    assert not ops & {"aten.sign.default", "aten.ceil.default"}
    assert any(name.startswith("constant.") and w.shape == (5, 5) for name, w in weights.items())
    x2 = torch.randn(2, 5, 5)
    (got,) = Executor(program, weights, torch.device("cpu")).run({"x": x2})
    torch.testing.assert_close(got, m(x2)[0])
    ep = torch.export.export(SignOfInput(), (x,), strict=False)
    with pytest.raises(UnsupportedOpError, match=r"aten\.sign\.default, which kernl does not"):
        lower(ep, Bucket(2, 5), ["x"])


class ReshapeAs(torch.nn.Module):
    # RoFormer's rotary embeddings: `x.reshape_as(y)` (outside the vocabulary)
    def forward(self, x, y):
        return (torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape_as(y) + y.view_as(y),)


def test_reshape_as_lowers_as_a_reshape_to_the_static_shape():
    m = ReshapeAs()
    args = (torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    program, weights = lower(torch.export.export(m, args, strict=False), Bucket(2, 3), ["x", "y"])
    ops = [i.op for i in program.instructions]
    assert "aten.reshape.default" in ops and not any(op.endswith("_as.default") for op in ops)
    new = (torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    (got,) = Executor(program, weights, torch.device("cpu")).run(dict(zip(["x", "y"], new)))
    torch.testing.assert_close(got, m(*new)[0])


class WritesAPrivateView(torch.nn.Module):
    """DeBERTa's `pos_query_layer /= scale` on the head view of a linear's output that
    nothing else reads: the write is seen by the view's readers alone."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        heads = self.lin(x).view(2, 3, 2, 4).permute(0, 2, 1, 3)
        heads /= 2.0
        return (heads.sum(-1),)


def test_an_in_place_op_on_a_view_nobody_else_reads_through_lowers():
    m = WritesAPrivateView().eval()
    x = torch.randn(2, 3, 8)
    program, weights = lower(torch.export.export(m, (x,), strict=False), Bucket(2, 3), ["x"])
    assert "aten.div.Tensor" in [i.op for i in program.instructions]
    x2 = torch.randn(2, 3, 8)
    (got,) = Executor(program, weights, torch.device("cpu")).run({"x": x2})
    torch.testing.assert_close(got, m(x2)[0])


class WritesAConstantThenSigns(torch.nn.Module):
    """`f[0].fill_(5)` (fill_ is in the vocabulary: lowered as it is) before `sign(f)`: the
    folded sign saw f before the write (a hunt's repro). A written tensor is no constant."""

    def forward(self, x):
        f = torch.arange(x.shape[1], dtype=torch.float32)
        f[0].fill_(5.0)
        return (x + torch.sign(f - 2.0),)


def test_a_constant_written_in_place_is_not_folded():
    ep = torch.export.export(WritesAConstantThenSigns(), (torch.randn(2, 6),), strict=False)
    with pytest.raises(UnsupportedOpError, match=r"aten\.sign\.default"):
        lower(ep, Bucket(2, 6), ["x"])


class PromotesInPlace(torch.nn.Module):
    """`h.mul_(y)` with fp16 h and an fp32 y keeps fp16 (computed in fp32, stored in fp16);
    `h * y` promotes to fp32 (a review found the program returning fp32 where eager gave fp16)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 4))

    def forward(self, x):
        h = x * 1.0
        h.mul_(self.scale)
        return (h,)


def test_an_in_place_op_keeps_its_tensor_s_dtype_when_its_twin_would_promote():
    m = PromotesInPlace()
    x = torch.randn(2, 4).half()
    program, weights = lower(torch.export.export(m, (x,), strict=False), Bucket(2, 4), ["x"])
    assert program.instructions[-1].op == "aten._to_copy.default"
    x2 = torch.randn(2, 4).half()
    (got,) = Executor(program, weights, torch.device("cpu")).run({"x": x2})
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, m(x2)[0])
