"""Minting capability tokens within the agent's ceiling, and who may mint for whom."""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

import pytest

from sidecar.errors import InvalidRequestError, PermissionDeniedError
from sidecar.minting import GrantRefusedError, authorize_issuer, mint
from sidecar.policy.model import Agent, Policy, Role, SourceLocation, Tool
from sidecar.policy.schemas import ArgumentSchema
from tokens import CapabilityClaims, Grant, SigningKey, VerificationKeys, verify

NOW: Final = 1_767_225_600
BILLING: Final = "billing-resolution-agent@service"
TRIAGE: Final = "support-triage-agent@service"
ORCHESTRATOR: Final = "orchestrator@service"
KEY: Final = SigningKey.generate(kid="mint-key")
REFUND: Final = Grant("requestRefund", MappingProxyType({"invoice_id": "in_93K2"}))


def _mint(
    policy: Policy,
    grants: tuple[Grant, ...] = (REFUND,),
    *,
    agent: str = BILLING,
    ttl: int = 300,
    run_id: str | None = None,
    now: float = NOW,
) -> tuple[str, int, str]:
    minted = mint(
        policy,
        KEY,
        agent=agent,
        grants=grants,
        ttl_seconds=ttl,
        now=now,
        issuer="proviso",
        audience="proviso",
        run_id=run_id,
    )
    return minted.token, minted.ttl_seconds, minted.token_id


def _verify(token: str, now: float = NOW) -> CapabilityClaims:
    return verify(
        token,
        VerificationKeys.from_signing_keys([KEY]),
        audience="proviso",
        issuer="proviso",
        now=now,
    )


def test_a_minted_token_verifies_and_says_what_was_asked(example_policy: Policy) -> None:
    """The token verifies with the key and carries the subject, grants, run and token id."""
    minted = mint(
        example_policy,
        KEY,
        agent=BILLING,
        grants=[REFUND, Grant("getInvoice")],
        ttl_seconds=120,
        now=NOW + 0.9,
        issuer="proviso",
        audience="proviso",
        run_id="run-42",
    )
    claims = _verify(minted.token)
    assert claims.subject == BILLING
    assert claims.grants == (REFUND, Grant("getInvoice"))
    assert claims.run_id == "run-42"
    assert claims.token_id == minted.token_id
    assert claims.key_id == minted.key_id == "mint-key"
    assert (claims.issued_at, claims.expires_at) == (NOW, NOW + 120)
    assert minted.expires_at == NOW + 120
    assert minted.ttl_seconds == 120


def test_an_empty_run_id_means_no_run_binding(example_policy: Policy) -> None:
    """run_id "" (proto default) mints a token not bound to any run."""
    token, _, _ = _mint(example_policy, run_id="")
    assert _verify(token).run_id is None


def test_token_ids_are_unique(example_policy: Policy) -> None:
    """Each mint draws a fresh token id."""
    ids = {_mint(example_policy)[2] for _ in range(20)}
    assert len(ids) == 20


@pytest.mark.parametrize(("requested", "granted"), [(0, 900), (60, 60), (900, 900), (901, 900)])
def test_ttl_is_capped_at_the_role_maximum(
    example_policy: Policy, requested: int, granted: int
) -> None:
    """TTL 0 asks for the role maximum (900 s for billing); more than it is capped to it."""
    token, ttl, _ = _mint(example_policy, ttl=requested)
    assert ttl == granted
    claims = _verify(token)
    assert claims.expires_at - claims.not_before == granted


def test_a_huge_ttl_is_capped_too(example_policy: Policy) -> None:
    """A TTL of ten years is capped at the ceiling, not honoured or overflowed."""
    _, ttl, _ = _mint(example_policy, ttl=10 * 365 * 86400)
    assert ttl == 900


def _roles_policy(**max_ttls: int) -> Policy:
    """Agent ``x@s`` holding one role per keyword (role name -> max TTL), each permitting ``a``."""
    here = SourceLocation("p.yaml", 1, 1)
    lookup = Tool("a", ArgumentSchema({"type": "object"}), (), here)
    return Policy(
        version="v",
        tools=MappingProxyType({"a": lookup}),
        roles=MappingProxyType(
            {name: Role(name, frozenset({"a"}), ttl, here) for name, ttl in max_ttls.items()}
        ),
        agents=MappingProxyType({"x@s": Agent("x@s", tuple(max_ttls), here)}),
    )


def test_the_ceiling_is_the_longest_of_the_agents_roles() -> None:
    """An agent with two roles gets the larger of their maximum TTLs."""
    _, ttl, _ = _mint(_roles_policy(short=60, long=600), (Grant("a"),), agent="x@s", ttl=0)
    assert ttl == 600
    _, ttl, _ = _mint(_roles_policy(short=60, long=600), (Grant("a"),), agent="x@s", ttl=6000)
    assert ttl == 600


def test_a_negative_ttl_is_an_invalid_request(example_policy: Policy) -> None:
    """A negative TTL is refused as InvalidRequestError on field ``ttl``."""
    with pytest.raises(InvalidRequestError) as caught:
        _mint(example_policy, ttl=-1)
    assert caught.value.field == "ttl"


def test_no_grants_is_an_invalid_request(example_policy: Policy) -> None:
    """A token must grant something: no grants is InvalidRequestError on field ``grants``."""
    with pytest.raises(InvalidRequestError) as caught:
        _mint(example_policy, grants=())
    assert caught.value.field == "grants"


def test_an_unknown_agent_is_refused(example_policy: Policy) -> None:
    """Minting for an agent the policy does not know is PermissionDeniedError naming it."""
    with pytest.raises(PermissionDeniedError, match="ghost@service") as caught:
        _mint(example_policy, agent="ghost@service")
    assert not isinstance(caught.value, GrantRefusedError)


def test_a_grant_of_an_undefined_tool_is_refused_by_index(example_policy: Policy) -> None:
    """The refusal names the offending grant's index and tool."""
    with pytest.raises(GrantRefusedError) as caught:
        _mint(example_policy, grants=(REFUND, Grant("getInvoice"), Grant("dropTables")))
    assert (caught.value.index, caught.value.tool) == (2, "dropTables")
    assert str(caught.value).startswith("grants[2] (dropTables): ")
    assert "no such tool" in str(caught.value)
    assert isinstance(caught.value, PermissionDeniedError)


def test_a_grant_beyond_the_agents_roles_is_refused(example_policy: Policy) -> None:
    """A defined tool the agent's roles do not permit is refused, naming the grant."""
    ticket = Grant("createTicket", MappingProxyType({"customer_id": "cus_1"}))
    with pytest.raises(GrantRefusedError, match=r"grants\[1\] \(createTicket\)") as caught:
        _mint(example_policy, grants=(REFUND, ticket))
    assert caught.value.index == 1
    assert "do not permit" in str(caught.value)


def test_a_grant_missing_a_required_pin_is_refused(example_policy: Policy) -> None:
    """A write tool requiring a pin cannot be granted without it; the pin is named."""
    with pytest.raises(GrantRefusedError, match="invoice_id") as caught:
        _mint(example_policy, grants=(Grant("requestRefund"),))
    assert (caught.value.index, caught.value.tool) == (0, "requestRefund")


def test_a_pin_on_another_argument_does_not_satisfy_a_required_pin(
    example_policy: Policy,
) -> None:
    """The required pin must be the one the tool names, not just any pin."""
    wrong = Grant("requestRefund", MappingProxyType({"amount": "10"}))
    with pytest.raises(GrantRefusedError, match="invoice_id"):
        _mint(example_policy, grants=(wrong,))


def test_a_role_allowing_no_lifetime_refuses_to_mint() -> None:
    """An agent whose roles allow a zero TTL gets no token at all."""
    with pytest.raises(PermissionDeniedError, match="no token lifetime"):
        _mint(_roles_policy(frozen=0), (Grant("a"),), agent="x@s", ttl=0)


# --- authorize_issuer -------------------------------------------------------------------------


def test_a_named_issuer_may_mint_for_its_agents(example_policy: Policy) -> None:
    """The orchestrator is an issuer for the billing agent: no exception."""
    authorize_issuer(example_policy, ORCHESTRATOR, BILLING)
    authorize_issuer(example_policy, ORCHESTRATOR, TRIAGE)


def test_an_unknown_issuer_is_refused(example_policy: Policy) -> None:
    """A caller the policy does not name as an issuer may not mint."""
    with pytest.raises(PermissionDeniedError, match="is not an issuer"):
        authorize_issuer(example_policy, "alice@example.com", BILLING)


def test_an_issuer_may_not_mint_for_other_agents(example_policy: Policy) -> None:
    """An issuer is limited to the agents the policy lists for it."""
    with pytest.raises(PermissionDeniedError, match="may not mint tokens for 'ghost@service'"):
        authorize_issuer(example_policy, ORCHESTRATOR, "ghost@service")


def test_issuer_names_are_case_sensitive(example_policy: Policy) -> None:
    """``Orchestrator@service`` is not ``orchestrator@service``."""
    with pytest.raises(PermissionDeniedError):
        authorize_issuer(example_policy, "Orchestrator@service", BILLING)
