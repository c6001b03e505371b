"""`kernl verify` applies load()'s compatibility rules that need no GPU (the torch major
version the programs were traced with, and that it can be read), with the same function: it
said OK of an artifact built with torch 3.0.0, or "nightly", that load() on the same machine
refuses (review). The GPU architecture and the Triton version stay load()'s, on the GPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from artifact_edit import copy_artifact, edit_manifest
from click.testing import CliRunner

import kernl.runtime
from kernl.artifacts import ArtifactCompatibilityError, read_manifest
from kernl.compiler.cli import main

# kernl.cli's runtime-only path, as `pip install kernl` runs it: no click, no transformers.
RUNTIME_ONLY = textwrap.dedent(
    """
    import sys
    sys.modules["click"] = None
    sys.modules["transformers"] = None
    from kernl.cli import main
    main(sys.argv[1:])
    """
)

REFUSED = {
    "torch-3": ("3.0.0", "built with torch 3.0.0; this is torch"),
    "torch-nightly": ("nightly", "cannot read the artifact's torch version 'nightly'"),
}


@pytest.fixture(params=sorted(REFUSED))
def refused(request, small_artifact, tmp_path):
    """An artifact whose files are sound (hashes and checksum redone) that load() refuses
    here for its torch version, and the words it refuses it with."""
    version, words = REFUSED[request.param]
    root = copy_artifact(small_artifact, tmp_path / "a.kernl")
    edit_manifest(root, lambda m: m.update(torch_version=version))
    with pytest.raises(ArtifactCompatibilityError, match=words):
        kernl.runtime.load(root, device="cpu")
    return root, words


def test_the_rule_is_load_s_own(small_artifact):
    from kernl.artifacts.compat import check_torch_version, installed_torch_version

    manifest = read_manifest(small_artifact)
    assert installed_torch_version() == torch.__version__
    check_torch_version(manifest)  # built here
    with pytest.raises(ArtifactCompatibilityError, match="another major version"):
        check_torch_version(manifest, "99.0.0")


def test_kernl_verify_refuses_what_load_refuses(refused):
    root, words = refused
    result = CliRunner().invoke(main, ["verify", str(root)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"INCOMPATIBLE {root}: its files are sound")
    assert words in result.output


def test_kernl_verify_of_the_runtime_only_install_refuses_it_too(refused):
    root, words = refused
    run = subprocess.run(
        [sys.executable, "-c", RUNTIME_ONLY, "verify", str(root)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stderr.startswith(f"INCOMPATIBLE {root}: its files are sound")
    assert words in run.stderr


def test_what_load_accepts_verify_accepts(small_artifact, tmp_path):
    """Another patch or minor torch, a Triton version (only binaries depend on it), a newer
    kernl: load() takes them, and so does verify."""
    root = copy_artifact(small_artifact, tmp_path / "a.kernl")
    major = torch.__version__.split(".")[0]
    edit_manifest(
        root,
        lambda m: m.update(
            torch_version=f"{major}.99.1", triton_version="2.0.0", kernl_version="9.0.0"
        ),
    )
    kernl.runtime.load(root, device="cpu")
    result = CliRunner().invoke(main, ["verify", str(root)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"OK {root}")
