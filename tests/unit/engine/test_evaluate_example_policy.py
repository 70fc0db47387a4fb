"""evaluate() on the example bundle in ``policies/``: refund tiers at their boundaries, roles."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

import pytest

from sidecar.engine import ApprovalRequirement, Outcome, ReasonCode, ToolCall, evaluate
from sidecar.policy.model import Policy
from tests.unit.engine.helpers import claims, grant

BILLING: Final = "billing-resolution-agent@service"
TRIAGE: Final = "support-triage-agent@service"
INCIDENT: Final = "incident-assistant@service"
INVOICE: Final = "in_93K2"
REFUND_TOKEN: Final = claims(grant("requestRefund", invoice_id=INVOICE), subject=BILLING)


INVOICE_CONTEXT: Final = {"invoice": {"amount_due": Decimal("1000000"), "currency": "EUR"}}
"""What the agent runtime vouches for: the refund rules compare against it."""


def refund(amount: object, **overrides: Any) -> ToolCall:
    """A refund call on the pinned invoice."""
    arguments = {
        "invoice_id": INVOICE,
        "amount": amount,
        "currency": "EUR",
        "reason": "duplicate charge",
        **overrides,
    }
    return ToolCall("requestRefund", arguments, INVOICE_CONTEXT, idempotency_key="refund-1")


SUPERVISOR: Final = ApprovalRequirement("supervisor", 1, ("billing-supervisor",), 86400)
FINANCE: Final = ApprovalRequirement("finance", 2, ("finance-approver",), 86400)


@pytest.mark.parametrize(
    ("amount", "outcome", "tier", "approval"),
    [
        ("0.01", Outcome.ALLOW, "auto", None),
        ("49.99", Outcome.ALLOW, "auto", None),
        ("50.00", Outcome.ALLOW, "auto", None),
        ("50", Outcome.ALLOW, "auto", None),
        ("50.01", Outcome.NEEDS_APPROVAL, "supervisor", SUPERVISOR),
        ("500", Outcome.NEEDS_APPROVAL, "supervisor", SUPERVISOR),
        ("500.00", Outcome.NEEDS_APPROVAL, "supervisor", SUPERVISOR),
        ("500.01", Outcome.NEEDS_APPROVAL, "finance", FINANCE),
        ("5000", Outcome.NEEDS_APPROVAL, "finance", FINANCE),
        ("5000.01", Outcome.DENY, "over-limit", None),
        ("1E+6", Outcome.DENY, "over-limit", None),
    ],
)
def test_refund_tiers_at_their_decimal_boundaries(
    example_policy: Policy,
    amount: str,
    outcome: Outcome,
    tier: str,
    approval: ApprovalRequirement | None,
) -> None:
    """Refunds up to 50 are automatic, to 500 need a supervisor, to 5000 finance, then deny."""
    decision = evaluate(example_policy, refund(Decimal(amount)), REFUND_TOKEN)
    assert (decision.outcome, decision.matched_tier, decision.approval) == (
        outcome,
        tier,
        approval,
    )


@pytest.mark.parametrize(
    ("amount", "tier"), [(1, "auto"), (50, "auto"), (51, "supervisor"), (5001, "over-limit")]
)
def test_integer_amounts_use_the_same_tiers(example_policy: Policy, amount: int, tier: str) -> None:
    """An integer amount (as JSON without a fraction parses) is compared like a decimal."""
    assert evaluate(example_policy, refund(amount), REFUND_TOKEN).matched_tier == tier


def test_the_over_limit_denial_explains_itself(example_policy: Policy) -> None:
    """The over-limit tier denies with the message the bundle gives it."""
    decision = evaluate(example_policy, refund(Decimal("5000.01")), REFUND_TOKEN)
    assert decision.primary_code is ReasonCode.TIER_DENIED
    assert "5000" in decision.reasons[0].message


@pytest.mark.parametrize("amount", ["0", "0.00", "-5", "10.001", "50.005"])
def test_refund_amounts_the_schema_refuses(example_policy: Policy, amount: str) -> None:
    """Zero, negative and sub-cent amounts are INVALID_ARGUMENTS at ``/amount``."""
    decision = evaluate(example_policy, refund(Decimal(amount)), REFUND_TOKEN)
    assert decision.primary_code is ReasonCode.INVALID_ARGUMENTS
    assert [r.field for r in decision.reasons] == ["/amount"]


def test_an_unsupported_currency_and_a_missing_reason_are_both_reported(
    example_policy: Policy,
) -> None:
    """Each schema violation of the example refund is its own reason."""
    arguments = {"invoice_id": INVOICE, "amount": Decimal("5"), "currency": "JPY"}
    decision = evaluate(
        example_policy, ToolCall("requestRefund", arguments, INVOICE_CONTEXT), REFUND_TOKEN
    )
    assert [(r.code, r.field) for r in decision.reasons] == [
        (ReasonCode.INVALID_ARGUMENTS, "/currency"),
        (ReasonCode.INVALID_ARGUMENTS, "/reason"),
    ]


def test_a_refund_on_another_invoice_is_out_of_scope(example_policy: Policy) -> None:
    """The token pins the invoice: another invoice is OUT_OF_SCOPE before any tier runs."""
    decision = evaluate(example_policy, refund(Decimal("1"), invoice_id="in_OTHER"), REFUND_TOKEN)
    assert decision.primary_code is ReasonCode.OUT_OF_SCOPE


def test_the_triage_agent_may_not_refund_even_with_a_token(example_policy: Policy) -> None:
    """A token granting refunds to the triage agent is NOT_PERMITTED: roles decide."""
    token = claims(grant("requestRefund", invoice_id=INVOICE), subject=TRIAGE)
    decision = evaluate(example_policy, refund(Decimal("1")), token)
    assert decision.primary_code is ReasonCode.NOT_PERMITTED


@pytest.mark.parametrize(
    "tool", ["muteAlert", "changeEscalationPolicy"], ids=["muteAlert", "changeEscalationPolicy"]
)
def test_tools_no_role_permits_are_not_permitted(example_policy: Policy, tool: str) -> None:
    """Tools defined in the bundle but in no role are NOT_PERMITTED for the incident agent."""
    decision = evaluate(example_policy, ToolCall(tool, {}), claims(grant(tool), subject=INCIDENT))
    assert decision.primary_code is ReasonCode.NOT_PERMITTED


def test_a_tool_the_bundle_lacks_is_unknown(example_policy: Policy) -> None:
    """A granted tool the bundle does not define is UNKNOWN_TOOL."""
    token = claims(grant("deleteCustomer"), subject=BILLING)
    decision = evaluate(example_policy, ToolCall("deleteCustomer", {}), token)
    assert decision.primary_code is ReasonCode.UNKNOWN_TOOL


@pytest.mark.parametrize(
    ("body", "outcome"),
    [
        ("Customer asked about invoice in_93K2.", Outcome.ALLOW),
        ("Card 4242424242424242 was charged twice.", Outcome.DENY),
        ("Phone 555 0100, order 123456789012", Outcome.ALLOW),  # 12 digits: not a card
    ],
)
def test_internal_notes_with_card_numbers_are_denied(
    example_policy: Policy, body: str, outcome: Outcome
) -> None:
    """The card-number tier denies notes with 13 to 19 consecutive digits; others are allowed."""
    token = claims(grant("addInternalNote", ticket_id="T-1"), subject=TRIAGE)
    decision = evaluate(
        example_policy,
        ToolCall("addInternalNote", {"ticket_id": "T-1", "body": body}, idempotency_key="note-1"),
        token,
    )
    assert decision.outcome is outcome


def test_an_unpinned_read_tool_is_allowed(example_policy: Policy) -> None:
    """getInvoice has no pins and one unconditional tier: any valid invoice is allowed."""
    token = claims(grant("getInvoice"), subject=BILLING)
    decision = evaluate(example_policy, ToolCall("getInvoice", {"invoice_id": "in_X1"}), token)
    assert (decision.outcome, decision.matched_tier) == (Outcome.ALLOW, "default")
    assert decision.policy_version == example_policy.version
    assert decision.agent == BILLING


def test_a_card_number_hidden_behind_a_nul_is_denied(example_policy: Policy) -> None:
    """CEL would read 'ok\\0<card>' as 'ok': the tier's condition fails, and fails closed."""
    token = claims(grant("addInternalNote", ticket_id="T-1"), subject=TRIAGE)
    arguments = {"ticket_id": "T-1", "body": "ok\x004111111111111111"}
    decision = evaluate(
        example_policy, ToolCall("addInternalNote", arguments, idempotency_key="note-1"), token
    )
    assert decision.outcome is Outcome.DENY
    assert decision.primary_code is ReasonCode.CONDITION_ERROR
