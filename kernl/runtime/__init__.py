"""Serve a compiled artifact: `kernl.runtime.load(path)`.

Thin by design: importing this package imports torch, the artifact reader and the
kernels' launch code, never transformers, click or the compiler."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kernl.artifacts import (
    ArtifactCorruptError,
    ArtifactMissingError,
    check_compatibility,
    read_manifest,
    read_weights,
    verify_files,
)
from kernl.artifacts.memory import MemoryPlan
from kernl.artifacts.opened import ArtifactFiles
from kernl.artifacts.reader import check_artifact
from kernl.artifacts.schema import MANIFEST_FILE, WEIGHTS_FILE
from kernl.artifacts.signing import load_trusted_keys, trusted_keys_from_env

from .executor import ProgramRunError
from .model import CompiledModel, ModelOutput

__all__ = ["CompiledModel", "ModelOutput", "ProgramRunError", "load"]


def load(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    capture: str = "load",
    verify: bool = True,
    trusted_keys: Sequence[str | os.PathLike] | None = None,
) -> CompiledModel:
    """Load an artifact and make it ready to serve.

    device: "cuda", "cuda:N" or "cpu". Default: "cuda" when a GPU is present and the artifact
      was compiled for one; "cpu" otherwise (an artifact compiled with `--device cpu` holds no
      kernel binaries, and the runtime compiles nothing: it is refused on a GPU).
    capture: on CUDA, "load" captures every bucket's graph now (the first call is then as fast
      as any), "lazy" captures each bucket on its first call, "never" runs ops eagerly.
    verify: check every file's sha256 before use (on by default; an artifact that fails is
      refused with an `ArtifactError`).
    trusted_keys: Ed25519 public key files (PEM); when given, or when `KERNL_TRUSTED_KEYS`
      names some (os.pathsep-separated), the artifact must be signed by one of them
      (`kernl-compile --sign`), whatever `verify` says, and every file's sha256 is then
      checked even with `verify=False` (the signature covers the manifest, the hashes the
      files it names). Needs `kernl[sign]`.

    Everything `kernl verify` checks is checked here too, by the same code
    (`kernl.artifacts.reader.check_artifact`), including the memory plan against this
    device's free memory (this process's unused cached blocks released first where they
    are what stands in the way), before any weight is read.
    """
    if device is not None:
        device = _as_device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for but torch sees no CUDA GPU")
    # Its buffers are written in place by every call: made as plain tensors, not as
    # inference tensors (which a load under torch.inference_mode() would make, and which a
    # call from outside it, such as a server's worker thread, could then not write).
    keys = load_trusted_keys(trusted_keys or trusted_keys_from_env())
    with torch.inference_mode(False):
        try:
            # The folder and each file opened once: the files hashed are the files read,
            # whatever replaces the folder or a file in it meanwhile (artifacts/opened.py).
            with ArtifactFiles(path) as files:
                return _load(files, device, capture, verify, keys)
        except FileNotFoundError as e:
            # a file of the artifact went missing while being read: the folder was replaced
            # (a compile or optimize(save_to=) writing the same path) or removed
            root = os.path.abspath(path)
            if not e.filename or not os.path.abspath(e.filename).startswith(root + os.sep):
                raise  # another file than the artifact's (a toolkit's, say): as it is
            raise ArtifactMissingError(
                f"{path}: {e.filename or 'a file'} went missing while the artifact was loaded "
                "(replaced or removed meanwhile?); load it again"
            ) from e


def _as_device(device: str | int | torch.device) -> torch.device:
    """ "cuda", "cuda:N", N (a GPU's index, as torch takes it) or "cpu"; anything else is a
    ValueError saying so (torch's own errors named its whole list of device types)."""
    asked = device
    try:
        if isinstance(device, int) and not isinstance(device, bool):
            device = torch.device("cuda", device)  # torch's meaning: the accelerator's index
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        device = None
    cpu_index = device is not None and device.type == "cpu" and device.index not in (None, 0)
    if device is None or device.type not in ("cpu", "cuda") or cpu_index:
        shown = str(asked) if isinstance(asked, torch.device) else asked
        raise ValueError(
            f"device={shown!r}: kernl runs artifacts on 'cuda', 'cuda:N' or 'cpu'"
        ) from None
    return device


def _load(files: ArtifactFiles, device: torch.device | None, capture: str, verify: bool, keys):
    root = files.root
    manifest = read_manifest(files, trusted_keys=keys)
    if device is None:
        on_gpu = torch.cuda.is_available() and manifest.target != "cpu"
        device = torch.device("cuda" if on_gpu else "cpu")
    # Hash the files in the background while the weights are read: threads that hash every
    # file, and the chunks of the large ones (extra.file_chunks), on pools sized from the
    # cores (sha256 alone runs at about 1 GB/s per core). The code (kernel binaries,
    # programs, every file but the weights) is checked before anything of it is loaded or
    # run; the weights, most of the bytes, go on hashing while the graphs are captured (data
    # cannot run, and a tampered file still fails the load): load() returns once every hash
    # has matched.
    code_check = weights_check = None
    if verify or keys:  # a signature is worth what the hashes tie to the manifest
        code = [rel for rel in manifest.files if rel != WEIGHTS_FILE]
        code_check = _Background(verify_files, files, manifest, files=code)
        weights_check = _Background(verify_files, files, manifest, files=[WEIGHTS_FILE])
    if device.type == "cpu" and not torch.cuda.is_available():
        # kernl's kernels run through Triton's interpreter on the CPU; the variable must be
        # set before they are first imported. Not in a process that has a GPU: the variable
        # is the whole process's, and every Triton kernel made after it (the user's own,
        # torch.compile's) would be interpreted. There kernl's ops take their aten path on
        # the CPU (kernl_ops.triton_usable), which computes the same function.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    check_device_compatibility(manifest, device)
    try:
        # The manifest read above, not the file again: what is checked is what is served.
        checked = check_artifact(files, manifest=manifest, hash_files=False)
        _check_fits(checked.memory, root, device)
        programs = checked.programs if manifest.task != "causal-lm" else []
        # The weights are read once the check, the memory plan included, has passed. Reading
        # them on a thread during the check was measured no faster (H200, 2026-12-03: load()
        # 0.915 s against 0.910 s, medians of five fresh processes): the two slow each other
        # down by as much as they overlap. So was cuBLAS's first use of each GEMM shape run on
        # a thread during the check or the read (2026-12-03, BERT-base's 9 buckets, four fresh
        # processes each: load() 0.664 s as here, 0.668 and 0.646 s warmed): the thread
        # outlasted what it overlapped, and it kept a cuBLAS workspace for the process.
        weights = read_weights(files, device=str(device))
        if code_check is not None:
            code_check.result()
        model = _open(files, manifest, programs, weights, device, capture)
    except BaseException:  # Ctrl-C too
        # Both hashes end before the files close (a closed descriptor's number is reused);
        # a mismatch says more precisely what is wrong than the error it caused.
        mismatch = None
        for check in (code_check, weights_check):
            if check is not None:
                try:
                    check.result()
                except Exception as e:  # noqa: BLE001 - raised below
                    mismatch = mismatch or e
        if mismatch is not None:
            raise mismatch from None
        raise
    if weights_check is not None:
        weights_check.result()
    return model


def _open(files: ArtifactFiles, manifest, programs, weights, device: torch.device, capture: str):
    """The loaded model of the artifact's task, its kernel binaries loaded and its graphs
    captured (the code's hashes have matched)."""
    binaries = None
    if manifest.kernels and device.type == "cuda":
        binaries = _load_binaries(files, manifest, device)
    if manifest.task in ("seq2seq-lm", "speech-seq2seq"):
        from .generation import open_seq2seq

        on_kernels = manifest.extra.get("seq2seq", {}).get("decode_kernels") == "kernl"
        if on_kernels and device.type == "cuda" and binaries is None:
            raise ArtifactCorruptError(
                "the artifact's decode step runs kernl's kernels but it holds no kernel "
                "binaries for them (the runtime compiles nothing): recompile it"
            )

        return open_seq2seq(manifest, weights, device, capture=capture, binaries=binaries)
    if manifest.task == "causal-lm":
        from .generation import GenerativeModel

        return GenerativeModel(manifest, weights, device, capture=capture, binaries=binaries)
    return CompiledModel(manifest, programs, weights, device, capture=capture, binaries=binaries)


def _check_fits(plan: MemoryPlan, root: Path, device: torch.device) -> None:
    """Refuse the artifact if its memory plan is over the device's free memory. The blocks
    this process's caching allocator keeps unused (a compile's or an earlier model's, as in a
    notebook's optimize(), which loads right after compiling) are not free to the driver but
    are to this load: where the plan does not fit, they are released and the free memory is
    read again before refusing (the 8B compile left 19 GiB cached above its model)."""
    free = _free_memory(device)
    if free is not None and plan.total > free and _release_cached_blocks(device):
        free = _free_memory(device)
    plan.check(str(root / MANIFEST_FILE), free_bytes=free)


def _release_cached_blocks(device: torch.device) -> bool:
    """Give the allocator's unused cached blocks back to the driver; whether there were any
    (those of live CUDA graphs' pools stay, and the free memory read after tells)."""
    if device.type != "cuda":
        return False
    if torch.cuda.memory_reserved(device) <= torch.cuda.memory_allocated(device):
        return False
    with torch.cuda.device(device):
        torch.cuda.empty_cache()
    return True


def _free_memory(device: torch.device) -> int | None:
    """Free memory of the device the artifact loads on: the memory plan must fit in it."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # the host: what Linux says can be allocated without swapping
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class _Background:
    """`fn(*args, **kwargs)` started on a daemon thread; `result()` waits and returns its value
    or re-raises its error."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any):
        import threading

        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        try:
            self._value = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller in result()
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _load_binaries(files: ArtifactFiles, manifest, device: torch.device):
    """The artifact's kernel binaries, loaded on `device` for this model alone."""
    from .binaries import BinarySpec, KernelBinaries

    binaries = KernelBinaries(device)
    for k in manifest.kernels:
        spec = BinarySpec(
            key=str(k.meta["key"]),
            function=k.function,
            num_warps=int(k.num_warps),
            num_ctas=int(k.meta.get("num_ctas", 1)),
            shared=int(k.shared_mem),
            arg_types=[[str(n), str(t)] for n, t in k.meta["arg_types"]],
        )
        binaries.add(spec, files.read(k.file, "kernel binary"))
    return binaries


def check_device_compatibility(manifest, device: torch.device) -> None:
    """Before anything is loaded, for every artifact (the generative ones too): torch and
    Triton versions and the GPU architecture its kernel binaries were built for; raises
    ArtifactCompatibilityError (`kernl serve` checks it too, before Ray starts)."""
    import importlib.metadata

    capability = None
    if device.type == "cuda" and manifest.target != "cpu":  # a CPU build is refused anyway
        capability = "{}.{}".format(*torch.cuda.get_device_capability(device))
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "0.0"
    check_compatibility(manifest, device.type, capability, torch.__version__, triton_version)
