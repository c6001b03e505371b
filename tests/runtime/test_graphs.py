"""kernl.runtime.graphs without a GPU: torch.cuda's stream and graph calls replaced by fakes
that record what capture_graph asks for. What matters for memory is that every capture of a
device warms up and captures on one stream (cuBLAS keeps a 32 MiB workspace per stream)."""

import contextlib
import gc
import threading

import pytest
import torch

from kernl.runtime import graphs


class _FakeStream:
    made: list["_FakeStream"] = []

    def __init__(self, device=None):
        self.device = device
        _FakeStream.made.append(self)

    def wait_stream(self, other) -> None:
        pass


class _FakeGraph:
    def __init__(self, keep_graph: bool = False):
        self.keep_graph = keep_graph
        self.calls: list[str] = []

    def instantiate(self) -> None:
        self.calls.append("instantiate")


@pytest.fixture
def fake_cuda(monkeypatch):
    events: list[tuple] = []
    current = ["default"]

    @contextlib.contextmanager
    def stream_ctx(stream):
        previous, current[0] = current[0], stream
        try:
            yield
        finally:
            current[0] = previous

    @contextlib.contextmanager
    def graph_ctx(graph, pool=None, stream=None, capture_error_mode="global"):
        events.append(("capture", graph, pool, stream))
        events.append(("mode", capture_error_mode, gc.isenabled()))
        previous, current[0] = current[0], stream
        try:
            yield
        finally:
            current[0] = previous

    _FakeStream.made = []
    monkeypatch.setattr(graphs, "_streams", {})
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda *a, **k: _FakeStream.__new__(_FakeStream)
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
    monkeypatch.setattr(torch.cuda, "graph", graph_ctx)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(graphs, "_clear_cublas_workspaces", lambda: events.append(("clear",)))
    return events, current


def test_every_capture_of_a_device_warms_up_and_captures_on_one_stream(fake_cuda):
    events, current = fake_cuda
    calls = []

    def fn():
        calls.append(("run", current[0]))
        return len(calls)

    def reset():
        calls.append(("reset", current[0]))

    pool = object()
    graph_a, out_a = graphs.capture_graph(fn, pool, warmups=2, reset=reset)
    graph_b, out_b = graphs.capture_graph(fn, pool, device=torch.device("cuda", 0))

    assert len(_FakeStream.made) == 1, "one stream for every capture of the device"
    stream = _FakeStream.made[0]
    captures = [e for e in events if e[0] == "capture"]
    assert [e[1:] for e in captures] == [(graph_a, pool, stream), (graph_b, pool, stream)]
    assert isinstance(graph_a, _FakeGraph) and graph_a is not graph_b
    # capture A: reset+run twice on the stream (warm-up), reset, run under capture
    assert calls[:6] == [
        ("reset", stream),
        ("run", stream),
        ("reset", stream),
        ("run", stream),
        ("reset", "default"),
        ("run", stream),
    ]
    assert out_a == 6  # the outputs are what fn returned during the capture
    assert calls[6:] == [("run", stream), ("run", stream)] and out_b == 8


def test_each_device_has_its_own_stream(fake_cuda):
    assert graphs.capture_stream(torch.device("cuda", 1)) is graphs.capture_stream(
        torch.device("cuda", 1)
    )
    assert graphs.capture_stream(torch.device("cuda", 0)) is not graphs.capture_stream(
        torch.device("cuda", 1)
    )
    assert graphs.capture_stream(None) is graphs.capture_stream(torch.device("cuda"))
    assert [s.device for s in _FakeStream.made] == [1, 0]


def test_bucket_graphs_and_generation_steps_capture_on_the_one_stream(fake_cuda):
    from kernl.runtime.generation.model import _Step
    from kernl.runtime.model import _BucketRunner

    events, _ = fake_cuda

    class _Executor:
        device = torch.device("cuda", 0)

        def run(self, inputs):
            return [inputs["input_ids"]]

    runners = []
    for _ in range(2):
        runner = _BucketRunner.__new__(_BucketRunner)
        runner.executor, runner.static_inputs = _Executor(), {"input_ids": torch.zeros(1, 4)}
        runner.capture("pool")
        runners.append(runner)
    steps = [_Step(lambda: torch.ones(2), lambda: None) for _ in range(2)]
    for step in steps:
        step.capture("pool", torch.device("cuda", 0))

    assert len(_FakeStream.made) == 1
    assert [e[3] for e in events if e[0] == "capture"] == [_FakeStream.made[0]] * 4
    assert all(r.graph is not None and r.static_outputs is not None for r in runners)
    assert all(s.graph is not None and s.logits is not None for s in steps)


def test_cublas_workspaces_are_cleared_around_every_capture(fake_cuda):
    """torch.compile's CUDA-graph trees clear cuBLAS's workspaces of the whole process; a
    kernl graph that captured the cached one then replays into freed memory. Clearing right
    before capture makes the graph's workspace come from its own pool; right after, keeps it
    out of cuBLAS's cache."""
    events, _ = fake_cuda
    for _ in range(2):
        graphs.capture_graph(lambda: None, "pool", warmups=1)
    assert [e[0] for e in events] == ["clear", "capture", "mode", "clear"] * 2


def test_cublas_workspaces_are_cleared_even_when_capture_fails(fake_cuda):
    events, _ = fake_cuda
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 2:  # warm-up passes, the capture run raises
            raise RuntimeError("capture failed")

    with pytest.raises(RuntimeError, match="capture failed"):
        graphs.capture_graph(fn, "pool", warmups=1)
    assert [e[0] for e in events] == ["clear", "capture", "mode", "clear"]


def test_no_garbage_collection_nor_other_thread_can_invalidate_a_capture(fake_cuda):
    """A collection inside a capture that frees a dropped model's graphs invalidates it (the
    GPU test below shows it): the collector pauses for the capture and comes back after,
    even when the capture fails; other threads' CUDA calls are not checked (thread-local)."""
    events, _ = fake_cuda
    seen = []
    graphs.capture_graph(lambda: seen.append(gc.isenabled()), "pool", warmups=1)
    assert seen == [True, False] and gc.isenabled()
    assert [e[1:] for e in events if e[0] == "mode"] == [("thread_local", False)]
    gc.disable()
    try:  # a caller that turned the collector off keeps it off
        graphs.capture_graph(lambda: None, "pool")
        assert not gc.isenabled()
    finally:
        gc.enable()
    runs = []

    def fails_under_capture():
        runs.append(1)
        if len(runs) == 2:
            raise RuntimeError("capture failed")

    with pytest.raises(RuntimeError, match="capture failed"):
        graphs.capture_graph(fails_under_capture, "pool")
    assert gc.isenabled()


@pytest.mark.gpu
def test_a_graph_collected_during_a_capture_does_not_invalidate_it():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.zeros(16, device="cuda")

    class Model:  # a dropped model: a reference cycle holding a captured graph
        pass

    dropped = Model()
    dropped.self = dropped
    dropped.graph, _ = graphs.capture_graph(lambda: x.add_(1), torch.cuda.graph_pool_handle())
    del dropped
    threshold = gc.get_threshold()
    gc.set_threshold(1)  # the next allocation of a container triggers a collection
    try:
        graph, out = graphs.capture_graph(
            lambda: [[i] for i in range(100)] and x * 2, torch.cuda.graph_pool_handle()
        )
    finally:
        gc.set_threshold(*threshold)
        gc.collect()
    x.fill_(3)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, torch.full_like(x, 6))


def test_a_bucket_graph_holds_its_range_checks_ahead_of_the_model(fake_cuda):
    """Given the call's event, a bucket's capture runs its range checks, then records the
    event (the host waits on it, not on the model), then the model: in every warm-up and in
    the capture. Without it (no external events) the graph holds the model alone."""
    from kernl.runtime.model import _BucketRunner

    _, current = fake_cuda
    order: list[tuple] = []

    class _Check:
        def run(self):
            order.append(("check", current[0]))

    class _Event:
        def record(self):
            order.append(("record", current[0]))

    class _Executor:
        device = torch.device("cuda", 0)

        def run(self, inputs):
            order.append(("model", current[0]))
            return []

    for checked in (_Event(), None):
        order.clear()
        runner = _BucketRunner.__new__(_BucketRunner)
        runner.executor, runner.static_inputs, runner.checks = _Executor(), {}, [_Check()]
        runner.capture("pool", checked)
        stream = _FakeStream.made[0]
        one = [("check", stream), ("record", stream), ("model", stream)]
        assert order == (one * 2 if checked else [("model", stream)] * 2)  # warm-up, capture
        assert runner.checks_in_graph == (checked is not None)


def test_an_edit_sees_the_captured_graph_before_it_is_instantiated(fake_cuda):
    """`edit` (graph_edges.py) needs the graph kept after capture (`keep_graph=True`) and
    must run before the instantiation, which then makes its changes part of the replays."""
    events, _ = fake_cuda
    seen = []

    def edit(graph):
        seen.append((graph.keep_graph, list(graph.calls), len(events)))
        graph.calls.append("edit")

    graph, _ = graphs.capture_graph(lambda: None, "pool", edit=edit)
    assert seen == [(True, [], len(events))], "edited once, after the capture, not instantiated"
    assert graph.calls == ["edit", "instantiate"]
    plain, _ = graphs.capture_graph(lambda: None, "pool")
    assert not plain.keep_graph and plain.calls == []


@pytest.mark.parametrize("every", [False, True])
def test_a_model_warms_up_before_its_first_capture_only(fake_cuda, monkeypatch, every):
    """The first run of a model makes what a capture must not (cuBLAS's handles); later
    buckets are captured straight away, unless `_warmup_every_capture` asks for a warm-up
    each. A first capture that fails leaves the next one its warm-up."""
    from kernl.runtime.model import CompiledModel, _BucketRunner

    runs: list[str] = []

    class _Executor:
        device = torch.device("cuda", 0)
        fail = False

        def run(self, inputs):
            runs.append("capture" if _in_capture[0] else "warm-up")
            if self.fail and _in_capture[0]:
                raise RuntimeError("capture refused")
            return []

    _in_capture = [False]
    real_graph = torch.cuda.graph

    @contextlib.contextmanager
    def graph_ctx(*args, **kwargs):
        with real_graph(*args, **kwargs):
            _in_capture[0] = True
            try:
                yield
            finally:
                _in_capture[0] = False

    monkeypatch.setattr(torch.cuda, "graph", graph_ctx)
    model = CompiledModel.__new__(CompiledModel)
    model._pool, model._graph_event, model._graph_edit = "pool", None, None
    model._warmed_up, model._warmup_every_capture = set(), every
    runners = []
    for fail in (True, False, False, False):
        runner = _BucketRunner.__new__(_BucketRunner)
        runner.executor, runner.static_inputs, runner.checks = _Executor(), {}, []
        runner.executor.fail = fail
        runners.append(runner)
    with pytest.raises(RuntimeError, match="capture refused"):
        model._capture(runners[0])
    assert runs == ["warm-up", "capture"]
    runs.clear()
    for runner in runners[1:]:
        model._capture(runner)
        assert runner.graph is not None
    expected = ["warm-up", "capture"] * 3 if every else ["warm-up", "capture", "capture", "capture"]
    assert runs == expected
    runs.clear()  # a capture from another thread (lazy captures of a server) warms up again
    other = threading.Thread(target=model._capture, args=(runners[1],))
    other.start()
    other.join()
    model._capture(runners[2])
    expected = ["warm-up", "capture"] * 2 if every else ["warm-up", "capture", "capture"]
    assert runs == expected
