"""CEL conditions: compiled once per policy, evaluated per call, failing closed.

Conditions see four variables, each a map from string to any value: ``args`` (the call's
arguments), ``agent`` (``id``, ``roles``), ``token`` (``id``, ``issuer``, ``run_id``) and
``context`` (facts the calling runtime vouches for). JSON decimals reach CEL as doubles, and
only when the double stands for exactly that decimal; a NUL in a string fails every condition.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from cel_expr_python import cel

VARIABLES = ("args", "agent", "token", "context")

APPROVER_VARIABLES = ("approver", "request")
"""Approver conditions see the person (subject, groups, claims) and the request (agent, tool,
args, run_id, tier)."""


def _env(names: tuple[str, ...]) -> Any:
    return cel.NewEnv(variables={n: cel.Type.Map(cel.Type.STRING, cel.Type.DYN) for n in names})


_ENV = _env(VARIABLES)
_APPROVER_ENV = _env(APPROVER_VARIABLES)
_POSITION_RE = re.compile(r"<input>:(\d+):(\d+): (.*)")


class ConditionCompileError(ValueError):
    """A CEL expression does not parse or type-check; line/col are inside the expression."""

    def __init__(self, message: str, line: int, col: int) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.col = col


class ConditionEvaluationError(ValueError):
    """A condition could not be evaluated for these inputs (missing field, type mismatch)."""


class Bindings:
    """The variables of one evaluation, bound once and shared by every condition of a call.

    ``problem`` says why the values could not be handed to CEL faithfully; every condition
    evaluated on such bindings then fails (never passes) with that message.
    """

    __slots__ = ("_activation", "problem")

    def __init__(self, activation: Any, problem: str = "") -> None:
        self._activation = activation
        self.problem = problem


class _NotRepresentableError(ValueError):
    """A value CEL would see differently from what the tool receives."""


_SCALARS = frozenset({bool, int, float, type(None)})
"""Types CEL takes as they are (an int beyond 64 bits is CEL's own evaluation error)."""


def _to_cel(value: Any) -> Any:
    """Convert parsed JSON (with Decimal numbers) into values CEL reads exactly as given.

    Raises:
        _NotRepresentableError: a string (or key) holds a NUL, which CEL would cut the string
            at; or a decimal has more digits than a double tells apart.
    """
    kind = type(value)
    if kind is str:
        if "\x00" in value:
            raise _NotRepresentableError("a string holds U+0000 (NUL), which CEL cuts short")
        return value
    if kind in _SCALARS:
        return value
    if kind is Decimal:
        return _double(value)
    if isinstance(value, Mapping):
        return {_to_cel(k): _to_cel(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_cel(v) for v in value]
    if isinstance(value, str):  # a subclass (a StrEnum): checked as the plain string
        return _to_cel(str.__str__(value))
    if isinstance(value, Decimal):
        return _double(value)
    return value


def _double(value: Decimal) -> float:
    """The double CEL compares ``value`` as, when it stands for exactly this decimal.

    A decimal whose nearest double prints back as itself (any of up to 15 significant digits)
    orders against every such literal as the decimal does; one with more digits could not be
    told from its neighbours (50.0000000000000001 would pass ``<= 50``), so it is refused.
    """
    number = float(value)
    if Decimal(repr(number)) != value:
        raise _NotRepresentableError(
            f"the number {value} has more digits than CEL's double can hold exactly"
        )
    return number


def bind(
    args: Mapping[str, Any],
    agent: Mapping[str, Any],
    token: Mapping[str, Any],
    context: Mapping[str, Any],
) -> Bindings:
    """Bind a call's variables for evaluation."""
    try:
        data = {
            "args": _to_cel(args),
            "agent": _to_cel(agent),
            "token": _to_cel(token),
            "context": _to_cel(context),
        }
    except _NotRepresentableError as exc:
        return Bindings(None, str(exc))
    return Bindings(_ENV.Activation(data))


def bind_approver(approver: Mapping[str, Any], request: Mapping[str, Any]) -> Bindings:
    """Bind an approver condition's variables."""
    try:
        data = {"approver": _to_cel(approver), "request": _to_cel(request)}
    except _NotRepresentableError as exc:
        return Bindings(None, str(exc))
    return Bindings(_APPROVER_ENV.Activation(data))


class Condition:
    """A compiled boolean CEL expression."""

    __slots__ = ("_expression", "source")

    def __init__(self, source: str, *, approver: bool = False) -> None:
        """Compile ``source`` over the call's variables (or, with ``approver``, the approver's).

        Raises:
            ConditionCompileError: it does not parse, does not type-check, or is not boolean.
        """
        self.source = source
        try:
            expression = (_APPROVER_ENV if approver else _ENV).compile(source)
        except RuntimeError as exc:
            raise _compile_error(str(exc)) from None
        result_type = expression.return_type()
        if result_type not in (cel.Type.BOOL, cel.Type.DYN):
            raise ConditionCompileError(
                f"condition must be boolean, but its type is {result_type.name().lower()}", 1, 1
            )
        self._expression = expression

    def evaluate(self, bindings: Bindings) -> bool:
        """True if the condition holds.

        Raises:
            ConditionEvaluationError: evaluation failed or did not yield a boolean. Callers
                must treat this as "cannot decide", never as false.
        """
        if bindings.problem:
            raise ConditionEvaluationError(bindings.problem)
        result = self._expression.eval(bindings._activation)
        value = result.value()
        if isinstance(value, bool):
            return value
        if result.type() == cel.Type.ERROR:
            raise ConditionEvaluationError(str(value))
        raise ConditionEvaluationError(
            f"condition yielded {result.type().name().lower()}, not bool"
        )

    def __repr__(self) -> str:
        return f"Condition({self.source!r})"


def _compile_error(text: str) -> ConditionCompileError:
    """Turn cel's multi-line error text into a message with a position inside the expression."""
    for line in text.splitlines():
        match = _POSITION_RE.search(line)
        if match:
            return ConditionCompileError(
                match.group(3).strip(), int(match.group(1)), int(match.group(2))
            )
    first = text.splitlines()[0] if text else "invalid expression"
    return ConditionCompileError(first, 1, 1)
