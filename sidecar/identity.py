"""Caller identities: bearer JWTs from the company IdP, verified against its JWKS.

Issuers (orchestrators), approvers and admins prove who they are with a JWT in the
``authorization`` metadata. In dev mode, a dev IdP whose key lives in the state directory
mints those JWTs for the subjects of the policy's ``dev_directory``.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from jwt.exceptions import InvalidTokenError, PyJWKError, PyJWKSetError

from sidecar.errors import UnauthenticatedError
from sidecar.keystore import write_private
from tokens import SigningKey

DEV_IDP_ISSUER = "proviso-dev-idp"
IDENTITY_ALGORITHMS = ("EdDSA", "ES256", "RS256")
MAX_IDENTITY_TOKEN_BYTES = 16 * 1024
_BEARER_RE = re.compile(r"^Bearer ([A-Za-z0-9_\-.]+)$")


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
    match = _BEARER_RE.match(header)
    if not match:
        raise UnauthenticatedError("the authorization header is not 'Bearer <JWT>'")
    return match.group(1)


class IdentityVerifier:
    """Verifies IdP-issued JWTs: pinned algorithms, known kid, iss, aud, exp/nbf, sub."""

    def __init__(
        self,
        jwks: Mapping[str, Any],
        *,
        issuer: str,
        audience: str,
        groups_claim: str = "groups",
        leeway_seconds: int = 5,
    ) -> None:
        try:
            key_set = jwt.PyJWKSet.from_dict(dict(jwks))
        except (PyJWKError, PyJWKSetError) as exc:
            raise ValueError(f"unusable JWKS: {exc}") from None
        self._keys = {k.key_id: k for k in key_set.keys if k.key_id}
        self._issuer = issuer
        self._audience = audience
        self._groups_claim = groups_claim
        self._leeway = leeway_seconds
        self._jws = jwt.PyJWS(options={"verify_signature": True})

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
        algorithm = header.get("alg")
        if algorithm not in IDENTITY_ALGORITHMS:
            raise UnauthenticatedError("identity token algorithm not accepted")
        key = self._keys.get(str(header.get("kid", "")))
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
