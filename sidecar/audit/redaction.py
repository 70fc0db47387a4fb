"""Redaction: arguments the policy marks are kept in the audit log as a keyed hash, never as is.

The hash is an HMAC-SHA256 of the value's canonical JSON under a key of this sidecar's own
(``STATE_DIR/audit-redaction.key``, mode 0600). Equal values give equal hashes, so an
investigator can still see that two calls named the same customer; without the key the hash
cannot be reversed, or guessed by hashing every card number, as a plain hash could.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sidecar import strictjson
from sidecar.keystore import write_private

KEY_FILE = "audit-redaction.key"
REDACTED = "hmac-sha256"
"""The one member of the object that stands in for a redacted value."""
_KEY_BYTES = 32


class Redactor:
    """Replaces named arguments by their HMAC. The key never leaves this object."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < _KEY_BYTES:
            raise ValueError(f"a redaction key needs at least {_KEY_BYTES} bytes")
        self._key = key

    @classmethod
    def load_or_create(cls, state_dir: Path) -> Redactor:
        """The state directory's redaction key, created (0600) on first use."""
        path = state_dir / KEY_FILE
        if not path.exists():
            write_private(path, secrets.token_bytes(_KEY_BYTES))
        return cls(path.read_bytes())

    def fingerprint(self, value: Any) -> str:
        """The keyed hash of one JSON value (hex)."""
        return hmac.new(
            self._key, strictjson.canonical(value).encode("utf-8"), hashlib.sha256
        ).hexdigest()

    def redact(
        self, arguments: Mapping[str, Any], names: Iterable[str]
    ) -> tuple[Mapping[str, Any], tuple[str, ...]]:
        """The arguments with each named one replaced, and the names that were present."""
        present = tuple(name for name in names if name in arguments)
        if not present:
            return arguments, ()
        redacted = dict(arguments)
        for name in present:
            redacted[name] = {REDACTED: self.fingerprint(arguments[name])}
        return redacted, present

    def __repr__(self) -> str:
        return "Redactor(<key>)"
