"""Decisions as JSON for the idempotency table: what a replay must return, exactly."""

from __future__ import annotations

import json
from typing import Any

from sidecar.engine import ApprovalRequirement, Decision, Outcome, Reason, ReasonCode


def encode_decision(decision: Decision) -> str:
    body: dict[str, Any] = {
        "outcome": decision.outcome.value,
        "reasons": [[r.code.value, r.message, r.field] for r in decision.reasons],
        "policy_version": decision.policy_version,
        "matched_tier": decision.matched_tier,
        "agent": decision.agent,
        "token_id": decision.token_id,
    }
    if decision.approval is not None:
        approval = decision.approval
        body["approval"] = [
            approval.tier,
            approval.approvals_required,
            list(approval.approver_roles),
            approval.ttl_seconds,
        ]
    if decision.approval_id:  # the approval an approved ALLOW used: a replay names it too
        body["approval_id"] = decision.approval_id
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def decode_decision(text: str) -> Decision:
    body = json.loads(text)
    approval = body.get("approval")
    return Decision(
        outcome=Outcome(body["outcome"]),
        reasons=tuple(Reason(ReasonCode(c), m, f) for c, m, f in body["reasons"]),
        policy_version=body["policy_version"],
        matched_tier=body["matched_tier"],
        approval=None
        if approval is None
        else ApprovalRequirement(approval[0], approval[1], tuple(approval[2]), approval[3]),
        agent=body["agent"],
        token_id=body["token_id"],
        approval_id=body.get("approval_id", ""),  # absent in records of earlier versions
    )
