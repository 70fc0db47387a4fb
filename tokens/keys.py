"""Ed25519 keys for capability tokens: the issuer's signing key and the verifier's key set.

Keys are identified by ``kid`` so they can rotate: an issuer signs with one key while
verifiers still trust the previous one. A ``kid`` is a short token of ``[A-Za-z0-9_-]``; it is
looked up in an in-memory set and never used to build a path or a URL.

Only Ed25519 is accepted anywhere in this module. A JWKS entry of any other type is refused
outright rather than skipped, so a misconfigured key set fails loudly at load time instead of
quietly at the first token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final, TypeGuard

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tokens.claims import ALGORITHM
from tokens.errors import KeyFormatError

__all__ = [
    "KID_PATTERN",
    "SigningKey",
    "VerificationKeys",
    "b64url_decode",
    "b64url_encode",
    "is_valid_kid",
    "jwk_thumbprint",
]

KID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""What a ``kid`` may look like (matched in full): nothing a path, URL or shell could use."""

_B64URL_SEGMENT: Final = re.compile(r"[A-Za-z0-9_-]*")
_ED25519_PUBLIC_KEY_BYTES: Final = 32


def is_valid_kid(kid: object) -> TypeGuard[str]:
    """Tell whether ``kid`` is a string of 1 to 128 characters from ``[A-Za-z0-9_-]``."""
    return isinstance(kid, str) and KID_PATTERN.fullmatch(kid) is not None


def _check_kid(kid: object) -> str:
    if not is_valid_kid(kid):
        raise KeyFormatError(f"kid must match {KID_PATTERN.pattern}, got {kid!r:.60}")
    return kid


def b64url_encode(data: bytes) -> str:
    """Encode ``data`` as base64url without padding (RFC 7515, section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url strictly: one spelling per byte string.

    Padding, characters outside the base64url alphabet, impossible lengths and non-zero
    trailing bits are all refused, so two different strings never decode to the same bytes
    (no malleable tokens, no ambiguous key material).

    Raises:
        ValueError: ``text`` is not canonical unpadded base64url.
    """
    if _B64URL_SEGMENT.fullmatch(text) is None:
        raise ValueError("not unpadded base64url")
    if len(text) % 4 == 1:
        raise ValueError("impossible base64url length")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data


def _raw_public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )


def jwk_thumbprint(key: Ed25519PublicKey) -> str:
    """Return the RFC 7638 JWK thumbprint of ``key`` (SHA-256, base64url, no padding).

    It is the default ``kid``: derived from the key itself, so it is stable, unique in
    practice and needs no registry.
    """
    members = {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(_raw_public_bytes(key))}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode("ascii")
    return b64url_encode(hashlib.sha256(canonical).digest())


def _public_jwk(key: Ed25519PublicKey, kid: str) -> dict[str, str]:
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64url_encode(_raw_public_bytes(key)),
        "kid": kid,
        "alg": ALGORITHM,
        "use": "sig",
    }


class SigningKey:
    """An Ed25519 private key and the ``kid`` tokens signed with it announce.

    The private key never appears in ``repr`` or ``str``; only :meth:`to_pem` exports it.

    Raises:
        KeyFormatError: ``private_key`` is not an Ed25519 private key or ``kid`` is not a
            valid kid.
    """

    __slots__ = ("_kid", "_private_key")

    def __init__(self, private_key: Ed25519PrivateKey, kid: str) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise KeyFormatError("signing key must be an Ed25519 private key")
        self._private_key: Final = private_key
        self._kid: Final = _check_kid(kid)

    @property
    def kid(self) -> str:
        """The key id put in the header of every token this key signs."""
        return self._kid

    @classmethod
    def generate(cls, kid: str | None = None) -> SigningKey:
        """Create a fresh random key; ``kid`` defaults to the key's RFC 7638 thumbprint.

        Raises:
            KeyFormatError: ``kid`` is given but not a valid kid.
        """
        private_key = Ed25519PrivateKey.generate()
        if kid is None:
            kid = jwk_thumbprint(private_key.public_key())
        return cls(private_key, kid)

    @classmethod
    def from_pem(cls, data: bytes, kid: str) -> SigningKey:
        """Load an unencrypted PKCS#8 PEM Ed25519 private key.

        Raises:
            KeyFormatError: ``data`` is not PEM, is encrypted, or holds any other kind of key;
                or ``kid`` is not a valid kid.
        """
        try:
            private_key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as err:
            # TypeError: the PEM is encrypted (or data is not bytes); never echo the material.
            raise KeyFormatError(f"not an unencrypted PKCS#8 PEM private key ({err})") from None
        if not isinstance(private_key, Ed25519PrivateKey):
            raise KeyFormatError(
                f"expected an Ed25519 private key, got {type(private_key).__name__}"
            )
        return cls(private_key, kid)

    def to_pem(self) -> bytes:
        """Export the private key as unencrypted PKCS#8 PEM.

        Warning:
            The result is the secret itself: write it only to storage readable by the issuer.
        """
        return self._private_key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        )

    def sign(self, message: bytes) -> bytes:
        """Return the raw 64-byte Ed25519 signature of ``message``.

        For signing things other than tokens with the same key (the sidecar signs its audit
        checkpoints), so the private key never has to leave this package.

        Warning:
            Give ``message`` a fixed prefix naming its purpose, so that a signature made for
            one purpose can never be presented as one made for another (a token signature
            covers base64url text, never a prefix of that kind).
        """
        return self._private_key.sign(message)

    def public_key(self) -> Ed25519PublicKey:
        """Return the public half, which verifies what this key signs."""
        return self._private_key.public_key()

    def public_jwk(self) -> dict[str, str]:
        """Return the public key as a JWK (RFC 8037) ready to publish in a JWKS."""
        return _public_jwk(self.public_key(), self._kid)

    def __repr__(self) -> str:
        return f"SigningKey(kid={self._kid!r})"


class VerificationKeys:
    """The Ed25519 public keys a verifier trusts, by ``kid``; immutable once built.

    Raises:
        KeyFormatError: a kid is not a valid kid or a key is not an Ed25519 public key.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        checked: dict[str, Ed25519PublicKey] = {}
        for kid, key in sorted(keys.items()):
            _check_kid(kid)
            if not isinstance(key, Ed25519PublicKey):
                raise KeyFormatError(f"key {kid!r} is not an Ed25519 public key")
            checked[kid] = key
        self._keys: Final = MappingProxyType(checked)

    @classmethod
    def from_signing_keys(cls, keys: Iterable[SigningKey]) -> VerificationKeys:
        """Trust the public halves of ``keys`` (an issuer verifying its own tokens).

        Raises:
            KeyFormatError: two different keys share a kid.
        """
        public: dict[str, Ed25519PublicKey] = {}
        for key in keys:
            known = public.get(key.kid)
            if known is not None and _raw_public_bytes(known) != _raw_public_bytes(
                key.public_key()
            ):
                raise KeyFormatError(f"two different keys share the kid {key.kid!r}")
            public[key.kid] = key.public_key()
        return cls(public)

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any]) -> VerificationKeys:
        """Load a JWKS document (RFC 7517), accepting only Ed25519 public keys with a kid.

        Every entry must be ``kty`` ``OKP`` with ``crv`` ``Ed25519``, a valid ``kid`` and a
        32-byte ``x``; ``alg`` and ``use``, if present, must be ``EdDSA`` and ``sig``. An entry
        carrying private material (``d``) is refused: publishing it was a mistake.

        Raises:
            KeyFormatError: the document or any entry is unacceptable; the message names
                the entry's index (``keys[2]: ...``).
        """
        if not isinstance(jwks, Mapping):
            raise KeyFormatError("JWKS must be a JSON object")
        entries = jwks.get("keys")
        if not isinstance(entries, list):
            raise KeyFormatError("JWKS must have a 'keys' list")
        public: dict[str, Ed25519PublicKey] = {}
        for index, entry in enumerate(entries):
            kid, key = _key_from_jwk(entry, f"keys[{index}]")
            if kid in public:
                raise KeyFormatError(f"keys[{index}]: duplicate kid {kid!r}")
            public[kid] = key
        return cls(public)

    def to_jwks(self) -> dict[str, Any]:
        """Return the JWKS document of these keys, sorted by kid, for publishing."""
        return {"keys": [_public_jwk(key, kid) for kid, key in self._keys.items()]}

    def get(self, kid: str) -> Ed25519PublicKey | None:
        """Return the key for ``kid``, or ``None`` when it is not trusted."""
        return self._keys.get(kid)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def kids(self) -> tuple[str, ...]:
        """Return the trusted kids, sorted."""
        return tuple(self._keys)

    def __repr__(self) -> str:
        return f"VerificationKeys(kids={self.kids()!r})"


def _key_from_jwk(entry: object, where: str) -> tuple[str, Ed25519PublicKey]:
    if not isinstance(entry, Mapping):
        raise KeyFormatError(f"{where}: must be a JSON object")
    if entry.get("kty") != "OKP":
        raise KeyFormatError(f"{where}: kty must be 'OKP', got {entry.get('kty')!r:.40}")
    if entry.get("crv") != "Ed25519":
        raise KeyFormatError(f"{where}: crv must be 'Ed25519', got {entry.get('crv')!r:.40}")
    if "d" in entry:
        raise KeyFormatError(f"{where}: holds private key material ('d'); publish public keys only")
    if "alg" in entry and entry["alg"] != ALGORITHM:
        raise KeyFormatError(f"{where}: alg must be {ALGORITHM!r}, got {entry['alg']!r:.40}")
    if "use" in entry and entry["use"] != "sig":
        raise KeyFormatError(f"{where}: use must be 'sig', got {entry['use']!r:.40}")
    kid = entry.get("kid")
    if not is_valid_kid(kid):
        raise KeyFormatError(f"{where}: kid must match {KID_PATTERN.pattern}, got {kid!r:.60}")
    x = entry.get("x")
    if not isinstance(x, str):
        raise KeyFormatError(f"{where}: x must be a base64url string")
    try:
        raw = b64url_decode(x)
    except ValueError:
        raise KeyFormatError(f"{where}: x is not canonical unpadded base64url") from None
    if len(raw) != _ED25519_PUBLIC_KEY_BYTES:
        raise KeyFormatError(
            f"{where}: x must be {_ED25519_PUBLIC_KEY_BYTES} bytes, got {len(raw)}"
        )
    try:
        key = Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise KeyFormatError(f"{where}: x is not an Ed25519 public key") from None
    return kid, key
