"""The CLI's --grant syntax: pins, and constraints written as people write them."""

from __future__ import annotations

import pytest

from sidecar.cli import UsageError, parse_grant, unverified_claims
from tokens import Constraint, Grant


@pytest.mark.parametrize(
    ("text", "grant"),
    [
        ("getInvoice", Grant("getInvoice")),
        ("getInvoice:invoice_id=in_1", Grant("getInvoice", {"invoice_id": "in_1"})),
        (
            "requestRefund:invoice_id=in_93K2,amount<=50,currency in USD|EUR",
            Grant(
                "requestRefund",
                {"invoice_id": "in_93K2"},
                {"amount": Constraint(max="50"), "currency": Constraint(one_of=["USD", "EUR"])},
            ),
        ),
        ("t:n>=1, n<=2.50", Grant("t", constraints={"n": Constraint(min="1", max="2.50")})),
        ("t:note=a=b", Grant("t", {"note": "a=b"})),
        # A pin whose value reads like an operator is still that pin (it was a constraint on
        # an argument named 'query=cats', leaving query unpinned).
        ("search:query=cats in hats", Grant("search", {"query": "cats in hats"})),
        ("t:note=a<=b", Grant("t", {"note": "a<=b"})),
        ("t:c in a=b", Grant("t", constraints={"c": Constraint(one_of=["a=b"])})),
        # Spaces around names, operators and set values are not part of them.
        ("t:invoice_id = in_1", Grant("t", {"invoice_id": "in_1"})),
        (
            "t:currency in USD | EUR",
            Grant("t", constraints={"currency": Constraint(one_of=["USD", "EUR"])}),
        ),
    ],
)
def test_a_grant_parses_into_pins_and_constraints(text: str, grant: Grant) -> None:
    """TOOL[:ARG=VALUE,ARG<=N,ARG>=N,ARG in A|B] gives exactly that grant."""
    assert parse_grant(text) == grant


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (":x=1", "expected TOOL"),
        ("t:x", "is not ARG=VALUE"),
        ("t:x=1,x=2", "given twice"),
        ("t:n<=5,n<=6", "empty or repeated"),
        ("t:n<=", "empty or repeated"),
        ("t:n<=1e3", "decimal string"),
        ("t:n>=5,n<=1", "above max"),
        ("t:c in USD,c<=5", "not both"),
        ("t:currency in USD|", "empty value"),
        ("t:currency in |USD", "empty value"),
        ("t:amount>=5<=10", "not an argument name"),
        ("t:a b<=5", "not an argument name"),
        ("t:amount=<=5", "ambiguous"),
        ("t:amount==5", "ambiguous"),
    ],
)
def test_a_bad_grant_is_a_usage_error_naming_it(text: str, match: str) -> None:
    """Malformed or contradictory items are usage errors (exit 2) that quote the grant."""
    with pytest.raises(UsageError, match=match):
        parse_grant(text)


def test_unverified_claims_decode_without_checking() -> None:
    """inspect and revoke --token read the header and payload; garbage is a usage error."""
    header, payload = unverified_claims("eyJhbGciOiJub25lIn0.eyJqdGkiOiJ4In0.")
    assert (header, payload) == ({"alg": "none"}, {"jti": "x"})
    for garbage in ("abc", "a.b.c", "W10.W10.x"):
        with pytest.raises(UsageError):
            unverified_claims(garbage)
