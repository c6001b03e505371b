"""Answers as the server sends them: `response_bytes` is `json.dumps` of the JSON object the
server answered with before it (every fp16 and bf16 value, NaN and infinities, nested and
ragged outputs, byte for byte), and "encoding": "base64" round-trips every bit."""

import base64
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kernl.artifacts.schema import Bucket, InputSpec, OutputSpec
from kernl.serving.batching import Row, plan_groups, smallest_bucket, token_costs
from kernl.serving.encoder import serve_batch, serve_batch_bytes
from kernl.serving.protocol import (
    ModelLimits,
    ParsedRequest,
    RequestError,
    _half_table,
    parse_request,
    prepare_answers,
    response_body,
    response_bytes,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def reference_body(per_row, request, extra) -> bytes:
    """The answer as the server encoded it before response_bytes: tolist, non-finite floats
    as strings, json.dumps of the whole object."""

    def plain(value):
        if isinstance(value, float):
            return value if math.isfinite(value) else str(value)
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    outputs = {}
    for name in request.outputs:
        values = [plain(r[name].tolist()) for r in per_row]
        outputs[name] = values[0] if request.single else values
    return json.dumps({"outputs": outputs, **extra}).encode()


def every_value(dtype) -> torch.Tensor:
    """All 65,536 bit patterns of a 16-bit float dtype (NaNs, infinities, -0.0, subnormals)."""
    bits = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16))
    return bits.view(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_half_value_is_spelled_as_json_dumps_spelled_it(dtype):
    values = every_value(dtype)
    request = ParsedRequest([Row({"input_ids": (1,)})], True, ["x"])
    got = response_bytes([{"x": values}], request, {})
    assert got == reference_body([{"x": values}], request, {})


def random_outputs(dtype, lengths, seed=0):
    """Per row, a BERT-shaped pair (last_hidden_state cut to the row's length, pooler) with
    NaN, infinities and -0.0 sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        hidden = (torch.randn(n, 24, generator=g) * 100).to(dtype)
        pooled = torch.randn(24, generator=g).to(dtype)
        hidden.view(-1)[:4] = torch.tensor([math.nan, math.inf, -math.inf, -0.0], dtype=dtype)
        rows.append({"last_hidden_state": hidden, "pooler_output": pooled})
    return rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("single", [True, False])
@pytest.mark.parametrize("outputs", [["last_hidden_state", "pooler_output"], ["pooler_output"]])
def test_answer_bytes_equal_json_dumps_of_the_answer(dtype, single, outputs):
    per_row = random_outputs(dtype, [5] if single else [5, 1, 3])
    rows = [Row({"input_ids": (1,) * v["last_hidden_state"].shape[0]}) for v in per_row]
    request = ParsedRequest(rows, single, outputs)
    extra = {"replica": "r1", "replays": [{"bucket": "4x8", "requests": 2, "rows": 3}]}
    expected = reference_body(per_row, request, extra)
    assert response_bytes(per_row, request, extra) == expected
    assert json.dumps(response_body(per_row, request, extra)).encode() == expected
    assert response_bytes(per_row, request, {}) == reference_body(per_row, request, {})


@pytest.mark.parametrize("value", [torch.tensor(1.5, dtype=torch.float16), torch.arange(3)])
def test_scalar_and_integer_outputs(value):
    request = ParsedRequest([Row({"input_ids": (1,)})], False, ["x"])
    assert response_bytes([{"x": value}], request, {"a": 1}) == reference_body(
        [{"x": value}], request, {"a": 1}
    )


def decode(value: dict) -> torch.Tensor:
    dtype = getattr(torch, value["dtype"])
    raw = bytearray(base64.b64decode(value["data"]))
    return torch.frombuffer(raw, dtype=dtype).reshape(value["shape"])


@pytest.mark.parametrize("dtype", DTYPES + [torch.int64, torch.bool])
def test_base64_round_trips_every_bit(dtype):
    if dtype in (torch.float16, torch.bfloat16):
        value = every_value(dtype).reshape(256, 256)[:, :200]  # not contiguous
    elif dtype == torch.float32:
        value = torch.randn(7, 5).t()
        value[0, 0] = math.nan
    elif dtype == torch.bool:
        value = torch.arange(10) % 3 == 0
    else:
        value = torch.tensor([-(2**63), 2**63 - 1, 0])
    rows = [Row({"input_ids": (1,)}), Row({"input_ids": (1,)})]
    request = ParsedRequest(rows, False, ["x"], encoding="base64")
    per_row = [{"x": value}, {"x": value[:1]}]
    answer = json.loads(response_bytes(per_row, request, {"replica": "r"}))
    assert answer == response_body(per_row, request, {"replica": "r"})
    for sent, got in zip((r["x"] for r in per_row), answer["outputs"]["x"]):
        back = decode(got)
        assert back.dtype == dtype and back.shape == sent.shape
        assert torch.equal(back.contiguous().view(torch.uint8), sent.contiguous().view(torch.uint8))


LIMITS = ModelLimits(
    inputs=[InputSpec("input_ids", "int64", 0, "required")],
    output_names=["last_hidden_state", "pooler_output"],
    buckets=[Bucket(b, 8) for b in (1, 4)],
    vocab_size=100,
    max_rows=4,
)


def test_encoding_field_is_parsed_and_checked():
    assert parse_request(b'{"input_ids": [1]}', LIMITS).encoding == "json"
    body = b'{"input_ids": [1], "encoding": "base64"}'
    assert parse_request(body, LIMITS).encoding == "base64"
    with pytest.raises(RequestError) as e:
        parse_request(b'{"input_ids": [1], "encoding": "hex"}', LIMITS)
    assert e.value.status == 422 and "'encoding' must be one of" in str(e.value)
    with pytest.raises(RequestError) as e:
        parse_request(b'{"input_ids": [1, true]}', LIMITS)
    assert e.value.status == 422 and "integers only" in str(e.value)


class StubModel:
    """A BERT-shaped fp16 model of fixed outputs: the host's side of a request alone."""

    def __init__(self, hidden=16):
        self.buckets = [Bucket(b, 8) for b in (1, 4)]
        self.manifest = SimpleNamespace(
            inputs=LIMITS.inputs,
            outputs=[
                OutputSpec("last_hidden_state", "float16", 0, 1),
                OutputSpec("pooler_output", "float16", 0, None),
            ],
        )
        g = torch.Generator().manual_seed(0)
        self.hidden = torch.randn(4, 8, hidden, generator=g).half()
        self.pooled = torch.randn(4, hidden, generator=g).half()

    def __call__(self, input_ids, **_):
        b = input_ids.shape[0]
        return {"last_hidden_state": self.hidden[:b], "pooler_output": self.pooled[:b]}


def test_serve_batch_bytes_are_the_encoded_answers_of_serve_batch():
    bodies = [
        {"input_ids": [5, 6, 7]},
        {"input_ids": [[5], [6, 7, 8, 9, 10]], "outputs": ["pooler_output"]},
        {"input_ids": [9, 9], "encoding": "base64"},
        {"input_ids": [[1, 2]], "outputs": ["last_hidden_state"]},
    ]
    requests = [parse_request(json.dumps(b).encode(), LIMITS) for b in bodies]
    model = StubModel()
    answers = serve_batch(model, requests, extra={"replica": "r"})
    encoded = serve_batch_bytes(model, requests, extra={"replica": "r"})
    assert encoded == [json.dumps(a).encode() for a in answers]
    assert len(json.loads(encoded[0])["outputs"]["last_hidden_state"]) == 3


def plan_before(lengths, buckets):
    """plan_groups as it was before it cached smallest_bucket: the reference."""
    costs = token_costs(buckets)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n, max_batch = len(order), max(b.batch for b in buckets)
    best, cut, choice = [0.0] + [None] * n, [0] * (n + 1), [None] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j - 1, max(-1, j - 1 - max_batch), -1):
            bucket = smallest_bucket(buckets, j - i, longest)
            if bucket is None or best[i] is None:
                continue
            cost = best[i] + costs[bucket]
            if best[j] is None or cost < best[j]:
                best[j], cut[j], choice[j] = cost, i, bucket
    groups, j = [], n
    while j > 0:
        groups.append((tuple(order[cut[j] : j]), choice[j]))
        j = cut[j]
    return groups[::-1]


@pytest.mark.parametrize("seed", range(20))
def test_plan_equals_the_plan_before_caching(seed):
    g = torch.Generator().manual_seed(seed)
    buckets = [Bucket(b, s) for b in (1, 3, 8) for s in (4, 16, 32)]
    lengths = torch.randint(1, 33, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g)
    lengths = lengths.tolist()
    got = [(grp.rows, grp.bucket) for grp in plan_groups(lengths, buckets)]
    assert got == plan_before(lengths, buckets)


def test_prepare_answers_builds_the_tables_before_the_first_request():
    _half_table.cache_clear()
    prepare_answers(["float16", "float32", "no_such_dtype"])
    assert _half_table(torch.float16) is not None and _half_table(torch.float32) is None
    assert _half_table.cache_info().hits == 2  # both built by prepare_answers


def test_rows_of_the_same_bucket_lengths_share_one_plan():
    """A length counts only through the shortest bucket length that holds it: batches of other
    lengths in the same classes reuse the plan, and get the groups the full search gives."""
    from kernl.serving.batching import _plan_cuts

    buckets = [Bucket(b, s) for b in (1, 4, 16) for s in (16, 128)]
    first = [100, 128, 7, 128, 99, 16, 120, 3]
    plan_groups(first, buckets)
    hits = _plan_cuts.cache_info().hits
    second = [128, 101, 16, 127, 98, 2, 17, 9]  # the same classes: 16 x3, 128 x5
    got = [(grp.rows, grp.bucket) for grp in plan_groups(second, buckets)]
    assert _plan_cuts.cache_info().hits == hits + 1
    assert got == plan_before(second, buckets)
