"""The engine's inputs and outputs. Enums mirror the proto names without their prefixes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    """Mirrors ``proviso.v1.Decision``."""

    ALLOW = "ALLOW"
    DENY = "DENY"
    NEEDS_APPROVAL = "NEEDS_APPROVAL"


class ReasonCode(StrEnum):
    """Mirrors ``proviso.v1.ReasonCode``: stable codes agents branch on."""

    TOKEN_MISSING = "TOKEN_MISSING"
    TOKEN_MALFORMED = "TOKEN_MALFORMED"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    TOKEN_NOT_YET_VALID = "TOKEN_NOT_YET_VALID"
    TOKEN_BAD_SIGNATURE = "TOKEN_BAD_SIGNATURE"
    TOKEN_UNKNOWN_KEY = "TOKEN_UNKNOWN_KEY"
    TOKEN_WRONG_AUDIENCE = "TOKEN_WRONG_AUDIENCE"
    TOKEN_WRONG_ALGORITHM = "TOKEN_WRONG_ALGORITHM"
    TOKEN_WRONG_ISSUER = "TOKEN_WRONG_ISSUER"
    TOKEN_REVOKED = "TOKEN_REVOKED"
    OUT_OF_SCOPE = "OUT_OF_SCOPE"
    NOT_PERMITTED = "NOT_PERMITTED"
    UNKNOWN_TOOL = "UNKNOWN_TOOL"
    INVALID_ARGUMENTS = "INVALID_ARGUMENTS"
    CONDITION_ERROR = "CONDITION_ERROR"
    TIER_ALLOWED = "TIER_ALLOWED"
    TIER_DENIED = "TIER_DENIED"
    APPROVAL_REQUIRED = "APPROVAL_REQUIRED"
    NO_TIER_MATCHED = "NO_TIER_MATCHED"
    KILL_SWITCH = "KILL_SWITCH"
    RULE_FAILED = "RULE_FAILED"
    IDEMPOTENCY_KEY_REQUIRED = "IDEMPOTENCY_KEY_REQUIRED"
    IDEMPOTENCY_CONFLICT = "IDEMPOTENCY_CONFLICT"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    RATE_LIMITED = "RATE_LIMITED"
    RETRY_BUDGET_EXHAUSTED = "RETRY_BUDGET_EXHAUSTED"
    APPROVAL_NOT_FOUND = "APPROVAL_NOT_FOUND"
    APPROVAL_MISMATCH = "APPROVAL_MISMATCH"
    APPROVAL_REJECTED = "APPROVAL_REJECTED"
    APPROVAL_EXPIRED = "APPROVAL_EXPIRED"
    APPROVAL_CONSUMED = "APPROVAL_CONSUMED"
    APPROVAL_GRANTED = "APPROVAL_GRANTED"
    APPROVALS_PENDING_LIMIT = "APPROVALS_PENDING_LIMIT"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call an agent asks about, already parsed and size-checked by the shell.

    ``arguments`` and ``context`` hold parsed JSON with ``Decimal`` numbers.
    """

    tool: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    context: Mapping[str, Any] = field(default_factory=dict)
    run_id: str = ""
    step_id: str = ""
    idempotency_key: str = ""
    approval_id: str = ""
    dry_run: bool = False
    args_digest: str = ""


@dataclass(frozen=True, slots=True)
class Reason:
    """Why, in a stable code, a message, and (where it applies) a JSON pointer."""

    code: ReasonCode
    message: str
    field: str = ""


@dataclass(frozen=True, slots=True)
class ApprovalRequirement:
    """Who must approve a call that needs approval."""

    tier: str
    approvals_required: int
    approver_roles: tuple[str, ...]
    ttl_seconds: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The engine's answer. ``agent`` and ``token_id`` are set once the token verified."""

    outcome: Outcome
    reasons: tuple[Reason, ...]
    policy_version: str
    matched_tier: str = ""
    approval: ApprovalRequirement | None = None
    agent: str = ""
    token_id: str = ""
    retry_after_seconds: float = 0.0
    approval_id: str = ""

    @property
    def primary_code(self) -> ReasonCode | None:
        """The code of the first reason: the step that decided."""
        return self.reasons[0].code if self.reasons else None
