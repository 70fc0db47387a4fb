"""What the engine reads from state, and the changes it asks the shell to commit.

The engine stays pure: the shell reads a ``StateView`` for the call (inside one store
transaction), the engine returns an ``Evaluation`` whose ``changes`` the shell commits in the
same transaction, so counters stay exact under concurrency.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

from sidecar.engine.decision import ApprovalRequirement, Decision
from sidecar.policy.model import KillSwitch


class ApprovalStatus(StrEnum):
    """The life of an approval request; only ``pending`` and ``approved`` can move on."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CONSUMED = "consumed"


@dataclass(frozen=True, slots=True)
class Verdict:
    """One person's approval or rejection, with the approver roles they held then."""

    approver: str
    approve: bool
    roles: tuple[str, ...]
    at: float
    comment: str = ""


def ttl_run_out(created_at: float, ttl_seconds: int, now: float) -> bool:
    """Whether a request made at ``created_at`` is past a TTL of ``ttl_seconds`` (0: none)."""
    return ttl_seconds > 0 and now >= created_at + ttl_seconds


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    """An approval request bound to one exact call (agent, tool, arguments digest, run)."""

    id: str
    agent: str
    tool: str
    args_digest: str
    run_id: str
    tier: str
    approvals_required: int
    approver_roles: tuple[str, ...]
    vetoes: int
    status: ApprovalStatus
    created_at: float
    expires_at: float
    verdicts: tuple[Verdict, ...] = ()
    rules: str = ""
    """``Policy.approval_rules`` of the tier when the request was made ("": unknown, stale)."""

    def status_at(self, now: float, ttl_in_force: int = 0) -> ApprovalStatus:
        """Pending and approved requests expire; an approval can be used until then too.

        ``ttl_in_force`` is the tier's TTL in the policy now (0: not known): a policy that
        shortened it (24 h to 1 h) must not leave older requests open, or approvals given
        under them usable, until their old end.
        """
        open_states = (ApprovalStatus.PENDING, ApprovalStatus.APPROVED)
        if self.status in open_states and (
            now >= self.expires_at or ttl_run_out(self.created_at, ttl_in_force, now)
        ):
            return ApprovalStatus.EXPIRED
        return self.status

    def approvers_for(
        self, requirement: ApprovalRequirement, excluded: frozenset[str] = frozenset()
    ) -> tuple[str, ...]:
        """Distinct people whose approval counts for ``requirement`` (roles they held), but
        none of ``excluded`` (those who may now mint the agent's tokens)."""
        roles = set(requirement.approver_roles)
        return tuple(
            sorted(
                {
                    v.approver
                    for v in self.verdicts
                    if v.approve and roles & set(v.roles) and v.approver not in excluded
                }
            )
        )

    def satisfies(
        self, requirement: ApprovalRequirement, excluded: frozenset[str] = frozenset()
    ) -> bool:
        """Approved, for this tier, by enough people holding the tier's roles now and not in
        ``excluded``."""
        return (
            self.status is ApprovalStatus.APPROVED
            and self.tier == requirement.tier
            and len(self.approvers_for(requirement, excluded)) >= requirement.approvals_required
        )


@dataclass(frozen=True, slots=True)
class RunUsage:
    """How much of the run's budget is spent: all tools, this tool, and the retry streak."""

    calls: int = 0
    cost: Decimal = Decimal(0)
    tool_calls: int = 0
    failure_streak: int = 0


@dataclass(frozen=True, slots=True)
class RateBucket:
    """A token bucket's level at a moment."""

    tokens: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class StoredDecision:
    """The decision recorded for an idempotency key, and the call it was for."""

    tool: str
    args_digest: str
    decision: Decision
    decision_id: str
    run_id: str = ""


@dataclass(frozen=True, slots=True)
class Revocation:
    """A revoked capability token: it, and every token attenuated from it, is denied.

    ``expires_at`` is when the token (and so every descendant) has expired for good, leeway
    included: after it the record can be pruned.
    """

    token_id: str
    reason: str
    revoked_by: str
    revoked_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class StateView:
    """The state one call is decided against.

    ``revocation`` is set when the token, or one it was attenuated from, is revoked.
    ``pending_approvals`` counts the agent's pending approval requests; the shell reads it
    only for a call that would open a new one.
    """

    kill_switches: tuple[KillSwitch, ...] = ()
    idempotent: StoredDecision | None = None
    usage: RunUsage = RunUsage()
    rate: RateBucket | None = None
    approval: ApprovalRecord | None = None
    open_approval: ApprovalRecord | None = None
    revocation: Revocation | None = None
    pending_approvals: int = 0


@dataclass(frozen=True, slots=True)
class StateChanges:
    """What the shell must commit for this call (nothing for a dry run)."""

    count_call: bool = False
    failure_streak: int | None = None
    rate: RateBucket | None = None
    remember: bool = False
    open_approval: ApprovalRequirement | None = None
    consume_approval: str = ""
    expire_approval: str = ""

    @property
    def empty(self) -> bool:
        return (
            not (self.count_call or self.remember or self.rate or self.open_approval)
            and not (self.consume_approval or self.expire_approval)
            and self.failure_streak is None
        )


NO_STATE = StateView()
NO_CHANGES = StateChanges()


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A decision and its state changes. ``replay_of`` is set when an idempotency key replays
    an earlier decision: the id of that decision."""

    decision: Decision
    changes: StateChanges = NO_CHANGES
    replay_of: str = ""
