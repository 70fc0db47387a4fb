"""The imperative shell of Check: verify the token, run the engine, make the record durable.

Order matters for safety: the audit record is on disk before the answer is returned, and any
failure to write it raises (the server answers UNAVAILABLE), so no ALLOW is ever unrecorded.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Protocol

from sidecar import strictjson
from sidecar.audit.record import AuditRecord
from sidecar.audit.writer import AuditLog
from sidecar.clock import Clock
from sidecar.engine import Decision, ToolCall, decide
from sidecar.errors import AuditWriteError
from sidecar.observability.metrics import Metrics, bounded
from sidecar.policy.model import Policy
from sidecar.state import DecisionScope, Store
from tokens import CapabilityClaims, TokenError, TokenUnknownKeyError, VerificationKeys, verify

log = logging.getLogger("proviso.authorizer")


@dataclass(frozen=True, slots=True)
class CheckInput:
    """A parsed Check request."""

    token: str
    call: ToolCall
    run_metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The decision and the id of its audit record (the original one's, for a replay)."""

    decision: Decision
    decision_id: str
    replayed: bool = False


class PolicyHolder:
    """The policy in force. Readers take one reference per Check; a reload swaps it whole."""

    def __init__(self, policy: Policy, loaded_at: float) -> None:
        self.current = policy
        self.loaded_at = loaded_at


class KeySource(Protocol):
    """Where the verifier gets its keys: the key store, which follows rotations on disk."""

    def verification_keys(self) -> VerificationKeys: ...

    def refresh(self, *, force: bool = False) -> bool: ...


class TokenVerifier:
    """Verifies capability tokens, caching good results until the token expires.

    Only successes are cached, keyed by the exact token text; a cached entry is re-checked
    against ``now`` on every use, so expiry still bites, and entries of a revoked token (or
    of its descendants) are dropped by :meth:`forget`. Revocation itself is not decided
    here: every Check reads it from the store, so no cache can outlive it. On a cache miss
    the key source may look at the disk (at most once a second), and a token naming a kid
    not in the ring makes it look at once, so keys rotated (or retired) by another process
    are followed without a restart.
    """

    def __init__(
        self,
        keys: KeySource,
        *,
        audience: str,
        issuer: str,
        leeway_seconds: int,
        max_entries: int = 10_000,
    ) -> None:
        self._keys = keys
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway_seconds
        self._max_entries = max_entries
        self._cache: OrderedDict[str, CapabilityClaims] = OrderedDict()

    def verify(self, token: str, now: float) -> CapabilityClaims | TokenError | None:
        """Claims, the reason they are refused, or None when no token was sent."""
        if not token:
            return None
        cached = self._cache.get(token)
        if cached is not None and cached.expires_at > now - self._leeway:
            return cached
        self._keys.refresh()  # rate-limited in the key source: at most one look a second
        try:
            claims = self._verify(token, now)
        except TokenUnknownKeyError as exc:
            # A key rotated in by another process: look now (a few stat calls; the key files
            # are only read when they changed), and try once more.
            if not self._keys.refresh(force=True):
                self._cache.pop(token, None)
                return exc
            try:
                claims = self._verify(token, now)
            except TokenError as again:
                self._cache.pop(token, None)
                return again
        except TokenError as exc:
            self._cache.pop(token, None)
            return exc
        self._cache[token] = claims
        if len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)
        return claims

    def _verify(self, token: str, now: float) -> CapabilityClaims:
        return verify(
            token,
            self._keys.verification_keys(),
            audience=self._audience,
            issuer=self._issuer,
            now=now,
            leeway_seconds=self._leeway,
        )

    def forget(self, token_ids: Collection[str]) -> int:
        """Drop cached results of tokens whose id, or an ancestor's, is in ``token_ids``."""
        wanted = set(token_ids)
        stale = [text for text, claims in self._cache.items() if wanted & set(claims.lineage)]
        for text in stale:
            del self._cache[text]
        return len(stale)

    def __len__(self) -> int:
        return len(self._cache)


def new_decision_id(now: float) -> str:
    """A time-ordered, unguessable id: milliseconds then 64 random bits."""
    return f"dec_{int(now * 1000):012x}{secrets.token_hex(8)}"


def timestamp(now: float) -> str:
    """RFC 3339 UTC with milliseconds, as every audit line writes time."""
    return (
        datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class Authorizer:
    """Answers Check: one policy read, one engine call, one durable audit record."""

    def __init__(
        self,
        policy: PolicyHolder,
        *,
        tokens: TokenVerifier,
        store: Store,
        audit: AuditLog,
        metrics: Metrics,
        clock: Clock,
        new_id: Callable[[float], str] = new_decision_id,
    ) -> None:
        self._policy = policy
        self._tokens = tokens
        self._store = store
        self._audit = audit
        self._metrics = metrics
        self._clock = clock
        self._new_id = new_id

    async def check(self, request: CheckInput) -> CheckResult:
        """Decide and record one call.

        State changes (budgets, idempotency, rate buckets) are committed before the audit
        record is written; if the record then fails, the call was counted but not answered,
        which errs on the safe side.

        Raises:
            StoreUnavailableError: state could not be read or written; nothing is answered.
            AuditWriteError: the record could not be made durable; the caller must not allow.
        """
        started = time.perf_counter()
        now = self._clock.now()
        policy = self._policy.current
        token = self._tokens.verify(request.token, now)
        call = replace(request.call, args_digest=strictjson.digest(request.call.arguments))
        record_id = self._new_id(now)
        scope = None
        if isinstance(token, CapabilityClaims):
            scope = DecisionScope(
                agent=token.subject,
                tool=call.tool,
                run_key=call.run_id or f"token:{token.token_id}",
                idempotency_key=call.idempotency_key,
                args_digest=call.args_digest,
                token_ids=token.lineage,
            )
        with self._store.decision() as transaction:
            view = transaction.view(scope, now)
            evaluation = decide(policy, call, token, view, now)
            if scope is not None and not call.dry_run and not evaluation.changes.empty:
                tool = policy.tools.get(call.tool)
                transaction.commit(
                    scope,
                    evaluation.changes,
                    decision=evaluation.decision,
                    decision_id=record_id,
                    cost=tool.cost if tool else Decimal(0),
                    now=now,
                    idempotency_window_seconds=policy.controls.idempotency_window_seconds,
                )
        self._metrics.kill_switches_active.set(len(policy.kill_switches) + len(view.kill_switches))
        decision = evaluation.decision
        record = AuditRecord(
            record_id=record_id,
            time=timestamp(now),
            decision=decision,
            tool=call.tool,
            args_digest=call.args_digest,
            arguments_canonical=strictjson.canonical(call.arguments),
            latency_ms=(time.perf_counter() - started) * 1000,
            run_id=call.run_id,
            step_id=call.step_id,
            idempotency_key=call.idempotency_key,
            approval_id=call.approval_id,
            dry_run=call.dry_run,
            run_metadata=request.run_metadata,
            replay_of=evaluation.replay_of,
        )
        write_started = time.perf_counter()
        try:
            await self._audit.append(record.to_json_line())
        except AuditWriteError:
            self._metrics.audit_write_errors.inc()
            log.error("audit write failed; failing the check closed", extra={"tool": call.tool})
            raise
        finished = time.perf_counter()
        self._metrics.audit_write_duration.observe(finished - write_started)
        self._metrics.check_duration.observe(finished - started)
        code = decision.primary_code
        if code is not None and code.value.startswith("TOKEN_"):
            self._metrics.tokens_rejected.labels(code.value).inc()
        self._metrics.decisions.labels(
            decision.outcome.value,
            bounded(call.tool, policy.tools),
            code.value if code else "none",
        ).inc()
        return CheckResult(
            decision=decision,
            decision_id=evaluation.replay_of or record_id,
            replayed=bool(evaluation.replay_of),
        )
