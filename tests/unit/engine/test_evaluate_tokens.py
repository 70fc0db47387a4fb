"""Engine steps 2 and 3 for the token features: revocation (with ancestors) and constraints."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

from sidecar.engine import (
    Outcome,
    ReasonCode,
    Revocation,
    StateView,
    decide,
    evaluate,
)
from sidecar.engine.state import RunUsage
from sidecar.policy.model import KillScope, KillSwitch
from tests.unit.engine.helpers import AGENT, REFUND_SCHEMA, call, claims, policy, tool
from tokens import CapabilityClaims, Constraint, Grant

REFUND: Final = "requestRefund"
POLICY: Final = policy(tool(REFUND, schema=REFUND_SCHEMA, pins=("invoice_id",)))
CONSTRAINED: Final = Grant(
    REFUND,
    {"invoice_id": "in_93K2"},
    {"amount": Constraint(max="50"), "currency": Constraint(one_of=["USD"])},
)
ARGS: Final[dict[str, Any]] = {
    "invoice_id": "in_93K2",
    "amount": Decimal("49.99"),
    "currency": "USD",
}


def _child(*parents: str) -> CapabilityClaims:
    base = claims(CONSTRAINED, token_id="tok-child")
    return CapabilityClaims(
        issuer=base.issuer,
        subject=base.subject,
        audience=base.audience,
        issued_at=base.issued_at,
        not_before=base.not_before,
        expires_at=base.expires_at,
        token_id=base.token_id,
        grants=base.grants,
        key_id=base.key_id,
        parents=parents,
    )


def _revoked(token_id: str, reason: str = "leaked in a log") -> StateView:
    return StateView(revocation=Revocation(token_id, reason, "olivia@example.com", 10.0, 2000.0))


def test_a_call_within_the_constraints_is_allowed() -> None:
    """49.99 USD on the pinned invoice is within 'amount <= 50' and 'currency in [USD]'."""
    decision = evaluate(POLICY, call(REFUND, ARGS), claims(CONSTRAINED))
    assert decision.outcome is Outcome.ALLOW


def test_an_argument_beyond_its_constraint_is_out_of_scope_naming_it() -> None:
    """50.01 is OUT_OF_SCOPE, naming the constraint and pointing at the argument."""
    decision = evaluate(
        POLICY, call(REFUND, {**ARGS, "amount": Decimal("50.01")}), claims(CONSTRAINED)
    )
    assert decision.primary_code is ReasonCode.OUT_OF_SCOPE
    reason = decision.reasons[0]
    assert reason.field == "/amount"
    assert "amount <= 50" in reason.message
    assert decision.agent == AGENT, "a scope denial is attributed to the token's agent"


def test_a_currency_outside_the_set_is_out_of_scope() -> None:
    """EUR is not in 'currency in [USD]', although the tool's schema allows it."""
    decision = evaluate(POLICY, call(REFUND, {**ARGS, "currency": "EUR"}), claims(CONSTRAINED))
    assert decision.primary_code is ReasonCode.OUT_OF_SCOPE
    assert decision.reasons[0].field == "/currency"


def test_a_constrained_argument_of_the_wrong_type_is_out_of_scope_before_the_schema() -> None:
    """A string amount is out of the token's scope: scope (step 3) precedes schema (step 5)."""
    decision = evaluate(POLICY, call(REFUND, {**ARGS, "amount": "10"}), claims(CONSTRAINED))
    assert decision.primary_code is ReasonCode.OUT_OF_SCOPE


def test_a_revoked_token_is_denied_token_revoked() -> None:
    """A revocation of the token's own id denies TOKEN_REVOKED with the revocation's reason."""
    decision = evaluate(POLICY, call(REFUND, ARGS), claims(CONSTRAINED), _revoked("tok-0001"))
    assert decision.outcome is Outcome.DENY
    assert decision.primary_code is ReasonCode.TOKEN_REVOKED
    assert "leaked in a log" in decision.reasons[0].message
    assert decision.token_id == "tok-0001"


def test_a_child_of_a_revoked_token_is_denied_naming_the_ancestor() -> None:
    """A revocation of an ancestor denies the child, saying it was an ancestor's."""
    state = _revoked("tok-root")
    decision = evaluate(POLICY, call(REFUND, ARGS), _child("tok-root"), state)
    assert decision.primary_code is ReasonCode.TOKEN_REVOKED
    assert "an ancestor of the token (tok-root)" in decision.reasons[0].message


def test_revocation_wins_over_scope_and_spends_nothing() -> None:
    """A revoked token with an out-of-scope call is TOKEN_REVOKED, and changes no state."""
    state = StateView(
        revocation=Revocation("tok-0001", "x", "a", 1.0, 2.0), usage=RunUsage(failure_streak=2)
    )
    evaluation = decide(POLICY, call("other", {}), claims(CONSTRAINED), state)
    assert evaluation.decision.primary_code is ReasonCode.TOKEN_REVOKED
    assert evaluation.changes.empty


def test_a_kill_switch_still_comes_before_revocation() -> None:
    """Step 1 precedes step 2: an engaged switch decides even for a revoked token."""
    switch = KillSwitch(KillScope.GLOBAL, "", "incident", "api", "olivia", 1.0)
    state = StateView(kill_switches=(switch,), revocation=Revocation("tok-0001", "x", "a", 1, 2))
    decision = evaluate(POLICY, call(REFUND, ARGS), claims(CONSTRAINED), state)
    assert decision.primary_code is ReasonCode.KILL_SWITCH
