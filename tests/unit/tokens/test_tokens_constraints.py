"""Argument constraints in grants: their strict data format and their exact checking."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

import pytest

from tokens import CapabilityClaims, Constraint, Grant, SigningKey, VerificationKeys, issue, verify
from tokens.scope import ViolationKind, argument_number, find_grant, grant_violation

NOW: Final = 1_767_225_600
KEY: Final = SigningKey.generate(kid="c1")
KEYS: Final = VerificationKeys.from_signing_keys([KEY])
REFUND: Final = Grant(
    "requestRefund",
    {"invoice_id": "in_93K2"},
    {"amount": Constraint(max="50"), "currency": Constraint(one_of=["USD", "EUR"])},
)


def _claims(*grants: Grant, run_id: str | None = None) -> CapabilityClaims:
    token = issue(
        KEY,
        issuer="proviso",
        subject="agent@service",
        audience="proviso",
        grants=grants,
        ttl_seconds=60,
        now=NOW,
        run_id=run_id,
    )
    return verify(token, KEYS, audience="proviso", issuer="proviso", now=NOW)


def _args(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"invoice_id": "in_93K2", "amount": Decimal("49.00"), "currency": "USD"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def test_constraints_round_trip_through_a_token() -> None:
    """A grant's constraints come back from verify exactly as issued, bounds as text."""
    claims = _claims(REFUND)
    assert claims.grants == (REFUND,)
    assert claims.grants[0].to_claim() == {
        "tool": "requestRefund",
        "pins": {"invoice_id": "in_93K2"},
        "constraints": {"amount": {"max": "50"}, "currency": {"in": ["EUR", "USD"]}},
    }


@pytest.mark.parametrize(
    ("kwargs", "claim"),
    [
        ({"max": "50"}, {"max": "50"}),
        ({"min": 1, "max": Decimal("2.50")}, {"min": "1", "max": "2.50"}),
        ({"min": Decimal("1E+2")}, {"min": "100"}),
        ({"max": "-0.25"}, {"max": "-0.25"}),
        ({"one_of": ("b", "a")}, {"in": ["a", "b"]}),
    ],
)
def test_constraint_bounds_are_written_as_plain_decimal_text(
    kwargs: dict[str, Any], claim: dict[str, Any]
) -> None:
    """Bounds from str, int or Decimal are written as plain decimals, sets sorted."""
    assert Constraint(**kwargs).to_claim() == claim


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "needs min, max or one_of"),
        ({"max": "1e3"}, "decimal string"),
        ({"max": "050"}, "decimal string"),
        ({"max": "+5"}, "decimal string"),
        ({"max": " 5"}, "decimal string"),
        ({"max": "NaN"}, "decimal string"),
        ({"max": "5."}, "decimal string"),
        ({"max": "1" * 41}, "decimal string"),
        ({"max": 5.0}, "decimal string"),
        ({"max": True}, "not bool"),
        ({"max": Decimal("Infinity")}, "finite"),
        ({"min": "5", "max": "4"}, "above max"),
        ({"one_of": []}, "not be empty"),
        ({"one_of": "USD"}, "list of strings"),
        ({"one_of": ["USD", 1]}, "strings only"),
        ({"one_of": ["USD", "USD"]}, "repeats"),
        ({"one_of": [str(n) for n in range(65)]}, "more than 64"),
        ({"one_of": ["USD"], "max": "5"}, "not both"),
    ],
)
def test_constraint_refuses_what_a_verifier_would(kwargs: dict[str, Any], match: str) -> None:
    """A constraint that is ambiguous, unsatisfiable or not plain data is refused on creation."""
    with pytest.raises(ValueError, match=match):
        Constraint(**kwargs)


def test_grant_refuses_a_constraint_that_is_not_a_constraint() -> None:
    """Grant constraints must be Constraint objects under printable ASCII names."""
    with pytest.raises(ValueError, match="must be a Constraint"):
        Grant("t", constraints={"amount": {"max": "5"}})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="constraint name"):
        Grant("t", constraints={"am\u00f6unt": Constraint(max="5")})
    with pytest.raises(ValueError, match="must be a mapping"):
        Grant("t", constraints=[Constraint(max="5")])  # type: ignore[arg-type]


def test_constraints_take_part_in_grant_equality() -> None:
    """Two grants differing only in a constraint are different grants (and hash apart)."""
    tight = Grant("t", constraints={"a": Constraint(max="5")})
    loose = Grant("t", constraints={"a": Constraint(max="6")})
    assert tight != loose
    assert tight == Grant("t", constraints={"a": Constraint(max="5.0")}), "5 and 5.0 agree"
    assert len({tight, loose, Grant("t")}) == 3
    assert "constraints" in repr(tight)


def test_describe_uses_the_notation_people_write() -> None:
    """A constraint describes itself as 'amount <= 50', '1 <= amount', 'currency in [...]'."""
    assert Constraint(max="50").describe("amount") == "amount <= 50"
    assert Constraint(min="1").describe("amount") == "1 <= amount"
    assert Constraint(min="1", max="2").describe("n") == "1 <= n <= 2"
    assert Constraint(one_of=["USD", "EUR"]).describe("currency") == "currency in [EUR, USD]"


@pytest.mark.parametrize(
    ("changes", "argument"),
    [
        ({}, None),
        ({"amount": Decimal("50")}, None),
        ({"amount": Decimal("50.000")}, None),
        ({"amount": 50}, None),
        ({"amount": 49.99}, None),
        ({"currency": "EUR"}, None),
        ({"amount": Decimal("50.001")}, "amount"),
        ({"amount": Decimal("50.0000000000000000000000000001")}, "amount"),
        ({"amount": 51}, "amount"),
        ({"amount": 50.00000000001}, "amount"),
        ({"amount": "49"}, "amount"),
        ({"amount": True}, "amount"),
        ({"amount": Decimal("NaN")}, "amount"),
        ({"amount": float("inf")}, "amount"),
        ({"amount": None}, "amount"),
        ({"currency": "usd"}, "currency"),
        ({"currency": ["USD"]}, "currency"),
        ({"currency": None}, "currency"),
        ({"invoice_id": "in_OTHER", "amount": 9000}, "invoice_id"),
    ],
)
def test_grant_violation_is_exact(changes: dict[str, Any], argument: str | None) -> None:
    """Bounds are inclusive and exact decimals; sets are byte-exact; absent arguments fail."""
    violation = grant_violation(REFUND, _args(**changes))
    if argument is None:
        assert violation is None
        return
    assert violation is not None
    assert (violation.kind, violation.argument) == (ViolationKind.ARGUMENT, argument)


def test_violation_message_names_the_constraint() -> None:
    """An out-of-bounds argument is refused with the constraint it broke, in plain notation."""
    violation = grant_violation(REFUND, _args(amount=Decimal("120")))
    assert violation is not None
    assert violation.message == (
        "argument 'amount' is 120, outside the token's constraint amount <= 50"
    )
    missing = grant_violation(REFUND, _args(currency=None))
    assert missing is not None
    assert "currency in [EUR, USD]" in missing.message
    assert "missing" in missing.message


def test_pins_are_checked_before_constraints() -> None:
    """With both a pin and a constraint broken, the pin is reported (deterministic order)."""
    violation = grant_violation(REFUND, _args(invoice_id="x", amount=1000))
    assert violation is not None
    assert violation.argument == "invoice_id"


def test_any_grant_for_the_tool_may_allow_the_call() -> None:
    """Of two grants for one tool, the one whose constraints hold allows the call."""
    small = Grant("t", constraints={"n": Constraint(max="5")})
    large = Grant("t", constraints={"n": Constraint(min="100")})
    claims = _claims(small, large)
    assert find_grant(claims, "t", {"n": 200}, None) == large
    refused = find_grant(claims, "t", {"n": 50}, None)
    assert not isinstance(refused, Grant)
    assert "n <= 5" in refused.message, "the first grant's violation is reported"


def test_a_run_bound_token_serves_only_its_run() -> None:
    """A token bound to a run is out of scope in another run or with no run."""
    claims = _claims(Grant("t"), run_id="run-1")
    assert find_grant(claims, "t", {}, "run-1") == Grant("t")
    for other in ("run-2", "", None):
        violation = find_grant(claims, "t", {}, other)
        assert not isinstance(violation, Grant)
        assert violation.kind is ViolationKind.RUN


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3, Decimal(3)),
        (Decimal("0.1"), Decimal("0.1")),
        (0.1, Decimal("0.1")),
        (True, None),
        ("1", None),
        (None, None),
        (float("nan"), None),
        (Decimal("sNaN"), None),
    ],
)
def test_argument_number_reads_numbers_exactly(value: object, expected: Decimal | None) -> None:
    """Ints and Decimals are exact, floats by their shortest repr, anything else is no number."""
    assert argument_number(value) == expected
