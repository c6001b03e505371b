"""A tiny BERT compiled in CPU mode for the serving tests (plain aten programs: the serving
layer does not care which ops a program holds, and Triton's interpreter would make 200
requests take minutes), with a word-level tokenizer.json so text requests work too."""

import pytest
import torch
import transformers as T

import kernl.compiler

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(60)]
BUCKETS = "batch=1,4,8 seq=8,16,32"


def write_tokenizer(folder) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",  # BERT's: a cross-encoder's query and passage
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="session")
def tokenizer_writer():
    """write_tokenizer, for test modules (a `from conftest import` finds another conftest
    when several folders' tests are collected together)."""
    return write_tokenizer


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    torch.manual_seed(0)
    config = T.BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=120,
        max_position_embeddings=80,
    )
    path = tmp_path_factory.mktemp("serving") / "tiny.kernl"
    kernl.compiler.compile(
        T.BertModel(config).eval(), BUCKETS, path, dtype="fp32", device="cpu", kernels=False
    )
    write_tokenizer(path)
    return path
