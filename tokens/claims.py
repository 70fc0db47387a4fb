"""What a capability token says: the claim model and its strict reading from JSON.

A capability token carries who may act (``sub``), for whom (``aud``), when (``iat``, ``nbf``,
``exp``), on what (``grants``: tools, each optionally pinned to exact argument values and
bounded by argument constraints) and, for an attenuated token, whose narrowing it is
(``parent``: the ids of its ancestors).
Reading claims is deliberately stricter than JSON: a claim of the wrong type is refused rather
than coerced, because a coercion is a place where issuer and verifier can disagree about what
was granted. Identifiers are compared byte for byte and never normalised, for the same reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Final, NoReturn

from tokens.errors import TokenMalformedError

__all__ = [
    "ALGORITHM",
    "MAX_CONSTRAINT_VALUES",
    "MAX_PARENT_CHAIN",
    "MAX_TIMESTAMP",
    "MAX_TOKEN_BYTES",
    "TOKEN_TYPE",
    "CapabilityClaims",
    "Constraint",
    "Grant",
    "claims_from_payload",
    "is_printable_ascii",
    "load_json_object",
    "show_untrusted",
]

TOKEN_TYPE: Final = "proviso-cap+jwt"  # noqa: S105  (a media type, not a secret)
"""The JWS ``typ`` header of every capability token.

Verification requires it, so no other JWT signed by the same key (an identity token, say)
can be replayed as a capability token.
"""

ALGORITHM: Final = "EdDSA"
"""The only JWS algorithm ever issued or accepted (Ed25519 signatures)."""

MAX_TOKEN_BYTES: Final = 8192
"""Tokens longer than this are refused before any decoding, to bound the work an attacker
can make the verifier do."""

MAX_TIMESTAMP: Final = 2**33
"""The largest ``iat``/``nbf``/``exp`` accepted (the year 2242): anything larger is an error
or an attempt at a token that never expires."""

MAX_PARENT_CHAIN: Final = 8
"""The most ancestors an attenuated token may name in ``parent``: a bound on the revocation
look-up every use of it costs, and on how far authority can be handed down."""

MAX_CONSTRAINT_VALUES: Final = 64
"""The most values an ``in`` constraint may list."""

_GRANT_KEYS: Final = frozenset({"tool", "pins", "constraints"})
_CONSTRAINT_KEYS: Final = frozenset({"min", "max", "in"})
_DECIMAL_TEXT: Final = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")
_MAX_DECIMAL_CHARS: Final = 40


def show_untrusted(value: object, limit: int = 48) -> str:
    """Render untrusted ``value`` for a message, short enough not to flood a log line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def is_printable_ascii(value: str) -> bool:
    """Tell whether ``value`` consists only of printable ASCII (space through ``~``).

    Identifiers (the subject, tool names, pin names) are restricted to these characters so
    that two identifiers that look the same are the same: no look-alike Unicode, no
    normalisation forms, no control characters in logs.
    """
    return value.isascii() and value.isprintable()


def _identifier_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not value:
        return "must not be empty"
    if not is_printable_ascii(value):
        return "must be printable ASCII"
    return None


def _pins_problem(pins: Mapping[Any, Any]) -> tuple[str, str] | None:
    """Return ``(path suffix, problem)`` for the first bad pin, or ``None``."""
    for name, value in pins.items():
        problem = _identifier_problem(name)
        if problem is not None:
            return "", f"pin name {show_untrusted(name)} {problem}"
        if not isinstance(value, str):
            return f".{name}", f"must be a string, not {type(value).__name__}"
    return None


def _empty_pins() -> Mapping[str, str]:
    return MappingProxyType({})


def parse_decimal(text: object) -> Decimal:
    """Read a constraint bound: a plain decimal string such as ``"50"`` or ``"-0.25"``.

    Bounds are strings in the token, never JSON numbers, so that no verifier in any language
    reads them through a binary float. Exponents, leading zeros, ``+``, spaces, ``NaN`` and
    ``Infinity`` are refused, as is anything over 40 characters.

    Raises:
        ValueError: ``text`` is not such a string.
    """
    if (
        not isinstance(text, str)
        or len(text) > _MAX_DECIMAL_CHARS
        or _DECIMAL_TEXT.fullmatch(text) is None
    ):
        raise ValueError(
            f'must be a decimal string like "50" or "0.25", not {show_untrusted(text)}'
        )
    return Decimal(text)


def _bound(value: object, name: str) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"Constraint {name} must be a decimal, not bool")
    if isinstance(value, int):
        value = str(value)
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"Constraint {name} must be finite")
        value = format(value, "f")
    try:
        return parse_decimal(value)
    except ValueError as err:
        raise ValueError(f"Constraint {name} {err}") from None


def decimal_text(value: Decimal) -> str:
    """The canonical text of a bound, as it is written in a token (no exponent)."""
    return format(value, "f")


@dataclass(frozen=True, slots=True, init=False)
class Constraint:
    """A bound on one argument of a granted tool, checked exactly (no floats anywhere).

    Either numeric, with an inclusive ``min`` and/or ``max`` (``amount <= 50``), or a set,
    ``one_of`` (``currency in [USD, EUR]``; written ``"in"`` in the token). An argument a
    constraint names must be present, of the right kind (a number for bounds, a string for a
    set) and within it, or the call is out of scope. Constraints are data, not code: an
    issuer can only ever narrow a grant with them.

    Bounds are accepted as decimal strings, ints or finite ``Decimal`` values and kept as
    ``Decimal``; ``one_of`` as any iterable of distinct strings, kept sorted.

    Raises:
        ValueError: no bound and no set, a set together with a bound, ``min`` above ``max``,
            a bound that is not a plain decimal, or a set that is empty, too large, repeats a
            value or holds anything but strings.
    """

    min: Decimal | None
    max: Decimal | None
    one_of: tuple[str, ...] | None

    def __init__(
        self,
        *,
        min: str | int | Decimal | None = None,
        max: str | int | Decimal | None = None,
        one_of: Iterable[str] | None = None,
    ) -> None:
        low, high = _bound(min, "min"), _bound(max, "max")
        values: tuple[str, ...] | None = None
        if one_of is not None:
            if isinstance(one_of, str | bytes) or not isinstance(one_of, Iterable):
                raise ValueError("Constraint one_of must be a list of strings")
            items = list(one_of)
            if not all(isinstance(item, str) for item in items):
                raise ValueError("Constraint one_of must hold strings only")
            if not items:
                raise ValueError("Constraint one_of must not be empty")
            if len(items) > MAX_CONSTRAINT_VALUES:
                raise ValueError(
                    f"Constraint one_of holds more than {MAX_CONSTRAINT_VALUES} values"
                )
            if len(set(items)) != len(items):
                raise ValueError("Constraint one_of repeats a value")
            values = tuple(sorted(items))
        if low is None and high is None and values is None:
            raise ValueError("Constraint needs min, max or one_of")
        if values is not None and (low is not None or high is not None):
            raise ValueError("Constraint is either a set (one_of) or bounds (min/max), not both")
        if low is not None and high is not None and low > high:
            raise ValueError(f"Constraint min {low} is above max {high}")
        object.__setattr__(self, "min", low)
        object.__setattr__(self, "max", high)
        object.__setattr__(self, "one_of", values)

    def describe(self, argument: str) -> str:
        """The constraint in the notation people write it in: ``amount <= 50``."""
        if self.one_of is not None:
            return f"{argument} in [{', '.join(self.one_of)}]"
        parts = [argument]
        if self.min is not None:
            parts.insert(0, f"{decimal_text(self.min)} <=")
        if self.max is not None:
            parts.append(f"<= {decimal_text(self.max)}")
        return " ".join(parts)

    def to_claim(self) -> dict[str, Any]:
        """The JSON form of this constraint inside a grant's ``constraints``."""
        claim: dict[str, Any] = {}
        if self.min is not None:
            claim["min"] = decimal_text(self.min)
        if self.max is not None:
            claim["max"] = decimal_text(self.max)
        if self.one_of is not None:
            claim["in"] = list(self.one_of)
        return claim

    def __repr__(self) -> str:
        return f"Constraint({self.to_claim()!r})"


def _empty_constraints() -> Mapping[str, Constraint]:
    return MappingProxyType({})


def _constraints_problem(constraints: Mapping[Any, Any]) -> str | None:
    for name, value in constraints.items():
        problem = _identifier_problem(name)
        if problem is not None:
            return f"constraint name {show_untrusted(name)} {problem}"
        if not isinstance(value, Constraint):
            return f"constraint {name!r} must be a Constraint, not {type(value).__name__}"
    return None


@dataclass(frozen=True, slots=True)
class Grant:
    """Permission to call one tool, optionally only with exact or bounded argument values.

    ``pins`` maps an argument name to the value that argument must have, byte for byte (for
    example ``{"invoice_id": "in_93K2"}``); ``constraints`` maps an argument name to a
    :class:`Constraint` it must satisfy (for example ``{"amount": Constraint(max="50")}``).
    Both are stored as read-only copies, so a grant cannot be widened after it was issued or
    verified.

    Raises:
        ValueError: ``tool`` is empty or not printable ASCII, a pin or constraint name is
            empty or not printable ASCII, a pin value is not a string, or a constraint is not
            a ``Constraint``.
    """

    tool: str
    pins: Mapping[str, str] = field(default_factory=_empty_pins)
    constraints: Mapping[str, Constraint] = field(default_factory=_empty_constraints)

    def __post_init__(self) -> None:
        problem = _identifier_problem(self.tool)
        if problem is not None:
            raise ValueError(f"Grant tool {problem}")
        pins: object = self.pins  # typed as a Mapping, but callers are not type-checked
        if not isinstance(pins, Mapping):
            raise ValueError(f"Grant pins must be a mapping, not {type(pins).__name__}")
        pin_problem = _pins_problem(pins)
        if pin_problem is not None:
            raise ValueError(f"Grant pins{pin_problem[0]} {pin_problem[1]}")
        object.__setattr__(self, "pins", MappingProxyType(dict(self.pins)))
        constraints: object = self.constraints
        if not isinstance(constraints, Mapping):
            raise ValueError(
                f"Grant constraints must be a mapping, not {type(constraints).__name__}"
            )
        constraint_problem = _constraints_problem(constraints)
        if constraint_problem is not None:
            raise ValueError(f"Grant {constraint_problem}")
        object.__setattr__(self, "constraints", MappingProxyType(dict(self.constraints)))

    def __hash__(self) -> int:
        return hash((self.tool, frozenset(self.pins.items()), frozenset(self.constraints.items())))

    def __repr__(self) -> str:
        if not self.constraints:
            return f"Grant(tool={self.tool!r}, pins={dict(self.pins)!r})"
        return (
            f"Grant(tool={self.tool!r}, pins={dict(self.pins)!r}, "
            f"constraints={dict(self.constraints)!r})"
        )

    def to_claim(self) -> dict[str, Any]:
        """Return the JSON form of this grant as it appears in the ``grants`` claim.

        ``pins`` and ``constraints`` are omitted when empty, to keep tokens short;
        verification accepts both absent and empty ones.
        """
        claim: dict[str, Any] = {"tool": self.tool}
        if self.pins:
            claim["pins"] = dict(self.pins)
        if self.constraints:
            claim["constraints"] = {
                name: constraint.to_claim() for name, constraint in sorted(self.constraints.items())
            }
        return claim


@dataclass(frozen=True, slots=True)
class CapabilityClaims:
    """The claims of a verified capability token, plus the ``kid`` that verified it.

    Instances come from :func:`tokens.verify`; holding one means every check passed at the
    ``now`` given to it. ``parents`` lists the ids of the tokens this one was attenuated from,
    the root first; it is empty for a token minted directly.
    """

    issuer: str
    subject: str
    audience: str
    issued_at: int
    not_before: int
    expires_at: int
    token_id: str
    grants: tuple[Grant, ...]
    run_id: str | None = None
    key_id: str = ""
    parents: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "grants", tuple(self.grants))
        object.__setattr__(self, "parents", tuple(self.parents))

    @property
    def lineage(self) -> tuple[str, ...]:
        """This token's id and its ancestors' ids, root first: what revoking any one stops."""
        return (*self.parents, self.token_id)

    def grants_for(self, tool: str) -> tuple[Grant, ...]:
        """Return the grants for exactly ``tool`` (byte-exact, no case folding), in order.

        An empty tuple means the token does not grant the tool at all. Several grants for one
        tool mean the call is in scope if any of them matches.
        """
        return tuple(grant for grant in self.grants if grant.tool == tool)


def _malformed(where: str, problem: str) -> NoReturn:
    raise TokenMalformedError(f"{where} {problem}")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise TokenMalformedError(f"duplicate key {show_untrusted(key)}")
        result[key] = value
    return result


def _reject_constant(name: str) -> NoReturn:
    raise TokenMalformedError(f"non-standard JSON constant {name}")


def load_json_object(data: bytes, part: str) -> dict[str, Any]:
    """Parse one decoded JWS segment as a JSON object, refusing anything ambiguous.

    Duplicate keys are refused (the first and the last occurrence would otherwise be read
    differently by different parsers), as are ``NaN``/``Infinity``, non-UTF-8 bytes and any
    top-level value other than an object.

    Raises:
        TokenMalformedError: ``data`` is not exactly one JSON object; the message names
            ``part`` (``header`` or ``payload``).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenMalformedError(f"{part} is not UTF-8") from None
    try:
        value = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except TokenMalformedError as err:
        raise TokenMalformedError(f"{part}: {err.message}") from None
    except json.JSONDecodeError as err:
        raise TokenMalformedError(f"{part} is not JSON ({err.msg})") from None
    except ValueError:
        # An integer literal longer than Python's int_max_str_digits.
        raise TokenMalformedError(f"{part} holds a number too long to read") from None
    except RecursionError:
        raise TokenMalformedError(f"{part} is nested too deeply") from None
    if not isinstance(value, dict):
        raise TokenMalformedError(f"{part} must be a JSON object")
    return value


def _required(payload: Mapping[str, Any], name: str) -> Any:
    if name not in payload:
        _malformed(f"claim {name!r}", "is missing")
    return payload[name]


def _string_claim(payload: Mapping[str, Any], name: str) -> str:
    value = _required(payload, name)
    if not isinstance(value, str):
        _malformed(f"claim {name!r}", f"must be a string, not {type(value).__name__}")
    if not value:
        _malformed(f"claim {name!r}", "must not be empty")
    return value


def _identifier_claim(payload: Mapping[str, Any], name: str) -> str:
    value = _required(payload, name)
    problem = _identifier_problem(value)
    if problem is not None:
        _malformed(f"claim {name!r}", problem)
    return str(value)


def _time_claim(payload: Mapping[str, Any], name: str) -> int:
    value = _required(payload, name)
    # bool is a subclass of int in Python but not a number in JSON: refuse it explicitly.
    if isinstance(value, bool) or not isinstance(value, int):
        _malformed(f"claim {name!r}", f"must be an integer, not {type(value).__name__}")
    if not 0 <= value <= MAX_TIMESTAMP:
        _malformed(f"claim {name!r}", f"must be between 0 and {MAX_TIMESTAMP}")
    return value


def grant_from_claim(value: object, index: int = 0) -> Grant:
    """A grant from its claim form (``Grant.to_claim``), parsed as strictly as in a token.

    Raises:
        TokenMalformedError: the value is not a well-formed grant claim.
    """
    return _grant_claim(value, index)


def _grant_claim(value: object, index: int) -> Grant:
    where = f"claim 'grants[{index}]'"
    if not isinstance(value, dict):
        _malformed(where, f"must be an object, not {type(value).__name__}")
    unknown = sorted(set(value) - _GRANT_KEYS)
    if unknown:
        # Unknown grant members are refused, not ignored: an ignored restriction would
        # silently widen what the token allows.
        _malformed(where, f"has unknown member {show_untrusted(unknown[0])}")
    if "tool" not in value:
        _malformed(f"claim 'grants[{index}].tool'", "is missing")
    tool_problem = _identifier_problem(value["tool"])
    if tool_problem is not None:
        _malformed(f"claim 'grants[{index}].tool'", tool_problem)
    pins = value.get("pins", {})
    if not isinstance(pins, dict):
        _malformed(f"claim 'grants[{index}].pins'", f"must be an object, not {type(pins).__name__}")
    pin_problem = _pins_problem(pins)
    if pin_problem is not None:
        _malformed(f"claim 'grants[{index}].pins{pin_problem[0]}'", pin_problem[1])
    constraints = _constraints_claim(value.get("constraints", {}), index)
    return Grant(tool=value["tool"], pins=pins, constraints=constraints)


def _constraints_claim(value: object, index: int) -> dict[str, Constraint]:
    where = f"claim 'grants[{index}].constraints"
    if not isinstance(value, dict):
        _malformed(f"{where}'", f"must be an object, not {type(value).__name__}")
    result: dict[str, Constraint] = {}
    for name, body in value.items():
        problem = _identifier_problem(name)
        if problem is not None:
            _malformed(f"{where}'", f"constraint name {show_untrusted(name)} {problem}")
        result[name] = _constraint_claim(body, f"{where}.{name}'")
    return result


def _constraint_claim(body: object, where: str) -> Constraint:
    if not isinstance(body, dict):
        _malformed(where, f"must be an object, not {type(body).__name__}")
    unknown = sorted(set(body) - _CONSTRAINT_KEYS)
    if unknown:
        # An operator this verifier does not know could only have narrowed the grant;
        # ignoring it would widen it, so the token is refused.
        _malformed(where, f"has unknown member {show_untrusted(unknown[0])}")
    for bound in ("min", "max"):
        if bound in body:
            try:
                parse_decimal(body[bound])
            except ValueError as err:
                _malformed(f"{where[:-1]}.{bound}'", str(err))
    values = body.get("in")
    if "in" in body and not isinstance(values, list):
        _malformed(f"{where[:-1]}.in'", f"must be a list, not {type(values).__name__}")
    try:
        return Constraint(min=body.get("min"), max=body.get("max"), one_of=values)
    except ValueError as err:
        _malformed(where, str(err).removeprefix("Constraint "))


def _grants_claim(payload: Mapping[str, Any]) -> tuple[Grant, ...]:
    value = _required(payload, "grants")
    if not isinstance(value, list):
        _malformed("claim 'grants'", f"must be a list, not {type(value).__name__}")
    if not value:
        _malformed("claim 'grants'", "must not be empty")
    return tuple(_grant_claim(item, index) for index, item in enumerate(value))


def claims_from_payload(payload: Mapping[str, Any], *, key_id: str) -> CapabilityClaims:
    """Read the claims of a signature-checked payload, strictly typed.

    Only the types and internal consistency are checked here; whether the issuer, audience
    and time window are acceptable is the verifier's business. Claims this version does not
    know are ignored, so newer issuers keep working with older verifiers; unknown members
    *inside a grant or a constraint* are refused instead, because there ignoring a
    restriction would widen the grant.

    Raises:
        TokenMalformedError: a required claim is missing or has the wrong type or range; the
            message names the claim.
    """
    issuer = _string_claim(payload, "iss")
    subject = _identifier_claim(payload, "sub")
    audience = _string_claim(payload, "aud")
    token_id = _string_claim(payload, "jti")
    issued_at = _time_claim(payload, "iat")
    not_before = _time_claim(payload, "nbf")
    expires_at = _time_claim(payload, "exp")
    if expires_at <= not_before:
        _malformed("claim 'exp'", "must be after 'nbf'")
    grants = _grants_claim(payload)
    run_id: str | None = None
    if "run_id" in payload:
        run_id = _string_claim(payload, "run_id")
    parents = _parent_claim(payload, token_id)
    return CapabilityClaims(
        issuer=issuer,
        subject=subject,
        audience=audience,
        issued_at=issued_at,
        not_before=not_before,
        expires_at=expires_at,
        token_id=token_id,
        grants=grants,
        run_id=run_id,
        key_id=key_id,
        parents=parents,
    )


def _parent_claim(payload: Mapping[str, Any], token_id: str) -> tuple[str, ...]:
    if "parent" not in payload:
        return ()
    value = payload["parent"]
    if not isinstance(value, list):
        _malformed("claim 'parent'", f"must be a list, not {type(value).__name__}")
    if not value:
        _malformed("claim 'parent'", "must not be empty")
    if len(value) > MAX_PARENT_CHAIN:
        _malformed("claim 'parent'", f"names more than {MAX_PARENT_CHAIN} ancestors")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item:
            _malformed(f"claim 'parent[{index}]'", "must be a non-empty string")
    if len(set(value)) != len(value) or token_id in value:
        _malformed("claim 'parent'", "repeats a token id")
    return tuple(value)
