"""The on-disk artifact format: schema, writer, reader, verification. Knows nothing of models."""

from .compat import check_compatibility
from .errors import (
    ArtifactCompatibilityError,
    ArtifactCorruptError,
    ArtifactDestinationError,
    ArtifactError,
    ArtifactMissingError,
    ArtifactUnsafeError,
    ArtifactVersionError,
    ArtifactWriteError,
    DeviceMemoryError,
)
from .limits import DEFAULT_LIMITS, ReadLimits
from .program import Instruction, Program
from .reader import read_manifest, read_program, read_weights, verify_artifact, verify_files
from .schema import (
    FORMAT_VERSION,
    SUPPORTED_FORMAT_VERSIONS,
    Bucket,
    BucketEntry,
    InputSpec,
    KernelBinary,
    Manifest,
    OutputSpec,
)
from .writer import ArtifactWriter, check_destination, pack_manifest

__all__ = [
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "ArtifactCompatibilityError",
    "ArtifactCorruptError",
    "ArtifactDestinationError",
    "ArtifactError",
    "ArtifactMissingError",
    "ArtifactUnsafeError",
    "ArtifactVersionError",
    "ArtifactWriteError",
    "ArtifactWriter",
    "Bucket",
    "BucketEntry",
    "DeviceMemoryError",
    "InputSpec",
    "Instruction",
    "KernelBinary",
    "Manifest",
    "OutputSpec",
    "Program",
    "ReadLimits",
    "check_compatibility",
    "check_destination",
    "pack_manifest",
    "read_manifest",
    "read_program",
    "read_weights",
    "verify_artifact",
    "verify_files",
]
