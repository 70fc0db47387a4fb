"""Why a capability token was refused, as narrow exception types under one root.

Every refusal of a token is a :class:`TokenError` whose ``code`` is stable and mirrors the
``REASON_CODE_TOKEN_*`` names of the public API, so a caller can turn any refusal into a
``DENY`` with a reason without parsing messages. Messages are for humans (logs, CLI) and may
change; codes may not.

Bad key material handed to this library by its own operator (a PEM file, a JWKS document)
is a different kind of failure: it is a configuration mistake, not an untrusted token, so it
is a :class:`KeyFormatError` (a ``ValueError``) and never a ``TokenError``.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "KeyFormatError",
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
]


class TokenError(Exception):
    """Root of every refusal of a capability token.

    Catch this to deny on any token problem; catch a subclass to react to one. The root is
    never raised itself, so its ``code`` only exists to keep the attribute total.
    """

    code: ClassVar[str] = "TOKEN_INVALID"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class TokenMalformedError(TokenError):
    """The token is not a well-formed capability token.

    Covers size, encoding, segment count, JSON shape, duplicate keys, the ``typ`` header,
    refused headers (``jku``, ``x5u``, ``x5c``, ``jwk``, ``crit``), the ``kid`` syntax and the
    type of every claim.
    """

    code: ClassVar[str] = "TOKEN_MALFORMED"


class TokenWrongAlgorithmError(TokenError):
    """The header's ``alg`` is missing or is anything but the pinned ``EdDSA``."""

    code: ClassVar[str] = "TOKEN_WRONG_ALGORITHM"


class TokenUnknownKeyError(TokenError):
    """The header's ``kid`` names no key the verifier trusts."""

    code: ClassVar[str] = "TOKEN_UNKNOWN_KEY"


class TokenBadSignatureError(TokenError):
    """The signature does not verify with the key the ``kid`` names."""

    code: ClassVar[str] = "TOKEN_BAD_SIGNATURE"


class TokenExpiredError(TokenError):
    """The token's ``exp`` is past, beyond the allowed leeway; ``expired_at`` is that ``exp``."""

    code: ClassVar[str] = "TOKEN_EXPIRED"

    def __init__(self, message: str, *, expired_at: int) -> None:
        super().__init__(message)
        self.expired_at = expired_at


class TokenNotYetValidError(TokenError):
    """The token's ``nbf`` is ahead, beyond the allowed leeway; ``not_before`` is that ``nbf``."""

    code: ClassVar[str] = "TOKEN_NOT_YET_VALID"

    def __init__(self, message: str, *, not_before: int) -> None:
        super().__init__(message)
        self.not_before = not_before


class TokenWrongAudienceError(TokenError):
    """The token's ``aud`` is not the audience the verifier is."""

    code: ClassVar[str] = "TOKEN_WRONG_AUDIENCE"


class TokenWrongIssuerError(TokenError):
    """The token's ``iss`` is not the issuer the verifier trusts."""

    code: ClassVar[str] = "TOKEN_WRONG_ISSUER"


class TokenRevokedError(TokenError):
    """The token, or a token it was attenuated from, is on the verifier's revocation list.

    ``token_id`` is the revoked id: the token's own, or an ancestor's. Raised only where a
    revocation list is given (:func:`tokens.verify_call`), since ``verify`` holds no state.
    """

    code: ClassVar[str] = "TOKEN_REVOKED"

    def __init__(self, message: str, *, token_id: str) -> None:
        super().__init__(message)
        self.token_id = token_id


class TokenOutOfScopeError(TokenError):
    """The token is valid, but does not allow this call: another tool, another run, or an
    argument outside a pin or constraint of every grant for the tool.

    ``tool`` is the tool asked for; ``argument`` names the argument at fault, or is empty
    when the tool or the run is. Raised by :func:`tokens.verify_call`, never by ``verify``.
    """

    code: ClassVar[str] = "OUT_OF_SCOPE"

    def __init__(self, message: str, *, tool: str, argument: str = "") -> None:
        super().__init__(message)
        self.tool = tool
        self.argument = argument


class KeyFormatError(ValueError):
    """Key material (PEM, JWK, JWKS, kid) is not an Ed25519 key this library accepts."""
