"""Every way an artifact can be refused. One hierarchy so callers can catch `ArtifactError`."""


class ArtifactError(Exception):
    """An artifact cannot be read or trusted. The message says what is wrong and where."""


class ArtifactMissingError(ArtifactError):
    """A file the artifact needs is not there."""


class ArtifactCorruptError(ArtifactError):
    """A file is truncated, malformed, or does not match its recorded hash."""


class ArtifactVersionError(ArtifactError):
    """The artifact's format version is one this reader does not accept."""


class ArtifactUnsafeError(ArtifactError):
    """The artifact asks for something a reader must never do (paths leaving the folder,
    op names outside the vocabulary, absurd allocations, pickled payloads)."""


class DeviceMemoryError(ArtifactUnsafeError):
    """The artifact's memory plan is over the device's free memory now: nothing is wrong
    with the artifact (a cache keeps it), the device is short of room."""


class ArtifactCompatibilityError(ArtifactError):
    """The artifact was built for another GPU architecture or toolchain than this one."""


class ArtifactDestinationError(ArtifactError):
    """An artifact cannot be written where it was asked for (not writable, no space, or the
    path holds something that is not an artifact)."""


class ArtifactWriteError(ArtifactError):
    """What kernl just wrote fails its own reader's check, so it was not committed: a bug in
    kernl, or an artifact over the limits every load() applies (the message says which)."""
