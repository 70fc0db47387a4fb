"""Every Prometheus instrument of the sidecar, on a registry of its own (no global state).

Label values are bounded: decisions and reasons are enums, tools and agents come from the
policy, and anything else counts as ``unknown``.
"""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

UNKNOWN = "unknown"
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
)  # fmt: skip
"""Up to the 5 s a Check (or an admin write) may wait for a busy state store and still be
answered; a slow fsync shows too."""


class Metrics:
    """The instruments, created once per process by the composition root."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.decisions = Counter(
            "proviso_decisions",
            "Check decisions by decision, tool and the reason code that decided.",
            ["decision", "tool", "reason"],
            registry=self.registry,
        )
        self.check_duration = Histogram(
            "proviso_check_duration_seconds",
            "Time to answer a Check, from request to response (audit included).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.policy_info = Gauge(
            "proviso_policy_info",
            "The policy in force: 1 for the active version.",
            ["version", "label"],
            registry=self.registry,
        )
        self.tokens_issued = Counter(
            "proviso_tokens_issued",
            "Capability tokens minted, by agent.",
            ["agent"],
            registry=self.registry,
        )
        self.tokens_rejected = Counter(
            "proviso_tokens_rejected",
            "Capability tokens refused, by reason code (TOKEN_*): at Check or as a parent.",
            ["reason"],
            registry=self.registry,
        )
        self.tokens_revoked = Counter(
            "proviso_tokens_revoked",
            "Capability tokens revoked (new revocations only).",
            registry=self.registry,
        )
        self.audit_write_duration = Histogram(
            "proviso_audit_write_duration_seconds",
            "Time for an audit record to become durable (group commit included).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.audit_write_errors = Counter(
            "proviso_audit_write_errors",
            "Audit records that could not be made durable; each failed its Check closed.",
            registry=self.registry,
        )
        self.kill_switches_active = Gauge(
            "proviso_kill_switches_active",
            "Kill switches engaged (from the admin API and the policy), as this process last saw "
            "them: at start, on each Check, admin call and policy reload, and every minute; "
            "every worker reports the shared store's (max, not sum).",
            registry=self.registry,
        )
        self.approvals = Counter(
            "proviso_approvals",
            "Approval request events by outcome: created, approved, rejected, consumed, expired.",
            ["outcome"],
            registry=self.registry,
        )
        self.approvals_pending = Gauge(
            "proviso_approvals_pending",
            "Approval requests waiting for people, by tier; every worker reports the shared"
            " store's, at most a minute old (max, not sum).",
            ["tier"],
            registry=self.registry,
        )
        self.approval_decision_seconds = Histogram(
            "proviso_approval_decision_seconds",
            "Time from an approval request's creation to its approval or rejection.",
            buckets=(10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600),
            registry=self.registry,
        )
        self.policy_reloads = Counter(
            "proviso_policy_reload",
            "Policy reloads by bundle (active, shadow) and result (success, unchanged, error);"
            " after an error the previous version keeps serving.",
            ["bundle", "result"],
            registry=self.registry,
        )
        self.shadow_policy_info = Gauge(
            "proviso_shadow_policy_info",
            "The candidate policy evaluated in shadow beside the active one: 1 for its version.",
            ["version", "label"],
            registry=self.registry,
        )
        self.shadow_disagreements = Counter(
            "proviso_shadow_disagreements",
            "Checks where the shadow policy's decision (or tier) differed from the active one's,"
            " by tool and both decisions.",
            ["tool", "active", "shadow"],
            registry=self.registry,
        )
        self.shadow_errors = Counter(
            "proviso_shadow_errors",
            "Shadow evaluations that failed; the Check was answered by the active policy anyway.",
            registry=self.registry,
        )
        self.audit_batch_records = Histogram(
            "proviso_audit_batch_records",
            "Records made durable by one fsync (group commit): how many Checks shared it.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.decision_batch = Histogram(
            "proviso_decision_batch_checks",
            "Checks decided in one state transaction (those in flight together).",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.audit_checkpoints = Counter(
            "proviso_audit_checkpoints",
            "Signed checkpoints written to the audit log.",
            registry=self.registry,
        )
        self.checks_rejected = Counter(
            "proviso_checks_rejected",
            "Checks refused with RESOURCE_EXHAUSTED because too many were in flight (per worker).",
            registry=self.registry,
        )
        self.checks_in_flight = Gauge(
            "proviso_checks_in_flight",
            "Checks being decided now (per worker process).",
            registry=self.registry,
        )
        self._policy_labels: tuple[str, str] | None = None
        self._shadow_labels: tuple[str, str] | None = None

    def set_policy(self, version: str, label: str) -> None:
        """Mark ``version`` as the one in force (and the previous one as gone)."""
        if self._policy_labels is not None:
            self.policy_info.remove(*self._policy_labels)
        self._policy_labels = (version, label)
        self.policy_info.labels(version, label).set(1)

    def set_shadow_policy(self, version: str, label: str) -> None:
        """Mark ``version`` as the shadow candidate (and the previous one as gone)."""
        if self._shadow_labels is not None:
            self.shadow_policy_info.remove(*self._shadow_labels)
        self._shadow_labels = (version, label)
        self.shadow_policy_info.labels(version, label).set(1)

    def audit_committed(self, records: int, checkpoint: bool) -> None:
        """The audit writer's report of one durable write (called on its thread)."""
        if records:
            self.audit_batch_records.observe(records)
        if checkpoint:
            self.audit_checkpoints.inc()

    def exposition(self) -> bytes:
        """The text exposition format of every instrument."""
        return generate_latest(self.registry)


def bounded(value: str, known: Collection[str]) -> str:
    """``value`` if it is a known label value, else ``unknown``: cardinality stays bounded."""
    return value if value in known else UNKNOWN
