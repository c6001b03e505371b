"""The generation batching policy (kernl/serving/generation_batcher.py) in one process, on a
tiny Llama compiled in CPU mode: concurrent requests share one model call (the calls are
counted), each gets the ids of its prompt generated alone, streamed per request; a client
that leaves does not disturb the others; a request arriving mid-batch waits for the next one.
No Ray, no HTTP, no fixed sleeps: where a test needs a batch to be "running", a gate holds
the model between two steps until the test releases it."""

import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import pytest

import kernl.compiler
import kernl.runtime
from kernl.serving.generation_batcher import QUIET_STEPS, BatchPolicy, GenerationBatcher
from kernl.serving.generation_protocol import (
    GenerationLimits,
    parse_generation_request,
)
from kernl.serving.protocol import RequestError

sys.path.insert(0, str(Path(__file__).parent.parent / "generation"))
from tiny_models import tiny_model  # noqa: E402

CACHE = 64
BUCKETS = f"batch=1,4,8 prompt=8,16 cache={CACHE}"
GATE_TIMEOUT_S = 60  # a gate never released fails the test instead of hanging it


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("batcher") / "llama.kernl"
    kernl.compiler.compile(
        tiny_model("llama3"), BUCKETS, path, dtype="fp32", device="cpu", task="causal-lm"
    )
    return path


@pytest.fixture(scope="module")
def model(artifact):
    return kernl.runtime.load(artifact, device="cpu")


def test_the_startup_line_gives_a_generation_artifacts_axes(artifact, tiny_artifact):
    """kernl serve's startup line: a causal LM's batches, longest prompt and cache (its
    buckets listed as BxS mixed prefill and decode shapes); an encoder's buckets."""
    from kernl.serving.cli import _check_artifact

    assert _check_artifact(str(artifact))[1] == f"batches 1,4,8, prompts up to 16, cache {CACHE}"
    assert _check_artifact(str(tiny_artifact))[1].startswith("buckets 1x")


@pytest.fixture(scope="module")
def limits(model):
    return GenerationLimits.from_manifest(model.manifest)


class Counting:
    """The model, with its calls counted (and optionally held after their first step)."""

    def __init__(self, model, gated: bool = False, fail: bool = False):
        self.model = model
        self.calls: list[tuple[str, int]] = []  # (generate | stream, rows)
        self.gated = gated
        self.fail = fail
        self.first_step = threading.Event()  # a gated call has produced its first step
        self.gate = threading.Event()  # the test lets it go on
        self.steps = 0

    def generate(self, prompts, **options):
        self.calls.append(("generate", len(prompts)))
        if self.fail:
            raise RuntimeError("the device fell over")
        return self.model.generate(prompts, **options)

    def stream(self, prompts, **options):
        self.calls.append(("stream", len(prompts)))
        if self.fail:
            raise RuntimeError("the device fell over")
        return self._steps(self.model.stream(prompts, **options))

    def _steps(self, inner):
        try:
            for k, ids in enumerate(inner):
                self.steps += 1
                yield ids
                if k == 0 and self.gated:
                    self.first_step.set()
                    assert self.gate.wait(GATE_TIMEOUT_S), "gate never released"
        finally:
            inner.close()


def request(limits, prompt, **fields):
    return parse_generation_request(json.dumps({"input_ids": prompt, **fields}).encode(), limits)


def alone(model, prompt, **options):
    return model.generate([prompt], **options)[0, len(prompt) :].tolist()


PROMPTS = [[5, 17, 33], [9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [60, 61, 62, 63, 64]]


class Records(list):
    """The batcher's BatchRecords; `await records.first()` waits until one is reported (after
    the call returns, which may be after its requests were answered)."""

    def __init__(self):
        super().__init__()
        self.event = asyncio.Event()

    def __call__(self, record) -> None:
        self.append(record)
        self.event.set()

    async def first(self):
        await asyncio.wait_for(self.event.wait(), GATE_TIMEOUT_S)
        return self[0]


async def wait_for(event: threading.Event) -> None:
    """Await a threading.Event without blocking the event loop (the batcher runs on it)."""
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, event.wait, GATE_TIMEOUT_S)


def test_concurrent_requests_share_one_call_and_get_their_own_ids(model, limits):
    counting = Counting(model)
    new = [12, 5, 9, 12]  # different lengths: per-step delivery, each answered at its end
    stream = [False, True, False, True]
    requests = [
        request(limits, p, max_new_tokens=n, stream=s) for p, n, s in zip(PROMPTS, new, stream)
    ]

    async def main():
        records = Records()
        batcher = GenerationBatcher(counting, limits, BatchPolicy(8, 0.0), on_batch=records)
        tickets = [batcher.submit(r) for r in requests]  # all waiting when the batch starts
        results = await asyncio.gather(*(t.result() for t in tickets))
        return tickets, results, await records.first()

    tickets, results, record = asyncio.run(main())
    assert counting.calls == [("stream", 4)], counting.calls
    for prompt, n, ids, t in zip(PROMPTS, new, results, tickets):
        assert ids == alone(model, prompt, max_new_tokens=n), prompt
        assert t.finish_reason == "length" and t.batch_index == 0 and t.batch_requests == 4
    assert record.requests == 4 and record.steps == 12 and record.mode == "stream"


def test_same_length_unstreamed_requests_take_one_generate_call(model, limits):
    counting = Counting(model)
    requests = [request(limits, p, max_new_tokens=7) for p in PROMPTS]

    async def main():
        batcher = GenerationBatcher(counting, limits, BatchPolicy(8, 0.0))
        tickets = [batcher.submit(r) for r in requests]
        return await asyncio.gather(*(t.result() for t in tickets))

    results = asyncio.run(main())
    assert counting.calls == [("generate", 4)], counting.calls
    for prompt, ids in zip(PROMPTS, results):
        assert ids == alone(model, prompt, max_new_tokens=7)


def test_each_row_stops_at_its_own_eos(model, limits):
    """The batch's EOS ids are shared (one key); each request ends at its own row's EOS."""
    counting = Counting(model)
    free = [alone(model, p, max_new_tokens=10) for p in PROMPTS]
    eos = free[0][3]  # stops the first prompt after 4 tokens; maybe others elsewhere
    requests = [request(limits, p, max_new_tokens=10, eos_token_id=eos) for p in PROMPTS]

    async def main():
        batcher = GenerationBatcher(counting, limits, BatchPolicy(8, 0.0))
        tickets = [batcher.submit(r) for r in requests]
        results = await asyncio.gather(*(t.result() for t in tickets))
        return results, [t.finish_reason for t in tickets]

    results, reasons = asyncio.run(main())
    assert len(counting.calls) == 1, counting.calls
    for prompt, ids, reason in zip(PROMPTS, results, reasons):
        assert ids == alone(model, prompt, max_new_tokens=10, eos_token_id=eos)
        assert reason == ("eos" if ids[-1] == eos else "length")
    assert results[0] == free[0][:4] and reasons[0] == "eos"


def test_incompatible_requests_wait_for_the_next_call(model, limits):
    """Greedy and sampled requests, or different EOS ids, cannot share a call; the batch
    opened by the oldest request takes the compatible ones, the next call the rest, in
    arrival order."""
    counting = Counting(model)
    sampled = {"do_sample": True, "temperature": 0.9, "top_k": 20, "seed": 3}
    requests = [
        request(limits, PROMPTS[0], max_new_tokens=6),
        request(limits, PROMPTS[1], max_new_tokens=6, **sampled),
        request(limits, PROMPTS[2], max_new_tokens=6),
        request(limits, PROMPTS[3], max_new_tokens=6, eos_token_id=[5]),
    ]

    async def main():
        batcher = GenerationBatcher(counting, limits, BatchPolicy(8, 0.0))
        tickets = [batcher.submit(r) for r in requests]
        results = await asyncio.gather(*(t.result() for t in tickets))
        return results, [t.batch_index for t in tickets]

    results, batches = asyncio.run(main())
    assert counting.calls == [("generate", 2), ("generate", 1), ("generate", 1)]
    assert batches == [0, 1, 0, 2]
    assert results[0] == alone(model, PROMPTS[0], max_new_tokens=6)
    assert results[2] == alone(model, PROMPTS[2], max_new_tokens=6)
    # Alone in its call, a sampled request is row 0: the direct call with its seed.
    assert results[1] == alone(model, PROMPTS[1], max_new_tokens=6, **sampled)
    assert results[3] == alone(model, PROMPTS[3], max_new_tokens=6, eos_token_id=[5])


def test_sampled_requests_with_different_arguments_share_a_call(model, limits):
    """Temperature, top-k, top-p and seed are per row in the runtime: sampled requests that
    differ in them share one call, and each gets what it would alone (two with one seed and
    one prompt get the same answer, however they are batched)."""
    counting = Counting(model)
    samplers = [
        {"temperature": 0.9, "top_k": 20, "seed": 3},
        {"temperature": 1.3, "top_k": 0, "top_p": 0.9, "seed": 4},
        {"temperature": 0.9, "top_k": 20, "seed": 3},
        {"temperature": 0.6, "top_k": 5, "seed": 8},
    ]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2]]
    requests = [
        request(limits, p, max_new_tokens=8, do_sample=True, **kw)
        for p, kw in zip(prompts, samplers)
    ]

    async def main():
        batcher = GenerationBatcher(counting, limits, BatchPolicy(8, 0.0))
        return await asyncio.gather(*(batcher.submit(r).result() for r in requests))

    results = asyncio.run(main())
    assert counting.calls == [("generate", 4)]
    for p, kw, ids in zip(prompts, samplers, results):
        assert ids == alone(model, p, max_new_tokens=8, do_sample=True, **kw)
    assert results[0] == results[2] and results[0] != results[3]


def test_requests_that_do_not_fit_the_cache_together_are_split(model, limits):
    """Alone, a 3-token prompt (bucket 8) may ask for CACHE - 7 tokens; with a 12-token one
    (bucket 16) in the call, that would overrun the cache: the batcher splits them."""
    counting = Counting(model)
    long_new = CACHE - 8 + 1
    requests = [
        request(limits, PROMPTS[0], max_new_tokens=long_new),
        request(limits, PROMPTS[2], max_new_tokens=4),
        request(limits, PROMPTS[1], max_new_tokens=4),
    ]

    async def main():
        batcher = GenerationBatcher(counting, limits, BatchPolicy(8, 0.0))
        tickets = [batcher.submit(r) for r in requests]
        return await asyncio.gather(*(t.result() for t in tickets))

    results = asyncio.run(main())
    assert counting.calls == [("stream", 2), ("generate", 1)], counting.calls
    assert results[0] == alone(model, PROMPTS[0], max_new_tokens=long_new)
    assert results[1] == alone(model, PROMPTS[2], max_new_tokens=4)
    assert results[2] == alone(model, PROMPTS[1], max_new_tokens=4)


def test_a_call_holds_at_most_max_requests(model, limits):
    counting = Counting(model)
    prompts = [[k + 1, k + 2] for k in range(6)]

    async def main():
        batcher = GenerationBatcher(counting, limits, BatchPolicy(4, 0.0))
        tickets = [batcher.submit(request(limits, p, max_new_tokens=3)) for p in prompts]
        return await asyncio.gather(*(t.result() for t in tickets))

    results = asyncio.run(main())
    assert counting.calls == [("generate", 4), ("generate", 2)]
    assert results == [alone(model, p, max_new_tokens=3) for p in prompts]


def test_the_window_gathers_late_arrivals_and_a_full_batch_starts_at_once(model, limits):
    """With a long window, a second request arriving after the first is awaited is still
    taken; the call starts as soon as the batch is full, not at the window's end."""
    counting = Counting(model)

    async def main():
        batcher = GenerationBatcher(counting, limits, BatchPolicy(2, 30.0))
        first = batcher.submit(request(limits, PROMPTS[0], max_new_tokens=3))
        await asyncio.sleep(0)  # the batcher's loop runs and starts waiting in the window
        start = time.monotonic()
        second = batcher.submit(request(limits, PROMPTS[1], max_new_tokens=3))
        results = await asyncio.gather(first.result(), second.result())
        return results, time.monotonic() - start, (first.batch_index, second.batch_index)

    results, seconds, batches = asyncio.run(main())
    assert counting.calls == [("generate", 2)] and batches == (0, 0)
    assert seconds < 15, seconds  # not the 30 s window
    assert results[1] == alone(model, PROMPTS[1], max_new_tokens=3)


def test_a_request_arriving_mid_batch_waits_for_the_next_call(model, limits):
    counting = Counting(model, gated=True)

    async def main():
        batcher = GenerationBatcher(counting, limits, BatchPolicy(8, 0.0))
        first = batcher.submit(request(limits, PROMPTS[0], max_new_tokens=6, stream=True))
        await wait_for(counting.first_step)  # the first call is running
        late = batcher.submit(request(limits, PROMPTS[1], max_new_tokens=6))
        assert batcher.waiting == 1
        counting.gate.set()
        return await asyncio.gather(first.result(), late.result()), first, late

    (ids, late_ids), first, late = asyncio.run(main())
    assert counting.calls == [("stream", 1), ("generate", 1)]
    assert (first.batch_index, late.batch_index) == (0, 1) and late.wait_s > 0
    assert ids == alone(model, PROMPTS[0], max_new_tokens=6)
    assert late_ids == alone(model, PROMPTS[1], max_new_tokens=6)


def test_a_client_leaving_mid_batch_does_not_disturb_the_others(model, limits):
    counting = Counting(model, gated=True)

    async def main():
        records = Records()
        batcher = GenerationBatcher(counting, limits, BatchPolicy(8, 0.0), on_batch=records)
        tickets = [
            batcher.submit(request(limits, p, max_new_tokens=20, stream=True)) for p in PROMPTS
        ]
        streams = [t.tokens() for t in tickets]
        # Streaming per client: each has its first token while the call is held after step 1.
        firsts = [await asyncio.wait_for(anext(s), GATE_TIMEOUT_S) for s in streams]
        tickets[1].cancel()  # client 1 hangs up after the first step
        counting.gate.set()

        async def rest(k):
            return [x async for x in streams[k]]

        rests = await asyncio.gather(*(rest(k) for k in (0, 2, 3)))
        results = [[firsts[k], *rest] for k, rest in zip((0, 2, 3), rests)]
        return results, tickets, await records.first()

    results, tickets, record = asyncio.run(main())
    for prompt, ids in zip([PROMPTS[k] for k in (0, 2, 3)], results):
        assert ids == alone(model, prompt, max_new_tokens=20)
    assert tickets[1].produced == 1 and counting.calls == [("stream", 4)]
    assert record.abandoned == 1 and record.steps == 20


def test_a_call_whose_clients_all_left_stops_at_the_next_step(model, limits):
    counting = Counting(model, gated=True)

    async def main():
        batcher = GenerationBatcher(counting, limits, BatchPolicy(8, 0.0))
        tickets = [
            batcher.submit(request(limits, p, max_new_tokens=40, stream=True)) for p in PROMPTS
        ]
        await wait_for(counting.first_step)
        waiting = batcher.submit(request(limits, PROMPTS[0], max_new_tokens=3))
        for t in tickets:
            t.cancel()
        counting.gate.set()
        return await waiting.result()

    ids = asyncio.run(main())
    assert counting.steps <= 2, counting.steps  # the first step, and at most the one in flight
    assert counting.calls == [("stream", 4), ("generate", 1)]
    assert ids == alone(model, PROMPTS[0], max_new_tokens=3)


def test_a_request_cancelled_while_waiting_is_dropped(model, limits):
    counting = Counting(model)

    async def main():
        batcher = GenerationBatcher(counting, limits, BatchPolicy(8, 0.0))
        gone = batcher.submit(request(limits, PROMPTS[2], max_new_tokens=3))
        gone.cancel()
        kept = batcher.submit(request(limits, PROMPTS[1], max_new_tokens=3))
        return await kept.result()

    assert asyncio.run(main()) == alone(model, PROMPTS[1], max_new_tokens=3)
    assert counting.calls == [("generate", 1)]


def test_a_failing_model_fails_its_batch_and_the_batcher_keeps_serving(model, limits):
    counting = Counting(model, fail=True)

    async def main():
        batcher = GenerationBatcher(counting, limits, BatchPolicy(8, 0.0))
        doomed = [batcher.submit(request(limits, p, max_new_tokens=3)) for p in PROMPTS[:2]]
        errors = await asyncio.gather(*(t.result() for t in doomed), return_exceptions=True)
        counting.fail = False
        later = batcher.submit(request(limits, PROMPTS[3], max_new_tokens=3, stream=True))
        return errors, await later.result()

    errors, ids = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) and "fell over" in str(e) for e in errors), errors
    assert ids == alone(model, PROMPTS[3], max_new_tokens=3)


@pytest.mark.parametrize(
    "fields, status, reason",
    [
        ({"input_ids": [1] * 17}, 413, "[8, 16]"),
        ({"input_ids": [1] * 9, "max_new_tokens": CACHE}, 413, f"at most {CACHE - 16 + 1}"),
        ({"input_ids": [1], "eos_token_id": list(range(9))}, 422, "at most 8"),
        ({"input_ids": [1], "top_p": 0}, 422, "top_p"),
        # an integer no float holds: math.isfinite's OverflowError was a 500
        ({"input_ids": [1], "temperature": 10**400}, 422, "temperature must be a finite"),
        ({"input_ids": [1], "do_sample": True, "temperature": -(10**400)}, 422, "finite"),
    ],
)
def test_requests_that_no_call_could_hold_are_refused_on_arrival(limits, fields, status, reason):
    with pytest.raises(RequestError) as e:
        parse_generation_request(json.dumps(fields).encode(), limits)
    assert e.value.status == status and reason in str(e.value)


def test_a_prompt_text_with_a_lone_surrogate_is_a_422(limits):
    body = json.dumps({"text": "w1 \ud800"}).encode()
    with pytest.raises(RequestError, match="lone surrogate") as e:
        parse_generation_request(body, limits, lambda texts: pytest.fail("tokenized"))
    assert e.value.status == 422


def test_a_text_tokenized_past_the_vocabulary_is_a_422_not_its_batchs_failure(limits):
    """A tokenizer.json of a larger vocabulary than the model's: its ids went to the model,
    whose range check failed the whole batch (every request in it answered 500, review)."""
    past = limits.vocab_size + 5
    body = json.dumps({"text": "w1 w2"}).encode()
    tokenize = lambda texts: [{"input_ids": [2, past]} for _ in texts]  # noqa: E731
    with pytest.raises(
        RequestError, match=rf"'text' tokenizes to ids that must lie in \[0, {limits.vocab_size}\)"
    ) as e:
        parse_generation_request(body, limits, tokenize)
    assert e.value.status == 422
    ok = parse_generation_request(body, limits, lambda texts: [{"input_ids": [2, 3]}])
    assert ok.prompt == [2, 3]


def test_requests_share_a_key_whatever_their_sampler_fields(limits):
    a = request(limits, [1], temperature=0.5, top_k=3)
    b = request(limits, [2], seed=9)
    c = request(limits, [3], do_sample=True, seed=9)
    d = request(limits, [3], do_sample=True, seed=2, temperature=0.3)
    assert a.key == b.key != c.key == d.key
    assert c.sampler.seed == 9 and d.sampler.temperature == 0.3 and a.sampler.seed == 0


def test_the_in_process_request_path_needs_no_ray():
    """The GPU machine has no Ray: the modules its benchmark and its GPU tests run import neither Ray,
    Starlette nor the compiler (a fresh interpreter, so this module's imports do not count)."""
    import subprocess

    code = (
        "import sys\n"
        "import kernl.serving.encoder, kernl.serving.generation_batcher\n"
        "import kernl.serving.generation_protocol, kernl.serving.device\n"
        "bad = ('ray', 'starlette', 'kernl.compiler', 'transformers')\n"
        "print([m for m in bad if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# -- joining a running batch (the model's open_batch) ---------------------------------------


class Joining(Counting):
    """Counting, with the runtime's open_batch: a batch held after its first decode step
    until the test releases it (`first_step`, `gate`), and again after step `hold_at` until
    `later` is set; its joins counted with the cache slot they joined at."""

    def __init__(self, model, gated: bool = False, hold_at: int | None = None):
        super().__init__(model, gated)
        self.hold_at = hold_at
        self.later = threading.Event()
        self.chunks: list[int] = []  # decode steps per readback

    def open_batch(self, prompts, **options):
        self.calls.append(("open_batch", len(prompts)))
        return _HeldBatch(self, self.model.open_batch(prompts, **options))


class _HeldBatch:
    def __init__(self, owner: Joining, batch):
        self.owner, self.batch = owner, batch
        self.first = batch.first
        self.free_rows, self.can_join = batch.free_rows, batch.can_join
        self.release, self.close = batch.release, batch.close

    @property
    def rows(self):
        return self.batch.rows

    def join(self, prompt, max_new_tokens, **sampling):
        self.owner.calls.append(("join", self.batch.slot))
        return self.batch.join(prompt, max_new_tokens, **sampling)

    def steps(self, n):
        chunk = self.batch.steps(n)
        owner = self.owner
        owner.chunks.append(len(chunk))
        for _ in chunk:  # the holds come after the whole chunk has run
            owner.steps += 1
            if owner.steps == 1 and owner.gated:
                owner.first_step.set()
                assert owner.gate.wait(GATE_TIMEOUT_S), "gate never released"
            if owner.steps == owner.hold_at:
                assert owner.later.wait(GATE_TIMEOUT_S), "the test never let the batch go on"
        return chunk


def test_a_request_arriving_mid_batch_joins_it_at_the_next_step(model, limits):
    # Held after step 10 until the late request is answered: it must not need the batch
    # to end (30 steps) for that.
    joining = Joining(model, gated=True, hold_at=10)

    async def main():
        records = Records()
        batcher = GenerationBatcher(joining, limits, BatchPolicy(4, 0.0), on_batch=records)
        first = batcher.submit(request(limits, PROMPTS[0], max_new_tokens=30, stream=True))
        await wait_for(joining.first_step)  # the batch is running (held after a step)
        late = batcher.submit(request(limits, PROMPTS[1], max_new_tokens=5))
        assert batcher.waiting == 1
        joining.gate.set()
        late_ids = await asyncio.wait_for(late.result(), GATE_TIMEOUT_S)
        joining.later.set()
        ids = await first.result()
        return ids, late_ids, first, late, await records.first()

    ids, late_ids, first, late, record = asyncio.run(main())
    assert joining.calls == [("open_batch", 1), ("join", PROMPTS_BUCKET + 1)], joining.calls
    assert ids == alone(model, PROMPTS[0], max_new_tokens=30)
    assert late_ids == alone(model, PROMPTS[1], max_new_tokens=5)
    assert first.batch_index == late.batch_index == 0 and late.wait_s > 0
    assert late.batch_requests == 2 and first.batch_requests == 2
    assert record.mode == "join" and record.requests == 2 and record.joined == 1
    assert record.steps == 30


PROMPTS_BUCKET = 8  # the prompt bucket of PROMPTS[0] (3 tokens) in BUCKETS


def test_joined_sampled_requests_draw_what_they_would_alone(model, limits):
    joining = Joining(model, gated=True)
    fields = [
        dict(do_sample=True, temperature=1.4, top_k=0, seed=5),
        dict(do_sample=True, temperature=0.9, top_p=0.8, seed=6),
        dict(do_sample=True, temperature=1.1, top_k=7, seed=7),
    ]

    async def main():
        batcher = GenerationBatcher(joining, limits, BatchPolicy(4, 0.0))
        first = batcher.submit(request(limits, PROMPTS[0], max_new_tokens=20, **fields[0]))
        await wait_for(joining.first_step)
        late = [
            batcher.submit(request(limits, p, max_new_tokens=12, **f))
            for p, f in zip((PROMPTS[1], PROMPTS[3]), fields[1:])
        ]
        joining.gate.set()
        return await asyncio.gather(first.result(), *(t.result() for t in late))

    results = asyncio.run(main())
    assert [c[0] for c in joining.calls] == ["open_batch", "join", "join"], joining.calls
    prompts = (PROMPTS[0], PROMPTS[1], PROMPTS[3])
    for prompt, n, f, ids in zip(prompts, (20, 12, 12), fields, results):
        assert ids == alone(model, prompt, max_new_tokens=n, **f), f
        assert ids != alone(model, prompt, max_new_tokens=n), f  # it did sample


def test_the_oldest_request_that_cannot_join_stops_the_joining(model, limits):
    """A sampled request (another SamplingKey) waits for the greedy batch to drain, and the
    greedy request behind it does not overtake it by joining."""
    joining = Joining(model, gated=True)

    async def main():
        records = Records()
        batcher = GenerationBatcher(joining, limits, BatchPolicy(4, 0.0), on_batch=records)
        first = batcher.submit(request(limits, PROMPTS[0], max_new_tokens=8, stream=True))
        await wait_for(joining.first_step)
        sampled = batcher.submit(request(limits, PROMPTS[1], max_new_tokens=4, do_sample=True))
        greedy = batcher.submit(request(limits, PROMPTS[3], max_new_tokens=4))
        joining.gate.set()
        await asyncio.gather(first.result(), sampled.result(), greedy.result())
        return first, sampled, greedy, records

    first, sampled, greedy, records = asyncio.run(main())
    assert [c[0] for c in joining.calls] == ["open_batch"] * 3, joining.calls
    assert (first.batch_index, sampled.batch_index, greedy.batch_index) == (0, 1, 2)
    assert records[0].joined == 0


@pytest.mark.parametrize("leave", [False, True])
def test_a_row_whose_client_left_seats_a_joiner_within_max_requests(model, limits, leave):
    """Two requests run and max_requests is 2: a late one joins once a client left (the
    bucket's free rows do not matter), else it waits for both to end and opens the next
    batch (a batch whose rows all ended stops)."""
    joining = Joining(model, gated=True)

    async def main():
        batcher = GenerationBatcher(joining, limits, BatchPolicy(2, 0.0))
        a, b = (
            batcher.submit(request(limits, p, max_new_tokens=25, stream=True)) for p in PROMPTS[:2]
        )
        await wait_for(joining.first_step)
        late = batcher.submit(request(limits, PROMPTS[3], max_new_tokens=6))
        if leave:
            b.cancel()
        joining.gate.set()
        return await a.result(), await late.result(), late

    a_ids, late_ids, late = asyncio.run(main())
    if leave:
        assert joining.calls == [("open_batch", 2), ("join", PROMPTS_BUCKET + 1)]
        assert late.batch_index == 0
    else:
        assert joining.calls == [("open_batch", 2), ("open_batch", 1)], joining.calls
        assert late.batch_index == 1
    assert a_ids == alone(model, PROMPTS[0], max_new_tokens=25)
    assert late_ids == alone(model, PROMPTS[3], max_new_tokens=6)


def test_without_join_a_request_arriving_mid_batch_waits(model, limits):
    joining = Joining(model, gated=True)

    async def main():
        batcher = GenerationBatcher(joining, limits, BatchPolicy(4, 0.0, join=False))
        first = batcher.submit(request(limits, PROMPTS[0], max_new_tokens=6, stream=True))
        await wait_for(joining.first_step)
        late = batcher.submit(request(limits, PROMPTS[1], max_new_tokens=6))
        joining.gate.set()
        await asyncio.gather(first.result(), late.result())
        return first, late

    first, late = asyncio.run(main())
    assert joining.calls == [("stream", 1), ("generate", 1)]
    assert (first.batch_index, late.batch_index) == (0, 1)


def test_a_joiner_the_runtime_refuses_fails_alone(model, limits, monkeypatch):
    joining = Joining(model, gated=True)
    refused = [42, 43, 44]
    join_ok = _HeldBatch.join

    def join(self, prompt, max_new_tokens, **sampling):
        if prompt == refused:
            raise ValueError("refused by the runtime")
        return join_ok(self, prompt, max_new_tokens, **sampling)

    monkeypatch.setattr(_HeldBatch, "join", join)

    async def main():
        batcher = GenerationBatcher(joining, limits, BatchPolicy(4, 0.0))
        first = batcher.submit(request(limits, PROMPTS[0], max_new_tokens=12))
        await wait_for(joining.first_step)
        bad = batcher.submit(request(limits, refused, max_new_tokens=4))
        good = batcher.submit(request(limits, PROMPTS[1], max_new_tokens=4))
        joining.gate.set()
        with pytest.raises(ValueError, match="refused by the runtime"):
            await asyncio.wait_for(bad.result(), GATE_TIMEOUT_S)
        return await first.result(), await good.result(), good

    first_ids, good_ids, good = asyncio.run(main())
    assert first_ids == alone(model, PROMPTS[0], max_new_tokens=12)
    assert good_ids == alone(model, PROMPTS[1], max_new_tokens=4) and good.batch_index == 0


def test_a_row_that_ended_is_answered_when_a_joiners_prefill_fails(model, limits, monkeypatch):
    """The step's tokens and ends are sent at the next step's top, after the joins: a join
    failing there (the device, not a refusal) fails the batch's live rows, and the row that
    had just ended still gets its answer rather than waiting for good."""

    def join(self, prompt, max_new_tokens, **sampling):
        raise RuntimeError("the device fell over in the joiner's prefill")

    monkeypatch.setattr(_HeldBatch, "join", join)
    joining = Joining(model, gated=True)

    async def main():
        batcher = GenerationBatcher(joining, limits, BatchPolicy(4, 0.0))
        short = batcher.submit(request(limits, PROMPTS[0], max_new_tokens=2))
        long = batcher.submit(request(limits, PROMPTS[1], max_new_tokens=12))
        await wait_for(joining.first_step)  # both seated; `short` ends at this step
        joiner = batcher.submit(request(limits, PROMPTS[3], max_new_tokens=4))
        joining.gate.set()
        for ticket in (long, joiner):
            with pytest.raises(RuntimeError, match="fell over"):
                await asyncio.wait_for(ticket.result(), GATE_TIMEOUT_S)
        return await asyncio.wait_for(short.result(), GATE_TIMEOUT_S), short

    ids, short = asyncio.run(main())
    assert ids == alone(model, PROMPTS[0], max_new_tokens=2)
    assert short.finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_a_quiet_batch_reads_its_ids_back_every_few_steps(model, limits, stream):
    """No request streams and none waits: the ids come back every QUIET_STEPS steps (never
    past a row's budget); a streamed request gets them every step."""
    joining = Joining(model)

    async def main():
        batcher = GenerationBatcher(joining, limits, BatchPolicy(4, 0.0))
        ticket = batcher.submit(request(limits, PROMPTS[2], max_new_tokens=20, stream=stream))
        return await ticket.result()

    ids = asyncio.run(main())
    assert ids == alone(model, PROMPTS[2], max_new_tokens=20)
    assert joining.chunks == ([1] * 19 if stream else [QUIET_STEPS, QUIET_STEPS, 3])


def test_a_sampled_request_without_a_seed_gets_a_random_one(limits):
    """Every sampled request without a seed drew with seed 0: one prompt, one answer, however
    often a client asked for another."""
    seeds = {request(limits, [1], do_sample=True).sampler.seed for _ in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert request(limits, [1], do_sample=True, seed=5).sampler.seed == 5
    assert request(limits, [1]).sampler.seed == 0  # greedy: no draw


def test_a_null_eos_is_no_eos_as_generate_takes_it(limits):
    """`"eos_token_id": null` was the model's EOS ids (the answer stopped at them), where the
    answer promises `model.generate(..., eos_token_id=None)`: no EOS id."""
    import dataclasses

    with_eos = dataclasses.replace(limits, eos_token_ids=[7, 3])
    assert request(with_eos, [5], max_new_tokens=4).key.eos == (3, 7)  # absent: the model's
    assert request(with_eos, [5], max_new_tokens=4, eos_token_id=None).key.eos == ()
    assert request(with_eos, [5], max_new_tokens=4, eos_token_id=[]).key.eos == ()
    assert request(with_eos, [5], max_new_tokens=4, eos_token_id=9).key.eos == (9,)
