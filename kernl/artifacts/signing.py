"""Trust an artifact by origin: an Ed25519 signature over the manifest's bytes.

Hashes prove that an artifact's files agree with its manifest, not who wrote it: anyone who
can write the folder can recompute them. The manifest holds the sha256 of every other file
(weights, programs, kernel binaries), so a signature over the manifest's exact bytes covers
the whole artifact. The compiler signs with a private key file (`kernl-compile --sign KEY`);
a deployment pins public keys (`load(path, trusted_keys=[...])`, `KERNL_TRUSTED_KEYS`,
`kernl verify --trusted-key`) and then refuses an unsigned artifact, one signed by another
key, and any edit after signing.

The signature lives next to the manifest in `manifest.sig` (msgpack: algorithm, the signing
key's id, the 64 signature bytes); it is not listed in the manifest (it signs it). Keys are
PEM files: PKCS#8 private keys, SubjectPublicKeyInfo public keys (`generate_keypair`, or
`openssl genpkey -algorithm ed25519`).

Needs the `cryptography` package (`pip install 'kernl[sign]'`), imported only when a key is
used: the runtime imports without it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from .errors import ArtifactCorruptError, ArtifactMissingError, ArtifactUnsafeError
from .opened import ArtifactFiles, artifact_files
from .schema import MANIFEST_FILE

SIGNATURE_FILE = "manifest.sig"
ALGORITHM = "ed25519"
# `KERNL_TRUSTED_KEYS`: public key files, separated like PATH (os.pathsep).
TRUSTED_KEYS_ENV = "KERNL_TRUSTED_KEYS"
_MAX_SIGNATURE_BYTES = 4096
_MAX_KEY_BYTES = 64 << 10


class SigningUnavailableError(RuntimeError):
    """Signing or checking a signature was asked for, and `cryptography` is not installed."""


class KeyFileError(ValueError):
    """A key file cannot be read or is not an Ed25519 key of the expected kind."""


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SigningUnavailableError(
            "signing and checking kernl artifacts needs the `cryptography` package: "
            "pip install 'kernl[sign]'"
        ) from None
    return serialization, ed25519


@dataclass(frozen=True)
class PublicKey:
    """A pinned public key; `key_id` is the sha256 of its raw 32 bytes, in hex (first 16)."""

    path: str
    key_id: str
    raw: bytes


def _raw_public(key) -> bytes:
    serialization, _ = _crypto()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def _read_key_file(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_BYTES + 1)
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from None
    if len(data) > _MAX_KEY_BYTES:
        raise KeyFileError(f"{path} is too large to be a key file")
    return data


def load_private_key(path: str | os.PathLike):
    """An Ed25519 private key from a PEM file (unencrypted PKCS#8)."""
    serialization, ed25519 = _crypto()
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path} is a {type(key).__name__}; kernl signs with Ed25519 keys")
    return key


def load_public_key(path: str | os.PathLike) -> PublicKey:
    """An Ed25519 public key from a PEM file."""
    serialization, ed25519 = _crypto()
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path} is not a PEM public key: {e}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{path} is a {type(key).__name__}; kernl checks Ed25519 keys")
    raw = _raw_public(key)
    return PublicKey(str(path), key_id(raw), raw)


def public_key_of(private_key: Any, path: str = "the signing key") -> PublicKey:
    """The public half of a private key from `load_private_key`, as a pinned key."""
    raw = _raw_public(private_key.public_key())
    return PublicKey(path, key_id(raw), raw)


def generate_keypair(private_path: str | os.PathLike, public_path: str | os.PathLike) -> str:
    """Write a new Ed25519 key pair (private key readable by its owner only); returns the
    key id. Refuses to overwrite an existing file."""
    serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    taken = [str(p) for p in (private_path, public_path) if os.path.lexists(p)]
    if taken:  # checked before writing either: never half a new pair beside an old half
        verb = "exist" if len(taken) > 1 else "exists"
        raise FileExistsError(f"{' and '.join(taken)} already {verb}; keygen never overwrites")
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    with open(public_path, "xb") as f:
        f.write(public)
    return public_key_of(key).key_id


def sign_artifact(root: str | os.PathLike, private_key: Any) -> str:
    """Sign the manifest of the artifact at `root` with `private_key` (a key from
    `load_private_key`, or a path to one); writes manifest.sig atomically. Returns the key id."""
    if isinstance(private_key, (str, os.PathLike)):
        private_key = load_private_key(private_key)
    root = Path(root)
    manifest = (root / MANIFEST_FILE).read_bytes()
    kid = public_key_of(private_key).key_id
    payload = msgpack.packb(
        {"algorithm": ALGORITHM, "key_id": kid, "signature": private_key.sign(manifest)},
        use_bin_type=True,
    )
    tmp = root / f".{SIGNATURE_FILE}.tmp"
    tmp.write_bytes(payload)
    os.replace(tmp, root / SIGNATURE_FILE)
    return kid


def trusted_keys_from_env() -> list[str]:
    """The public key files named by KERNL_TRUSTED_KEYS (empty when unset)."""
    value = os.environ.get(TRUSTED_KEYS_ENV, "")
    return [p for p in value.split(os.pathsep) if p.strip()]


def load_trusted_keys(
    paths: Sequence[str | os.PathLike | PublicKey] | str | os.PathLike | PublicKey | None,
) -> list[PublicKey]:
    """The keys of `paths`: key files or loaded keys, a list of them or one (one path is one
    key file, not a list of its characters)."""
    if isinstance(paths, (str, os.PathLike, PublicKey)):
        paths = [paths]
    keys = []
    for p in paths or []:
        keys.append(p if isinstance(p, PublicKey) else load_public_key(p))
    return keys


def check_signature(
    root: str | os.PathLike | ArtifactFiles, manifest_bytes: bytes, keys: list[PublicKey]
) -> str:
    """Refuse the artifact unless `manifest_bytes` carry a valid signature by one of `keys`;
    returns the signing key's id. Raises ArtifactUnsafeError (unsigned, unknown key, bad
    signature) or ArtifactCorruptError (a malformed signature file)."""
    _, ed25519 = _crypto()
    with artifact_files(root) as files:
        root = files.root
        try:
            data = files.read(SIGNATURE_FILE, "signature", _MAX_SIGNATURE_BYTES)
        except ArtifactMissingError:
            raise ArtifactUnsafeError(
                f"{root}: the artifact is not signed ({SIGNATURE_FILE} is missing) and this "
                f"deployment trusts only artifacts signed by {_names(keys)}"
            ) from None
    try:
        sig = msgpack.unpackb(data, raw=False)
        ok = (
            isinstance(sig, dict)
            and sig.get("algorithm") == ALGORITHM
            and isinstance(sig.get("key_id"), str)
            and isinstance(sig.get("signature"), bytes)
            and len(sig["signature"]) == 64
        )
    except Exception:
        ok = False
    if not ok:
        raise ArtifactCorruptError(f"{root / SIGNATURE_FILE}: not a kernl Ed25519 signature")
    for key in keys:
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(key.raw).verify(
                sig["signature"], manifest_bytes
            )
        except Exception:  # InvalidSignature: try the next pinned key
            continue
        return key.key_id
    raise ArtifactUnsafeError(
        f"{root / SIGNATURE_FILE}: the manifest's signature (key {sig['key_id']}) does not "
        f"verify with any trusted key ({_names(keys)}): the artifact was modified after "
        "signing, or signed by a key this deployment does not trust"
    )


def _names(keys: list[PublicKey]) -> str:
    return ", ".join(f"{k.path} ({k.key_id})" for k in keys)


__all__ = [
    "SIGNATURE_FILE",
    "TRUSTED_KEYS_ENV",
    "KeyFileError",
    "PublicKey",
    "SigningUnavailableError",
    "check_signature",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "load_trusted_keys",
    "public_key_of",
    "sign_artifact",
    "trusted_keys_from_env",
]
