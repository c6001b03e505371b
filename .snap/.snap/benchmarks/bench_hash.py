"""Hashing speed of one large file: one sha256 over the whole file (what verify_files did
before chunk hashes) against the chunk hashes on N threads (what it does now). The read loop
is the writer's own (kernl.artifacts.writer.sha256_range):

    PYTHONPATH=. python benchmarks/bench_hash.py [size_GiB] [folder]

"cold" evicts the file from the page cache first (posix_fadvise DONTNEED), so it measures
the disk too."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from kernl.artifacts.writer import sha256_range


def chunked(path, chunk, threads):
    size = os.path.getsize(path)
    starts = range(0, size, chunk)
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda s: sha256_range(path, s, chunk), starts))


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn, path, cold):
    if cold:
        evict(path)
    else:
        fn()  # warm the cache
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    gib = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    folder = sys.argv[2] if len(sys.argv) > 2 else tempfile.gettempdir()
    size = int(gib * (1 << 30))
    cores = len(os.sched_getaffinity(0))
    print(f"cores {cores}, file {size / 1e9:.2f} GB in {folder}", flush=True)
    block = os.urandom(64 << 20)
    fd, path = tempfile.mkstemp(dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
        for cold in (False, True):
            label = "cold" if cold else "warm"
            s = timed(lambda: sha256_range(path), path, cold)
            print(
                f"{label} single sha256            {s:6.2f} s  {size / s / 1e9:5.2f} GB/s",
                flush=True,
            )
            for chunk in (16 << 20, 64 << 20):
                for n in sorted({1, 2, 4, 8, 16, cores} & set(range(1, max(cores, 8) + 1))):
                    t = timed(lambda n=n, c=chunk: chunked(path, c, n), path, cold)
                    print(
                        f"{label} {chunk >> 20:3d} MiB chunks x{n:2d} thr  {t:6.2f} s  "
                        f"{size / t / 1e9:5.2f} GB/s  x{s / t:4.1f}",
                        flush=True,
                    )
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
