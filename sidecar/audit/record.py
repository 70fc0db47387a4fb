"""The audit record of one decision, and its JSON-line encoding."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sidecar.engine import Decision


def new_record_id(now: float, prefix: str = "dec") -> str:
    """A time-ordered, unguessable id: milliseconds then 64 random bits."""
    return f"{prefix}_{int(now * 1000):012x}{secrets.token_hex(8)}"


def timestamp(now: float) -> str:
    """RFC 3339 UTC with milliseconds, as every audit line writes time."""
    moment = datetime.fromtimestamp(now, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ShadowResult:
    """What the shadow (candidate) policy would have decided for the same call.

    ``error`` is set, and the decision fields empty, when the shadow could not be evaluated.
    """

    policy_version: str
    decision: str = ""
    reason: str = ""
    tier: str = ""
    agrees: bool = True
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        if self.error:
            return {"policy_version": self.policy_version, "error": self.error}
        return {
            "policy_version": self.policy_version,
            "decision": self.decision,
            "reason": self.reason,
            "tier": self.tier,
            "agrees": self.agrees,
        }


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """Everything needed to explain (and later replay) one decision.

    ``arguments_canonical`` is the canonical JSON of the arguments (exact numbers), embedded
    as JSON in the line, not as a string.
    """

    record_id: str
    time: str
    decision: Decision
    tool: str
    args_digest: str
    arguments_canonical: str
    latency_ms: float
    run_id: str = ""
    step_id: str = ""
    idempotency_key: str = ""
    approval_id: str = ""
    dry_run: bool = False
    run_metadata: Mapping[str, str] = field(default_factory=dict)
    replay_of: str = ""
    shadow: ShadowResult | None = None

    def to_json_line(self) -> bytes:
        """One line of JSON ending in a newline: keys sorted, then ``arguments`` last."""
        d = self.decision
        body: dict[str, Any] = {
            "kind": "decision",
            "record_id": self.record_id,
            "time": self.time,
            "run_id": self.run_id,
            "step_id": self.step_id,
            "agent": d.agent,
            "tool": self.tool,
            "args_digest": self.args_digest,
            "token_id": d.token_id,
            "policy_version": d.policy_version,
            "decision": d.outcome.value,
            "reasons": [
                {"code": r.code.value, "message": r.message, "field": r.field} for r in d.reasons
            ],
            "matched_tier": d.matched_tier,
            "approval_id": self.approval_id,
            "idempotency_key": self.idempotency_key,
            "dry_run": self.dry_run,
            "latency_ms": round(self.latency_ms, 3),
            "run_metadata": dict(self.run_metadata),
            "replay_of": self.replay_of,
        }
        if d.retry_after_seconds:
            body["retry_after_seconds"] = round(d.retry_after_seconds, 3)
        if d.approval is not None:
            body["approval_requirement"] = {
                "tier": d.approval.tier,
                "approvals_required": d.approval.approvals_required,
                "approver_roles": list(d.approval.approver_roles),
                "ttl_seconds": d.approval.ttl_seconds,
            }
        if self.shadow is not None:
            body["shadow"] = self.shadow.to_json()
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        # Splice the canonical arguments in as JSON so decimals keep their exact digits.
        return (text[:-1] + ',"arguments":' + self.arguments_canonical + "}\n").encode()


def event_line(kind: str, record_id: str, time: str, fields: Mapping[str, Any]) -> bytes:
    """An audit line for something other than a decision (a kill switch engaged, ...)."""
    body = {"kind": kind, "record_id": record_id, "time": time, **fields}
    return (
        json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    ).encode()
