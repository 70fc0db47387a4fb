"""The one place that translates between protobuf messages and domain values.

Untrusted request fields are checked here, each failure naming the field, so the domain only
ever sees well-formed values.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType
from typing import TypeVar

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from sidecar import strictjson
from sidecar._proto.proviso.v1 import admin_service_pb2 as admin_pb
from sidecar._proto.proviso.v1 import approval_service_pb2 as approval_pb
from sidecar._proto.proviso.v1 import authorization_service_pb2 as authz_pb
from sidecar._proto.proviso.v1 import token_service_pb2 as token_pb
from sidecar.audit.trace import RunTrace, TraceApprovalEvent, TraceStep
from sidecar.authorizer import CheckInput, CheckResult
from sidecar.engine import ApprovalStatus, Outcome, ReasonCode, Revocation, ToolCall
from sidecar.errors import InvalidRequestError
from sidecar.minting import MintedToken
from sidecar.policy.model import KillScope, KillSwitch, Policy
from sidecar.state import ApprovalEvent, StoredApproval
from tokens import Constraint, Grant

ItemT = TypeVar("ItemT")
MessageT = TypeVar("MessageT", bound=Message)

MAX_IDENTIFIER_BYTES = 256
MAX_RUN_METADATA_ENTRIES = 32
MAX_RUN_METADATA_VALUE_BYTES = 1024
_IDENTIFIER_RE = re.compile(r"[\x21-\x7e]+")
"""No spaces: a token's run-less budget key (``authorizer.run_less_key``) relies on it."""

_DECISIONS = {
    Outcome.ALLOW: authz_pb.DECISION_ALLOW,
    Outcome.DENY: authz_pb.DECISION_DENY,
    Outcome.NEEDS_APPROVAL: authz_pb.DECISION_NEEDS_APPROVAL,
}
_REASON_CODES = {
    code: authz_pb.ReasonCode.Value(f"REASON_CODE_{code.value}") for code in ReasonCode
}
"""Each engine reason code and its proto twin, paired at import: a code without one fails start."""


def _identifier(field: str, value: str, *, required: bool) -> str:
    """Printable ASCII, no spaces, bounded; matched byte-exact later (no case folding)."""
    if not value:
        if required:
            raise InvalidRequestError(field, "is required")
        return value
    if len(value) > MAX_IDENTIFIER_BYTES or not _IDENTIFIER_RE.fullmatch(value):
        raise InvalidRequestError(
            field, f"must be 1-{MAX_IDENTIFIER_BYTES} printable ASCII characters without spaces"
        )
    return value


def _json_object(field: str, text: str) -> Mapping[str, object]:
    if not text:
        return {}
    try:
        return strictjson.parse_object(text)
    except strictjson.JSONInputError as exc:
        raise InvalidRequestError(field, str(exc)) from None


def _run_metadata(values: Mapping[str, str]) -> dict[str, str]:
    if len(values) > MAX_RUN_METADATA_ENTRIES:
        raise InvalidRequestError("run_metadata", f"at most {MAX_RUN_METADATA_ENTRIES} entries")
    for key, value in values.items():
        _identifier("run_metadata", key, required=True)
        if len(value.encode()) > MAX_RUN_METADATA_VALUE_BYTES:
            raise InvalidRequestError(
                f"run_metadata[{key}]", f"longer than {MAX_RUN_METADATA_VALUE_BYTES} bytes"
            )
    return dict(values)


def check_input(request: authz_pb.CheckRequest) -> CheckInput:
    """A domain CheckInput from a CheckRequest.

    Raises:
        InvalidRequestError: a field is malformed; its name is in ``field``.
    """
    arguments = _json_object("arguments_json", request.arguments_json)
    call = ToolCall(
        tool=_identifier("tool", request.tool, required=True),
        arguments=arguments,
        context=_json_object("context_json", request.context_json),
        run_id=_identifier("run_id", request.run_id, required=False),
        step_id=_identifier("step_id", request.step_id, required=False),
        idempotency_key=_identifier("idempotency_key", request.idempotency_key, required=False),
        approval_id=_identifier("approval_id", request.approval_id, required=False),
        dry_run=request.dry_run,
        args_digest=strictjson.digest(arguments),
    )
    return CheckInput(
        token=request.token, call=call, run_metadata=_run_metadata(request.run_metadata)
    )


def check_response(result: CheckResult) -> authz_pb.CheckResponse:
    """A CheckResponse from a domain result."""
    decision = result.decision
    response = authz_pb.CheckResponse(
        decision=_DECISIONS[decision.outcome],
        reasons=[
            authz_pb.Reason(
                code=_REASON_CODES[r.code],
                message=r.message,
                field=r.field,
            )
            for r in decision.reasons
        ],
        decision_id=result.decision_id,
        policy_version=decision.policy_version,
        matched_tier=decision.matched_tier,
        replayed=result.replayed,
        approval_id=decision.approval_id,
    )
    if decision.retry_after_seconds:
        retry_after = Duration()
        retry_after.FromNanoseconds(int(decision.retry_after_seconds * 1e9))
        response.retry_after.CopyFrom(retry_after)
    if decision.approval is not None:
        requirement = decision.approval
        response.approval_requirement.CopyFrom(
            authz_pb.ApprovalRequirement(
                tier=requirement.tier,
                approvals_required=requirement.approvals_required,
                approver_roles=list(requirement.approver_roles),
                ttl=Duration(seconds=requirement.ttl_seconds),
            )
        )
    return response


def _constraint(field: str, message: token_pb.Constraint) -> Constraint:
    try:
        return Constraint(
            min=message.min or None,
            max=message.max or None,
            one_of=list(message.one_of) if message.one_of else None,
        )
    except ValueError as exc:
        raise InvalidRequestError(field, str(exc).removeprefix("Constraint ")) from None


def grants(messages: Iterable[token_pb.Grant]) -> tuple[Grant, ...]:
    """Domain grants from a request's grants, every name and constraint checked."""
    result = []
    for index, grant in enumerate(messages):
        where = f"grants[{index}]"
        tool = _identifier(f"{where}.tool", grant.tool, required=True)
        pins = {
            _identifier(f"{where}.pins", name, required=True): _identifier(
                f"{where}.pins[{name}]", value, required=True
            )
            for name, value in grant.pins.items()
        }
        constraints = {
            _identifier(f"{where}.constraints", name, required=True): _constraint(
                f"{where}.constraints[{name}]", constraint
            )
            for name, constraint in grant.constraints.items()
        }
        result.append(
            Grant(
                tool=tool,
                pins=MappingProxyType(pins),
                constraints=MappingProxyType(constraints),
            )
        )
    return tuple(result)


def grant_message(grant: Grant) -> token_pb.Grant:
    """The proto form of a domain grant (bounds as plain decimal text)."""
    claim = grant.to_claim()
    return token_pb.Grant(
        tool=grant.tool,
        pins=dict(grant.pins),
        constraints={
            name: token_pb.Constraint(
                min=body.get("min", ""), max=body.get("max", ""), one_of=body.get("in", [])
            )
            for name, body in claim.get("constraints", {}).items()
        },
    )


def ttl_seconds(duration: Duration) -> int:
    """Whole seconds of a requested TTL, a fraction rounded up.

    Zero means "the longest allowed" (the ceiling, or the parent's expiry), so a TTL under a
    second must not round down to it: 0.5 s asks for the shortest token, not the longest.
    """
    if duration.seconds < 0 or duration.nanos < 0:
        raise InvalidRequestError("ttl", "must not be negative")
    return int(duration.seconds) + (1 if duration.nanos else 0)


def issue_token_response(minted: MintedToken) -> token_pb.IssueTokenResponse:
    return token_pb.IssueTokenResponse(
        token=minted.token,
        token_id=minted.token_id,
        expire_time=Timestamp(seconds=minted.expires_at),
        key_id=minted.key_id,
    )


def attenuate_token_response(
    minted: MintedToken, parents: tuple[str, ...]
) -> token_pb.AttenuateTokenResponse:
    return token_pb.AttenuateTokenResponse(
        token=minted.token,
        token_id=minted.token_id,
        expire_time=Timestamp(seconds=minted.expires_at),
        key_id=minted.key_id,
        parent_token_ids=list(parents),
    )


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def revocation(revoked: Revocation) -> token_pb.Revocation:
    return token_pb.Revocation(
        token_id=revoked.token_id,
        reason=revoked.reason,
        revoked_by=revoked.revoked_by,
        revoke_time=_timestamp(revoked.revoked_at),
        expire_time=_timestamp(revoked.expires_at),
    )


def agent_id(value: str) -> str:
    """A required agent identity from a request: printable ASCII, matched byte-exact."""
    return _identifier("agent", value, required=True)


def optional_run_id(value: str) -> str | None:
    """An optional run id from a request (a token bound to no run)."""
    return _identifier("run_id", value, required=False) or None


def token_id(value: str) -> str:
    """A token id (jti) from a request: required, printable ASCII, bounded."""
    return _identifier("token_id", value, required=True)


def policy_info(policy: Policy, loaded_at: float) -> admin_pb.PolicyInfo:
    """What GetPolicy says about the policy in force."""
    load_time = Timestamp()
    load_time.FromNanoseconds(int(loaded_at * 1e9))
    return admin_pb.PolicyInfo(
        version=policy.version,
        label=policy.label,
        load_time=load_time,
        source_files=list(policy.sources),
        tools=sorted(policy.tools),
    )


_SCOPES = {
    admin_pb.KILL_SWITCH_SCOPE_GLOBAL: KillScope.GLOBAL,
    admin_pb.KILL_SWITCH_SCOPE_AGENT: KillScope.AGENT,
    admin_pb.KILL_SWITCH_SCOPE_TOOL: KillScope.TOOL,
}
_SCOPE_VALUES = {scope: value for value, scope in _SCOPES.items()}


def kill_switch_target(request: admin_pb.SetKillSwitchRequest) -> tuple[KillScope, str]:
    """The scope and target a SetKillSwitch names; global takes no target."""
    scope = _SCOPES.get(request.scope)
    if scope is None:
        raise InvalidRequestError("scope", "must be GLOBAL, AGENT or TOOL")
    if scope is KillScope.GLOBAL:
        if request.target:
            raise InvalidRequestError("target", "the global switch takes no target")
        return scope, ""
    return scope, _identifier("target", request.target, required=True)


def kill_switch(switch: KillSwitch) -> admin_pb.KillSwitch:
    message = admin_pb.KillSwitch(
        scope=_SCOPE_VALUES[switch.scope],
        target=switch.target,
        reason=switch.reason,
        engaged_by=switch.engaged_by,
        source=switch.source,
    )
    if switch.engaged_at:
        message.engage_time.FromNanoseconds(int(switch.engaged_at * 1e9))
    return message


_APPROVAL_STATES = {
    ApprovalStatus.PENDING: approval_pb.APPROVAL_STATE_PENDING,
    ApprovalStatus.APPROVED: approval_pb.APPROVAL_STATE_APPROVED,
    ApprovalStatus.REJECTED: approval_pb.APPROVAL_STATE_REJECTED,
    ApprovalStatus.EXPIRED: approval_pb.APPROVAL_STATE_EXPIRED,
    ApprovalStatus.CONSUMED: approval_pb.APPROVAL_STATE_CONSUMED,
}
_STATUS_OF = {value: status for status, value in _APPROVAL_STATES.items()}


def approval(stored: StoredApproval, now: float) -> approval_pb.Approval:
    """An Approval as people see it now (a request past its time reads as expired)."""
    record = stored.record
    return approval_pb.Approval(
        approval_id=record.id,
        agent=record.agent,
        tool=record.tool,
        arguments_json=stored.arguments,
        args_digest=record.args_digest,
        run_id=record.run_id,
        tier=record.tier,
        approvals_required=record.approvals_required,
        approver_roles=list(record.approver_roles),
        vetoes=record.vetoes,
        state=_APPROVAL_STATES[record.status_at(now)],
        create_time=_timestamp(record.created_at),
        expire_time=_timestamp(record.expires_at),
        verdicts=[
            approval_pb.ApprovalVerdict(
                approver=v.approver,
                approve=v.approve,
                roles=list(v.roles),
                comment=v.comment,
                time=_timestamp(v.at),
            )
            for v in record.verdicts
        ],
        policy_version=stored.policy_version,
    )


def approval_id(value: str) -> str:
    return _identifier("approval_id", value, required=True)


def approval_status(state: int) -> ApprovalStatus | None:
    """The status filter of a ListApprovals request (None: any)."""
    if state == approval_pb.APPROVAL_STATE_UNSPECIFIED:
        return None
    status: ApprovalStatus | None = _STATUS_OF.get(state)  # type: ignore[call-overload]
    if status is None:
        raise InvalidRequestError("state", "unknown approval state")
    return status


def watch_response(
    event: ApprovalEvent, stored: StoredApproval, now: float
) -> approval_pb.WatchApprovalsResponse:
    return approval_pb.WatchApprovalsResponse(
        sequence=event.seq,
        event=event.event,
        actor=event.actor,
        time=_timestamp(event.at),
        approval=approval(stored, now),
    )


def run_id(value: str) -> str:
    """A run id from a request: required, an identifier like CheckRequest.run_id."""
    return _identifier("run_id", value, required=True)


def _timestamp_text(text: str) -> Timestamp:
    stamp = Timestamp()
    with contextlib.suppress(ValueError):  # an unreadable time stays unset, the trace stands
        stamp.FromDatetime(datetime.fromisoformat(text))
    return stamp


def _duration_ms(value: Decimal) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(value * 1_000_000))
    return duration


def _recorded_decision(text: str) -> authz_pb.Decision.ValueType:
    """A decision as a record spells it; one this version does not know reads UNSPECIFIED."""
    try:
        return _DECISIONS[Outcome(text)]
    except ValueError:
        return authz_pb.DECISION_UNSPECIFIED


def _recorded_reason(code: str) -> authz_pb.ReasonCode.ValueType:
    try:
        return authz_pb.ReasonCode.Value(f"REASON_CODE_{code}")
    except ValueError:
        return authz_pb.REASON_CODE_UNSPECIFIED


def _trace_step(step: TraceStep) -> admin_pb.TraceStep:
    message = admin_pb.TraceStep(
        seq=step.seq,
        decision_id=step.decision_id,
        time=_timestamp_text(step.time),
        step_id=step.step_id,
        agent=step.agent,
        tool=step.tool,
        decision=_recorded_decision(step.decision),
        reasons=[
            authz_pb.Reason(code=_recorded_reason(r.code), message=r.message, field=r.field)
            for r in step.reasons
        ],
        matched_tier=step.matched_tier,
        policy_version=step.policy_version,
        token_id=step.token_id,
        latency=_duration_ms(step.latency_ms),
        approval_id=step.approval_id,
        dry_run=step.dry_run,
        args_digest=step.args_digest,
        redacted_arguments=list(step.redacted),
        run_metadata=dict(step.run_metadata),
        chain=step.chain,
        replay_of=step.replay_of,
    )
    requirement = step.approval_requirement
    if requirement:
        message.approval_requirement.CopyFrom(
            authz_pb.ApprovalRequirement(
                tier=str(requirement.get("tier", "")),
                approvals_required=int(requirement.get("approvals_required", 0)),
                approver_roles=[str(role) for role in requirement.get("approver_roles", ())],
                ttl=Duration(seconds=int(requirement.get("ttl_seconds", 0))),
            )
        )
    return message


def run_trace(
    trace: RunTrace, *, steps: int, events: int, page_size: int, max_bytes: int
) -> tuple[admin_pb.RunTrace, int, int]:
    """What GetRunTrace says about one run: the whole envelope, and the steps from ``steps``
    and the approval events from ``events`` on, at most ``page_size`` of each and (past the
    first of each) no more than ``max_bytes`` in all.

    Returns:
        The message, and where the next page's steps and events start (the lengths when none
        are left).
    """
    message = admin_pb.RunTrace(
        run_id=trace.run_id,
        agents=list(trace.agents),
        policy_versions=list(trace.policy_versions),
        start_time=_timestamp_text(trace.steps[0].time),
        end_time=_timestamp_text(trace.steps[-1].time),
        run_metadata=trace.run_metadata,
        chains=list(trace.chains),
    )
    page_steps, room = _page(trace.steps[steps : steps + page_size], _trace_step, max_bytes)
    page_events, _ = _page(
        trace.approval_events[events : events + page_size], _trace_approval_event, room
    )
    message.steps.extend(page_steps)
    message.approval_events.extend(page_events)
    return message, steps + len(page_steps), events + len(page_events)


def _page(
    items: Sequence[ItemT], to_message: Callable[[ItemT], MessageT], room: int
) -> tuple[list[MessageT], int]:
    """The messages of ``items`` that fit in ``room`` bytes, and always the first one, so that
    every page moves on; with the room left."""
    page: list[MessageT] = []
    for item in items:
        message = to_message(item)
        size = message.ByteSize()
        if page and size > room:
            break
        room -= size
        page.append(message)
    return page, room


def _trace_approval_event(event: TraceApprovalEvent) -> admin_pb.TraceApprovalEvent:
    return admin_pb.TraceApprovalEvent(
        seq=event.seq,
        record_id=event.record_id,
        time=_timestamp_text(event.time),
        event=event.event,
        approval_id=event.approval_id,
        agent=event.agent,
        tool=event.tool,
        tier=event.tier,
        actor=event.actor,
        comment=event.comment,
        args_digest=event.args_digest,
        chain=event.chain,
    )
