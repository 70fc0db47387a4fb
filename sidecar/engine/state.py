"""What the engine reads from state, and the changes it asks the shell to commit.

The engine stays pure: the shell reads a ``StateView`` for the call (inside one store
transaction), the engine returns an ``Evaluation`` whose ``changes`` the shell commits in the
same transaction, so counters stay exact under concurrency.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from sidecar.engine.decision import Decision
from sidecar.policy.model import KillSwitch


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
    """

    kill_switches: tuple[KillSwitch, ...] = ()
    idempotent: StoredDecision | None = None
    usage: RunUsage = RunUsage()
    rate: RateBucket | None = None
    revocation: Revocation | None = None


@dataclass(frozen=True, slots=True)
class StateChanges:
    """What the shell must commit for this call (nothing for a dry run)."""

    count_call: bool = False
    failure_streak: int | None = None
    rate: RateBucket | None = None
    remember: bool = False

    @property
    def empty(self) -> bool:
        return not (self.count_call or self.remember or self.rate) and self.failure_streak is None


NO_STATE = StateView()
NO_CHANGES = StateChanges()


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A decision and its state changes. ``replay_of`` is set when an idempotency key replays
    an earlier decision: the id of that decision."""

    decision: Decision
    changes: StateChanges = NO_CHANGES
    replay_of: str = ""
