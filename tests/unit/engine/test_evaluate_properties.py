"""Properties of evaluate() over generated amounts and arguments (hypothesis)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any, Final

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.engine import Decision, Outcome, ReasonCode, ToolCall, evaluate
from sidecar.policy.loader import load_policy
from sidecar.policy.model import TierAction
from tests.unit.engine.helpers import claims, grant, policy, tier, tool

# Module-level rather than the session fixture: hypothesis runs many examples per test.
EXAMPLE: Final = load_policy(Path(__file__).resolve().parents[3] / "policies")
BILLING: Final = "billing-resolution-agent@service"
REFUND_TOKEN: Final = claims(grant("requestRefund", invoice_id="in_93K2"), subject=BILLING)
PROPERTY_SETTINGS: Final = settings(max_examples=200, deadline=None, database=None)

# Valid amounts: positive multiples of 0.01, as a client would send them (with 0-2 decimals).
cents = st.integers(min_value=1, max_value=10**9)
amounts = st.one_of(
    cents.map(lambda c: Decimal(c).scaleb(-2)),
    cents.map(lambda c: Decimal(c).scaleb(-2).quantize(Decimal("0.01"))),
    st.integers(min_value=1, max_value=10**7),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.decimals(allow_nan=False, allow_infinity=False, places=3, min_value=-(10**12)),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=10,
)
argument_maps = st.dictionaries(
    st.sampled_from(["invoice_id", "amount", "currency", "reason", "note", "flag", "x"]),
    json_values,
    max_size=6,
)
# Valid refund arguments with some entries replaced or added, so some calls get to the tiers.
near_valid_refunds = st.builds(
    lambda amount, currency, extra: {
        "amount": amount,
        "currency": currency,
        "reason": "r",
        **extra,
    },
    st.one_of(amounts, json_scalars),
    st.sampled_from(["USD", "EUR", "GBP", "usd", "JPY"]),
    st.dictionaries(st.sampled_from(["reason", "note", "invoice_id"]), json_scalars, max_size=2),
)
# A policy whose conditions read fields that may be absent or of any type.
FRAGILE: Final = policy(
    tool(
        "t",
        (
            tier("a", TierAction.ALLOW, "args.x > 3 && args.flag"),
            tier("b", TierAction.REQUIRE_APPROVAL, 'args.note.startsWith("v")', approvals=1),
            tier("c", TierAction.DENY, "size(args.x) > 2"),
            tier("d", TierAction.ALLOW, "args.amount <= 50"),
        ),
        pins=("invoice_id",),
    )
)


def _refund(arguments: dict[str, Any]) -> ToolCall:
    invoice = {"amount_due": Decimal("1000000000"), "currency": arguments.get("currency")}
    return ToolCall(
        "requestRefund",
        {"invoice_id": "in_93K2", **arguments},
        {"invoice": invoice},
        idempotency_key="refund-1",
    )


@PROPERTY_SETTINGS
@given(amount=amounts)
def test_a_valid_amount_above_50_is_never_allowed(amount: Decimal | int) -> None:
    """For any valid amount, the refund is ALLOW exactly when the amount is at most 50."""
    decision = evaluate(
        EXAMPLE, _refund({"amount": amount, "currency": "USD", "reason": "r"}), REFUND_TOKEN
    )
    assert decision.outcome is not Outcome.DENY or amount > 5000
    assert (decision.outcome is Outcome.ALLOW) == (amount <= 50)
    expected = (
        "auto" if amount <= 50 else "supervisor" if amount <= 500 else
        "finance" if amount <= 5000 else "over-limit"
    )  # fmt: skip
    assert decision.matched_tier == expected


@PROPERTY_SETTINGS
@given(arguments=st.one_of(argument_maps, near_valid_refunds))
def test_the_engine_never_raises_and_never_allows_invalid_refunds(
    arguments: dict[str, Any],
) -> None:
    """For any arguments the engine answers; an ALLOW needs schema-valid args with amount <= 50."""
    call = _refund(arguments)
    decision = evaluate(EXAMPLE, call, REFUND_TOKEN)
    assert isinstance(decision, Decision)
    assert decision.reasons
    if decision.outcome is Outcome.ALLOW:
        tool_schema = EXAMPLE.tools["requestRefund"].arguments
        assert tool_schema.validate(call.arguments) == ()
        assert call.arguments["amount"] <= 50
    assert evaluate(EXAMPLE, _refund(arguments), REFUND_TOKEN) == decision


@PROPERTY_SETTINGS
@given(arguments=argument_maps, context=st.dictionaries(st.text(max_size=4), json_values))
def test_fragile_conditions_never_raise_and_errors_deny(
    arguments: dict[str, Any], context: dict[str, Any]
) -> None:
    """Conditions over absent or mistyped fields never raise out of evaluate; errors deny."""
    decision = evaluate(
        FRAGILE,
        ToolCall("t", {"invoice_id": "i", **arguments}, context),
        claims(grant("t", invoice_id="i")),
    )
    assert decision.primary_code is not None
    if decision.primary_code is ReasonCode.CONDITION_ERROR:
        assert decision.outcome is Outcome.DENY
        assert decision.matched_tier == ""
    else:
        assert decision.matched_tier in {"a", "b", "c", "d", ""}


@PROPERTY_SETTINGS
@given(tool_name=st.text(min_size=1, max_size=20), arguments=argument_maps)
def test_only_a_granted_tool_gets_past_scope(tool_name: str, arguments: dict[str, Any]) -> None:
    """A call to any tool name other than the granted one is OUT_OF_SCOPE."""
    decision = evaluate(EXAMPLE, ToolCall(tool_name, arguments), REFUND_TOKEN)
    if tool_name != "requestRefund":
        assert decision.primary_code is ReasonCode.OUT_OF_SCOPE
    else:
        assert decision.primary_code is not ReasonCode.UNKNOWN_TOOL
