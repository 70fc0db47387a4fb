"""Run traces: one agent run rebuilt from the audit log, every Check in chain order.

This is the "minimal trace envelope" an on-call engineer reads first: who ran (agents, model
and prompt version from the run metadata), under which policy versions, when, and each step
with its tool, decision, reasons, tier, approval requirement, token and latency.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from sidecar.audit.files import logs, records
from sidecar.audit.record import KIND_DECISION


@dataclass(frozen=True, slots=True)
class TraceReason:
    code: str
    message: str
    field: str = ""


@dataclass(frozen=True, slots=True)
class TraceStep:
    """One Check of the run, as its record tells it."""

    seq: int
    decision_id: str
    time: str
    step_id: str
    agent: str
    tool: str
    decision: str
    reasons: tuple[TraceReason, ...]
    matched_tier: str
    policy_version: str
    token_id: str
    latency_ms: Decimal
    approval_id: str = ""
    approval_requirement: Mapping[str, Any] | None = None
    dry_run: bool = False
    args_digest: str = ""
    redacted: tuple[str, ...] = ()
    run_metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunTrace:
    """A run's envelope and its steps, in the order they were decided."""

    run_id: str
    steps: tuple[TraceStep, ...]

    @property
    def agents(self) -> tuple[str, ...]:
        return tuple(sorted({step.agent for step in self.steps if step.agent}))

    @property
    def policy_versions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(step.policy_version for step in self.steps))

    @property
    def run_metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for step in self.steps:
            merged.update(step.run_metadata)
        return merged

    @property
    def outcomes(self) -> dict[str, int]:
        return dict(sorted(Counter(step.decision for step in self.steps).items()))

    @property
    def latency_ms(self) -> Decimal:
        return sum((step.latency_ms for step in self.steps), Decimal(0))


def _text(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    return value if isinstance(value, str) else ""


def step_from_record(record: Mapping[str, Any]) -> TraceStep:
    """A trace step from a decision record; missing fields read as empty."""
    reasons = record.get("reasons")
    metadata = record.get("run_metadata")
    requirement = record.get("approval_requirement")
    latency = record.get("latency_ms")
    seq = record.get("seq")
    return TraceStep(
        seq=seq if isinstance(seq, int) else 0,
        decision_id=_text(record, "record_id"),
        time=_text(record, "time"),
        step_id=_text(record, "step_id"),
        agent=_text(record, "agent"),
        tool=_text(record, "tool"),
        decision=_text(record, "decision"),
        reasons=tuple(
            TraceReason(_text(r, "code"), _text(r, "message"), _text(r, "field"))
            for r in (reasons if isinstance(reasons, list) else [])
            if isinstance(r, dict)
        ),
        matched_tier=_text(record, "matched_tier"),
        policy_version=_text(record, "policy_version"),
        token_id=_text(record, "token_id"),
        latency_ms=Decimal(latency) if isinstance(latency, int | Decimal) else Decimal(0),
        approval_id=_text(record, "approval_id"),
        approval_requirement=requirement if isinstance(requirement, dict) else None,
        dry_run=record.get("dry_run") is True,
        args_digest=_text(record, "args_digest"),
        redacted=tuple(str(name) for name in record.get("redacted") or ()),
        run_metadata=(
            {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
        ),
    )


def build_trace(
    log: Iterable[Mapping[str, Any]], run_id: str, *, by_time: bool = False
) -> RunTrace | None:
    """The run's trace from the log's records, or None if no Check of the run is there."""
    steps = [
        step_from_record(record)
        for record in log
        if record.get("kind") == KIND_DECISION and record.get("run_id") == run_id
    ]
    if not steps:
        return None
    order = (lambda step: (step.time, step.seq)) if by_time else (lambda step: step.seq)
    return RunTrace(run_id, tuple(sorted(steps, key=order)))


def load_trace(path: Path, run_id: str) -> RunTrace | None:
    """Read the log at ``path`` (file or directory) and build the run's trace.

    A directory may hold several chains (one per worker process); a run's Checks may have been
    answered by any of them, so its steps are then ordered by time (``seq`` is per chain).

    Raises:
        AuditLogNotFoundError: there is no log at ``path``.
    """
    chains = logs(path)
    merged = [record for files in chains for record in records(files)]
    return build_trace(merged, run_id, by_time=len(chains) > 1)


def to_json(trace: RunTrace) -> dict[str, Any]:
    """The trace as a JSON-ready object (what ``--format json`` prints)."""
    return {
        "run_id": trace.run_id,
        "agents": list(trace.agents),
        "policy_versions": list(trace.policy_versions),
        "start_time": trace.steps[0].time,
        "end_time": trace.steps[-1].time,
        "run_metadata": trace.run_metadata,
        "outcomes": trace.outcomes,
        "latency_ms": str(trace.latency_ms),
        "steps": [
            {
                "seq": step.seq,
                "decision_id": step.decision_id,
                "time": step.time,
                "step_id": step.step_id,
                "agent": step.agent,
                "tool": step.tool,
                "decision": step.decision,
                "reasons": [
                    {"code": r.code, "message": r.message, "field": r.field} for r in step.reasons
                ],
                "matched_tier": step.matched_tier,
                "policy_version": step.policy_version,
                "token_id": step.token_id,
                "latency_ms": str(step.latency_ms),
                "approval_id": step.approval_id,
                "approval_requirement": _plain(step.approval_requirement),
                "dry_run": step.dry_run,
                "args_digest": step.args_digest,
                "redacted": list(step.redacted),
                "run_metadata": dict(step.run_metadata),
            }
            for step in trace.steps
        ],
    }


def _plain(value: Any) -> Any:
    """Decimals as numbers json can print (approval requirements hold only integers)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else str(value)
    return value


def _approval(step: TraceStep) -> str:
    requirement = step.approval_requirement
    if requirement:
        roles = ", ".join(str(role) for role in requirement.get("approver_roles", ()))
        return f"needs {requirement.get('approvals_required')} approval(s) from {roles}"
    if step.approval_id:
        return f"presented approval {step.approval_id}"
    return ""


def to_table(trace: RunTrace) -> str:
    """The trace for people: the envelope, then one row per step."""
    meta = ", ".join(f"{k}={v}" for k, v in sorted(trace.run_metadata.items())) or "-"
    outcomes = ", ".join(f"{k} {v}" for k, v in trace.outcomes.items())
    lines = [
        f"run       {trace.run_id}",
        f"agents    {', '.join(trace.agents) or '-'}",
        f"metadata  {meta}",
        f"policy    {', '.join(trace.policy_versions)}",
        f"time      {trace.steps[0].time} .. {trace.steps[-1].time}",
        f"outcome   {len(trace.steps)} checks: {outcomes}; {trace.latency_ms} ms deciding",
        "",
    ]
    header = ("SEQ", "TIME", "STEP", "TOOL", "DECISION", "TIER", "REASON", "TOKEN", "MS")
    rows = [header]
    notes: list[str] = []
    for step in trace.steps:
        first = step.reasons[0] if step.reasons else None
        rows.append(
            (
                str(step.seq),
                step.time,
                step.step_id or "-",
                step.tool,
                step.decision,
                step.matched_tier or "-",
                first.code if first else "-",
                step.token_id or "-",
                str(step.latency_ms),
            )
        )
        details = [f"{r.code}: {r.message}" + (f" at {r.field}" if r.field else "")
                   for r in step.reasons]  # fmt: skip
        approval = _approval(step)
        if approval:
            details.append(approval)
        if step.redacted:
            details.append(f"redacted: {', '.join(step.redacted)}")
        notes.extend(f"  seq {step.seq}: {detail}" for detail in details)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines.extend("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                 for row in rows)  # fmt: skip
    if notes:
        lines.extend(["", "details", *notes])
    return "\n".join(lines)
