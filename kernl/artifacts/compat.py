"""Can this machine run an artifact? The rules, in one function the runtime calls at load.

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

import re

from .errors import ArtifactCompatibilityError
from .schema import Manifest

_VERSION = re.compile(r"^(\d+)\.(\d+)")


def _major_minor(version: str, what: str) -> tuple[int, int]:
    m = _VERSION.match(version or "")
    if not m:
        raise ArtifactCompatibilityError(f"cannot read the {what} version {version!r}")
    return int(m.group(1)), int(m.group(2))


def check_compatibility(
    manifest: Manifest,
    device_type: str,
    capability: str | None,
    torch_version: str,
    triton_version: str,
) -> None:
    """Raise ArtifactCompatibilityError naming what the artifact was built for and what is
    here. `capability` is this GPU's "major.minor" (None without a GPU)."""
    built_torch = _major_minor(manifest.torch_version, "artifact's torch")
    here_torch = _major_minor(torch_version, "installed torch")
    if built_torch[0] != here_torch[0]:
        raise ArtifactCompatibilityError(
            f"this artifact was built with torch {manifest.torch_version}; this is torch "
            f"{torch_version}, another major version whose aten ops may differ. Recompile "
            f"with this torch."
        )
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
