"""Verifying capability tokens: a fixed sequence of checks, the first failure decides.

The order is part of the contract (see DESIGN.md, section 2) and is chosen so that nothing
from the token steers how it is checked:

1. size and character set, before any decoding;
2. three strict base64url segments, a header that is one JSON object without duplicate keys;
3. ``alg`` equal to the pinned ``EdDSA``, checked before any key is looked up, so the token
   can never choose its own algorithm (no ``none``, no HMAC keyed with a public key);
4. ``typ`` equal to ``TOKEN_TYPE``, so other JWTs signed by the same key cannot pose as
   capability tokens;
5. no ``jku``, ``x5u``, ``x5c``, ``jwk``, ``crit`` (or ``b64``) header: the token cannot
   point at its own key, and no URL or file is ever read;
6. a ``kid`` of ``[A-Za-z0-9_-]{1,128}`` that names a trusted key;
7. the Ed25519 signature over the exact bytes received;
8. the payload: strictly typed claims (only now, after the signature, is it parsed);
9. issuer, then audience;
10. ``nbf`` and ``exp`` against ``now``, with a small bounded leeway.
"""

from __future__ import annotations

import math
from typing import Final

from jwt.api_jws import PyJWS

from tokens.claims import (
    ALGORITHM,
    MAX_TOKEN_BYTES,
    TOKEN_TYPE,
    CapabilityClaims,
    claims_from_payload,
    load_json_object,
    show_untrusted,
)
from tokens.errors import (
    TokenBadSignatureError,
    TokenExpiredError,
    TokenMalformedError,
    TokenNotYetValidError,
    TokenUnknownKeyError,
    TokenWrongAlgorithmError,
    TokenWrongAudienceError,
    TokenWrongIssuerError,
)
from tokens.keys import KID_PATTERN, VerificationKeys, b64url_decode, is_valid_kid

__all__ = ["DEFAULT_LEEWAY_SECONDS", "MAX_LEEWAY_SECONDS", "REFUSED_HEADERS", "verify"]

DEFAULT_LEEWAY_SECONDS: Final = 5
"""Clock skew tolerated by default between issuer and verifier, in seconds."""

MAX_LEEWAY_SECONDS: Final = 30
"""The largest leeway :func:`verify` accepts: beyond it, expiry stops meaning much."""

REFUSED_HEADERS: Final = ("b64", "crit", "jku", "jwk", "x5c", "x5u")
"""Header parameters that make a token name its own key or change how it is processed.

``jku``/``x5u`` point at a URL, ``jwk``/``x5c`` embed a key, ``crit`` demands extensions this
verifier does not implement and ``b64`` (RFC 7797) changes what is signed. Tokens issued
here carry none of them, so any token that does is refused outright.
"""

# The signature algorithm is fixed here, from the constant: never looked up by the token's alg.
_EDDSA: Final = PyJWS(algorithms=[ALGORITHM]).get_algorithm_by_name(ALGORITHM)
_SEGMENTS: Final = 3


def _check_arguments(
    token: object,
    *,
    keys: object,
    audience: object,
    issuer: object,
    now: object,
    leeway_seconds: object,
) -> None:
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, not {type(token).__name__}")
    if not isinstance(keys, VerificationKeys):
        raise TypeError(f"keys must be VerificationKeys, not {type(keys).__name__}")
    for name, value in (("audience", audience), ("issuer", issuer)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
    if isinstance(now, bool) or not isinstance(now, int | float):
        raise TypeError(f"now must be a number of seconds, not {type(now).__name__}")
    if not math.isfinite(now) or now < 0:
        # A NaN `now` would make every time comparison false, i.e. every token valid.
        raise ValueError(f"now must be a finite, non-negative number, got {now!r}")
    if (
        isinstance(leeway_seconds, bool)
        or not isinstance(leeway_seconds, int)
        or not 0 <= leeway_seconds <= MAX_LEEWAY_SECONDS
    ):
        raise ValueError(
            f"leeway_seconds must be an int from 0 to {MAX_LEEWAY_SECONDS}, got {leeway_seconds!r}"
        )


def _decode_segment(segment: str, part: str) -> bytes:
    try:
        return b64url_decode(segment)
    except ValueError:
        raise TokenMalformedError(f"{part} is not canonical unpadded base64url") from None


def verify(
    token: str,
    keys: VerificationKeys,
    *,
    audience: str,
    issuer: str,
    now: float,
    leeway_seconds: int = DEFAULT_LEEWAY_SECONDS,
) -> CapabilityClaims:
    """Check a capability token completely and return its claims, or raise why not.

    The checks run in the order given in this module's docstring and the first failure
    raises; a returned value means the token is authentic, well-formed, meant for
    ``audience``, from ``issuer`` and valid at ``now``. Revocation is not checked here (it
    needs state); the caller checks ``token_id`` afterwards.

    Args:
        token: The compact JWS, exactly as received.
        keys: The Ed25519 public keys to trust, by kid.
        audience: This verifier's own identity; the token's ``aud`` must equal it exactly.
        issuer: The issuer to trust; the token's ``iss`` must equal it exactly.
        now: The current Unix time in seconds. It is a parameter so one decision uses one
            instant and tests can fix it.
        leeway_seconds: Clock skew tolerated on ``nbf`` and ``exp``, from 0 to
            ``MAX_LEEWAY_SECONDS``.

    Warning:
        ``keys``, ``audience``, ``issuer`` and ``now`` decide whether a token is trusted.
        Take them from this verifier's configuration and clock only, never from the token,
        its unverified header or the request carrying it; in particular do not build
        ``keys`` from a URL or key the token names, and do not pass the token's own ``aud``
        or ``iss`` back in. Keep ``leeway_seconds`` small: every second of it is a second an
        expired token still works.

    Returns:
        The verified claims, with ``key_id`` set to the kid that verified the signature.

    Raises:
        TokenMalformedError: too large, not ASCII, not three canonical base64url segments,
            header or payload not a JSON object (or with duplicate keys), ``typ`` missing or
            wrong, a refused header present, ``kid`` missing or not a valid kid, or a claim
            missing or mistyped (the message names it).
        TokenWrongAlgorithmError: ``alg`` is missing or is not ``EdDSA``.
        TokenUnknownKeyError: ``kid`` names no key in ``keys``.
        TokenBadSignatureError: the signature does not verify with that key.
        TokenWrongIssuerError: ``iss`` is not ``issuer``.
        TokenWrongAudienceError: ``aud`` is not ``audience``.
        TokenNotYetValidError: ``nbf`` is later than ``now + leeway_seconds``.
        TokenExpiredError: ``exp`` is at or before ``now - leeway_seconds``.
        TypeError: ``token`` is not a str, ``keys`` not ``VerificationKeys`` or ``now`` not
            a number.
        ValueError: ``audience`` or ``issuer`` is empty, ``now`` is not finite and
            non-negative, or ``leeway_seconds`` is not an int from 0 to
            ``MAX_LEEWAY_SECONDS``.
    """
    _check_arguments(
        token, keys=keys, audience=audience, issuer=issuer, now=now, leeway_seconds=leeway_seconds
    )

    # 1. Size and character set, before any decoding. Counting characters first bounds the
    # work on huge inputs; a non-ASCII character takes at least two UTF-8 bytes.
    if len(token) > MAX_TOKEN_BYTES or (
        not token.isascii() and len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES
    ):
        raise TokenMalformedError(f"token is larger than {MAX_TOKEN_BYTES} bytes")
    if not token.isascii():
        raise TokenMalformedError("token contains non-ASCII characters")

    # 2. Structure and header.
    segments = token.split(".")
    if len(segments) != _SEGMENTS:
        raise TokenMalformedError(f"token must have 3 segments, found {len(segments)}")
    header_segment, payload_segment, signature_segment = segments
    header = load_json_object(_decode_segment(header_segment, "header"), "header")
    payload_bytes = _decode_segment(payload_segment, "payload")
    signature = _decode_segment(signature_segment, "signature")

    # 3. Algorithm, against the pinned constant.
    if "alg" not in header:
        raise TokenWrongAlgorithmError("header has no alg")
    if header["alg"] != ALGORITHM:
        raise TokenWrongAlgorithmError(
            f"alg {show_untrusted(header['alg'])} is not allowed; only {ALGORITHM} is"
        )

    # 4. Type.
    if header.get("typ") != TOKEN_TYPE:
        raise TokenMalformedError(
            f"typ must be {TOKEN_TYPE!r}, got {show_untrusted(header.get('typ'))}"
        )

    # 5. Headers that would let the token pick its key or change its processing.
    refused = [name for name in REFUSED_HEADERS if name in header]
    if refused:
        raise TokenMalformedError(f"header {refused[0]!r} is not allowed")

    # 6. Key id: a bounded token of safe characters, looked up in memory only.
    if "kid" not in header:
        raise TokenMalformedError("header has no kid")
    kid = header["kid"]
    if not is_valid_kid(kid):
        raise TokenMalformedError(
            f"kid must match {KID_PATTERN.pattern}, got {show_untrusted(kid)}"
        )
    public_key = keys.get(kid)
    if public_key is None:
        raise TokenUnknownKeyError(f"kid {kid!r} is not a trusted key")

    # 7. Signature over the exact bytes received.
    signing_input = f"{header_segment}.{payload_segment}".encode("ascii")
    if not _EDDSA.verify(signing_input, public_key, signature):
        raise TokenBadSignatureError(f"signature does not verify with key {kid!r}")

    # 8. Claims, strictly typed; only authenticated bytes are parsed.
    claims = claims_from_payload(load_json_object(payload_bytes, "payload"), key_id=kid)

    # 9. Who issued it and whom it is for.
    if claims.issuer != issuer:
        raise TokenWrongIssuerError(
            f"iss {show_untrusted(claims.issuer)} is not the trusted issuer"
        )
    if claims.audience != audience:
        raise TokenWrongAudienceError(f"aud {show_untrusted(claims.audience)} is not this audience")

    # 10. Time window.
    if claims.not_before > now + leeway_seconds:
        raise TokenNotYetValidError(
            f"token is not valid before {claims.not_before}", not_before=claims.not_before
        )
    if claims.expires_at <= now - leeway_seconds:
        raise TokenExpiredError(
            f"token expired at {claims.expires_at}", expired_at=claims.expires_at
        )
    return claims
