"""Capability tokens for Proviso: Ed25519-signed JWTs, per agent, time- and scope-bound.

This package stands alone (it imports nothing of ``sidecar``), so a tool backend can verify
the tokens it is handed without running the sidecar. Time is always a parameter (``now``):
nothing here reads a clock.

Typical use::

    key = SigningKey.generate()
    token = issue(key, issuer="orchestrator@service", subject="agent@service",
                  audience="proviso", grants=[Grant("billing.refund", {"invoice_id": "in_1"})],
                  ttl_seconds=300, now=now)
    claims = verify(token, VerificationKeys.from_signing_keys([key]),
                    audience="proviso", issuer="orchestrator@service", now=now)

A grant may also bound arguments (``Grant("refund", {"invoice_id": "in_1"},
{"amount": Constraint(max="50")})``); :func:`attenuate` derives a narrower child token; and a
tool backend checks one call offline with :func:`verify_call` (JWKS, token, tool and
arguments in; the verified claims and grant, or a typed ``TokenError``, out).
"""

from tokens.attenuate import AttenuationError, attenuate
from tokens.call import VerifiedCall, verify_call
from tokens.claims import (
    ALGORITHM,
    MAX_PARENT_CHAIN,
    MAX_TOKEN_BYTES,
    TOKEN_TYPE,
    CapabilityClaims,
    Constraint,
    Grant,
)
from tokens.errors import (
    KeyFormatError,
    TokenBadSignatureError,
    TokenError,
    TokenExpiredError,
    TokenMalformedError,
    TokenNotYetValidError,
    TokenOutOfScopeError,
    TokenRevokedError,
    TokenUnknownKeyError,
    TokenWrongAlgorithmError,
    TokenWrongAudienceError,
    TokenWrongIssuerError,
)
from tokens.issue import issue
from tokens.keys import SigningKey, VerificationKeys
from tokens.verify import DEFAULT_LEEWAY_SECONDS, MAX_LEEWAY_SECONDS, verify

__all__ = [
    "ALGORITHM",
    "DEFAULT_LEEWAY_SECONDS",
    "MAX_LEEWAY_SECONDS",
    "MAX_PARENT_CHAIN",
    "MAX_TOKEN_BYTES",
    "TOKEN_TYPE",
    "AttenuationError",
    "CapabilityClaims",
    "Constraint",
    "Grant",
    "KeyFormatError",
    "SigningKey",
    "TokenBadSignatureError",
    "TokenError",
    "TokenExpiredError",
    "TokenMalformedError",
    "TokenNotYetValidError",
    "TokenOutOfScopeError",
    "TokenRevokedError",
    "TokenUnknownKeyError",
    "TokenWrongAlgorithmError",
    "TokenWrongAudienceError",
    "TokenWrongIssuerError",
    "VerificationKeys",
    "VerifiedCall",
    "attenuate",
    "issue",
    "verify",
    "verify_call",
]
