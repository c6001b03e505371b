"""The sha256s of an artifact's files and manifest, which the writer records and the reader
checks (a module of its own so that the reader need not import the writer, which checks what
it writes with the reader)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack

from .opened import pread_into
from .schema import MANIFEST_CHECKSUM_KEY

# Threads that hash at once: sha256 is CPU-bound (hashlib releases the GIL on large updates);
# on the H200 host 16 threads hash a warm 2.4 GB file in 0.2 s (11x one thread); a cold one
# is bound by the disk (about 1.9 GB/s there) whatever the count.
MAX_HASH_THREADS = 16
_READ_BLOCK = 4 << 20


def sha256_range(path: Path, offset: int = 0, length: int | None = None) -> str:
    """sha256 of `length` bytes of `path` from `offset` (to the end when None); fewer bytes
    when the file is shorter (the digest then does not match)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return sha256_fd(fd, offset, length)
    finally:
        os.close(fd)


def sha256_fd(fd: int, offset: int = 0, length: int | None = None) -> str:
    """sha256_range over an open descriptor, read with pread: threads share it (load()
    hashes the descriptor it reads, opened.py)."""
    h = hashlib.sha256()
    buf = bytearray(_READ_BLOCK)
    view = memoryview(buf)
    left = -1 if length is None else length
    while left:
        n = pread_into(fd, view if left < 0 or left >= len(buf) else view[:left], offset)
        if not n:
            break
        h.update(view[:n])
        offset += n
        if left > 0:
            left -= n
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_range(path)


def chunk_count(size: int, chunk_bytes: int) -> int:
    """How many chunk hashes cover a file of `size` bytes exactly."""
    return -(-size // chunk_bytes)


def hash_workers() -> int:
    """Threads for hashing: the cores this process may run on, capped."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_HASH_THREADS))


def run_hash_jobs(jobs: Iterable[Callable[[], Any]], workers: int | None = None) -> list[Any]:
    """Run `jobs` on a thread pool, results in order; the first exception cancels the jobs
    not yet started and is raised."""
    jobs = list(jobs)
    workers = min(workers or hash_workers(), len(jobs))
    if workers <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(workers, thread_name_prefix="kernl-hash") as pool:
        futures: list[Future] = [pool.submit(job) for job in jobs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's msgpack encoding without the checksum itself. msgpack
    round-trips what the writer packs (maps keep their order), so a reader recomputes it."""
    extra = {k: v for k, v in (manifest.get("extra") or {}).items() if k != MANIFEST_CHECKSUM_KEY}
    rest = {**manifest, "extra": extra}
    return hashlib.sha256(msgpack.packb(rest, use_bin_type=True)).hexdigest()
