"""The approval lifecycle: who may approve what (pure rules), and the shell that records it.

A request is created by a Check whose tier requires approval; people from the IdP approve or
reject it; the agent's repeated Check consumes it once. Every change is an event in the
store (history and the Watch feed) and a line in the audit log.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from sidecar.audit.record import event_body, new_record_id
from sidecar.audit.writer import AuditLog
from sidecar.clock import Clock, timestamp
from sidecar.engine import ApprovalRecord, ApprovalStatus, Verdict, ttl_run_out
from sidecar.errors import ConflictError, NotFoundError, PermissionDeniedError
from sidecar.identity import Identity
from sidecar.observability.metrics import Metrics
from sidecar.policy.conditions import ConditionEvaluationError, bind_approver
from sidecar.policy.model import Policy
from sidecar.state import ApprovalEvent, Store, StoredApproval
from sidecar.state.patience import write_when_free

MAX_COMMENT_CHARS = 2000


def judge(
    record: ApprovalRecord,
    approver: Identity,
    policy: Policy,
    *,
    approve: bool,
    comment: str,
    now: float,
    arguments: Mapping[str, Any] | None = None,
) -> tuple[Verdict | None, ApprovalStatus]:
    """The verdict to record (None if this person already gave one) and the new status.

    Raises:
        ConflictError: the request is not pending (expired, closed).
        PermissionDeniedError: the person may not judge it: the requesting agent, an issuer of
            the agent's tokens, or nobody holding one of the tier's approver roles.
    """
    status = record.status_at(now)
    if status is not ApprovalStatus.PENDING:
        raise ConflictError(f"approval request {record.id} is {status.value}")
    if record.rules != policy.approval_rules(record.tool, record.tier):
        # Who may approve, how many must, or the approver condition changed (or the tier is
        # gone): judging under the old rules could count someone the policy now excludes.
        raise ConflictError(
            f"approval request {record.id} was made under approval rules the policy no longer "
            f"has (tier '{record.tier}' of tool '{record.tool}' changed or is gone, or the "
            "request predates this proviso's recording of them); the agent's next Check asks "
            "for approval again"
        )
    if approver.subject == record.agent:
        raise PermissionDeniedError("the requesting agent cannot judge its own call")
    issuers = policy.issuers_of(record.agent)
    if approver.subject in issuers:
        raise PermissionDeniedError("an issuer of the agent's tokens cannot judge its calls")
    eligible = tuple(
        r for r in policy.approver_roles_of(approver.groups) if r in record.approver_roles
    )
    if not eligible:
        roles = ", ".join(record.approver_roles)
        raise PermissionDeniedError(f"judging this request needs one of the roles: {roles}")
    _check_approver_condition(record, approver, policy, arguments)
    if any(v.approver == approver.subject for v in record.verdicts):
        return None, status  # a person counts once
    verdict = Verdict(approver.subject, approve, eligible, now, comment[:MAX_COMMENT_CHARS])
    verdicts = (*record.verdicts, verdict)
    if sum(not v.approve for v in verdicts) >= record.vetoes:
        return verdict, ApprovalStatus.REJECTED
    # Approvals by people who have since become issuers of the agent no longer count.
    if sum(v.approve and v.approver not in issuers for v in verdicts) >= record.approvals_required:
        return verdict, ApprovalStatus.APPROVED
    return verdict, ApprovalStatus.PENDING


def _check_approver_condition(
    record: ApprovalRecord, approver: Identity, policy: Policy, arguments: Mapping[str, Any] | None
) -> None:
    """The tier's approver condition (e.g. not the agent's owner) must hold; an error refuses."""
    tier = policy.tier(record.tool, record.tier)
    condition = tier.approver_condition if tier else None
    if condition is None:
        return
    bindings = bind_approver(
        {"subject": approver.subject, "groups": list(approver.groups), "claims": approver.claims},
        {
            "agent": record.agent,
            "tool": record.tool,
            "args": dict(arguments or {}),
            "run_id": record.run_id,
            "tier": record.tier,
        },
    )
    try:
        holds = condition.evaluate(bindings)
    except ConditionEvaluationError as exc:
        raise PermissionDeniedError(f"the tier's approver condition failed: {exc}") from None
    if not holds:
        raise PermissionDeniedError(
            f"the tier's approver condition excludes you: {condition.source}"
        )


class ApprovalFeed:
    """Wakes watchers in this process when an approval changes (others poll the store)."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return
        finally:
            self._changed.clear()


@dataclass(frozen=True, slots=True)
class ApprovalChange:
    """What an approval operation did, for its caller."""

    approval: StoredApproval
    counted: bool


class Approvals:
    """Approval operations over the store, each audited, measured and announced."""

    def __init__(
        self, store: Store, audit: AuditLog, metrics: Metrics, clock: Clock, feed: ApprovalFeed
    ) -> None:
        self.store = store
        self.feed = feed
        self._audit = audit
        self._metrics = metrics
        self._clock = clock
        self._pending_tiers: set[str] = set()
        """Tiers ``proviso_approvals_pending`` has shown: a tier policy edits removed stays at 0."""

    def get(self, approval_id: str) -> StoredApproval:
        found = self.store.get_approval(approval_id)
        if found is None:
            raise NotFoundError(f"no approval request '{approval_id}'")
        return found

    async def judge(
        self, approval_id: str, approver: Identity, policy: Policy, *, approve: bool, comment: str
    ) -> ApprovalChange:
        """Record one person's approval or rejection.

        Raises:
            NotFoundError, ConflictError, PermissionDeniedError: see ``judge``.
        """
        now = self._clock.now()

        def record_verdict() -> tuple[StoredApproval, Verdict | None, ApprovalStatus]:
            with self.store.approvals() as transaction:
                stored = transaction.get(approval_id)
                if stored is None:
                    raise NotFoundError(f"no approval request '{approval_id}'")
                verdict, status = judge(
                    stored.record,
                    approver,
                    policy,
                    approve=approve,
                    comment=comment,
                    now=now,
                    arguments=arguments_of(stored),
                )
                if verdict is not None:
                    transaction.add_verdict(approval_id, verdict)
                    transaction.add_event(
                        approval_id, "approve" if approve else "reject", approver.subject, now
                    )
                if status is not stored.record.status:
                    transaction.set_status(approval_id, status, now)
                    transaction.add_event(approval_id, status.value, approver.subject, now)
                return stored, verdict, status

        stored, verdict, status = await write_when_free(self.store, record_verdict)
        changed = self.get(approval_id)
        if verdict is not None:
            await self.record_event(
                changed, "approve" if approve else "reject", approver.subject, comment
            )
        if status is not stored.record.status:
            await self.record_event(changed, status.value, approver.subject)
            self._metrics.approval_decision_seconds.observe(now - stored.record.created_at)
        return ApprovalChange(changed, counted=verdict is not None)

    async def sweep(self, policy: Policy | None = None, loaded_at: float = 0.0) -> int:
        """Expire requests past their time, and (given the policy in force, put in force at
        ``loaded_at``) those made under approval rules it no longer has, which nobody can
        judge or use any more, or older than its TTL for their tier; returns how many.

        Only requests made before ``loaded_at`` can be stale here: one made later under other
        rules comes from a newer policy that another worker has loaded and this one not yet
        (expiring it would lose the approvals people are giving it). That worker sweeps it if
        it really is stale.
        """

        now = self._clock.now()

        def stale(tool: str, tier: str, rules: str, created_at: float) -> bool:
            if policy is None or created_at >= loaded_at:
                return False
            if rules != policy.approval_rules(tool, tier):
                return True
            in_force = policy.tier(tool, tier)  # a TTL shortened since: run out already
            return in_force is not None and ttl_run_out(created_at, in_force.ttl_seconds, now)

        expired = await write_when_free(
            self.store, partial(self.store.expire_approvals, now, stale)
        )
        for approval in expired:
            await self.record_event(approval, "expired", "proviso")
        return len(expired)

    async def record_event(
        self, approval: StoredApproval, event: str, actor: str, comment: str = ""
    ) -> None:
        """Audit one approval event, update the metrics, and wake watchers."""
        record = approval.record
        now = self._clock.now()
        fields = {
            "event": event,
            "approval_id": record.id,
            "run_id": record.run_id,
            "agent": record.agent,
            "tool": record.tool,
            "tier": record.tier,
            "args_digest": record.args_digest,
            "actor": actor,
            "comment": comment,
        }
        body = event_body("approval", new_record_id(now, "evt"), timestamp(now), fields)
        await self._audit.append(body)
        if event in ("created", "approved", "rejected", "consumed", "expired"):
            self._metrics.approvals.labels(event).inc()
        self.refresh_pending()
        self.feed.notify()

    def refresh_pending(self, tiers: Iterable[str] = ()) -> None:
        """Set ``proviso_approvals_pending`` from the store. ``tiers`` (the policy's approval
        tiers) and every tier seen before read 0 when nothing is pending in them, not absent
        (an alert on the gauge could not tell "none pending" from "not reported"), and the
        samples are never cleared between two scrapes."""
        self._pending_tiers.update(tiers)
        pending = self.store.pending_by_tier()
        for tier in self._pending_tiers - pending.keys():
            self._metrics.approvals_pending.labels(tier).set(0)
        for tier, count in pending.items():
            self._metrics.approvals_pending.labels(tier).set(count)
        self._pending_tiers.update(pending)

    def events_after(self, seq: int, limit: int = 100) -> list[ApprovalEvent]:
        return self.store.approval_events(seq, limit)


def arguments_of(approval: StoredApproval) -> dict[str, object]:
    """The call's arguments, as the approver should read them."""
    value = json.loads(approval.arguments)
    return value if isinstance(value, dict) else {}
