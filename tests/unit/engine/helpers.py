"""Builders for engine tests: small programmatic policies, claims and calls, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final

from sidecar.engine import ToolCall
from sidecar.policy.conditions import Condition
from sidecar.policy.model import Agent, Policy, Role, SourceLocation, Tier, TierAction, Tool
from sidecar.policy.schemas import ArgumentSchema
from tokens import CapabilityClaims, Grant

HERE: Final = SourceLocation("test.yaml", 1, 1)
AGENT: Final = "billing-agent@service"
OTHER_AGENT: Final = "triage-agent@service"
VERSION: Final = "v-test-0001"
TOKEN_ID: Final = "tok-0001"
ISSUER: Final = "orchestrator@service"

REFUND_SCHEMA: Final[Mapping[str, Any]] = MappingProxyType(
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["invoice_id", "amount", "currency"],
        "properties": {
            "invoice_id": {"type": "string", "pattern": "^in_[A-Za-z0-9]+$"},
            "amount": {"type": "number", "exclusiveMinimum": 0, "multipleOf": 0.01},
            "currency": {"enum": ["USD", "EUR"]},
            "note": {"type": "string"},
            "flag": {},
        },
    }
)


def tier(
    name: str,
    action: TierAction,
    when: str | None = None,
    *,
    approvals: int = 0,
    approver_roles: tuple[str, ...] = (),
    ttl_seconds: int = 3600,
    message: str = "",
) -> Tier:
    """A tier whose condition (if any) is compiled from CEL source."""
    return Tier(
        name=name,
        action=action,
        when=Condition(when) if when is not None else None,
        location=HERE,
        approvals=approvals,
        approver_roles=approver_roles,
        ttl_seconds=ttl_seconds,
        message=message,
    )


ALLOW_ALL: Final = (tier("default", TierAction.ALLOW),)


def tool(
    name: str,
    tiers: Iterable[Tier] = ALLOW_ALL,
    schema: Mapping[str, Any] | None = None,
    pins: tuple[str, ...] = (),
) -> Tool:
    """A tool with an object schema (any object by default)."""
    return Tool(
        name=name,
        arguments=ArgumentSchema(schema if schema is not None else {"type": "object"}),
        tiers=tuple(tiers),
        location=HERE,
        pins=pins,
    )


def policy(
    *tools: Tool,
    roles: Mapping[str, Iterable[str]] | None = None,
    agents: Mapping[str, Iterable[str]] | None = None,
    version: str = VERSION,
) -> Policy:
    """A policy; by default one role ``billing`` permitting every tool, held by ``AGENT``."""
    role_tools = roles if roles is not None else {"billing": [t.name for t in tools]}
    agent_roles = agents if agents is not None else {AGENT: ["billing"]}
    return Policy(
        version=version,
        tools=MappingProxyType({t.name: t for t in tools}),
        roles=MappingProxyType(
            {
                name: Role(name, frozenset(names), max_token_ttl_seconds=900, location=HERE)
                for name, names in role_tools.items()
            }
        ),
        agents=MappingProxyType(
            {name: Agent(name, tuple(held), HERE) for name, held in agent_roles.items()}
        ),
    )


def claims(
    *grants: Grant,
    subject: str = AGENT,
    run_id: str | None = None,
    token_id: str = TOKEN_ID,
) -> CapabilityClaims:
    """Claims as ``tokens.verify`` would return them (no signature needed at this level)."""
    return CapabilityClaims(
        issuer=ISSUER,
        subject=subject,
        audience="proviso",
        issued_at=1_000,
        not_before=1_000,
        expires_at=1_900,
        token_id=token_id,
        grants=grants,
        run_id=run_id,
        key_id="k1",
    )


def grant(tool_name: str, **pins: str) -> Grant:
    """A grant of ``tool_name`` with keyword pins."""
    return Grant(tool_name, MappingProxyType(dict(pins)))


def call(
    tool_name: str,
    arguments: Mapping[str, Any] | None = None,
    *,
    context: Mapping[str, Any] | None = None,
    run_id: str = "",
) -> ToolCall:
    """A parsed call, holding plain dicts as ``strictjson.parse_object`` returns them."""
    return ToolCall(
        tool=tool_name,
        arguments=dict(arguments or {}),
        context=dict(context or {}),
        run_id=run_id,
    )
