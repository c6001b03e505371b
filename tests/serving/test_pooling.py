"""Sentence embeddings pooled by the server ('pooling', 'normalize'): the vectors
sentence-transformers' Pooling and Normalize modules compute (the mean over the real tokens,
or the first token's; divided by the L2 norm), here in float64 from the model's own output,
for requests that share one batch with others that ask for no pooling."""

import json

import pytest
import torch

import kernl
from kernl.serving.encoder import serve_batch
from kernl.serving.protocol import ModelLimits, RequestError, parse_request


@pytest.fixture(scope="module")
def model(tiny_artifact):
    return kernl.runtime.load(tiny_artifact, device="cpu")


def parse(model, body):
    limits = ModelLimits.from_manifest(model.manifest, max_rows=8)
    return parse_request(json.dumps(body).encode(), limits)


def reference_embedding(model, ids, mask, mode, normalize):
    out = model(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([mask]))
    hidden = out["last_hidden_state"][0].double()
    if mode == "cls":
        vector = hidden[0]
    else:
        real = torch.tensor(mask, dtype=torch.bool)
        vector = hidden[real].mean(0)
    return (vector / vector.norm() if normalize else vector).float()


def test_pooled_embeddings_are_the_mean_or_first_token_of_the_models_output(model):
    ids = [[5, 9, 14, 30, 7], [8, 11], [40, 41, 42]]
    masks = [[1, 1, 1, 0, 0], [1, 1], [1, 1, 1]]  # the first ends in padding the client sent
    bodies = [
        {"input_ids": ids, "attention_mask": masks, "pooling": "mean", "normalize": True},
        {"input_ids": ids[0], "attention_mask": masks[0], "pooling": "mean"},
        {
            "input_ids": ids[1:],
            "pooling": "cls",
            "outputs": ["sentence_embedding", "pooler_output"],
        },
        {"input_ids": ids[2], "outputs": ["pooler_output"]},  # no pooling, same batch
    ]
    requests = [parse(model, b) for b in bodies]
    answers = serve_batch(model, requests)
    assert sorted(answers[0]["outputs"]) == ["sentence_embedding"]  # the default with pooling
    assert sorted(answers[3]["outputs"]) == ["pooler_output"]

    def check(got, ids, mask, mode, normalize):
        want = reference_embedding(model, ids, mask, mode, normalize)
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-5, rtol=1e-5)

    for j in range(3):
        check(answers[0]["outputs"]["sentence_embedding"][j], ids[j], masks[j], "mean", True)
    check(answers[1]["outputs"]["sentence_embedding"], ids[0], masks[0], "mean", False)
    for j in range(2):
        check(
            answers[2]["outputs"]["sentence_embedding"][j],
            ids[1 + j],
            [1] * len(ids[1 + j]),
            "cls",
            False,
        )
    assert len(answers[2]["outputs"]["pooler_output"]) == 2
    # the padding the client sent changed nothing but the mask: the same mean as the real tokens'
    alone = parse(model, {"input_ids": ids[0][:3], "pooling": "mean", "normalize": True})
    torch.testing.assert_close(
        torch.tensor(serve_batch(model, [alone])[0]["outputs"]["sentence_embedding"]),
        torch.tensor(answers[0]["outputs"]["sentence_embedding"][0]),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"pooling": "max"}, r"'pooling' must be one of \['mean', 'cls'\]"),
        ({"normalize": True}, "add 'pooling'"),
        ({"pooling": "mean", "normalize": "yes"}, "true or false"),
        ({"outputs": ["sentence_embedding"]}, "made by 'pooling'"),
        ({"pooling": "cls", "outputs": ["pooler_output"]}, "add it to 'outputs'"),
    ],
)
def test_pooling_fields_that_make_no_pooling_are_a_422(model, body, needle):
    with pytest.raises(RequestError, match=needle) as e:
        parse(model, {"input_ids": [5, 6], **body})
    assert e.value.status == 422


def test_a_model_without_hidden_states_cannot_pool(model):
    limits = ModelLimits.from_manifest(model.manifest, max_rows=8)
    limits = ModelLimits(limits.inputs, ["logits"], limits.buckets, 120, 8)
    body = json.dumps({"input_ids": [5, 6], "pooling": "mean"}).encode()
    with pytest.raises(RequestError, match="no 'last_hidden_state' to pool") as e:
        parse_request(body, limits)
    assert e.value.status == 422
