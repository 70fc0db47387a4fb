"""The compiled, immutable policy the engine evaluates.

Everything here is built once per bundle by the loader and never mutated: a reload builds a whole
new ``Policy`` and swaps one reference. Mappings are read-only views.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from types import MappingProxyType
from typing import TypeVar

from sidecar.policy.conditions import Condition
from sidecar.policy.schemas import ArgumentSchema

DEFAULT_APPROVAL_TTL_SECONDS = 24 * 3600

_V = TypeVar("_V")


def _frozen(items: Mapping[str, _V] | None = None) -> Mapping[str, _V]:
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True, slots=True)
class SourceLocation:
    """Where a definition stands in the bundle: path relative to the bundle root, 1-based."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class TierAction(StrEnum):
    """What a matching approval tier does."""

    ALLOW = "allow"
    DENY = "deny"
    REQUIRE_APPROVAL = "require_approval"


@dataclass(frozen=True, slots=True)
class Tier:
    """One approval tier of a tool. Tiers are tried in order; the first whose ``when`` holds wins.

    ``when`` is None for an unconditional tier (it always matches).
    """

    name: str
    action: TierAction
    when: Condition | None
    location: SourceLocation
    approvals: int = 0
    approver_roles: tuple[str, ...] = ()
    ttl_seconds: int = DEFAULT_APPROVAL_TTL_SECONDS
    message: str = ""
    vetoes: int = 1
    approver_condition: Condition | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """A business rule: the call is denied (RULE_FAILED) unless ``require`` holds."""

    name: str
    require: Condition
    message: str
    location: SourceLocation


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool agents may call: its argument schema, resource pins, rules and approval tiers.

    ``redact`` names the arguments whose values the audit log replaces by a keyed hash.
    """

    name: str
    arguments: ArgumentSchema
    tiers: tuple[Tier, ...]
    location: SourceLocation
    description: str = ""
    writes: bool = False
    pins: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    cost: Decimal = Decimal(0)
    redact: tuple[str, ...] = ()
    condition_variables: frozenset[str] = field(init=False, repr=False, compare=False)
    """The call variables its rules and tiers read: only these are bound for a call."""

    def __post_init__(self) -> None:
        conditions = [rule.require for rule in self.rules]
        conditions += [tier.when for tier in self.tiers if tier.when is not None]
        variables = frozenset().union(*(condition.variables for condition in conditions))
        object.__setattr__(self, "condition_variables", variables)


class KillScope(StrEnum):
    """What a kill switch stops. Mirrors ``proviso.v1.KillSwitchScope``."""

    GLOBAL = "global"
    AGENT = "agent"
    TOOL = "tool"


@dataclass(frozen=True, slots=True)
class KillSwitch:
    """An engaged kill switch, shipped in the policy or set through the admin API."""

    scope: KillScope
    target: str
    reason: str
    source: str = "policy"
    engaged_by: str = "policy"
    engaged_at: float = 0.0

    def covers(self, agent: str | None, tool: str) -> bool:
        """True if the switch stops a call of ``tool`` by ``agent`` (None: not yet known)."""
        if self.scope is KillScope.GLOBAL:
            return True
        if self.scope is KillScope.TOOL:
            return self.target == tool
        return agent is not None and self.target == agent

    @property
    def label(self) -> str:
        return "global" if self.scope is KillScope.GLOBAL else f"{self.scope}:{self.target}"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: ``per_second`` refill, up to ``burst`` calls at once."""

    per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class Controls:
    """Operational limits: run budgets, the retry budget, rate limits, idempotency window.

    A run is the Check's ``run_id``; Checks without one are budgeted per token (its ``jti``).
    Zero or None means "no limit".
    """

    max_calls_per_run: int = 0
    max_calls_per_tool: Mapping[str, int] = field(default_factory=_frozen)
    max_cost_per_run: Decimal | None = None
    max_consecutive_failures: int = 0
    idempotency_window_seconds: int = 24 * 3600
    default_rate_limit: RateLimit | None = None
    agent_rate_limits: Mapping[str, RateLimit] = field(default_factory=_frozen)

    def rate_limit(self, agent: str) -> RateLimit | None:
        return self.agent_rate_limits.get(agent, self.default_rate_limit)


@dataclass(frozen=True, slots=True)
class Role:
    """A set of tools, and the ceiling for tokens minted for agents holding the role."""

    name: str
    tools: frozenset[str]
    max_token_ttl_seconds: int
    location: SourceLocation


@dataclass(frozen=True, slots=True)
class Agent:
    """An agent identity (a token's subject) and the roles it holds."""

    id: str
    roles: tuple[str, ...]
    location: SourceLocation


@dataclass(frozen=True, slots=True)
class ApproverRole:
    """A role people hold to approve calls; IdP groups map to it."""

    name: str
    groups: tuple[str, ...]
    location: SourceLocation


@dataclass(frozen=True, slots=True)
class Issuer:
    """An identity (e.g. an orchestrator) that may mint capability tokens for some agents."""

    subject: str
    agents: frozenset[str]
    location: SourceLocation


@dataclass(frozen=True, slots=True)
class DevSubject:
    """A person or service of the dev IdP's directory (dev mode only) and its groups."""

    subject: str
    groups: tuple[str, ...]
    location: SourceLocation


@dataclass(frozen=True, slots=True)
class Policy:
    """A whole compiled bundle. ``version`` is the content hash of every file in it."""

    version: str
    label: str = ""
    sources: tuple[str, ...] = ()
    agents: Mapping[str, Agent] = field(default_factory=_frozen)
    roles: Mapping[str, Role] = field(default_factory=_frozen)
    tools: Mapping[str, Tool] = field(default_factory=_frozen)
    approver_roles: Mapping[str, ApproverRole] = field(default_factory=_frozen)
    issuers: Mapping[str, Issuer] = field(default_factory=_frozen)
    admin_groups: tuple[str, ...] = ()
    dev_directory: Mapping[str, DevSubject] = field(default_factory=_frozen)
    controls: Controls = field(default_factory=Controls)
    kill_switches: tuple[KillSwitch, ...] = ()

    def approver_roles_of(self, groups: tuple[str, ...]) -> tuple[str, ...]:
        """The approver roles a person with these IdP groups holds, sorted."""
        held = set(groups)
        return tuple(
            sorted(n for n, role in self.approver_roles.items() if held & set(role.groups))
        )

    def tier(self, tool: str, name: str) -> Tier | None:
        """A tool's tier by name, if both exist in this policy."""
        found = self.tools.get(tool)
        return next((t for t in found.tiers if t.name == name), None) if found else None

    def issuers_of(self, agent: str) -> frozenset[str]:
        """The subjects that may mint the agent's tokens now: they may never approve its calls."""
        return frozenset(i.subject for i in self.issuers.values() if agent in i.agents)

    def approval_tiers(self) -> frozenset[str]:
        """The names of the tiers, of any tool, that need people's approval."""
        return frozenset(
            tier.name
            for tool in self.tools.values()
            for tier in tool.tiers
            if tier.action is TierAction.REQUIRE_APPROVAL
        )

    def approval_rules(self, tool: str, name: str) -> str | None:
        """A digest of who may approve a call in this tier and how many must: the tier's
        approvals, vetoes, approver roles with the groups that grant them, and approver
        condition. An approval request keeps it from its creation; once the policy says
        otherwise the request is stale (it can neither be judged nor used), so a reload that
        takes an approver's right away also takes away the approvals already given. None when
        the tier (or tool) no longer exists or needs no approval."""
        tier = self.tier(tool, name)
        if tier is None or tier.action is not TierAction.REQUIRE_APPROVAL:
            return None
        roles = {
            role: sorted(self.approver_roles[role].groups) if role in self.approver_roles else None
            for role in tier.approver_roles
        }
        condition = tier.approver_condition.source if tier.approver_condition else None
        rules = [tool, name, tier.approvals, tier.vetoes, roles, condition]
        canonical = json.dumps(rules, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]

    def tools_permitted(self, agent_id: str) -> frozenset[str]:
        """The tools the agent's roles permit now; empty for an unknown agent."""
        agent = self.agents.get(agent_id)
        if agent is None:
            return frozenset()
        permitted: set[str] = set()
        for role_name in agent.roles:
            role = self.roles.get(role_name)
            if role is not None:
                permitted |= role.tools
        return frozenset(permitted)

    def max_token_ttl_seconds(self, agent_id: str) -> int:
        """The longest token lifetime any of the agent's roles allows; 0 for an unknown agent."""
        agent = self.agents.get(agent_id)
        if agent is None:
            return 0
        return max(
            (self.roles[r].max_token_ttl_seconds for r in agent.roles if r in self.roles),
            default=0,
        )
