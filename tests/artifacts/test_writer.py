"""The writer: refuses a bad destination before any work, replaces an artifact atomically,
leaves readable files, and cleans up after compiles that were killed."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from pathlib import Path

import pytest
from artifact_edit import copy_artifact, read_msgpack

from kernl.artifacts import (
    ArtifactCorruptError,
    ArtifactDestinationError,
    ArtifactWriteError,
    ArtifactWriter,
    check_destination,
    pack_manifest,
    read_manifest,
    read_program,
    verify_artifact,
)
from kernl.artifacts.writer import clean_stale


def test_existing_file_is_not_replaced(tmp_path):
    (tmp_path / "out").write_text("precious")
    with pytest.raises(ArtifactDestinationError, match="exists and is not a folder"):
        check_destination(tmp_path / "out")


def test_folder_that_is_not_an_artifact_is_not_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("precious")
    with pytest.raises(ArtifactDestinationError, match="is not a kernl artifact"):
        check_destination(tmp_path / "out")


def test_a_path_ending_in_dot_dot_is_refused_up_front(tmp_path):
    """`-o a.kernl/new/..` passed every early check and failed at the final rename, after the
    whole compile (its temporary folder was named after '..')."""
    (tmp_path / "a.kernl" / "new").mkdir(parents=True)
    with pytest.raises(ArtifactDestinationError, match=r"ends in '\.\.': give .*a\.kernl\)$"):
        check_destination(tmp_path / "a.kernl" / "new" / "..")


def test_parent_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactDestinationError, match="cannot create the folder"):
        check_destination(tmp_path / "file" / "sub" / "out")
    with pytest.raises(ArtifactDestinationError, match="file exists and is not a folder"):
        check_destination(tmp_path / "file" / "out")


def test_too_little_free_space(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(1 << 30, (1 << 30) - 4096, 4096))
    with pytest.raises(ArtifactDestinationError, match="not enough free space.*0 MiB are free"):
        check_destination(tmp_path / "out")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(1 << 40, 0, 1 << 30))
    with pytest.raises(ArtifactDestinationError, match="needs about 2048 MiB"):
        check_destination(tmp_path / "out", needed_bytes=2 << 30)
    assert check_destination(tmp_path / "out", needed_bytes=1 << 20) == tmp_path / "out"


def test_a_name_too_long_for_the_temporary_folder_is_refused_saying_how_long(tmp_path):
    """A name the file system takes, but too long for the folder kernl writes beside it, was
    refused as "cannot write into <parent>: File name too long" (review)."""
    with pytest.raises(ArtifactDestinationError, match=r"too long.*at most (\d+) bytes") as e:
        check_destination(tmp_path / ("a" * 236))
    most = int(re.search(r"at most (\d+) bytes", str(e.value)).group(1))
    fits = tmp_path / ("a" * most)
    with ArtifactWriter(fits) as w:  # the longest name it names: its folder beside is made
        assert w.tmp.is_dir() and len(w.tmp.name) <= 255
        w.abort()


def test_the_check_leaves_no_folders_it_made_and_the_writer_makes_them(tmp_path, monkeypatch):
    """`-o new/dirs/model.kernl`: the early check made new/dirs, and a compile failing after
    it left them behind, empty (review)."""
    dest = tmp_path / "new" / "dirs" / "model.kernl"
    assert check_destination(dest) == dest
    assert list(tmp_path.iterdir()) == []
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(1 << 30, 1 << 30, 0))
    with pytest.raises(ArtifactDestinationError, match="not enough free space"):
        check_destination(dest)
    assert list(tmp_path.iterdir()) == []  # a refusal removes them too
    monkeypatch.undo()
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "mine.txt").write_text("x")
    check_destination(dest)
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["mine.txt"]  # only what it made
    with ArtifactWriter(dest) as w:  # the writer's own check keeps them: it writes there
        assert w.tmp.parent == dest.parent and dest.parent.is_dir()
        w.abort()


def test_a_mount_point_is_refused_before_the_compile(tmp_path, monkeypatch):
    """An artifact is renamed into place, which cannot replace a mount point (`docker run -v
    ./out:/out ... -o /out`): this failed with a bare EBUSY after the whole compile."""
    dest = tmp_path / "out"
    dest.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == dest or real(p))
    with pytest.raises(ArtifactDestinationError, match="is a mount point.*a folder inside it"):
        check_destination(dest)
    assert check_destination(dest / "model.kernl") == dest / "model.kernl"


def test_a_bind_mount_from_the_same_filesystem_is_refused_before_the_compile(tmp_path, monkeypatch):
    """os.path.ismount compares devices: a bind mount from the same filesystem has its
    parent's, and was found only by the final rename's EBUSY (review 2026-12-07). The mount
    table names it (its paths octal-escaped)."""
    import kernl.artifacts.writer as writer

    dest = tmp_path / "my out"
    dest.mkdir()
    table = tmp_path / "mountinfo"
    escaped = str(dest).replace(" ", "\\040")
    table.write_text(
        "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
        f"98 22 8:1 /srv/data {escaped} rw,relatime - ext4 /dev/sda1 rw\n"
    )
    monkeypatch.setattr(writer, "MOUNT_TABLE", str(table))
    with pytest.raises(ArtifactDestinationError, match="is a mount point.*a folder inside it"):
        check_destination(dest)
    assert check_destination(dest / "model.kernl") == dest / "model.kernl"


@pytest.fixture
def locked():
    """A folder only its owner may write, with parents anyone may enter."""
    base = tempfile.mkdtemp(prefix="kernl-locked-")
    os.chmod(base, 0o755)
    yield Path(base)
    os.chmod(base, 0o755)
    shutil.rmtree(base)


def test_unwritable_destination(locked):
    """As root, permissions are only enforced for another user: the check runs in a forked
    child that has dropped to `nobody`."""
    if os.geteuid() != 0:
        locked.chmod(0o555)
        with pytest.raises(ArtifactDestinationError, match="cannot write into"):
            check_destination(locked / "out")
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        message = b"accepted"
        try:
            os.setgid(65534)
            os.setuid(65534)
            check_destination(locked / "out")
        except ArtifactDestinationError as e:
            message = str(e).encode()
        except BaseException as e:
            message = f"other {type(e).__name__}: {e}".encode()
        os.write(write_end, message)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    assert message.startswith(f"cannot write into {locked}"), message


def _rewrite(src, dest, edit_config=None):
    """Write a copy of the artifact at `src` to `dest` through ArtifactWriter."""
    from safetensors.torch import load_file

    manifest = read_manifest(src)
    if edit_config:
        manifest.model_config.update(edit_config)
    w = ArtifactWriter(dest)
    for e in manifest.buckets:
        w.write_program(read_program(src, e.program))
    w.write_weights(load_file(str(src / "weights.safetensors")))
    return w, manifest


def test_commit_replaces_the_previous_artifact_atomically(small_artifact, tmp_path):
    dest = copy_artifact(small_artifact, tmp_path / "bert.kernl")
    w, manifest = _rewrite(small_artifact, dest, {"marker": "second"})
    assert read_manifest(dest).model_config.get("marker") is None  # not yet
    w.commit(manifest)
    assert verify_artifact(dest).model_config["marker"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.kernl"]  # nothing left over


def test_a_commit_into_an_empty_folder_fills_it(small_artifact, tmp_path):
    """An empty folder is accepted up front as a destination; its commit then failed, after
    the whole compile, on a manifest the folder never had (the carry of a replaced artifact's
    tokenizer read it unguarded)."""
    dest = tmp_path / "empty"
    dest.mkdir()
    check_destination(dest)
    w, manifest = _rewrite(small_artifact, dest, {"marker": "first"})
    w.commit(manifest)
    assert verify_artifact(dest).model_config["marker"] == "first"


def test_files_are_readable_by_others(small_artifact, tmp_path):
    w, manifest = _rewrite(small_artifact, tmp_path / "bert.kernl")
    dest = w.commit(manifest)
    old = os.umask(0o022)
    os.umask(old)
    assert (dest.stat().st_mode & 0o777) == 0o777 & ~old
    assert ((dest / "weights.safetensors").stat().st_mode & 0o777) == 0o666 & ~old


def test_a_commit_its_reader_refuses_leaves_the_destination_as_it_was(small_artifact, tmp_path):
    """The writer runs the reader's check before it commits: an artifact whose program uses a
    weight the weights file lacks (a compiler bug) is refused, with the reader's words, and the
    artifact already there stays, with nothing left over."""
    from safetensors.torch import load_file

    dest = copy_artifact(small_artifact, tmp_path / "bert.kernl")
    manifest = read_manifest(small_artifact)
    weights = load_file(str(small_artifact / "weights.safetensors"))
    dropped = sorted(weights)[0]
    with pytest.raises(ArtifactWriteError, match=f"its own reader refuses.*{re.escape(dropped)}"):
        with ArtifactWriter(dest) as w:
            for e in manifest.buckets:
                w.write_program(read_program(small_artifact, e.program))
            w.write_weights({k: v for k, v in weights.items() if k != dropped})
            w.commit(manifest)
    assert verify_artifact(dest) == verify_artifact(small_artifact)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.kernl"]


def test_a_commit_over_a_limit_load_applies_is_refused_naming_it(small_artifact, tmp_path):
    """load() reads with the default limits and takes none of its own: an artifact over one
    was written, then refused by every load(). The commit refuses it instead, in the reader's
    words (which name the limit), not as a bug in kernl; the artifact already there stays."""
    from safetensors.torch import load_file

    from kernl.artifacts import DEFAULT_LIMITS, Instruction

    dest = copy_artifact(small_artifact, tmp_path / "bert.kernl")
    manifest = read_manifest(small_artifact)
    elements = 2 * DEFAULT_LIMITS.max_tensor_elements  # a logits tensor of a huge vocabulary
    with pytest.raises(ArtifactWriteError) as info:
        with ArtifactWriter(dest) as w:
            for e in manifest.buckets:
                p = read_program(small_artifact, e.program)
                p.instructions.insert(
                    0, Instruction("aten.zeros.default", [[elements]], {}, [p.num_values])
                )
                p.num_values += 1
                w.write_program(p)
            w.write_weights(load_file(str(small_artifact / "weights.safetensors")))
            w.commit(manifest)
    message = str(info.value)
    assert f"more than the {DEFAULT_LIMITS.max_tensor_elements} a reader allows" in message
    assert "kernl.runtime.load() refuses it" in message and "a bug in kernl" not in message
    assert verify_artifact(dest) == verify_artifact(small_artifact)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.kernl"]


def test_files_beside_the_artifact_survive_its_replacement(small_artifact, tmp_path):
    """docs/deployment.md has tokenizer.json copied next to manifest.msgpack: a recompile to
    the same folder deleted it, and every other file that was not the artifact's."""
    dest = copy_artifact(small_artifact, tmp_path / "bert.kernl")
    (dest / "tokenizer.json").write_text("{}")
    (dest / "notes").mkdir()
    (dest / "notes" / "todo.txt").write_text("mine")
    os.chmod(dest / "notes" / "todo.txt", 0o600)
    w, manifest = _rewrite(small_artifact, dest, {"marker": "second"})
    w.commit(manifest)
    assert w.kept == ["notes/todo.txt", "tokenizer.json"]
    assert verify_artifact(dest).model_config["marker"] == "second"
    assert (dest / "tokenizer.json").read_text() == "{}"
    assert (dest / "notes" / "todo.txt").read_text() == "mine"
    assert (dest / "notes" / "todo.txt").stat().st_mode & 0o777 == 0o600


def test_a_kept_file_the_new_artifact_writes_is_refused(small_artifact, tmp_path):
    dest = copy_artifact(small_artifact, tmp_path / "bert.kernl")
    (dest / "kernels").mkdir(exist_ok=True)
    (dest / "kernels" / "mine.cubin").write_bytes(b"not kernl's")
    w, manifest = _rewrite(small_artifact, dest)
    w.write_kernel("mine", b"kernl's")
    with pytest.raises(ArtifactDestinationError, match="mine.cubin is not part of the artifact"):
        w.commit(manifest)
    w.abort()
    assert (dest / "kernels" / "mine.cubin").read_bytes() == b"not kernl's"
    assert verify_artifact(dest) == verify_artifact(small_artifact)


@pytest.mark.parametrize("manifest", [b"", b"\x80", pack_manifest({"not": "a manifest"})])
def test_a_folder_holding_a_file_named_like_a_manifest_is_not_replaced(manifest, tmp_path):
    """Any folder with a file named manifest.msgpack counted as an artifact: a compile there
    deleted the rest of the folder."""
    out = tmp_path / "userdata"
    out.mkdir()
    (out / "manifest.msgpack").write_bytes(manifest)
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(ArtifactDestinationError, match="not a kernl manifest"):
        check_destination(out)
    assert (out / "thesis.tex").read_text() == "precious"


def test_a_symbolic_link_is_named_as_one(small_artifact, tmp_path):
    real = copy_artifact(small_artifact, tmp_path / "v3.kernl")
    (tmp_path / "current").symlink_to(real)
    with pytest.raises(ArtifactDestinationError, match="is a symbolic link.*v3.kernl"):
        check_destination(tmp_path / "current")


def test_abort_leaves_nothing(small_artifact, tmp_path):
    w, _ = _rewrite(small_artifact, tmp_path / "bert.kernl")
    w.abort()
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_killed_compiles_are_cleaned(small_artifact, tmp_path):
    """A pid is judged only within this host and PID namespace: a container sharing the
    host's name and the volume has other processes under the same numbers (its live compile's
    folder was removed, review). What no process here can vouch for (another host, another
    namespace, an older kernl's name without one) goes once a week old, as does a folder
    whose pid lives (it may have been reused since): optimize()'s cache's rule, one function."""
    from kernl.artifacts.writer import STALE_SECONDS, pid_namespace

    host, ns = socket.gethostname(), pid_namespace()
    dest = tmp_path / "bert.kernl"
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".bert.kernl.partial-{host}~{ns}@{dead}-abc123"
    running = tmp_path / f".bert.kernl.partial-{host}~{ns}@{alive}-def456"
    elsewhere = tmp_path / f".bert.kernl.partial-otherhost~{ns}@{dead}-ghi789"
    container = tmp_path / f".bert.kernl.partial-{host}~{ns}1@{dead}-jkl012"
    unnamed = tmp_path / f".bert.kernl.partial-{host}@{dead}-mno345"  # an older kernl's
    previous = tmp_path / f".bert.kernl.previous-{host}~{ns}@{dead}"
    for p in (stale, running, elsewhere, container, unnamed):
        p.mkdir()
    copy_artifact(small_artifact, previous)  # a kill between the two renames of a commit
    clean_stale(dest)
    assert not stale.exists() and not previous.exists()
    # maybe still in use: left alone
    assert running.exists() and elsewhere.exists() and container.exists() and unnamed.exists()
    assert verify_artifact(dest)  # the previous artifact is back
    clean_stale(dest, now=time.time() + STALE_SECONDS + 60)  # a week on: whoever made them
    assert not (elsewhere.exists() or container.exists() or unnamed.exists() or running.exists())


def test_leftovers_of_killed_copies_to_save_to_are_cleaned(small_artifact, tmp_path):
    """kernl.optimize's save_to= copies through `.NAME.copy-<owner>-*`: one killed during the
    copy left a full-size folder nothing removed, and one killed between its two renames (no
    atomic exchange) left no artifact at the destination, the previous one hidden inside."""
    from kernl.artifacts.writer import pid_namespace

    host, ns = socket.gethostname(), pid_namespace()
    dest = tmp_path / "saved.kernl"
    dead, alive = _dead_pid(), os.getpid()
    copying = tmp_path / f".saved.kernl.copy-{host}~{ns}@{dead}-abc123"
    swapping = tmp_path / f".saved.kernl.copy-{host}~{ns}@{dead}-def456"
    running = tmp_path / f".saved.kernl.copy-{host}~{ns}@{alive}-ghi789"
    copy_artifact(small_artifact, copying / "artifact")
    copy_artifact(small_artifact, swapping / "previous")
    running.mkdir()
    clean_stale(dest)
    assert verify_artifact(dest)  # the previous artifact is back
    assert not copying.exists() and not swapping.exists() and running.exists()


def test_manifest_checksum_round_trip_and_detection(small_artifact, tmp_path):
    root = copy_artifact(small_artifact, tmp_path / "a")
    m = read_msgpack(root / "manifest.msgpack")
    (root / "manifest.msgpack").write_bytes(pack_manifest(m))
    assert read_manifest(root) == read_manifest(small_artifact)
    m["model_type"] = "gpt2"
    import msgpack

    (root / "manifest.msgpack").write_bytes(msgpack.packb(m, use_bin_type=True))
    with pytest.raises(ArtifactCorruptError, match="checksum"):
        read_manifest(root)


def test_weights_are_written_one_tensor_at_a_time_as_safetensors_reads_them(tmp_path):
    """`write_safetensors` streams each tensor to the file (safetensors' `save_file` held
    every tensor on the host, then a bytes copy of each: twice the weights): every dtype,
    a scalar, an empty tensor, a strided view and two names on one storage (tied embeddings)
    read back equal through safetensors itself and through kernl's own checked reader, each
    aligned to its element size (a 3-byte bool before them all would misalign the rest)."""
    import torch
    from safetensors import safe_open

    from kernl.artifacts.reader import check_safetensors_header
    from kernl.artifacts.weights import read_tensors
    from kernl.artifacts.writer import write_safetensors

    g = torch.Generator().manual_seed(0)
    embed = torch.randn(7, 5, generator=g).to(torch.bfloat16)
    tensors = {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied: one storage, two names
        "b.half": torch.randn(3, 4, generator=g).half(),
        "c.float": torch.randn(2, 3, 4, generator=g),
        "d.long": torch.arange(-5, 6),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.zeros(0, 4),
        "h.strided": torch.randn(6, 8, generator=g)[::2, 1::3],
    }
    path = tmp_path / "weights.safetensors"
    write_safetensors(path, tensors, {"format": "pt"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t), name
    header = check_safetensors_header(path)
    for name, t in tensors.items():  # each starts at a multiple of its element size
        assert header[name]["data_offsets"][0] % t.element_size() == 0, name
    back = read_tensors(path, header, "cpu")
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with open(path, "rb") as f:
        assert int.from_bytes(f.read(8), "little") % 8 == 0  # the data starts 8-byte aligned


def test_a_weight_safetensors_cannot_name_is_refused_by_the_writer(tmp_path):
    import torch

    with ArtifactWriter(tmp_path / "a.kernl") as writer:
        with pytest.raises(ArtifactWriteError, match="complex64"):
            writer.write_weights({"w": torch.zeros(2, dtype=torch.complex64)})
