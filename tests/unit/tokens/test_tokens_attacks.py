"""Known attacks on JWT verifiers, as named regression tests and as a table of vectors.

The headline attacks use fixed bytes (as pyjwt's test_advisory.py does), so they keep testing
the same thing whatever the issuing code does later. The table crafts each malformed token
from a known-good one by a single change and names the error it must produce; a test fails
when an error class exists that no vector exercises.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import hmac
import io
import json
import os
import socket
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tokens import (
    MAX_TOKEN_BYTES,
    TOKEN_TYPE,
    CapabilityClaims,
    Grant,
    SigningKey,
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
    VerificationKeys,
    issue,
    verify,
)

NOW: Final = 1_767_225_600  # 2026-01-01T00:00:00Z
ISSUER: Final = "https://issuer.test"
AUDIENCE: Final = "proviso-test"
KID: Final = "k1"

# The issuer's key, and an attacker's key that claims the same kid. Fixed, so that Ed25519
# (deterministic) gives the same signatures on every run and the tokens below are fixed bytes.
PEM_A: Final = b"""-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIP9D96q6r+XAGJmNaNX4aXBJJGywBspBU0kj6M9Cc8np
-----END PRIVATE KEY-----
"""
PEM_B: Final = b"""-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEILwvMLrMxfif8/UwXJsdaPamOpGcitGmmuio/awUkKQ2
-----END PRIVATE KEY-----
"""


def _private_key(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


PRIVATE_A: Final = _private_key(PEM_A)
PRIVATE_B: Final = _private_key(PEM_B)
SIGNING_KEY_A: Final = SigningKey.from_pem(PEM_A, KID)
KEYS: Final = VerificationKeys.from_signing_keys([SIGNING_KEY_A])

GOOD_HEADER: Final[dict[str, Any]] = {"alg": "EdDSA", "kid": KID, "typ": TOKEN_TYPE}
GOOD_CLAIMS: Final[dict[str, Any]] = {
    "iss": ISSUER,
    "sub": "agent@service",
    "aud": AUDIENCE,
    "iat": NOW,
    "nbf": NOW,
    "exp": NOW + 300,
    "jti": "jti-1",
    "grants": [{"tool": "billing.refund", "pins": {"invoice_id": "in_93K2"}}],
}

# issue(SIGNING_KEY_A, issuer=ISSUER, subject="agent@service", audience=AUDIENCE,
#       grants=[Grant("billing.refund", {"invoice_id": "in_93K2"})], ttl_seconds=300,
#       now=NOW, token_id="jti-1"), i.e. GOOD_HEADER and GOOD_CLAIMS signed by key A.
VALID_HEADER: Final = "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIiwidHlwIjoicHJvdmlzby1jYXArand0In0"
VALID_PAYLOAD: Final = (
    "eyJpc3MiOiJodHRwczovL2lzc3Vlci50ZXN0Iiwic3ViIjoiYWdlbnRAc2VydmljZSIsImF1ZCI6InBy"
    "b3Zpc28tdGVzdCIsImlhdCI6MTc2NzIyNTYwMCwibmJmIjoxNzY3MjI1NjAwLCJleHAiOjE3NjcyMjU5"
    "MDAsImp0aSI6Imp0aS0xIiwiZ3JhbnRzIjpbeyJ0b29sIjoiYmlsbGluZy5yZWZ1bmQiLCJwaW5zIjp7"
    "Imludm9pY2VfaWQiOiJpbl85M0syIn19XX0"
)
VALID_SIGNATURE: Final = (
    "odqjPNtWlUuwTyiSHI-SytNpnhhYr1zl3OZEVAZdkwjMxWW6S2hYuUKlmnXalncT205g5iXERbLkMUQuyF83BQ"
)
VALID_TOKEN: Final = f"{VALID_HEADER}.{VALID_PAYLOAD}.{VALID_SIGNATURE}"

# {"alg":"none","kid":"k1","typ":"proviso-cap+jwt"}
NONE_HEADER: Final = "eyJhbGciOiJub25lIiwia2lkIjoiazEiLCJ0eXAiOiJwcm92aXNvLWNhcCtqd3QifQ"
# The same payload with alg none: unsigned, and with a genuine Ed25519 signature by key A.
ALG_NONE_UNSIGNED: Final = f"{NONE_HEADER}.{VALID_PAYLOAD}."
ALG_NONE_SIGNED: Final = (
    f"{NONE_HEADER}.{VALID_PAYLOAD}."
    "c5KjuQ9ev63iF1eJRRQ1FTlyjsr05dRG3NaX6EkzOKI6XnlWB6RXMF63P-wTHT6iwckEVXfZXPYj_b2cqE5gDg"
)

# {"alg":"HS256","kid":"k1","typ":"proviso-cap+jwt"}: key confusion, the HMAC secret being
# public key A as a verifier might hold it (raw bytes, SubjectPublicKeyInfo PEM, JWK JSON).
HS256_HEADER: Final = "eyJhbGciOiJIUzI1NiIsImtpZCI6ImsxIiwidHlwIjoicHJvdmlzby1jYXArand0In0"
HS256_FORGERIES: Final = {
    "raw": f"{HS256_HEADER}.{VALID_PAYLOAD}.ofRy8gDbAWo7DDK8e45WaDNZdg4pyyCcfYtLtMWKEVw",
    "pem": f"{HS256_HEADER}.{VALID_PAYLOAD}.qgLA5_kRHTMZcIcNPkhMTEc-a4zX9_wVgl2T2gMaqwU",
    "jwk": f"{HS256_HEADER}.{VALID_PAYLOAD}.kLtenqRv0Xi-wWgbiaJ9eq_rJLLGkEEFGHmxt_GbEso",
}


def _hmac_secrets() -> dict[str, bytes]:
    public = SIGNING_KEY_A.public_key()
    jwk = json.dumps(SIGNING_KEY_A.public_jwk(), separators=(",", ":"), sort_keys=True)
    return {
        "raw": public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        "pem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "jwk": jwk.encode(),
    }


# ---------------------------------------------------------------------------- crafting

_DROP: Final = object()  # as a value in with_header/with_claims: remove the member


def b64url(data: bytes) -> str:
    """Encode like JWS does: base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(value: object) -> str:
    """Encode a JSON value as one JWS segment."""
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def with_header(**changes: object) -> dict[str, Any]:
    """Return GOOD_HEADER with members replaced, added or (with _DROP) removed."""
    return _changed(GOOD_HEADER, changes)


def with_claims(**changes: object) -> dict[str, Any]:
    """Return GOOD_CLAIMS with members replaced, added or (with _DROP) removed."""
    return _changed(GOOD_CLAIMS, changes)


def _changed(base: dict[str, Any], changes: dict[str, object]) -> dict[str, Any]:
    result = dict(base)
    for name, value in changes.items():
        if value is _DROP:
            del result[name]
        else:
            result[name] = value
    return result


def craft(
    *,
    header: dict[str, Any] | str = GOOD_HEADER,
    payload: dict[str, Any] | str = GOOD_CLAIMS,
    signer: Ed25519PrivateKey | None = PRIVATE_A,
) -> str:
    """Build a compact JWS; a str header or payload is raw JSON text, signed as given."""
    header_segment = b64url(header.encode()) if isinstance(header, str) else b64url_json(header)
    payload_segment = b64url(payload.encode()) if isinstance(payload, str) else b64url_json(payload)
    signing_input = f"{header_segment}.{payload_segment}"
    signature = b64url(signer.sign(signing_input.encode())) if signer is not None else ""
    return f"{signing_input}.{signature}"


def sized_token(total: int) -> str:
    """Return a correctly signed token of exactly ``total`` bytes, padded by an unknown claim."""
    # Four base64 characters carry three bytes, so start just short of the target and step
    # one byte at a time; an extra header member shifts lengths the payload cannot reach.
    start = max(0, (total - len(craft())) * 3 // 4 - 24)
    for header_pad in range(4):
        header = with_header(pad="x" * header_pad) if header_pad else GOOD_HEADER
        for pad in range(start, total):
            token = craft(header=header, payload=with_claims(pad="x" * pad))
            if len(token) == total:
                return token
            if len(token) > total:
                break
    raise AssertionError(f"cannot build a token of {total} bytes")


def check(token: str, *, now: float = NOW, leeway_seconds: int = 5) -> CapabilityClaims:
    """Verify ``token`` against key A, as the test sidecar."""
    return verify(
        token, KEYS, audience=AUDIENCE, issuer=ISSUER, now=now, leeway_seconds=leeway_seconds
    )


@pytest.fixture
def forbid_io(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make opening a file or a connection fail loudly; return the attempts made."""
    attempts: list[str] = []

    def refuse(name: str) -> Callable[..., Any]:
        def refused(*args: object, **kwargs: object) -> Any:
            attempts.append(f"{name}{args!r}")
            raise AssertionError(f"verify must not call {name}")

        return refused

    monkeypatch.setattr(builtins, "open", refuse("open"))
    monkeypatch.setattr(io, "open", refuse("io.open"))
    monkeypatch.setattr(os, "open", refuse("os.open"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse("urlopen"))
    return attempts


# --------------------------------------------------------------- named, fixed-byte attacks


def test_fixed_valid_token_is_what_issue_produces() -> None:
    """Issuing the reference claims with key A yields exactly the pinned bytes (wire format)."""
    token = issue(
        SIGNING_KEY_A,
        issuer=ISSUER,
        subject="agent@service",
        audience=AUDIENCE,
        grants=[Grant("billing.refund", {"invoice_id": "in_93K2"})],
        ttl_seconds=300,
        now=NOW,
        token_id="jti-1",
    )
    assert token == VALID_TOKEN
    assert token == craft()


def test_fixed_valid_token_verifies() -> None:
    """The reference token verifies, so every refusal below is due to its one change."""
    claims = check(VALID_TOKEN)
    assert claims.grants == (Grant("billing.refund", {"invoice_id": "in_93K2"}),)
    assert claims.key_id == KID


def test_fixed_attack_tokens_are_genuine() -> None:
    """The fixed forgeries are real: correct alg headers and HMACs a naive verifier accepts."""
    assert base64.urlsafe_b64decode(NONE_HEADER + "==") == (
        b'{"alg":"none","kid":"k1","typ":"proviso-cap+jwt"}'
    )
    assert base64.urlsafe_b64decode(HS256_HEADER + "==") == (
        b'{"alg":"HS256","kid":"k1","typ":"proviso-cap+jwt"}'
    )
    signing_input = f"{HS256_HEADER}.{VALID_PAYLOAD}".encode()
    for name, secret in _hmac_secrets().items():
        mac = hmac.new(secret, signing_input, hashlib.sha256).digest()
        assert HS256_FORGERIES[name].rsplit(".", 1)[1] == b64url(mac)
    none_signature = PRIVATE_A.sign(f"{NONE_HEADER}.{VALID_PAYLOAD}".encode())
    assert ALG_NONE_SIGNED.rsplit(".", 1)[1] == b64url(none_signature)


def test_alg_none_without_signature_is_refused() -> None:
    """An unsigned alg=none token is refused as the wrong algorithm, never accepted."""
    with pytest.raises(TokenWrongAlgorithmError, match="'none'"):
        check(ALG_NONE_UNSIGNED)


def test_alg_none_with_signature_is_refused() -> None:
    """alg=none is refused even when a valid Ed25519 signature is attached."""
    with pytest.raises(TokenWrongAlgorithmError):
        check(ALG_NONE_SIGNED)


@pytest.mark.parametrize("secret", sorted(HS256_FORGERIES))
def test_hs256_keyed_with_the_public_key_is_refused(secret: str) -> None:
    """HS256 with the Ed25519 public key (raw, PEM or JWK) as HMAC secret is refused by alg."""
    with pytest.raises(TokenWrongAlgorithmError, match="HS256"):
        check(HS256_FORGERIES[secret])


@pytest.mark.parametrize("kid", ["../../etc/passwd", "/dev/null", "..\\..\\boot.ini"])
def test_path_like_kid_is_malformed_and_opens_no_file(kid: str, forbid_io: list[str]) -> None:
    """A kid that looks like a path is refused by syntax, and no file is opened."""
    with pytest.raises(TokenMalformedError, match="kid"):
        check(craft(header=with_header(kid=kid)))
    assert forbid_io == []


@pytest.mark.parametrize("name", ["jku", "x5u"])
def test_key_url_headers_are_refused_without_fetching(name: str, forbid_io: list[str]) -> None:
    """jku/x5u pointing at an attacker's keys are refused; no connection is attempted."""
    token = craft(header=with_header(**{name: "https://attacker.test/jwks.json"}))
    with pytest.raises(TokenMalformedError, match=name):
        check(token)
    assert forbid_io == []


def test_embedded_jwk_header_is_refused() -> None:
    """A token carrying its own verification key (jwk header, signed by it) is refused."""
    attacker_jwk = SigningKey.from_pem(PEM_B, KID).public_jwk()
    with pytest.raises(TokenMalformedError, match="jwk"):
        check(craft(header=with_header(jwk=attacker_jwk), signer=PRIVATE_B))


def test_tampered_payload_one_byte_flipped_is_bad_signature() -> None:
    """Changing one byte of the signed payload (the pinned invoice) breaks the signature."""
    payload = base64.urlsafe_b64decode(VALID_PAYLOAD + "==")
    tampered = payload.replace(b"in_93K2", b"in_93K3")
    assert sum(a != b for a, b in zip(payload, tampered, strict=True)) == 1
    token = f"{VALID_HEADER}.{b64url(tampered)}.{VALID_SIGNATURE}"
    with pytest.raises(TokenBadSignatureError):
        check(token)


def test_signature_by_another_key_with_the_same_kid_is_bad_signature() -> None:
    """An attacker's key announcing the trusted kid does not verify."""
    with pytest.raises(TokenBadSignatureError):
        check(craft(signer=PRIVATE_B))


def test_expired_just_beyond_leeway_is_refused() -> None:
    """exp exactly leeway seconds in the past is expired, and the error carries exp."""
    token = craft(payload=with_claims(exp=NOW - 5, nbf=NOW - 60, iat=NOW - 60))
    with pytest.raises(TokenExpiredError) as excinfo:
        check(token, leeway_seconds=5)
    assert excinfo.value.expired_at == NOW - 5


def test_expired_within_leeway_passes() -> None:
    """exp less than leeway seconds in the past is still accepted (clock skew)."""
    token = craft(payload=with_claims(exp=NOW - 4, nbf=NOW - 60, iat=NOW - 60))
    assert check(token, leeway_seconds=5).expires_at == NOW - 4


def test_expiry_is_exclusive_without_leeway() -> None:
    """With zero leeway a token is expired at exp itself and valid one second before."""
    token = craft(payload=with_claims(exp=NOW + 1))
    assert check(token, now=NOW, leeway_seconds=0).expires_at == NOW + 1
    with pytest.raises(TokenExpiredError):
        check(token, now=NOW + 1, leeway_seconds=0)
    with pytest.raises(TokenExpiredError):
        check(token, now=NOW + 0.5 + 0.5, leeway_seconds=0)


def test_not_yet_valid_beyond_leeway_is_refused() -> None:
    """nbf more than leeway seconds ahead is refused, and the error carries nbf."""
    token = craft(payload=with_claims(nbf=NOW + 6, iat=NOW + 6, exp=NOW + 300))
    with pytest.raises(TokenNotYetValidError) as excinfo:
        check(token, leeway_seconds=5)
    assert excinfo.value.not_before == NOW + 6


def test_not_yet_valid_within_leeway_passes() -> None:
    """nbf up to leeway seconds ahead is accepted (clock skew)."""
    token = craft(payload=with_claims(nbf=NOW + 5, iat=NOW + 5, exp=NOW + 300))
    assert check(token, leeway_seconds=5).not_before == NOW + 5


def test_token_of_exactly_max_bytes_verifies() -> None:
    """The size cap is inclusive: a signed token of MAX_TOKEN_BYTES bytes is accepted."""
    token = sized_token(MAX_TOKEN_BYTES)
    assert len(token) == MAX_TOKEN_BYTES
    check(token)


def test_oversize_token_is_refused_before_decoding() -> None:
    """A correctly signed token one byte over the cap is refused as malformed."""
    token = sized_token(MAX_TOKEN_BYTES + 1)
    with pytest.raises(TokenMalformedError, match="larger"):
        check(token)


def test_oversize_non_ascii_token_is_refused_as_too_large() -> None:
    """Size is counted in UTF-8 bytes, so multi-byte characters cannot slip under the cap."""
    token = "é" * (MAX_TOKEN_BYTES // 2 + 1)
    assert len(token) <= MAX_TOKEN_BYTES < len(token.encode())
    with pytest.raises(TokenMalformedError, match="larger"):
        check(token)


@pytest.mark.parametrize("leeway", [31, 3600, -1])
def test_leeway_outside_bounds_is_a_value_error(leeway: int) -> None:
    """verify refuses a leeway above MAX_LEEWAY_SECONDS or below zero."""
    with pytest.raises(ValueError, match="leeway"):
        check(VALID_TOKEN, leeway_seconds=leeway)


@pytest.mark.parametrize("now", [float("nan"), float("inf"), -1.0])
def test_now_must_be_finite_and_non_negative(now: float) -> None:
    """A NaN now would make every time check pass, so verify refuses it outright."""
    with pytest.raises(ValueError, match="now"):
        check(VALID_TOKEN, now=now)


@pytest.mark.parametrize(
    ("header", "payload"),
    [
        pytest.param(GOOD_HEADER, with_claims(future="x"), id="unknown claim"),
        pytest.param(GOOD_HEADER, with_claims(parent=["jti-0"]), id="parent chain"),
        pytest.param(GOOD_HEADER, with_claims(grants=[{"tool": "t", "pins": {}}]), id="empty pins"),
        pytest.param(GOOD_HEADER, with_claims(run_id="run-7"), id="run_id"),
        pytest.param(with_header(cty="json"), GOOD_CLAIMS, id="unknown header member"),
        pytest.param(GOOD_HEADER, with_claims(iat=0), id="iat at the epoch"),
        pytest.param(GOOD_HEADER, with_claims(exp=2**33), id="exp at the upper bound"),
    ],
)
def test_forward_compatible_variants_verify(
    header: dict[str, Any], payload: dict[str, Any]
) -> None:
    """Unknown claims and header members are ignored, and edge values within range pass."""
    claims = check(craft(header=header, payload=payload))
    assert claims.subject == "agent@service"


# ------------------------------------------------------------------------ vector table


@dataclass(frozen=True)
class Vector:
    """One crafted token, the error class it must raise, and a word its message must hold."""

    name: str
    build: Callable[[], str]
    error: type[TokenError]
    mentions: str = ""


def _flip_last_signature_bits(token: str) -> str:
    """Set the unused low bits of the last signature character (same bytes if decoded laxly)."""
    last = token[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return token[:-1] + alphabet[alphabet.index(last) | 0b11]


def header_vector(
    name: str, error: type[TokenError], mentions: str = "", **changes: object
) -> Vector:
    """A vector whose header differs from GOOD_HEADER by ``changes``; signed by key A."""
    return Vector(name, lambda: craft(header=with_header(**changes)), error, mentions)


def claims_vector(
    name: str, error: type[TokenError], mentions: str = "", **changes: object
) -> Vector:
    """A vector whose claims differ from GOOD_CLAIMS by ``changes``; signed by key A."""
    return Vector(name, lambda: craft(payload=with_claims(**changes)), error, mentions)


def grants_vector(name: str, grants: object, mentions: str) -> Vector:
    """A correctly signed vector with a malformed ``grants`` claim."""
    return claims_vector(name, TokenMalformedError, mentions, grants=grants)


def payload_vector(name: str, text: str, mentions: str) -> Vector:
    """A correctly signed vector whose payload is the raw JSON ``text``."""
    return Vector(name, lambda: craft(payload=text), TokenMalformedError, mentions)


def _exp_literal(literal: str) -> str:
    """GOOD_CLAIMS as JSON text with ``exp`` spelled as the raw JSON ``literal``."""
    return json.dumps(with_claims(exp="X"), separators=(",", ":")).replace('"X"', literal)


_GOOD_JSON: Final = json.dumps(GOOD_CLAIMS, separators=(",", ":"))
_NESTED: Final = "[" * 2000 + "]" * 2000
_NOT_UTF8_HEADER: Final = b64url(b'{"alg":"\xff"}')
_TRUNCATED_SIGNATURE: Final = b64url(base64.urlsafe_b64decode(VALID_SIGNATURE + "==")[:32])
_REORDERED_HEADER: Final = b64url_json({"typ": TOKEN_TYPE, "kid": KID, "alg": "EdDSA"})
_ANOTHER_SIGNING_INPUT: Final = craft(payload=with_claims(sub="other@service")).rsplit(".", 1)[0]
_MALFORMED: Final = TokenMalformedError

VECTORS: Final = [
    # Step 1: size and characters, before decoding.
    Vector("empty string", lambda: "", _MALFORMED),
    Vector("oversize garbage", lambda: "a" * (MAX_TOKEN_BYTES + 1), _MALFORMED, "larger"),
    Vector("non-ASCII", lambda: VALID_TOKEN.replace("e", "\u00e9", 1), _MALFORMED, "ASCII"),
    Vector("fullwidth dot", lambda: VALID_TOKEN.replace(".", "\uff0e", 1), _MALFORMED, "ASCII"),
    Vector("lone surrogate", lambda: VALID_TOKEN + "\ud800", _MALFORMED, "ASCII"),
    # Step 2: three canonical base64url segments; the header one JSON object.
    Vector("one segment", lambda: VALID_HEADER, _MALFORMED, "segments"),
    Vector("two segments", lambda: f"{VALID_HEADER}.{VALID_PAYLOAD}", _MALFORMED, "segments"),
    Vector("four segments", lambda: VALID_TOKEN + ".AAAA", _MALFORMED, "segments"),
    Vector(
        "padding on header",
        lambda: f"{VALID_HEADER}=.{VALID_PAYLOAD}.{VALID_SIGNATURE}",
        _MALFORMED,
        "header",
    ),
    Vector("padding on signature", lambda: VALID_TOKEN + "==", _MALFORMED, "signature"),
    Vector("standard base64 alphabet", lambda: VALID_TOKEN.replace("-", "+"), _MALFORMED),
    Vector("trailing newline", lambda: VALID_TOKEN + "\n", _MALFORMED, "signature"),
    Vector("space inside", lambda: VALID_TOKEN.replace(".", " .", 1), _MALFORMED, "header"),
    Vector(
        "non-canonical signature bits",
        lambda: _flip_last_signature_bits(VALID_TOKEN),
        _MALFORMED,
        "signature",
    ),
    Vector(
        "header not UTF-8",
        lambda: f"{_NOT_UTF8_HEADER}.{VALID_PAYLOAD}.{VALID_SIGNATURE}",
        _MALFORMED,
        "header is not UTF-8",
    ),
    Vector("header not JSON", lambda: craft(header="alg=EdDSA"), _MALFORMED, "header"),
    Vector("header a JSON array", lambda: craft(header='["EdDSA"]'), _MALFORMED, "object"),
    Vector("header JSON null", lambda: craft(header="null"), _MALFORMED, "object"),
    Vector(
        "header deeply nested",
        lambda: craft(header='{"alg":"EdDSA","x":' + _NESTED + "}"),
        _MALFORMED,
        "header is nested too deeply",
    ),
    Vector(
        "header duplicate alg",
        lambda: craft(header='{"alg":"none","alg":"EdDSA","kid":"k1","typ":"proviso-cap+jwt"}'),
        _MALFORMED,
        "duplicate",
    ),
    Vector(
        "header duplicate kid",
        lambda: craft(header='{"alg":"EdDSA","kid":"k9","kid":"k1","typ":"proviso-cap+jwt"}'),
        _MALFORMED,
        "duplicate",
    ),
    Vector(
        "header NaN",
        lambda: craft(header='{"alg":"EdDSA","kid":"k1","typ":"proviso-cap+jwt","x":NaN}'),
        _MALFORMED,
        "NaN",
    ),
    # Step 3: alg, against the pinned EdDSA, before any key is touched.
    header_vector("alg missing", TokenWrongAlgorithmError, "alg", alg=_DROP),
    Vector(
        "alg none unsigned",
        lambda: craft(header=with_header(alg="none"), signer=None),
        TokenWrongAlgorithmError,
        "none",
    ),
    header_vector("alg none signed", TokenWrongAlgorithmError, "none", alg="none"),
    header_vector("alg None capitalised", TokenWrongAlgorithmError, alg="None"),
    header_vector("alg HS256", TokenWrongAlgorithmError, "HS256", alg="HS256"),
    header_vector("alg RS256", TokenWrongAlgorithmError, "RS256", alg="RS256"),
    header_vector("alg ES256", TokenWrongAlgorithmError, alg="ES256"),
    header_vector("alg Ed25519", TokenWrongAlgorithmError, alg="Ed25519"),
    header_vector("alg lower case", TokenWrongAlgorithmError, alg="eddsa"),
    header_vector("alg null", TokenWrongAlgorithmError, alg=None),
    header_vector("alg list", TokenWrongAlgorithmError, alg=["EdDSA"]),
    header_vector("alg before typ", TokenWrongAlgorithmError, alg="HS256", typ="JWT"),
    header_vector("alg before kid", TokenWrongAlgorithmError, alg="HS256", kid="../x"),
    # Step 4: typ.
    header_vector("typ missing", _MALFORMED, "typ", typ=_DROP),
    header_vector("typ JWT", _MALFORMED, "typ", typ="JWT"),
    header_vector("typ other case", _MALFORMED, "typ", typ=TOKEN_TYPE.upper()),
    header_vector("typ null", _MALFORMED, "typ", typ=None),
    # Step 5: headers that name a key or change processing.
    header_vector("jku header", _MALFORMED, "jku", jku="https://attacker.test/jwks"),
    header_vector("x5u header", _MALFORMED, "x5u", x5u="https://attacker.test/cert"),
    header_vector("x5c header", _MALFORMED, "x5c", x5c=["MIIB"]),
    header_vector("jwk header", _MALFORMED, "jwk", jwk={"kty": "OKP", "crv": "Ed25519"}),
    header_vector("crit header", _MALFORMED, "crit", crit=["exp"]),
    header_vector("b64 header", _MALFORMED, "b64", b64=False),
    # Step 6: kid, by syntax, then by membership.
    header_vector("kid missing", _MALFORMED, "kid", kid=_DROP),
    header_vector("kid unknown", TokenUnknownKeyError, "k9", kid="k9"),
    header_vector("kid unknown, right syntax", TokenUnknownKeyError, kid="K1"),
    header_vector("kid path traversal", _MALFORMED, "kid", kid="../../etc/passwd"),
    header_vector("kid absolute path", _MALFORMED, "kid", kid="/dev/null"),
    header_vector("kid URL", _MALFORMED, "kid", kid="https://attacker.test/k"),
    header_vector("kid SQL", _MALFORMED, "kid", kid="k1' OR '1'='1"),
    header_vector("kid trailing newline", _MALFORMED, "kid", kid="k1\n"),
    header_vector("kid NUL", _MALFORMED, "kid", kid="k1\u0000"),
    header_vector("kid empty", _MALFORMED, "kid", kid=""),
    header_vector("kid too long", _MALFORMED, "kid", kid="k" * 129),
    header_vector("kid a number", _MALFORMED, "kid", kid=1),
    header_vector("kid a list", _MALFORMED, "kid", kid=["k1"]),
    # Step 7: signature over the exact bytes received.
    Vector("signature by another key", lambda: craft(signer=PRIVATE_B), TokenBadSignatureError),
    Vector("signature missing", lambda: craft(signer=None), TokenBadSignatureError),
    Vector(
        "signature truncated",
        lambda: f"{VALID_HEADER}.{VALID_PAYLOAD}.{_TRUNCATED_SIGNATURE}",
        TokenBadSignatureError,
    ),
    Vector(
        "signature all zero",
        lambda: f"{VALID_HEADER}.{VALID_PAYLOAD}.{b64url(bytes(64))}",
        TokenBadSignatureError,
    ),
    Vector(
        "signature of another token",
        lambda: f"{_ANOTHER_SIGNING_INPUT}.{VALID_SIGNATURE}",
        TokenBadSignatureError,
    ),
    Vector(
        "header re-encoded, same JSON members",
        lambda: f"{_REORDERED_HEADER}.{VALID_PAYLOAD}.{VALID_SIGNATURE}",
        TokenBadSignatureError,
    ),
    # Step 8: the payload and its claims (every token here is correctly signed).
    payload_vector("payload not JSON", "not json", "payload"),
    payload_vector("payload a JSON list", "[]", "payload"),
    payload_vector("payload deeply nested", _NESTED, "nested"),
    payload_vector("duplicate claim aud", _GOOD_JSON[:-1] + ',"aud":"other"}', "duplicate"),
    payload_vector("duplicate claim exp", _GOOD_JSON[:-1] + ',"exp":9999999999}', "duplicate"),
    payload_vector("exp as float literal", _exp_literal("1e10"), "exp"),
    payload_vector("exp Infinity", _exp_literal("Infinity"), "Infinity"),
    payload_vector("exp of 5000 digits", _exp_literal("9" * 5000), "too long"),
    claims_vector("exp missing", _MALFORMED, "exp", exp=_DROP),
    claims_vector("exp as string", _MALFORMED, "exp", exp=str(NOW + 300)),
    claims_vector("exp as float", _MALFORMED, "exp", exp=NOW + 300.0),
    claims_vector("exp as bool", _MALFORMED, "exp", exp=True),
    claims_vector("exp as null", _MALFORMED, "exp", exp=None),
    claims_vector("exp absurdly large", _MALFORMED, "exp", exp=10**20),
    claims_vector("exp just above 2**33", _MALFORMED, "exp", exp=2**33 + 1),
    claims_vector("exp negative", _MALFORMED, "exp", exp=-1),
    claims_vector("exp equal to nbf", _MALFORMED, "exp", exp=NOW),
    claims_vector("exp before nbf", _MALFORMED, "exp", exp=NOW - 1),
    claims_vector("nbf as string", _MALFORMED, "nbf", nbf=str(NOW)),
    claims_vector("nbf missing", _MALFORMED, "nbf", nbf=_DROP),
    claims_vector("iat as bool", _MALFORMED, "iat", iat=False),
    claims_vector("iat missing", _MALFORMED, "iat", iat=_DROP),
    claims_vector("iss missing", _MALFORMED, "iss", iss=_DROP),
    claims_vector("iss empty", _MALFORMED, "iss", iss=""),
    claims_vector("iss a list", _MALFORMED, "iss", iss=[ISSUER]),
    claims_vector("aud a list", _MALFORMED, "aud", aud=[AUDIENCE]),
    claims_vector("aud missing", _MALFORMED, "aud", aud=_DROP),
    claims_vector("sub missing", _MALFORMED, "sub", sub=_DROP),
    claims_vector("sub a number", _MALFORMED, "sub", sub=7),
    claims_vector("sub look-alike", _MALFORMED, "sub", sub="agent@serv\u0456ce"),
    claims_vector("sub control character", _MALFORMED, "sub", sub="agent@service\n"),
    claims_vector("jti missing", _MALFORMED, "jti", jti=_DROP),
    claims_vector("jti a number", _MALFORMED, "jti", jti=1),
    claims_vector("run_id a number", _MALFORMED, "run_id", run_id=7),
    claims_vector("run_id empty", _MALFORMED, "run_id", run_id=""),
    claims_vector("grants missing", _MALFORMED, "grants", grants=_DROP),
    grants_vector("grants empty", [], "grants"),
    grants_vector("grants not a list", {"tool": "billing.refund"}, "grants"),
    grants_vector("grant a string", ["billing.refund"], "grants[0]"),
    grants_vector("grant tool missing", [{"pins": {}}], "grants[0].tool"),
    grants_vector("grant tool empty", [{"tool": ""}], "grants[0].tool"),
    grants_vector("grant tool non-ASCII", [{"tool": "billing.ref\u00fcnd"}], "grants[0].tool"),
    grants_vector("grant tool a list", [{"tool": ["*"]}], "grants[0].tool"),
    grants_vector("grant unknown member", [{"tool": "t", "args": {}}], "args"),
    grants_vector("second grant bad", [{"tool": "t"}, {"tool": 1}], "grants[1].tool"),
    grants_vector("pins a list", [{"tool": "t", "pins": ["a"]}], "grants[0].pins"),
    grants_vector(
        "pin value a number", [{"tool": "t", "pins": {"invoice_id": 93}}], "pins.invoice_id"
    ),
    grants_vector("pin value null", [{"tool": "t", "pins": {"invoice_id": None}}], "invoice_id"),
    grants_vector("pin value a list", [{"tool": "t", "pins": {"invoice_id": ["a"]}}], "invoice_id"),
    grants_vector("pin name empty", [{"tool": "t", "pins": {"": "x"}}], "pins"),
    grants_vector("pin name look-alike", [{"tool": "t", "pins": {"invoice_\u0456d": "x"}}], "pins"),
    # Step 8, argument constraints: plain data, strictly typed, unknown operators refused.
    grants_vector("constraints a list", [{"tool": "t", "constraints": []}], "constraints"),
    grants_vector(
        "constraint a string", [{"tool": "t", "constraints": {"n": "<=5"}}], "constraints.n"
    ),
    grants_vector(
        "constraint unknown operator",
        [{"tool": "t", "constraints": {"n": {"max": "5", "regex": ".*"}}}],
        "regex",
    ),
    grants_vector(
        "constraint bound a JSON number",
        [{"tool": "t", "constraints": {"n": {"max": 5}}}],
        "constraints.n.max",
    ),
    grants_vector(
        "constraint bound with exponent",
        [{"tool": "t", "constraints": {"n": {"max": "5e3"}}}],
        "decimal",
    ),
    grants_vector(
        "constraint bound NaN", [{"tool": "t", "constraints": {"n": {"min": "NaN"}}}], "decimal"
    ),
    grants_vector("constraint empty", [{"tool": "t", "constraints": {"n": {}}}], "needs min, max"),
    grants_vector(
        "constraint min above max",
        [{"tool": "t", "constraints": {"n": {"min": "5", "max": "1"}}}],
        "above max",
    ),
    grants_vector(
        "constraint set and bound",
        [{"tool": "t", "constraints": {"c": {"in": ["USD"], "max": "1"}}}],
        "not both",
    ),
    grants_vector(
        "constraint set not a list",
        [{"tool": "t", "constraints": {"c": {"in": "USD"}}}],
        "constraints.c.in",
    ),
    grants_vector(
        "constraint set of numbers",
        [{"tool": "t", "constraints": {"c": {"in": [1, 2]}}}],
        "strings only",
    ),
    grants_vector(
        "constraint set empty", [{"tool": "t", "constraints": {"c": {"in": []}}}], "empty"
    ),
    grants_vector(
        "constraint set repeats",
        [{"tool": "t", "constraints": {"c": {"in": ["USD", "USD"]}}}],
        "repeats",
    ),
    grants_vector(
        "constraint name empty",
        [{"tool": "t", "constraints": {"": {"max": "1"}}}],
        "constraint name",
    ),
    # Step 8, the attenuation chain: a short list of distinct ids.
    claims_vector("parent a string", _MALFORMED, "parent", parent="jti-0"),
    claims_vector("parent empty", _MALFORMED, "parent", parent=[]),
    claims_vector("parent a number", _MALFORMED, "parent[0]", parent=[7]),
    claims_vector("parent empty id", _MALFORMED, "parent[1]", parent=["a", ""]),
    claims_vector("parent repeats", _MALFORMED, "repeats", parent=["a", "a"]),
    claims_vector("parent names itself", _MALFORMED, "repeats", parent=["jti-1"]),
    claims_vector(
        "parent chain too long", _MALFORMED, "more than 8", parent=[f"j{n}" for n in range(9)]
    ),
    # Step 9: issuer, then audience; exact comparison.
    claims_vector("wrong issuer", TokenWrongIssuerError, "evil", iss="https://evil.test"),
    claims_vector("issuer in other case", TokenWrongIssuerError, iss=ISSUER.upper()),
    claims_vector("wrong audience", TokenWrongAudienceError, "another", aud="another-sidecar"),
    claims_vector("audience plus space", TokenWrongAudienceError, aud=AUDIENCE + " "),
    claims_vector("issuer before audience", TokenWrongIssuerError, iss="x", aud="y"),
    # Step 10: time, with the default leeway of 5 seconds.
    claims_vector("expired", TokenExpiredError, iat=NOW - 600, nbf=NOW - 600, exp=NOW - 300),
    claims_vector("expired beyond leeway", TokenExpiredError, nbf=NOW - 60, exp=NOW - 5),
    claims_vector("not yet valid", TokenNotYetValidError, nbf=NOW + 60, exp=NOW + 600),
    claims_vector("not yet valid beyond leeway", TokenNotYetValidError, nbf=NOW + 6),
]


@pytest.mark.parametrize("vector", [pytest.param(v, id=v.name) for v in VECTORS])
def test_vector_is_refused_with_its_error(vector: Vector, forbid_io: list[str]) -> None:
    """Each crafted token raises exactly its expected error class, touching no file or socket."""
    token = vector.build()
    with pytest.raises(TokenError) as excinfo:
        check(token)
    assert type(excinfo.value) is vector.error, excinfo.value.message
    assert excinfo.value.code == vector.error.code
    assert vector.mentions in excinfo.value.message
    assert forbid_io == []


CALL_ERRORS: Final = {TokenOutOfScopeError, TokenRevokedError}
"""Refusals of a call rather than of a token: verify never raises them (see test_tokens_call)."""


def test_vectors_cover_every_error_class() -> None:
    """The table exercises every token-level TokenError subclass, so a new one needs vectors."""
    assert {v.error for v in VECTORS} == set(TokenError.__subclasses__()) - CALL_ERRORS


def test_vector_names_are_unique() -> None:
    """Vector names are test ids, so they must not repeat."""
    names = [v.name for v in VECTORS]
    assert len(names) == len(set(names))
