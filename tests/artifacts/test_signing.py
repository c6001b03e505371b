"""Trust by origin: an artifact signed at compile time loads where its public key is pinned;
an unsigned, re-signed-by-another-key or edited-after-signing artifact is refused by
`verify_artifact`, `kernl verify` and `load()` alike. The runtime imports without the
`cryptography` package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from artifact_edit import SMALL_BERT, copy_artifact, edit_manifest, resign
from click.testing import CliRunner

import kernl.runtime
from kernl.artifacts import ArtifactCorruptError, ArtifactUnsafeError, verify_artifact
from kernl.artifacts.signing import (
    SIGNATURE_FILE,
    TRUSTED_KEYS_ENV,
    KeyFileError,
    generate_keypair,
    sign_artifact,
)
from kernl.compiler.cli import main


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(private key, its public key, another key's public key)."""
    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d / "kernl.key", d / "kernl.key.pub")
    generate_keypair(d / "other.key", d / "other.key.pub")
    return d / "kernl.key", d / "kernl.key.pub", d / "other.key.pub"


@pytest.fixture(scope="module")
def signed(small_artifact, keys, tmp_path_factory) -> Path:
    root = copy_artifact(small_artifact, tmp_path_factory.mktemp("signed") / "bert.kernl")
    sign_artifact(root, keys[0])
    return root


def _refuse_everywhere(root: Path, pub: Path, error: type, what: str) -> None:
    with pytest.raises(error, match=what):
        verify_artifact(root, trusted_keys=[pub])
    with pytest.raises(error, match=what):
        kernl.runtime.load(root, device="cpu", trusted_keys=[pub])
    result = CliRunner().invoke(main, ["verify", str(root), "--trusted-key", str(pub)])
    assert result.exit_code == 1 and "INVALID" in result.output, result.output


def test_a_signed_artifact_loads_where_its_key_is_pinned(signed, keys):
    assert verify_artifact(signed, trusted_keys=[keys[2], keys[1]]).model_type == "bert"
    model = kernl.runtime.load(signed, device="cpu", trusted_keys=[keys[1]])
    assert model(input_ids=torch.tensor([[5, 6]])).last_hidden_state.shape == (1, 2, 64)
    # one key file as a plain path (its characters were taken as key files: "/" a folder)
    kernl.runtime.load(signed, device="cpu", trusted_keys=str(keys[1]))
    result = CliRunner().invoke(main, ["verify", str(signed), "--trusted-key", str(keys[1])])
    assert result.exit_code == 0 and result.output.startswith("OK"), result.output


def test_an_unsigned_artifact_is_refused_when_keys_are_pinned(small_artifact, keys):
    _refuse_everywhere(small_artifact, keys[1], ArtifactUnsafeError, "is not signed")


def test_another_key_is_refused(signed, keys):
    _refuse_everywhere(signed, keys[2], ArtifactUnsafeError, "does not verify with any trusted")


def test_an_artifact_edited_after_signing_is_refused(signed, keys, tmp_path):
    """Hashes and the manifest checksum re-signed, as anyone with write access can: only the
    signature tells."""
    root = copy_artifact(signed, tmp_path / "a")
    edit_manifest(root, lambda m: m["model_config"].__setitem__("vocab_size", 119))
    verify_artifact(root)  # consistent without keys
    _refuse_everywhere(root, keys[1], ArtifactUnsafeError, "modified after signing")


def test_a_weight_swapped_after_signing_is_refused(signed, keys, tmp_path):
    root = copy_artifact(signed, tmp_path / "a")
    data = bytearray((root / "weights.safetensors").read_bytes())
    data[-1] ^= 1
    (root / "weights.safetensors").write_bytes(bytes(data))
    resign(root)  # new hashes: the manifest changes, its signature no longer matches
    _refuse_everywhere(root, keys[1], ArtifactUnsafeError, "modified after signing")


def test_a_file_changed_after_signing_is_refused_without_verify_too(signed, keys, tmp_path):
    """The signature covers the manifest and the manifest the files' hashes: with keys pinned,
    load(verify=False) still hashes the files (a weight changed after signing loaded)."""
    root = copy_artifact(signed, tmp_path / "a")
    data = bytearray((root / "weights.safetensors").read_bytes())
    data[-1] ^= 1
    (root / "weights.safetensors").write_bytes(bytes(data))  # hashes and signature left as signed
    with pytest.raises(ArtifactCorruptError, match="weights.safetensors"):
        kernl.runtime.load(root, device="cpu", trusted_keys=[keys[1]], verify=False)
    kernl.runtime.load(root, device="cpu", verify=False)  # no keys: verify=False skips hashes


def test_a_garbled_signature_file_is_corrupt(signed, keys, tmp_path):
    root = copy_artifact(signed, tmp_path / "a")
    (root / SIGNATURE_FILE).write_bytes(b"\x93\x01\x02\x03")
    _refuse_everywhere(root, keys[1], ArtifactCorruptError, "not a kernl Ed25519 signature")


def test_keys_pinned_by_environment(signed, small_artifact, keys, monkeypatch):
    monkeypatch.setenv(TRUSTED_KEYS_ENV, f"{keys[2]}:{keys[1]}")
    kernl.runtime.load(signed, device="cpu")
    with pytest.raises(ArtifactUnsafeError, match="is not signed"):
        kernl.runtime.load(small_artifact, device="cpu")
    result = CliRunner().invoke(main, ["verify", str(small_artifact)])
    assert result.exit_code == 1 and "is not signed" in result.output, result.output
    # the Python check asks what load() asks (it passed the unsigned artifact)
    verify_artifact(signed)
    with pytest.raises(ArtifactUnsafeError, match="is not signed"):
        verify_artifact(small_artifact)


def test_one_key_file_is_one_key_everywhere(signed, keys):
    """One path, not a list of its characters ("/" read as a key file)."""
    assert verify_artifact(signed, trusted_keys=str(keys[1])).model_type == "bert"
    assert verify_artifact(signed, trusted_keys=keys[1]).model_type == "bert"
    with pytest.raises(ArtifactUnsafeError, match="does not verify with any trusted"):
        verify_artifact(signed, trusted_keys=str(keys[2]))


def test_a_private_key_is_not_a_public_key(signed, keys):
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        verify_artifact(signed, trusted_keys=[keys[0]])


def test_compile_signs_with_sign_key_and_the_cli_keygen(tmp_path):
    import transformers as T

    import kernl.compiler

    runner = CliRunner()
    result = runner.invoke(main, ["keygen", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k").stat().st_mode & 0o077 == 0  # the private key is its owner's
    model = T.BertModel(T.BertConfig(**{**SMALL_BERT, "num_hidden_layers": 1})).eval()
    out = tmp_path / "signed.kernl"
    kernl.compiler.compile(
        model,
        "batch=1 seq=8",
        out,
        dtype="fp32",
        device="cpu",
        kernels=False,
        sign_key=tmp_path / "k",
    )
    assert (out / SIGNATURE_FILE).is_file()
    kernl.runtime.load(out, device="cpu", trusted_keys=[tmp_path / "k.pub"])
    # The signature is written before the artifact replaces the last one: a signature that
    # fails leaves the signed artifact there (it used to leave the new one, unsigned).
    signed_before = (out / SIGNATURE_FILE).read_bytes()
    with mock.patch("kernl.artifacts.signing.sign_artifact", side_effect=OSError("disk")):
        with pytest.raises(OSError, match="disk"):
            kernl.compiler.compile(
                model,
                "batch=2 seq=8",
                out,
                dtype="fp32",
                device="cpu",
                kernels=False,
                sign_key=tmp_path / "k",
            )
    assert (out / SIGNATURE_FILE).read_bytes() == signed_before
    kernl.runtime.load(out, device="cpu", trusted_keys=[tmp_path / "k.pub"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".signed.kernl.")]
    with pytest.raises(KeyFileError):  # a bad key fails before any compiling
        kernl.compiler.compile(model, "batch=1 seq=8", tmp_path / "x", sign_key=tmp_path / "k.pub")
    assert not (tmp_path / "x").exists()


def test_the_runtime_imports_and_loads_without_cryptography(small_artifact, signed, keys):
    """`cryptography` is the `sign` extra: without it the runtime loads unsigned artifacts
    and names the extra when keys are pinned."""
    code = (
        "import sys\n"
        "sys.modules['cryptography'] = None\n"
        "import kernl.runtime\n"
        "from kernl.artifacts.signing import SigningUnavailableError\n"
        "kernl.runtime.load(sys.argv[1], device='cpu')\n"
        "try:\n"
        "    kernl.runtime.load(sys.argv[2], device='cpu', trusted_keys=[sys.argv[3]])\n"
        "except SigningUnavailableError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(small_artifact), str(signed), str(keys[1])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pip install 'kernl[sign]'" in proc.stdout


def test_keygen_never_leaves_half_a_new_pair(tmp_path):
    """With only KEY.pub there, keygen wrote a new private KEY, then failed on KEY.pub: a
    private key that the old public key does not match."""
    (tmp_path / "k.pub").write_text("an old public key")
    with pytest.raises(FileExistsError, match="k.pub already exist"):
        generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    assert not (tmp_path / "k").exists()
    assert (tmp_path / "k.pub").read_text() == "an old public key"
