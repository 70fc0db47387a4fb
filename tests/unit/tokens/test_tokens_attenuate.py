"""Attenuation: a child carries at most what its parent does, whatever is asked for."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokens import (
    MAX_PARENT_CHAIN,
    AttenuationError,
    CapabilityClaims,
    Constraint,
    Grant,
    SigningKey,
    VerificationKeys,
    attenuate,
    issue,
    verify,
)
from tokens.attenuate import constraint_within, grant_within
from tokens.scope import find_grant, grant_violation

NOW: Final = 1_767_225_600
KEY: Final = SigningKey.generate(kid="att-1")
KEYS: Final = VerificationKeys.from_signing_keys([KEY])
REFUND: Final = Grant(
    "requestRefund",
    {"invoice_id": "in_93K2"},
    {"amount": Constraint(max="50"), "currency": Constraint(one_of=["USD", "EUR"])},
)
NOTE: Final = Grant("addInternalNote", {"ticket_id": "T-1"})


def _root(*grants: Grant, ttl: int = 900, run_id: str | None = None) -> CapabilityClaims:
    token = issue(
        KEY,
        issuer="proviso",
        subject="billing@service",
        audience="proviso",
        grants=grants or (REFUND, NOTE),
        ttl_seconds=ttl,
        now=NOW,
        run_id=run_id,
    )
    return _verify(token)


def _verify(token: str, now: int = NOW) -> CapabilityClaims:
    return verify(token, KEYS, audience="proviso", issuer="proviso", now=now)


def _child(parent: CapabilityClaims, *grants: Grant, **kw: Any) -> CapabilityClaims:
    return _verify(attenuate(parent, KEY, grants=grants, now=kw.pop("now", NOW), **kw))


def test_a_narrower_child_verifies_and_records_its_parent() -> None:
    """A child with a subset of grants, a pin added and a constraint tightened verifies."""
    parent = _root()
    tighter = Grant(
        "requestRefund",
        {"invoice_id": "in_93K2", "currency": "USD"},
        {"amount": Constraint(min="1", max="20")},
    )
    child = _child(parent, tighter, ttl_seconds=60)
    assert child.grants == (tighter,)
    assert child.parents == (parent.token_id,)
    assert child.lineage == (parent.token_id, child.token_id)
    assert (child.subject, child.issuer, child.audience) == (
        parent.subject,
        parent.issuer,
        parent.audience,
    )
    assert child.expires_at == NOW + 60


def test_a_grandchild_names_the_whole_chain_root_first() -> None:
    """Each generation appends its parent's id, so the chain lists every ancestor in order."""
    root = _root()
    child = _child(root, REFUND)
    grandchild = _child(child, REFUND)
    assert grandchild.parents == (root.token_id, child.token_id)


def test_the_child_never_outlives_its_parent() -> None:
    """A TTL beyond the parent's expiry, or none, gives the parent's expiry."""
    parent = _root(ttl=300)
    assert _child(parent, NOTE, ttl_seconds=3600).expires_at == parent.expires_at
    assert _child(parent, NOTE).expires_at == parent.expires_at


@pytest.mark.parametrize(
    ("grant", "problem"),
    [
        (Grant("closeAccount"), "does not grant tool 'closeAccount'"),
        (Grant("requestRefund", {}, dict(REFUND.constraints)), "pin invoice_id = in_93K2"),
        (
            Grant("requestRefund", {"invoice_id": "in_OTHER"}, dict(REFUND.constraints)),
            "pin invoice_id = in_93K2",
        ),
        (
            Grant("requestRefund", {"invoice_id": "in_93K2"}, {"amount": Constraint(max="50")}),
            "drops the parent's constraint currency in [EUR, USD]",
        ),
        (
            Grant(
                "requestRefund",
                {"invoice_id": "in_93K2"},
                {**REFUND.constraints, "amount": Constraint(max="50.01")},
            ),
            "loosens the parent's constraint amount <= 50 to amount <= 50.01",
        ),
        (
            Grant(
                "requestRefund",
                {"invoice_id": "in_93K2"},
                {**REFUND.constraints, "currency": Constraint(one_of=["USD", "GBP"])},
            ),
            "loosens the parent's constraint currency",
        ),
        (
            Grant(
                "requestRefund",
                {"invoice_id": "in_93K2", "currency": "GBP"},
                {"amount": Constraint(max="50")},
            ),
            "drops the parent's constraint currency",
        ),
    ],
)
def test_a_wider_child_is_refused_naming_the_grant(grant: Grant, problem: str) -> None:
    """Any grant beyond the parent's is refused with its index, tool and what it widens."""
    with pytest.raises(AttenuationError) as caught:
        attenuate(_root(), KEY, grants=[NOTE, grant], now=NOW)
    assert caught.value.index == 1
    assert caught.value.tool == grant.tool
    assert problem in str(caught.value)
    assert str(caught.value).startswith(f"grants[1] ({grant.tool}): ")


def test_a_pin_inside_the_parents_set_satisfies_it() -> None:
    """Pinning currency to USD keeps within 'currency in [EUR, USD]' without restating it."""
    pinned = Grant(
        "requestRefund",
        {"invoice_id": "in_93K2", "currency": "USD"},
        {"amount": Constraint(max="5")},
    )
    assert _child(_root(), pinned).grants == (pinned,)


def test_the_run_is_inherited_and_cannot_change() -> None:
    """A child of a run-bound parent serves the same run; an unbound parent's child may bind."""
    bound = _root(run_id="run-1")
    assert _child(bound, NOTE).run_id == "run-1"
    with pytest.raises(AttenuationError, match="bound to run 'run-1'"):
        attenuate(bound, KEY, grants=[NOTE], now=NOW, run_id="run-2")
    assert _child(_root(), NOTE, run_id="run-9").run_id == "run-9"


def test_the_chain_is_bounded() -> None:
    """After MAX_PARENT_CHAIN generations a token cannot be attenuated further."""
    claims = _root()
    for _ in range(MAX_PARENT_CHAIN):
        claims = _child(claims, NOTE)
    assert len(claims.parents) == MAX_PARENT_CHAIN
    with pytest.raises(AttenuationError, match="at most 8 ancestors"):
        attenuate(claims, KEY, grants=[NOTE], now=NOW)


def test_an_expired_or_future_parent_cannot_be_attenuated() -> None:
    """A parent past its expiry, or not valid yet, yields no child."""
    parent = _root(ttl=60)
    with pytest.raises(AttenuationError, match="expires"):
        attenuate(parent, KEY, grants=[NOTE], now=NOW + 60)
    with pytest.raises(AttenuationError, match="not valid yet"):
        attenuate(parent, KEY, grants=[NOTE], now=NOW - 1)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"grants": []}, ValueError),
        ({"grants": ["addInternalNote"]}, TypeError),
        ({"ttl_seconds": -1}, ValueError),
        ({"ttl_seconds": True}, ValueError),
    ],
)
def test_bad_arguments_are_programming_errors(kwargs: dict[str, Any], error: type) -> None:
    """Empty grants, non-Grant grants and bad TTLs raise before anything is signed."""
    arguments: dict[str, Any] = {"grants": [NOTE], "now": NOW, **kwargs}
    with pytest.raises(error):
        attenuate(_root(), KEY, **arguments)
    with pytest.raises(TypeError, match="CapabilityClaims"):
        attenuate("token", KEY, grants=[NOTE], now=NOW)  # type: ignore[arg-type]


# ------------------------------------------------------------------ properties (hypothesis)

PROPERTIES: Final = settings(max_examples=300, deadline=None, database=None)
TOOLS: Final = ("t1", "t2")
ARGS: Final = ("a", "b", "c")
WORDS: Final = ("x", "y", "z")
NUMBERS: Final = tuple(Decimal(n) for n in ("-1", "0", "0.5", "1", "2", "3"))

bounds = st.sampled_from(NUMBERS)


@st.composite
def constraints(draw: st.DrawFn) -> Constraint:
    """A random numeric or set constraint over a small domain, so that bounds collide."""
    if draw(st.booleans()):
        values = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3, unique=True))
        return Constraint(one_of=values)
    low = draw(st.none() | bounds)
    high = draw(st.none() | bounds)
    if low is None and high is None:
        high = draw(bounds)
    if low is not None and high is not None and low > high:
        low, high = high, low
    return Constraint(min=low, max=high)


grants = st.builds(
    Grant,
    tool=st.sampled_from(TOOLS),
    pins=st.dictionaries(st.sampled_from(ARGS), st.sampled_from(WORDS), max_size=2),
    constraints=st.dictionaries(st.sampled_from(ARGS), constraints(), max_size=2),
)
constrained_grants = st.builds(
    Grant,
    tool=st.sampled_from(TOOLS),
    pins=st.dictionaries(st.sampled_from(ARGS), st.sampled_from(WORDS), max_size=1),
    constraints=st.dictionaries(st.sampled_from(ARGS), constraints(), min_size=1, max_size=2),
)
argument_values = st.sampled_from(WORDS) | st.sampled_from(NUMBERS) | st.just(None)
calls = st.tuples(
    st.sampled_from(TOOLS),
    st.dictionaries(st.sampled_from(ARGS), argument_values, max_size=3).map(
        lambda args: {k: v for k, v in args.items() if v is not None}
    ),
    st.sampled_from((None, "r1", "r2")),
)


ACTIONS: Final = ("drop-pin", "set-pin", "drop-limit", "set-limit", "nudge", "nudge", "nudge")
"""How a requested child grant differs from its parent's; near misses (nudges) weigh most."""


@st.composite
def mutated(draw: st.DrawFn, parent: Grant) -> Grant:
    """A grant near ``parent``: pins and constraints dropped, changed or added at random."""
    pins = dict(parent.pins)
    limits = dict(parent.constraints)
    for _ in range(draw(st.integers(0, 2))):
        action = draw(st.sampled_from(ACTIONS))
        name = draw(st.sampled_from(ARGS))
        if action == "nudge" and limits:
            name = draw(st.sampled_from(sorted(limits)))
            limits[name] = _nudged(limits[name], draw(bounds), draw(st.sampled_from(WORDS)))
        elif action == "drop-pin":
            pins.pop(name, None)
        elif action == "set-pin":
            pins[name] = draw(st.sampled_from(WORDS))
        elif action == "drop-limit":
            limits.pop(name, None)
        else:
            limits[name] = draw(constraints())
    tool = draw(st.sampled_from((parent.tool, parent.tool, *TOOLS)))
    return Grant(tool, pins, limits)


def _nudged(limit: Constraint, bound: Decimal, word: str) -> Constraint:
    """``limit`` with one edge moved (either way) or one word toggled: a near miss."""
    if limit.one_of is not None:
        values = set(limit.one_of) ^ {word}
        return Constraint(one_of=sorted(values)) if values else limit
    low, high = limit.min, limit.max
    if high is not None:
        high = bound if low is None or bound >= low else high
    else:
        low = bound
    return Constraint(min=low, max=high)


def _edges(limit: Constraint) -> list[Any]:
    """The values at the edges of a constraint: each word of a set, or each bound."""
    if limit.one_of is not None:
        return list(limit.one_of)
    return [edge for edge in (limit.min, limit.max) if edge is not None]


def _witnesses(claims: CapabilityClaims) -> list[tuple[str, dict[str, Any], str | None]]:
    """Calls built to satisfy each grant, one per edge of each constraint: where a widening
    would show, if there were one."""
    found = []
    for grant in claims.grants:
        base: dict[str, Any] = dict(grant.pins)
        for name, limit in grant.constraints.items():
            base.setdefault(name, _edges(limit)[0])
        found.append((grant.tool, base, claims.run_id))
        for name, limit in grant.constraints.items():
            if name not in grant.pins:
                found.extend(
                    (grant.tool, {**base, name: edge}, claims.run_id) for edge in _edges(limit)
                )
    return found


def _allowed(claims: CapabilityClaims, call: tuple[str, dict[str, Any], str | None]) -> bool:
    tool, arguments, run_id = call
    return isinstance(find_grant(claims, tool, arguments, run_id), Grant)


@PROPERTIES
@given(child=grants, parent=grants, arguments=calls)
def test_grant_within_is_sound(
    child: Grant, parent: Grant, arguments: tuple[str, dict[str, Any], str | None]
) -> None:
    """If a child grant is within its parent, every call it allows the parent allows too."""
    if grant_within(child, parent) is not None:
        return
    assert child.tool == parent.tool
    if grant_violation(child, arguments[1]) is None:
        assert grant_violation(parent, arguments[1]) is None


@PROPERTIES
@given(child=constraints(), parent=constraints(), value=argument_values)
def test_constraint_within_is_sound(child: Constraint, parent: Constraint, value: object) -> None:
    """A constraint within another admits no value the other refuses."""
    if not constraint_within(child, parent):
        return
    as_child = grant_violation(Grant("t", constraints={"a": child}), {"a": value})
    if as_child is None:
        assert grant_violation(Grant("t", constraints={"a": parent}), {"a": value}) is None


@PROPERTIES
@given(
    root_grants=st.lists(constrained_grants | grants, min_size=1, max_size=3),
    root_run=st.sampled_from((None, "r1")),
    data=st.data(),
    probes=st.lists(calls, min_size=10, max_size=25),
)
def test_no_sequence_of_attenuations_widens_authority(
    root_grants: list[Grant],
    root_run: str | None,
    data: st.DataObject,
    probes: list[tuple[str, dict[str, Any], str | None]],
) -> None:
    """Attenuate repeatedly with arbitrary requests: each child allows no call, no time, no
    run and no subject its parent did not, and names the whole chain."""
    root = _root(*root_grants, ttl=900, run_id=root_run)
    chain = [root]
    for step in range(data.draw(st.integers(1, 4), label="steps")):
        parent = chain[-1]
        asked = [
            data.draw(mutated(data.draw(st.sampled_from(parent.grants))))
            for _ in range(data.draw(st.integers(1, 2)))
        ]
        try:
            token = attenuate(
                parent,
                KEY,
                grants=asked,
                now=NOW + step,
                ttl_seconds=data.draw(st.integers(0, 1200)),
                run_id=data.draw(st.sampled_from((None, "r1", "r2"))),
            )
        except AttenuationError:
            continue
        child = _verify(token, now=NOW + step)
        assert child.subject == root.subject
        assert child.expires_at <= parent.expires_at
        assert child.parents == parent.lineage
        if parent.run_id is not None:
            assert child.run_id == parent.run_id
        chain.append(child)
    for probe in [*probes, *(w for claims in chain for w in _witnesses(claims))]:
        allowed = [_allowed(claims, probe) for claims in chain]
        for narrower, wider in zip(allowed[1:], allowed, strict=False):
            assert not narrower or wider, f"a child allowed {probe} its parent did not"
