"""The Store interface every backend implements (SQLite now; PostgreSQL follows).

A Check runs its read-decide-write inside one ``decision`` transaction: the backend reads the
``StateView`` for the call's scope, the engine decides, and the backend commits the
``StateChanges`` before the transaction ends. Backends must make that transaction atomic
against every other process sharing the store, so budgets and idempotency keys are exact.
Checks in flight together are decided in one ``decisions`` batch: each in a ``decision`` of
its own within it (a savepoint), all committed at once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from sidecar.engine import (
    ApprovalRecord,
    ApprovalStatus,
    Decision,
    Revocation,
    StateChanges,
    StateView,
    Verdict,
)
from sidecar.policy.model import KillScope, KillSwitch


@dataclass(frozen=True, slots=True)
class DecisionScope:
    """Which rows one Check reads and writes.

    ``run_key`` is the Check's run id, or ``token <jti>`` when it has none: with a space,
    which no run id may hold, so no run can name (and spend or exhaust) a token's budget.
    ``token_ids`` is the token's lineage (its ancestors' ids and its own), looked up in the
    revocations.
    """

    agent: str
    tool: str
    run_key: str
    idempotency_key: str = ""
    args_digest: str = ""
    run_id: str = ""
    approval_id: str = ""
    may_need_approval: bool = False
    token_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token this sidecar minted: for whom, by whom, from which parent, until when."""

    token_id: str
    agent: str
    issued_by: str
    expires_at: float
    parent_id: str = ""


@dataclass(frozen=True, slots=True)
class NewApproval:
    """An approval request to create with a Check's changes."""

    record: ApprovalRecord
    arguments: str
    token_id: str
    policy_version: str


@dataclass(frozen=True, slots=True)
class StoredApproval:
    """An approval request as stored, with what approvers need to see."""

    record: ApprovalRecord
    arguments: str
    token_id: str
    policy_version: str
    closed_at: float | None = None


@dataclass(frozen=True, slots=True)
class ApprovalEvent:
    """One change of one request, in the order the store saw it."""

    seq: int
    approval_id: str
    event: str
    actor: str
    at: float


class ApprovalTransaction(Protocol):
    """Reads and writes of one approval operation (a verdict), committed together."""

    def get(self, approval_id: str) -> StoredApproval | None: ...

    def add_verdict(self, approval_id: str, verdict: Verdict) -> None: ...

    def set_status(self, approval_id: str, status: ApprovalStatus, now: float) -> None: ...

    def add_event(self, approval_id: str, event: str, actor: str, now: float) -> None: ...


class StateTransaction(Protocol):
    """Reads and writes of one Check, committed together."""

    def view(self, scope: DecisionScope | None, now: float) -> StateView:
        """Kill switches, and (with a scope) a revocation of any of its token ids, the
        idempotency record, run usage and rate bucket.

        Raises:
            StoreUnavailableError: state could not be read (the Check must not answer).
        """
        ...

    def pending_approvals(self, agent: str, now: float) -> int:
        """How many approval requests of ``agent`` are pending (and not yet expired).

        Raises:
            StoreUnavailableError: state could not be read (the Check must not answer).
        """
        ...

    def commit(
        self,
        scope: DecisionScope,
        changes: StateChanges,
        *,
        decision: Decision,
        decision_id: str,
        cost: Decimal,
        now: float,
        idempotency_window_seconds: int,
        new_approval: NewApproval | None = None,
    ) -> None:
        """Apply the engine's changes; called at most once, before the transaction ends."""
        ...


class DecisionBatch(Protocol):
    """Several Checks decided one after the other inside one exclusive transaction."""

    def decision(self) -> AbstractContextManager[StateTransaction]:
        """One Check's reads and writes. It sees the writes of the Checks before it in the
        batch; if the block raises, only its own writes are undone.

        Raises:
            StoreUnavailableError: the store failed; the batch can no longer commit.
        """
        ...


class Store(Protocol):
    """Durable state shared by every sidecar process on the host (or fleet)."""

    @property
    def busy_timeout_seconds(self) -> float:
        """How long a writer waits for another to let go of the store before it is unavailable."""
        ...

    def patience(self, max_wait: float) -> AbstractContextManager[None]:
        """Within the block, writes wait at most ``max_wait`` for another writer (then
        ``StoreBusyError``) instead of the busy timeout: how the event loop's writers (the
        batcher, ``patience.write_when_free``) wait briefly, then yield the loop and retry."""
        ...

    def decision(self) -> AbstractContextManager[StateTransaction]:
        """An exclusive transaction for one Check; rolled back if the block raises.

        Raises:
            StoreBusyError: another writer held the store all the while (see ``patience``).
            StoreUnavailableError: the store cannot be reached or locked.
        """
        ...

    def decisions(self) -> AbstractContextManager[DecisionBatch]:
        """An exclusive transaction for a batch of Checks: one lock and one commit for all of
        them, with the same exactness as one transaction each. Rolled back whole if the block
        raises, a Check's undo failed, or the commit fails.

        Raises:
            StoreBusyError: another writer held the store all the while (see ``patience``);
                nothing was done.
            StoreUnavailableError: the store cannot be reached, locked, or committed.
        """
        ...

    def undo_decision(
        self,
        scope: DecisionScope,
        decision_id: str,
        *,
        consumed_approval: str,
        opened_approval: str = "",
        now: float,
    ) -> None:
        """Forget a committed decision that could not be audited: its idempotency record, the
        consumption of an approval (back to approved), and a request it opened (expired: the
        agent never got its id, and it must not fill the agent's pending requests). Budgets
        stay spent (the safe side)."""
        ...

    def set_kill_switch(self, switch: KillSwitch) -> tuple[KillSwitch, bool]:
        """Engage (or update) a switch; returns it as stored, and whether it was already
        engaged (read in the same write, so two engages at once cannot both say no)."""
        ...

    def release_kill_switch(self, scope: KillScope, target: str) -> KillSwitch | None:
        """Release a switch; returns what was released, or None if it was not engaged."""
        ...

    def kill_switches(self) -> tuple[KillSwitch, ...]:
        """Every switch engaged through the API, oldest first."""
        ...

    def revoke(self, revocation: Revocation) -> tuple[Revocation, bool]:
        """Record a revocation; the first one of a token id stands.

        Returns the revocation as stored and whether this call created it.
        """
        ...

    def revocation(self, token_ids: tuple[str, ...]) -> Revocation | None:
        """The earliest revocation of any of ``token_ids`` (outside a Check's transaction)."""
        ...

    def record_issued(self, token: IssuedToken) -> None:
        """Remember a minted token (idempotent per token id)."""
        ...

    def issued(self, token_id: str) -> IssuedToken | None:
        """The token minted with this id, if this store has seen it (and not pruned it)."""
        ...

    def prune(self, now: float) -> int:
        """Drop expired idempotency records, stale run usage, and revocations and issued-token
        records whose tokens have expired; returns rows removed."""
        ...

    def approvals(self) -> AbstractContextManager[ApprovalTransaction]:
        """An exclusive transaction for one approval operation."""
        ...

    def get_approval(self, approval_id: str) -> StoredApproval | None: ...

    def list_approvals(
        self,
        *,
        status: ApprovalStatus | None,
        agent: str,
        tool: str,
        limit: int,
        after: str,
    ) -> list[StoredApproval]:
        """Newest first; ``after`` is the id of the last item of the previous page."""
        ...

    def approval_events(self, after_seq: int, limit: int) -> list[ApprovalEvent]: ...

    def last_approval_event(self) -> int: ...

    def pending_by_tier(self) -> dict[str, int]: ...

    def expire_approvals(
        self, now: float, stale: Callable[[str, str, str, float], bool] | None = None
    ) -> list[StoredApproval]:
        """Mark open requests past their expiry as expired (with an event), and those for which
        ``stale(tool, tier, rules, created_at)`` holds (made under approval rules the policy
        no longer has: they can neither be judged nor used); return them."""
        ...

    def close(self) -> None: ...
