"""The call path on CUDA: inputs from the CPU go in through pinned memory, inputs on the GPU
with one stack; the bucket's graph range-checks both; neither makes the host wait for the GPU
before the replay, a bad id never reaches an embedding lookup (which would end the CUDA
context) and is refused, and the model serves the next call right."""

import pytest
import torch

import kernl.compiler
import kernl.runtime


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256
    )
    model = BertModel(cfg).eval()
    artifact = tmp_path_factory.mktemp("gpu_input_paths") / "b.kernl"
    # Untuned, kernl.linear runs Triton's fp32 dot, which is TF32 on the GPU (4e-4 off eager
    # at these sizes, measured on the H200): validation at TF32's tolerance, not fp32's.
    kernl.compiler.compile(
        model,
        "batch=1,4 seq=16,64",
        artifact,
        dtype="fp32",
        device="cuda",
        tune=False,
        atol=2e-3,
        rtol=2e-3,
    )
    return model.cuda(), artifact


@pytest.fixture(scope="module")
def served(artifact):
    model, path = artifact
    return model, kernl.runtime.load(path, device="cuda")


def _inputs(b, s, seed=0, types=False):
    """A tokenizer's output; with `types`, token_type_ids too: every input of the model, so a
    call of a bucket's exact shape from the GPU goes in by one stack."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (b, s), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, s // 2 :] = 0
    x = dict(input_ids=ids, attention_mask=mask)
    if types:
        x["token_type_ids"] = (torch.arange(s) >= s // 3).long().expand(b, s).contiguous()
    return x


def _want(model, inputs):
    with torch.no_grad():
        return model(**{k: v.cuda() for k, v in inputs.items()}).last_hidden_state


@pytest.mark.gpu
@pytest.mark.parametrize("types", [False, True])
@pytest.mark.parametrize("shape", [(1, 16), (3, 50), (4, 64)])
def test_cpu_and_gpu_inputs_give_the_same_outputs_as_eager(served, shape, types):
    model, compiled = served
    x = _inputs(*shape, types=types)
    from_cpu = compiled(**x).last_hidden_state
    from_gpu = compiled(**{k: v.cuda() for k, v in x.items()}).last_hidden_state
    assert torch.equal(from_cpu, from_gpu)
    assert (from_cpu - _want(model, x)).abs().max().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["cpu", "cuda"])
@pytest.mark.parametrize("shape", [(3, 50), (4, 64)])
def test_no_sync_before_the_replay(served, where, shape):
    """torch's sync debug mode raises on every synchronising call it knows (.item(), tolist,
    blocking copies): a call must make none. (Waiting on the range check's event after the
    replay is not one of them.)"""
    _, compiled = served
    x = {k: v.to(where) for k, v in _inputs(*shape, types=True).items()}
    compiled(**x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        compiled(**x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["cpu", "cuda"])
@pytest.mark.parametrize(
    "bad, name",
    [
        (dict(input_ids=torch.tensor([[5, 10**6]])), "input_ids"),
        (dict(input_ids=torch.tensor([[-7, 5]])), "input_ids"),
        (dict(input_ids=torch.tensor([[5, 6]]), token_type_ids=torch.tensor([[0, 9]])), "token"),
        (dict(input_ids=torch.tensor([[5, 6]]), attention_mask=torch.tensor([[1, 3]])), "atten"),
    ],
)
def test_an_out_of_range_id_is_refused_and_the_model_stays_usable(served, where, bad, name):
    model, compiled = served
    with pytest.raises(ValueError, match=f"{name}.* must lie in"):
        compiled(**{k: v.to(where) for k, v in bad.items()})
    torch.cuda.synchronize()  # no device-side assert is pending
    x = _inputs(1, 2, seed=3)
    got = compiled(**{k: v.to(where) for k, v in x.items()}).last_hidden_state
    assert (got - _want(model, x)).abs().max().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("name, bad", [("input_ids", 10**6), ("token_type_ids", 7)])
def test_an_out_of_range_id_in_a_full_call_of_a_buckets_shape_is_refused(served, name, bad):
    """The one-stack path from the GPU (every input, the bucket's exact shape) is checked too."""
    model, compiled = served
    x = {k: v.cuda() for k, v in _inputs(4, 64, seed=5, types=True).items()}
    x[name][2, 7] = bad
    with pytest.raises(ValueError, match=f"{name} must lie in .*{bad}"):
        compiled(**x)
    torch.cuda.synchronize()
    x = _inputs(4, 64, seed=6, types=True)
    got = compiled(**{k: v.cuda() for k, v in x.items()}).last_hidden_state
    assert (got - _want(model, x)).abs().max().item() < 1e-3


@pytest.mark.gpu
def test_gpu_calls_without_token_types_keep_a_fresh_default(served):
    """input_ids and attention_mask alone at a bucket's shape (the shared benchmark's call):
    one stack of two rows, the token types' default kept from the call before, rewritten
    after a call that gave its own."""
    model, compiled = served
    partial = {k: v.cuda() for k, v in _inputs(4, 64, seed=8).items()}
    full = {k: v.cuda() for k, v in _inputs(4, 64, seed=9, types=True).items()}
    for x in (partial, partial, full, partial, partial):
        got = compiled(**x).last_hidden_state
        want = _want(model, {k: v.cpu() for k, v in x.items()})
        assert (got - want).abs().max().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_the_range_checks_are_in_the_graphs_and_nothing_checks_before_the_replay(served, where):
    """The checks are each graph's first nodes: a call of a bucket's exact shape launches its
    inputs' copy (one stack from the GPU; from the CPU a stack on the host and one copy) and
    no reduction, clamp or copy of results before the replay."""
    from torch.profiler import ProfilerActivity, profile, record_function

    _, compiled = served
    runner = compiled._runners[compiled.select_bucket(4, 64)]
    assert runner.checks and runner.checks_in_graph
    x = {k: v.to(where) for k, v in _inputs(4, 64, seed=11, types=True).items()}
    compiled(**x)
    run = runner.run

    def marked():
        with record_function("replay"):
            return run()

    runner.run = marked
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            compiled(**x)
    finally:
        del runner.run
    events = prof.events()
    start = next(e.time_range.start for e in events if e.name == "replay")
    before = [e.name for e in events if e.name.startswith("aten::") and e.time_range.end <= start]
    assert before.count("aten::stack") == 1, before
    assert not {"aten::aminmax", "aten::clamp_"} & set(before), before
    assert before.count("aten::copy_") == (1 if where == "cpu" else 0), before


@pytest.mark.gpu
@pytest.mark.parametrize("capture", ["lazy", "never"])
@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_lazy_and_eager_models_check_too(artifact, capture, where):
    """capture="lazy" puts the checks in each graph at its first call; "never" launches them
    with each call. Either way a bad id is refused and the next calls are right."""
    model, path = artifact
    compiled = kernl.runtime.load(path, device="cuda", capture=capture)
    for seed in (1, 2):  # the first call of a bucket captures it (lazy), the second replays
        x = _inputs(4, 64, seed=seed, types=True)
        got = compiled(**{k: v.to(where) for k, v in x.items()}).last_hidden_state
        assert (got - _want(model, x)).abs().max().item() < 1e-3
        bad = {k: v.to(where) for k, v in _inputs(1, 16, seed=seed).items()}
        bad["input_ids"][0, 3] = 10**6
        with pytest.raises(ValueError, match="input_ids must lie in"):
            compiled(**bad)
        torch.cuda.synchronize()
    runner = compiled._runners[compiled.select_bucket(4, 64)]
    assert runner.checks_in_graph == (capture == "lazy")


@pytest.mark.gpu
@pytest.mark.parametrize("memsets", [False, True])
def test_side_work_off_the_path_changes_no_output(artifact, memsets):
    """With `_side_work_off_path` (graph_edges.py, the default), each bucket's graph no longer
    makes the model wait for the check's copy and event (nor, with `_memsets_off_path`, a
    memset for the kernl kernel before it); outputs equal the graphs as captured bit for bit
    and a bad id is still refused."""
    from kernl.runtime.graph_edges import EVENT_RECORD, _Driver
    from kernl.runtime.model import CompiledModel

    model, path = artifact
    before = CompiledModel._side_work_off_path, CompiledModel._memsets_off_path
    try:
        CompiledModel._side_work_off_path = False
        default = kernl.runtime.load(path, device="cuda")
        CompiledModel._side_work_off_path, CompiledModel._memsets_off_path = True, memsets
        edited = kernl.runtime.load(path, device="cuda")
    finally:
        CompiledModel._side_work_off_path, CompiledModel._memsets_off_path = before
    assert default.side_edges_removed == 0
    assert edited.side_work_error is None
    assert edited.side_edges_removed >= len(edited.buckets)
    driver = _Driver()
    for runner in edited._runners.values():
        raw = runner.graph.raw_cuda_graph()
        nodes = driver.nodes(raw)
        records = {n for n in nodes if driver.kind(n) == EVENT_RECORD}
        assert len(records) == 1
        assert not any(records & set(driver.deps(n)) for n in nodes), "the model waits for it"
    for shape, seed in (((1, 16), 1), ((3, 50), 2), ((4, 64), 3)):
        for where in ("cpu", "cuda"):
            x = {k: v.to(where) for k, v in _inputs(*shape, seed=seed, types=True).items()}
            want = default(**x).last_hidden_state
            assert torch.equal(edited(**x).last_hidden_state, want)
    bad = {k: v.cuda() for k, v in _inputs(2, 16, seed=4).items()}
    bad["input_ids"][1, 2] = 10**6
    with pytest.raises(ValueError, match="input_ids must lie in"):
        edited(**bad)
    torch.cuda.synchronize()
    x = _inputs(2, 16, seed=5)
    got = edited(**{k: v.cuda() for k, v in x.items()}).last_hidden_state
    assert (got - _want(model, x)).abs().max().item() < 1e-3


@pytest.mark.gpu
def test_a_lean_call_gives_what_a_call_under_the_launcher_context_gives(artifact, monkeypatch):
    """`_lean_call` (the default): a call whose bucket has a graph runs without the launcher
    context and stacks into views made once; outputs equal a call under `running_with` bit
    for bit, from the CPU and the GPU, at exact and padded shapes, and a bad id is still
    refused."""
    from kernl.runtime import model as model_module
    from kernl.runtime.model import CompiledModel

    model, path = artifact
    monkeypatch.setattr(CompiledModel, "_lean_call", False)
    full = kernl.runtime.load(path, device="cuda")
    monkeypatch.setattr(CompiledModel, "_lean_call", True)
    lean = kernl.runtime.load(path, device="cuda")
    contexts = []
    real = model_module.running_with
    monkeypatch.setattr(model_module, "running_with", lambda *a: contexts.append(a) or real(*a))
    for shape, seed in (((1, 16), 1), ((3, 50), 2), ((4, 64), 3), ((4, 64), 4)):
        for where in ("cpu", "cuda"):
            x = {k: v.to(where) for k, v in _inputs(*shape, seed=seed, types=True).items()}
            n = len(contexts)
            want = full(**x).last_hidden_state
            assert len(contexts) == n + 1, "a full call runs under the launcher context"
            n = len(contexts)
            assert torch.equal(lean(**x).last_hidden_state, want)
            assert len(contexts) == n, "a replayed lean call entered the launcher context"
    assert (full._lean, lean._lean) == (False, True)  # each model keeps its load's switch
    runner = lean._runners[lean.select_bucket(4, 64)]
    assert runner._row_views, "the exact-shape GPU call stacked into a cached view"
    assert not full._runners[full.select_bucket(4, 64)]._row_views
    bad = {k: v.cuda() for k, v in _inputs(4, 64, seed=6, types=True).items()}
    bad["input_ids"][1, 2] = 10**6
    with pytest.raises(ValueError, match="input_ids must lie in"):
        lean(**bad)
    torch.cuda.synchronize()
