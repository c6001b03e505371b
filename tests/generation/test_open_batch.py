"""Requests joining a running batch between decode steps (`GenerativeModel.open_batch`, see
runtime/generation/joining.py), on a compiled tiny Llama-3 on the CPU: every row, opening or
joined, greedy or seeded sampling, gives the ids `generate` gives its prompt alone; rows free
up at EOS, at their own budget or on release, and joiners take them; what cannot join says
so without touching the batch."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import torch

import kernl.compiler
import kernl.runtime

from .tiny_models import VOCAB, tiny_model

CACHE = 64


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("join") / "llama.kernl"
    kernl.compiler.compile(
        tiny_model("llama3"),
        f"batch=1,4 prompt=8,16 cache={CACHE}",
        path,
        dtype="fp32",
        device="cpu",
        task="causal-lm",
    )
    return path


@pytest.fixture(scope="module")
def model(artifact):
    return kernl.runtime.load(artifact)


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n,), generator=g).tolist()


def alone(model, ids: list[int], n: int, **kw) -> list[int]:
    return model.generate([ids], max_new_tokens=n, eos_token_id=[], **kw)[0, len(ids) :].tolist()


def run(batch, joins: dict[int, tuple]) -> dict:
    """Step `batch` to its end; before step k, join the prompts of `joins[k]` ((prompt,
    budget, sampling kwargs)). Returns {("open", i) or ("join", k): tokens}."""
    got: dict = {}
    rows: dict[int, tuple] = {}
    for i, (row, token) in enumerate(batch.first):
        rows[row] = ("open", i)
        got[rows[row]] = [token]
    k = 0
    while batch.rows or k in joins:
        if k in joins:
            ids, budget, kw = joins.pop(k)
            seated = batch.join(ids, budget, **kw)
            assert seated is not None, (k, batch.slot, batch.rows)
            row, token = seated
            rows[row] = ("join", k)
            got[rows[row]] = [token]
        if batch.rows:
            for row, token in batch.step():
                got[rows[row]].append(token)
        k += 1
    return got


def test_joined_and_opening_rows_equal_their_prompts_alone(model):
    a, b, c = prompt(5, 1), prompt(7, 2), prompt(12, 3)
    with model.open_batch([a], max_new_tokens=30, eos_token_id=[], rows=4) as batch:
        assert batch.bucket == 4 and batch.free_rows() == 3
        # c's prompt bucket (16) only fits before slot 16: it joins 8 steps in.
        assert not batch.can_join(len(c), 20)
        got = run(batch, {3: (b, 20, {}), 9: (c, 12, {})})
    assert got[("open", 0)] == alone(model, a, 30)
    assert got[("join", 3)] == alone(model, b, 20)
    assert got[("join", 9)] == alone(model, c, 12)


def test_joined_rows_sample_what_they_would_alone(model):
    a, b = prompt(6, 4), prompt(4, 5)
    sa = dict(temperature=1.3, top_k=0, top_p=1.0, seed=21)
    sb = dict(temperature=0.8, top_k=10, top_p=0.9, seed=22)
    kw = {k: [v] for k, v in sa.items()} | dict(do_sample=True, eos_token_id=[], rows=4)
    with model.open_batch([a], max_new_tokens=25, **kw) as batch:
        got = run(batch, {5: (b, 18, sb)})
    assert got[("open", 0)] == alone(model, a, 25, do_sample=True, **sa)
    assert got[("join", 5)] == alone(model, b, 18, do_sample=True, **sb)
    # Not the greedy ids: the joined row did sample.
    assert got[("join", 5)] != alone(model, b, 18)


def test_every_step_a_batch_replays_exists_before_its_prefill(artifact):
    """On a GPU a step is captured on first use, and capturing resets the bucket's slot,
    positions and valid slots: a batch must never meet a step it has not captured yet."""
    fresh = kernl.runtime.load(artifact)
    a, b = prompt(6, 4), prompt(4, 5)
    kw = dict(do_sample=True, eos_token_id=[], rows=4, seed=[3])
    with fresh.open_batch([a], max_new_tokens=40, **kw) as batch:
        before = set(fresh._steps)
        run(batch, {5: (b, 18, dict(seed=9))})
    assert set(fresh._steps) == before
    assert ("decode", 4, CACHE, True) in before and ("prefill", 1, 8, True) in before


def test_a_freed_row_seats_a_joiner_and_the_batch_ends_with_its_rows(model):
    prompts = [prompt(5 + i, 10 + i) for i in range(4)]
    budgets = [3, 20, 20, 20]
    with model.open_batch(prompts, max_new_tokens=budgets, eos_token_id=[]) as batch:
        assert batch.free_rows() == 0
        late = prompt(6, 30)
        assert batch.join(late, 10) is None  # full: nothing changed
        for _ in range(10):  # row 0's old slots stay valid for it past the joiner's
            batch.step()
        assert batch.rows == [1, 2, 3]  # row 0 emitted its 3 tokens
        batch.release(3)  # a client left
        assert batch.free_rows() == 2
        row, first = batch.join(late, 8)
        assert row == 0 and batch.slot == 18
        tokens = [first]
        while row in batch.rows:
            tokens += [t for r, t in batch.step() if r == row]
        batch.release(1)
        batch.release(2)
        assert batch.rows == [] and batch.free_rows() == 4
        with pytest.raises(RuntimeError, match="no row"):
            batch.step()
    assert tokens == alone(model, late, 8)


def test_an_eos_frees_the_row(model):
    a = prompt(5, 40)
    ids = alone(model, a, 10)
    eos = ids[3]  # the 4th token it emits
    with model.open_batch([a], max_new_tokens=10, eos_token_id=[eos], rows=4) as batch:
        tokens = [t for _, t in batch.first]
        while batch.rows:
            tokens += [t for _, t in batch.step()]
    assert tokens == ids[: ids.index(eos) + 1]


def test_what_cannot_join_says_so_and_leaves_the_batch_running(model):
    a, b = prompt(5, 50), prompt(6, 51)
    # The smallest bucket has no smaller one to prefill joiners on.
    with model.open_batch([a], max_new_tokens=5, eos_token_id=[]) as batch:
        assert batch.bucket == 1 and not batch.can_join(3, 2)
        # never "not now" (None, forever): it says why and what to do
        with pytest.raises(ValueError, match=r"nobody can join this batch.*rows="):
            batch.join(b, 2)
        assert batch.rows == [0] and batch.step()  # the batch runs on
    with model.open_batch([a], max_new_tokens=40, eos_token_id=[], rows=2) as batch:
        assert batch.bucket == 4
        assert not batch.can_join(6, CACHE)  # would run past the cache
        assert not batch.can_join(17, 2)  # no prompt bucket holds it
        with pytest.raises(ValueError, match="input_ids must lie"):
            batch.join([1, VOCAB + 5], 5)
        with pytest.raises(ValueError, match="max_new_tokens"):
            batch.join(b, 0)
        # what join() refuses, can_join() does not answer True for
        for length, budget in ((6, 0), (6, -1), (0, 2), (6, 1.5), (True, 2)):
            with pytest.raises(ValueError, match="can_join takes a positive integer"):
                batch.can_join(length, budget)
        assert batch.can_join(np.int64(6), torch.tensor(2))
        got = run(batch, {2: (b, 10, {})})
    assert got[("open", 0)] == alone(model, a, 40)
    assert got[("join", 2)] == alone(model, b, 10)
    # The model serves other calls once the batch is closed.
    assert model.generate([b], max_new_tokens=3, eos_token_id=[]).shape == (1, 9)


def test_open_batch_checks_its_arguments(model):
    with pytest.raises(ValueError, match="2 max_new_tokens for 1 prompts"):
        model.open_batch([prompt(4, 60)], max_new_tokens=[3, 4])
    with pytest.raises(ValueError, match="rows=9"):
        model.open_batch([prompt(4, 60)], rows=9)
    with pytest.raises(ValueError, match=r"positive integers, got \['4'\]"):
        model.open_batch([prompt(4, 60), prompt(3, 61)], max_new_tokens=[3, "4"])
    with model.open_batch([prompt(4, 60)], max_new_tokens=6, eos_token_id=[], rows=2) as batch:
        for n in (0, -3, 1.5, True):
            with pytest.raises(ValueError, match="positive integer"):
                batch.steps(n)
        with pytest.raises(ValueError, match="one prompt"):
            batch.join([], 3)
        with pytest.raises(ValueError, match="one prompt"):
            batch.join([[1, 2], [3, 4]], 3)  # was seated as one prompt [1, 2, 3, 4]
        assert len(batch.steps(2)) == 2
    # A refused call leaves the model free.
    assert model.generate([prompt(4, 60)], max_new_tokens=2).shape == (1, 6)


def test_a_closed_batch_refuses_and_a_dropped_one_frees_the_model(model):
    a, b = prompt(5, 80), prompt(3, 81)
    batch = model.open_batch([a], max_new_tokens=8, eos_token_id=[], rows=2)
    batch.step()
    with pytest.raises(RuntimeError, match="holds an open batch"):
        model.generate([b], max_new_tokens=2)
    batch.close()
    batch.close()
    # This call reuses the batch's bucket and cache; the closed batch stepped on, unlocked,
    # and returned another prompt's tokens.
    model.generate([b, a, b, a], max_new_tokens=6, eos_token_id=[])
    for call in (batch.step, lambda: batch.steps(2), lambda: batch.join(b, 2)):
        with pytest.raises(RuntimeError, match="batch is closed"):
            call()
    assert batch.closed and not batch.can_join(3, 2)
    # Dropped without close(): the model was locked for good (this thread got an error
    # naming a stream, other threads waited forever).
    model.open_batch([a], max_new_tokens=3, eos_token_id=[])
    gc.collect()
    assert model.generate([b], max_new_tokens=2, eos_token_id=[]).shape == (1, 5)
    model.open_batch([a], max_new_tokens=3, eos_token_id=[])
    gc.collect()
    other = threading.Thread(target=model.generate, args=([b],), kwargs=dict(max_new_tokens=2))
    other.start()
    other.join(timeout=120)
    assert not other.is_alive()


@pytest.mark.gpu
def test_joining_replays_the_captured_graphs_and_equals_alone_on_the_gpu(tmp_path):
    """On a GPU (fp32, where the graphs give Hugging Face's ids exactly): joins between graph
    replays, greedy and sampled, give each row its ids alone; no step is captured anew."""
    kernl.compiler.compile(
        tiny_model("llama3").cuda(),
        f"batch=1,4 prompt=8,16 cache={CACHE}",
        tmp_path / "lm.kernl",
        dtype="fp32",
        device="cuda",
        task="causal-lm",
    )
    model = kernl.runtime.load(tmp_path / "lm.kernl")
    a, b, c = prompt(5, 1), prompt(7, 2), prompt(12, 3)
    captured = set(model._steps)
    with model.open_batch([a], max_new_tokens=30, eos_token_id=[], rows=4) as batch:
        got = run(batch, {3: (b, 20, {}), 9: (c, 12, {})})
    assert set(model._steps) == captured  # greedy graphs were all captured at load
    assert got[("open", 0)] == alone(model, a, 30)
    assert got[("join", 3)] == alone(model, b, 20)
    assert got[("join", 9)] == alone(model, c, 12)
    sb = dict(temperature=0.8, top_k=10, top_p=0.9, seed=22)
    kw = dict(do_sample=True, eos_token_id=[], rows=4, temperature=[1.3], seed=[21])
    with model.open_batch([a], max_new_tokens=25, **kw) as batch:
        got = run(batch, {5: (b, 18, sb)})
    assert got[("open", 0)] == alone(model, a, 25, do_sample=True, temperature=1.3, seed=21)
    assert got[("join", 5)] == alone(model, b, 18, do_sample=True, **sb)


def test_steps_read_back_once_and_stop_where_a_row_spends_its_budget(model):
    a, b, c = prompt(5, 70), prompt(7, 71), prompt(6, 72)
    eos = alone(model, b, 12)[6]  # b's 7th token: it ends mid-chunk
    budgets = [11, 12, 30]
    with model.open_batch([a, b, c], max_new_tokens=budgets, eos_token_id=[eos]) as batch:
        got = {row: [t] for row, t in batch.first}
        chunks = []
        while batch.rows:
            chunk = batch.steps(8)
            chunks.append(len(chunk))
            for pairs in chunk:
                for row, token in pairs:
                    got[row].append(token)
    # a's budget (11 tokens: 10 steps) cuts the second chunk at 2 steps; the rest run 8 each
    assert chunks[:2] == [8, 2] and sum(chunks) == 29, chunks
    for row, (ids, n) in enumerate(zip((a, b, c), budgets)):
        want = model.generate([ids], max_new_tokens=n, eos_token_id=[eos])[0, len(ids) :]
        want = want.tolist()
        if eos in want:
            want = want[: want.index(eos) + 1]
        assert got[row] == want, row


def test_a_new_thread_with_an_ended_openers_ident_waits_its_turn(model):
    """Thread idents are reused once a thread ends (glibc reuses its stack): a request thread
    that opened a batch and ended, then a new thread given its ident, was told "this thread
    holds an open batch" instead of waiting for it."""
    a = prompt(5, 90)
    opened, idents = [], []

    def opener():
        idents.append(threading.get_ident())
        opened.append(model.open_batch([a], max_new_tokens=3, eos_token_id=[], rows=2))

    first = threading.Thread(target=opener)
    first.start()
    first.join()
    result = {}

    def request():
        if threading.get_ident() != idents[0]:
            return  # not the reused ident: the next thread tries
        result["reused"] = True
        try:
            result["ids"] = model.generate([a], max_new_tokens=2, eos_token_id=[])
        except Exception as e:  # the old behaviour: refused as re-entry
            result["error"] = e

    for _ in range(20):
        time.sleep(0.05)  # the ended thread's stack back in glibc's cache
        waiter = threading.Thread(target=request, daemon=True)
        waiter.start()
        waiter.join(timeout=1.0)
        if result:
            break
    if not result:
        opened[0].close()
        pytest.skip("no thread got the ended thread's ident here")
    assert waiter.is_alive() and "error" not in result, result  # waiting, not refused
    opened[0].close()
    waiter.join(timeout=120)
    assert result["ids"].tolist()[0][5:] == alone(model, a, 2)


@pytest.mark.parametrize("where", ["steps", "seat"])
def test_an_interrupt_mid_steps_or_mid_seating_closes_the_batch(model, monkeypatch, where):
    """Steps that ran and were never read back (an interrupt, a request's timeout): going on
    lost their tokens and stepped past the cache. So does a joiner half copied into the
    batch's rows. The batch closes, freeing the model."""
    a, b = prompt(5, 60), prompt(6, 61)
    want = alone(model, a, 10)
    batch = model.open_batch([a], max_new_tokens=10, rows=4)
    if where == "steps":
        real, runs = model._step, []

        def interrupted(key):
            runs.append(key)
            if len(runs) == 2:
                raise KeyboardInterrupt
            return real(key)

        monkeypatch.setattr(model, "_step", interrupted)
    else:
        monkeypatch.setattr(batch.state.sampler, "copy_row", _raise(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        batch.steps(4) if where == "steps" else batch.join(b, max_new_tokens=4)
    monkeypatch.undo()
    assert batch.closed
    with pytest.raises(RuntimeError, match="this batch is closed"):
        batch.step()
    assert alone(model, a, 10) == want  # the model is free and right


def test_an_interrupt_as_the_batch_takes_the_model_leaves_it_free(model, monkeypatch):
    """A Ctrl-C landing after the lock was taken but before the batch could release it (its
    finalizer was made after the lock) left the model locked for every later call."""
    from kernl.runtime.generation import joining

    a = prompt(5, 64)
    want = alone(model, a, 4)
    real = joining._ModelHold.acquire

    def interrupted(hold):
        real(hold)
        raise KeyboardInterrupt

    monkeypatch.setattr(joining._ModelHold, "acquire", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.open_batch([a], max_new_tokens=4, rows=4)
    monkeypatch.undo()
    assert not model._lock.locked()
    assert alone(model, a, 4) == want


def test_an_interrupt_in_a_joiners_own_prefill_leaves_the_batch_going(model, monkeypatch):
    """The joiner's prefill runs on the smallest bucket's buffers: the batch's rows are
    untouched, so they go on (closing would drop every other row's request)."""
    a, b = prompt(5, 62), prompt(6, 63)
    want = alone(model, a, 4)
    with model.open_batch([a], max_new_tokens=4, rows=4) as batch:
        monkeypatch.setattr(model, "_step", _raise(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            batch.join(b, max_new_tokens=4)
        monkeypatch.undo()
        assert not batch.closed
        tokens = [t for _, t in batch.first]
        while batch.rows:
            tokens += [t for _, t in batch.step()]
    assert tokens == want


def _raise(error):
    def fail(*args, **kwargs):
        raise error

    return fail


def test_a_generating_model_refuses_pickling_saying_what_to_do(model):
    import pickle

    with pytest.raises(TypeError, match="Load the artifact in each process"):
        pickle.dumps(model)


def test_an_async_interrupt_right_after_the_lock_is_taken_leaves_the_model_free(model):
    """A request timeout (an async exception) or a Ctrl-C pending while open_batch() waited
    for the model fires right after the acquire returns, before the hold recorded it: the
    model stayed locked for good and every later call waited forever (review)."""
    import ctypes
    import threading
    import time

    a = prompt(5, 64)
    want = alone(model, a, 4)
    holder = model.open_batch([a], max_new_tokens=8, rows=4)
    outcome = {}

    def waiter():
        try:
            outcome["batch"] = model.open_batch([a], max_new_tokens=4)
        except BaseException as e:  # noqa: BLE001 (the interrupt is what is tested)
            outcome["error"] = e

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    time.sleep(0.5)  # blocked in the lock's acquire, where an async exception waits
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(t.ident), ctypes.py_object(KeyboardInterrupt)
    )
    time.sleep(0.2)
    holder.close()  # the waiter takes the lock, then its pending interrupt fires
    t.join(timeout=30)
    assert not t.is_alive()
    assert isinstance(outcome.get("error"), KeyboardInterrupt), outcome
    outcome.clear()
    assert not model._lock.locked()
    assert alone(model, a, 4) == want


def test_a_thread_that_steps_a_batch_another_opened_is_refused_not_stuck(model):
    """A pool worker stepping a batch another worker opened: its own generate() is refused
    with the open-batch message (it waited for itself forever), and so is the opener's
    inside its with block afterwards (it waited forever for the batch it holds, review)."""
    import threading

    a = prompt(5, 64)
    with model.open_batch([a], max_new_tokens=8, rows=4) as batch:
        outcome = {}

        def driver():
            batch.steps(1)
            try:
                model.generate([a], max_new_tokens=2)
            except RuntimeError as e:
                outcome["refused"] = str(e)

        t = threading.Thread(target=driver)
        t.start()
        t.join(timeout=60)
        assert not t.is_alive(), "the driving thread waited for itself"
        assert "open batch" in outcome.get("refused", ""), outcome
        with pytest.raises(RuntimeError, match="this thread holds an open batch"):
            model.generate([a], max_new_tokens=2)


def test_a_close_from_another_thread_waits_for_the_steps_in_flight(model, monkeypatch):
    """A cancel handler closing the batch mid-steps freed the model at once: a generate()
    waiting in a third thread ran on the batch's own buffers (wrong ids, or an out-of-bounds
    cache index). close() now waits for the steps, which finish and count their tokens."""
    a, b = prompt(5, 70), prompt(6, 71)
    want_a, want_b = alone(model, a, 12), alone(model, b, 6)
    batch = model.open_batch([a], max_new_tokens=12, rows=4)
    inside, go_on = threading.Event(), threading.Event()
    real = model._check_steps

    def held():  # runs inside steps(), after its replays
        inside.set()
        assert go_on.wait(60)
        real()

    monkeypatch.setattr(model, "_check_steps", held)
    got = {}
    stepper = threading.Thread(target=lambda: got.update(steps=batch.steps(4)))
    stepper.start()
    assert inside.wait(60)
    closer = threading.Thread(target=batch.close)
    closer.start()
    other = threading.Thread(target=lambda: got.update(b=alone(model, b, 6)))
    other.start()
    time.sleep(0.3)
    assert closer.is_alive() and not batch.closed  # close() waits for the steps
    go_on.set()
    for t in (stepper, closer, other):
        t.join(timeout=120)
    monkeypatch.undo()
    assert [pairs[0][1] for pairs in got["steps"]] == want_a[1:5]
    assert batch.closed and got["b"] == want_b
    assert alone(model, a, 12) == want_a


def test_an_interrupt_while_steps_count_their_tokens_closes_the_batch(model, monkeypatch):
    """The tokens were counted outside the steps' guard: an interrupt there left the batch
    open with its budgets short of the steps run, and later steps ran past the cache."""
    a = prompt(5, 72)
    want = alone(model, a, 10)
    batch = model.open_batch([a], max_new_tokens=10, rows=4)
    monkeypatch.setattr(batch, "_emitted", _raise(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        batch.steps(3)
    monkeypatch.undo()
    assert batch.closed
    assert alone(model, a, 10) == want


def test_release_and_join_name_a_bad_argument(model):
    a = prompt(5, 73)
    with model.open_batch([a, a], max_new_tokens=6, rows=4) as batch:
        batch.release(torch.tensor(1))  # a tensor row, as steps hand them out: freed
        assert batch.rows == [0] and batch.free_rows() == 3
        for bad in (99, -1, "x", 1.0):
            with pytest.raises(ValueError, match="release takes a row of this batch"):
                batch.release(bad)
        for bad in ("hello", None, [1, [2]]):
            with pytest.raises(ValueError, match="join takes one prompt of token ids"):
                batch.join(bad, max_new_tokens=2)
        assert batch.rows == [0]  # untouched
    with pytest.raises(TypeError, match=r"row\(s\) \[1\] are not lists"):
        model.generate([[1, 2], 3], max_new_tokens=2)
    with pytest.raises(TypeError, match="row 0 must hold integers"):
        model.generate([["a", "b"]], max_new_tokens=2)
