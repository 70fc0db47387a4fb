"""Run traces: one agent run rebuilt from the audit log, every Check and approval in order.

This is the "minimal trace envelope" an on-call engineer reads first: who ran (agents, model
and prompt version from the run metadata), under which policy versions, when, and each step
with its tool, decision, reasons, tier, approval requirement, token and latency, and what
happened to the run's approval requests (created, approve/reject verdicts, approved, rejected,
consumed, expired).

``serve --workers N`` writes one chain per worker (``decisions.w0.jsonl``…), each numbering
its records from 1: a record is named by its chain and its ``seq`` together (``w1 seq 13``).
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from sidecar.audit.files import log_stem, logs, records
from sidecar.audit.record import KIND_DECISION
from sidecar.terminal import shown

KIND_APPROVAL = "approval"
"""The kind of the records ``Approvals.record_event`` writes, each naming the request's run."""
MAX_RUN_METADATA_KEYS = 32
"""Keys of a run's merged metadata: as many as one Check may carry (``server.convert``'s
``MAX_RUN_METADATA_ENTRIES``; the audit layer cannot import it)."""


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
    presented_approval: bool = False
    """The Check itself presented ``approval_id`` (an idempotent retry answers with the
    approval of the decision it replays, presenting none)."""
    approval_requirement: Mapping[str, Any] | None = None
    dry_run: bool = False
    args_digest: str = ""
    redacted: tuple[str, ...] = ()
    run_metadata: Mapping[str, str] = field(default_factory=dict)
    chain: str = ""
    """The chain the record is in (``w0``…; the log's name when it is the only one)."""
    replay_of: str = ""
    """The decision an idempotent retry answered again (it counted nothing a second time)."""


@dataclass(frozen=True, slots=True)
class TraceApprovalEvent:
    """Something that happened to one of the run's approval requests, as its record tells it.

    ``event`` is ``created``, a verdict (``approve``, ``reject``) or a new status
    (``approved``, ``rejected``, ``consumed``, ``expired``); ``actor`` is who caused it.
    """

    seq: int
    record_id: str
    time: str
    event: str
    approval_id: str
    agent: str
    tool: str
    tier: str
    actor: str
    comment: str = ""
    args_digest: str = ""
    chain: str = ""


TraceEntry = TraceStep | TraceApprovalEvent


@dataclass(frozen=True, slots=True)
class RunTrace:
    """A run's envelope and its steps, in the order they were decided.

    ``timeline`` is the steps and the approval events together, in order: each chain's records
    in chain order, the chains interleaved by time.
    """

    run_id: str
    steps: tuple[TraceStep, ...]
    chains: tuple[str, ...] = ()
    approval_events: tuple[TraceApprovalEvent, ...] = ()
    timeline: tuple[TraceEntry, ...] = ()

    @property
    def agents(self) -> tuple[str, ...]:
        return tuple(sorted({step.agent for step in self.steps if step.agent}))

    @property
    def policy_versions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(step.policy_version for step in self.steps))

    @property
    def run_metadata(self) -> dict[str, str]:
        """The steps' run metadata merged, a later value winning; at most
        ``MAX_RUN_METADATA_KEYS`` keys, the first seen (each step keeps all of its own), so
        that an agent sending new keys on every Check cannot grow the envelope without end."""
        merged: dict[str, str] = {}
        for step in self.steps:
            for key, value in step.run_metadata.items():
                if key in merged or len(merged) < MAX_RUN_METADATA_KEYS:
                    merged[key] = value
        return merged

    @property
    def outcomes(self) -> dict[str, int]:
        return dict(sorted(Counter(step.decision for step in self.steps).items()))

    @property
    def replays(self) -> int:
        """Checks that answered a recorded decision again (idempotent retries)."""
        return sum(1 for step in self.steps if step.replay_of)

    @property
    def dry_runs(self) -> int:
        """Checks decided as dry runs: nothing was changed or counted, nothing was to run."""
        return sum(1 for step in self.steps if step.dry_run)

    @property
    def latency_ms(self) -> Decimal:
        return sum((step.latency_ms for step in self.steps), Decimal(0))


def _text(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    return value if isinstance(value, str) else ""


def step_from_record(record: Mapping[str, Any], chain: str = "") -> TraceStep:
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
        presented_approval=bool(_text(record, "presented_approval_id")),
        approval_requirement=requirement if isinstance(requirement, dict) else None,
        dry_run=record.get("dry_run") is True,
        args_digest=_text(record, "args_digest"),
        redacted=tuple(str(name) for name in record.get("redacted") or ()),
        run_metadata=(
            {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
        ),
        chain=chain,
        replay_of=_text(record, "replay_of"),
    )


def approval_event_from_record(record: Mapping[str, Any], chain: str = "") -> TraceApprovalEvent:
    """A trace entry from an approval event record; missing fields read as empty."""
    seq = record.get("seq")
    return TraceApprovalEvent(
        seq=seq if isinstance(seq, int) else 0,
        record_id=_text(record, "record_id"),
        time=_text(record, "time"),
        event=_text(record, "event"),
        approval_id=_text(record, "approval_id"),
        agent=_text(record, "agent"),
        tool=_text(record, "tool"),
        tier=_text(record, "tier"),
        actor=_text(record, "actor"),
        comment=_text(record, "comment"),
        args_digest=_text(record, "args_digest"),
        chain=chain,
    )


def _entries(log: Iterable[Mapping[str, Any]], run_id: str, chain: str) -> list[TraceEntry]:
    """The run's Checks and approval events in one chain, in the order the log holds them."""
    found: list[TraceEntry] = []
    for record in log:
        if record.get("run_id") != run_id:
            continue
        kind = record.get("kind")
        if kind == KIND_DECISION:
            found.append(step_from_record(record, chain))
        elif kind == KIND_APPROVAL:
            found.append(approval_event_from_record(record, chain))
    return found


def _trace(run_id: str, timeline: list[TraceEntry], chains: tuple[str, ...]) -> RunTrace | None:
    steps = tuple(entry for entry in timeline if isinstance(entry, TraceStep))
    if not steps:
        return None
    events = tuple(entry for entry in timeline if isinstance(entry, TraceApprovalEvent))
    return RunTrace(run_id, steps, chains, events, tuple(timeline))


def build_chains_trace(
    chains: Mapping[str, Iterable[Mapping[str, Any]]], run_id: str
) -> RunTrace | None:
    """The run's trace from several chains (by name), or None if no Check of the run is there.

    Each chain's records keep their chain order (``seq``); the chains are interleaved by
    time. ``seq`` is per chain, so it is never compared across chains.
    """
    ordered = [
        sorted(_entries(log, run_id, name), key=lambda e: e.seq) for name, log in chains.items()
    ]
    merged = list(heapq.merge(*ordered, key=lambda e: e.time))
    return _trace(run_id, merged, tuple(chains))


def chain_name(files: list[Path]) -> str:
    """What a log is called in a trace: its stem without the common ``decisions.`` (``w0``)."""
    stem = log_stem(files[0])
    return stem.split(".", 1)[1] if "." in stem else stem


def load_trace(path: Path, run_id: str) -> RunTrace | None:
    """Read the log at ``path`` (file or directory) and build the run's trace.

    A directory may hold several chains (one per worker process); a run's Checks, and its
    approval events, may have been written by any of them, so the chains are interleaved by
    time (``seq`` is per chain: every entry names its chain).

    Raises:
        AuditLogNotFoundError: there is no log at ``path``.
    """
    chains: dict[str, Iterable[Mapping[str, Any]]] = {}
    for files in logs(path):
        name = chain_name(files)
        if name in chains:  # two stems with one name ("a.w0", "b.w0"): keep them apart
            name = files[0].name.removesuffix(".jsonl")
        chains[name] = records(files)
    return build_chains_trace(chains, run_id)


def to_json(trace: RunTrace) -> dict[str, Any]:
    """The trace as a JSON-ready object (what ``--format json`` prints).

    A record is named by ``chain`` and ``seq`` together; ``timeline`` lists the steps and the
    approval events in order, by kind, chain, seq and record id.
    """
    return {
        "run_id": trace.run_id,
        "agents": list(trace.agents),
        "policy_versions": list(trace.policy_versions),
        "start_time": trace.steps[0].time,
        "end_time": trace.steps[-1].time,
        "run_metadata": trace.run_metadata,
        "outcomes": trace.outcomes,
        "replays": trace.replays,
        "dry_runs": trace.dry_runs,
        "latency_ms": str(trace.latency_ms),
        "chains": list(trace.chains),
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
                "chain": step.chain,
                "replay_of": step.replay_of,
            }
            for step in trace.steps
        ],
        "approval_events": [
            {
                "seq": event.seq,
                "record_id": event.record_id,
                "time": event.time,
                "event": event.event,
                "approval_id": event.approval_id,
                "agent": event.agent,
                "tool": event.tool,
                "tier": event.tier,
                "actor": event.actor,
                "comment": event.comment,
                "args_digest": event.args_digest,
                "chain": event.chain,
            }
            for event in trace.approval_events
        ],
        "timeline": [
            {
                "kind": KIND_DECISION if isinstance(entry, TraceStep) else KIND_APPROVAL,
                "chain": entry.chain,
                "seq": entry.seq,
                "record_id": (
                    entry.decision_id if isinstance(entry, TraceStep) else entry.record_id
                ),
                "time": entry.time,
            }
            for entry in trace.timeline
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
    """What the step says about approval: the request a NEEDS_APPROVAL opened (or found), or
    the approval a Check presented, with what its tier needs."""
    requirement = step.approval_requirement
    needs = ""
    if requirement:
        roles = ", ".join(str(role) for role in requirement.get("approver_roles", ()))
        needs = f"{requirement.get('approvals_required')} approval(s) from {roles}"
    if step.approval_id and step.decision != "NEEDS_APPROVAL":
        presented = "presented " if step.presented_approval else ""
        return f"{presented}approval {step.approval_id}" + (
            f" (the tier needs {needs})" if needs else ""
        )
    if needs:
        return f"needs {needs}" + (f": approval {step.approval_id}" if step.approval_id else "")
    return ""


def _step_row(step: TraceStep) -> tuple[list[str], list[str]]:
    """A Check's cells (from SEQ on) and its detail lines."""
    first = step.reasons[0] if step.reasons else None
    cells = [
        str(step.seq),
        step.time,
        step.step_id or "-",
        step.tool,
        f"{step.decision} (dry run)" if step.dry_run else step.decision,
        step.matched_tier or "-",
        first.code if first else "-",
        step.token_id or "-",
        str(step.latency_ms),
    ]
    details = [f"{r.code}: {r.message}" + (f" at {r.field}" if r.field else "")
               for r in step.reasons]  # fmt: skip
    approval = _approval(step)
    if approval:
        details.append(approval)
    if step.dry_run:
        details.append("dry run: decided in full, but nothing was changed or counted")
    if step.redacted:
        details.append(f"redacted: {', '.join(step.redacted)}")
    if step.replay_of:
        details.append(f"replay of {step.replay_of} (an idempotent retry; counted once)")
    return cells, details


def _event_row(event: TraceApprovalEvent) -> tuple[list[str], list[str]]:
    """An approval event's cells (from SEQ on) and its detail line."""
    cells = [
        str(event.seq),
        event.time,
        "-",
        event.tool,
        "approval",
        event.tier or "-",
        event.event,
        "-",
        "-",
    ]
    detail = f"approval {event.approval_id} {event.event}"
    if event.actor:
        detail += f" by {event.actor}"
    if event.comment:
        # An approver's free text: quoted, so it cannot pass for lines of the trace.
        detail += f": {json.dumps(event.comment, ensure_ascii=False)}"
    return cells, [detail]


def to_table(trace: RunTrace) -> str:
    """The trace for people: the envelope, then one row per step and approval event.

    When the log has several chains a CHAIN column names each record's chain, and details
    are keyed by chain and seq (``w1 seq 13``): a seq alone is ambiguous across chains.
    """
    meta = ", ".join(f"{k}={v}" for k, v in sorted(trace.run_metadata.items())) or "-"
    # Agents write run metadata and argument keys (quoted in reasons): shown(), so no escape
    # sequence or line break of theirs reaches the reader's terminal as such.
    outcomes = ", ".join(f"{k} {v}" for k, v in trace.outcomes.items())
    timeline = trace.timeline or trace.steps
    events = len(trace.approval_events)
    lines = [
        f"run       {shown(trace.run_id)}",
        f"agents    {shown(', '.join(trace.agents)) or '-'}",
        f"metadata  {shown(meta)}",
        f"policy    {', '.join(trace.policy_versions)}",
        f"time      {timeline[0].time} .. {timeline[-1].time}",
        f"outcome   {len(trace.steps)} checks: {outcomes}; {trace.latency_ms} ms deciding"
        + (f"; {trace.replays} replayed a recorded decision" if trace.replays else "")
        + (f"; {trace.dry_runs} dry run(s) (decided, nothing done)" if trace.dry_runs else "")
        + (f"; {events} approval event(s)" if events else ""),
        "",
    ]
    several = len(trace.chains) > 1
    header = ["SEQ", "TIME", "STEP", "TOOL", "DECISION", "TIER", "REASON", "TOKEN", "MS"]
    rows = [["CHAIN", *header] if several else header]
    notes: list[str] = []
    for entry in timeline:
        cells, details = _step_row(entry) if isinstance(entry, TraceStep) else _event_row(entry)
        cells = [shown(cell) for cell in cells]
        rows.append([entry.chain or "-", *cells] if several else cells)
        where = f"{entry.chain} seq {entry.seq}" if several else f"seq {entry.seq}"
        notes.extend(f"  {where}: {shown(detail)}" for detail in details)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines.extend("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                 for row in rows)  # fmt: skip
    if notes:
        lines.extend(["", "details", *notes])
    return "\n".join(lines)
