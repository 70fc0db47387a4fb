"""``decide``: the functional core of Check (DESIGN.md §2, steps 1-9).

The order is fixed and the first failing step decides:

1. kill switches (global, this tool, this agent once the token says who it is);
2. token (then its revocation, or an ancestor's); 3. scope (tool, run, pins, constraints);
4. role (then the retry budget: a tool closed for this run);
5. arguments schema; 6. business rules (both count towards the retry budget);
7. idempotency; 8. run budgets and rate limits; 9. approval tiers.

Each step is a function returning a denial or None, so a new step is one more line in
``decide``. Steps read state only from the ``StateView`` and report what to change in
``StateChanges``; nothing here does I/O or reads the clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from sidecar.engine.decision import (
    ApprovalRequirement,
    Decision,
    Outcome,
    Reason,
    ReasonCode,
    ToolCall,
)
from sidecar.engine.state import (
    NO_CHANGES,
    NO_STATE,
    ApprovalStatus,
    Evaluation,
    RateBucket,
    Revocation,
    StateChanges,
    StateView,
)
from sidecar.policy.conditions import Bindings, ConditionEvaluationError, bind_variables
from sidecar.policy.model import Policy, Tier, TierAction, Tool
from tokens import CapabilityClaims, TokenError
from tokens.scope import ScopeViolation, ViolationKind, find_grant

_REPLAYABLE = frozenset({Outcome.ALLOW, Outcome.DENY})
MAX_RETRY_AFTER_SECONDS = 366 * 24 * 3600.0
"""The longest ``retry_after`` told to an agent: a year (the slowest refill the policy format
allows takes ~11.6 days a call; a Check's answer must never fail on an absurd figure)."""
MAX_PENDING_APPROVALS_PER_AGENT = 100
"""Approval requests one agent may have pending at once: each is a call for people to read,
and an agent (or the model driving it) varying a free-text argument would otherwise open one
per Check, without bound. Past it a new request is refused (APPROVALS_PENDING_LIMIT) until people
close some or they expire; calls whose request is open still find it."""


def evaluate(
    policy: Policy,
    call: ToolCall,
    token: CapabilityClaims | TokenError | None,
    state: StateView = NO_STATE,
    now: float = 0.0,
) -> Decision:
    """The decision alone (see ``decide``): for tests, replays and policy unit tests."""
    return decide(policy, call, token, state, now).decision


def decide(
    policy: Policy,
    call: ToolCall,
    token: CapabilityClaims | TokenError | None,
    state: StateView = NO_STATE,
    now: float = 0.0,
) -> Evaluation:
    """Decide one tool call.

    Args:
        policy: the policy in force; a token never outlives a policy change, so roles are read
            from here, not from the token.
        call: the parsed call; ``args_digest`` must be set when idempotency keys are used.
        token: the verified claims, the verification error, or None when no token was sent.
            WARNING: pass claims only after the signature, audience, issuer and lifetime have
            been verified (``tokens.verify``); the engine trusts them as given.
        state: kill switches, the revocation of the token or an ancestor, the idempotency
            record for the call's key, the run's usage and the agent's rate bucket, read by
            the caller in the transaction it will commit.
        now: the instant of the decision (rate buckets refill with it).

    Returns:
        The decision and the state changes to commit. Never raises for a bad call.
    """
    claims = token if isinstance(token, CapabilityClaims) else None
    denial = _check_kill_switches(policy, call, state, claims)
    if denial is not None:
        return Evaluation(_decide(policy, Outcome.DENY, (denial,), token=claims))
    if token is None:
        return _deny(policy, Reason(ReasonCode.TOKEN_MISSING, "no capability token was presented"))
    if isinstance(token, TokenError):
        code = ReasonCode.__members__.get(token.code, ReasonCode.TOKEN_MALFORMED)
        return _deny(policy, Reason(code, token.message))
    if state.revocation is not None:
        return _deny(policy, _revoked(token, state.revocation), token=token)

    denial = _check_scope(call, token) or _check_role(policy, call, token)
    if denial is None:
        denial = _check_retry_budget(policy, state)
    if denial is not None:
        return _deny(policy, denial, token=token)
    tool = policy.tools[call.tool]

    bindings: Bindings | None = None
    reasons = tuple(
        Reason(ReasonCode.INVALID_ARGUMENTS, v.message, v.pointer)
        for v in tool.arguments.validate(call.arguments)
    )
    if not reasons:
        bindings = _bindings(policy, tool, call, token)
        rule = _check_rules(tool, bindings)
        reasons = (rule,) if rule is not None else ()
    if reasons:
        failed = StateChanges(failure_streak=state.usage.failure_streak + 1)
        return Evaluation(_decide(policy, Outcome.DENY, reasons, token=token), failed)
    streak_reset = 0 if state.usage.failure_streak else None

    replay = _check_idempotency(policy, tool, call, token, state)
    if replay is not None:
        return replace(replay, changes=StateChanges(failure_streak=streak_reset))

    denial, bucket = _check_budgets(policy, tool, token, state, now)
    if denial is not None:
        changes = StateChanges(failure_streak=streak_reset, rate=bucket)
        retry_after = _retry_after(policy, token, bucket)
        decision = replace(
            _decide(policy, Outcome.DENY, (denial,), token=token), retry_after_seconds=retry_after
        )
        return Evaluation(decision, changes)

    mismatch = _check_approval_binding(call, token, state)
    if mismatch is not None:
        changes = StateChanges(failure_streak=streak_reset, rate=bucket)
        return Evaluation(_decide(policy, Outcome.DENY, (mismatch,), token=token), changes)
    decision, approval_changes = _apply_approval(
        policy, call, state, now, _apply_tiers(policy, tool, call, token, bindings)
    )
    changes = StateChanges(
        count_call=decision.outcome is Outcome.ALLOW,
        failure_streak=streak_reset,
        rate=bucket,
        # A refusal for the approvers' full queue is not the call's decision: once people
        # close requests, the same call (and key) opens one.
        remember=bool(call.idempotency_key)
        and decision.outcome in _REPLAYABLE
        and decision.reasons != (_APPROVAL_QUEUE_FULL,),
        open_approval=approval_changes.open_approval,
        consume_approval=approval_changes.consume_approval,
        expire_approval=approval_changes.expire_approval,
    )
    return Evaluation(decision, changes)


def _check_kill_switches(
    policy: Policy, call: ToolCall, state: StateView, claims: CapabilityClaims | None
) -> Reason | None:
    """Step 1: any engaged switch covering this call stops it, whatever else holds."""
    agent = claims.subject if claims is not None else None
    for switch in (*policy.kill_switches, *state.kill_switches):
        if switch.covers(agent, call.tool):
            return Reason(
                ReasonCode.KILL_SWITCH,
                f"kill switch '{switch.label}' is engaged: {switch.reason}",
            )
    return None


def _revoked(token: CapabilityClaims, revocation: Revocation) -> Reason:
    """Step 2, after the signature: a revoked token, or a child of one, is dead."""
    whose = "the token" if revocation.token_id == token.token_id else "an ancestor of the token"
    return Reason(
        ReasonCode.TOKEN_REVOKED,
        f"{whose} ({revocation.token_id}) was revoked: {revocation.reason}",
    )


_VIOLATION_FIELDS = {ViolationKind.RUN: "run_id", ViolationKind.TOOL: ""}


def _check_scope(call: ToolCall, token: CapabilityClaims) -> Reason | None:
    """Step 3: the token grants the tool for this run, and every pin and argument constraint
    of one of its grants for the tool holds (``tokens.scope``, as tool backends check it)."""
    found = find_grant(token, call.tool, call.arguments, call.run_id)
    if not isinstance(found, ScopeViolation):
        return None
    field = _VIOLATION_FIELDS.get(found.kind, f"/{_escape(found.argument)}")
    return Reason(ReasonCode.OUT_OF_SCOPE, found.message, field)


def _check_role(policy: Policy, call: ToolCall, token: CapabilityClaims) -> Reason | None:
    """Step 4: the agent's roles in the current policy still permit the tool."""
    if call.tool not in policy.tools:
        return Reason(ReasonCode.UNKNOWN_TOOL, f"the policy defines no tool '{call.tool}'")
    if token.subject not in policy.agents:
        return Reason(ReasonCode.NOT_PERMITTED, f"agent '{token.subject}' is not in the policy")
    if call.tool not in policy.tools_permitted(token.subject):
        return Reason(
            ReasonCode.NOT_PERMITTED,
            f"the roles of agent '{token.subject}' do not permit tool '{call.tool}'",
        )
    return None


def _check_retry_budget(policy: Policy, state: StateView) -> Reason | None:
    """After N invalid calls in a row, the tool is closed for the run: the agent must stop."""
    limit = policy.controls.max_consecutive_failures
    if limit and state.usage.failure_streak >= limit:
        return Reason(
            ReasonCode.RETRY_BUDGET_EXHAUSTED,
            f"{state.usage.failure_streak} invalid calls of this tool in a row in this run; "
            "it is closed for the run",
        )
    return None


def _check_rules(tool: Tool, bindings: Bindings) -> Reason | None:
    """Step 6: every business rule must hold; one that cannot be evaluated fails."""
    for rule in tool.rules:
        try:
            holds = rule.require.evaluate(bindings)
        except ConditionEvaluationError as exc:
            return Reason(
                ReasonCode.RULE_FAILED,
                f"rule '{rule.name}' could not be evaluated ({exc}): {rule.message}",
            )
        if not holds:
            return Reason(ReasonCode.RULE_FAILED, f"rule '{rule.name}': {rule.message}")
    return None


def _check_idempotency(
    policy: Policy, tool: Tool, call: ToolCall, token: CapabilityClaims, state: StateView
) -> Evaluation | None:
    """Step 7: write tools need a key; a used key replays its decision or conflicts."""
    if not call.idempotency_key:
        if tool.writes:
            reason = Reason(
                ReasonCode.IDEMPOTENCY_KEY_REQUIRED,
                f"tool '{tool.name}' writes: send an idempotency_key",
                "idempotency_key",
            )
            return _deny(policy, reason, token=token)
        return None
    stored = state.idempotent
    if stored is None:
        return None
    if (stored.tool, stored.args_digest, stored.run_id) == (
        call.tool,
        call.args_digest,
        call.run_id,
    ):
        return Evaluation(stored.decision, NO_CHANGES, replay_of=stored.decision_id)
    reason = Reason(
        ReasonCode.IDEMPOTENCY_CONFLICT,
        "this idempotency key was used for a different call (tool, arguments or run)",
        "idempotency_key",
    )
    return _deny(policy, reason, token=token)


def _check_budgets(
    policy: Policy, tool: Tool, token: CapabilityClaims, state: StateView, now: float
) -> tuple[Reason | None, RateBucket | None]:
    """Step 8: run caps (calls, calls of this tool, cost), then the agent's rate limit.

    Returns the denial (or None) and the rate bucket to store (or None if unlimited).
    """
    controls = policy.controls
    usage = state.usage
    if controls.max_calls_per_run and usage.calls >= controls.max_calls_per_run:
        return _budget(f"the run's budget of {controls.max_calls_per_run} calls is spent"), None
    tool_cap = controls.max_calls_per_tool.get(tool.name, 0)
    if tool_cap and usage.tool_calls >= tool_cap:
        return _budget(f"the run's budget of {tool_cap} calls of '{tool.name}' is spent"), None
    ceiling = controls.max_cost_per_run
    if ceiling is not None and usage.cost + tool.cost > ceiling:
        return _budget(f"the run's cost ceiling of {ceiling} would be exceeded"), None
    limit = controls.rate_limit(token.subject)
    if limit is None:
        return None, None
    previous = state.rate
    if previous is None:
        tokens = float(limit.burst)
    else:
        elapsed = max(0.0, now - previous.updated_at)
        tokens = min(float(limit.burst), previous.tokens + elapsed * limit.per_second)
    if tokens < 1.0:
        reason = Reason(ReasonCode.RATE_LIMITED, f"agent '{token.subject}' is over its rate limit")
        return reason, RateBucket(tokens, now)
    return None, RateBucket(tokens - 1.0, now)


def _budget(message: str) -> Reason:
    return Reason(ReasonCode.BUDGET_EXCEEDED, message)


def _retry_after(policy: Policy, token: CapabilityClaims, bucket: RateBucket | None) -> float:
    """Seconds until the bucket holds one call again (0 when not rate limited)."""
    limit = policy.controls.rate_limit(token.subject)
    if bucket is None or limit is None or bucket.tokens >= 1.0:
        return 0.0
    return min((1.0 - bucket.tokens) / limit.per_second, MAX_RETRY_AFTER_SECONDS)


def _check_approval_binding(
    call: ToolCall, token: CapabilityClaims, state: StateView
) -> Reason | None:
    """An approval id must name a request for exactly this call: agent, tool, arguments, run."""
    if not call.approval_id:
        return None
    record = state.approval
    if record is None:
        return Reason(
            ReasonCode.APPROVAL_NOT_FOUND,
            f"no approval request '{call.approval_id}'",
            "approval_id",
        )
    bound = (record.agent, record.tool, record.args_digest, record.run_id)
    if bound != (token.subject, call.tool, call.args_digest, call.run_id):
        return Reason(
            ReasonCode.APPROVAL_MISMATCH,
            "the approval was given for another call (agent, tool, arguments or run differ)",
            "approval_id",
        )
    return None


def _apply_approval(
    policy: Policy, call: ToolCall, state: StateView, now: float, decision: Decision
) -> tuple[Decision, StateChanges]:
    """Step 9, approvals: use a presented approval once, or open (or find) a request.

    The approval is judged against the tier the *current* policy requires, so a policy change
    between request and use still bites: a request made under other approval rules for the
    tier (``Policy.approval_rules``: approvers, their groups, counts, approver condition) is
    stale, neither used nor handed out again; the call gets a new request.
    """
    requirement = decision.approval
    if decision.outcome is not Outcome.NEEDS_APPROVAL or requirement is None:
        return decision, NO_CHANGES
    rules = policy.approval_rules(call.tool, requirement.tier)
    record = state.approval if call.approval_id else None
    if record is not None and record.rules == rules:
        status = record.status_at(now, requirement.ttl_seconds)
        if status is ApprovalStatus.EXPIRED:
            expire = record.id if record.status is not ApprovalStatus.EXPIRED else ""
            reason = Reason(ReasonCode.APPROVAL_EXPIRED, "the approval request expired")
            return _deny_for(policy, decision, reason), StateChanges(expire_approval=expire)
        if status is ApprovalStatus.REJECTED:
            reason = Reason(ReasonCode.APPROVAL_REJECTED, "the approval request was rejected")
            return _deny_for(policy, decision, reason), NO_CHANGES
        if status is ApprovalStatus.CONSUMED:
            reason = Reason(ReasonCode.APPROVAL_CONSUMED, "the approval was already used")
            return _deny_for(policy, decision, reason), NO_CHANGES
        # Someone who became an issuer of the agent since approving no longer counts: the
        # same person must never both mint the token and approve the call.
        issuers = policy.issuers_of(record.agent)
        if record.satisfies(requirement, issuers):
            approvers = ", ".join(record.approvers_for(requirement, issuers))
            reason = Reason(ReasonCode.APPROVAL_GRANTED, f"approved by {approvers}")
            allowed = replace(
                decision, outcome=Outcome.ALLOW, reasons=(reason,), approval_id=record.id
            )
            return allowed, StateChanges(consume_approval=record.id)
        if status is ApprovalStatus.PENDING and record.tier == requirement.tier:
            return replace(decision, approval_id=record.id), NO_CHANGES
    pending = state.open_approval
    if (
        pending is not None
        and pending.tier == requirement.tier
        and pending.rules == rules
        and pending.status_at(now, requirement.ttl_seconds) is ApprovalStatus.PENDING
    ):
        return replace(decision, approval_id=pending.id), NO_CHANGES
    if state.pending_approvals >= MAX_PENDING_APPROVALS_PER_AGENT:
        return _deny_for(policy, decision, _APPROVAL_QUEUE_FULL), NO_CHANGES
    return decision, StateChanges(open_approval=requirement)


_APPROVAL_QUEUE_FULL = Reason(
    ReasonCode.APPROVALS_PENDING_LIMIT,
    f"the agent has {MAX_PENDING_APPROVALS_PER_AGENT} approval requests pending, the most it "
    "may: no new one is opened until people decide some or they expire",
)


def _deny_for(policy: Policy, decision: Decision, reason: Reason) -> Decision:
    return replace(decision, outcome=Outcome.DENY, reasons=(reason,), approval=None, approval_id="")


def _apply_tiers(
    policy: Policy,
    tool: Tool,
    call: ToolCall,
    token: CapabilityClaims,
    bindings: Bindings | None,
) -> Decision:
    """Step 9: the first tier whose condition holds decides; an erroring condition denies."""
    for tier in tool.tiers:
        if tier.when is not None:
            if bindings is None:
                bindings = _bindings(policy, tool, call, token)
            try:
                matched = tier.when.evaluate(bindings)
            except ConditionEvaluationError as exc:
                reason = Reason(
                    ReasonCode.CONDITION_ERROR,
                    f"the condition of tier '{tier.name}' could not be evaluated: {exc}",
                )
                return _decide(policy, Outcome.DENY, (reason,), token=token)
            if not matched:
                continue
        return _tier_decision(policy, tier, token)
    reason = Reason(ReasonCode.NO_TIER_MATCHED, f"no tier of tool '{tool.name}' matched")
    return _decide(policy, Outcome.DENY, (reason,), token=token)


def _tier_decision(policy: Policy, tier: Tier, token: CapabilityClaims) -> Decision:
    if tier.action is TierAction.ALLOW:
        reason = Reason(ReasonCode.TIER_ALLOWED, tier.message or f"allowed by tier '{tier.name}'")
        return _decide(policy, Outcome.ALLOW, (reason,), token=token, tier=tier.name)
    if tier.action is TierAction.REQUIRE_APPROVAL:
        requirement = ApprovalRequirement(
            tier=tier.name,
            approvals_required=tier.approvals,
            approver_roles=tier.approver_roles,
            ttl_seconds=tier.ttl_seconds,
        )
        roles = ", ".join(tier.approver_roles)
        reason = Reason(
            ReasonCode.APPROVAL_REQUIRED,
            tier.message or f"tier '{tier.name}' needs {tier.approvals} approval(s) from {roles}",
        )
        return _decide(
            policy,
            Outcome.NEEDS_APPROVAL,
            (reason,),
            token=token,
            tier=tier.name,
            approval=requirement,
        )
    reason = Reason(ReasonCode.TIER_DENIED, tier.message or f"denied by tier '{tier.name}'")
    return _decide(policy, Outcome.DENY, (reason,), token=token, tier=tier.name)


def _bindings(policy: Policy, tool: Tool, call: ToolCall, token: CapabilityClaims) -> Bindings:
    """The variables the tool's conditions read (converting the others cost as much)."""
    needed = tool.condition_variables
    values: dict[str, Mapping[str, Any]] = {}
    if "args" in needed:
        values["args"] = call.arguments
    if "agent" in needed:
        agent = policy.agents[token.subject]
        values["agent"] = {"id": agent.id, "roles": list(agent.roles)}
    if "token" in needed:
        values["token"] = {
            "id": token.token_id,
            "issuer": token.issuer,
            "run_id": token.run_id or "",
        }
    if "context" in needed:
        values["context"] = call.context
    return bind_variables(values)


def _deny(policy: Policy, reason: Reason, token: CapabilityClaims | None = None) -> Evaluation:
    return Evaluation(_decide(policy, Outcome.DENY, (reason,), token=token))


def _decide(
    policy: Policy,
    outcome: Outcome,
    reasons: tuple[Reason, ...],
    *,
    token: CapabilityClaims | None,
    tier: str = "",
    approval: ApprovalRequirement | None = None,
) -> Decision:
    return Decision(
        outcome=outcome,
        reasons=reasons,
        policy_version=policy.version,
        matched_tier=tier,
        approval=approval,
        agent=token.subject if token else "",
        token_id=token.token_id if token else "",
    )


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")
