"""The whole-artifact check that verify and load share: the memory plan against the device's
free memory, the op vocabulary without the runtime, and the plan's figures."""

from __future__ import annotations

import sys

import pytest
from artifact_edit import copy_artifact, edit_extra, first_program, insert_instructions

import kernl.runtime
from kernl.artifacts import ArtifactError, ArtifactUnsafeError, verify_artifact
from kernl.artifacts.reader import check_artifact


def test_the_memory_plan_of_a_valid_artifact(small_artifact):
    plan = check_artifact(small_artifact).memory
    # 2 layers of a 64-wide BERT in fp32: weights are most of it
    assert 300_000 < plan.weights < 600_000
    # inputs (3 x int64 x tokens) and kept outputs of buckets 1x8 and 2x8
    assert plan.static_buffers == (3 * 8 * 8 + (8 * 64 + 64) * 4) * (1 + 2)
    assert 0 < plan.pool < 1 << 20


def test_load_refuses_a_plan_over_the_free_device_memory(small_causal_lm, tmp_path, monkeypatch):
    """A KV cache that fits the limits but not the device: batch 4096 x 128 slots of a 2-layer
    GPT-2 is 512 MiB of cache. verify refuses it given the same free memory."""
    root = copy_artifact(small_causal_lm, tmp_path / "a")
    edit_extra(root, lambda e: e["generation_buckets"].update(batches=[4096], kv_lengths=[128]))
    plan = check_artifact(root).memory
    assert 512 << 20 <= plan.static_buffers < 600 << 20
    free = 256 << 20
    with pytest.raises(ArtifactUnsafeError, match="the device has 256.0 MiB free"):
        verify_artifact(root, free_bytes=free)
    monkeypatch.setattr(kernl.runtime, "_free_memory", lambda device: free)
    with pytest.raises(ArtifactUnsafeError, match=r"static buffers 5\d\d\.\d MiB.*device has 256"):
        kernl.runtime.load(root, device="cpu")


def test_load_releases_the_allocators_cached_blocks_before_refusing(small_causal_lm, monkeypatch):
    """Where the plan is over the driver's free memory, load() gives the caching allocator's
    unused blocks back and reads the free memory again before refusing (a notebook's
    optimize() loads right after a compile that leaves gigabytes cached); where the plan
    fits, nothing is released (emptying the cache costs the process its reuse)."""
    total = check_artifact(small_causal_lm).memory.total
    free, released = [total - 1], []

    def release(device):
        released.append(device)
        free[0] = total  # what the allocator held comes back
        return True

    monkeypatch.setattr(kernl.runtime, "_free_memory", lambda device: free[0])
    monkeypatch.setattr(kernl.runtime, "_release_cached_blocks", release)
    kernl.runtime.load(small_causal_lm, device="cpu")
    assert len(released) == 1
    kernl.runtime.load(small_causal_lm, device="cpu")  # fits now: nothing released
    assert len(released) == 1
    free[0] = total - 1
    monkeypatch.setattr(kernl.runtime, "_release_cached_blocks", lambda device: False)
    with pytest.raises(ArtifactUnsafeError, match="the device has"):
        kernl.runtime.load(small_causal_lm, device="cpu")


def test_the_plan_counts_tensors_alive_together(small_artifact, tmp_path):
    """Two 2 GiB tensors read at the end are alive together (4 GiB of pool); the same two, each
    dead after its use, are not. Nothing is allocated to find out."""
    root = copy_artifact(small_artifact, tmp_path / "a")
    n = 1 << 29  # fp32 elements: 2 GiB
    insert_instructions(
        root,
        first_program(root),
        [
            ["aten.full.default", [[n], 1.0], {}],
            ["aten.full.default", [[n], 1.0], {}],
            ["aten.add.Tensor", ["$0", "$1"], {}],
        ],
    )
    plan = check_artifact(root).memory
    assert 6 << 30 <= plan.pool < (6 << 30) + (1 << 20)  # two inputs and the sum


def test_the_op_check_does_not_need_the_runtime(small_artifact, tmp_path, monkeypatch):
    """The reader once imported the runtime's vocabulary and skipped the op check when that
    import failed; the format owns the list now."""
    root = copy_artifact(small_artifact, tmp_path / "a")
    insert_instructions(root, first_program(root), [["aten.system.default", ["id"], {}]])
    monkeypatch.setitem(sys.modules, "kernl.runtime.vocabulary", None)
    with pytest.raises(ArtifactUnsafeError, match="outside the vocabulary"):
        verify_artifact(root)


def test_a_caller_vocabulary_narrows_never_widens(small_artifact):
    with pytest.raises(ArtifactUnsafeError, match="outside the vocabulary"):
        verify_artifact(small_artifact, is_known_op=lambda op: not op.startswith("kernl."))
    verify_artifact(small_artifact, is_known_op=lambda op: True)


def test_runtime_and_format_vocabularies_agree():
    from kernl.artifacts.vocabulary import KERNL_OPS, is_allowed_op
    from kernl.runtime.kernl_ops import OPS
    from kernl.runtime.vocabulary import is_known_op

    assert {name.removeprefix("kernl.") for name in OPS} == set(KERNL_OPS)
    for name in ("aten.add.Tensor", "aten.add.Tensor\n", "aten.add.nope", "kernl.eval"):
        assert is_allowed_op(name) == is_known_op(name), name


@pytest.mark.parametrize("broken", ["program", "weights", "both"])
def test_a_broken_program_or_weights_file_is_refused_with_an_artifact_error(
    small_artifact, tmp_path, broken
):
    """Whatever is broken (a program, the weights, both), load() refuses the artifact with an
    ArtifactError; a broken program alone is refused for what it calls."""
    root = copy_artifact(small_artifact, tmp_path / "a")
    if broken in ("program", "both"):
        insert_instructions(root, first_program(root), [["aten.system.default", ["id"], {}]])
    if broken in ("weights", "both"):
        weights = root / "weights.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ArtifactError) as info:
        kernl.runtime.load(root, device="cpu", verify=False)
    if broken == "program":
        assert "aten.system.default" in str(info.value)


W = "weights.safetensors"


def test_a_file_gone_while_loading_is_an_artifact_error(small_artifact, monkeypatch):
    """A folder replaced during load() (a compile to the same path): a raw FileNotFoundError
    escaped, where every refusal is an ArtifactError."""
    import kernl.runtime
    from kernl.artifacts import ArtifactMissingError

    def gone(files, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(files.path(W)))

    monkeypatch.setattr(kernl.runtime, "read_weights", gone)
    with pytest.raises(ArtifactMissingError, match="went missing while the artifact was loaded"):
        kernl.runtime.load(small_artifact, device="cpu")

    def elsewhere(root, **kwargs):  # not the artifact's file: left as it is
        raise FileNotFoundError(2, "No such file or directory", "/opt/toolkit/libdevice.bc")

    monkeypatch.setattr(kernl.runtime, "read_weights", elsewhere)
    with pytest.raises(FileNotFoundError, match="libdevice"):
        kernl.runtime.load(small_artifact, device="cpu")


def test_a_loaded_model_refuses_pickling_saying_what_to_do(small_artifact):
    import copy
    import pickle

    import kernl.runtime

    model = kernl.runtime.load(small_artifact, device="cpu")
    for attempt in (pickle.dumps, copy.deepcopy, copy.copy):
        with pytest.raises(TypeError, match="Load the artifact in each process"):
            attempt(model)


def test_a_child_forked_while_the_model_is_held_can_call_it(small_artifact):
    """A fork copies a held lock as held: the child's first call waited forever (a server
    forking its workers while a call or a stream ran). The child gets the lock fresh."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import os, signal, sys
        os.environ["TRITON_INTERPRET"] = "1"
        import torch
        torch.set_num_threads(1)  # a forked child of a threaded torch may hang in torch itself
        import kernl.runtime
        model = kernl.runtime.load({str(small_artifact)!r}, device="cpu")
        names = model.input_names
        inputs = {{n: torch.ones(1, 8, dtype=torch.long) for n in names}}
        want = model(**inputs)[0]
        model._lock.acquire()  # as a call or an open stream of another thread holds it
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)
            got = model(**inputs)[0]
            os._exit(0 if torch.equal(got, want) else 3)
        _, status = os.waitpid(pid, 0)
        assert model._lock.locked()  # the parent's own lock is left as it was
        model._lock.release()
        sys.exit(os.waitstatus_to_exitcode(status))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
