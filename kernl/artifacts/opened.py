"""An artifact's files opened once, for every read and every hash of one load or check.

A load hashes each file on threads while it parses the programs and streams the weights; by
path, the hash and the read could open two different files: a compile writing the same path
exchanges the whole folder meanwhile (a manifest of one artifact was loaded with the weights
of the other, a 30-row table under range checks made for 120 rows), and a writer of the
folder could swap a file in between (a signed artifact served weights it never signed). Here
the folder is opened once and each file once, relative to it (openat, no symbolic link
followed), and every hash and read goes through that one descriptor (pread, no shared
position): what was hashed is the file that is read. A folder exchanged or removed meanwhile
is read as it was when opened, or said to be gone. Bytes rewritten in place within a file
(its own inode, which needs write access to the file, not the folder; no kernl writer does
it) are not covered.

A relative path from the artifact must be plain names joined by '/': no '..', no absolute
path, no backslash; a symbolic link anywhere on the way is refused, and a file must be a
regular file (a FIFO or device would block or stream forever)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import ArtifactCorruptError, ArtifactMissingError, ArtifactUnsafeError
from .schema import is_safe_relative_path


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read into `view` from `offset` of `fd` without its shared position (threads read one
    descriptor at once); the bytes read. preadv where the platform has it (Linux), else
    pread and a copy (macOS's Python may have no preadv)."""
    if _PREADV is not None:
        return _PREADV(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


_PREADV = getattr(os, "preadv", None)
# torch.save / pickle payloads: a reader that sees one says so instead of "bad msgpack".
_PICKLE_PROTOCOLS = {bytes([0x80, p]) for p in range(2, 6)}
_ZIP_MAGIC = b"PK\x03\x04"
_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)


class ArtifactFiles:
    """The folder at `root`, opened now; its files opened on first use and kept open until
    `close()` (a context manager). Thread-safe. Messages name `root`, the caller's path."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()  # as kernl-compile's -o takes `~/bert.kernl`
        try:
            self._dir = os.open(self.root, _DIR_FLAGS)  # the caller's own path may be a link
        except FileNotFoundError:
            raise ArtifactMissingError(f"{self.root}: no such file or folder") from None
        except NotADirectoryError:
            raise ArtifactMissingError(
                f"{self.root}: not a folder (an artifact is a folder)"
            ) from None
        except OSError as e:
            raise ArtifactMissingError(f"{self.root}: cannot be opened: {e.strerror}") from None
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> ArtifactFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close every descriptor. Only once no thread reads or hashes through them: a
        descriptor's number is reused by the next open of the process."""
        with self._lock:
            for fd in [*self._fds.values(), self._dir]:
                if fd >= 0:
                    os.close(fd)
            self._fds.clear()
            self._dir = -1

    def path(self, rel: str) -> Path:
        """`rel`'s path for messages (never opened by it)."""
        return self.root / rel

    def fd(self, rel: str, what: str) -> int:
        """The descriptor of the regular file `rel`, opened once: component by component
        from the folder, refusing unsafe names, symbolic links and anything not a file."""
        with self._lock:
            fd = self._fds.get(rel)
            if fd is None:
                fd = self._fds[rel] = self._open(rel, what)
            return fd

    def size(self, rel: str, what: str) -> int:
        return os.fstat(self.fd(rel, what)).st_size

    def pread(self, rel: str, what: str, offset: int, length: int) -> bytes:
        """Up to `length` bytes of `rel` from `offset` (fewer at its end)."""
        fd, chunks = self.fd(rel, what), []
        try:
            while length > 0:
                chunk = os.pread(fd, min(length, 1 << 24), offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
                length -= len(chunk)
        except OSError as e:
            raise ArtifactCorruptError(
                f"{self.path(rel)}: {what} cannot be read: {e.strerror}"
            ) from None
        return b"".join(chunks)

    def read(self, rel: str, what: str, limit: int | None = None) -> bytes:
        """The whole of `rel`, refused when over `limit` bytes (also when it grows past it
        while being read)."""
        size = self.size(rel, what)
        if limit is not None and size > limit:
            raise ArtifactUnsafeError(
                f"{self.path(rel)}: {what} is {size} bytes, more than the {limit} a reader accepts"
            )
        data = self.pread(rel, what, 0, size + 1)  # one more byte: notice a file that grew
        if limit is not None and len(data) > limit:
            raise ArtifactUnsafeError(
                f"{self.path(rel)}: {what} grew past {limit} bytes while being read"
            )
        return data

    def _open(self, rel: str, what: str) -> int:
        root = self.root
        if self._dir < 0:
            raise ValueError(f"{root}: the artifact's files are closed")
        if not is_safe_relative_path(rel):
            raise ArtifactUnsafeError(f"{root}: {what} has an unsafe path {rel!r}")
        parts = rel.split("/")
        at, opened = self._dir, []
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                try:
                    st = os.stat(part, dir_fd=at, follow_symlinks=False)
                except FileNotFoundError:
                    raise ArtifactMissingError(self._missing(rel, what)) from None
                except OSError as e:
                    raise ArtifactMissingError(
                        f"{root}: {what} {rel!r} cannot be read: {e.strerror}"
                    ) from None
                if stat.S_ISLNK(st.st_mode):
                    raise ArtifactUnsafeError(
                        f"{root}: {what} {rel!r} goes through a symbolic link "
                        f"({'/'.join(parts[: i + 1])}); an artifact is plain files and folders "
                        "(a copy made with `cp -rL` holds the files themselves)"
                    )
                if not last and not stat.S_ISDIR(st.st_mode):
                    raise ArtifactMissingError(
                        f"{root}: {what} {rel!r} is missing (not a folder on the way)"
                    )
                if last and not stat.S_ISREG(st.st_mode):
                    raise ArtifactUnsafeError(f"{root}: {what} {rel!r} is not a regular file")
                try:
                    fd = os.open(part, _FILE_FLAGS if last else _DIR_FLAGS | os.O_NOFOLLOW,
                                 dir_fd=at)  # fmt: skip
                except FileNotFoundError:
                    raise ArtifactMissingError(self._missing(rel, what)) from None
                except OSError as e:
                    if e.errno == errno.ELOOP:  # a link put there since the stat
                        raise ArtifactUnsafeError(
                            f"{root}: {what} {rel!r} is a symbolic link"
                        ) from None
                    raise ArtifactMissingError(
                        f"{root}: {what} {rel!r} cannot be opened: {e.strerror}"
                    ) from None
                opened.append(fd)
                at = fd
            if not stat.S_ISREG(os.fstat(at).st_mode):  # replaced since the stat
                raise ArtifactUnsafeError(f"{root}: {what} {rel!r} is not a regular file")
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        for fd in opened[:-1]:  # the folders on the way
            os.close(fd)
        return opened[-1]

    def _missing(self, rel: str, what: str) -> str:
        if os.fstat(self._dir).st_nlink == 0:  # the folder itself was removed
            return (
                f"{self.root}: the artifact was replaced or removed while it was read "
                f"({what} {rel!r} went with it); load it again"
            )
        return f"{self.root}: {what} {rel!r} is missing"


@contextlib.contextmanager
def artifact_files(root: str | os.PathLike | ArtifactFiles) -> Iterator[ArtifactFiles]:
    """`root` itself where it is already opened (one load's reads and hashes share it), else
    the folder opened for the block."""
    if isinstance(root, ArtifactFiles):
        yield root
        return
    with ArtifactFiles(root) as files:
        yield files


def refuse_pickle(path: Path, data: bytes, what: str) -> None:
    """kernl never unpickles: name the payload instead of failing on it as garbage."""
    # a pickle's third byte is an opcode (protocol 4's FRAME, protocol 2's first one), never
    # 0: a safetensors header length of 640 (80 02 00 ...) cut short is not named a pickle
    if (data[:2] in _PICKLE_PROTOCOLS and data[2:3] not in (b"", b"\0")) or data[:4] == _ZIP_MAGIC:
        raise ArtifactUnsafeError(
            f"{path}: {what} holds a pickle or torch.save payload; kernl artifacts are msgpack "
            "and safetensors only and are never unpickled"
        )
