"""The imperative shell of Check: verify the token, run the engine, make the record durable.

Order matters for safety: the audit record is on disk before the answer is returned, and any
failure to write it raises (the server answers UNAVAILABLE), so no ALLOW is ever unrecorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import partial
from typing import Any, Protocol

from opentelemetry.trace import Span, StatusCode, Tracer

from sidecar import strictjson
from sidecar.approvals import Approvals
from sidecar.audit.record import AuditRecord, ShadowResult, new_record_id
from sidecar.audit.redaction import Redactor
from sidecar.audit.writer import AuditLog, Receipt
from sidecar.batching import DecisionBatcher
from sidecar.clock import Clock, timestamp
from sidecar.engine import (
    ApprovalRecord,
    ApprovalRequirement,
    ApprovalStatus,
    Decision,
    Evaluation,
    StateChanges,
    StateView,
    ToolCall,
    decide,
)
from sidecar.errors import AuditWriteError, StoreUnavailableError
from sidecar.observability.metrics import Metrics, bounded
from sidecar.policy.model import Policy, TierAction, Tool
from sidecar.state import DecisionScope, NewApproval, StateTransaction, Store
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


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    """A compiled policy and when it was swapped in: one value, so the two never disagree."""

    policy: Policy
    loaded_at: float


class PolicyHolder:
    """The policy in force. Readers take one reference per Check; a reload swaps it whole.

    The swap is one attribute assignment (atomic in CPython), of a policy that was fully loaded,
    validated and compiled beforehand: no reader ever sees half of one version.
    """

    def __init__(self, policy: Policy, loaded_at: float) -> None:
        self._loaded = LoadedPolicy(policy, loaded_at)

    @property
    def current(self) -> Policy:
        return self._loaded.policy

    @property
    def loaded_at(self) -> float:
        return self._loaded.loaded_at

    def snapshot(self) -> LoadedPolicy:
        """The policy and its load time, read together."""
        return self._loaded

    def swap(self, policy: Policy, loaded_at: float) -> None:
        """Put ``policy`` in force for every Check that starts from now on."""
        self._loaded = LoadedPolicy(policy, loaded_at)


class KeySource(Protocol):
    """Where the verifier gets its keys: the key store, which follows rotations on disk."""

    def verification_keys(self) -> VerificationKeys: ...

    def refresh(self, *, force: bool = False) -> bool: ...


class TokenVerifier:
    """Verifies capability tokens, caching good results until the token expires.

    Only successes are cached, keyed by the exact token text; a cached entry is re-checked
    against ``now`` on every use, so expiry still bites, and entries of a revoked token (or
    of its descendants) are dropped by :meth:`forget`. Revocation itself is not decided
    here: every Check reads it from the store, so no cache can outlive it. On every use the
    key source may look at the disk (at most once a second), and a token naming a kid
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
        # Rate-limited in the key source (a clock read; at most one look at the disk a
        # second), and also on a cache hit: a key deleted or lapsed on disk stops its cached
        # tokens within a second, not only once some other token misses the cache.
        self._keys.refresh()
        cached = self._cache.get(token)
        if (
            cached is not None
            and cached.expires_at > now - self._leeway
            and cached.key_id in self._keys.verification_keys()
        ):
            return cached
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


@dataclass(frozen=True, slots=True)
class _Pending:
    """One Check on its way through a decision batch: what it is decided on, and its record."""

    request: CheckInput
    call: ToolCall
    policy: Policy
    token: CapabilityClaims | TokenError | None
    scope: DecisionScope | None
    now: float
    record_id: str
    started: float
    span: Span | None
    tool: Tool | None  # the policy's tool of that name, if any


_Decided = tuple[StateView, Evaluation, NewApproval | None]
_Recorded = tuple[_Pending, Evaluation, NewApproval | None, float, "asyncio.Future[Receipt]"]
"""The Check, its decision, the approval it created, when its record was queued, and the
record's write."""


def _decide(pending: _Pending, transaction: StateTransaction) -> _Decided:
    """Read the call's state, decide, and write what the decision changes (a new approval
    request included): one Check's part of a decision batch."""
    policy, call, token, scope, now = (
        pending.policy, pending.call, pending.token, pending.scope, pending.now
    )  # fmt: skip
    view = transaction.view(scope, now)
    evaluation = decide(policy, call, token, view, now)
    if scope is not None and evaluation.changes.open_approval is not None:
        # Only a call that would open a request reads how many the agent has pending (off
        # every other Check's path); at the cap the engine refuses to open one.
        view = replace(view, pending_approvals=transaction.pending_approvals(scope.agent, now))
        evaluation = decide(policy, call, token, view, now)
    changes = evaluation.changes
    new_approval = None
    if scope is None or call.dry_run or changes.empty:
        return view, evaluation, new_approval
    if changes.open_approval is not None:
        new_approval = _new_approval(
            policy,
            call,
            scope,
            changes.open_approval,
            now=now,
            token_id=decision_token_id(token),
        )
        evaluation = replace(
            evaluation,
            decision=replace(evaluation.decision, approval_id=new_approval.record.id),
        )
    tool = pending.tool
    transaction.commit(
        scope,
        changes,
        decision=evaluation.decision,
        decision_id=pending.record_id,
        cost=tool.cost if tool else Decimal(0),
        now=now,
        idempotency_window_seconds=policy.controls.idempotency_window_seconds,
        new_approval=new_approval,
    )
    return view, evaluation, new_approval


def new_decision_id(now: float) -> str:
    """A decision id (the audit record's id)."""
    return new_record_id(now, "dec")


class Authorizer:
    """Answers Check: one policy read, one engine call, one durable audit record."""

    def __init__(
        self,
        policy: PolicyHolder,
        *,
        tokens: TokenVerifier,
        store: Store,
        approvals: Approvals,
        audit: AuditLog,
        metrics: Metrics,
        clock: Clock,
        new_id: Callable[[float], str] = new_decision_id,
        shadow: PolicyHolder | None = None,
        redactor: Redactor,
        tracer: Tracer | None = None,
        batch_window_seconds: float = 0.0,
    ) -> None:
        self._policy = policy
        self._shadow = shadow
        self._redactor = redactor
        self._tracer = tracer
        self._tokens = tokens
        self._store = store
        self._approvals = approvals
        self._audit = audit
        self._metrics = metrics
        self._clock = clock
        self._new_id = new_id
        self._batcher: DecisionBatcher[_Recorded] = DecisionBatcher(
            store, window_seconds=batch_window_seconds, on_batch=self._batch_decided
        )

    def _batch_decided(self, checks: int) -> None:
        """The batch's records are all queued: they go to the writer together now, without
        waiting again for company."""
        self._metrics.decision_batch.observe(checks)
        self._audit.send_gathered()

    async def check(self, parse: Callable[[], CheckInput]) -> CheckResult:
        """Decide and record one call (in an OpenTelemetry span when tracing is on).

        ``parse`` makes the request; it is called in the Check's decision batch, back to back
        with the other Checks' (see ``sidecar.batching``), and what it raises
        (``InvalidRequestError``) fails this Check alone, before anything is decided.

        State changes (budgets, idempotency, rate buckets, approvals) are committed before the
        audit record is written; if the record then fails, the call was counted but not
        answered, which errs on the safe side.

        Raises:
            InvalidRequestError: ``parse`` refused the request; nothing was decided.
            StoreUnavailableError: state could not be read or written; nothing is answered.
            AuditWriteError: the record could not be made durable; the caller must not allow.
        """
        with self._batcher.in_flight():
            if self._tracer is None:
                return await self._check(parse, None)
            span = self._tracer.start_span("proviso.Check")
            try:
                result = await self._check(parse, span)
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(StatusCode.ERROR, type(exc).__name__)
                raise
            finally:
                span.end()
            return result

    async def _check(self, parse: Callable[[], CheckInput], span: Span | None) -> CheckResult:
        started = time.perf_counter()
        pending, evaluation, new_approval, write_started, written = await self._batcher.decide(
            partial(self._prepare, parse, started, span), _decide, self._record
        )
        call, scope, policy = pending.call, pending.scope, pending.policy
        record_id = pending.record_id
        decision = evaluation.decision
        await asyncio.shield(written)  # AuditWriteError: UNAVAILABLE (``unrecorded`` undid it)
        finished = time.perf_counter()
        if not call.dry_run:
            await self._approval_events(evaluation.changes, new_approval, scope)
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

    def _prepare(
        self, parse: Callable[[], CheckInput], started: float, span: Span | None
    ) -> _Pending:
        """The request parsed, its token verified, and what it is decided on: the Check's part
        of its batch before the lock."""
        request = parse()
        now = self._clock.now()
        policy = self._policy.current
        token = self._tokens.verify(request.token, now)
        call = request.call
        if not call.args_digest:  # convert.check_input computes it; other callers may not
            call = replace(call, args_digest=strictjson.digest(call.arguments))
        scope = None
        tool = policy.tools.get(call.tool)
        if isinstance(token, CapabilityClaims):
            scope = DecisionScope(
                agent=token.subject,
                tool=call.tool,
                run_key=call.run_id or run_less_key(token.token_id),
                idempotency_key=call.idempotency_key,
                args_digest=call.args_digest,
                run_id=call.run_id,
                approval_id=call.approval_id,
                may_need_approval=tool is not None
                and any(t.action is TierAction.REQUIRE_APPROVAL for t in tool.tiers),
                token_ids=token.lineage,
            )
        return _Pending(
            request, call, policy, token, scope, now, self._new_id(now), started, span, tool
        )

    def _record(self, pending: _Pending, decided: _Decided) -> _Recorded:
        """Once the decision is committed: its audit record, queued at once (no await in
        between, so a Check cancelled from now on still leaves its record), and the decision
        undone if the record cannot be made durable, whether or not the Check still waits."""
        view, evaluation, new_approval = decided
        opened = new_approval.record.id if new_approval is not None else ""
        try:
            written = self._audit.enqueue(
                self._audit_body(pending, view, evaluation), gathered=True
            )
        except Exception:
            self._unrecorded(pending, evaluation.changes, opened)
            raise

        def settled(future: asyncio.Future[Receipt]) -> None:
            if not future.cancelled() and future.exception() is not None:
                self._unrecorded(pending, evaluation.changes, opened)

        written.add_done_callback(settled)
        return pending, evaluation, new_approval, time.perf_counter(), written

    def _unrecorded(self, pending: _Pending, changes: StateChanges, opened_approval: str) -> None:
        """A committed decision has no durable record: the answer is UNAVAILABLE (if anyone
        still waits for it), so a retry must not replay it as ALLOW, an approval it consumed
        must stay usable, and a request it opened (whose id the agent never got) is expired."""
        call, scope = pending.call, pending.scope
        self._metrics.audit_write_errors.inc()
        log.error("audit write failed; failing the check closed", extra={"tool": call.tool})
        if scope is not None and not call.dry_run:
            with contextlib.suppress(StoreUnavailableError):
                self._store.undo_decision(
                    scope,
                    pending.record_id,
                    consumed_approval=changes.consume_approval,
                    opened_approval=opened_approval,
                    now=pending.now,
                )

    def _audit_body(
        self, pending: _Pending, view: StateView, evaluation: Evaluation
    ) -> dict[str, Any]:
        """The decision's audit record (and its shadow evaluation and trace attributes)."""
        policy, call, token, now, span = (
            pending.policy, pending.call, pending.token, pending.now, pending.span
        )  # fmt: skip
        record_id, tool, started = pending.record_id, pending.tool, pending.started
        request = pending.request
        active_switches = len(policy.kill_switches) + len(view.kill_switches)
        self._metrics.kill_switches_active.set(active_switches)
        decision = evaluation.decision
        shadow = self._evaluate_shadow(policy, call, token, decision, view=view, now=now)
        arguments, redacted = self._redactor.redact(call.arguments, tool.redact if tool else ())
        body = AuditRecord(
            record_id=record_id,
            time=timestamp(now),
            decision=decision,
            call=call,
            args_digest=call.args_digest,
            arguments=arguments,
            latency_ms=(time.perf_counter() - started) * 1000,
            token=token if isinstance(token, CapabilityClaims) else None,
            redacted=redacted,
            run_metadata=request.run_metadata,
            replay_of=evaluation.replay_of,
            shadow=shadow,
        ).to_body()
        if span is not None:
            span.set_attributes(
                {
                    "proviso.decision_id": record_id,
                    "proviso.run_id": call.run_id,
                    "proviso.tool": call.tool,
                    "proviso.agent": decision.agent,
                    "proviso.decision": decision.outcome.value,
                    "proviso.reason": decision.primary_code or "",
                    "proviso.matched_tier": decision.matched_tier,
                    "proviso.policy_version": decision.policy_version,
                    "proviso.replayed": bool(evaluation.replay_of),
                }
            )
        return body

    async def _approval_events(
        self, changes: StateChanges, created: NewApproval | None, scope: DecisionScope | None
    ) -> None:
        """Audit and announce what this Check did to approval requests.

        The decision is already durable (its record names the approval) and committed, so a
        failure here must not turn it into an error the agent would retry into a used
        approval: it is logged and counted as an audit write error instead.
        """
        actor = scope.agent if scope else ""
        events = [
            (created.record.id if created else "", "created"),
            (changes.consume_approval, "consumed"),
            (changes.expire_approval, "expired"),
        ]
        for approval_id, event in events:
            if not approval_id:
                continue
            try:
                stored = self._store.get_approval(approval_id)
                if stored is not None:
                    await self._approvals.record_event(stored, event, actor)
            except (StoreUnavailableError, AuditWriteError):
                self._metrics.audit_write_errors.inc()
                log.exception(
                    "approval event not recorded",
                    extra={"approval_id": approval_id, "event": event},
                )

    def _evaluate_shadow(
        self,
        active_policy: Policy,
        call: ToolCall,
        token: CapabilityClaims | TokenError | None,
        active: Decision,
        *,
        view: StateView,
        now: float,
    ) -> ShadowResult | None:
        """What the candidate policy would decide, for the record only: it never decides.

        Same inputs as the active evaluation, after it. Any failure here is logged and counted,
        and the Check goes on with the active decision.
        """
        if self._shadow is None:
            return None
        policy = self._shadow.current
        try:
            # Same inputs and the same state as the active decision (revocations, kill
            # switches, approvals, budgets); its state changes are discarded.
            decision = decide(policy, call, token, view, now).decision
            agrees = (
                decision.outcome is active.outcome and decision.matched_tier == active.matched_tier
            )
            if not agrees:
                self._metrics.shadow_disagreements.labels(
                    bounded(call.tool, active_policy.tools.keys() | policy.tools.keys()),
                    active.outcome.value,
                    decision.outcome.value,
                ).inc()
            code = decision.primary_code
            return ShadowResult(
                policy_version=policy.version,
                decision=decision.outcome.value,
                reason=code.value if code else "",
                tier=decision.matched_tier,
                agrees=agrees,
            )
        except Exception as exc:  # the shadow must never fail a Check
            self._metrics.shadow_errors.inc()
            log.warning(
                "shadow evaluation failed; answered by the active policy",
                exc_info=exc,
                extra={"tool": call.tool, "shadow_version": policy.version},
            )
            return ShadowResult(policy_version=policy.version, error=type(exc).__name__)


def run_less_key(token_id: str) -> str:
    """The budget key of a token's Checks without a run id: ``token <jti>``. Run ids are
    identifiers without spaces (``convert``), so none spells it (``token:<jti>`` was
    spellable: a run named so spent, or was refused by, that token's budget)."""
    return f"token {token_id}"


def decision_token_id(token: CapabilityClaims | TokenError | None) -> str:
    return token.token_id if isinstance(token, CapabilityClaims) else ""


def _new_approval(
    policy: Policy,
    call: ToolCall,
    scope: DecisionScope,
    requirement: ApprovalRequirement,
    *,
    now: float,
    token_id: str,
) -> NewApproval:
    """The request a NEEDS_APPROVAL Check opens, bound to this exact call."""
    tier = policy.tier(call.tool, requirement.tier)
    record = ApprovalRecord(
        id=new_record_id(now, "apr"),
        agent=scope.agent,
        tool=call.tool,
        args_digest=call.args_digest,
        run_id=call.run_id,
        tier=requirement.tier,
        approvals_required=requirement.approvals_required,
        approver_roles=requirement.approver_roles,
        vetoes=tier.vetoes if tier else 1,
        status=ApprovalStatus.PENDING,
        created_at=now,
        expires_at=now + requirement.ttl_seconds,
        rules=policy.approval_rules(call.tool, requirement.tier) or "",
    )
    return NewApproval(
        record=record,
        arguments=strictjson.canonical(call.arguments),
        token_id=token_id,
        policy_version=policy.version,
    )
