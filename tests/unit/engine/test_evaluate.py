"""evaluate() on small programmatic policies: every step's reason code, and the order of steps."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

import pytest

from sidecar.engine import (
    ApprovalRequirement,
    Decision,
    Outcome,
    ReasonCode,
    ToolCall,
    evaluate,
)
from sidecar.policy.model import TierAction
from tests.unit.engine.helpers import (
    AGENT,
    OTHER_AGENT,
    REFUND_SCHEMA,
    TOKEN_ID,
    VERSION,
    call,
    claims,
    grant,
    policy,
    tier,
    tool,
)
from tokens import (
    TokenBadSignatureError,
    TokenError,
    TokenExpiredError,
    TokenMalformedError,
    TokenNotYetValidError,
    TokenUnknownKeyError,
    TokenWrongAlgorithmError,
    TokenWrongAudienceError,
    TokenWrongIssuerError,
)

REFUND: Final = "requestRefund"
GOOD_ARGS: Final[dict[str, Any]] = {
    "invoice_id": "in_93K2",
    "amount": Decimal("10.00"),
    "currency": "USD",
}
BAD_ARGS: Final[dict[str, Any]] = {
    "invoice_id": "in_93K2",
    "amount": Decimal("-1"),
    "currency": "JPY",
}
REFUND_POLICY: Final = policy(
    tool(
        REFUND,
        (
            tier("auto", TierAction.ALLOW, "args.amount <= 50"),
            tier(
                "supervisor",
                TierAction.REQUIRE_APPROVAL,
                "args.amount <= 500",
                approvals=1,
                approver_roles=("billing-supervisor",),
                ttl_seconds=7200,
            ),
            tier("over", TierAction.DENY, message="too much"),
        ),
        schema=REFUND_SCHEMA,
        pins=("invoice_id",),
    ),
    tool("getInvoice"),
    tool("addNote"),
    roles={"billing": [REFUND, "getInvoice"], "notes": ["addNote"]},
    agents={AGENT: ["billing"], OTHER_AGENT: ["notes"]},
)
REFUND_TOKEN: Final = claims(grant(REFUND, invoice_id="in_93K2"))


def refund(**overrides: Any) -> dict[str, Any]:
    """Valid refund arguments with some replaced."""
    return {**GOOD_ARGS, **overrides}


# --- step 2: the token ----------------------------------------------------------------------


def test_no_token_denies_token_missing() -> None:
    """A call without a token is denied TOKEN_MISSING, with no agent or token id."""
    decision = evaluate(REFUND_POLICY, call(REFUND, GOOD_ARGS), None)
    assert decision.outcome is Outcome.DENY
    assert decision.primary_code is ReasonCode.TOKEN_MISSING
    assert decision.reasons[0].code is ReasonCode.TOKEN_MISSING
    assert (decision.agent, decision.token_id, decision.matched_tier) == ("", "", "")
    assert decision.policy_version == VERSION


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (TokenMalformedError("bad"), ReasonCode.TOKEN_MALFORMED),
        (TokenWrongAlgorithmError("bad"), ReasonCode.TOKEN_WRONG_ALGORITHM),
        (TokenUnknownKeyError("bad"), ReasonCode.TOKEN_UNKNOWN_KEY),
        (TokenBadSignatureError("bad"), ReasonCode.TOKEN_BAD_SIGNATURE),
        (TokenExpiredError("bad", expired_at=5), ReasonCode.TOKEN_EXPIRED),
        (TokenNotYetValidError("bad", not_before=5), ReasonCode.TOKEN_NOT_YET_VALID),
        (TokenWrongAudienceError("bad"), ReasonCode.TOKEN_WRONG_AUDIENCE),
        (TokenWrongIssuerError("bad"), ReasonCode.TOKEN_WRONG_ISSUER),
    ],
)
def test_token_error_denies_with_its_code(error: TokenError, code: ReasonCode) -> None:
    """Each kind of token refusal denies with the reason code its ``code`` names."""
    decision = evaluate(REFUND_POLICY, call(REFUND, GOOD_ARGS), error)
    assert decision.outcome is Outcome.DENY
    assert decision.reasons == (decision.reasons[0],)
    assert decision.primary_code is code
    assert decision.reasons[0].message == "bad"
    assert (decision.agent, decision.token_id) == ("", "")


def test_a_revocation_error_from_the_shell_denies_token_revoked() -> None:
    """A TokenError subclass whose code is TOKEN_REVOKED (raised by the shell) maps to it."""

    class RevokedError(TokenError):
        code = "TOKEN_REVOKED"

    decision = evaluate(REFUND_POLICY, call(REFUND, GOOD_ARGS), RevokedError("revoked"))
    assert decision.primary_code is ReasonCode.TOKEN_REVOKED


def test_a_token_error_with_an_unmapped_code_still_denies() -> None:
    """A TokenError whose code is not a ReasonCode (the root's TOKEN_INVALID) denies, not raises."""
    decision = evaluate(REFUND_POLICY, call(REFUND, GOOD_ARGS), TokenError("odd"))
    assert decision.outcome is Outcome.DENY


def test_a_token_error_wins_over_every_later_failure() -> None:
    """A token error decides even when the tool is unknown, ungranted and its args invalid."""
    decision = evaluate(
        REFUND_POLICY, call("noSuchTool", {"x": object()}), TokenExpiredError("old", expired_at=1)
    )
    assert decision.primary_code is ReasonCode.TOKEN_EXPIRED
    assert len(decision.reasons) == 1


# --- step 3: scope --------------------------------------------------------------------------


def test_a_granted_pinned_call_in_range_is_allowed() -> None:
    """The baseline: granted tool, matching pin, valid args, low amount is ALLOW by tier auto."""
    decision = evaluate(REFUND_POLICY, call(REFUND, GOOD_ARGS), REFUND_TOKEN)
    assert decision.outcome is Outcome.ALLOW
    assert decision.primary_code is ReasonCode.TIER_ALLOWED
    assert decision.matched_tier == "auto"
    assert decision.approval is None


def test_a_tool_the_token_does_not_grant_is_out_of_scope() -> None:
    """A tool the policy permits but the token does not grant is OUT_OF_SCOPE."""
    decision = evaluate(REFUND_POLICY, call("getInvoice", {"invoice_id": "in_93K2"}), REFUND_TOKEN)
    assert decision.outcome is Outcome.DENY
    assert decision.primary_code is ReasonCode.OUT_OF_SCOPE
    assert "getInvoice" in decision.reasons[0].message


def test_a_pin_with_another_value_is_out_of_scope_with_its_pointer() -> None:
    """An argument differing from its pin is OUT_OF_SCOPE, pointing at the argument."""
    decision = evaluate(REFUND_POLICY, call(REFUND, refund(invoice_id="in_OTHER")), REFUND_TOKEN)
    assert decision.primary_code is ReasonCode.OUT_OF_SCOPE
    assert decision.reasons[0].field == "/invoice_id"
    assert "in_93K2" in decision.reasons[0].message


def test_a_missing_pinned_argument_is_out_of_scope() -> None:
    """A pinned argument that is absent is OUT_OF_SCOPE (not INVALID_ARGUMENTS: scope is first)."""
    args = refund()
    del args["invoice_id"]
    decision = evaluate(REFUND_POLICY, call(REFUND, args), REFUND_TOKEN)
    assert decision.primary_code is ReasonCode.OUT_OF_SCOPE
    assert decision.reasons[0].field == "/invoice_id"


@pytest.mark.parametrize(
    "value",
    [93, Decimal("93"), Decimal("93.0"), None, True, ["93"], {"id": "93"}, " 93", "93 ", "093"],
)
def test_a_pin_matches_only_the_identical_string(value: object) -> None:
    """Pins are byte-exact strings: an int, a Decimal or a near-identical string is OUT_OF_SCOPE."""
    pinned = policy(tool("lookup"))
    decision = evaluate(
        pinned, call("lookup", {"ticket": value}), claims(grant("lookup", ticket="93"))
    )
    assert decision.primary_code is ReasonCode.OUT_OF_SCOPE


def test_a_pin_is_case_and_unicode_sensitive() -> None:
    """A pin differing only in case, or by Unicode normalisation, is OUT_OF_SCOPE."""
    pinned = policy(tool("lookup"))
    token = claims(grant("lookup", name="Caf\u00e9"))
    for other in ("caf\u00e9", "Cafe\u0301"):
        decision = evaluate(pinned, call("lookup", {"name": other}), token)
        assert decision.primary_code is ReasonCode.OUT_OF_SCOPE
    assert evaluate(pinned, call("lookup", {"name": "Caf\u00e9"}), token).outcome is Outcome.ALLOW


def test_every_pin_of_a_grant_must_match() -> None:
    """A grant with two pins needs both; the first mismatching pin (by name) is reported."""
    pinned = policy(tool("move"))
    token = claims(grant("move", src="a", dst="b"))
    assert evaluate(pinned, call("move", {"src": "a", "dst": "b"}), token).outcome is Outcome.ALLOW
    decision = evaluate(pinned, call("move", {"src": "x", "dst": "y"}), token)
    assert decision.primary_code is ReasonCode.OUT_OF_SCOPE
    assert decision.reasons[0].field == "/dst"


def test_pin_pointer_escapes_slash_and_tilde() -> None:
    """The pointer of a mismatching pin follows RFC 6901 (``~`` as ``~0``, ``/`` as ``~1``)."""
    pinned = policy(tool("lookup"))
    decision = evaluate(pinned, call("lookup", {}), claims(grant("lookup", **{"a/b~c": "v"})))
    assert decision.reasons[0].field == "/a~1b~0c"


def test_any_one_matching_grant_suffices() -> None:
    """With several grants for one tool, a call matching any of them is in scope."""
    token = claims(grant(REFUND, invoice_id="in_A"), grant(REFUND, invoice_id="in_B"))
    for invoice in ("in_A", "in_B"):
        decision = evaluate(REFUND_POLICY, call(REFUND, refund(invoice_id=invoice)), token)
        assert decision.outcome is Outcome.ALLOW, invoice
    decision = evaluate(REFUND_POLICY, call(REFUND, refund(invoice_id="in_C")), token)
    assert decision.primary_code is ReasonCode.OUT_OF_SCOPE
    assert "in_A" in decision.reasons[0].message  # the first grant's mismatch is reported


def test_an_unpinned_grant_alongside_a_pinned_one_allows_any_value() -> None:
    """An unpinned grant of the tool makes any value in scope, whatever other grants pin."""
    token = claims(grant(REFUND, invoice_id="in_A"), grant(REFUND))
    decision = evaluate(REFUND_POLICY, call(REFUND, refund(invoice_id="in_Z")), token)
    assert decision.outcome is Outcome.ALLOW


def test_a_token_bound_to_a_run_refuses_other_runs() -> None:
    """A run-bound token is OUT_OF_SCOPE for another run id or none, pointing at run_id."""
    token = claims(grant(REFUND, invoice_id="in_93K2"), run_id="run-1")
    for run_id in ("run-2", "", "RUN-1"):
        decision = evaluate(REFUND_POLICY, call(REFUND, GOOD_ARGS, run_id=run_id), token)
        assert decision.primary_code is ReasonCode.OUT_OF_SCOPE, run_id
        assert decision.reasons[0].field == "run_id"
    decision = evaluate(REFUND_POLICY, call(REFUND, GOOD_ARGS, run_id="run-1"), token)
    assert decision.outcome is Outcome.ALLOW


def test_a_token_without_a_run_accepts_any_run() -> None:
    """A token not bound to a run is in scope whatever run id the call names."""
    decision = evaluate(REFUND_POLICY, call(REFUND, GOOD_ARGS, run_id="anything"), REFUND_TOKEN)
    assert decision.outcome is Outcome.ALLOW


def test_tool_names_are_case_sensitive_in_scope() -> None:
    """A grant of ``requestRefund`` does not cover a call to ``RequestRefund``."""
    decision = evaluate(REFUND_POLICY, call("RequestRefund", GOOD_ARGS), REFUND_TOKEN)
    assert decision.primary_code is ReasonCode.OUT_OF_SCOPE


def test_tool_names_are_case_sensitive_in_the_policy() -> None:
    """A token granting ``RequestRefund`` calls a tool the policy (``requestRefund``) lacks."""
    token = claims(grant("RequestRefund", invoice_id="in_93K2"))
    decision = evaluate(REFUND_POLICY, call("RequestRefund", GOOD_ARGS), token)
    assert decision.primary_code is ReasonCode.UNKNOWN_TOOL


# --- step 4: role ---------------------------------------------------------------------------


def test_a_granted_tool_the_policy_does_not_define_is_unknown() -> None:
    """A token granting a tool the policy does not define is UNKNOWN_TOOL."""
    decision = evaluate(REFUND_POLICY, call("dropTables", {}), claims(grant("dropTables")))
    assert decision.outcome is Outcome.DENY
    assert decision.primary_code is ReasonCode.UNKNOWN_TOOL
    assert decision.agent == AGENT


def test_an_agent_missing_from_the_policy_is_not_permitted() -> None:
    """A token whose subject is not in the policy is NOT_PERMITTED and names that agent."""
    token = claims(grant("getInvoice"), subject="ghost@service")
    decision = evaluate(REFUND_POLICY, call("getInvoice", {}), token)
    assert decision.primary_code is ReasonCode.NOT_PERMITTED
    assert "ghost@service" in decision.reasons[0].message
    assert decision.agent == "ghost@service"


def test_a_tool_the_agents_roles_do_not_permit_is_not_permitted() -> None:
    """A granted, defined tool outside the agent's roles is NOT_PERMITTED (token < policy)."""
    token = claims(grant("getInvoice"), subject=OTHER_AGENT)
    decision = evaluate(REFUND_POLICY, call("getInvoice", {}), token)
    assert decision.primary_code is ReasonCode.NOT_PERMITTED
    other = evaluate(REFUND_POLICY, call("addNote", {}), claims(grant("addNote"), subject=AGENT))
    assert other.primary_code is ReasonCode.NOT_PERMITTED  # AGENT holds billing, not notes


def test_an_agent_with_several_roles_gets_their_union() -> None:
    """An agent holding two roles may call the tools of either."""
    both = policy(
        tool("a"),
        tool("b"),
        roles={"ra": ["a"], "rb": ["b"]},
        agents={AGENT: ["ra", "rb"]},
    )
    for name in ("a", "b"):
        assert evaluate(both, call(name), claims(grant(name))).outcome is Outcome.ALLOW


def test_a_role_missing_from_the_policy_permits_nothing() -> None:
    """An agent whose only role is not defined is NOT_PERMITTED."""
    orphan = policy(tool("a"), roles={}, agents={AGENT: ["gone"]})
    assert evaluate(orphan, call("a"), claims(grant("a"))).primary_code is (
        ReasonCode.NOT_PERMITTED
    )


# --- step 5: schema -------------------------------------------------------------------------


def test_invalid_arguments_give_one_reason_per_violation_with_pointers() -> None:
    """Each violated constraint is its own INVALID_ARGUMENTS reason, sorted by JSON pointer."""
    decision = evaluate(REFUND_POLICY, call(REFUND, {**BAD_ARGS, "surprise": 1}), REFUND_TOKEN)
    assert decision.outcome is Outcome.DENY
    assert {r.code for r in decision.reasons} == {ReasonCode.INVALID_ARGUMENTS}
    assert [r.field for r in decision.reasons] == ["/amount", "/currency", "/surprise"]
    assert decision.matched_tier == ""


def test_a_missing_required_argument_points_at_it() -> None:
    """A missing required argument is reported at its own pointer."""
    args = refund()
    del args["currency"]
    decision = evaluate(REFUND_POLICY, call(REFUND, args), REFUND_TOKEN)
    assert [(r.code, r.field) for r in decision.reasons] == [
        (ReasonCode.INVALID_ARGUMENTS, "/currency")
    ]


@pytest.mark.parametrize(
    "amount", [Decimal("10.005"), Decimal("0"), 0, Decimal("-0.01"), "10.00", True, None]
)
def test_amounts_outside_the_schema_are_invalid(amount: object) -> None:
    """Sub-cent, zero, negative, string, boolean and null amounts fail the schema."""
    decision = evaluate(REFUND_POLICY, call(REFUND, refund(amount=amount)), REFUND_TOKEN)
    assert decision.primary_code is ReasonCode.INVALID_ARGUMENTS
    assert decision.reasons[0].field == "/amount"


# --- step order -----------------------------------------------------------------------------


def test_out_of_scope_is_reported_before_invalid_arguments() -> None:
    """A call both out of scope (pin) and with invalid args reports OUT_OF_SCOPE only."""
    decision = evaluate(
        REFUND_POLICY, call(REFUND, {**BAD_ARGS, "invoice_id": "in_OTHER"}), REFUND_TOKEN
    )
    assert [r.code for r in decision.reasons] == [ReasonCode.OUT_OF_SCOPE]


def test_a_run_mismatch_is_reported_before_an_ungranted_tool() -> None:
    """The run binding is checked first within scope."""
    token = claims(grant(REFUND, invoice_id="in_93K2"), run_id="run-1")
    decision = evaluate(REFUND_POLICY, call("getInvoice", {}, run_id="run-2"), token)
    assert decision.reasons[0].field == "run_id"


def test_out_of_scope_is_reported_before_unknown_tool() -> None:
    """An ungranted tool that the policy does not define either is OUT_OF_SCOPE."""
    decision = evaluate(REFUND_POLICY, call("dropTables", {}), REFUND_TOKEN)
    assert decision.primary_code is ReasonCode.OUT_OF_SCOPE


def test_not_permitted_is_reported_before_invalid_arguments() -> None:
    """A call the roles do not permit reports NOT_PERMITTED even with invalid args."""
    token = claims(grant(REFUND), subject=OTHER_AGENT)
    decision = evaluate(REFUND_POLICY, call(REFUND, BAD_ARGS), token)
    assert [r.code for r in decision.reasons] == [ReasonCode.NOT_PERMITTED]


def test_invalid_arguments_are_reported_before_tiers_run() -> None:
    """Arguments that would make a condition error are INVALID_ARGUMENTS, not CONDITION_ERROR."""
    args = refund()
    del args["amount"]  # the first tier reads args.amount
    decision = evaluate(REFUND_POLICY, call(REFUND, args), REFUND_TOKEN)
    assert [r.code for r in decision.reasons] == [ReasonCode.INVALID_ARGUMENTS]


# --- step 9: tiers --------------------------------------------------------------------------


def test_the_first_matching_tier_decides() -> None:
    """When two tiers match, the earlier one decides."""
    both = policy(
        tool("t", (tier("first", TierAction.DENY, "true"), tier("second", TierAction.ALLOW)))
    )
    decision = evaluate(both, call("t"), claims(grant("t")))
    assert (decision.outcome, decision.matched_tier) == (Outcome.DENY, "first")
    assert decision.primary_code is ReasonCode.TIER_DENIED


def test_require_approval_carries_the_requirement() -> None:
    """A require_approval tier answers NEEDS_APPROVAL with tier, count, roles and TTL."""
    decision = evaluate(REFUND_POLICY, call(REFUND, refund(amount=Decimal("50.01"))), REFUND_TOKEN)
    assert decision.outcome is Outcome.NEEDS_APPROVAL
    assert decision.primary_code is ReasonCode.APPROVAL_REQUIRED
    assert decision.matched_tier == "supervisor"
    assert decision.approval == ApprovalRequirement(
        tier="supervisor",
        approvals_required=1,
        approver_roles=("billing-supervisor",),
        ttl_seconds=7200,
    )
    assert "billing-supervisor" in decision.reasons[0].message


def test_a_deny_tier_uses_its_message() -> None:
    """A deny tier's message is the reason's message."""
    decision = evaluate(REFUND_POLICY, call(REFUND, refund(amount=Decimal("500.01"))), REFUND_TOKEN)
    assert (decision.outcome, decision.primary_code) == (Outcome.DENY, ReasonCode.TIER_DENIED)
    assert decision.reasons[0].message == "too much"
    assert decision.matched_tier == "over"
    assert decision.approval is None


def test_an_allow_tier_message_is_used_when_set() -> None:
    """An allow tier with a message returns it; without one the message names the tier."""
    with_message = policy(tool("t", (tier("ok", TierAction.ALLOW, message="fine by me"),)))
    assert evaluate(with_message, call("t"), claims(grant("t"))).reasons[0].message == "fine by me"
    plain = evaluate(policy(tool("t")), call("t"), claims(grant("t")))
    assert "default" in plain.reasons[0].message


def test_no_matching_tier_denies() -> None:
    """When every tier's condition is false, the call is denied NO_TIER_MATCHED."""
    narrow = policy(tool("t", (tier("only", TierAction.ALLOW, "args.n == 1"),)))
    decision = evaluate(narrow, call("t", {"n": 2}), claims(grant("t")))
    assert (decision.outcome, decision.primary_code) == (Outcome.DENY, ReasonCode.NO_TIER_MATCHED)
    assert decision.matched_tier == ""


def test_a_tool_without_tiers_denies() -> None:
    """A tool with no tiers at all never allows: NO_TIER_MATCHED."""
    decision = evaluate(policy(tool("t", ())), call("t"), claims(grant("t")))
    assert decision.primary_code is ReasonCode.NO_TIER_MATCHED


def test_a_condition_error_denies_even_if_a_later_tier_allows_unconditionally() -> None:
    """Fail closed: a condition erroring on a missing field denies instead of falling through."""
    fragile = policy(
        tool(
            REFUND,
            (
                tier("needs-note", TierAction.REQUIRE_APPROVAL, 'args.note == "vip"', approvals=1),
                tier("default", TierAction.ALLOW),
            ),
            schema=REFUND_SCHEMA,
        )
    )
    decision = evaluate(fragile, call(REFUND, GOOD_ARGS), REFUND_TOKEN)
    assert decision.outcome is Outcome.DENY
    assert [r.code for r in decision.reasons] == [ReasonCode.CONDITION_ERROR]
    assert "needs-note" in decision.reasons[0].message
    assert decision.matched_tier == ""
    with_note = evaluate(fragile, call(REFUND, refund(note="vip")), REFUND_TOKEN)
    assert with_note.outcome is Outcome.NEEDS_APPROVAL


def test_a_condition_error_after_a_non_matching_tier_still_denies() -> None:
    """An erroring condition in tier 2 denies even though tier 1 was merely false."""
    fragile = policy(
        tool(
            "t",
            (
                tier("a", TierAction.ALLOW, "args.n == 1"),
                tier("b", TierAction.ALLOW, "args.missing > 3"),
                tier("c", TierAction.ALLOW),
            ),
        )
    )
    decision = evaluate(fragile, call("t", {"n": 2}), claims(grant("t")))
    assert decision.primary_code is ReasonCode.CONDITION_ERROR
    assert "'b'" in decision.reasons[0].message


def test_a_tier_after_the_decisive_one_is_never_evaluated() -> None:
    """A later tier that would error does not matter once an earlier tier matched."""
    fragile = policy(
        tool(
            "t",
            (
                tier("a", TierAction.ALLOW, "args.n == 1"),
                tier("b", TierAction.DENY, "args.missing > 3"),
            ),
        )
    )
    decision = evaluate(fragile, call("t", {"n": 1}), claims(grant("t")))
    assert (decision.outcome, decision.matched_tier) == (Outcome.ALLOW, "a")


@pytest.mark.parametrize("flag", ["true", "false", 1, Decimal("1.0"), None, ["x"], {"a": True}])
def test_a_condition_that_is_not_boolean_at_runtime_denies(flag: object) -> None:
    """``args.flag`` holding a non-boolean (even the string "true") is CONDITION_ERROR."""
    by_flag = policy(tool("t", (tier("flagged", TierAction.ALLOW, "args.flag"),)))
    decision = evaluate(by_flag, call("t", {"flag": flag}), claims(grant("t")))
    assert decision.outcome is Outcome.DENY
    assert decision.primary_code is ReasonCode.CONDITION_ERROR


@pytest.mark.parametrize(("flag", "outcome"), [(True, Outcome.ALLOW), (False, Outcome.DENY)])
def test_a_boolean_argument_condition_decides(flag: bool, outcome: Outcome) -> None:
    """The same ``args.flag`` condition works when the value is a real boolean."""
    by_flag = policy(tool("t", (tier("flagged", TierAction.ALLOW, "args.flag"),)))
    assert evaluate(by_flag, call("t", {"flag": flag}), claims(grant("t"))).outcome is outcome


def test_a_deny_tier_over_cels_iteration_budget_denies_condition_error() -> None:
    """A caller-chosen list longer than CEL's iteration budget (10,000) makes the condition
    fail, as any condition that cannot be evaluated: a DENY with a reason, not an exception
    out of the engine (the Check was an INTERNAL error, unaudited, with no reason)."""
    guarded = policy(
        tool(
            "t",
            (
                tier("secret", TierAction.DENY, 'args.tags.exists(t, t == "secret")'),
                tier("rest", TierAction.ALLOW),
            ),
        )
    )
    decision = evaluate(guarded, call("t", {"tags": ["x"] * 10_000}), claims(grant("t")))
    assert (decision.outcome, decision.primary_code) == (Outcome.DENY, ReasonCode.CONDITION_ERROR)


def test_a_type_mismatch_in_a_comparison_denies() -> None:
    """Comparing a string argument with a number is CONDITION_ERROR, not false."""
    numeric = policy(
        tool("t", (tier("small", TierAction.DENY, "args.n > 5"), tier("rest", TierAction.ALLOW)))
    )
    decision = evaluate(numeric, call("t", {"n": "9"}), claims(grant("t")))
    assert decision.primary_code is ReasonCode.CONDITION_ERROR


@pytest.mark.parametrize(
    ("condition", "matches"),
    [
        (f'agent.id == "{AGENT}"', True),
        ('"billing" in agent.roles', True),
        ('"notes" in agent.roles', False),
        (f'token.id == "{TOKEN_ID}"', True),
        ('token.issuer == "orchestrator@service"', True),
        ('token.run_id == "run-7"', True),
        ('context.env == "prod"', True),
        ('context.env == "dev"', False),
        ("args.items[1].qty == 2", True),
        ("args.price == 1.5", True),
    ],
)
def test_conditions_see_args_agent_token_and_context(condition: str, matches: bool) -> None:
    """Conditions read the call's args, the agent, the token and the context as bound."""
    probe = policy(
        tool("t", (tier("probe", TierAction.ALLOW, condition), tier("else", TierAction.DENY)))
    )
    decision = evaluate(
        probe,
        call(
            "t",
            {"items": [{"qty": 1}, {"qty": 2}], "price": Decimal("1.50")},
            context={"env": "prod"},
            run_id="run-7",
        ),
        claims(grant("t"), run_id="run-7"),
    )
    assert decision.matched_tier == ("probe" if matches else "else")


def test_only_the_variables_a_tool_reads_are_bound_and_checked() -> None:
    """A context value CEL cannot hold exactly fails the conditions that read the context, and
    only those: a tool whose conditions read the arguments alone is not bound to it."""
    inexact = {"total": Decimal("50.0000000000000001")}
    reads_args = policy(tool("t", (tier("small", TierAction.ALLOW, "args.n < 5"),)))
    reads_context = policy(tool("t", (tier("small", TierAction.ALLOW, "context.total < 60"),)))
    assert reads_args.tools["t"].condition_variables == {"args"}
    assert evaluate(
        reads_args, call("t", {"n": 1}, context=inexact), claims(grant("t"))
    ).outcome is (Outcome.ALLOW)
    refused = evaluate(reads_context, call("t", {"n": 1}, context=inexact), claims(grant("t")))
    assert refused.primary_code is ReasonCode.CONDITION_ERROR
    assert "more digits" in refused.reasons[0].message  # bound and refused, not left unbound


def test_a_nul_in_the_context_fails_only_the_tools_whose_conditions_read_it() -> None:
    """The same for a NUL, which CEL would cut the string at."""
    nul = {"region": "eu\x00west"}
    reads_args = policy(tool("t", (tier("small", TierAction.ALLOW, "args.n < 5"),)))
    reads_context = policy(tool("t", (tier("eu", TierAction.ALLOW, 'context.region == "eu"'),)))
    allowed = evaluate(reads_args, call("t", {"n": 1}, context=nul), claims(grant("t")))
    refused = evaluate(reads_context, call("t", {"n": 1}, context=nul), claims(grant("t")))
    assert allowed.outcome is Outcome.ALLOW
    assert refused.primary_code is ReasonCode.CONDITION_ERROR
    assert "NUL" in refused.reasons[0].message


def test_an_unbound_token_shows_an_empty_run_id_to_conditions() -> None:
    """``token.run_id`` is the empty string (not an error) for a token not bound to a run."""
    probe = policy(tool("t", (tier("unbound", TierAction.ALLOW, 'token.run_id == ""'),)))
    assert evaluate(probe, call("t"), claims(grant("t"))).outcome is Outcome.ALLOW


# --- the decision as a whole ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "outcome"),
    [
        (GOOD_ARGS, Outcome.ALLOW),
        ({**GOOD_ARGS, "amount": Decimal("100")}, Outcome.NEEDS_APPROVAL),
        ({**GOOD_ARGS, "amount": Decimal("1000")}, Outcome.DENY),
        (BAD_ARGS, Outcome.DENY),
        ({**GOOD_ARGS, "invoice_id": "in_X"}, Outcome.DENY),
    ],
)
def test_every_decision_after_the_token_carries_version_agent_and_token_id(
    arguments: dict[str, Any], outcome: Outcome
) -> None:
    """Once the token verified, each decision names the policy version, agent and token id."""
    decision = evaluate(REFUND_POLICY, call(REFUND, arguments), REFUND_TOKEN)
    assert decision.outcome is outcome
    assert (decision.policy_version, decision.agent, decision.token_id) == (
        VERSION,
        AGENT,
        TOKEN_ID,
    )


def test_the_policy_version_is_the_one_given() -> None:
    """The decision reports the version of the policy object passed in, whatever it is."""
    other = policy(tool("t"), version="abc123")
    assert evaluate(other, call("t"), claims(grant("t"))).policy_version == "abc123"
    assert evaluate(other, call("t"), None).policy_version == "abc123"


def test_the_same_inputs_give_equal_decisions() -> None:
    """evaluate is deterministic: equal inputs, built afresh, give equal Decisions."""
    cases = [(REFUND, refund(amount=Decimal(a))) for a in ("1", "50.01", "900", "-1")] + [
        (REFUND, refund(note="x", flag="y")),
        ("getInvoice", {}),
    ]
    for tool_name, arguments in cases:
        first = evaluate(REFUND_POLICY, call(tool_name, arguments), REFUND_TOKEN)
        second = evaluate(
            REFUND_POLICY,
            call(tool_name, dict(arguments)),
            claims(grant(REFUND, invoice_id="in_93K2")),
        )
        assert isinstance(first, Decision)
        assert first == second
        assert hash(first) == hash(second)


def test_evaluate_does_not_modify_its_inputs() -> None:
    """The call's arguments are read, never changed (conditions see copies)."""
    arguments: dict[str, Any] = {"items": [{"qty": 1}], "price": Decimal("1.50")}
    probe = policy(tool("t", (tier("p", TierAction.ALLOW, "args.items[0].qty == 1"),)))
    evaluate(probe, ToolCall("t", arguments), claims(grant("t")))  # a plain, mutable dict
    assert arguments == {"items": [{"qty": 1}], "price": Decimal("1.50")}
    assert isinstance(arguments["price"], Decimal)


def test_a_call_with_default_empty_arguments_passes_an_object_schema() -> None:
    """A ToolCall built without arguments is the empty object, which ``{type: object}`` accepts."""
    decision = evaluate(policy(tool("ping")), ToolCall("ping"), claims(grant("ping")))
    assert decision.outcome is Outcome.ALLOW


def test_a_call_with_an_empty_dict_passes_an_object_schema() -> None:
    """The empty object as a dict satisfies a schema with no required arguments."""
    decision = evaluate(policy(tool("ping")), ToolCall("ping", {}), claims(grant("ping")))
    assert decision.outcome is Outcome.ALLOW


def test_the_slowest_rate_limit_gives_a_finite_retry_after() -> None:
    """A refill so slow that the wait overflows (1e-300 calls/s: the format now refuses it)
    still denies RATE_LIMITED with a wait of at most a year: the Check's answer, which writes
    ``retry_after`` as a protobuf Duration, must never fail on it (it was INTERNAL)."""
    from dataclasses import replace  # noqa: PLC0415

    from sidecar.engine import RateBucket, StateView, decide  # noqa: PLC0415
    from sidecar.engine.evaluate import MAX_RETRY_AFTER_SECONDS  # noqa: PLC0415
    from sidecar.policy.model import Controls, RateLimit  # noqa: PLC0415

    limited = replace(
        REFUND_POLICY, controls=Controls(default_rate_limit=RateLimit(per_second=1e-300, burst=1))
    )
    empty = StateView(rate=RateBucket(tokens=0.0, updated_at=1_000.0))
    evaluation = decide(limited, call(REFUND, GOOD_ARGS), claims(grant(REFUND)), empty, 1_000.0)
    decision = evaluation.decision
    assert decision.outcome is Outcome.DENY
    assert [r.code for r in decision.reasons] == [ReasonCode.RATE_LIMITED]
    assert decision.retry_after_seconds == MAX_RETRY_AFTER_SECONDS
