"""Write an artifact atomically: everything goes into a temporary folder beside the
destination, which is renamed into place only once complete. A crash leaves either no
artifact or the previous complete one."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import msgpack

from .errors import ArtifactError
from .program import Program
from .schema import KERNELS_DIR, MANIFEST_FILE, PROGRAMS_DIR, WEIGHTS_FILE, Manifest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_destination(destination: str | os.PathLike, needed_bytes: int = 0) -> Path:
    """Fail early (before any tracing or tuning) if `destination` cannot receive an artifact:
    an existing non-artifact path, an unwritable parent, or too little free space."""
    dest = Path(destination).expanduser().absolute()
    if dest.exists():
        if not dest.is_dir():
            raise ArtifactError(f"{dest} exists and is not a folder; refusing to replace it")
        if any(dest.iterdir()) and not (dest / MANIFEST_FILE).is_file():
            raise ArtifactError(
                f"{dest} exists, is not empty and is not a kernl artifact; refusing to replace it"
            )
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create the folder {parent}: {e.strerror}") from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write into {parent}: permission denied")
    free = shutil.disk_usage(parent).free
    if needed_bytes and free < needed_bytes:
        raise ArtifactError(
            f"not enough free space in {parent}: the artifact needs about "
            f"{needed_bytes / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free"
        )
    return dest


class ArtifactWriter:
    """Usage: `w = ArtifactWriter(dest)`, `w.write_weights(...)`, `w.write_program(...)`,
    `w.commit(manifest)`; on any exception call `w.abort()` (or use it as a context manager)."""

    def __init__(self, destination: str | os.PathLike):
        self.destination = check_destination(destination)
        self.tmp = Path(
            tempfile.mkdtemp(prefix=f".{self.destination.name}.partial-", dir=self.destination.parent)
        )
        (self.tmp / PROGRAMS_DIR).mkdir()

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def write_weights(self, tensors: dict) -> str:
        from safetensors.torch import save_file

        # safetensors refuses tensors that share storage (tied embeddings): store copies.
        seen: set[int] = set()
        clean = {}
        for name, t in tensors.items():
            t = t.detach().contiguous()
            ptr = t.untyped_storage().data_ptr() if t.numel() else -1
            if ptr in seen:
                t = t.clone()
            seen.add(ptr)
            clean[name] = t.cpu()
        save_file(clean, str(self.tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        return WEIGHTS_FILE

    def write_program(self, program: Program) -> str:
        rel = f"{PROGRAMS_DIR}/{program.bucket.name}.msgpack"
        _fsync_write(self.tmp / rel, msgpack.packb(program.to_dict(), use_bin_type=True))
        return rel

    def write_kernel(self, name: str, data: bytes, suffix: str = "cubin") -> str:
        (self.tmp / KERNELS_DIR).mkdir(exist_ok=True)
        rel = f"{KERNELS_DIR}/{name}.{suffix}"
        _fsync_write(self.tmp / rel, data)
        return rel

    def commit(self, manifest: Manifest) -> Path:
        manifest.files = {
            str(p.relative_to(self.tmp)): sha256_file(p)
            for p in sorted(self.tmp.rglob("*"))
            if p.is_file()
        }
        _fsync_write(
            self.tmp / MANIFEST_FILE, msgpack.packb(manifest.to_dict(), use_bin_type=True)
        )
        dest = self.destination
        backup = None
        if dest.exists():
            backup = dest.with_name(f".{dest.name}.previous-{os.getpid()}")
            os.rename(dest, backup)
        os.rename(self.tmp, dest)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        return dest

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.tmp.rglob("*") if p.is_file())
