"""fuse_bert_embeddings alone (after replace_layer_norm, as in `rewrite`): three gathers
summed and normalised become one kernl.bert_embeddings; anything else stays."""

from program_builder import Builder, assert_same_function

from kernl.compiler.passes import fuse_bert_embeddings, replace_layer_norm

H = 16


def embeddings(b, tables=("word", "pos", "type"), read_again=None, norm_bias=True):
    ids = {t: b.input(f"{t}_ids", [2, 5], dtype="int64") for t in tables}
    looked = {
        t: b.op(
            "aten.embedding.default", b.weight(t, [4, H]), ids[t], shape=[2, 5, H], name=f"e_{t}"
        )
        for t in tables
    }
    terms = list(looked.values())
    s = terms[0]
    for i, t in enumerate(terms[1:], 1):
        s = b.op("aten.add.Tensor", s, t, shape=[2, 5, H], name=f"s{i}")
    bias = b.weight("ln.b", [H]) if norm_bias else None
    out = b.op(
        "aten.layer_norm.default",
        s,
        [H],
        b.weight("ln.w", [H]),
        bias,
        1e-12,
        shape=[2, 5, H],
        name="out",
    )
    extra = [looked[read_again]] if read_again else []
    return b.program(out, *extra)


def test_three_gathers_and_a_norm_become_one_op():
    b = Builder()
    before = embeddings(b)
    after = fuse_bert_embeddings(replace_layer_norm(embeddings(Builder())))
    assert b.show(after) == [
        "kernl.bert_embeddings(word_ids, word, pos_ids, pos, type_ids, type, ln.w, ln.b, 1e-12)"
        " -> out",
    ]
    assert_same_function(before, after, b)


def test_a_gather_read_elsewhere_keeps_the_pattern_as_it_was():
    b = Builder()
    norm_only = replace_layer_norm(embeddings(b, read_again="pos"))
    after = fuse_bert_embeddings(replace_layer_norm(embeddings(Builder(), read_again="pos")))
    assert b.show(after) == b.show(norm_only)
    assert "kernl.bert_embeddings" not in {i.op for i in after.instructions}


def test_two_tables_or_no_norm_bias_stay():
    for kw in ({"tables": ("word", "pos")}, {"norm_bias": False}):
        b = Builder()
        norm_only = replace_layer_norm(embeddings(b, **kw))
        after = fuse_bert_embeddings(replace_layer_norm(embeddings(Builder(), **kw)))
        assert b.show(after) == b.show(norm_only), kw
