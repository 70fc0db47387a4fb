"""Replay: re-decide recorded Checks under another policy and say what would change.

Each decision record carries the Check's inputs (arguments, context, the verified token
claims), so the pure engine can decide it again, in process, against a candidate bundle. This
is how a policy change is proven before it ships: "of last week's 12,000 Checks, 41 refunds
would now need approval, and these are examples".

A record cannot be replayed when its inputs are not all there: redacted arguments (only a
keyed hash is kept), records written before inputs were recorded, or a token refused for a
reason that lives in state rather than in the token (e.g. revocation). Such records are
counted, never guessed at. Token refusals do not depend on the policy; they replay as they
were decided.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.audit.record import KIND_DECISION, claims_from_record
from sidecar.engine import Decision, Outcome, ReasonCode, ToolCall, evaluate
from sidecar.policy.model import Policy
from tokens import TokenError

Transition = tuple[str, str]
UNKNOWN_TOOLS = "(unknown tools)"
"""The ``by_tool`` row of the Checks denied before and of tools the candidate does not define:
agents choose tool names, so made-up ones are counted together (no tool is named so)."""
TierChange = tuple[str, str, str]
"""A decision that stays, and the tier that decided it before and now (``""`` for none)."""


@dataclass(frozen=True, slots=True)
class Change:
    """One recorded Check whose decision would differ."""

    seq: int
    record_id: str
    run_id: str
    tool: str
    old_decision: str
    old_tier: str
    old_reason: str
    new: Decision


@dataclass(slots=True)
class ReplayReport:
    """What replaying a log against one policy found.

    A Check changes when its decision or its tier changes, as the shadow counts disagreements:
    NEEDS_APPROVAL from one supervisor and NEEDS_APPROVAL from two finance approvers are not
    the same answer. ``transitions`` counts decisions; ``tier_changes`` the Checks among them
    whose decision stayed and whose tier did not.
    """

    policy_version: str
    records: int = 0
    replayed: int = 0
    unreplayable: Counter[str] = field(default_factory=Counter)
    transitions: Counter[Transition] = field(default_factory=Counter)
    by_tool: dict[str, Counter[Transition]] = field(default_factory=dict)
    tier_changes: Counter[TierChange] = field(default_factory=Counter)
    examples: list[Change] = field(default_factory=list)

    @property
    def changed(self) -> int:
        decisions = sum(n for (old, new), n in self.transitions.items() if old != new)
        return decisions + sum(self.tier_changes.values())


def _token_errors() -> dict[str, type[TokenError]]:
    found: dict[str, type[TokenError]] = {}
    pending = list(TokenError.__subclasses__())
    while pending:
        kind = pending.pop()
        found.setdefault(kind.code, kind)
        pending.extend(kind.__subclasses__())
    return found


_TOKEN_ERRORS = _token_errors()


def recorded_token_error(code: str, message: str) -> TokenError | None:
    """The refusal a record tells of: an error of its class (so its ``code``) and its message.

    None when ``code`` names no token error. A record keeps only those two, and the engine
    reads nothing else, so the class's own constructor (which wants the values behind the
    message: ``expired_at``, ``tool``…) is bypassed rather than fed guesses.
    """
    kind = _TOKEN_ERRORS.get(code)
    if kind is None:
        return None
    error = kind.__new__(kind)
    TokenError.__init__(error, message)
    return error


def _text(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    return value if isinstance(value, str) else ""


def _mapping(record: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    value = record.get(name)
    return value if isinstance(value, dict) else None


_STATEFUL_REASONS = frozenset(
    {
        "TOKEN_REVOKED",
        "KILL_SWITCH",
        "BUDGET_EXCEEDED",
        "APPROVALS_PENDING_LIMIT",
        "RATE_LIMITED",
        "RETRY_BUDGET_EXHAUSTED",
        "IDEMPOTENCY_CONFLICT",
        "APPROVAL_NOT_FOUND",
        "APPROVAL_MISMATCH",
        "APPROVAL_REJECTED",
        "APPROVAL_EXPIRED",
        "APPROVAL_CONSUMED",
        "APPROVAL_GRANTED",
    }
)
"""Outcomes decided by live state (budgets, rate buckets, kill switches engaged through the
API, idempotency keys, approval requests), which a replay over the policy alone cannot
re-derive."""


def _depends_on_state(record: Mapping[str, Any]) -> bool:
    reasons = record.get("reasons")
    first = reasons[0].get("code") if isinstance(reasons, list) and reasons else None
    return (
        bool(record.get("replay_of"))
        or bool(record.get("presented_approval_id"))
        or first in _STATEFUL_REASONS
    )


def replay_record(record: Mapping[str, Any], policy: Policy) -> Decision | str:
    """The decision ``policy`` gives the recorded Check, or why it cannot be replayed."""
    if record.get("redacted"):
        return "redacted arguments"
    if _depends_on_state(record):
        return "decided by state (budgets, rate limits, kill switches, idempotency, approvals)"
    arguments, context = _mapping(record, "arguments"), _mapping(record, "context")
    if arguments is None or context is None or "token" not in record:
        return "inputs not recorded"
    call = ToolCall(
        tool=_text(record, "tool"),
        arguments=arguments,
        context=context,
        run_id=_text(record, "run_id"),
        step_id=_text(record, "step_id"),
        idempotency_key=_text(record, "idempotency_key"),
        approval_id=_text(record, "presented_approval_id"),
        dry_run=record.get("dry_run") is True,
    )
    recorded_token = record.get("token")
    if isinstance(recorded_token, dict):
        try:
            claims = claims_from_record(recorded_token)
        except (KeyError, TypeError, ValueError, TokenError):
            return "inputs not recorded"
        return evaluate(policy, call, claims)
    reasons = record.get("reasons")
    first = reasons[0] if isinstance(reasons, list) and reasons else {}
    code = _text(first, "code") if isinstance(first, dict) else ""
    if code == ReasonCode.TOKEN_MISSING:
        return evaluate(policy, call, None)
    error = recorded_token_error(code, _text(first, "message"))
    if error is None:
        return "token state not recorded"
    return evaluate(policy, call, error)


def replay(
    log: Iterable[Mapping[str, Any]],
    policy: Policy,
    *,
    examples: int = 5,
    run_id: str | None = None,
) -> ReplayReport:
    """Replay every decision record of ``log`` (or of one run) against ``policy``.

    ``examples`` bounds the changed Checks kept per (old → new) transition (of decisions, or
    of tiers when the decision stays).
    """
    report = ReplayReport(policy_version=policy.version)
    kept: Counter[tuple[str, ...]] = Counter()
    for record in log:
        if record.get("kind") != KIND_DECISION:
            continue
        if run_id is not None and record.get("run_id") != run_id:
            continue
        report.records += 1
        result = replay_record(record, policy)
        if isinstance(result, str):
            report.unreplayable[result] += 1
            continue
        report.replayed += 1
        old, new = _text(record, "decision"), result.outcome.value
        tool = _text(record, "tool")
        report.transitions[old, new] += 1
        known = tool in policy.tools or old != Outcome.DENY.value  # only known tools get past
        report.by_tool.setdefault(tool if known else UNKNOWN_TOOLS, Counter())[old, new] += 1
        old_tier, new_tier = _text(record, "matched_tier"), result.matched_tier
        kind: tuple[str, ...] = (old, new)
        if old == new:
            if old_tier == new_tier:
                continue
            report.tier_changes[old, old_tier, new_tier] += 1
            kind = (old, old_tier, new_tier)
        if kept[kind] < examples:
            kept[kind] += 1
            reasons = record.get("reasons")
            first = reasons[0] if isinstance(reasons, list) and reasons else {}
            seq = record.get("seq")
            report.examples.append(
                Change(
                    seq=seq if isinstance(seq, int) else 0,
                    record_id=_text(record, "record_id"),
                    run_id=_text(record, "run_id"),
                    tool=tool,
                    old_decision=old,
                    old_tier=old_tier,
                    old_reason=_text(first, "code") if isinstance(first, dict) else "",
                    new=result,
                )
            )
    return report


def _label(transition: Transition) -> str:
    old, new = transition
    return f"{old} -> {new}" if old != new else f"{old} (same decision)"


def to_json(report: ReplayReport) -> dict[str, Any]:
    """The report as a JSON-ready object (what ``--format json`` prints)."""
    return {
        "policy_version": report.policy_version,
        "records": report.records,
        "replayed": report.replayed,
        "changed": report.changed,
        "unreplayable": dict(sorted(report.unreplayable.items())),
        "transitions": [
            {"from": old, "to": new, "count": n}
            for (old, new), n in sorted(report.transitions.items())
        ],
        "by_tool": {
            tool: [{"from": old, "to": new, "count": n} for (old, new), n in sorted(counts.items())]
            for tool, counts in sorted(report.by_tool.items())
        },
        "tier_changes": [
            {"decision": decision, "from": old, "to": new, "count": n}
            for (decision, old, new), n in sorted(report.tier_changes.items())
        ],
        "examples": [
            {
                "seq": change.seq,
                "decision_id": change.record_id,
                "run_id": change.run_id,
                "tool": change.tool,
                "from": {
                    "decision": change.old_decision,
                    "tier": change.old_tier,
                    "reason": change.old_reason,
                },
                "to": {
                    "decision": change.new.outcome.value,
                    "tier": change.new.matched_tier,
                    "reason": change.new.primary_code or "",
                    "message": change.new.reasons[0].message if change.new.reasons else "",
                },
            }
            for change in report.examples
        ],
    }


def to_table(report: ReplayReport) -> str:
    """The report for people."""
    unreplayable = sum(report.unreplayable.values())
    lines = [
        f"policy {report.policy_version}: {report.records} recorded checks, "
        f"{report.replayed} replayed, {report.changed} would change, "
        f"{unreplayable} could not be replayed",
    ]
    for reason, count in sorted(report.unreplayable.items()):
        lines.append(f"  not replayed: {count} ({reason})")
    lines.append("")
    lines.append("decisions")
    for transition, count in sorted(report.transitions.items()):
        lines.append(f"  {count:>7}  {_label(transition)}")
    if report.tier_changes:
        lines.append("")
        lines.append("tiers (same decision, decided by another tier)")
        for (decision, before, after), count in sorted(report.tier_changes.items()):
            lines.append(f"  {count:>7}  {decision}: {before or '-'} -> {after or '-'}")
    lines.append("")
    lines.append("by tool")
    for tool, counts in sorted(report.by_tool.items()):
        for transition, count in sorted(counts.items()):
            lines.append(f"  {tool:<24} {count:>7}  {_label(transition)}")
    if report.examples:
        lines.append("")
        lines.append("examples")
        for change in report.examples:
            new = change.new
            lines.append(
                f"  seq {change.seq} {change.record_id} run {change.run_id or '-'} "
                f"{change.tool}: {change.old_decision} ({change.old_tier or change.old_reason}) "
                f"-> {new.outcome.value} ({new.matched_tier or new.primary_code or ''})"
            )
    return "\n".join(lines)
