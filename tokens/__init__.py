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
"""

from tokens.claims import (
    ALGORITHM,
    MAX_TOKEN_BYTES,
    TOKEN_TYPE,
    CapabilityClaims,
    Grant,
)
from tokens.errors import (
    KeyFormatError,
    TokenBadSignatureError,
    TokenError,
    TokenExpiredError,
    TokenMalformedError,
    TokenNotYetValidError,
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
    "MAX_TOKEN_BYTES",
    "TOKEN_TYPE",
    "CapabilityClaims",
    "Grant",
    "KeyFormatError",
    "SigningKey",
    "TokenBadSignatureError",
    "TokenError",
    "TokenExpiredError",
    "TokenMalformedError",
    "TokenNotYetValidError",
    "TokenUnknownKeyError",
    "TokenWrongAlgorithmError",
    "TokenWrongAudienceError",
    "TokenWrongIssuerError",
    "VerificationKeys",
    "issue",
    "verify",
]
