"""The sidecar's token-signing keys on disk: ``STATE_DIR/keys/<kid>.pem`` (mode 0600).

One key is active (named in ``STATE_DIR/keys/active``) and signs new tokens; every key on disk
verifies. Key material is never logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tokens import SigningKey, VerificationKeys

_ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The active signing key and every key that still verifies."""

    active: SigningKey
    keys: tuple[SigningKey, ...]

    def verification_keys(self) -> VerificationKeys:
        return VerificationKeys.from_signing_keys(self.keys)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_or_create(state_dir: Path) -> KeyRing:
    """Load the key ring, creating a first key on first use."""
    directory = state_dir / "keys"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = tuple(
        SigningKey.from_pem(path.read_bytes(), kid=path.stem)
        for path in sorted(directory.glob("*.pem"))
    )
    active_file = directory / _ACTIVE
    active_kid = active_file.read_text().strip() if active_file.exists() else ""
    by_kid = {key.kid: key for key in keys}
    if active_kid in by_kid:
        return KeyRing(active=by_kid[active_kid], keys=keys)
    if keys:
        raise FileNotFoundError(
            f"{active_file} does not name one of the keys in {directory}; "
            "restore it or remove the keys directory to start afresh"
        )
    key = SigningKey.generate()
    write_private(directory / f"{key.kid}.pem", key.to_pem())
    write_private(active_file, key.kid.encode())
    return KeyRing(active=key, keys=(key,))


def load_verification_keys(state_dir: Path) -> VerificationKeys:
    """The public halves of every key in ``STATE_DIR/keys``; never creates a key.

    Raises:
        FileNotFoundError: the directory holds no key.
        KeyFormatError: a key file is not an Ed25519 PEM key.
    """
    directory = state_dir / "keys"
    keys = [
        SigningKey.from_pem(path.read_bytes(), kid=path.stem)
        for path in sorted(directory.glob("*.pem"))
    ]
    if not keys:
        raise FileNotFoundError(f"no keys in {directory}")
    return VerificationKeys.from_signing_keys(keys)
