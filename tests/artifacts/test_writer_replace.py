"""Replacing an artifact: one this user could not move or delete (another user's, in a sticky
folder like /tmp, or in folders it may not write) is refused before any work, naming its
owner; a swap refused all the same, or an old copy that cannot be deleted, is said, not
ignored; two compiles committing to one new destination at once both succeed; a write that
fails (a full disk, a file too large) names its file and leaves the destination as it was."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from artifact_edit import copy_artifact

from kernl.artifacts import (
    ArtifactDestinationError,
    ArtifactWriter,
    check_destination,
    read_manifest,
    read_program,
    verify_artifact,
)
from kernl.artifacts import writer as writer_module
from kernl.artifacts.writer import clean_stale

NOBODY = 65534


def _rewrite(src: Path, dest: Path, marker: str) -> tuple[ArtifactWriter, object]:
    """A writer holding a copy of the artifact at `src`, its config marked, not committed."""
    from safetensors.torch import load_file

    manifest = read_manifest(src)
    manifest.model_config["marker"] = marker
    w = ArtifactWriter(dest)
    for e in manifest.buckets:
        w.write_program(read_program(src, e.program))
    w.write_weights(load_file(str(src / "weights.safetensors")))
    return w, manifest


def _others(folder: Path, name: str = "bert.kernl") -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != name)


# -- the decision, on real files, with this process's identity and permissions made up ----------


def test_another_users_artifact_in_a_sticky_folder_is_refused_naming_its_owner(
    small_artifact, tmp_path, monkeypatch
):
    """A sticky folder (mode 1777, /tmp or a shared CI cache) lets only a file's owner rename
    it: the whole compile ran, then failed with a bare "[Errno 1] Operation not permitted"
    (review)."""
    parent = tmp_path / "shared"
    parent.mkdir()
    dest = copy_artifact(small_artifact, parent / "bert.kernl")
    parent.chmod(0o1777)
    owner = dest.stat().st_uid
    monkeypatch.setattr(writer_module, "_may", lambda _path, _mode: True, raising=False)
    monkeypatch.setattr(writer_module, "_euid", lambda: owner + 1, raising=False)  # someone else
    with pytest.raises(ArtifactDestinationError) as info:
        check_destination(dest)
    message = str(info.value)
    assert "is sticky" in message and f"owned by {writer_module._owner(dest.stat())}" in message
    assert "Remove it as" in message
    # its owner may replace it
    monkeypatch.setattr(writer_module, "_euid", lambda: owner, raising=False)
    assert check_destination(dest) == dest
    parent.chmod(0o777)  # not sticky: the folder's write permission is what counts
    monkeypatch.setattr(writer_module, "_euid", lambda: owner + 1, raising=False)
    assert check_destination(dest) == dest


def test_an_artifact_whose_files_this_user_cannot_delete_is_refused(
    small_artifact, tmp_path, monkeypatch
):
    """A parent anyone may write (mode 777, not sticky) lets the swap through, and the old
    artifact, another user's, could not be deleted: the compile "succeeded" and left it
    forever as a hidden .bert.kernl.partial-... folder (review)."""
    dest = copy_artifact(small_artifact, tmp_path / "bert.kernl")
    locked = dest / "programs"
    monkeypatch.setattr(writer_module, "_euid", lambda: dest.stat().st_uid + 1, raising=False)
    monkeypatch.setattr(
        writer_module,
        "_may",
        lambda path, mode: Path(path) != locked or not mode & os.W_OK,
        raising=False,
    )
    with pytest.raises(ArtifactDestinationError, match=f"may not delete what {locked} "):
        check_destination(dest)
    with pytest.raises(ArtifactDestinationError, match="may not delete what"):
        ArtifactWriter(dest)  # before any work: nothing written beside it
    assert _others(tmp_path) == []


def test_an_empty_folder_in_the_way_needs_no_write_permission_inside(tmp_path, monkeypatch):
    """Nothing to delete in it: only the rename, which its parent's permission allows (and
    optimize()'s copy across folders, which takes write permission on it: it has it here)."""
    dest = tmp_path / "out"
    dest.mkdir()
    monkeypatch.setattr(writer_module, "_euid", lambda: dest.stat().st_uid + 1, raising=False)
    monkeypatch.setattr(writer_module, "_may", lambda path, mode: True, raising=False)
    assert check_destination(dest) == dest


# -- the same, for real: as another user ------------------------------------------------------


@pytest.fixture
def shared_folder():
    """A folder any user may enter (tmp_path is its owner's alone), removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="kernl-shared-"))
    base.chmod(0o755)
    yield base
    for p in [base, *base.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(base)


def _as_nobody(action) -> str:
    """Run `action` in a forked child that has dropped to `nobody`: "accepted", or the
    ArtifactDestinationError's message."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        message = b"accepted"
        try:
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except OSError:  # a container without CAP_SETUID: root cannot become another user
                os.write(write_end, b"cannot drop to nobody")
                os._exit(0)
            action()
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
    return message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (nobody)")
@pytest.mark.parametrize("mode", [0o777, 0o1777], ids=["world-writable", "sticky"])
def test_another_users_artifact_is_refused_before_any_work_as_that_user(
    small_artifact, shared_folder, mode
):
    """The review's repro: root's artifact, a compile run as nobody, in a world-writable
    folder and in a sticky one. Refused by the early check, naming root; nothing written."""
    parent = shared_folder / "out"
    parent.mkdir()
    dest = copy_artifact(small_artifact, parent / "bert.kernl")
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    parent.chmod(mode)
    before = verify_artifact(dest)
    message = _as_nobody(lambda: ArtifactWriter(dest))
    if message == "cannot drop to nobody":
        pytest.skip("this root may not become another user (no CAP_SETUID)")
    assert message.startswith("cannot replace the artifact"), message
    assert "Remove it as root" in message
    assert ("is sticky" in message) == bool(mode & stat.S_ISVTX)
    assert verify_artifact(dest) == before
    assert _others(parent) == []
    assert _as_nobody(lambda: check_destination(parent / "new.kernl")) == "accepted"


def test_the_users_own_write_protected_artifact_is_replaced_and_deleted(small_artifact, tmp_path):
    """`chmod -R a-w` on a deployed artifact, or a strict umask, leaves folders this user may
    not write, but owns: a rename within the folder needs no permission on them, and their
    permissions are given back for the deletion (the early check refused them, reread)."""
    dest = copy_artifact(small_artifact, tmp_path / "bert.kernl")
    before = verify_artifact(dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        assert check_destination(dest) == dest
        w, manifest = _rewrite(small_artifact, dest, "new")
        w.commit(manifest)
        assert verify_artifact(dest) != before
        assert read_manifest(dest).model_config["marker"] == "new"
        assert _others(tmp_path) == []
    finally:
        for p in [dest, *dest.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)


def test_another_users_folder_is_refused_but_an_empty_one_is_replaced(
    small_artifact, tmp_path, monkeypatch
):
    """Another user's folder that this user may not write: refused where it holds files (they
    could not be deleted), replaced where it is empty (only its parent's permission counts)."""
    dest = copy_artifact(small_artifact, tmp_path / "bert.kernl")
    monkeypatch.setattr(writer_module, "_euid", lambda: dest.stat().st_uid + 1, raising=False)
    monkeypatch.setattr(writer_module, "_may", lambda path, mode: False, raising=False)
    with pytest.raises(ArtifactDestinationError, match="may not delete what"):
        check_destination(dest)
    empty = tmp_path / "empty.kernl"
    empty.mkdir()
    assert check_destination(empty) == empty


# -- the commit ----------------------------------------------------------------------------------


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_swap_refused_all_the_same_is_explained_and_keeps_the_previous(
    small_artifact, tmp_path, monkeypatch, exchange
):
    """Permissions that change during the compile (or a rule the early check does not know):
    the swap's EPERM is an ArtifactDestinationError that says what moving the folder takes,
    and the destination keeps its artifact (with or without an atomic exchange)."""
    dest = copy_artifact(small_artifact, tmp_path / "bert.kernl")
    before = verify_artifact(dest)
    w, manifest = _rewrite(small_artifact, dest, "new")

    def refused(*_paths):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(dest))

    if exchange:
        monkeypatch.setattr(writer_module, "_exchange", refused)
    else:
        real_rename = os.rename
        monkeypatch.setattr(writer_module, "_exchange", lambda a, b: False)
        monkeypatch.setattr(  # the old one moves aside, the new one cannot move in
            os, "rename", lambda a, b: refused() if Path(a) == w.tmp else real_rename(a, b)
        )
    with pytest.raises(ArtifactDestinationError) as info:
        with w:
            w.commit(manifest)
    monkeypatch.undo()
    message = str(info.value)
    assert (
        message.startswith("cannot replace the artifact") and "Operation not permitted" in message
    )
    assert "sticky" in message and "keeps its previous artifact" in message
    assert verify_artifact(dest) == before
    assert _others(tmp_path) == []


def test_an_old_copy_that_cannot_be_deleted_is_named_in_a_warning(
    small_artifact, tmp_path, monkeypatch
):
    """The old artifact was deleted with ignore_errors=True: where that failed, it stayed as
    a hidden folder, unexplained. Now the new artifact is in place and a warning names it."""
    dest = copy_artifact(small_artifact, tmp_path / "bert.kernl")
    w, manifest = _rewrite(small_artifact, dest, "new")
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if os.fspath(path).endswith("weights.safetensors"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.warns(RuntimeWarning, match=r"could not be deleted and is left at .*partial"):
        w.commit(manifest)
    monkeypatch.undo()
    assert verify_artifact(dest).model_config["marker"] == "new"
    assert [name.startswith(".bert.kernl.partial-") for name in _others(tmp_path)] == [True]


def test_two_commits_to_one_new_destination_both_succeed(small_artifact, tmp_path, monkeypatch):
    """The loser of two compiles renaming into a new destination at the same moment failed
    with "[Errno 39] Directory not empty" after all its work (review). It replaces the
    winner's artifact instead, as any previous one: the last commit wins, nothing is left."""
    dest = tmp_path / "bert.kernl"
    first, first_manifest = _rewrite(small_artifact, dest, "first")
    second, second_manifest = _rewrite(small_artifact, dest, "second")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == second.tmp and not dest.exists():
            first.commit(first_manifest)  # the other compile gets there first
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    second.commit(second_manifest)
    monkeypatch.undo()
    assert verify_artifact(dest).model_config["marker"] == "second"
    assert _others(tmp_path) == []


# -- a write that fails ---------------------------------------------------------------------------


def test_a_file_too_large_names_it_and_leaves_the_destination(small_artifact, tmp_path):
    """`ulimit -f` (or a file system's largest file) under the weights: the compile ended on
    a bare "[Errno 27] File too large" (review). Python ignores SIGXFSZ, so the write fails
    with EFBIG here as it did there."""
    import torch

    dest = copy_artifact(small_artifact, tmp_path / "bert.kernl")
    before = verify_artifact(dest)
    w, _ = _rewrite(small_artifact, dest, "new")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
    try:
        with pytest.raises(ArtifactDestinationError) as info:
            with w:
                w.write_weights({"big": torch.zeros(1 << 19)})  # 2 MiB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    message = str(info.value)
    assert f"{w.tmp / 'weights.safetensors'}: File too large" in message
    assert f"Nothing was written to {dest}: it is as it was" in message
    assert verify_artifact(dest) == before
    assert _others(tmp_path) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_a_program_or_manifest_write_that_fails_names_the_file(
    small_artifact, tmp_path, monkeypatch, code
):
    dest = tmp_path / "bert.kernl"
    manifest = read_manifest(small_artifact)
    real_write = writer_module._fsync_write

    def failing(path, data):
        if path.name == "manifest.msgpack":
            raise OSError(code, os.strerror(code), str(path))
        real_write(path, data)

    monkeypatch.setattr(writer_module, "_fsync_write", failing)
    w, manifest = _rewrite(small_artifact, dest, "new")
    with pytest.raises(ArtifactDestinationError, match=f"manifest.msgpack: {os.strerror(code)}"):
        with w:
            w.commit(manifest)
    assert not dest.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_ctrl_c_during_the_swap_waits_for_it_then_interrupts(
    small_artifact, tmp_path, monkeypatch, exchange
):
    """Ctrl-C between the two renames (file systems without an atomic exchange) left the
    destination with no artifact at all; during the exchange, it is delivered once the swap is
    whole: the destination holds the new artifact, and the interrupt still ends the call."""
    import signal

    dest = copy_artifact(small_artifact, tmp_path / "bert.kernl")
    w, manifest = _rewrite(small_artifact, dest, "new")
    real_exchange, real_rename = writer_module._exchange, os.rename

    def exchange_interrupted(a, b):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C as the swap starts
        return real_exchange(a, b) if exchange else False

    renames = []

    def rename_interrupted(a, b):
        renames.append(a)
        if len(renames) == 1:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C between the two renames
        real_rename(a, b)

    monkeypatch.setattr(writer_module, "_exchange", exchange_interrupted)
    if not exchange:
        monkeypatch.setattr(os, "rename", rename_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with w:
            w.commit(manifest)
    monkeypatch.undo()
    assert verify_artifact(dest).model_config["marker"] == "new"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    clean_stale(dest)  # what the next compile to it does with the old copy left behind
    assert _others(tmp_path) == []


def test_signals_held_delivers_both_and_leaves_a_handler_it_cannot_restore_alone(monkeypatch):
    """Ctrl-C and SIGTERM both caught during a swap: the first delivered (a KeyboardInterrupt)
    dropped the second. A handler installed from C (an embedding host) reads as None, which
    signal.signal cannot put back: SIGTERM stayed on kernl's recorder for good (review)."""
    import signal

    ran = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: ran.append(signum))
    try:
        with pytest.raises(KeyboardInterrupt):
            with writer_module.signals_held():
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGTERM)
                assert not ran  # held
        assert ran == [signal.SIGTERM]
        real = signal.getsignal
        monkeypatch.setattr(signal, "getsignal", lambda s: None if s == signal.SIGTERM else real(s))
        mine = real(signal.SIGTERM)
        with writer_module.signals_held():
            assert real(signal.SIGTERM) is mine  # not replaced: it could not be restored
    finally:
        signal.signal(signal.SIGTERM, previous)
