"""verify_call: the offline verifier a tool backend uses, without the sidecar."""

from __future__ import annotations

from decimal import Decimal
from typing import Final

import pytest

from tokens import (
    Constraint,
    Grant,
    SigningKey,
    TokenExpiredError,
    TokenOutOfScopeError,
    TokenRevokedError,
    TokenUnknownKeyError,
    VerificationKeys,
    attenuate,
    issue,
    verify,
    verify_call,
)

NOW: Final = 1_767_225_600
KEY: Final = SigningKey.generate(kid="sidecar-1")
JWKS: Final = VerificationKeys.from_signing_keys([KEY]).to_jwks()
GRANT: Final = Grant(
    "requestRefund",
    {"invoice_id": "in_93K2"},
    {"amount": Constraint(max="50"), "currency": Constraint(one_of=["USD", "EUR"])},
)
BODY: Final = '{"invoice_id": "in_93K2", "amount": 49.99, "currency": "USD"}'


def _token(*grants: Grant, ttl: int = 300, run_id: str | None = None) -> str:
    return issue(
        KEY,
        issuer="proviso",
        subject="billing@service",
        audience="proviso",
        grants=grants or (GRANT,),
        ttl_seconds=ttl,
        now=NOW,
        run_id=run_id,
        token_id="jti-root",
    )


def _call(token: str, tool: str = "requestRefund", arguments: object = BODY, **kw: object) -> Grant:
    keys = VerificationKeys.from_jwks(JWKS)
    call = verify_call(
        token,
        keys,
        audience="proviso",
        issuer="proviso",
        tool=tool,
        arguments=arguments,  # type: ignore[arg-type]
        now=kw.pop("now", NOW + 1),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )
    assert call.claims.subject == "billing@service"
    return call.grant


def test_an_in_scope_call_returns_the_grant_that_allows_it() -> None:
    """From the JWKS, a token and the JSON body, the tool gets the verified grant."""
    assert _call(_token()) == GRANT


def test_arguments_may_be_a_mapping() -> None:
    """A mapping of already parsed arguments is checked the same way."""
    arguments = {"invoice_id": "in_93K2", "amount": Decimal("50"), "currency": "EUR"}
    assert _call(_token(), arguments=arguments) == GRANT


def test_an_argument_over_its_bound_is_out_of_scope_naming_the_constraint() -> None:
    """amount 50.01 breaks 'amount <= 50': refused with the argument and the constraint named."""
    with pytest.raises(TokenOutOfScopeError) as caught:
        _call(_token(), arguments=BODY.replace("49.99", "50.01"))
    assert caught.value.code == "OUT_OF_SCOPE"
    assert caught.value.argument == "amount"
    assert caught.value.tool == "requestRefund"
    assert "amount <= 50" in caught.value.message


def test_another_tool_is_out_of_scope() -> None:
    """A token for refunds does not allow another tool, whatever its arguments."""
    with pytest.raises(TokenOutOfScopeError) as caught:
        _call(_token(), tool="closeAccount")
    assert caught.value.argument == ""
    assert "does not grant tool 'closeAccount'" in caught.value.message


def test_a_run_bound_token_needs_its_run() -> None:
    """A token bound to a run is refused for another run, and without one."""
    token = _token(run_id="run-7")
    assert _call(token, run_id="run-7") == GRANT
    with pytest.raises(TokenOutOfScopeError, match="run-7"):
        _call(token)


def test_token_refusals_come_first() -> None:
    """An expired token, or one from an unknown key, fails as such before any scope check."""
    with pytest.raises(TokenExpiredError):
        _call(_token(ttl=60), tool="anything", now=NOW + 3600)
    stranger = issue(
        SigningKey.generate(kid="other"),
        issuer="proviso",
        subject="billing@service",
        audience="proviso",
        grants=[GRANT],
        ttl_seconds=60,
        now=NOW,
    )
    with pytest.raises(TokenUnknownKeyError):
        _call(stranger)


def test_revoked_ids_refuse_the_token_and_its_descendants() -> None:
    """A revocation list naming the token, or any ancestor, refuses it with that id."""
    root = _token()
    claims = verify(root, VerificationKeys.from_jwks(JWKS), audience="proviso", issuer="proviso",
                    now=NOW)  # fmt: skip
    child = attenuate(claims, KEY, grants=[GRANT], now=NOW, token_id="jti-child")
    with pytest.raises(TokenRevokedError) as own:
        _call(root, revoked={"jti-root"})
    assert own.value.token_id == "jti-root"
    with pytest.raises(TokenRevokedError) as ancestor:
        _call(child, revoked={"jti-root"})
    assert (ancestor.value.token_id, ancestor.value.code) == ("jti-root", "TOKEN_REVOKED")
    assert "ancestor" in ancestor.value.message
    assert _call(child, revoked={"someone-else"}) == GRANT


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('{"amount": 1, "amount": 100}', "repeat"),
        ('{"amount": NaN}', "NaN"),
        ("[1]", "one JSON object"),
        ("[" * 5000 + "]" * 5000, "nested|object"),
        ('{"amount": 1e99999999999999999999}', "out of range"),
    ],
)
def test_ambiguous_argument_text_is_refused(body: str, match: str) -> None:
    """JSON text the sidecar would read differently (duplicates, NaN, not an object) is refused."""
    with pytest.raises(ValueError, match=match):
        _call(_token(), arguments=body)


def test_arguments_of_another_type_are_a_type_error() -> None:
    """A list of arguments is a programming error, not a refusal."""
    with pytest.raises(TypeError, match="arguments"):
        _call(_token(), arguments=[("amount", 1)])
