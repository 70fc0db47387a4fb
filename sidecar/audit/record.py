"""The audit record of one decision: what the on-call engineer reads, and what replay needs.

A decision record keeps the decision and why (reasons, tier, policy version) and, so the Check
can be re-evaluated later against another policy (``proviso replay``), its inputs: the
arguments (exact numbers; redacted ones replaced by a keyed hash), the context, and the
verified claims of the token. The writer adds ``seq``, ``prev`` and ``hash``.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sidecar.audit.chain import Encoded, encoded
from sidecar.engine import Decision, ToolCall
from tokens import CapabilityClaims
from tokens.claims import grant_from_claim

KIND_DECISION = "decision"


def new_record_id(now: float, prefix: str = "dec") -> str:
    """A time-ordered, unguessable id: milliseconds then 64 random bits."""
    return f"{prefix}_{int(now * 1000):012x}{secrets.token_hex(8)}"


def event_body(kind: str, record_id: str, time: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """An audit record for something other than a decision (a kill switch, an approval)."""
    return {"kind": kind, "record_id": record_id, "time": time, **fields}


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

    ``arguments`` are as recorded: redacted ones already replaced, their names in
    ``redacted``. ``args_digest`` is always the digest of the arguments as sent.
    """

    record_id: str
    time: str
    decision: Decision
    call: ToolCall
    args_digest: str
    arguments: Mapping[str, Any]
    latency_ms: float
    token: CapabilityClaims | None = None
    redacted: tuple[str, ...] = ()
    run_metadata: Mapping[str, str] = field(default_factory=dict)
    replay_of: str = ""
    shadow: ShadowResult | None = None

    def to_body(self) -> dict[str, Any]:
        """The record as a JSON object (numbers stay ``int``/``Decimal``), without chain fields."""
        d = self.decision
        call = self.call
        body: dict[str, Any] = {
            "kind": KIND_DECISION,
            "record_id": self.record_id,
            "time": self.time,
            "run_id": call.run_id,
            "step_id": call.step_id,
            "agent": d.agent,
            "tool": call.tool,
            "args_digest": self.args_digest,
            "arguments": self.arguments,
            "redacted": list(self.redacted),
            "context": call.context,
            "token_id": d.token_id,
            "token": _claims_json(self.token) if self.token is not None else None,
            "policy_version": d.policy_version,
            "decision": d.outcome.value,
            "reasons": [
                {"code": r.code.value, "message": r.message, "field": r.field} for r in d.reasons
            ],
            "matched_tier": d.matched_tier,
            "approval_id": d.approval_id or call.approval_id,
            "presented_approval_id": call.approval_id,
            "approval_requirement": None,
            "idempotency_key": call.idempotency_key,
            "dry_run": call.dry_run,
            "latency_ms": _milli(self.latency_ms),
            "run_metadata": dict(self.run_metadata),
            "replay_of": self.replay_of,
        }
        if d.retry_after_seconds:
            body["retry_after_seconds"] = _milli(d.retry_after_seconds)
        if self.shadow is not None:
            body["shadow"] = self.shadow.to_json()
        if d.approval is not None:
            body["approval_requirement"] = {
                "tier": d.approval.tier,
                "approvals_required": d.approval.approvals_required,
                "approver_roles": list(d.approval.approver_roles),
                "ttl_seconds": d.approval.ttl_seconds,
            }
        return body


def _milli(value: float) -> Decimal:
    """``value`` to three decimals, as the exact decimal the line shows (floats keep records off
    the canonical encoder's fast path)."""
    return Decimal(repr(round(value, 3)))


def token_claims(claims: CapabilityClaims) -> dict[str, Any]:
    """The verified claims a replay needs, as recorded."""
    return {
        "id": claims.token_id,
        "issuer": claims.issuer,
        "subject": claims.subject,
        "audience": claims.audience,
        "issued_at": claims.issued_at,
        "not_before": claims.not_before,
        "expires_at": claims.expires_at,
        "run_id": claims.run_id,
        "grants": [grant.to_claim() for grant in claims.grants],
        "kid": claims.key_id,
        "parents": list(claims.parents),
    }


_ENCODED_CLAIMS_MAX = 4096
_encoded_claims: dict[int, tuple[CapabilityClaims, Encoded]] = {}


def _claims_json(claims: CapabilityClaims) -> Encoded:
    """``token_claims`` in canonical form, encoded once per claims object.

    An agent reuses its token, and the server its verified claims object, so every record of a
    run carries the same claims: they are encoded the first time only. The entry holds the
    object, so its id cannot be reused while cached.
    """
    entry = _encoded_claims.get(id(claims))
    if entry is not None and entry[0] is claims:
        return entry[1]
    if len(_encoded_claims) >= _ENCODED_CLAIMS_MAX:
        _encoded_claims.clear()
    value = encoded(token_claims(claims))
    _encoded_claims[id(claims)] = (claims, value)
    return value


def claims_from_record(recorded: Mapping[str, Any]) -> CapabilityClaims:
    """Rebuild the claims recorded by ``token_claims``.

    Raises:
        ValueError, KeyError, TypeError: the record does not hold well-formed claims.
    """
    grants = tuple(grant_from_claim(grant, index) for index, grant in enumerate(recorded["grants"]))
    run_id = recorded.get("run_id")
    return CapabilityClaims(
        issuer=str(recorded["issuer"]),
        subject=str(recorded["subject"]),
        audience=str(recorded["audience"]),
        issued_at=int(recorded["issued_at"]),
        not_before=int(recorded["not_before"]),
        expires_at=int(recorded["expires_at"]),
        token_id=str(recorded["id"]),
        grants=grants,
        run_id=str(run_id) if run_id is not None else None,
        key_id=str(recorded.get("kid", "")),
        parents=tuple(str(parent) for parent in recorded.get("parents", ())),
    )
