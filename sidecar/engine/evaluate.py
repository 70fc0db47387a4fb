"""``evaluate``: the functional core of Check (DESIGN.md §2, steps 2-5 and 9).

The order is fixed and the first failing step decides. Kill switches (1), business rules (6),
idempotency (7) and budgets (8) plug in between these steps in later work; each step is a
function returning a denial or None, so a new step is one more line in ``evaluate``.
"""

from __future__ import annotations

from sidecar.engine.decision import (
    ApprovalRequirement,
    Decision,
    Outcome,
    Reason,
    ReasonCode,
    ToolCall,
)
from sidecar.policy.conditions import Bindings, ConditionEvaluationError, bind
from sidecar.policy.model import Policy, Tier, TierAction, Tool
from tokens import CapabilityClaims, Grant, TokenError


def evaluate(
    policy: Policy, call: ToolCall, token: CapabilityClaims | TokenError | None
) -> Decision:
    """Decide one tool call.

    Args:
        policy: the policy in force; a token never outlives a policy change, so roles are read
            from here, not from the token.
        call: the parsed call.
        token: the verified claims, the verification error, or None when no token was sent.
            WARNING: pass claims only after the signature, audience, issuer and lifetime have
            been verified (``tokens.verify``); the engine trusts them as given.

    Returns:
        A Decision. Never raises for a bad call: a deny is data.
    """
    if token is None:
        return _deny(policy, Reason(ReasonCode.TOKEN_MISSING, "no capability token was presented"))
    if isinstance(token, TokenError):
        return _deny(policy, Reason(ReasonCode(token.code), token.message))

    denial = _check_scope(call, token) or _check_role(policy, call, token)
    if denial is not None:
        return _deny(policy, denial, token=token)
    tool = policy.tools[call.tool]

    violations = tool.arguments.validate(call.arguments)
    if violations:
        reasons = tuple(
            Reason(ReasonCode.INVALID_ARGUMENTS, v.message, v.pointer) for v in violations
        )
        return _decide(policy, Outcome.DENY, reasons, token=token)

    return _apply_tiers(policy, tool, call, token)


def _check_scope(call: ToolCall, token: CapabilityClaims) -> Reason | None:
    """Step 3: the token grants the tool, every pin equals its argument, the run matches."""
    if token.run_id is not None and call.run_id != token.run_id:
        return Reason(
            ReasonCode.OUT_OF_SCOPE,
            f"the token is bound to run '{token.run_id}'",
            "run_id",
        )
    grants = token.grants_for(call.tool)
    if not grants:
        return Reason(ReasonCode.OUT_OF_SCOPE, f"the token does not grant tool '{call.tool}'")
    first_mismatch: Reason | None = None
    for grant in grants:
        mismatch = _pin_mismatch(grant, call)
        if mismatch is None:
            return None
        first_mismatch = first_mismatch or mismatch
    return first_mismatch


def _pin_mismatch(grant: Grant, call: ToolCall) -> Reason | None:
    for name, pinned in sorted(grant.pins.items()):
        value = call.arguments.get(name)
        if not isinstance(value, str) or value != pinned:
            return Reason(
                ReasonCode.OUT_OF_SCOPE,
                f"argument '{name}' must be '{pinned}': the token pins it",
                f"/{_escape(name)}",
            )
    return None


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


def _apply_tiers(policy: Policy, tool: Tool, call: ToolCall, token: CapabilityClaims) -> Decision:
    """Step 9: the first tier whose condition holds decides; an erroring condition denies."""
    bindings: Bindings | None = None
    for tier in tool.tiers:
        if tier.when is not None:
            if bindings is None:
                bindings = _bindings(policy, call, token)
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


def _bindings(policy: Policy, call: ToolCall, token: CapabilityClaims) -> Bindings:
    agent = policy.agents[token.subject]
    return bind(
        call.arguments,
        {"id": agent.id, "roles": list(agent.roles)},
        {"id": token.token_id, "issuer": token.issuer, "run_id": token.run_id or ""},
        call.context,
    )


def _deny(policy: Policy, reason: Reason, token: CapabilityClaims | None = None) -> Decision:
    return _decide(policy, Outcome.DENY, (reason,), token=token)


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
