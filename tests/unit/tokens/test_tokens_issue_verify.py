"""Issuing and verifying capability tokens: the round trip, the wire format, argument checks."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from typing import Any, Final

import pytest

from tokens import (
    ALGORITHM,
    MAX_TOKEN_BYTES,
    TOKEN_TYPE,
    CapabilityClaims,
    Grant,
    SigningKey,
    TokenBadSignatureError,
    TokenUnknownKeyError,
    VerificationKeys,
    issue,
    verify,
)

NOW: Final = 1_767_225_600  # 2026-01-01T00:00:00Z
ISSUER: Final = "orchestrator@service"
AUDIENCE: Final = "proviso-sidecar"
SUBJECT: Final = "billing-resolution-agent@service"
REFUND: Final = Grant("billing.refund", {"invoice_id": "in_93K2", "currency": "EUR"})
LOOKUP: Final = Grant("billing.lookup")


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """The issuer's signing key."""
    return SigningKey.generate(kid="issuer-2026-01")


@pytest.fixture(scope="module")
def keys(key: SigningKey) -> VerificationKeys:
    """The verifier's trusted keys: the issuer's public key."""
    return VerificationKeys.from_signing_keys([key])


def _issue(key: SigningKey, **overrides: Any) -> str:
    arguments: dict[str, Any] = {
        "issuer": ISSUER,
        "subject": SUBJECT,
        "audience": AUDIENCE,
        "grants": [REFUND, LOOKUP],
        "ttl_seconds": 300,
        "now": NOW,
    }
    arguments.update(overrides)
    return issue(key, **arguments)


def _verify(token: str, keys: VerificationKeys, **overrides: Any) -> CapabilityClaims:
    arguments: dict[str, Any] = {"audience": AUDIENCE, "issuer": ISSUER, "now": NOW}
    arguments.update(overrides)
    return verify(token, keys, **arguments)


def _segment(token: str, index: int) -> dict[str, Any]:
    segment = token.split(".")[index]
    value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    assert isinstance(value, dict)
    return value


# ------------------------------------------------------------------------- round trip


def test_round_trip_keeps_every_claim(key: SigningKey, keys: VerificationKeys) -> None:
    """What issue puts in comes out of verify unchanged, with the verifying kid."""
    token = _issue(key, run_id="run-42", token_id="tok-1")
    claims = _verify(token, keys, now=NOW + 10)
    assert claims == CapabilityClaims(
        issuer=ISSUER,
        subject=SUBJECT,
        audience=AUDIENCE,
        issued_at=NOW,
        not_before=NOW,
        expires_at=NOW + 300,
        token_id="tok-1",
        grants=(REFUND, LOOKUP),
        run_id="run-42",
        key_id="issuer-2026-01",
    )


def test_run_id_is_optional(key: SigningKey, keys: VerificationKeys) -> None:
    """Without run_id the claim is absent from the token and None after verify."""
    token = _issue(key)
    assert "run_id" not in _segment(token, 1)
    assert _verify(token, keys).run_id is None


def test_header_is_exactly_alg_typ_kid(key: SigningKey) -> None:
    """The JWS header carries the pinned alg, the capability typ and the key's kid, nothing else."""
    assert _segment(_issue(key), 0) == {"alg": ALGORITHM, "kid": key.kid, "typ": TOKEN_TYPE}


def test_payload_layout(key: SigningKey) -> None:
    """iat and nbf are now, exp is now + ttl, aud is a string and empty pins are omitted."""
    payload = _segment(_issue(key, token_id="tok-1"), 1)
    assert payload == {
        "iss": ISSUER,
        "sub": SUBJECT,
        "aud": AUDIENCE,
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 300,
        "jti": "tok-1",
        "grants": [
            {"tool": "billing.refund", "pins": {"invoice_id": "in_93K2", "currency": "EUR"}},
            {"tool": "billing.lookup"},
        ],
    }


def test_default_token_id_is_128_random_bits(key: SigningKey) -> None:
    """Without token_id, jti is 16 random bytes in unpadded base64url, different every time."""
    first = _segment(_issue(key), 1)["jti"]
    second = _segment(_issue(key), 1)["jti"]
    assert first != second
    assert len(first) == 22
    assert len(base64.urlsafe_b64decode(first + "==")) == 16


def test_verify_accepts_a_fractional_now(key: SigningKey, keys: VerificationKeys) -> None:
    """now may be a float; exp is compared with it exactly."""
    token = _issue(key, ttl_seconds=1)
    assert _verify(token, keys, now=NOW + 0.999, leeway_seconds=0).expires_at == NOW + 1


def test_neither_issue_nor_verify_reads_the_clock(
    key: SigningKey, keys: VerificationKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Time is a parameter: with the clock broken, issuing and verifying still work."""

    def broken_clock() -> float:
        raise AssertionError("tokens must not read the clock")

    monkeypatch.setattr(time, "time", broken_clock)
    monkeypatch.setattr(time, "monotonic", broken_clock)
    assert _verify(_issue(key), keys).subject == SUBJECT


def test_rotation_selects_the_key_by_kid(keys: VerificationKeys, key: SigningKey) -> None:
    """With old and new keys trusted, each token verifies with the key its kid names."""
    new = SigningKey.generate(kid="issuer-2026-02")
    both = VerificationKeys.from_signing_keys([key, new])
    assert _verify(_issue(key), both).key_id == "issuer-2026-01"
    assert _verify(_issue(new), both).key_id == "issuer-2026-02"
    with pytest.raises(TokenUnknownKeyError):
        _verify(_issue(new), keys)


def test_same_kid_different_key_is_bad_signature(keys: VerificationKeys) -> None:
    """A token from another key that reuses a trusted kid does not verify."""
    impostor = SigningKey.generate(kid="issuer-2026-01")
    with pytest.raises(TokenBadSignatureError):
        _verify(_issue(impostor), keys)


# ------------------------------------------------------------------ verify's arguments


@pytest.mark.parametrize("leeway", [0, 5, 30])
def test_leeway_within_bounds_is_accepted(
    key: SigningKey, keys: VerificationKeys, leeway: int
) -> None:
    """Any leeway from 0 to MAX_LEEWAY_SECONDS is accepted."""
    assert _verify(_issue(key), keys, leeway_seconds=leeway).subject == SUBJECT


@pytest.mark.parametrize("leeway", [31, -1, True, 5.0])
def test_leeway_outside_bounds_is_a_value_error(
    key: SigningKey, keys: VerificationKeys, leeway: object
) -> None:
    """A leeway that is not an int from 0 to 30 is refused before the token is looked at."""
    with pytest.raises(ValueError, match="leeway_seconds"):
        _verify(_issue(key), keys, leeway_seconds=leeway)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"audience": ""}, ValueError),
        ({"issuer": ""}, ValueError),
        ({"now": "1767225600"}, TypeError),
        ({"now": True}, TypeError),
        ({"now": float("nan")}, ValueError),
    ],
)
def test_verify_refuses_bad_arguments(
    key: SigningKey, keys: VerificationKeys, overrides: dict[str, object], error: type[Exception]
) -> None:
    """Configuration mistakes in verify's arguments are programming errors, not token errors."""
    with pytest.raises(error):
        _verify(_issue(key), keys, **overrides)


def test_verify_refuses_bytes_and_plain_key_mappings(
    key: SigningKey, keys: VerificationKeys
) -> None:
    """The token must be a str and the keys a VerificationKeys."""
    token = _issue(key)
    with pytest.raises(TypeError):
        verify(token.encode(), keys, audience=AUDIENCE, issuer=ISSUER, now=NOW)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        verify(token, {key.kid: key.public_key()}, audience=AUDIENCE, issuer=ISSUER, now=NOW)  # type: ignore[arg-type]


# ------------------------------------------------------------------- issue's arguments


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"ttl_seconds": 0}, ValueError, "ttl_seconds"),
        ({"ttl_seconds": -60}, ValueError, "ttl_seconds"),
        ({"ttl_seconds": True}, TypeError, "ttl_seconds"),
        ({"ttl_seconds": 1.5}, TypeError, "ttl_seconds"),
        ({"grants": []}, ValueError, "grants"),
        ({"grants": [{"tool": "billing.refund"}]}, TypeError, "Grant"),
        ({"subject": "agént"}, ValueError, "subject"),
        ({"subject": ""}, ValueError, "subject"),
        ({"issuer": ""}, ValueError, "issuer"),
        ({"audience": ""}, ValueError, "audience"),
        ({"now": -1}, ValueError, "now"),
        ({"now": 1.5}, TypeError, "now"),
        ({"now": 2**33 - 10, "ttl_seconds": 11}, ValueError, "ttl_seconds"),
        ({"run_id": ""}, ValueError, "run_id"),
        ({"token_id": ""}, ValueError, "token_id"),
    ],
)
def test_issue_refuses_bad_arguments(
    key: SigningKey, overrides: dict[str, object], error: type[Exception], match: str
) -> None:
    """issue refuses what verify would refuse, so it never mints an unusable token."""
    with pytest.raises(error, match=match):
        _issue(key, **overrides)


def test_issue_refuses_a_token_over_the_size_cap(key: SigningKey) -> None:
    """Too many grants to fit in MAX_TOKEN_BYTES is an error at issue time."""
    grants = [Grant(f"tool.{index}", {"resource": "r" * 40}) for index in range(200)]
    with pytest.raises(ValueError, match="MAX_TOKEN_BYTES"):
        _issue(key, grants=grants)


def test_issue_refuses_a_non_signing_key(key: SigningKey) -> None:
    """Only a SigningKey can sign; a raw cryptography key is a TypeError."""
    with pytest.raises(TypeError, match="SigningKey"):
        issue(
            key.public_key(),  # type: ignore[arg-type]
            issuer=ISSUER,
            subject=SUBJECT,
            audience=AUDIENCE,
            grants=[LOOKUP],
            ttl_seconds=60,
            now=NOW,
        )


def test_issued_token_at_size_limit_still_verifies(key: SigningKey, keys: VerificationKeys) -> None:
    """The largest token issue accepts is one verify accepts."""
    grants = [REFUND]
    while True:
        candidate = [*grants, Grant(f"tool.{len(grants)}", {"resource": "r" * 40})]
        try:
            token = _issue(key, grants=candidate)
        except ValueError:
            break
        grants = candidate
    token = _issue(key, grants=grants)
    assert len(token) <= MAX_TOKEN_BYTES
    assert _verify(token, keys).grants == tuple(grants)


# ---------------------------------------------------------------------- claims, grants


def test_grants_for_matches_the_tool_byte_for_byte() -> None:
    """grants_for returns the grants for exactly that tool name, no case folding or trimming."""
    other_refund = Grant("billing.refund", {"invoice_id": "in_1"})
    claims = CapabilityClaims(
        issuer=ISSUER,
        subject=SUBJECT,
        audience=AUDIENCE,
        issued_at=NOW,
        not_before=NOW,
        expires_at=NOW + 1,
        token_id="t",
        grants=(REFUND, LOOKUP, other_refund),
    )
    assert claims.grants_for("billing.refund") == (REFUND, other_refund)
    assert claims.grants_for("billing.lookup") == (LOOKUP,)
    assert claims.grants_for("Billing.refund") == ()
    assert claims.grants_for("billing.refund ") == ()
    assert claims.grants_for("billing") == ()


def test_grant_pins_are_a_read_only_copy() -> None:
    """Changing the dict a grant was built from, or the grant's pins, cannot widen it."""
    source = {"invoice_id": "in_93K2"}
    grant = Grant("billing.refund", source)
    source["invoice_id"] = "in_ANY"
    assert grant.pins == {"invoice_id": "in_93K2"}
    with pytest.raises(TypeError):
        grant.pins["invoice_id"] = "in_ANY"  # type: ignore[index]


def test_grant_and_claims_are_frozen(key: SigningKey, keys: VerificationKeys) -> None:
    """Grants and verified claims cannot be reassigned after construction."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        REFUND.tool = "admin.delete_everything"  # type: ignore[misc]
    claims = _verify(_issue(key), keys)
    with pytest.raises(dataclasses.FrozenInstanceError):
        claims.expires_at = NOW + 10**6  # type: ignore[misc]


def test_grants_compare_and_hash_by_value() -> None:
    """Equal grants are equal and hash alike, so they can live in sets."""
    assert Grant("t", {"a": "1", "b": "2"}) == Grant("t", {"b": "2", "a": "1"})
    assert len({Grant("t", {"a": "1"}), Grant("t", {"a": "1"}), Grant("t")}) == 2
    assert Grant("t") == Grant("t", {})


def test_grant_to_claim_omits_empty_pins() -> None:
    """The claim form carries pins only when there are some."""
    assert Grant("t").to_claim() == {"tool": "t"}
    assert Grant("t", {"a": "1"}).to_claim() == {"tool": "t", "pins": {"a": "1"}}


@pytest.mark.parametrize(
    ("tool", "pins", "match"),
    [
        ("", {}, "tool"),
        ("billing.ref\u00fcnd", {}, "tool"),
        ("billing\x00refund", {}, "tool"),
        ("t", {"": "x"}, "pin name"),
        ("t", {"n\u00e4me": "x"}, "pin name"),
        ("t", {"invoice_id": 93}, "invoice_id"),
        ("t", [("invoice_id", "x")], "mapping"),
    ],
)
def test_grant_refuses_what_verify_would_refuse(tool: str, pins: object, match: str) -> None:
    """A Grant cannot be built with a tool or pin that would make the token malformed."""
    with pytest.raises(ValueError, match=match):
        Grant(tool, pins)  # type: ignore[arg-type]
