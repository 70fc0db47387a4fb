"""Minting capability tokens.

Issuing checks its inputs against the same rules verification applies, so this library never
mints a token its own verifier would refuse: the failure shows up at the issuer, as a
programming error, instead of as a denied tool call somewhere else later.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any, Final

from jwt.api_jws import PyJWS

from tokens.claims import (
    ALGORITHM,
    MAX_PARENT_CHAIN,
    MAX_TIMESTAMP,
    MAX_TOKEN_BYTES,
    TOKEN_TYPE,
    Grant,
    is_printable_ascii,
)
from tokens.keys import SigningKey

__all__ = ["issue"]

_JWS: Final = PyJWS(algorithms=[ALGORITHM])
_TOKEN_ID_BYTES: Final = 16


def _require_text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    return value


def _require_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def issue(
    key: SigningKey,
    *,
    issuer: str,
    subject: str,
    audience: str,
    grants: Sequence[Grant],
    ttl_seconds: int,
    now: int,
    run_id: str | None = None,
    token_id: str | None = None,
    parents: Sequence[str] = (),
) -> str:
    """Mint a capability token: a compact JWS signed with ``key`` (``EdDSA``).

    The header is ``{"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": key.kid}``. The token is valid
    from ``now`` (``iat`` = ``nbf`` = ``now``) until ``now + ttl_seconds`` (``exp``). ``now`` is
    a parameter, never read from a clock here, so callers decide what time it is and tests
    can fix it.

    Args:
        key: The issuer's signing key; its kid goes in the header.
        issuer: ``iss``; verifiers compare it exactly with the issuer they trust.
        subject: ``sub``, the agent identity; printable ASCII.
        audience: ``aud``, the sidecar the token is for; a single string.
        grants: What the token allows; at least one. Keep it to what the agent's task needs:
            a token is a bearer credential and anyone holding it can use every grant in it.
        ttl_seconds: Lifetime in seconds, above zero. Keep it short: a token cannot be
            recalled except by revocation, and a short life bounds what a leak costs.
        now: The current Unix time in whole seconds.
        run_id: The run the token is bound to, if any.
        token_id: ``jti``; by default 128 random bits, base64url. Pass one only when it is
            unique (it keys revocation and audit).
        parents: ``parent``: the ids of the tokens this one narrows, root first. Use
            :func:`tokens.attenuate`, which checks the narrowing, rather than passing it here.

    Returns:
        The token, at most ``MAX_TOKEN_BYTES`` long.

    Raises:
        TypeError: ``key`` is not a ``SigningKey``, a grant is not a ``Grant``, or an argument
            has the wrong type (``bool`` is not accepted as an int).
        ValueError: ``ttl_seconds`` is not above zero; ``grants`` is empty; a string argument
            is empty; ``subject`` is not printable ASCII; ``now`` or ``exp`` is outside
            ``0..MAX_TIMESTAMP``; ``parents`` is longer than ``MAX_PARENT_CHAIN`` or repeats
            an id; or the token would exceed ``MAX_TOKEN_BYTES``.
    """
    if not isinstance(key, SigningKey):
        raise TypeError(f"key must be a SigningKey, not {type(key).__name__}")
    _require_text("issuer", issuer)
    _require_text("audience", audience)
    if not is_printable_ascii(_require_text("subject", subject)):
        raise ValueError("subject must be printable ASCII")
    if _require_int("ttl_seconds", ttl_seconds) <= 0:
        raise ValueError(f"ttl_seconds must be above zero, got {ttl_seconds}")
    if not 0 <= _require_int("now", now) <= MAX_TIMESTAMP:
        raise ValueError(f"now must be between 0 and {MAX_TIMESTAMP}, got {now}")
    expires_at = now + ttl_seconds
    if expires_at > MAX_TIMESTAMP:
        raise ValueError(f"now + ttl_seconds must not exceed {MAX_TIMESTAMP}")
    if not grants:
        raise ValueError("grants must not be empty")
    for grant in grants:
        if not isinstance(grant, Grant):
            raise TypeError(f"grants must hold Grant objects, not {type(grant).__name__}")
    if token_id is None:
        token_id = secrets.token_urlsafe(_TOKEN_ID_BYTES)
    _require_text("token_id", token_id)
    parent_ids = [_require_text("parents[]", parent) for parent in parents]
    if len(parent_ids) > MAX_PARENT_CHAIN:
        raise ValueError(f"parents must name at most {MAX_PARENT_CHAIN} ancestors")
    if len(set(parent_ids)) != len(parent_ids) or token_id in parent_ids:
        raise ValueError("parents must not repeat a token id")

    payload: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": expires_at,
        "jti": token_id,
        "grants": [grant.to_claim() for grant in grants],
    }
    if run_id is not None:
        payload["run_id"] = _require_text("run_id", run_id)
    if parent_ids:
        payload["parent"] = parent_ids

    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    token = _JWS.encode(
        body.encode("ascii"),
        key._private_key,  # same package: the private key never leaves tokens
        algorithm=ALGORITHM,
        headers={"typ": TOKEN_TYPE, "kid": key.kid},
    )
    if len(token) > MAX_TOKEN_BYTES:
        raise ValueError(
            f"token would be {len(token)} bytes, above MAX_TOKEN_BYTES ({MAX_TOKEN_BYTES}); "
            "issue fewer grants or shorter values"
        )
    return token
