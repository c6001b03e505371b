"""Side work off an encoder graph's critical path (kernl/runtime/graph_edges.py), planned on
plain descriptions of captured graphs: which edges move, and that nothing the model reads
is reordered. The driver calls that read and edit a real graph run in the GPU tests."""

from __future__ import annotations

import pytest

from kernl.runtime.graph_edges import EVENT_RECORD, KERNEL, MEMCPY, MEMSET, side_work_edges

OURS, CUBLAS, CHECKED = 0xA, 0xB, 0xE


def _chain(*nodes):
    """A captured chain: (kinds, deps, functions, events), node i waiting for node i - 1.
    Each node: "k" a kernl kernel, "c" a cuBLAS kernel, "m" a memset, "d" a copy, "e" the
    check's event, "x" another event."""
    kinds, deps, functions, events = {}, {}, {}, {}
    code = {"k": KERNEL, "c": KERNEL, "m": MEMSET, "d": MEMCPY, "e": EVENT_RECORD}
    for i, n in enumerate(nodes):
        kinds[i] = code.get(n, EVENT_RECORD)
        deps[i] = [i - 1] if i else []
        if n in "kc":
            functions[i] = OURS if n == "k" else CUBLAS
        if n in "ex":
            events[i] = CHECKED if n == "e" else 0xF
    return kinds, deps, functions, events


def _plan(graph):
    kinds, deps, functions, events = graph
    return side_work_edges(kinds, deps, functions, {OURS}, events, {CHECKED})


def _apply(graph, plan):
    deps = {n: set(d) for n, d in graph[1].items()}
    remove, add = plan
    for a, b in add:
        deps[b].add(a)
    for a, b in remove:
        deps[b].discard(a)
    return deps


def _reaches(deps, a, b) -> bool:
    seen, todo = set(), [b]
    while todo:
        n = todo.pop()
        if n == a:
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(deps[n])
    return False


def test_a_memset_after_a_kernl_norm_starts_with_it():
    # cuBLAS O projection, kernl's norm, cuBLAS's memset, the FFN1 GEMM, FFN2
    graph = _chain("c", "k", "m", "c", "c")
    remove, add = _plan(graph)
    assert remove == [(1, 2)]
    assert sorted(add) == [(0, 2), (1, 3)]
    deps = _apply(graph, (remove, add))
    assert deps[2] == {0} and deps[3] == {1, 2}


def test_memsets_stay_when_asked_and_the_check_still_moves():
    # the clamp, the check's copy and event, then the model: cuBLAS, kernl's norm, a memset
    graph = _chain("c", "d", "e", "c", "k", "m", "c")
    kinds, deps, functions, events = graph
    remove, add = side_work_edges(kinds, deps, functions, {OURS}, events, {CHECKED}, False)
    assert (remove, add) == ([(2, 3)], [(0, 3)])


@pytest.mark.parametrize("nodes", ["cmc", "cmmc", "mc", "kmk", "km", "kdc"])
def test_memsets_after_anything_but_one_kernl_kernel_stay(nodes):
    """After cuBLAS's own kernel (which may use the workspace the memset zeroes), after
    another memset, first, before a kernl kernel (a buffer of the model's, which the kernel
    before may use) or last: nothing moves. A copy not followed by the check's event: same."""
    assert _plan(_chain(*nodes)) == ([], [])


def test_the_checks_copy_and_event_leave_the_path():
    # reduction, clamp, copy of the results, the check's event, the embeddings, a GEMM
    graph = _chain("c", "c", "d", "e", "k", "c")
    remove, add = _plan(graph)
    assert remove == [(3, 4)] and add == [(1, 4)]
    deps = _apply(graph, (remove, add))
    assert deps[4] == {1} and deps[3] == {2}  # the model after the clamp; the event after the copy


def test_a_copy_followed_by_another_event_stays():
    assert _plan(_chain("c", "d", "x", "k")) == ([], [])


def test_a_whole_encoder_graph_keeps_every_order_but_the_side_works():
    """A two-layer BERT-like chain with the check first: acyclic after the edit, every pair
    of kernels still in their order, every memset still before its GEMM and after everything
    before its norm. Left unordered: each memset against its norm, and the check's copy and
    event against the model."""
    layer = [
        "c",
        "k",
        "c",
        "k",
        "m",
        "c",
        "c",
        "k",
    ]  # QKV, attention, O, norm, memset, FFN1, FFN2, norm
    nodes = ["c", "c", "d", "e", "k", *layer, *layer]
    graph = _chain(*nodes)
    deps = _apply(graph, _plan(graph))
    n = len(nodes)
    kernels = [i for i in range(n) if graph[0][i] == KERNEL]
    for a in kernels:
        for b in kernels:
            if a < b:
                assert _reaches(deps, a, b), (a, b)
    for m in (i for i in range(n) if graph[0][i] == MEMSET):
        assert _reaches(deps, m, m + 1) and _reaches(deps, m - 2, m)
        assert not _reaches(deps, m - 1, m)
    assert not _reaches(deps, 3, 4) and _reaches(deps, 1, 4) and _reaches(deps, 2, 3)
    for a in range(n):  # no cycle: nothing reaches what it comes before
        for b in deps[a]:
            assert not _reaches(deps, a, b)
