"""The example bundle in policies/: the workflows the product ships with, as data."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from sidecar.policy.conditions import bind
from sidecar.policy.loader import lint_policy, load_policy
from sidecar.policy.model import Policy, Tier, TierAction, Tool

EXAMPLES = Path(__file__).resolve().parents[3] / "policies"

TRIAGE = "support-triage-agent@service"
BILLING = "billing-resolution-agent@service"
INCIDENT = "incident-assistant@service"

AGENT_ROLES = {
    TRIAGE: ("support-triage",),
    BILLING: ("billing-resolution",),
    INCIDENT: ("incident-assistant",),
}
PERMITTED_TOOLS = {
    TRIAGE: {"createTicket", "tagTicket", "addInternalNote"},
    BILLING: {"getInvoice", "requestRefund", "addInternalNote"},
    INCIDENT: {"openIncident", "addInternalNote"},
}
TOKEN_TTL_SECONDS = {
    "support-triage": 30 * 60,
    "billing-resolution": 15 * 60,
    "incident-assistant": 30 * 60,
}
WRITE_TOOLS = {
    "createTicket",
    "tagTicket",
    "addInternalNote",
    "requestRefund",
    "openIncident",
    "muteAlert",
    "changeEscalationPolicy",
}
ALL_TOOLS = WRITE_TOOLS | {"getInvoice"}
DEV_DIRECTORY = {
    "orchestrator@service": ("issuers",),
    "alice@example.com": ("billing-supervisors",),
    "frank@example.com": ("finance-approvers",),
    "fiona@example.com": ("finance-approvers",),
    "olivia@example.com": ("admins",),
}
# (name, action, approvals, approver roles, ttl seconds, has a condition)
REFUND_TIERS = [
    ("auto", TierAction.ALLOW, 0, (), 86400, True),
    ("supervisor", TierAction.REQUIRE_APPROVAL, 1, ("billing-supervisor",), 86400, True),
    ("finance", TierAction.REQUIRE_APPROVAL, 2, ("finance-approver",), 86400, True),
    ("over-limit", TierAction.DENY, 0, (), 86400, False),
]
VALID_REFUND = {
    "invoice_id": "in_93K2",
    "amount": Decimal("120.50"),
    "currency": "EUR",
    "reason": "duplicate charge",
}


@pytest.fixture(scope="module")
def policy() -> Policy:
    """The example bundle, loaded once for this module."""
    return load_policy(EXAMPLES)


def first_matching_tier(tool: Tool, args: dict[str, Any]) -> Tier:
    """The tier the engine would pick for these arguments."""
    bindings = bind(args, {"id": BILLING, "roles": ["billing-resolution"]}, {}, {})
    return next(tier for tier in tool.tiers if tier.when is None or tier.when.evaluate(bindings))


def test_example_bundle_lints_clean() -> None:
    """The shipped examples have no errors and no warnings."""
    assert lint_policy(EXAMPLES) == ()


def test_example_bundle_metadata(policy: Policy) -> None:
    """The bundle has its label, its five files as sources, and a 16-hex-digit version."""
    assert policy.label == "examples-2026-11"
    assert policy.sources == (
        "billing.yaml",
        "common.yaml",
        "dev-directory.yaml",
        "incident.yaml",
        "support.yaml",
    )
    assert len(policy.version) == 16
    int(policy.version, 16)


def test_agents_and_their_roles(policy: Policy) -> None:
    """Each example agent holds exactly its one workflow role."""
    assert {agent_id: agent.roles for agent_id, agent in policy.agents.items()} == AGENT_ROLES


@pytest.mark.parametrize("agent", sorted(PERMITTED_TOOLS))
def test_tools_permitted_per_agent(policy: Policy, agent: str) -> None:
    """Roles grant each agent exactly its workflow's tools (triage gets nothing in billing)."""
    assert policy.tools_permitted(agent) == PERMITTED_TOOLS[agent]


def test_role_token_ceilings(policy: Policy) -> None:
    """Billing tokens live at most 15 minutes, the others 30."""
    assert {name: role.max_token_ttl_seconds for name, role in policy.roles.items()} == (
        TOKEN_TTL_SECONDS
    )


def test_incident_tools_exist_but_are_not_granted(policy: Policy) -> None:
    """muteAlert and changeEscalationPolicy are defined, yet no role grants them."""
    granted = set().union(*(role.tools for role in policy.roles.values()))
    assert {"muteAlert", "changeEscalationPolicy"} <= set(policy.tools)
    assert not granted & {"muteAlert", "changeEscalationPolicy"}
    assert set(policy.tools) == ALL_TOOLS


def test_write_tools_declare_pins(policy: Policy) -> None:
    """Every write tool is marked as such and pins the resource it changes."""
    assert {name for name, tool in policy.tools.items() if tool.writes} == WRITE_TOOLS
    assert all(tool.pins for tool in policy.tools.values() if tool.writes)


def test_argument_schemas_are_closed(policy: Policy) -> None:
    """Every example schema is an object that refuses unknown arguments."""
    for tool in policy.tools.values():
        assert tool.arguments.document["type"] == "object", tool.name
        assert tool.arguments.document["additionalProperties"] is False, tool.name


def test_request_refund_definition(policy: Policy) -> None:
    """requestRefund writes, pins invoice_id and has the four documented tiers in order."""
    tool = policy.tools["requestRefund"]
    assert tool.writes
    assert tool.pins == ("invoice_id",)
    assert [
        (t.name, t.action, t.approvals, t.approver_roles, t.ttl_seconds, t.when is not None)
        for t in tool.tiers
    ] == REFUND_TIERS
    assert tool.tiers[-1].message == "Refunds above 5000 are never made by an agent."


@pytest.mark.parametrize(
    ("amount", "tier"),
    [
        (Decimal("0.01"), "auto"),
        (Decimal("50"), "auto"),
        (50, "auto"),
        (Decimal("50.01"), "supervisor"),
        (Decimal("500.00"), "supervisor"),
        (Decimal("500.01"), "finance"),
        (5000, "finance"),
        (Decimal("5000.01"), "over-limit"),
        (Decimal("1000000"), "over-limit"),
    ],
)
def test_request_refund_tier_by_amount(policy: Policy, amount: Decimal | int, tier: str) -> None:
    """Amounts (decimal or whole) fall into the documented tier at each boundary."""
    args = {**VALID_REFUND, "amount": amount}
    assert first_matching_tier(policy.tools["requestRefund"], args).name == tier


def test_request_refund_schema(policy: Policy) -> None:
    """The refund schema accepts a valid call and refuses each documented violation."""
    schema = policy.tools["requestRefund"].arguments
    assert schema.validate(VALID_REFUND) == ()
    invalid = [
        {**VALID_REFUND, "amount": Decimal("0")},
        {**VALID_REFUND, "amount": Decimal("10.001")},
        {**VALID_REFUND, "currency": "JPY"},
        {**VALID_REFUND, "invoice_id": "inv-1"},
        {**VALID_REFUND, "reason": ""},
        {**VALID_REFUND, "note": "extra"},
        {key: value for key, value in VALID_REFUND.items() if key != "reason"},
    ]
    for args in invalid:
        assert schema.validate(args), args


def test_internal_notes_refuse_card_numbers(policy: Policy) -> None:
    """A note holding a card-like digit run is denied; an ordinary note is allowed."""
    tool = policy.tools["addInternalNote"]
    card = {"ticket_id": "T-1", "body": "customer card 4111111111111111"}
    plain = {"ticket_id": "T-1", "body": "called the customer back"}
    assert first_matching_tier(tool, card).action is TierAction.DENY
    assert first_matching_tier(tool, plain).action is TierAction.ALLOW


def test_approvers_issuers_admins(policy: Policy) -> None:
    """Approver roles map to their groups; the orchestrator issues for the three agents."""
    assert {n: r.groups for n, r in policy.approver_roles.items()} == {
        "billing-supervisor": ("billing-supervisors",),
        "finance-approver": ("finance-approvers",),
    }
    assert {s: i.agents for s, i in policy.issuers.items()} == {
        "orchestrator@service": frozenset(AGENT_ROLES),
    }
    assert policy.admin_groups == ("admins",)


def test_dev_directory(policy: Policy) -> None:
    """The dev IdP knows the example people and services with their groups."""
    assert {s: d.groups for s, d in policy.dev_directory.items()} == DEV_DIRECTORY


def test_definitions_know_where_they_came_from(policy: Policy) -> None:
    """Locations point at the defining key, so later messages can cite file:line:col."""
    location = policy.tools["requestRefund"].location
    assert (location.file, location.col) == ("billing.yaml", 3)
    line = (EXAMPLES / "billing.yaml").read_text().splitlines()[location.line - 1]
    assert line.strip() == "requestRefund:"


def test_policy_mappings_are_read_only(policy: Policy) -> None:
    """A loaded policy cannot be changed in place; reloads swap whole policies."""
    with pytest.raises(TypeError):
        policy.tools["x"] = policy.tools["getInvoice"]  # type: ignore[index]
    with pytest.raises(TypeError):
        del policy.agents[TRIAGE]  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.label = "changed"  # type: ignore[misc]


def test_internal_note_bodies_are_redacted_in_the_audit_log(policy: Policy) -> None:
    """A note may quote a customer or a card number: the audit log keeps only its HMAC."""
    assert policy.tools["addInternalNote"].redact == ("body",)
    assert all(not tool.redact for name, tool in policy.tools.items() if name != "addInternalNote")


def test_a_tool_binds_the_variables_of_its_rules_and_tiers(policy: Policy) -> None:
    """The refund's rules read the invoice from the context and its tiers read the arguments:
    both are bound for a call, and nothing else is."""
    assert policy.tools["requestRefund"].condition_variables == {"args", "context"}
    assert policy.tools["getInvoice"].condition_variables == set()
    refund = policy.tools["requestRefund"]
    rules_only = dataclasses.replace(refund, tiers=())
    assert rules_only.condition_variables == {"args", "context"}
    tiers_only = dataclasses.replace(refund, rules=())
    assert tiers_only.condition_variables == {"args"}
