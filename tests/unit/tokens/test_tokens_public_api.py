"""The public surface of the tokens package, pinned so that changing it is deliberate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tokens
from tokens import (
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

EXPECTED_EXPORTS = [
    "ALGORITHM",
    "AttenuationError",
    "CapabilityClaims",
    "Constraint",
    "DEFAULT_LEEWAY_SECONDS",
    "Grant",
    "KeyFormatError",
    "MAX_LEEWAY_SECONDS",
    "MAX_PARENT_CHAIN",
    "MAX_TOKEN_BYTES",
    "SigningKey",
    "TOKEN_TYPE",
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

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_exports_are_pinned() -> None:
    """tokens.__all__ is exactly the agreed public API, and every name in it exists."""
    assert sorted(tokens.__all__) == sorted(EXPECTED_EXPORTS)
    assert all(hasattr(tokens, name) for name in tokens.__all__)


def test_constants_are_pinned() -> None:
    """The format constants other code relies on keep their values."""
    assert tokens.TOKEN_TYPE == "proviso-cap+jwt"
    assert tokens.ALGORITHM == "EdDSA"
    assert tokens.MAX_TOKEN_BYTES == 8192
    assert tokens.MAX_LEEWAY_SECONDS == 30
    assert tokens.DEFAULT_LEEWAY_SECONDS == 5
    assert tokens.MAX_PARENT_CHAIN == 8


def test_error_codes_are_pinned() -> None:
    """Each refusal has its stable code, mirroring the REASON_CODE_* names of the API."""
    codes = {
        cls.__name__: cls.code
        for cls in (
            TokenMalformedError,
            TokenWrongAlgorithmError,
            TokenUnknownKeyError,
            TokenBadSignatureError,
            TokenExpiredError,
            TokenNotYetValidError,
            TokenWrongAudienceError,
            TokenWrongIssuerError,
            TokenRevokedError,
            TokenOutOfScopeError,
        )
    }
    assert codes == {
        "TokenMalformedError": "TOKEN_MALFORMED",
        "TokenWrongAlgorithmError": "TOKEN_WRONG_ALGORITHM",
        "TokenUnknownKeyError": "TOKEN_UNKNOWN_KEY",
        "TokenBadSignatureError": "TOKEN_BAD_SIGNATURE",
        "TokenExpiredError": "TOKEN_EXPIRED",
        "TokenNotYetValidError": "TOKEN_NOT_YET_VALID",
        "TokenWrongAudienceError": "TOKEN_WRONG_AUDIENCE",
        "TokenWrongIssuerError": "TOKEN_WRONG_ISSUER",
        "TokenRevokedError": "TOKEN_REVOKED",
        "TokenOutOfScopeError": "OUT_OF_SCOPE",
    }
    assert set(TokenError.__subclasses__()) == {
        TokenMalformedError,
        TokenWrongAlgorithmError,
        TokenUnknownKeyError,
        TokenBadSignatureError,
        TokenExpiredError,
        TokenNotYetValidError,
        TokenWrongAudienceError,
        TokenWrongIssuerError,
        TokenRevokedError,
        TokenOutOfScopeError,
    }


def test_errors_carry_their_data() -> None:
    """Errors keep a human message, and the time errors the instant that decided them."""
    expired = TokenExpiredError("token expired at 10", expired_at=10)
    not_yet = TokenNotYetValidError("not before 20", not_before=20)
    assert (expired.message, expired.expired_at, str(expired)) == (
        "token expired at 10",
        10,
        "token expired at 10",
    )
    assert (not_yet.message, not_yet.not_before) == ("not before 20", 20)


def test_key_format_error_is_a_value_error_not_a_token_error() -> None:
    """Bad key material is a configuration mistake, never confused with a refused token."""
    assert issubclass(KeyFormatError, ValueError)
    assert not issubclass(KeyFormatError, TokenError)


def test_tokens_imports_nothing_from_sidecar() -> None:
    """Importing tokens (in a fresh interpreter) loads no sidecar module: it stands alone."""
    code = (
        "import sys, tokens, tokens.attenuate, tokens.call, tokens.claims, tokens.errors, "
        "tokens.issue, tokens.keys, tokens.scope, tokens.verify; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sidecar'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "[]"
