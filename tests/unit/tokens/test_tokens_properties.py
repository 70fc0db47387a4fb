"""Properties of issue and verify over generated inputs (hypothesis)."""

from __future__ import annotations

import base64
import json
from typing import Any, Final

from hypothesis import given, settings
from hypothesis import strategies as st

from tokens import (
    TOKEN_TYPE,
    CapabilityClaims,
    Grant,
    SigningKey,
    TokenError,
    VerificationKeys,
    issue,
    verify,
)

NOW: Final = 1_767_225_600
ISSUER: Final = "orchestrator@service"
AUDIENCE: Final = "proviso-sidecar"
# Module-level rather than fixtures: hypothesis runs many examples per test function.
KEY: Final = SigningKey.generate(kid="prop-key")
KEYS: Final = VerificationKeys.from_signing_keys([KEY])
REFERENCE_TOKEN: Final = issue(
    KEY,
    issuer=ISSUER,
    subject="agent@service",
    audience=AUDIENCE,
    grants=[Grant("billing.refund", {"invoice_id": "in_93K2"})],
    ttl_seconds=300,
    now=NOW,
    run_id="run-1",
)

PROPERTY_SETTINGS: Final = settings(max_examples=150, deadline=None, database=None)

identifiers = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=24
)
pin_values = st.text(max_size=24)
grants = st.builds(
    Grant,
    tool=identifiers,
    pins=st.dictionaries(identifiers, pin_values, max_size=4),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
claim_names = st.sampled_from(["iss", "sub", "aud", "iat", "nbf", "exp", "jti", "grants", "run_id"])
header_names = st.sampled_from(["alg", "typ", "kid", "crit", "jku", "cty"])


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(header: dict[str, Any], payload: dict[str, Any]) -> str:
    """Sign arbitrary JSON with the trusted key, as a compromised or buggy issuer might."""
    signing_input = (
        f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(payload).encode())}"
    )
    private = KEY._private_key  # the test plays the issuer, bypassing issue()'s checks
    return f"{signing_input}.{_b64url(private.sign(signing_input.encode()))}"


def _check(token: str) -> CapabilityClaims:
    return verify(token, KEYS, audience=AUDIENCE, issuer=ISSUER, now=NOW)


@PROPERTY_SETTINGS
@given(
    subject=identifiers,
    granted=st.lists(grants, min_size=1, max_size=5),
    ttl=st.integers(min_value=1, max_value=86_400),
    run_id=st.none() | st.text(min_size=1, max_size=24),
)
def test_issue_then_verify_round_trips_exactly(
    subject: str, granted: list[Grant], ttl: int, run_id: str | None
) -> None:
    """For any ASCII identifiers, grants and pins, verify returns exactly what was issued."""
    token = issue(
        KEY,
        issuer=ISSUER,
        subject=subject,
        audience=AUDIENCE,
        grants=granted,
        ttl_seconds=ttl,
        now=NOW,
        run_id=run_id,
    )
    claims = _check(token)
    assert claims.subject == subject
    assert claims.grants == tuple(granted)
    assert [dict(grant.pins) for grant in claims.grants] == [dict(g.pins) for g in granted]
    assert claims.expires_at == NOW + ttl
    assert claims.run_id == run_id
    assert claims.key_id == KEY.kid


@PROPERTY_SETTINGS
@given(
    index=st.integers(min_value=0, max_value=len(REFERENCE_TOKEN) - 1),
    replacement=st.sampled_from(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \u00e9"
    ),
)
def test_no_single_character_change_verifies(index: int, replacement: str) -> None:
    """Changing any one character of a valid token makes verify raise a TokenError."""
    mutated = REFERENCE_TOKEN[:index] + replacement + REFERENCE_TOKEN[index + 1 :]
    if mutated == REFERENCE_TOKEN:
        return
    try:
        _check(mutated)
    except TokenError:
        return
    raise AssertionError(f"mutated token verified: {mutated}")


@PROPERTY_SETTINGS
@given(
    token=st.text(max_size=300)
    | st.from_regex(
        r"[A-Za-z0-9_-]{0,60}\.[A-Za-z0-9_-]{0,60}\.[A-Za-z0-9_-]{0,90}", fullmatch=True
    )
)
def test_arbitrary_text_only_ever_raises_token_errors(token: str) -> None:
    """Whatever string arrives, verify refuses it with a TokenError, never another exception."""
    try:
        _check(token)
    except TokenError:
        return
    raise AssertionError("arbitrary text verified")


@PROPERTY_SETTINGS
@given(
    header_changes=st.dictionaries(header_names, json_values, max_size=2),
    claim_changes=st.dictionaries(claim_names, json_values, max_size=3),
)
def test_signed_garbage_claims_are_refused_cleanly(
    header_changes: dict[str, Any], claim_changes: dict[str, Any]
) -> None:
    """Even correctly signed, malformed headers and claims yield a TokenError or valid claims."""
    header = {"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": KEY.kid, **header_changes}
    payload = {
        "iss": ISSUER,
        "sub": "agent@service",
        "aud": AUDIENCE,
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 60,
        "jti": "j",
        "grants": [{"tool": "t"}],
        **claim_changes,
    }
    try:
        claims = _check(_signed(header, payload))
    except TokenError:
        return
    assert claims.issuer == ISSUER
    assert claims.audience == AUDIENCE
    assert claims.not_before <= NOW + 5 < claims.expires_at + 10
