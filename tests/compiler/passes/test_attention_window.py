"""use_attention_windows alone: a band (a weight or computed from constants) |i - j| <= w and-ed with the padding becomes
kernl.attention's window and a per-key padding bias; anything else stays."""

import torch
from program_builder import Builder, assert_same_function

from kernl.artifacts.program import Instruction
from kernl.compiler.passes.attention_window import band_width, use_attention_windows

B, H, L, D = 2, 2, 12, 8
CPU = torch.device("cpu")


def band(w: int, length: int = L) -> torch.Tensor:
    i = torch.arange(length)
    return ((i[None, :] - i[:, None]).abs() <= w)[None, None]


def local_layer(b: Builder, table: torch.Tensor, causal: bool = False):
    q, k, v = (b.input(n, [B, H, L, D]) for n in "qkv")
    keep = b.input("keep", [B, 1, 1, L], "bool")
    w = b.weight("band", [1, 1, L, L], "bool")
    b.tensors["band"] = table
    both = b.op("aten.__and__.Tensor", w, keep, shape=[B, 1, L, L], dtype="bool")
    wide = b.op("aten.expand.default", both, [B, -1, L, L], shape=[B, 1, L, L], dtype="bool")
    bias = b.op("kernl.mask_to_bias", wide, {"dtype": "float32"}, shape=[B, 1, L, L])
    return b.op("kernl.attention", q, k, v, bias, 0.3, causal, shape=[B, H, L, D], name="o")


def test_a_band_and_the_padding_become_a_window_and_a_per_key_bias():
    b = Builder()
    out = local_layer(b, band(3))
    before = b.program(out)
    after = use_attention_windows(b.program(out), b.tensors, CPU)
    lines = b.show(after)
    assert lines == [
        "kernl.mask_to_bias(keep, dtype:float32) -> %9",
        "kernl.attention(q, k, v, %9, 0.3, False; window=3) -> o",
    ]
    assert_same_function(before, after, b, atol=1e-5)


def test_a_mask_that_is_not_exactly_a_band_stays():
    table = band(3)
    table[0, 0, 5, 0] = True  # one key beyond the window
    b = Builder()
    out = local_layer(b, table)
    before = b.program(out)
    assert b.show(use_attention_windows(b.program(out), b.tensors, CPU)) == b.show(before)


def test_a_causal_attention_keeps_its_mask():
    b = Builder()
    out = local_layer(b, band(3), causal=True)
    before = b.program(out)
    assert b.show(use_attention_windows(b.program(out), b.tensors, CPU)) == b.show(before)


def test_band_width():
    assert (
        band_width(band(0)) == 0 and band_width(band(4)) == 4 and band_width(band(30)) == L - 1
    )  # all keys: the same mask
    assert band_width(band(2).float()) is None  # not a boolean mask
    assert band_width(torch.ones(2, 1, L, L, dtype=torch.bool)) is None  # one per batch row
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    assert band_width(causal) is None


def test_a_band_computed_by_the_trace_is_read_as_a_window():
    """As transformers' masks trace: arange, a difference, abs, a comparison."""
    b = Builder()
    q, k, v = (b.input(n, [B, H, L, D]) for n in "qkv")
    keep = b.input("keep", [B, 1, 1, L], "bool")
    pos = b.op("aten.arange.default", L, shape=[L], dtype="int64")
    rows = b.op("aten.unsqueeze.default", pos, 1, shape=[L, 1], dtype="int64")
    diff = b.op("aten.sub.Tensor", pos, rows, shape=[L, L], dtype="int64")
    dist = b.op("aten.abs.default", diff, shape=[L, L], dtype="int64")
    near = b.op("aten.le.Scalar", dist, 2, shape=[L, L], dtype="bool")
    near = b.op("aten.view.default", near, [1, 1, L, L], shape=[1, 1, L, L], dtype="bool")
    both = b.op("aten.__and__.Tensor", keep, near, shape=[B, 1, L, L], dtype="bool")
    bias = b.op("kernl.mask_to_bias", both, {"dtype": "float32"}, shape=[B, 1, L, L])
    out = b.op("kernl.attention", q, k, v, bias, 0.3, False, shape=[B, H, L, D], name="o")
    before = b.program(out)
    after = use_attention_windows(b.program(out), b.tensors, CPU)
    assert b.show(after)[-1].endswith("window=2) -> o") and len(after.instructions) == 2
    assert_same_function(before, after, b, atol=1e-5)


def test_the_padding_is_read_where_the_mask_read_it():
    """A write to the padding after the `and`: the per-key bias is made right after the `and`,
    so it sees the padding as the mask did."""
    b = Builder()
    q, k, v = (b.input(n, [B, H, L, D]) for n in "qkv")
    ids = b.input("ids", [B, 1, 1, L], "int64")
    keep = b.op("aten.ne.Scalar", ids, 0, shape=[B, 1, 1, L], dtype="bool")
    w = b.weight("band", [1, 1, L, L], "bool")
    b.tensors["band"] = band(3)
    both = b.op("aten.__and__.Tensor", w, keep, shape=[B, 1, L, L], dtype="bool")
    b.op("aten.fill_.Scalar", keep, True, shape=[B, 1, 1, L], dtype="bool")
    bias = b.op("kernl.mask_to_bias", both, {"dtype": "float32"}, shape=[B, 1, L, L])
    out = b.op("kernl.attention", q, k, v, bias, 0.3, False, shape=[B, H, L, D], name="o")
    before = b.program(out)
    after = use_attention_windows(b.program(out), b.tensors, CPU)
    assert b.show(after)[-1].endswith("window=3) -> o")
    assert_same_function(before, after, b, atol=1e-5)


def test_a_band_weight_written_in_place_is_no_window():
    b = Builder()
    out = local_layer(b, band(3))
    program = b.program(out)
    band_vid = next(v for v, n in program.weights.items() if n == "band")
    fill = Instruction("aten.fill_.Scalar", [{"v": band_vid}, True], {}, [None])
    program.instructions.insert(0, fill)
    before = b.show(program)
    assert b.show(use_attention_windows(program, b.tensors, CPU)) == before
