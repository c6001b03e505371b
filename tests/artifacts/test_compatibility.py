"""Compatibility: binaries run only on the GPU architecture and Triton version that built
them; programs need the torch major version that traced them. Refusals name both sides."""

import dataclasses

import pytest
import torch
from artifact_edit import copy_artifact, edit_manifest

import kernl.runtime
from kernl.artifacts import (
    ArtifactCompatibilityError,
    KernelBinary,
    check_compatibility,
    read_manifest,
)

KERNEL = KernelBinary(
    name="k0",
    file="kernels/k0.cubin",
    function="k0",
    num_warps=4,
    shared_mem=0,
    meta={"key": "k0", "arg_types": [["x", "*fp16"]]},
)


@pytest.fixture
def cuda_manifest(small_artifact):
    m = read_manifest(small_artifact)
    return dataclasses.replace(
        m,
        target="cuda",
        gpu_name="NVIDIA H100",
        compute_capability="9.0",
        torch_version="2.11.0+cu130",
        triton_version="3.6.0",
        kernels=[KERNEL],
    )


def test_same_machine_is_accepted(cuda_manifest):
    check_compatibility(cuda_manifest, "cuda", "9.0", "2.11.0+cu130", "3.6.0")
    check_compatibility(cuda_manifest, "cuda", "9.0", "2.13.1", "3.6.2")  # patch releases


@pytest.mark.parametrize(
    "device, capability, torch_version, triton_version, fragments",
    [
        ("cuda", "8.0", "2.11.0", "3.6.0", ["NVIDIA H100", "compute capability 9.0", "8.0"]),
        ("cpu", None, "2.11.0", "3.6.0", ["NVIDIA H100", "cannot run on cpu"]),
        ("cuda", "9.0", "2.11.0", "3.5.1", ["triton 3.6.0", "triton 3.5.1"]),
        ("cuda", "9.0", "3.0.0", "3.6.0", ["torch 2.11.0+cu130", "torch 3.0.0"]),
    ],
)
def test_mismatch_is_refused_naming_both(
    cuda_manifest, device, capability, torch_version, triton_version, fragments
):
    with pytest.raises(ArtifactCompatibilityError) as info:
        check_compatibility(cuda_manifest, device, capability, torch_version, triton_version)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_artifact_without_binaries_runs_anywhere_with_same_torch_major(cuda_manifest):
    aten_only = dataclasses.replace(cuda_manifest, kernels=[])
    check_compatibility(aten_only, "cpu", None, "2.13.0", "3.1.0")
    with pytest.raises(ArtifactCompatibilityError, match="torch 1.13.0"):
        check_compatibility(
            dataclasses.replace(aten_only, torch_version="1.13.0"), "cpu", None, "2.13.0", "3.6.0"
        )


def test_load_refuses_binaries_for_a_gpu_on_the_cpu(small_artifact, tmp_path):
    root = copy_artifact(small_artifact, tmp_path / "a")
    (root / "kernels").mkdir()
    (root / "kernels" / "k0.cubin").write_bytes(b"\x7fELF not really")

    def edit(m):
        m.update(target="cuda", gpu_name="NVIDIA H100", compute_capability="9.0")
        m["kernels"] = [dataclasses.asdict(KERNEL)]
        m["files"]["kernels/k0.cubin"] = "0" * 64

    edit_manifest(root, edit)
    edit_manifest(root, lambda m: None)  # hash the cubin too
    with pytest.raises(ArtifactCompatibilityError, match=r"NVIDIA H100.*9\.0.*cpu"):
        kernl.runtime.load(root, device="cpu")


def test_load_refuses_another_torch_major(small_artifact, tmp_path):
    root = copy_artifact(small_artifact, tmp_path / "a")
    edit_manifest(root, lambda m: m.__setitem__("torch_version", "1.13.1"))
    with pytest.raises(ArtifactCompatibilityError) as info:
        kernl.runtime.load(root, device="cpu")
    assert "torch 1.13.1" in str(info.value) and f"torch {torch.__version__}" in str(info.value)


def test_a_cpu_build_is_refused_on_a_gpu(small_artifact):
    """Its kernel ops would compile through Triton's JIT there: the runtime compiles nothing."""
    cpu_build = read_manifest(small_artifact)
    assert cpu_build.target == "cpu" and not cpu_build.kernels
    with pytest.raises(ArtifactCompatibilityError, match="compiled for the CPU.*device='cpu'"):
        check_compatibility(cpu_build, "cuda", "9.0", torch.__version__, "3.6.0")
    check_compatibility(cpu_build, "cpu", None, torch.__version__, "3.6.0")


def test_a_cpu_build_loads_on_the_cpu_by_default_where_a_gpu_is(small_artifact, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = kernl.runtime.load(small_artifact)
    assert model.device == torch.device("cpu")
    assert model(input_ids=torch.tensor([[5, 6]])).last_hidden_state.shape == (1, 2, 64)
