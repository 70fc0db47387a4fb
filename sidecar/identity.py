"""Caller identities: bearer JWTs from the company IdP, verified against its JWKS.

Issuers (orchestrators), approvers and admins prove who they are with a JWT in the
``authorization`` metadata, verified against the IdP's JWKS: a file, or an https URL as Okta,
Entra ID and Auth0 publish it (fetched with a timeout, cached, re-fetched when stale or when a
token names a kid not in it, at most every 30 s). In dev mode, a dev IdP whose key lives in
the state directory mints those JWTs for the subjects of the policy's ``dev_directory``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import secrets
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from jwt.exceptions import InvalidTokenError, PyJWKError, PyJWKSetError

from sidecar.errors import UnauthenticatedError
from sidecar.keystore import write_private
from tokens import TOKEN_TYPE, SigningKey

log = logging.getLogger("proviso.identity")

DEV_IDP_ISSUER = "proviso-dev-idp"
IDENTITY_ALGORITHMS = ("EdDSA", "ES256", "RS256")
MAX_IDENTITY_TOKEN_BYTES = 16 * 1024
_BEARER_RE = re.compile(r"Bearer ([A-Za-z0-9_\-.]+)")


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller."""

    subject: str
    groups: tuple[str, ...]
    issuer: str
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False)


def bearer_token(metadata: Mapping[str, str]) -> str:
    """The JWT of an ``authorization: Bearer ...`` header.

    Raises:
        UnauthenticatedError: no such header, or not a bearer token.
    """
    header = metadata.get("authorization", "")
    if not header:
        raise UnauthenticatedError("no credentials: send 'authorization: Bearer <JWT>'")
    match = _BEARER_RE.fullmatch(header)
    if not match:
        raise UnauthenticatedError("the authorization header is not 'Bearer <JWT>'")
    return match.group(1)


def _parse_jwks(jwks: Mapping[str, Any]) -> dict[str, jwt.PyJWK]:
    """The keys of a JWKS by kid (keys without a kid can never be selected).

    Raises:
        ValueError: the document is not a usable JWKS.
    """
    try:
        key_set = jwt.PyJWKSet.from_dict(dict(jwks))
    except (PyJWKError, PyJWKSetError) as exc:
        raise ValueError(f"unusable JWKS: {exc}") from None
    return {k.key_id: k for k in key_set.keys if k.key_id}


class JwksSource(Protocol):
    """Where an IdentityVerifier gets the IdP's keys."""

    def keys(self) -> Mapping[str, jwt.PyJWK]:
        """The keys by kid, as last known."""
        ...

    def refresh(self) -> bool:
        """Look again (if allowed now); whether the keys changed."""
        ...


class StaticJwks:
    """A JWKS given once (a file read at start, or a test's document)."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self._keys = _parse_jwks(jwks)

    def keys(self) -> Mapping[str, jwt.PyJWK]:
        return self._keys

    def refresh(self) -> bool:
        return False


MAX_JWKS_BYTES = 1024 * 1024


def is_loopback_url(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RemoteJwks:
    """The IdP's JWKS from an https URL: fetched with a timeout, cached, re-fetched when older
    than ``max_age`` or when a token names an unknown kid, never more often than
    ``min_interval``. A failed fetch keeps the last good keys (and logs).

    Plain http is refused except on loopback (for tests and local IdPs). ``ca_file`` names a
    PEM bundle of CAs to trust instead of the system's (a private IdP's CA).
    """

    def __init__(
        self,
        url: str,
        *,
        ca_file: Path | None = None,
        timeout_seconds: float = 5.0,
        max_age_seconds: float = 300.0,
        min_interval_seconds: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme != "https" and not (scheme == "http" and is_loopback_url(url)):
            raise ValueError(f"the IdP JWKS URL must be https (http only on loopback): {url}")
        self.url = url
        self._context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._timeout = timeout_seconds
        self._max_age = max_age_seconds
        self._min_interval = min_interval_seconds
        self._monotonic = monotonic
        self._keys: Mapping[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._tried_at: float | None = None
        self._lock = threading.Lock()

    def _fetch(self) -> dict[str, jwt.PyJWK]:
        request = urllib.request.Request(  # noqa: S310 - scheme checked in __init__
            self.url, headers={"Accept": "application/json"}
        )
        with urllib.request.urlopen(  # noqa: S310 - scheme checked in __init__
            request, timeout=self._timeout, context=self._context
        ) as response:
            body = response.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError("the JWKS document is larger than 1 MiB")
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError("the JWKS document is not a JSON object")
        return _parse_jwks(document)

    def refresh(self) -> bool:
        with self._lock:
            now = self._monotonic()
            if self._tried_at is not None and now - self._tried_at < self._min_interval:
                return False
            self._tried_at = now
            try:
                keys = self._fetch()
            except (OSError, ValueError) as exc:
                log.error("cannot fetch the IdP JWKS", extra={"url": self.url, "error": str(exc)})
                return False
            changed = set(keys) != set(self._keys)
            self._keys, self._fetched_at = keys, now
            return changed

    def keys(self) -> Mapping[str, jwt.PyJWK]:
        if self._fetched_at is None or self._monotonic() - self._fetched_at >= self._max_age:
            self.refresh()
        return self._keys


class IdentityVerifier:
    """Verifies IdP-issued JWTs: pinned algorithms, known kid, iss, aud, exp/nbf, sub."""

    def __init__(
        self,
        jwks: Mapping[str, Any] | JwksSource,
        *,
        issuer: str,
        audience: str,
        groups_claim: str = "groups",
        leeway_seconds: int = 5,
    ) -> None:
        self.source = StaticJwks(jwks) if isinstance(jwks, Mapping) else jwks
        self._issuer = issuer
        self._audience = audience
        self._groups_claim = groups_claim
        self._leeway = leeway_seconds
        self._jws = jwt.PyJWS(options={"verify_signature": True})

    @property
    def leeway_seconds(self) -> int:
        """How long after its ``exp`` a token is still accepted (clock skew)."""
        return self._leeway

    def verify(self, token: str, now: float) -> Identity:
        """The identity a JWT proves.

        Raises:
            UnauthenticatedError: with a reason safe to return to the caller.
        """
        if len(token) > MAX_IDENTITY_TOKEN_BYTES:
            raise UnauthenticatedError("identity token too large")
        try:
            header = jwt.get_unverified_header(token)
        except InvalidTokenError:
            raise UnauthenticatedError("identity token is malformed") from None
        if str(header.get("typ", "")).lower() == TOKEN_TYPE:
            # A capability token names an agent, not a person: never a caller's identity, even
            # with an IdP configured on the sidecar's own keys and issuer.
            raise UnauthenticatedError("a capability token is not an identity token")
        algorithm = header.get("alg")
        if algorithm not in IDENTITY_ALGORITHMS:
            raise UnauthenticatedError("identity token algorithm not accepted")
        kid = str(header.get("kid", ""))
        key = self.source.keys().get(kid)
        if key is None and self.source.refresh():
            key = self.source.keys().get(kid)
        if key is None:
            raise UnauthenticatedError("identity token signed by an unknown key")
        if key.algorithm_name != algorithm:
            raise UnauthenticatedError("identity token algorithm does not match its key")
        try:
            payload = self._jws.decode(token, key.key, algorithms=[algorithm])
            claims = json.loads(payload)
        except (InvalidTokenError, ValueError):
            raise UnauthenticatedError("identity token signature does not verify") from None
        return self._check_claims(claims, now)

    def _check_claims(self, claims: Any, now: float) -> Identity:
        if not isinstance(claims, dict):
            raise UnauthenticatedError("identity token claims are not an object")
        subject, exp = claims.get("sub"), claims.get("exp")
        if not isinstance(subject, str) or not subject:
            raise UnauthenticatedError("identity token has no subject")
        if claims.get("iss") != self._issuer:
            raise UnauthenticatedError("identity token from an untrusted issuer")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if self._audience not in audiences:
            raise UnauthenticatedError("identity token is not for this sidecar")
        if not isinstance(exp, int) or isinstance(exp, bool) or exp <= now - self._leeway:
            raise UnauthenticatedError("identity token expired or without exp")
        nbf = claims.get("nbf", 0)
        if not isinstance(nbf, int) or nbf > now + self._leeway:
            raise UnauthenticatedError("identity token not yet valid")
        groups = claims.get(self._groups_claim, [])
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise UnauthenticatedError(f"identity token claim '{self._groups_claim}' is not a list")
        return Identity(subject=subject, groups=tuple(groups), issuer=self._issuer, claims=claims)


def dev_idp_key_path(state_dir: Path) -> Path:
    """Where the dev IdP's private key lives in a state directory."""
    return state_dir / "dev-idp" / "signing-key.pem"


class DevIdentityProvider:
    """A local IdP for dev mode: its key lives in ``STATE_DIR/dev-idp/``.

    WARNING: anyone who can read the state directory can mint any identity. Production
    configurations name the company IdP's JWKS instead.
    """

    def __init__(self, key: SigningKey, audience: str) -> None:
        self._key = key
        private = load_pem_private_key(key.to_pem(), password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError("the dev IdP key must be Ed25519")
        self._private = private
        self.audience = audience

    @classmethod
    def load(cls, state_dir: Path, audience: str) -> DevIdentityProvider:
        """The dev IdP a dev-mode server created in ``state_dir``.

        Raises:
            FileNotFoundError: there is none (the server is not in dev mode there).
        """
        path = dev_idp_key_path(state_dir)
        return cls(SigningKey.from_pem(path.read_bytes(), kid="dev-idp"), audience)

    @classmethod
    def load_or_create(cls, state_dir: Path, audience: str) -> DevIdentityProvider:
        path = dev_idp_key_path(state_dir)
        if path.exists():
            return cls.load(state_dir, audience)
        key = SigningKey.generate(kid="dev-idp")
        write_private(path, key.to_pem())
        return cls(key, audience)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self._key.public_jwk()]}

    def verifier(self, groups_claim: str = "groups") -> IdentityVerifier:
        return IdentityVerifier(
            self.jwks(), issuer=DEV_IDP_ISSUER, audience=self.audience, groups_claim=groups_claim
        )

    def mint(
        self,
        subject: str,
        groups: tuple[str, ...],
        now: float,
        ttl_seconds: int = 600,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """A short-lived identity JWT for ``subject`` (``extra`` claims for tests and dev)."""
        issued = int(now)
        claims = {
            **(extra or {}),
            "iss": DEV_IDP_ISSUER,
            "sub": subject,
            "aud": self.audience,
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl_seconds,
            "jti": secrets.token_urlsafe(12),
            "groups": list(groups),
        }
        return jwt.encode(claims, self._private, algorithm="EdDSA", headers={"kid": self._key.kid})
