"""The audit log under cancellation, and what a decision record holds."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

from sidecar import strictjson
from sidecar.audit.files import log_files, verify_log
from sidecar.audit.record import AuditRecord, ShadowResult, event_body, new_record_id
from sidecar.audit.writer import AuditLog
from sidecar.engine import ApprovalRequirement, Decision, Outcome, Reason, ReasonCode, ToolCall
from tokens import SigningKey, VerificationKeys

KEY = SigningKey.generate(kid="audit-unit")


async def test_cancelled_appends_do_not_stop_the_writer(tmp_path: Path) -> None:
    """Callers that give up (a deadline) while their record is queued never wedge the writer."""
    log = AuditLog(tmp_path / "a.jsonl", signer=KEY)
    tasks = [asyncio.ensure_future(log.append({"kind": "t", "i": i})) for i in range(400)]
    await asyncio.sleep(0)  # every append has queued its record
    for task in tasks[1::2]:
        task.cancel()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=10)
    receipt = await asyncio.wait_for(log.append({"kind": "t", "i": "after"}), timeout=5)
    await asyncio.wait_for(asyncio.to_thread(log.close), timeout=10)
    assert receipt.seq >= 201
    assert (
        verify_log(
            log_files(tmp_path / "a.jsonl"), VerificationKeys.from_signing_keys([KEY])
        ).broken
        is None
    )


def _decision(**overrides: Any) -> Decision:
    values: dict[str, Any] = {
        "outcome": Outcome.NEEDS_APPROVAL,
        "reasons": (Reason(ReasonCode.APPROVAL_REQUIRED, "needs one approval", ""),),
        "policy_version": "abc123",
        "matched_tier": "supervisor",
        "approval": ApprovalRequirement("supervisor", 1, ("billing-supervisor",), 86400),
        "agent": "billing@service",
        "token_id": "tok-1",
        "approval_id": "apr_1",
    }
    values.update(overrides)
    return Decision(**values)


def _record(decision: Decision, arguments_json: str, **overrides: Any) -> AuditRecord:
    arguments = strictjson.parse_object(arguments_json)
    values: dict[str, Any] = {
        "record_id": "dec_1",
        "time": "2026-01-01T00:00:00.000Z",
        "decision": decision,
        "call": ToolCall("requestRefund", arguments, run_id="run-1", idempotency_key="k-1"),
        "args_digest": strictjson.digest(arguments),
        "arguments": arguments,
        "latency_ms": 1.23456,
        "run_metadata": {"model": "m-1"},
    }
    values.update(overrides)
    return AuditRecord(**values)


def test_a_record_carries_the_decision_the_call_and_the_approval() -> None:
    """The body names the decision, its reasons, tier, requirement and the approval request."""
    body = _record(_decision(), '{"amount": 120}').to_body()
    assert (body["decision"], body["matched_tier"], body["approval_id"]) == (
        "NEEDS_APPROVAL",
        "supervisor",
        "apr_1",
    )
    assert body["approval_requirement"]["approver_roles"] == ["billing-supervisor"]
    assert body["reasons"] == [
        {"code": "APPROVAL_REQUIRED", "message": "needs one approval", "field": ""}
    ]
    assert (body["run_id"], body["idempotency_key"], body["replay_of"]) == ("run-1", "k-1", "")
    assert "retry_after_seconds" not in body
    assert "shadow" not in body


def test_decimal_arguments_keep_their_exact_value() -> None:
    """Amounts stay exact decimals in the body (the writer canonicalises them exactly)."""
    body = _record(_decision(), '{"amount": 10.50}').to_body()
    assert body["arguments"]["amount"] == Decimal("10.50")


def test_replays_rate_limits_and_shadows_are_recorded() -> None:
    """A replay names the original decision; retry_after and the shadow verdict are kept."""
    decision = _decision(outcome=Outcome.DENY, approval=None, retry_after_seconds=0.25)
    shadow = ShadowResult("v2", "ALLOW", "TIER_ALLOWED", "auto", agrees=False)
    body = _record(decision, "{}", replay_of="dec_0", shadow=shadow).to_body()
    assert body["replay_of"] == "dec_0"
    assert body["retry_after_seconds"] == 0.25
    assert body["shadow"] == {
        "policy_version": "v2",
        "decision": "ALLOW",
        "reason": "TIER_ALLOWED",
        "tier": "auto",
        "agrees": False,
    }


def test_event_bodies_and_ids() -> None:
    """Events carry their kind, id and time; ids are prefixed, time-ordered and unique."""
    body = event_body("kill_switch", "evt_1", "2026-01-01T00:00:00.000Z", {"action": "engage"})
    assert body == {
        "kind": "kill_switch",
        "record_id": "evt_1",
        "time": "2026-01-01T00:00:00.000Z",
        "action": "engage",
    }
    first, second = new_record_id(1000.0, "apr"), new_record_id(1000.5, "apr")
    assert first.startswith("apr_")
    assert first < second
    assert new_record_id(1000.0) != new_record_id(1000.0)
