"""What a capability token says: the claim model and its strict reading from JSON.

A capability token carries who may act (``sub``), for whom (``aud``), when (``iat``, ``nbf``,
``exp``) and on what (``grants``: tools, each optionally pinned to exact argument values).
Reading claims is deliberately stricter than JSON: a claim of the wrong type is refused rather
than coerced, because a coercion is a place where issuer and verifier can disagree about what
was granted. Identifiers are compared byte for byte and never normalised, for the same reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, NoReturn

from tokens.errors import TokenMalformedError

__all__ = [
    "ALGORITHM",
    "MAX_TIMESTAMP",
    "MAX_TOKEN_BYTES",
    "TOKEN_TYPE",
    "CapabilityClaims",
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

_GRANT_KEYS: Final = frozenset({"tool", "pins"})


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


@dataclass(frozen=True, slots=True)
class Grant:
    """Permission to call one tool, optionally only with exact argument values.

    ``pins`` maps an argument name to the value that argument must have, byte for byte (for
    example ``{"invoice_id": "in_93K2"}``). It is stored as a read-only copy, so a grant
    cannot be widened after it was issued or verified.

    Raises:
        ValueError: ``tool`` is empty or not printable ASCII, a pin name is empty or not
            printable ASCII, or a pin value is not a string.
    """

    tool: str
    pins: Mapping[str, str] = field(default_factory=_empty_pins)

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

    def __hash__(self) -> int:
        return hash((self.tool, frozenset(self.pins.items())))

    def __repr__(self) -> str:
        return f"Grant(tool={self.tool!r}, pins={dict(self.pins)!r})"

    def to_claim(self) -> dict[str, Any]:
        """Return the JSON form of this grant as it appears in the ``grants`` claim.

        ``pins`` is omitted when empty, to keep tokens short; verification accepts both an
        absent and an empty ``pins``.
        """
        claim: dict[str, Any] = {"tool": self.tool}
        if self.pins:
            claim["pins"] = dict(self.pins)
        return claim


@dataclass(frozen=True, slots=True)
class CapabilityClaims:
    """The claims of a verified capability token, plus the ``kid`` that verified it.

    Instances come from :func:`tokens.verify`; holding one means every check passed at the
    ``now`` given to it.
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "grants", tuple(self.grants))

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
    return Grant(tool=value["tool"], pins=pins)


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
    know (a future ``parent``, say) are ignored, so newer issuers keep working with older
    verifiers; unknown members *inside a grant* are refused instead, because there ignoring
    a restriction would widen the grant.

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
    )
