"""fold_constants alone: what a program computes from weights and constants only becomes a
weight (ModernBERT's rotary tables and window band); what an input reaches, what is written
in place, integer values, views and values over the limit stay as traced."""

import pytest
import torch
from program_builder import Builder, assert_same_function

from kernl.compiler.passes import fold_constants as fold_module
from kernl.compiler.passes.fold_constants import fold_constants

CPU = torch.device("cpu")


def folded(b: Builder, *outputs):
    """(the program before, after, the weights with the folded ones, the count)."""
    weights = dict(b.tensors)
    after, count = fold_constants(b.program(*outputs), weights, CPU)
    return b.program(*outputs), after, weights, count


def rotary_tables(b: Builder, length: int = 6, half: int = 4):
    """ModernBERT's shape of it: positions x inv_freq, doubled, cos and sin."""
    inv_freq = b.weight("inv_freq", [half], "float32")
    pos = b.op("aten.arange.default", length, shape=[length], dtype="int64")
    pos = b.op("aten.to.dtype", pos, {"dtype": "float32"}, shape=[length], dtype="float32")
    col = b.op("aten.unsqueeze.default", pos, 1, shape=[length, 1], dtype="float32")
    freqs = b.op("aten.mul.Tensor", col, inv_freq, shape=[length, half], dtype="float32")
    emb = b.op("aten.cat.default", [freqs, freqs], -1, shape=[length, 2 * half], dtype="float32")
    cos = b.op("aten.cos.default", emb, shape=[length, 2 * half], dtype="float32")
    sin = b.op("aten.sin.default", emb, shape=[length, 2 * half], dtype="float32")
    return cos, sin


def test_rotary_tables_become_two_weights_and_the_function_stays():
    b = Builder()
    x = b.input("x", [2, 6, 8])
    cos, sin = rotary_tables(b)
    first = b.op("aten.mul.Tensor", x, cos, shape=[2, 6, 8])
    second = b.op("aten.mul.Tensor", x, sin, shape=[2, 6, 8])
    out = b.op("aten.add.Tensor", first, second, shape=[2, 6, 8], name="out")
    before, after, weights, count = folded(b, out)
    assert count == 2
    lines = b.show(after)
    assert len(lines) == 3 and all(line.startswith(("aten.mul", "aten.add")) for line in lines)
    names = [n for n in after.weights.values() if n.startswith("constant.")]
    assert len(names) == 2 and "inv_freq" not in after.weights.values()  # no longer read
    assert_same_function(before, after, b, atol=0, tensors=weights)


def test_a_cast_to_another_dtype_is_folded_not_kept_as_a_view():
    b = Builder("float16")
    x = b.input("x", [6, 8])
    cos, _ = rotary_tables(b)
    half = b.op("aten.to.dtype", cos, {"dtype": "float16"}, shape=[6, 8], dtype="float16")
    out = b.op("aten.mul.Tensor", x, half, shape=[6, 8], name="out")
    before, after, weights, _ = folded(b, out)
    (line,) = b.show(after)
    assert line.startswith("aten.mul.Tensor(x, constant.")
    name = line.split(", ")[1].split(")")[0]
    assert weights[name].dtype == torch.float16
    assert_same_function(before, after, b, atol=0, tensors=weights)


def test_a_view_of_a_constant_stays_a_view_of_the_folded_value():
    """An expand to the batch is free; materialising it would store batch copies."""
    b = Builder()
    x = b.input("x", [3, 4])
    w = b.weight("w", [1, 4])
    c = b.op("aten.cos.default", w, shape=[1, 4])
    wide = b.op("aten.expand.default", c, [3, 4], shape=[3, 4])
    out = b.op("aten.mul.Tensor", x, wide, shape=[3, 4], name="out")
    before, after, weights, count = folded(b, out)
    assert count == 1
    first, second = b.show(after)
    assert first.startswith("aten.expand.default(constant.") and second.startswith("aten.mul")
    folded_value = next(v for k, v in weights.items() if k.startswith("constant."))
    assert list(folded_value.shape) == [1, 4]
    assert_same_function(before, after, b, atol=0, tensors=weights)


def test_what_an_input_reaches_stays():
    b = Builder()
    x = b.input("x", [4])
    w = b.weight("w", [4])
    out = b.op("aten.cos.default", b.op("aten.add.Tensor", x, w, shape=[4]), shape=[4], name="o")
    before, after, _, count = folded(b, out)
    assert count == 0 and b.show(after) == b.show(before)


def test_a_returned_value_is_no_weight_the_caller_could_write():
    b = Builder()
    x = b.input("x", [4])
    w = b.weight("w", [4])
    c = b.op("aten.cos.default", w, shape=[4], name="c")
    row = b.op("aten.unsqueeze.default", c, 0, shape=[1, 4], name="row")
    out = b.op("aten.mul.Tensor", x, c, shape=[4], name="out")
    _, after, _, count = folded(b, out, row)
    assert count == 0 and "aten.cos.default(w) -> c" in b.show(after)


def test_views_of_a_weight_are_not_copied():
    b = Builder()
    x = b.input("x", [2, 4])
    w = b.weight("w", [3, 4])
    wt = b.op("aten.t.default", w, shape=[4, 3])
    out = b.op("aten.mm.default", x, wt, shape=[2, 3], name="out")
    _, after, weights, count = folded(b, out)
    assert count == 0 and set(weights) == {"w"} and len(after.instructions) == 2


def test_small_integer_values_are_folded_large_ones_stay(monkeypatch):
    """The reader bounds integer weights by reading them, within a limit for all of them."""

    def program(b: Builder):
        ids = b.input("ids", [2, 5], "int64")
        pos = b.op("aten.arange.default", 5, shape=[5], dtype="int64")
        pos = b.op("aten.add.Tensor", pos, 1, shape=[5], dtype="int64")
        return b.op("aten.add.Tensor", ids, pos, shape=[2, 5], dtype="int64", name="out")

    b = Builder()
    before, after, weights, count = folded(b, program(b))
    assert count == 1 and len(after.instructions) == 1
    assert_same_function(before, after, b, atol=0, tensors=weights)
    monkeypatch.setattr(fold_module, "MAX_INDEX_BYTES", 39)  # 5 int64s are 40 bytes
    b = Builder()
    _, after, _, count = folded(b, program(b))
    assert count == 0 and after.instructions[0].op == "aten.arange.default"


def test_memory_written_in_place_is_not_folded():
    """`fill_` through a view of a computed constant: its readers before and after the write
    see other values, so nothing sharing that memory is folded."""
    b = Builder()
    x = b.input("x", [4])
    w = b.weight("w", [4])
    c = b.op("aten.cos.default", w, shape=[4], name="c")
    early = b.op("aten.mul.Tensor", x, c, shape=[4], name="early")
    row = b.op("aten.unsqueeze.default", c, 0, shape=[1, 4])
    b.op("aten.fill_.Scalar", row, 2.0, shape=[1, 4])
    out = b.op("aten.add.Tensor", early, c, shape=[4], name="out")
    before, after, weights, count = folded(b, out)
    assert count == 0 and b.show(after) == b.show(before)
    assert_same_function(before, after, b, atol=0, tensors=weights)


def test_a_value_over_the_limit_stays(monkeypatch):
    monkeypatch.setattr(fold_module, "MAX_BYTES", 15)
    b = Builder()
    x = b.input("x", [4])
    w = b.weight("w", [4])
    out = b.op("aten.mul.Tensor", x, b.op("aten.cos.default", w, shape=[4]), shape=[4], name="o")
    _, after, _, count = folded(b, out)  # 16 bytes of float32
    assert count == 0 and len(after.instructions) == 2


def test_equal_tables_of_two_programs_are_one_weight():
    length = 6
    weights: dict[str, torch.Tensor] = {}
    names = []
    for _ in range(2):
        b = Builder()
        x = b.input("x", [length, 8])
        cos, _ = rotary_tables(b, length)
        out = b.op("aten.mul.Tensor", x, cos, shape=[length, 8], name="out")
        weights.update(b.tensors)
        after, _ = fold_constants(b.program(out), weights, CPU)
        names.append(after.weights[after.instructions[0].args[1]["v"]])
    assert names[0] == names[1] and sum(k.startswith("constant.") for k in weights) == 1


def test_a_value_with_other_strides_than_its_copy_stays():
    """cos of a transposed weight keeps the transposed strides, which a kept view relies on."""
    b = Builder()
    x = b.input("x", [12])
    w = b.weight("w", [3, 4])
    c = b.op("aten.cos.default", b.op("aten.t.default", w, shape=[4, 3]), shape=[4, 3])
    flat = b.op("aten.view.default", b.op("aten.t.default", c, shape=[3, 4]), [12], shape=[12])
    out = b.op("aten.mul.Tensor", x, flat, shape=[12], name="out")
    before, after, weights, count = folded(b, out)
    assert count == 0
    assert_same_function(before, after, b, atol=0, tensors=weights)


@pytest.mark.parametrize("alias", ["_unsafe_view", "unsafe_split"])
def test_a_write_through_an_alias_its_schema_does_not_declare_stops_the_fold(alias):
    b = Builder()
    x = b.input("x", [1, 4])
    c = b.op("aten.cos.default", b.weight("w", [1, 4]), shape=[1, 4], name="c")
    if alias == "_unsafe_view":
        same = b.op("aten._unsafe_view.default", c, [1, 4], shape=[1, 4])
    else:
        (same,) = b.op("aten.unsafe_split.Tensor", c, 4, 1, shape=[[1, 4]])
    early = b.op("aten.mul.Tensor", x, c, shape=[1, 4])
    b.op("aten.fill_.Scalar", same, 2.0, shape=[1, 4])
    out = b.op("aten.add.Tensor", early, c, shape=[1, 4], name="out")
    _, after, _, count = folded(b, out)
    assert count == 0 and "aten.cos.default(w) -> c" in b.show(after)


def test_a_value_written_through_a_named_argument_stays():
    """`max.dim_max` writes its `max=` and `max_values=`: not only `out=` is a write."""
    b = Builder()
    x = b.input("x", [4])
    c = b.op("aten.cos.default", b.weight("w", [4]), shape=[4], name="c")
    early = b.op("aten.mul.Tensor", x, c, shape=[4])
    idx = b.op("aten.zeros.default", [], dtype="int64", shape=[], name="idx")
    b.op("aten.max.dim_max", x, 0, False, max=c, max_values=idx, shape=[[], []])
    out = b.op("aten.add.Tensor", early, c, shape=[4], name="out")
    _, after, _, count = folded(b, out)
    assert count == 0 and "aten.cos.default(w) -> c" in b.show(after)


def test_a_constant_broadcast_to_the_batch_is_folded_before_the_broadcast():
    """MPNet's position bias: [seq, seq, heads] gathered, expanded to the batch, then made
    contiguous. Folding the copy would store one bias per batch row and bucket."""
    b = Builder()
    x = b.input("x", [8, 2, 3, 3])
    table = b.weight("table", [5, 2])
    idx = b.weight("idx", [3, 3], "int64")
    b.tensors["idx"] = torch.randint(0, 5, (3, 3), generator=b.gen)
    bias = b.op("aten.embedding.default", table, idx, shape=[3, 3, 2])
    heads = b.op("aten.permute.default", bias, [2, 0, 1], shape=[2, 3, 3])
    one = b.op("aten.unsqueeze.default", heads, 0, shape=[1, 2, 3, 3])
    wide = b.op("aten.expand.default", one, [8, -1, 3, 3], shape=[8, 2, 3, 3])
    copy = b.op("aten.contiguous.default", wide, shape=[8, 2, 3, 3])
    out = b.op("aten.add.Tensor", x, copy, shape=[8, 2, 3, 3], name="out")
    before, after, weights, count = folded(b, out)
    assert count == 1 and after.instructions[0].op == "aten.permute.default"
    (name,) = [n for n in weights if n.startswith("constant.")]
    assert list(weights[name].shape) == [3, 3, 2]
    assert_same_function(before, after, b, atol=0, tensors=weights)


@pytest.mark.parametrize("op", ["reshape", "contiguous", "to"])
def test_an_op_that_returns_a_weight_itself_adds_no_copy_of_it(op):
    b = Builder()
    x = b.input("x", [2, 4])
    w = b.weight("w", [2, 4])
    args = {"reshape": ([2, 4],), "contiguous": (), "to": ({"dtype": "float32"},)}[op]
    same = b.op(f"aten.{op}.{'dtype' if op == 'to' else 'default'}", w, *args, shape=[2, 4])
    out = b.op("aten.mul.Tensor", x, same, shape=[2, 4], name="out")
    _, _, weights, count = folded(b, out)
    assert count == 0 and set(weights) == {"w"}


def test_an_artifact_s_folded_bytes_are_bounded_over_its_buckets():
    budget = fold_module.FoldBudget(bytes_left=6 * 8 * 4)  # one [6, 8] float32 table
    weights: dict[str, torch.Tensor] = {}
    counts = []
    for length in (6, 5):
        b = Builder()
        x = b.input("x", [length, 8])
        cos, _ = rotary_tables(b, length)
        out = b.op("aten.mul.Tensor", x, cos, shape=[length, 8], name="out")
        weights.update(b.tensors)
        counts.append(fold_constants(b.program(out), weights, CPU, budget)[1])
    assert counts == [1, 0] and budget.bytes_left == 0
