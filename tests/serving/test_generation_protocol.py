"""Streamed generation text (generation_protocol.StreamedText, token_event): the "text"
pieces of a stream's events add up to the text of the same answer returned at once, for the
tokenizer families whose tokens do not decode alone to their share of the text. No Ray."""

import json

import pytest

pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from kernl.serving.generation_protocol import (  # noqa: E402
    GenerationRequest,
    SamplingKey,
    StreamedText,
    answer_body,
    token_event,
)
from kernl.serving.tokenizer import load_detokenizer  # noqa: E402

SENTENCEPIECE_WORDS = ["<unk>", "</s>", "▁Hello", "▁world", "▁how", "▁are", "▁you", "▁é"]


def sentencepiece_like(folder):
    """Metaspace, as Llama-2's, Mistral's and T5's tokenizer.json: a word token starts with
    the space ("▁") that its text alone drops."""
    vocab = {w: i for i, w in enumerate(SENTENCEPIECE_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(folder / "tokenizer.json"))
    return tok


def byte_level(folder):
    """Byte-level BPE, as GPT-2's, Llama-3's and Qwen2's: trained on ASCII text, so "é" and
    "日本" are split over byte tokens, each decoding alone to U+FFFD."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet)
    tok.train_from_iterator(["hello world how are you"] * 10, trainer)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def word_level(folder):
    """No decoder: the tokens are joined with spaces (the serving tests' tokenizer)."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(40)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return tok


def request(max_new_tokens, eos=()):
    return GenerationRequest([1], {"max_new_tokens": max_new_tokens}, True, SamplingKey(False, eos))


def streamed(detokenize, req, ids):
    """The texts of the events of a stream of `ids`, as the replica sends them (and the rest
    it sends before [DONE] if the stream ends early)."""
    text = StreamedText(detokenize, req)
    events = [
        json.loads(token_event(k, t, text.add(t))[len("data: ") :]) for k, t in enumerate(ids)
    ]
    assert [e["token_id"] for e in events] == ids
    return [e["text"] for e in events], text.finish()


@pytest.mark.parametrize(
    "make, text",
    [
        (sentencepiece_like, "Hello world how are you"),
        (byte_level, "hello café 日本 é you"),
        (byte_level, "日本"),
        (word_level, "w5 w17 w33 w2"),
    ],
)
@pytest.mark.parametrize("extra_budget", [0, 3])  # the last token ends its budget, or not
def test_streamed_pieces_add_up_to_the_returned_text(tmp_path, make, text, extra_budget):
    ids = make(tmp_path).encode(text).ids
    detokenize = load_detokenizer(tmp_path)
    req = request(len(ids) + extra_budget)
    pieces, rest = streamed(detokenize, req, ids)
    whole = answer_body(req, ids, "length", detokenize)["text"]
    assert whole == text
    assert "".join(pieces) + rest == whole, pieces
    assert all("\ufffd" not in p for p in pieces), pieces  # no half characters
    if extra_budget == 0:  # the budget's last token flushed the text: nothing left over
        assert rest == ""


def test_sentencepiece_pieces_keep_their_spaces(tmp_path):
    ids = sentencepiece_like(tmp_path).encode("Hello world how").ids
    pieces, rest = streamed(load_detokenizer(tmp_path), request(len(ids)), ids)
    assert pieces == ["Hello", " world", " how"] and rest == ""


def test_a_split_character_comes_whole_with_the_token_that_completes_it(tmp_path):
    tok = byte_level(tmp_path)
    ids = tok.encode("日").ids
    assert len(ids) == 3  # one token per UTF-8 byte
    pieces, rest = streamed(load_detokenizer(tmp_path), request(8), ids)
    assert pieces == ["", "", "日"] and rest == ""


def test_an_eos_token_ends_the_text_and_a_cut_character_is_flushed(tmp_path):
    """The EOS id flushes (it is the answer's last token); a stream whose text ends with an
    incomplete character sends it as the returned text has it (U+FFFD) rather than never."""
    tok = sentencepiece_like(tmp_path)
    eos = tok.token_to_id("</s>")
    ids = tok.encode("Hello world").ids + [eos]
    detokenize = load_detokenizer(tmp_path)
    pieces, rest = streamed(detokenize, request(16, eos=(eos,)), ids)
    assert pieces == ["Hello", " world", ""] and rest == ""  # special tokens are skipped

    byte_level(tmp_path)
    detokenize = load_detokenizer(tmp_path)
    ids = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("ab日").ids[:-1]
    pieces, rest = streamed(detokenize, request(len(ids)), ids)
    assert "".join(pieces) + rest == detokenize(ids) and detokenize(ids).endswith("\ufffd")


def test_token_event_without_a_tokenizer_has_no_text():
    assert json.loads(token_event(3, 17)[len("data: ") :]) == {"index": 3, "token_id": 17}
