"""JSON Schemas of tool arguments: checked once at load, applied per call with JSON-pointer paths.

Arguments arrive parsed with ``Decimal`` numbers (so ``multipleOf: 0.01`` is exact), and the
schemas' own numbers are converted to ``Decimal`` at compile time for the same reason. A ``$ref``
may only point inside the schema: nothing is ever fetched.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Context, Decimal, localcontext
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError
from referencing import Registry


def _is_integer(checker: object, instance: object) -> bool:
    """2020-12: an integer is any number with a zero fractional part (2.0 included)."""
    if isinstance(instance, bool):
        return False
    if isinstance(instance, int):
        return True
    if isinstance(instance, Decimal):
        return instance.is_finite() and instance == instance.to_integral_value()
    return isinstance(instance, float) and instance.is_integer()


def ecma_pattern(pattern: str) -> str:
    """A Python regex whose ``$`` means what it means in JSON Schema (ECMA-262): the end.

    Python's ``$`` also matches before a final newline, so ``"in_93K2\n"`` would pass
    ``^in_[A-Za-z0-9]+$``. Every ``$`` outside a character class and not escaped becomes
    ``\\Z``.
    """
    out: list[str] = []
    escaped = in_class = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "$":
            out.append(r"\Z")
            continue
        out.append(char)
    return "".join(out)


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(ecma_pattern(pattern))


def ecma_pattern_keyword(
    validator: Any, pattern: str, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    """The ``pattern`` keyword with ECMA-262 anchors (see ``ecma_pattern``)."""
    if validator.is_type(instance, "string") and not _compiled(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


# Arithmetic for multipleOf and bounds on numbers with up to 64-digit exponents, exactly.
_PRECISE = Context(prec=256)
_TYPE_CHECKER = Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer)
_Validator: Any = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, {"pattern": ecma_pattern_keyword}, type_checker=_TYPE_CHECKER
)
# An empty registry whose default retrieval fails: a remote $ref is never fetched.
_REGISTRY: Registry[Any] = Registry()


class ArgumentSchemaError(ValueError):
    """The schema itself is invalid; ``path`` is a JSON pointer into the schema."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(f"{path or '/'}: {message}")
        self.message = message
        self.path = path


@dataclass(frozen=True, slots=True)
class SchemaViolation:
    """One way the arguments fail their schema. ``pointer`` is an RFC 6901 JSON pointer."""

    pointer: str
    message: str


def _decimals(value: Any) -> Any:
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, dict):
        return {k: _decimals(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decimals(v) for v in value]
    return value


def _escape(token: object) -> str:
    return str(token).replace("~", "~0").replace("/", "~1")


def _pointer(path: object) -> str:
    return "".join(f"/{_escape(part)}" for part in path)  # type: ignore[attr-defined]


def _violation(error: ValidationError) -> SchemaViolation:
    """Point at the field the error is about, and describe it without Python reprs."""
    pointer = _pointer(error.absolute_path)
    keyword = error.validator
    expected: Any = error.validator_value
    instance: Any = error.instance
    if keyword == "required":
        missing = next((name for name in expected if name not in instance), "")
        return SchemaViolation(f"{pointer}/{_escape(missing)}", f"'{missing}' is required")
    if keyword in ("additionalProperties", "unevaluatedProperties"):
        schema: Any = error.schema
        extras = sorted(set(instance) - set(schema.get("properties", {})))
        extra = extras[0] if extras else ""
        return SchemaViolation(f"{pointer}/{_escape(extra)}", f"'{extra}' is not allowed")
    return SchemaViolation(pointer, _describe(str(keyword), expected))


_MESSAGES = {
    "type": "must be of type {}",
    "multipleOf": "must be a multiple of {}",
    "minimum": "must be >= {}",
    "maximum": "must be <= {}",
    "exclusiveMinimum": "must be > {}",
    "exclusiveMaximum": "must be < {}",
    "const": "must be {}",
    "minLength": "must be at least {} characters long",
    "maxLength": "must be at most {} characters long",
    "pattern": "must match the pattern {}",
    "format": "must be a valid {}",
    "minItems": "must have at least {} items",
    "maxItems": "must have at most {} items",
}


def _describe(keyword: str, expected: Any) -> str:
    if keyword == "enum":
        return "must be one of " + ", ".join(str(v) for v in expected)
    template = _MESSAGES.get(keyword)
    return template.format(expected) if template else f"fails the '{keyword}' constraint"


class ArgumentSchema:
    """A compiled argument schema for one tool."""

    __slots__ = ("_validator", "document")

    def __init__(self, document: Mapping[str, Any]) -> None:
        """Check and compile ``document``.

        Raises:
            ArgumentSchemaError: the document is not a valid Draft 2020-12 schema.
        """
        self.document = dict(document)
        try:
            _Validator.check_schema(self.document)
        except SchemaError as exc:
            raise ArgumentSchemaError(exc.message, _pointer(exc.absolute_path)) from None
        self._validator = _Validator(_decimals(self.document), registry=_REGISTRY)

    def validate(self, arguments: Mapping[str, Any]) -> tuple[SchemaViolation, ...]:
        """Every violation, sorted by pointer; empty when the arguments are valid."""
        try:
            with localcontext(_PRECISE):
                errors = list(self._validator.iter_errors(arguments))
        except Exception as exc:
            return (SchemaViolation("", f"schema could not be applied: {type(exc).__name__}"),)
        return tuple(sorted({_violation(e) for e in errors}, key=lambda v: (v.pointer, v.message)))
