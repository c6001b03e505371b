"""The on-disk artifact format: schema, writer, reader, verification. Knows nothing of models."""

from .errors import (
    ArtifactCompatibilityError,
    ArtifactCorruptError,
    ArtifactError,
    ArtifactMissingError,
    ArtifactUnsafeError,
    ArtifactVersionError,
)
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
from .writer import ArtifactWriter, check_destination

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "ArtifactCompatibilityError",
    "ArtifactCorruptError",
    "ArtifactError",
    "ArtifactMissingError",
    "ArtifactUnsafeError",
    "ArtifactVersionError",
    "ArtifactWriter",
    "Bucket",
    "BucketEntry",
    "InputSpec",
    "Instruction",
    "KernelBinary",
    "Manifest",
    "OutputSpec",
    "Program",
    "check_destination",
    "read_manifest",
    "read_program",
    "read_weights",
    "verify_artifact",
    "verify_files",
]
