"""Whether a verified token allows one call: the tool, the run, every pin and constraint.

This is step 3 of a Check (DESIGN.md section 2), kept here so that the sidecar and a tool
backend verifying offline apply exactly the same rule. Nothing here reads a clock, a file or
the network, and no argument value is ever coerced: a pinned argument must be that string, a
bounded argument a number within the bounds (compared as exact decimals), a set-constrained
argument one of the strings of the set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any

from tokens.claims import CapabilityClaims, Constraint, Grant, decimal_text, show_untrusted

__all__ = ["ScopeViolation", "ViolationKind", "argument_number", "find_grant", "grant_violation"]


class ViolationKind(StrEnum):
    """What a call got wrong: the run it belongs to, the tool, or an argument."""

    RUN = "run"
    TOOL = "tool"
    ARGUMENT = "argument"


@dataclass(frozen=True, slots=True)
class ScopeViolation:
    """Why a call is out of the token's scope; ``argument`` is set for ``ARGUMENT`` only."""

    kind: ViolationKind
    message: str
    argument: str = ""


def argument_number(value: object) -> Decimal | None:
    """The exact value of a numeric argument, or ``None`` when it is not a finite number.

    ``int`` and ``Decimal`` are taken as they are; a ``float`` is read through its shortest
    ``repr`` (``49.99`` is 49.99, the JSON text it was parsed from); ``bool`` is not a
    number. Parse JSON with ``parse_float=Decimal`` to keep every digit the caller sent.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, Decimal):
        return value if value.is_finite() else None
    if isinstance(value, float):
        return Decimal(repr(value)) if math.isfinite(value) else None
    return None


def _constraint_violation(name: str, constraint: Constraint, value: object) -> str | None:
    described = constraint.describe(name)
    if value is _ABSENT:
        return f"argument '{name}' is missing; the token's constraint {described} needs it"
    if constraint.one_of is not None:
        if isinstance(value, str) and value in constraint.one_of:
            return None
        shown = show_untrusted(value)
        return f"argument '{name}' is {shown}, outside the token's constraint {described}"
    number = argument_number(value)
    if number is None:
        return f"argument '{name}' must be a number within the token's constraint {described}"
    if (constraint.min is not None and number < constraint.min) or (
        constraint.max is not None and number > constraint.max
    ):
        return (
            f"argument '{name}' is {decimal_text(number)}, outside the token's constraint "
            f"{described}"
        )
    return None


_ABSENT: Any = object()


def grant_violation(grant: Grant, arguments: Mapping[str, Any]) -> ScopeViolation | None:
    """The first pin or constraint of ``grant`` that ``arguments`` break, by argument name.

    Pins are checked before constraints, each in name order, so the answer is deterministic.
    """
    for name, pinned in sorted(grant.pins.items()):
        value = arguments.get(name)
        if not isinstance(value, str) or value != pinned:
            return ScopeViolation(
                ViolationKind.ARGUMENT,
                f"argument '{name}' must be '{pinned}': the token pins it",
                name,
            )
    for name, constraint in sorted(grant.constraints.items()):
        problem = _constraint_violation(name, constraint, arguments.get(name, _ABSENT))
        if problem is not None:
            return ScopeViolation(ViolationKind.ARGUMENT, problem, name)
    return None


def find_grant(
    claims: CapabilityClaims, tool: str, arguments: Mapping[str, Any], run_id: str | None
) -> Grant | ScopeViolation:
    """The first grant of ``claims`` that allows calling ``tool`` with ``arguments``.

    A token bound to a run only serves that run (``run_id`` of ``None`` or ``""`` is no run).
    When several grants name the tool, any one suffices; when none does, the violation of the
    first one is returned, so the message names a pin or constraint the caller can act on.

    Warning:
        ``claims`` must come from :func:`tokens.verify`; this function trusts them as given.
    """
    if claims.run_id is not None and (run_id or None) != claims.run_id:
        return ScopeViolation(ViolationKind.RUN, f"the token is bound to run '{claims.run_id}'")
    grants = claims.grants_for(tool)
    if not grants:
        return ScopeViolation(ViolationKind.TOOL, f"the token does not grant tool '{tool}'")
    violations: list[ScopeViolation] = []
    for grant in grants:
        violation = grant_violation(grant, arguments)
        if violation is None:
            return grant
        violations.append(violation)
    return violations[0]
