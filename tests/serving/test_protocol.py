"""Request checks on arrival: each bad request gets its own 4xx status and a message that says
what to change; good requests become rows."""

import dataclasses
import json

import pytest

from kernl.artifacts.schema import Bucket, InputSpec
from kernl.serving import protocol
from kernl.serving.protocol import ModelLimits, RequestError, parse_request

LIMITS = ModelLimits(
    inputs=[
        InputSpec("input_ids", "int64", 0, "required"),
        InputSpec("attention_mask", "int64", 0, "ones"),
        InputSpec("token_type_ids", "int64", 0, "zeros"),
    ],
    output_names=["last_hidden_state", "pooler_output"],
    buckets=[Bucket(b, s) for b in (1, 4) for s in (8, 16)],
    vocab_size=100,
    max_rows=4,
    type_vocab_size=2,
)


def parse(body, tokenize=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(raw, LIMITS, tokenize)


def test_one_flat_sequence():
    req = parse({"input_ids": [1, 2, 3]})
    assert req.single and [r.inputs for r in req.rows] == [{"input_ids": (1, 2, 3)}]
    assert req.outputs == ["last_hidden_state", "pooler_output"]


def test_ragged_sequences_with_masks_and_chosen_outputs():
    req = parse(
        {
            "input_ids": [[1, 2, 3], [4]],
            "attention_mask": [[1, 1, 0], [1]],
            "outputs": ["pooler_output"],
        }
    )
    assert not req.single and [r.length for r in req.rows] == [3, 1]
    assert req.rows[0].inputs["attention_mask"] == (1, 1, 0)
    assert req.outputs == ["pooler_output"]


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b'{"input_ids": [1, 2', 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        ([1, 2, 3], 422, "JSON object"),
        ({"ids": [1, 2]}, 422, "unknown field"),
        ({"attention_mask": [1]}, 422, "missing field 'input_ids'"),
        ({"input_ids": []}, 422, "list of integers"),
        ({"input_ids": [[1, 2], []]}, 422, "empty sequence"),
        ({"input_ids": [1.5, 2]}, 422, "integers only"),
        ({"input_ids": [True, 2]}, 422, "integers only"),
        ({"input_ids": "hello"}, 422, "list of integers"),
        ({"input_ids": [1, 2], "attention_mask": [1]}, 422, "'attention_mask' has 1 values"),
        ({"input_ids": [[1], [2]], "attention_mask": [[1]]}, 422, "has 1 sequences"),
        ({"input_ids": [1, 200]}, 422, "'input_ids' must lie in [0, 100)"),
        (
            {"input_ids": [1, 2], "token_type_ids": [0, -1]},
            422,
            "'token_type_ids' must lie in [0, 2)",
        ),
        # Each of these passed the checks and failed its whole batch with a 500.
        (
            {"input_ids": [1, 2], "token_type_ids": [0, 5]},
            422,
            "'token_type_ids' must lie in [0, 2) (the model's type_vocab_size), got values in [0, 5]",
        ),
        (
            {"input_ids": [1, 2], "token_type_ids": [0, 2**70]},
            422,
            "'token_type_ids' must lie in [0, 2)",
        ),
        (
            {"input_ids": [[1, 2]], "attention_mask": [[1, 7]]},
            422,
            "'attention_mask' must lie in {0, 1}",
        ),
        (
            {"input_ids": [1, 2], "attention_mask": [1, -1]},
            422,
            "'attention_mask' must lie in {0, 1}",
        ),
        ({"input_ids": [1, 2**64]}, 422, "'input_ids' must lie in [0, 100)"),
        (b"[" * 100_000, 400, "nests JSON deeper than 32"),
        (b'{"input_ids": ' + b"[" * 100_000, 400, "nests JSON deeper than 32"),
        (
            b'{"input_ids": [1], "text": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}",
            400,
            "nests JSON",
        ),
        ({"input_ids": [[[1, 2]]]}, 422, "integers only"),
        (b'{"input_ids": [1' + b"0" * 5000 + b"]}", 400, "not valid JSON"),
        ({"input_ids": list(range(17))}, 413, "longer than every bucket"),
        ({"input_ids": [[1]] * 5}, 413, "at most 4"),
        ({"input_ids": [1], "outputs": ["logits"]}, 422, "unknown output"),
        ({"input_ids": [1], "outputs": []}, 422, "non-empty list"),
        ({"text": "hello"}, 422, "carries no tokenizer"),
    ],
)
def test_bad_requests_get_a_4xx_and_a_clear_message(body, status, words):
    with pytest.raises(RequestError) as e:
        parse(body)
    assert e.value.status == status
    assert words in str(e.value)


def test_without_recorded_sizes_ids_are_bounded_by_int64():
    limits = dataclasses.replace(LIMITS, vocab_size=None, type_vocab_size=None)
    for name in ("input_ids", "token_type_ids"):
        body = {"input_ids": [1, 2], name: [0, 2**63]}
        with pytest.raises(RequestError, match=rf"'{name}' must lie in \[0, 2\*\*63\)") as e:
            parse_request(json.dumps(body).encode(), limits)
        assert e.value.status == 422
        body[name] = [0, 2**63 - 1]
        assert parse_request(json.dumps(body).encode(), limits).rows[0].inputs[name][1] == 2**63 - 1


def test_limits_come_from_the_manifest(tiny_artifact):
    from kernl.artifacts import read_manifest

    limits = ModelLimits.from_manifest(read_manifest(tiny_artifact), max_rows=8)
    assert (limits.vocab_size, limits.type_vocab_size, limits.max_rows) == (120, 2, 8)
    assert [s.name for s in limits.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert limits.output_names == ["last_hidden_state", "pooler_output"]
    raw = json.dumps({"input_ids": [5, 6], "token_type_ids": [0, 2]}).encode()
    with pytest.raises(RequestError, match="type_vocab_size"):
        parse_request(raw, limits)


def test_deep_but_legal_json_in_strings_still_parses():
    # Brackets inside a string count towards the depth bound only while they stay unclosed.
    req = parse({"input_ids": [1, 2], "outputs": ["pooler_output"]})
    assert req.outputs == ["pooler_output"]
    # 1600 brackets: past MAX_JSON_DEPTH, and within the text length the longest bucket takes
    assert parse({"text": "[]" * 800}, lambda texts: [{"input_ids": [1]}]).rows


def test_brackets_inside_strings_do_not_count_towards_the_depth():
    """A prompt of code or markdown may hold many unclosed brackets; only JSON's own nesting
    is bounded. A quote after an odd run of backslashes stays inside its string."""
    text = 'x = a["k"][0]; f({[' * 40 + '\\"[[' * 20
    assert parse({"text": text}, lambda texts: [{"input_ids": [1]}]).rows
    for body in (
        b'{"text": "\\\\", "input_ids": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}",
        b'{"text": "\\"[", "input_ids": ' + b"[" * 40,
    ):
        with pytest.raises(RequestError, match="nests JSON deeper than 32") as e:
            parse(body)
        assert e.value.status == 400


def test_text_goes_through_the_tokenizer():
    def tokenize(texts):
        return [{"input_ids": [len(t)] * 2, "attention_mask": [1, 1], "extra": [0]} for t in texts]

    req = parse({"text": ["ab", "abc"]}, tokenize)
    assert [r.inputs for r in req.rows] == [
        {"input_ids": (2, 2), "attention_mask": (1, 1)},
        {"input_ids": (3, 3), "attention_mask": (1, 1)},
    ]
    with pytest.raises(RequestError, match="not both"):
        parse({"text": "a", "input_ids": [1]}, tokenize)


def test_text_pairs_go_through_the_tokenizer_as_pairs():
    """A cross-encoder (reranker) scores a query with a passage: one sequence made of two
    texts, as HF's tokenizer(text, text_pair); the text API took single texts only."""
    seen = []

    def tokenize(texts):
        seen.append(texts)
        return [{"input_ids": [len(a), len(b)], "token_type_ids": [0, 1]} for a, b in texts]

    req = parse({"text": ["q", "qq"], "text_pair": ["ppp", "pppp"]}, tokenize)
    assert seen == [[("q", "ppp"), ("qq", "pppp")]] and not req.single
    assert [r.inputs for r in req.rows] == [
        {"input_ids": (1, 3), "token_type_ids": (0, 1)},
        {"input_ids": (2, 4), "token_type_ids": (0, 1)},
    ]
    req = parse({"text": "q", "text_pair": "pp"}, tokenize)
    assert req.single and [r.inputs["input_ids"] for r in req.rows] == [(1, 2)]


def test_text_pairs_that_do_not_pair_are_a_422_before_tokenizing():
    refuse = lambda texts: pytest.fail("tokenized")  # noqa: E731
    most = 16 * protocol.MAX_CHARS_PER_TOKEN
    for body, status, needle in [
        ({"text": ["a", "b"], "text_pair": ["p"]}, 422, "'text_pair' has 1 strings and 'text' 2"),
        ({"text": ["a"], "text_pair": "p"}, 422, "must be a list of strings when 'text' is a"),
        ({"text": "a", "text_pair": ["p"]}, 422, "must be a string when 'text' is one"),
        ({"text": ["a"], "text_pair": [3]}, 422, "must be a list of strings"),
        ({"text_pair": "p"}, 422, "the second text of each 'text'"),
        ({"input_ids": [1], "text_pair": "p"}, 422, "the second text of each 'text'"),
        ({"text": "a" * most, "text_pair": "p"}, 413, "'text' with its 'text_pair' has"),
    ]:
        with pytest.raises(RequestError, match=needle) as e:
            parse(body, refuse)
        assert e.value.status == status, body
    with pytest.raises(RequestError, match=r"'text_pair'\[1\] is not valid Unicode") as e:
        parse(json.dumps({"text": ["a", "b"], "text_pair": ["p", "\ud800"]}).encode(), refuse)
    assert e.value.status == 422


def test_text_the_tokenizer_cannot_take_is_a_422_not_a_500():
    """JSON may carry a lone surrogate, which is no Unicode; the `tokenizers` package raises a
    TypeError for it, which reached the server as a 500."""

    def tokenize(texts):
        for t in texts:
            t.encode("utf-8")  # raises for a lone surrogate, as a real tokenizer's bindings do
            if t == "refused":
                raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")
        return [{"input_ids": [1]} for _ in texts]

    for text, needle in [("\ud800", "lone surrogate at character 0"),
                         (["ok", "a\udfffb"], r"'text'\[1\] is not valid Unicode"),
                         ("refused", "the tokenizer refused")]:  # fmt: skip
        with pytest.raises(RequestError, match=needle) as e:
            parse(json.dumps({"text": text}).encode(), tokenize)
        assert e.value.status == 422


def test_text_with_no_tokens_or_with_the_tokenizers_own_fields_is_a_422():
    """A tokenizer without special tokens gives "" no ids: that was a 500 (min() of nothing).
    An attention_mask or token_type_ids sent with 'text' was dropped without a word."""

    def tokenize(texts):
        return [{"input_ids": [len(w) for w in t.split()]} for t in texts]

    for body, needle in [({"text": ""}, "'text' gives no tokens"),
                         ({"text": ["w1", "  "]}, r"'text'\[1\] gives no tokens"),
                         ({"text": "w1", "attention_mask": "garbage"}, "come from the tokenizer"),
                         ({"text": "w1", "token_type_ids": [[7]]}, "token_type_ids")]:  # fmt: skip
        with pytest.raises(RequestError, match=needle) as e:
            parse(body, tokenize)
        assert e.value.status == 422


def test_too_many_or_too_long_texts_are_refused_before_tokenizing():
    """The count and each text's length are checked first: 1.7 M texts took 25 s to tokenize
    before their 413, a 2.8 M-token text 5 s, the replica's event loop held meanwhile."""
    refuse = lambda texts: pytest.fail("tokenized")  # noqa: E731
    with pytest.raises(RequestError, match="5 sequences in one request; at most 4") as e:
        parse({"text": ["w1"] * 5}, refuse)
    assert e.value.status == 413
    most = 16 * protocol.MAX_CHARS_PER_TOKEN  # the longest bucket's tokens
    with pytest.raises(RequestError, match=rf"'text'\[1\] has {most + 1} characters") as e:
        parse({"text": ["w1", "w" * (most + 1)]}, refuse)
    assert e.value.status == 413
    words = lambda texts: [{"input_ids": [1] * 3} for _ in texts]  # noqa: E731
    assert len(parse({"text": "w" * most}, words).rows) == 1


def test_many_rows_are_counted_before_they_are_built(monkeypatch):
    monkeypatch.setattr(protocol, "Row", lambda inputs: pytest.fail("built a row"))
    with pytest.raises(RequestError, match="6 sequences in one request") as e:
        parse({"input_ids": [[1]] * 6})
    assert e.value.status == 413


def test_a_large_body_is_parsed_off_the_event_loop():
    import asyncio
    import threading

    seen = []

    def parse_it(body, limits):
        seen.append(threading.current_thread())
        return len(body)

    small = b"x" * protocol.INLINE_PARSE_BYTES
    for body in (small, small + b"x"):
        assert asyncio.run(protocol.parse_off_loop(parse_it, body, LIMITS)) == len(body)
    assert seen[0] is threading.main_thread() and seen[1] is not threading.main_thread()
