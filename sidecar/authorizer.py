"""The imperative shell of Check: verify the token, run the engine, make the record durable.

Order matters for safety: the audit record is on disk before the answer is returned, and any
failure to write it raises (the server answers UNAVAILABLE), so no ALLOW is ever unrecorded.
The record carries the Check's inputs (arguments redacted as the policy says, context, the
verified token claims) so that ``proviso replay`` can re-evaluate it later.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from opentelemetry.trace import Span, StatusCode, Tracer

from sidecar import strictjson
from sidecar.audit.record import AuditRecord
from sidecar.audit.redaction import Redactor
from sidecar.audit.writer import AuditLog
from sidecar.clock import Clock, timestamp
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


class PolicyHolder:
    """The policy in force. Readers take one reference per Check; a reload swaps it whole."""

    def __init__(self, policy: Policy, loaded_at: float) -> None:
        self.current = policy
        self.loaded_at = loaded_at


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
        redactor: Redactor,
        tracer: Tracer | None = None,
        new_id: Callable[[float], str] = new_decision_id,
    ) -> None:
        self._policy = policy
        self._tokens = tokens
        self._audit = audit
        self._metrics = metrics
        self._clock = clock
        self._redactor = redactor
        self._tracer = tracer
        self._new_id = new_id

    async def check(self, request: CheckInput) -> CheckResult:
        """Decide and record one call (in an OpenTelemetry span when tracing is on).

        Raises:
            AuditWriteError: the record could not be made durable; the caller must not allow.
        """
        if self._tracer is None:
            return await self._check(request, None)
        span = self._tracer.start_span("proviso.Check")
        try:
            result = await self._check(request, span)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(StatusCode.ERROR, type(exc).__name__)
            raise
        finally:
            span.end()
        return result

    async def _check(self, request: CheckInput, span: Span | None) -> CheckResult:
        started = time.perf_counter()
        now = self._clock.now()
        policy = self._policy.current
        token = self._tokens.verify(request.token, now)
        call = request.call
        decision = evaluate(policy, call, token)
        decision_id = self._new_id(now)
        tool = policy.tools.get(call.tool)
        arguments, redacted = self._redactor.redact(call.arguments, tool.redact if tool else ())
        record = AuditRecord(
            record_id=decision_id,
            time=timestamp(now),
            decision=decision,
            call=call,
            args_digest=strictjson.digest(call.arguments),
            arguments=arguments,
            latency_ms=(time.perf_counter() - started) * 1000,
            token=token if isinstance(token, CapabilityClaims) else None,
            redacted=redacted,
            run_metadata=request.run_metadata,
        )
        if span is not None:
            span.set_attributes(
                {
                    "proviso.decision_id": decision_id,
                    "proviso.run_id": call.run_id,
                    "proviso.tool": call.tool,
                    "proviso.agent": decision.agent,
                    "proviso.decision": decision.outcome.value,
                    "proviso.reason": decision.primary_code or "",
                    "proviso.matched_tier": decision.matched_tier,
                    "proviso.policy_version": decision.policy_version,
                }
            )
        write_started = time.perf_counter()
        try:
            await self._audit.append(record.to_body())
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
