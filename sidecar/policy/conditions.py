"""CEL conditions: compiled once per policy, evaluated per call, failing closed.

Conditions see four variables, each a map from string to any value: ``args`` (the call's
arguments), ``agent`` (``id``, ``roles``), ``token`` (``id``, ``issuer``, ``run_id``) and
``context`` (facts the calling runtime vouches for). JSON decimals reach CEL as doubles, and
only when the double stands for exactly that decimal; a NUL in a string fails every condition
that reads its variable. A call binds only the variables its tool's conditions read.
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
_ENVS_WITHOUT = {name: _env(tuple(n for n in VARIABLES if n != name)) for name in VARIABLES}
"""For each call variable, an environment without it: a condition that no longer compiles
there reads that variable (CEL's own checker decides, so a comprehension's ``agent`` or the
string "agent" does not count)."""
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
_NUL = "a string holds U+0000 (NUL), which CEL cuts short"


def _to_cel(value: Any) -> Any:
    """Convert parsed JSON (with Decimal numbers) into values CEL reads exactly as given.

    Raises:
        _NotRepresentableError: a string (or key) holds a NUL, which CEL would cut the string
            at; or a decimal has more digits than a double tells apart.
    """
    kind = type(value)
    if kind is str:
        if "\x00" in value:
            raise _NotRepresentableError(_NUL)
        return value
    if kind in _SCALARS:
        return value
    if kind is Decimal:
        return _double(value)
    if kind is dict:
        return _dict_to_cel(value)
    if isinstance(value, Mapping):
        return {_to_cel(k): _to_cel(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_cel(v) for v in value]
    if isinstance(value, str):  # a subclass (a StrEnum): checked as the plain string
        return _to_cel(str.__str__(value))
    if isinstance(value, Decimal):
        return _double(value)
    return value


def _dict_to_cel(value: dict[Any, Any]) -> dict[Any, Any]:
    """``_to_cel`` of a plain dict, with string keys and leaves handled here (the usual case):
    a call per leaf was most of binding's cost."""
    converted = {}
    for key, item in value.items():
        name = key if type(key) is str and "\x00" not in key else _to_cel(key)
        kind = type(item)
        if kind is str:
            if "\x00" in item:
                raise _NotRepresentableError(_NUL)
            converted[name] = item
        elif kind in _SCALARS:
            converted[name] = item
        else:
            converted[name] = _to_cel(item)
    return converted


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
    """Bind all of a call's variables for evaluation."""
    return bind_variables({"args": args, "agent": agent, "token": token, "context": context})


def bind_variables(values: Mapping[str, Mapping[str, Any]]) -> Bindings:
    """Bind some of a call's variables (``VARIABLES``), those the conditions to evaluate read.

    A condition that reads a variable left out fails to evaluate: it never passes.
    """
    try:
        data = {name: _to_cel(value) for name, value in values.items()}
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

    __slots__ = ("_expression", "source", "variables")

    def __init__(self, source: str, *, approver: bool = False) -> None:
        """Compile ``source`` over the call's variables (or, with ``approver``, the approver's).

        ``variables`` are the call variables the expression reads (empty for an approver's).

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
        self.variables = frozenset(
            ()
            if approver
            else (n for n, env in _ENVS_WITHOUT.items() if not _compiles(env, source))
        )

    def evaluate(self, bindings: Bindings) -> bool:
        """True if the condition holds.

        Raises:
            ConditionEvaluationError: evaluation failed or did not yield a boolean. Callers
                must treat this as "cannot decide", never as false.
        """
        if bindings.problem:
            raise ConditionEvaluationError(bindings.problem)
        try:
            result = self._expression.eval(bindings._activation)
        except RuntimeError as exc:  # CEL's own limits (its comprehension iteration budget)
            raise ConditionEvaluationError(str(exc)) from None
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


def _compiles(env: Any, source: str) -> bool:
    try:
        env.compile(source)
    except RuntimeError:
        return False
    return True


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
