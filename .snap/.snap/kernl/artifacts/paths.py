"""Find and read files inside an artifact folder without ever leaving it.

A relative path from the artifact must be plain names joined by '/': no '..', no absolute
path, no backslash. Every component is checked with lstat, so a symbolic link anywhere on
the way (to a file, a folder or a device outside) is refused before anything is opened, and
files are opened with O_NOFOLLOW and must be regular files (a FIFO or device would block or
stream forever)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import ArtifactCorruptError, ArtifactError, ArtifactMissingError, ArtifactUnsafeError
from .schema import is_safe_relative_path

# torch.save / pickle payloads: a reader that sees one says so instead of "bad msgpack".
_PICKLE_PROTOCOLS = {bytes([0x80, p]) for p in range(2, 6)}
_ZIP_MAGIC = b"PK\x03\x04"


def resolve_inside(root: Path, rel: str, what: str) -> Path:
    """The path of `rel` inside `root`, checked component by component; raises an
    ArtifactError naming `what` and `rel` otherwise."""
    if not is_safe_relative_path(rel):
        raise ArtifactUnsafeError(f"{root}: {what} has an unsafe path {rel!r}")
    path = Path(root)
    parts = rel.split("/")
    for i, part in enumerate(parts):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise ArtifactMissingError(f"{root}: {what} {rel!r} is missing") from None
        except OSError as e:
            raise ArtifactMissingError(f"{root}: {what} {rel!r} cannot be read: {e}") from None
        if stat.S_ISLNK(st.st_mode):
            raise ArtifactUnsafeError(
                f"{root}: {what} {rel!r} goes through a symbolic link ({'/'.join(parts[: i + 1])}); "
                "an artifact is plain files and folders"
            )
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            raise ArtifactMissingError(
                f"{root}: {what} {rel!r} is missing (not a folder on the way)"
            )
        if last and not stat.S_ISREG(st.st_mode):
            raise ArtifactUnsafeError(f"{root}: {what} {rel!r} is not a regular file")
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise ArtifactUnsafeError(f"{root}: {what} {rel!r} leaves the artifact folder")
    return path


def read_inside(root: Path, rel: str, what: str, limit: int) -> bytes:
    """The bytes of `rel` inside `root`, at most `limit` of them."""
    path = resolve_inside(root, rel, what)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ArtifactUnsafeError(f"{path}: {what} is a symbolic link") from None
        raise ArtifactMissingError(f"{path}: {what} cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactUnsafeError(f"{path}: {what} is not a regular file")
        if st.st_size > limit:
            raise ArtifactUnsafeError(
                f"{path}: {what} is {st.st_size} bytes, more than the {limit} a reader accepts"
            )
        chunks, left = [], st.st_size + 1  # one more byte: notice a file that grew
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except ArtifactError:
        raise
    except OSError as e:
        raise ArtifactCorruptError(f"{path}: {what} cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise ArtifactUnsafeError(f"{path}: {what} grew past {limit} bytes while being read")
    return data


def refuse_pickle(path: Path, data: bytes, what: str) -> None:
    """kernl never unpickles: name the payload instead of failing on it as garbage."""
    if data[:2] in _PICKLE_PROTOCOLS or data[:4] == _ZIP_MAGIC:
        raise ArtifactUnsafeError(
            f"{path}: {what} holds a pickle or torch.save payload; kernl artifacts are msgpack "
            "and safetensors only and are never unpickled"
        )
