"""CEL conditions see exactly the values the tool receives, or fail: never a near value."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from sidecar.policy.conditions import (
    Condition,
    ConditionEvaluationError,
    bind,
    bind_approver,
    bind_variables,
)


def _holds(source: str, args: dict[str, Any], context: dict[str, Any] | None = None) -> bool:
    return Condition(source).evaluate(bind(args, {"id": "a", "roles": []}, {}, context or {}))


@pytest.mark.parametrize(
    ("amount", "expected"),
    [("50", True), ("50.00", True), ("49.99", True), ("50.01", False), ("-0", True),
     ("0.1", True), ("123456789012345", False), ("1E+60", False), ("1E-60", True)],
)  # fmt: skip
def test_decimals_of_up_to_15_digits_compare_as_decimals(amount: str, expected: bool) -> None:
    """Decimals that a double holds exactly (as its shortest form) compare as written."""
    assert _holds("args.amount <= 50.0", {"amount": Decimal(amount)}) is expected


@pytest.mark.parametrize(
    "amount", ["50.0000000000000001", "1234567890123456.7", "0.1" + "0" * 20 + "1"]
)
def test_a_decimal_with_more_digits_than_a_double_fails_the_condition(amount: str) -> None:
    """50.0000000000000001 would be 50.0 as a double and pass '<= 50': the condition fails."""
    with pytest.raises(ConditionEvaluationError, match="more digits than"):
        _holds("args.amount <= 50.0", {"amount": Decimal(amount)})


@pytest.mark.parametrize(
    ("args", "context"),
    [
        ({"s": "ok\x004111111111111111"}, {}),
        ({"list": ["a", "b\x00"]}, {}),
        ({"nested": {"k\x00": 1}}, {}),
        ({}, {"amount_due\x00x": 1}),
    ],
)
def test_a_nul_anywhere_in_the_bound_variables_fails_every_condition(
    args: dict[str, Any], context: dict[str, Any]
) -> None:
    """CEL cuts a string at a NUL ('ok\\0card' would read 'ok'): the condition fails instead.

    ``bind`` binds all four variables, so even ``true`` fails.
    """
    with pytest.raises(ConditionEvaluationError, match="NUL"):
        _holds("true", args, context)


def test_a_nul_in_an_approvers_claims_fails_the_approver_condition() -> None:
    """Approver conditions are bound the same way."""
    bindings = bind_approver({"subject": "alice\x00", "groups": []}, {"agent": "a"})
    with pytest.raises(ConditionEvaluationError, match="NUL"):
        Condition("approver.subject != request.agent", approver=True).evaluate(bindings)


def test_strings_and_numbers_reach_cel_unchanged() -> None:
    """The usual values pass through: strings, ints, bools, nulls, lists and maps."""
    args = {"s": "in_93K2", "n": 3, "b": True, "z": None, "l": [1, "x"], "m": {"k": "v"}}
    assert _holds(
        'args.s == "in_93K2" && args.n == 3 && args.b && args.z == null'
        ' && args.l[1] == "x" && args.m.k == "v"',
        args,
    )


@pytest.mark.parametrize(
    ("source", "variables"),
    [
        ("args.amount <= context.invoice.amount_due", {"args", "context"}),
        ('agent.id == "a" || token.run_id == ""', {"agent", "token"}),
        ('"agent" in args', {"args"}),  # a string is not a reference
        ("[1].exists(agent, agent == 1)", set()),  # nor is a comprehension's own variable
        ('.token.id == "t"', {"token"}),
        ("has(context.region)", {"context"}),
        ("true", set()),
    ],
)
def test_a_condition_knows_the_variables_it_reads(source: str, variables: set[str]) -> None:
    """CEL's checker says which variables an expression reads: only those need binding."""
    assert Condition(source).variables == variables


def test_a_condition_reading_a_variable_left_unbound_fails() -> None:
    """Binding only some variables can never make a condition that reads another one pass."""
    with pytest.raises(ConditionEvaluationError):
        Condition('!has(context.x) || context.x == ""').evaluate(bind_variables({"args": {}}))


def test_a_condition_over_its_iteration_budget_fails_like_any_other() -> None:
    """CEL stops a comprehension after 10,000 iterations by raising, not with an error value:
    the caller chose the list (20 KiB of ``0,``), so the condition must fail as one that cannot
    be evaluated (RULE_FAILED, CONDITION_ERROR), not escape the engine as an internal error."""
    condition = Condition("args.tags.all(t, t < 20)")
    assert condition.evaluate(bind({"tags": [0] * 9_999}, {}, {}, {}))
    with pytest.raises(ConditionEvaluationError, match="budget"):
        condition.evaluate(bind({"tags": [0] * 10_000}, {}, {}, {}))
