"""The imperative shell of Check: verify the token, run the engine, make the record durable.

Order matters for safety: the audit record is on disk before the answer is returned, and any
failure to write it raises (the server answers UNAVAILABLE), so no ALLOW is ever unrecorded.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sidecar import strictjson
from sidecar.audit.record import AuditRecord, ShadowResult
from sidecar.audit.writer import AuditLog
from sidecar.clock import Clock
from sidecar.engine import Decision, ToolCall, evaluate
from sidecar.errors import AuditWriteError
from sidecar.observability.metrics import Metrics, bounded
from sidecar.policy.model import Policy
from tokens import CapabilityClaims, TokenError, VerificationKeys, verify

log = logging.getLogger("proviso.authorizer")


@dataclass(frozen=True, slots=True)
class CheckInput:
    """A parsed Check request."""

    token: str
    call: ToolCall
    run_metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The decision and the id of its audit record."""

    decision: Decision
    decision_id: str


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


class TokenVerifier:
    """Verifies capability tokens, caching good results until the token expires.

    Only successes are cached, keyed by the exact token text; a cached entry is re-checked
    against ``now`` on every use, so expiry still bites.
    """

    def __init__(
        self,
        keys: VerificationKeys,
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
        try:
            claims = verify(
                token,
                self._keys,
                audience=self._audience,
                issuer=self._issuer,
                now=now,
                leeway_seconds=self._leeway,
            )
        except TokenError as exc:
            self._cache.pop(token, None)
            return exc
        self._cache[token] = claims
        if len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)
        return claims


def new_decision_id(now: float) -> str:
    """A time-ordered, unguessable id: milliseconds then 64 random bits."""
    return f"dec_{int(now * 1000):012x}{secrets.token_hex(8)}"


def _timestamp(now: float) -> str:
    return (
        datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class Authorizer:
    """Answers Check: one policy read, one engine call, one durable audit record."""

    def __init__(
        self,
        policy: PolicyHolder,
        tokens: TokenVerifier,
        audit: AuditLog,
        metrics: Metrics,
        clock: Clock,
        *,
        new_id: Callable[[float], str] = new_decision_id,
        shadow: PolicyHolder | None = None,
    ) -> None:
        self._policy = policy
        self._shadow = shadow
        self._tokens = tokens
        self._audit = audit
        self._metrics = metrics
        self._clock = clock
        self._new_id = new_id

    async def check(self, request: CheckInput) -> CheckResult:
        """Decide and record one call.

        Raises:
            AuditWriteError: the record could not be made durable; the caller must not allow.
        """
        started = time.perf_counter()
        now = self._clock.now()
        policy = self._policy.current
        token = self._tokens.verify(request.token, now)
        decision = evaluate(policy, request.call, token)
        shadow = self._evaluate_shadow(policy, request.call, token, decision)
        decision_id = self._new_id(now)
        call = request.call
        record = AuditRecord(
            record_id=decision_id,
            time=_timestamp(now),
            decision=decision,
            tool=call.tool,
            args_digest=strictjson.digest(call.arguments),
            arguments_canonical=strictjson.canonical(call.arguments),
            latency_ms=(time.perf_counter() - started) * 1000,
            run_id=call.run_id,
            step_id=call.step_id,
            idempotency_key=call.idempotency_key,
            approval_id=call.approval_id,
            dry_run=call.dry_run,
            run_metadata=request.run_metadata,
            shadow=shadow,
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
        self._metrics.decisions.labels(
            decision.outcome.value,
            bounded(call.tool, policy.tools),
            code.value if code else "none",
        ).inc()
        return CheckResult(decision=decision, decision_id=decision_id)

    def _evaluate_shadow(
        self,
        active_policy: Policy,
        call: ToolCall,
        token: CapabilityClaims | TokenError | None,
        active: Decision,
    ) -> ShadowResult | None:
        """What the candidate policy would decide, for the record only: it never decides.

        Same inputs as the active evaluation, after it. Any failure here is logged and counted,
        and the Check goes on with the active decision.
        """
        if self._shadow is None:
            return None
        policy = self._shadow.current
        try:
            decision = evaluate(policy, call, token)
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
