"""The sidecar's token-signing keys on disk: ``STATE_DIR/keys/<kid>.pem`` (mode 0600).

One key is active (named in ``STATE_DIR/keys/active``) and signs new tokens. Rotation makes a
new key active and records when the old one stopped signing (``keys/retired.json``); a
retired key keeps verifying for ``retention`` seconds after that (the longest token lifetime
the policy allows, plus the largest leeway), so every token it signed expires before it stops
being trusted. A key with no retirement recorded is trusted. Key material is never logged.

A running server picks up a rotation without a restart: :class:`KeyStore` looks at the
directory at most once a second on the verification path, at once when a token names a kid
it does not know, and before every token it signs, and re-reads the keys when they changed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from tokens import SigningKey, VerificationKeys

log = logging.getLogger("proviso.keys")

_ACTIVE = "active"
_RETIRED = "retired.json"
REFRESH_INTERVAL_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The active signing key and every key that still verifies.

    ``retired_at`` says when each former active key stopped signing (Unix seconds).
    """

    active: SigningKey
    keys: tuple[SigningKey, ...]
    retired_at: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def verification_keys(self) -> VerificationKeys:
        return VerificationKeys.from_signing_keys(self.keys)


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """One key on disk, for ``proviso keys list``: ``trusted_until`` is None while unlimited."""

    kid: str
    active: bool
    retired_at: float | None
    trusted_until: float | None

    def trusted(self, now: float) -> bool:
        return self.trusted_until is None or now < self.trusted_until


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


def has_key_ring(state_dir: Path) -> bool:
    """Whether ``state_dir`` already holds a key ring (``load_or_create`` would not make one)."""
    return (state_dir / "keys" / _ACTIVE).is_file()


def _directory(state_dir: Path) -> Path:
    directory = state_dir / "keys"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


def _read_retired(directory: Path) -> dict[str, float]:
    path = directory / _RETIRED
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in data.values()
    ):
        raise ValueError(f"{path} must map each kid to the time it stopped signing")
    return {str(k): float(v) for k, v in data.items()}


def _load_keys(directory: Path) -> tuple[SigningKey, ...]:
    return tuple(
        SigningKey.from_pem(path.read_bytes(), kid=path.stem)
        for path in sorted(directory.glob("*.pem"))
    )


def _active_kid(directory: Path) -> str:
    active_file = directory / _ACTIVE
    return active_file.read_text().strip() if active_file.exists() else ""


def key_statuses(state_dir: Path, retention_seconds: float) -> tuple[KeyStatus, ...]:
    """Every key on disk, the active one first, with until when it is trusted.

    Only reads: with no key directory there are no keys, and nothing is created.
    """
    directory = state_dir / "keys"
    active = _active_kid(directory)
    retired = _read_retired(directory)
    statuses = []
    for key in _load_keys(directory):
        retired_at = None if key.kid == active else retired.get(key.kid)
        until = None if retired_at is None else retired_at + retention_seconds
        statuses.append(KeyStatus(key.kid, key.kid == active, retired_at, until))
    return tuple(sorted(statuses, key=lambda s: (not s.active, -(s.retired_at or 0), s.kid)))


def load_or_create(
    state_dir: Path,
    *,
    now: float | None = None,
    retention_seconds: float | None = None,
    create: bool = True,
) -> KeyRing:
    """Load the key ring, creating a first key on first use (unless ``create`` is False).

    With ``now`` and ``retention_seconds``, keys retired more than ``retention_seconds``
    before ``now`` are left out: every token they signed has expired.

    Raises:
        FileNotFoundError: ``create`` is False and there is no key ring (or no directory).
    """
    directory = _directory(state_dir) if create else state_dir / "keys"
    keys = _load_keys(directory)
    active_kid = _active_kid(directory)
    retired = _read_retired(directory)
    by_kid = {key.kid: key for key in keys}
    if active_kid in by_kid:
        if now is not None and retention_seconds is not None:
            keys = tuple(
                key
                for key in keys
                if key.kid == active_kid
                or key.kid not in retired
                or now < retired[key.kid] + retention_seconds
            )
        shown = {kid: at for kid, at in retired.items() if kid in by_kid and kid != active_kid}
        return KeyRing(by_kid[active_kid], keys, MappingProxyType(shown))
    if keys:
        raise FileNotFoundError(
            f"{directory / _ACTIVE} does not name one of the keys in {directory}; "
            "restore it or remove the keys directory to start afresh"
        )
    if not create:
        raise FileNotFoundError(f"no key ring in {directory}")
    key = SigningKey.generate()
    write_private(directory / f"{key.kid}.pem", key.to_pem())
    write_private(directory / _ACTIVE, key.kid.encode())
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


def rotate(state_dir: Path, now: float, retention_seconds: float) -> tuple[KeyRing, list[str]]:
    """Make a new key active; the old one verifies for ``retention_seconds`` more.

    Keys retired longer ago than ``retention_seconds`` are deleted, since nothing they signed
    can still be valid. Returns the new ring and the kids deleted.
    """
    ring = load_or_create(state_dir)
    directory = _directory(state_dir)
    retired = _read_retired(directory)
    retired[ring.active.kid] = now
    removed = []
    for kid, at in sorted(retired.items()):
        if now >= at + retention_seconds and kid != ring.active.kid:
            (directory / f"{kid}.pem").unlink(missing_ok=True)
            removed.append(kid)
    for kid in removed:
        del retired[kid]
    key = SigningKey.generate()
    write_private(directory / f"{key.kid}.pem", key.to_pem())
    write_private(directory / _RETIRED, json.dumps(retired, sort_keys=True).encode())
    write_private(directory / _ACTIVE, key.kid.encode())  # last: the switch itself
    return load_or_create(state_dir, now=now, retention_seconds=retention_seconds), removed


class KeyStore:
    """The key ring a running server uses, re-read when the files on disk change.

    Thread-safe for readers (the HTTP thread serves the JWKS): a reload swaps the ring whole.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        retention_seconds: Callable[[], float],
        clock: Callable[[], float] = time.time,
        refresh_interval: float = REFRESH_INTERVAL_SECONDS,
    ) -> None:
        self._state_dir = state_dir
        self._retention = retention_seconds
        self._clock = clock
        self._interval = refresh_interval
        self._checked = time.monotonic()
        # The HTTP thread (JWKS) and the event loop both refresh: one reload at a time.
        self._reloading = threading.Lock()
        load_or_create(state_dir)  # a first key on first use
        self._signature = self._stat()
        self._load()

    def _stat(self) -> tuple[int, ...]:
        directory = self._state_dir / "keys"
        parts: list[int] = []
        for path in (directory, directory / _ACTIVE, directory / _RETIRED):
            try:
                info = path.stat()
            except OSError:  # gone, or ``keys`` is no directory: a change; ``_load`` says what
                parts += [0, 0]
            else:
                parts += [info.st_mtime_ns, info.st_ino]
        return tuple(parts)

    _ring: KeyRing
    _verification: VerificationKeys
    _next_expiry: float

    def _load(self) -> None:
        now, retention = self._clock(), self._retention()
        # Never a new key here: a ring gone from under a running server (a restore, a bad
        # deploy) is a broken directory (the last good ring stays), not a first start; a key
        # made now would disown every token issued and sign checkpoints no backup can verify.
        ring = load_or_create(self._state_dir, now=now, retention_seconds=retention, create=False)
        self._ring = ring
        self._verification = ring.verification_keys()
        deadlines = [at + retention for kid, at in ring.retired_at.items() if now < at + retention]
        self._next_expiry = min(deadlines, default=float("inf"))

    @property
    def ring(self) -> KeyRing:
        return self._ring

    @property
    def active(self) -> SigningKey:
        """The active key as last loaded (see :meth:`signing_key` to sign)."""
        return self._ring.active

    def signing_key(self) -> SigningKey:
        """The active key, after checking the disk: a rotation takes effect for the next token."""
        self.refresh(force=True)
        return self._ring.active

    def verification_keys(self) -> VerificationKeys:
        """Every key trusted now (the active one and recently retired ones)."""
        return self._verification

    def refresh(self, *, force: bool = False) -> bool:
        """Re-read the keys if their files changed or a retired key's trust ended.

        Without ``force`` this looks at the disk at most once per ``refresh_interval``; with
        it, at once. Looking is three ``stat`` calls; key files are read only when those show
        a change (or a retired key's trust has ended), so even a flood of tokens naming
        unknown kids costs little. Returns whether the set of trusted keys changed.
        """
        started = time.monotonic()
        if not force and started - self._checked < self._interval:
            return False
        with self._reloading:
            return self._reload(started)

    def _reload(self, started: float) -> bool:
        self._checked = started
        signature = self._stat()
        if signature == self._signature and self._clock() < self._next_expiry:
            return False
        self._signature = signature
        before = self._verification.kids()
        try:
            self._load()
        except (OSError, ValueError) as exc:  # KeyFormatError and bad JSON are ValueErrors
            # A half-edited key directory must not take the server down: keep the last good
            # ring (which still signs and verifies) and say so loudly.
            log.error("cannot reload the signing keys; keeping the previous ones: %s", exc)
            return False
        return self._verification.kids() != before
