"""The format-version policy (docs/reliability.md): a reader accepts exactly the integer
versions in SUPPORTED_FORMAT_VERSIONS; anything else, including "1", 1.0 and True, is refused
with ArtifactVersionError naming the version found and those accepted. Within v1 a writer adds
data only under `extra` (manifest) or `meta` (program); an unknown top-level field is refused."""

import pytest
from artifact_edit import copy_artifact, edit_manifest, edit_program, first_program

from kernl.artifacts import (
    FORMAT_VERSION,
    SUPPORTED_FORMAT_VERSIONS,
    ArtifactCorruptError,
    ArtifactVersionError,
    read_manifest,
    verify_artifact,
)


def test_this_kernl_writes_a_version_it_reads(small_artifact):
    assert FORMAT_VERSION in SUPPORTED_FORMAT_VERSIONS
    assert read_manifest(small_artifact).format_version == FORMAT_VERSION == 1


@pytest.mark.parametrize("version", [3, 0, -1, 99, "1", 1.0, True, None, [1]])
def test_other_versions_are_refused_by_name(version, small_artifact, tmp_path):
    root = copy_artifact(small_artifact, tmp_path / "a")
    edit_manifest(root, lambda m: m.__setitem__("format_version", version))
    with pytest.raises(ArtifactVersionError) as info:
        verify_artifact(root)
    assert f"format version {version!r}" in str(info.value)
    assert "reads versions [1, 2]" in str(info.value)


def test_missing_version_is_refused(small_artifact, tmp_path):
    root = copy_artifact(small_artifact, tmp_path / "a")
    edit_manifest(root, lambda m: m.pop("format_version"))
    with pytest.raises(ArtifactVersionError, match="format version None"):
        read_manifest(root)


def test_additions_under_extra_and_meta_are_accepted(small_artifact, tmp_path):
    root = copy_artifact(small_artifact, tmp_path / "a")
    edit_manifest(root, lambda m: m["extra"].__setitem__("added_later", {"x": [1, 2]}))
    edit_program(root, first_program(root), lambda p: p["meta"].__setitem__("added_later", 3))
    assert verify_artifact(root).extra["added_later"] == {"x": [1, 2]}


def test_unknown_top_level_field_is_refused(small_artifact, tmp_path):
    root = copy_artifact(small_artifact, tmp_path / "a")
    edit_manifest(root, lambda m: m.__setitem__("new_field", 1))
    with pytest.raises(ArtifactCorruptError, match="new_field"):
        read_manifest(root)


@pytest.mark.parametrize("version", [3, 0, 11])
def test_a_corrupted_version_is_reported_as_corruption(version, small_artifact, tmp_path):
    """A version changed without the checksum (a flipped byte on disk) is damage, not a newer
    kernl's artifact: "needs a newer kernl" would send the user the wrong way."""
    root = copy_artifact(small_artifact, tmp_path / "a")
    path = root / "manifest.msgpack"
    data = path.read_bytes()
    key = b"\xaeformat_version\x01"  # msgpack: the 14-byte key, then the positive fixint 1
    assert data.count(key) == 1
    path.write_bytes(data.replace(key, key[:-1] + bytes([version])))
    with pytest.raises(ArtifactCorruptError, match=f"format version reads {version}"):
        read_manifest(root)
