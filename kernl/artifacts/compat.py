"""Can this machine run an artifact? The rules, in one function the runtime calls at load
(`check_compatibility`); those that need no GPU (`check_torch_version`) are `kernl verify`'s
too, so that it never says OK of an artifact that load() here refuses.

- Kernel binaries (cubins) run only on the GPU architecture they were compiled for (the
  compute capability, e.g. 9.0), and only through the launch convention of the Triton
  version that built them (argument layout, scratch pointers): same Triton major.minor.
- Programs are aten op calls with the schemas of the torch that traced them. Schemas are
  stable within a major version, and an overload this torch lacks is refused by the
  vocabulary check at load; a different torch major version is refused here.
- An artifact without binaries (aten ops, or kernl ops on Triton's interpreter) runs on any
  device torch runs on.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

from .errors import ArtifactCompatibilityError
from .schema import Manifest

_VERSION = re.compile(r"^(\d+)\.(\d+)")


def _major_minor(version: str, what: str) -> tuple[int, int]:
    m = _VERSION.match(version or "")
    if not m:
        raise ArtifactCompatibilityError(f"cannot read the {what} version {version!r}")
    return int(m.group(1)), int(m.group(2))


def installed_torch_version() -> str | None:
    """The version of the torch load() would run with: the imported one's, else the installed
    package's (read without importing torch, seconds of a `kernl verify`); None without
    torch."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(getattr(torch, "__version__", None), str):
        return torch.__version__
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_torch_version(manifest: Manifest, torch_version: str | None = None) -> None:
    """The rule of `check_compatibility` that needs no GPU: the artifact's programs call aten
    ops with the schemas of the torch that traced them, stable within a major version. Raises
    ArtifactCompatibilityError for another torch major version, or a version that cannot be
    read. `torch_version`: the torch here (default: `installed_torch_version()`; without
    torch there is nothing to compare, and nothing is raised: load() cannot run at all)."""
    here = installed_torch_version() if torch_version is None else torch_version
    built_torch = _major_minor(manifest.torch_version, "artifact's torch")
    if here is None:
        return
    here_torch = _major_minor(here, "installed torch")
    if built_torch[0] != here_torch[0]:
        raise ArtifactCompatibilityError(
            f"this artifact was built with torch {manifest.torch_version}; this is torch "
            f"{here}, another major version whose aten ops may differ. Recompile with this "
            "torch."
        )


def check_compatibility(
    manifest: Manifest,
    device_type: str,
    capability: str | None,
    torch_version: str,
    triton_version: str,
) -> None:
    """Raise ArtifactCompatibilityError naming what the artifact was built for and what is
    here. `capability` is this GPU's "major.minor" (None without a GPU)."""
    check_torch_version(manifest, torch_version)
    if device_type == "cuda" and manifest.target == "cpu":
        # its kernel ops would go through Triton's JIT there: never at run time
        raise ArtifactCompatibilityError(
            "this artifact was compiled for the CPU (kernl-compile --device cpu): it holds no "
            "kernel binaries, was tuned and validated on no GPU, and the runtime compiles "
            "nothing. Recompile it on this GPU type, or load it with device='cpu'."
        )
    if not manifest.kernels:
        return
    built_for = f"{manifest.gpu_name} (compute capability {manifest.compute_capability})"
    if device_type != "cuda" or capability is None:
        raise ArtifactCompatibilityError(
            f"this artifact holds kernel binaries built for {built_for}; they cannot run on "
            f"{device_type}. Load it on that GPU type, or recompile for {device_type}."
        )
    if capability != manifest.compute_capability:
        raise ArtifactCompatibilityError(
            f"this artifact's kernel binaries were built for {built_for}; this GPU is compute "
            f"capability {capability}. Recompile on this GPU type."
        )
    if _major_minor(manifest.triton_version, "artifact's triton") != _major_minor(
        triton_version, "installed triton"
    ):
        raise ArtifactCompatibilityError(
            f"this artifact's kernel binaries were built with triton {manifest.triton_version}; "
            f"this is triton {triton_version}, whose launch convention may differ. Recompile "
            f"with this triton, or install triton {manifest.triton_version}."
        )
