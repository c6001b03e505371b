"""Write an artifact atomically: everything goes into a temporary folder beside the
destination, which replaces it only once complete, in one atomic exchange where the
filesystem has one (renameat2 RENAME_EXCHANGE on Linux). A compile killed at any point leaves
either no artifact or the previous complete one; the temporary folders of killed compiles
are removed by the next compile to the same destination. Files in the destination that are
not its artifact's (a tokenizer.json copied in) are carried into the new one, and a
signature is written before the exchange: a replaced artifact loses nothing of its folder,
and a failed signature leaves the previous one. A previous artifact this user may not move
and delete (another user's, in a sticky folder like /tmp) is refused before any work, and a
write that fails (a full disk) names its file: either way the destination is left as it
was."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import msgpack

from .errors import ArtifactDestinationError, ArtifactError, ArtifactWriteError
from .hashing import (  # noqa: F401 - MAX_HASH_THREADS, hash_workers: importable from here too
    MAX_HASH_THREADS,
    chunk_count,
    hash_workers,
    manifest_digest,
    run_hash_jobs,
    sha256_file,
    sha256_range,
)
from .limits import DEFAULT_LIMITS, ReadLimits
from .program import Program
from .schema import (
    FILE_CHUNKS_KEY,
    KERNELS_DIR,
    MANIFEST_CHECKSUM_KEY,
    MANIFEST_FILE,
    PROGRAMS_DIR,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    Manifest,
)

# Free space asked for before anything is known about the model (a destination with less
# cannot hold even a tiny artifact).
MIN_FREE_BYTES = 16 << 20


# Files larger than CHUNK_THRESHOLD also get the sha256 of each CHUNK_BYTES piece
# (manifest extra.file_chunks): one sha256 is a sequential chain at about 1 GB/s, the pieces
# are checked on all cores at once (reader.verify_files).
CHUNK_THRESHOLD = 64 << 20
CHUNK_BYTES = 16 << 20


def file_hashes(
    paths: dict[str, Path],
    chunk_threshold: int | None = None,
    chunk_bytes: int | None = None,
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """(path -> whole-file sha256, path -> chunk entry for files above the threshold), hashed
    on a thread pool. A chunk entry is {"chunk_bytes", "bytes", "sha256": [hex per chunk]}."""
    threshold = CHUNK_THRESHOLD if chunk_threshold is None else chunk_threshold
    size_of_chunk = chunk_bytes or CHUNK_BYTES
    jobs: list[Callable[[], str]] = []
    plan: list[tuple[str, int | None]] = []  # (rel, chunk index or None for the whole file)
    sizes = {rel: p.stat().st_size for rel, p in paths.items()}
    for rel, p in paths.items():
        jobs.append(lambda p=p: sha256_file(p))
        plan.append((rel, None))
        if sizes[rel] > threshold:
            for i in range(chunk_count(sizes[rel], size_of_chunk)):
                start = i * size_of_chunk
                jobs.append(lambda p=p, s=start: sha256_range(p, s, size_of_chunk))
                plan.append((rel, i))
    whole: dict[str, str] = {}
    chunks: dict[str, dict[str, Any]] = {}
    for (rel, index), digest in zip(plan, run_hash_jobs(jobs), strict=True):
        if index is None:
            whole[rel] = digest
        else:
            entry = chunks.setdefault(
                rel, {"chunk_bytes": size_of_chunk, "bytes": sizes[rel], "sha256": []}
            )
            entry["sha256"].append(digest)
    return whole, chunks


def pack_manifest(manifest: dict[str, Any]) -> bytes:
    """The manifest's bytes, with its own checksum in extra (readers check it)."""
    extra = {k: v for k, v in (manifest.get("extra") or {}).items() if k != MANIFEST_CHECKSUM_KEY}
    d = {**manifest, "extra": extra}
    extra[MANIFEST_CHECKSUM_KEY] = manifest_digest(d)
    return msgpack.packb(d, use_bin_type=True)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    # Read without os.umask(), which would change it for every thread for a moment.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


NAME_MAX = 255  # bytes in one file name (Linux, macOS)


def check_destination(
    destination: str | os.PathLike, needed_bytes: int = 0, keep_parent: bool = False
) -> Path:
    """Fail early (before any tracing or tuning) if `destination` cannot receive an artifact:
    an existing non-artifact path, an existing artifact this user may not move or delete
    (`check_replaceable`), a parent that cannot be created or written (tested by creating it
    and writing a file there), or too little free space (`needed_bytes`, at least
    MIN_FREE_BYTES). Raises ArtifactDestinationError. The folders it created for the test are
    removed again unless `keep_parent` (the writer's own call, about to write there): a compile
    that fails later leaves no empty folders behind."""
    if not os.fspath(destination).strip():
        # Path("") is the working directory, which the compile then replaced whole (an unset
        # $OUT in a script: `kernl-compile model -o "$OUT"`)
        raise ArtifactDestinationError("the artifact path is empty: give the folder to write")
    dest = Path(destination).expanduser().absolute()
    real, cwd = Path(os.path.realpath(dest)), Path(os.path.realpath(Path.cwd()))
    if real == cwd or real in cwd.parents:
        raise ArtifactDestinationError(
            f"{dest} is the working directory or holds it: an artifact replaces its "
            f"destination folder whole; give a folder of its own, e.g. {dest / 'model.kernl'}"
        )
    if dest.name == "..":  # it would be written beside itself as "..": failed at the rename
        raise ArtifactDestinationError(
            f"{dest} ends in '..': give the artifact folder's own path "
            f"({Path(os.path.normpath(dest))})"
        )
    try:
        return _check_destination(dest, needed_bytes, keep_parent)
    except OSError as e:  # e.g. a folder on the way that this user cannot enter
        raise ArtifactDestinationError(f"cannot write {dest}: {e.strerror} ({e.filename})") from e


def _check_existing(dest: Path) -> None:
    """What is at `dest` may be replaced by an artifact: nothing, an empty folder, or a kernl
    artifact. Checked before any work, and again by the commit just before its swap (another
    compile may have put its artifact there since), each time with `check_replaceable`."""
    if dest.is_symlink():
        raise ArtifactDestinationError(
            f"{dest} is a symbolic link (to {os.readlink(dest)}); refusing to replace it: "
            f"give the folder it points to ({dest.resolve()}), or write the new artifact "
            "beside it and move the link"
        )
    if dest.exists() and not dest.is_dir():
        raise ArtifactDestinationError(f"{dest} exists and is not a folder; refusing to replace it")
    if dest.exists() and any(dest.iterdir()):
        if not (dest / MANIFEST_FILE).is_file():
            raise ArtifactDestinationError(
                f"{dest} exists, is not empty and is not a kernl artifact; refusing to replace it"
            )
        artifact_files(dest)  # a manifest.msgpack that is no kernl manifest: refused there
    if dest.is_dir() and _is_mount_point(dest):
        raise ArtifactDestinationError(
            f"{dest} is a mount point: an artifact is written beside its destination and "
            "renamed into place, which cannot replace a mount point; write to a folder inside "
            f"it (e.g. {dest / 'model.kernl'})"
        )


MOUNT_TABLE = "/proc/self/mountinfo"  # Linux's; elsewhere os.path.ismount alone


def _is_mount_point(path: Path) -> bool:
    """os.path.ismount, and the mount table for what it cannot tell: a bind mount from the
    same filesystem (a container's volume) has its parent's device, and was found only by
    the final rename's EBUSY, after the whole compile."""
    if os.path.ismount(path):
        return True
    try:
        with open(MOUNT_TABLE, encoding="utf-8", errors="replace") as f:
            table = f.read()
    except OSError:
        return False
    target = os.path.realpath(path)
    for line in table.splitlines():
        fields = line.split(" ")
        if len(fields) > 4 and _unescape_mount_path(fields[4]) == target:
            return True
    return False


def _unescape_mount_path(field: str) -> str:
    # the kernel writes a space, tab, newline and backslash in a path as octal escapes
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _check_destination(dest: Path, needed_bytes: int, keep_parent: bool) -> Path:
    _check_existing(dest)
    # the longest name kernl gives a folder beside it (mkdtemp adds 8 characters)
    beside = len(os.fsencode(f".{dest.name}.partial-{owner_tag()}-12345678"))
    if beside > NAME_MAX:
        most = NAME_MAX - (beside - len(os.fsencode(dest.name)))
        raise ArtifactDestinationError(
            f"the name {dest.name!r} is too long: kernl writes the artifact beside it under a "
            f"temporary name of {beside} bytes, over the {NAME_MAX} a file name may have; use "
            f"a name of at most {most} bytes"
        )
    parent = dest.parent
    made = [p for p in (parent, *parent.parents) if not p.exists()]  # the deepest first
    try:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if parent.exists() and not parent.is_dir():  # e.g. -o /dev/null/x.kernl
                raise ArtifactDestinationError(f"{parent} exists and is not a folder") from e
            raise ArtifactDestinationError(
                f"cannot create the folder {parent}: {e.strerror}"
            ) from e
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{dest.name}.write-probe-", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ArtifactDestinationError(f"cannot write into {parent}: {e.strerror}") from e
        if dest.is_dir():
            check_replaceable(dest)
        free = shutil.disk_usage(parent).free
    finally:
        if not keep_parent:
            _remove_empty(made)
    needed = max(needed_bytes, MIN_FREE_BYTES)
    if free < needed:
        raise ArtifactDestinationError(
            f"not enough free space in {parent}: the artifact needs about "
            f"{needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free"
        )
    return dest


def _euid() -> int:
    return os.geteuid()


def _may(path: Path, mode: int) -> bool:
    """Whether this process may read/write/search `path`, judged with its effective ids, as
    the kernel judges a rename or an unlink (os.access alone takes the real ids)."""
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _owner(st: os.stat_result) -> str:
    """The user name of a file's owner (its uid where the name is unknown)."""
    try:
        import pwd

        return pwd.getpwuid(st.st_uid).pw_name
    except (ImportError, KeyError):
        return f"uid {st.st_uid}"


def _describe(path: Path, st: os.stat_result) -> str:
    return f"{path} (owned by {_owner(st)}, mode {stat.filemode(st.st_mode)})"


def check_replaceable(dest: Path) -> None:
    """Refuse, with ArtifactDestinationError naming the owner, a folder at `dest` that this user
    could not replace by a new artifact. The commit swaps it out of its place, then deletes it:
    - in a sticky folder (mode +t, as /tmp and shared caches are), only the owner of an entry,
      or of the folder, may rename or delete it: the swap would fail with a bare EPERM after
      the whole compile;
    - deleting the old copy takes read, write and search permission on each of its folders
      (on `dest` itself always: optimize()'s copy renames it across folders, which rewrites
      its `..`): without them the new artifact is installed, and the old one stays behind as a
      hidden `.NAME.partial-...` folder nobody removes.
    Root passes every rule, as the kernel lets it (a read-only file system is found by the
    write test and the swap)."""
    euid = _euid()
    parent_st, dest_st = dest.parent.stat(), dest.lstat()
    if (
        euid != 0
        and parent_st.st_mode & stat.S_ISVTX
        and euid not in (dest_st.st_uid, parent_st.st_uid)
    ):
        raise ArtifactDestinationError(
            f"cannot replace the artifact {_describe(dest, dest_st)}: its folder {dest.parent} "
            "is sticky (mode +t, like /tmp), where only a file's owner may rename or delete "
            f"it. Remove it as {_owner(dest_st)}, or write the new artifact to another path."
        )
    folders = [dest]
    while folders:
        folder = folders.pop()
        folder_st = folder.lstat()
        # the user's own write-protected folders (`chmod -R a-w`, a strict umask) are given
        # their permissions back before the deletion (make_deletable), and an empty folder
        # holds nothing to delete
        own = folder_st.st_uid == euid
        empty = folder == dest and not any(os.scandir(folder))
        if not own and not empty and not _may(folder, os.R_OK | os.W_OK | os.X_OK):
            raise ArtifactDestinationError(
                f"cannot replace the artifact at {dest}: this user may not delete what "
                f"{_describe(folder, folder_st)} holds, so the previous artifact would be left "
                f"behind. Remove it as {_owner(folder_st)} (or make it writable by you), or "
                "write the new artifact to another path."
            )
        sticky = euid != 0 and folder_st.st_mode & stat.S_ISVTX and folder_st.st_uid != euid
        for entry in os.scandir(folder):
            entry_st = entry.stat(follow_symlinks=False)
            if sticky and entry_st.st_uid != euid:
                entry_path = Path(entry.path)
                raise ArtifactDestinationError(
                    f"cannot replace the artifact at {dest}: {_describe(entry_path, entry_st)} "
                    f"is in the sticky folder {folder}, where only its owner may delete it. "
                    f"Remove it as {_owner(entry_st)}, or write the new artifact to another path."
                )
            if stat.S_ISDIR(entry_st.st_mode):
                folders.append(Path(entry.path))


def make_deletable(folder: Path, top_only: bool = False) -> None:
    """Give this user's own folders under `folder` (or `folder` alone) back the read, write
    and search permission a deletion (or a move to another folder, which rewrites `..`)
    takes: an artifact the user write-protected (`chmod -R a-w`, a strict umask) is theirs to
    replace. Other users' folders are left as they are (check_replaceable refuses those)."""
    euid = _euid()
    stack = [folder]
    while stack:
        path = stack.pop()
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                continue
            if st.st_uid == euid and st.st_mode & stat.S_IRWXU != stat.S_IRWXU:
                os.chmod(path, st.st_mode | stat.S_IRWXU)
            if not top_only:
                stack += [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
        except OSError:  # gone meanwhile, or not ours: the deletion says what is left
            continue


def remove_left_over(folder: Path, what: str) -> None:
    """Delete `folder`; where that fails, warn naming what is left and why, rather than leave
    it hidden and unexplained (`what` says what it is: "the previous artifact")."""
    make_deletable(folder)
    failures: list[OSError] = []

    def failed(_function, _path, error) -> None:
        error = error[1] if isinstance(error, tuple) else error  # onerror's exc_info
        if not isinstance(error, FileNotFoundError):  # gone meanwhile: fine
            failures.append(error)

    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=failed)
    else:
        shutil.rmtree(folder, onerror=failed)
    if failures and (folder.exists() or folder.is_symlink()):
        first = failures[0]
        warnings.warn(
            f"kernl: {what} could not be deleted and is left at {folder}: "
            f"{first.strerror or first} ({first.filename}); delete it as the user who owns it",
            RuntimeWarning,
            stacklevel=3,
        )


def _remove_empty(folders: list[Path]) -> None:
    """Remove these folders, the deepest first, while they are empty (another process may
    have put something in one meanwhile: it stays, with the folders above it)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def listed_files(root: Path) -> dict[str, Any]:
    """The file list of the artifact at `root`'s manifest (path -> sha256), as written. Raises
    ArtifactDestinationError where the manifest is no kernl manifest: a folder that merely
    holds a file of that name is not an artifact to replace."""
    try:
        listed = msgpack.unpackb((root / MANIFEST_FILE).read_bytes(), raw=False)["files"]
        if not isinstance(listed, dict) or not all(isinstance(f, str) for f in listed):
            raise TypeError("file names are not strings")
    except OSError:
        raise
    except Exception as e:
        raise ArtifactDestinationError(
            f"{root} holds a {MANIFEST_FILE} that is not a kernl manifest "
            f"({type(e).__name__}: {e}); refusing to replace it: delete it or choose another "
            "output folder"
        ) from None
    return listed


def artifact_files(root: Path) -> set[str]:
    """The files of the artifact at `root` by its manifest (what it lists, the manifest and
    its signature); raises as listed_files."""
    from .signing import SIGNATURE_FILE

    return set(listed_files(root)) | {MANIFEST_FILE, SIGNATURE_FILE}


def kept_files(root: Path) -> list[str]:
    """Files in the artifact folder `root` that are not the artifact's own (a tokenizer.json
    copied in for `kernl serve`, a note): a new artifact at the same place takes them over."""
    if not (root / MANIFEST_FILE).is_file():
        return []
    own = artifact_files(root)
    found = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if (p.is_file() or p.is_symlink()) and rel not in own:
            found.append(rel)
    return found


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held until the block ends, then delivered: a swap of artifact folders
    interrupted between its renames left the destination without any artifact (on file
    systems without an atomic exchange), and one interrupted just after it was reported as an
    interrupted compile that had replaced nothing. Python runs signal handlers in the main
    thread only: elsewhere the block runs as it is (a signal interrupts the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    # a handler installed from C (an embedding host: uWSGI, a C++ server) reads as None and
    # could not be put back: such a signal is left to it
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        first: BaseException | None = None
        for s in dict.fromkeys(caught):  # each through the handler the process had
            try:
                signal.raise_signal(s)
            except BaseException as e:  # KeyboardInterrupt: the other one still delivered
                first = first or e
        if first is not None:
            raise first


def carry_kept_files(dest: Path, into: Path) -> list[str]:
    """Copy the files of the artifact folder `dest` that are not its artifact's (kept_files)
    into `into`, the artifact about to replace it (modes and times kept), so that replacing
    the artifact loses none of them; their paths. One that the new artifact has itself is
    refused, before anything is replaced."""
    kept = []
    for rel in kept_files(dest):
        target = into / rel
        if _same_bytes(dest / rel, target):
            continue  # a tokenizer.json copied in, now the new artifact's own (hashed) file
        kept.append(rel)
        if target.exists() or target.is_symlink():
            raise ArtifactDestinationError(
                f"{dest / rel} is not part of the artifact there, and the new artifact has a "
                "file of that name: move it away, then try again"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(dest / rel, target, follow_symlinks=False)
    # The tokenizer the replaced artifact carried (listed, hashed), where the new one has none
    # (kernl.optimize's save_to=, from a model object): kept as a file of the folder, as
    # before it was listed, not dropped
    old_tokenizer = dest / TOKENIZER_FILE
    if (
        (dest / MANIFEST_FILE).is_file()  # an empty folder is no artifact: nothing to carry
        and TOKENIZER_FILE in artifact_files(dest)
        and old_tokenizer.is_file()
        and not old_tokenizer.is_symlink()
        and not (into / TOKENIZER_FILE).exists()
    ):
        shutil.copy2(old_tokenizer, into / TOKENIZER_FILE)
        kept.append(TOKENIZER_FILE)
    return kept


def _same_bytes(a: Path, b: Path) -> bool:
    if a.is_symlink() or b.is_symlink() or not (a.is_file() and b.is_file()):
        return False
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


# Files a commit adds to the artifact, hashed (and signed) with it (`including_files`): the
# model folder's tokenizer.json, which `kernl serve` tokenizes text with.
_INCLUDE: contextvars.ContextVar[dict[str, bytes] | None] = contextvars.ContextVar(
    "include_files", default=None
)


@contextlib.contextmanager
def including_files(files: dict[str, bytes]) -> Iterator[None]:
    """Every ArtifactWriter.commit in this block (this thread or task) writes `files` (a
    relative path in the folder's top level -> its bytes) into the artifact and lists them
    in the manifest: hashed, and signed with it."""
    token = _INCLUDE.set(dict(files))
    try:
        yield
    finally:
        _INCLUDE.reset(token)


# The private key a commit signs its manifest with before the artifact replaces the
# destination (`signing_commits`): a failed signature then leaves the previous artifact.
_SIGN_WITH: contextvars.ContextVar[Any | None] = contextvars.ContextVar("sign_with", default=None)


@contextlib.contextmanager
def signing_commits(private_key: Any) -> Iterator[None]:
    """Every ArtifactWriter.commit in this block (this thread or task) writes manifest.sig,
    signed with `private_key`, into the artifact before it replaces the destination."""
    token = _SIGN_WITH.set(private_key)
    try:
        yield
    finally:
        _SIGN_WITH.reset(token)


def swap_into(new: Path, dest: Path, backup: Path) -> Path:
    """Put the folder `new` at `dest`, whose folder it replaces: in one step where the file
    system can swap two paths (no moment without a folder at `dest`: a load() then met a
    missing one), else by two renames through `backup`, the first undone if the second fails
    (a kill between them: clean_stale puts it back). Returns where the replaced folder is now
    (`new` or `backup`). The commit's and kernl.optimize's copy to save_to=; callers hold
    Ctrl-C through it (signals_held)."""
    if _exchange(new, dest):
        return new
    os.rename(dest, backup)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(backup, dest)  # the previous folder back in its place
        raise
    return backup


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def pid_namespace() -> str:
    """This process's PID namespace (Linux): a pid means the same process only within one.
    Containers that share the host's name (`--uts=host`) have their own PID namespaces."""
    try:
        return re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")) or "0"
    except OSError:
        return "0"


def owner_tag() -> str:
    """Who writes a temporary folder: host, PID namespace and pid (`host~ns@pid`)."""
    return f"{socket.gethostname()}~{pid_namespace()}@{os.getpid()}"


# A temporary folder that no process here can vouch for (another host on a shared disk, another
# PID namespace, an older kernl's name) is removed once it is this old: no compile takes a week.
STALE_SECONDS = 7 * 24 * 3600


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's, or not a pid: not ours to judge
    return True


def _last_touched(path: Path) -> float:
    """The newest mtime of a folder and what it holds directly (a compile adds files there)."""
    try:
        times = [path.lstat().st_mtime]
        if path.is_dir() and not path.is_symlink():
            times += [c.lstat().st_mtime for c in path.iterdir()]
    except OSError:
        return time.time()  # vanishing under us: someone is working on it
    return max(times)


def owner_is_gone(path: Path, owner: str, now: float) -> bool:
    """Whether a temporary folder of `owner` (`host~ns@pid`) is left over: its owner is a
    process of this host and PID namespace that has ended, or the folder is STALE_SECONDS
    old, whoever made it (a pid may have been reused since). A pid of another namespace (a
    container sharing the host's name and the volume) means another process: it is never
    judged by its pid. The writer's and optimize()'s cache's one rule."""
    host_ns, _, pid = owner.rpartition("@")
    host, _, namespace = host_ns.partition("~")
    ours = host == socket.gethostname() and namespace == pid_namespace() and pid.isdigit()
    if ours and not _process_alive(int(pid)):
        return True
    return _last_touched(path) < now - STALE_SECONDS


def clean_stale(destination: Path, now: float | None = None) -> None:
    """Remove temporary folders left by killed compiles (and kernl.optimize's copies,
    `save_to=`) to `destination`, and put back a previous artifact one killed between its two
    renames had moved aside (a copy's own `previous` subfolder)."""
    prefix = f".{destination.name}."
    now = time.time() if now is None else now
    for p in list(destination.parent.iterdir()):
        if not p.name.startswith(prefix):
            continue
        kind, _, tag = p.name[len(prefix) :].partition("-")
        host_ns, _, rest = tag.rpartition("@")
        owner = f"{host_ns}@{rest.split('-')[0]}"
        if kind not in ("partial", "previous", "copy") or not owner_is_gone(p, owner, now):
            continue
        previous = p / "previous" if kind == "copy" else p
        if kind != "partial" and not destination.exists() and (previous / MANIFEST_FILE).is_file():
            os.rename(previous, destination)
        if p.exists():
            remove_left_over(p, f"a temporary folder of an earlier write to {destination}")


# The reader's limits with every size at its largest (integer weights read to bound indices as
# load() reads them): an artifact the default limits refuse and these pass is over a limit,
# not broken.
_NO_SIZE_LIMITS = replace(
    DEFAULT_LIMITS,
    **{f.name: 1 << 62 for f in fields(ReadLimits) if f.name != "max_index_weight_bytes"},
)


class ArtifactWriter:
    """Usage: `w = ArtifactWriter(dest)`, `w.write_weights(...)`, `w.write_program(...)`,
    `w.commit(manifest)`; on any exception call `w.abort()` (or use it as a context manager)."""

    def __init__(self, destination: str | os.PathLike):
        self.destination = check_destination(destination, keep_parent=True)
        clean_stale(self.destination)
        self._tag = owner_tag()
        self.tmp = Path(
            tempfile.mkdtemp(
                prefix=f".{self.destination.name}.partial-{self._tag}-",
                dir=self.destination.parent,
            )
        )
        (self.tmp / PROGRAMS_DIR).mkdir()
        self.kept: list[str] = []  # files of the replaced folder taken over by commit()

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    @contextlib.contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        """An OSError while the new artifact is written (a full disk, a file over the largest
        the file system or `ulimit -f` allows) becomes an ArtifactDestinationError naming the
        file, and saying what the user has: the destination as it was (the new artifact is
        written beside it, and that partial folder is deleted here)."""
        try:
            yield
        except OSError as e:
            self.abort()
            hint = {
                errno.EFBIG: " (larger than this file system, or the shell's `ulimit -f`, "
                "lets a file be)",
                errno.ENOSPC: " (the file system is full)",
                errno.EDQUOT: " (this user's disk quota is used up)",
            }.get(e.errno, "")
            raise ArtifactDestinationError(
                f"writing the artifact failed at {e.filename or path}: {e.strerror or e}{hint}. "
                f"Nothing was written to {self.destination}: it is as it was, and the partial "
                "artifact beside it is deleted."
            ) from e

    def write_weights(self, tensors: dict) -> str:
        path = self.tmp / WEIGHTS_FILE
        with self._writing(path):
            try:
                write_safetensors(path, tensors, {"format": "pt"})
            except OSError:
                raise
            except Exception as e:  # e.g. a dtype safetensors has no name for
                raise ArtifactWriteError(f"writing the weights into {self.tmp} failed: {e}") from e
            _fsync_path(path)
        return WEIGHTS_FILE

    def write_program(self, program: Program) -> str:
        rel = f"{PROGRAMS_DIR}/{program.bucket.name}.msgpack"
        with self._writing(self.tmp / rel):
            _fsync_write(self.tmp / rel, msgpack.packb(program.to_dict(), use_bin_type=True))
        return rel

    def write_kernel(self, name: str, data: bytes, suffix: str = "cubin") -> str:
        rel = f"{KERNELS_DIR}/{name}.{suffix}"
        with self._writing(self.tmp / rel):
            (self.tmp / KERNELS_DIR).mkdir(exist_ok=True)
            _fsync_write(self.tmp / rel, data)
        return rel

    def commit(self, manifest: Manifest) -> Path:
        for rel, data in (_INCLUDE.get() or {}).items():
            taken = (self.tmp / rel).exists() or rel in (MANIFEST_FILE, "manifest.sig")
            if "/" in rel or rel.startswith(".") or taken:
                raise ValueError(f"{rel!r} is not a file an artifact may include")
            with self._writing(self.tmp / rel):
                _fsync_write(self.tmp / rel, data)
        paths = {
            str(p.relative_to(self.tmp)): p for p in sorted(self.tmp.rglob("*")) if p.is_file()
        }
        # Both: the whole-file sha256 (every reader checks it, kernl versions from before
        # chunk hashes too) and, for large files, the chunk hashes a reader checks in parallel.
        manifest.files, chunks = file_hashes(paths)
        manifest.extra = {k: v for k, v in manifest.extra.items() if k != FILE_CHUNKS_KEY}
        if chunks:
            manifest.extra[FILE_CHUNKS_KEY] = chunks
        with self._writing(self.tmp / MANIFEST_FILE):
            _fsync_write(self.tmp / MANIFEST_FILE, pack_manifest(manifest.to_dict()))
        self._check_readable()
        key = _SIGN_WITH.get()
        if key is not None:
            from .signing import sign_artifact

            sign_artifact(self.tmp, key)
        with self._writing(self.tmp):
            self._set_permissions()
        dest = self.destination
        if dest.exists():
            self._replace(dest)
        else:
            with self._writing(self.tmp):
                _fsync_path(self.tmp)
            try:
                with signals_held():
                    os.rename(self.tmp, dest)
            except OSError as e:
                # Another compile to the same new destination committed between the check
                # and the rename: its artifact is replaced, as any previous one would be.
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not dest.exists():
                    raise
                self._replace(dest)
        _fsync_path(dest.parent)
        return dest

    def _replace(self, dest: Path) -> None:
        """Swap the new artifact (self.tmp) with the folder at `dest`, then delete that. The
        folder is checked again first (another compile may have put its artifact there since
        the check in __init__); a permission the swap is refused all the same is reported with
        what it takes, and `dest` keeps the previous artifact."""
        try:
            _check_existing(dest)
            check_replaceable(dest)
        except OSError as e:
            raise ArtifactDestinationError(
                f"cannot replace {dest}: {e.strerror} ({e.filename})"
            ) from e
        self.kept = carry_kept_files(dest, self.tmp)
        with self._writing(self.tmp):
            _fsync_path(self.tmp)
        previous = None
        try:
            with signals_held():  # the swap is whole or not done: Ctrl-C waits for it
                previous = swap_into(
                    self.tmp, dest, dest.with_name(f".{dest.name}.previous-{self._tag}")
                )
        except BaseException as e:
            if previous is not None:  # a Ctrl-C held through the swap: the old artifact goes
                remove_left_over(previous, f"the artifact {dest} replaced")
            if not isinstance(e, PermissionError):
                raise
            self.abort()
            try:
                described = _describe(dest, dest.lstat())
            except OSError:
                described = str(dest)
            raise ArtifactDestinationError(
                f"cannot replace the artifact {described}: {e.strerror} ({e.filename}). Moving "
                f"it takes write permission on {dest.parent} and, where that folder is sticky "
                "(mode +t, like /tmp), owning the artifact or the folder. It keeps its previous "
                "artifact; the new one is deleted."
            ) from e
        remove_left_over(previous, f"the artifact {dest} replaced")

    def _check_readable(self) -> None:
        """The reader's own check (`check_artifact`, what load() and `kernl verify` run, short
        of hashing the files just hashed) on what is about to replace the destination: a
        compile that wrote something its reader refuses fails here, with the reader's words,
        and the destination keeps what it held (on 2026-12-04 a new config field made every
        GPU-tuned T5, BART and Whisper artifact one that no load() accepted). Sizes are held
        to the default limits, the ones load() applies (it takes none of its own): an
        artifact over one would be written, then refused by every load()."""
        from .reader import check_artifact

        try:
            check_artifact(self.tmp, hash_files=False)
            return
        except ArtifactError as e:
            over_limit = e
        try:  # only once refused: is it a limit, or a bug?
            check_artifact(self.tmp, limits=_NO_SIZE_LIMITS, hash_files=False)
        except ArtifactError as e:
            raise ArtifactWriteError(
                f"kernl wrote an artifact its own reader refuses, so nothing was committed to "
                f"{self.destination} (a bug in kernl: please report it): "
                f"{type(e).__name__}: {e}"
            ) from e
        raise ArtifactWriteError(
            f"the artifact is over a limit that kernl's reader applies (kernl.runtime.load() "
            f"refuses it), so nothing was committed to {self.destination}: "
            f"{type(over_limit).__name__}: {over_limit}. Compile fewer or smaller buckets."
        ) from over_limit

    def _set_permissions(self) -> None:
        # mkdtemp makes a 0700 folder: an artifact copied into an image and served by
        # another user must be readable, as any file the user's umask allows.
        umask = _umask()
        for p in [self.tmp, *self.tmp.rglob("*")]:
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.tmp.rglob("*") if p.is_file())


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """A safetensors file written one tensor at a time: the header from the shapes, then each
    tensor's bytes, copied to the host alone. safetensors' `save_file` wants every tensor on
    the host, then copies each to bytes: about twice the weights in host memory (32 GB for an
    8B model). Tensors are laid out widest element first, then by name, each right after the
    last; tied ones (one storage under two names) are written twice, as `save_file` needs
    them cloned."""
    import torch

    from .analysis import SAFETENSORS_DTYPES

    names = {torch_name: st for st, torch_name in SAFETENSORS_DTYPES.items()}
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    # widest elements first, as safetensors lays them out: every tensor starts at a multiple
    # of its element size (a memory-mapped reader's views are aligned)
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    for name in order:
        t = tensors[name]
        dtype = names.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"weight {name!r}: safetensors has no dtype for {t.dtype}")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            t = tensors[name].detach().reshape(-1)
            if t.numel():
                f.write(t.to("cpu", copy=False).contiguous().view(torch.uint8).numpy().data)
