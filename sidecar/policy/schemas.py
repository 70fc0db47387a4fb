"""JSON Schemas of tool arguments: checked once at load, applied per call with JSON-pointer paths.

Arguments arrive parsed with ``Decimal`` numbers (so ``multipleOf: 0.01`` is exact), and the
schemas' own numbers are converted to ``Decimal`` at compile time for the same reason. A ``$ref``
may only point inside the schema: nothing is ever fetched.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Context, Decimal, localcontext
from itertools import islice
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError
from referencing import Registry

from sidecar import strictjson


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


def unique_items_keyword(
    validator: Any, unique: bool, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    """``uniqueItems`` in linear time: items are equal when their canonical JSON is (1 and 1.0
    are, true and 1 are not, as JSON Schema says). jsonschema compares every pair of items it
    cannot sort, so ~10,000 mixed items in one call stalled the event loop for seconds."""
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[str] = set()
    for item in instance:
        key = strictjson.canonical(item)
        if key in seen:
            yield ValidationError("has non-unique elements")
            return
        seen.add(key)


# Arithmetic for multipleOf and bounds on numbers with up to 64-digit exponents, exactly.
_PRECISE = Context(prec=256)
_TYPE_CHECKER = Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer)
_Validator: Any = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    {"pattern": ecma_pattern_keyword, "uniqueItems": unique_items_keyword},
    type_checker=_TYPE_CHECKER,
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


def _violations(error: ValidationError) -> tuple[SchemaViolation, ...]:
    """Point at the fields the error is about, and describe it without Python reprs.

    A ``required`` or ``additionalProperties`` error names every missing or extra property
    (jsonschema reports the first as one error per missing name, which all read alike, and the
    second as one error for all extras): told one field at a time, an agent would spend its
    retry budget fixing them one by one.
    """
    pointer = _pointer(error.absolute_path)
    keyword = error.validator
    expected: Any = error.validator_value
    instance: Any = error.instance
    if keyword == "required":
        missing = [name for name in expected if name not in instance] or [""]
        return tuple(
            SchemaViolation(f"{pointer}/{_escape(name)}", f"'{name}' is required")
            for name in missing
        )
    if keyword in ("additionalProperties", "unevaluatedProperties"):
        schema: Any = error.schema
        extras = sorted(set(instance) - set(schema.get("properties", {})))
        patterns = "|".join(schema.get("patternProperties", {}))
        if keyword == "additionalProperties" and patterns:  # as jsonschema finds them
            extras = [name for name in extras if not re.search(patterns, name)]
        if keyword == "unevaluatedProperties":
            extras = extras[:1]  # others may have been evaluated elsewhere (allOf, $ref)
        return tuple(
            SchemaViolation(f"{pointer}/{_escape(extra)}", f"'{extra}' is not allowed")
            for extra in extras or [""]
        )
    return (SchemaViolation(pointer, _describe(str(keyword), expected)),)


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


# ---------------------------------------------------------------- the fast path
#
# Most calls are valid, and jsonschema spends ~20 us finding that out for a 4-field object.
# For schemas made only of the keywords below, ``_compile`` builds a predicate that answers
# "valid?" in a few microseconds with exactly jsonschema's semantics (the same type checker,
# Decimal arithmetic, ECMA patterns). It may only ever say True when jsonschema finds no
# error; when it says False (or the schema has any other keyword), jsonschema runs as before
# and produces the violations, so messages and pointers never change. A differential property
# test holds the two together (tests/unit/policy/test_schemas_fast.py).

Check = Callable[[Any], bool]
_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "title", "description", "examples", "default", "format",
     "deprecated", "readOnly", "writeOnly"}
)  # fmt: skip
"""Keywords that never make an instance invalid here (no format checker is configured)."""


class _UnsupportedError(Exception):
    """The schema uses a keyword the fast path does not implement: jsonschema alone decides."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


_TYPES: dict[str, Check] = {
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": _is_number,
    "integer": lambda v: _is_integer(None, v),
}


def _compile(schema: Any) -> Check:
    """A predicate that is True only for instances jsonschema finds valid.

    Raises:
        _UnsupportedError: the schema needs jsonschema.
    """
    if schema is True:
        return lambda _: True
    if schema is False or not isinstance(schema, dict):
        raise _UnsupportedError
    checks: list[Check] = []
    for keyword, value in schema.items():
        if keyword in _ANNOTATIONS:
            continue
        builder = _KEYWORDS.get(keyword)
        if builder is None:
            raise _UnsupportedError
        checks.append(builder(value, schema))
    return _all_of(checks)


def _all_of(checks: list[Check]) -> Check:
    """True when every check is (a plain loop: ``all`` over a generator costs twice as much)."""
    if len(checks) == 1:
        return checks[0]
    checks_tuple = tuple(checks)

    def check(instance: Any) -> bool:
        for each in checks_tuple:  # noqa: SIM110 - all() over a generator is twice as slow
            if not each(instance):
                return False
        return True

    return check


def _type(value: Any, schema: Any) -> Check:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(name in _TYPES for name in names):
        raise _UnsupportedError
    tests = tuple(_TYPES[name] for name in names)
    if len(tests) == 1:
        return tests[0]
    return lambda instance: any(test(instance) for test in tests)


def _properties(value: Any, schema: Any) -> Check:
    if not isinstance(value, dict):
        raise _UnsupportedError
    compiled = {name: _compile(sub) for name, sub in value.items()}

    def check(instance: Any) -> bool:
        if not isinstance(instance, dict):
            return True
        for name, sub in compiled.items():
            if name in instance and not sub(instance[name]):
                return False
        return True

    return check


def _required(value: Any, schema: Any) -> Check:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise _UnsupportedError
    names = frozenset(value)
    return lambda instance: not isinstance(instance, dict) or names.issubset(instance)


def _additional_properties(value: Any, schema: Any) -> Check:
    if value is True:
        return lambda _: True
    if value is not False or "patternProperties" in schema:
        raise _UnsupportedError
    known = frozenset(schema.get("properties", {}))
    return lambda instance: not isinstance(instance, dict) or known.issuperset(instance)


def _strings(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _UnsupportedError  # jsonschema's equality for numbers, bools and containers: its job
    return frozenset(value)


def _enum(value: Any, schema: Any) -> Check:
    allowed = _strings(value)
    return lambda instance: isinstance(instance, str) and instance in allowed


def _const(value: Any, schema: Any) -> Check:
    allowed = _strings([value])
    return lambda instance: isinstance(instance, str) and instance in allowed


def _pattern(value: Any, schema: Any) -> Check:
    if not isinstance(value, str):
        raise _UnsupportedError
    regex = _compiled(value)
    return lambda instance: not isinstance(instance, str) or regex.search(instance) is not None


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _UnsupportedError
    return value


def _min_length(value: Any, schema: Any) -> Check:
    bound = _count(value)
    return lambda instance: not isinstance(instance, str) or len(instance) >= bound


def _max_length(value: Any, schema: Any) -> Check:
    bound = _count(value)
    return lambda instance: not isinstance(instance, str) or len(instance) <= bound


def _min_items(value: Any, schema: Any) -> Check:
    bound = _count(value)
    return lambda instance: not isinstance(instance, list) or len(instance) >= bound


def _max_items(value: Any, schema: Any) -> Check:
    bound = _count(value)
    return lambda instance: not isinstance(instance, list) or len(instance) <= bound


def _unique_items(value: Any, schema: Any) -> Check:
    if value is False:
        return lambda _: True
    if value is not True:
        raise _UnsupportedError

    def check(instance: Any) -> bool:
        if not isinstance(instance, list):
            return True
        if not all(type(item) is str for item in instance):
            return False  # equality of other values is jsonschema's to judge
        return len(set(instance)) == len(instance)

    return check


def _items(value: Any, schema: Any) -> Check:
    if "prefixItems" in schema:
        raise _UnsupportedError
    sub = _compile(value)
    return lambda instance: not isinstance(instance, list) or all(sub(item) for item in instance)


def _bound(compare: Callable[[Any, Any], bool]) -> Callable[[Any, Any], Check]:
    def build(value: Any, schema: Any) -> Check:
        if not _is_number(value):
            raise _UnsupportedError
        bound = _decimals(value)

        def check(instance: Any) -> bool:
            if not _is_number(instance):
                return True
            try:
                return compare(instance, bound)
            except (ArithmeticError, TypeError):
                return False

        return check

    return build


def _multiple_of(value: Any, schema: Any) -> Check:
    if not _is_number(value):
        raise _UnsupportedError
    divisor = _decimals(value)
    if not isinstance(divisor, int | Decimal):
        raise _UnsupportedError

    def check(instance: Any) -> bool:
        if not _is_number(instance):
            return True
        if isinstance(instance, float):
            return False  # jsonschema's float arithmetic: its job
        try:
            return not instance % divisor
        except (ArithmeticError, TypeError):
            return False

    return check


_KEYWORDS: dict[str, Callable[[Any, Any], Check]] = {
    "type": _type,
    "properties": _properties,
    "required": _required,
    "additionalProperties": _additional_properties,
    "enum": _enum,
    "const": _const,
    "pattern": _pattern,
    "minLength": _min_length,
    "maxLength": _max_length,
    "minItems": _min_items,
    "maxItems": _max_items,
    "uniqueItems": _unique_items,
    "items": _items,
    "minimum": _bound(lambda instance, bound: instance >= bound),
    "maximum": _bound(lambda instance, bound: instance <= bound),
    "exclusiveMinimum": _bound(lambda instance, bound: instance > bound),
    "exclusiveMaximum": _bound(lambda instance, bound: instance < bound),
    "multipleOf": _multiple_of,
}


_SUBSCHEMA = frozenset(
    {"not", "if", "then", "else", "items", "contains", "additionalProperties", "propertyNames",
     "unevaluatedItems", "unevaluatedProperties", "contentSchema"}
)  # fmt: skip
"""Keywords whose value is one schema."""
_SUBSCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SUBSCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "dependentSchemas", "definitions"}
)
"""Keywords whose value maps names to schemas. ``definitions`` is draft 7's ``$defs``: a place
for ``$ref`` to point into, which 2020-12 still resolves (so it is not flagged)."""
SCHEMA_KEYWORDS = frozenset(
    {
        *_SUBSCHEMA, *_SUBSCHEMA_LISTS, *_SUBSCHEMA_MAPS,
        # core
        "$schema", "$id", "$ref", "$anchor", "$dynamicRef", "$dynamicAnchor", "$vocabulary",
        "$comment",
        # validation
        "type", "const", "enum", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
        "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems",
        "uniqueItems", "maxContains", "minContains", "maxProperties", "minProperties", "required",
        "dependentRequired",
        # annotations
        "title", "description", "default", "deprecated", "readOnly", "writeOnly", "examples",
        "format", "contentEncoding", "contentMediaType",
    }
)  # fmt: skip
"""The keywords of JSON Schema 2020-12. Any other is ignored by a validator, silently: a
misspelt ``maxLenght`` or ``requried`` would drop the constraint it was meant to be."""
EXTENSION_PREFIX = "x-"
"""Keywords of the schema's author (annotations no validator reads) start with this."""


def unknown_keywords(
    schema: Any, where: tuple[str | int, ...] = ()
) -> Iterator[tuple[str | int, ...]]:
    """The path of every keyword of ``schema`` (and its subschemas) that JSON Schema 2020-12
    does not define and that is not an ``x-`` extension."""
    if not isinstance(schema, Mapping):
        return  # true, false, or a wrong type that check_schema reports
    for key, value in schema.items():
        path = (*where, key)
        if key not in SCHEMA_KEYWORDS and not str(key).startswith(EXTENSION_PREFIX):
            yield path
        elif key in _SUBSCHEMA:
            yield from unknown_keywords(value, path)
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            for index, item in enumerate(value):
                yield from unknown_keywords(item, (*path, index))
        elif key in _SUBSCHEMA_MAPS and isinstance(value, Mapping):
            for name, item in value.items():
                yield from unknown_keywords(item, (*path, name))


def compile_fast_check(document: Mapping[str, Any]) -> Check | None:
    """The fast validity check of a schema, or None when jsonschema alone must decide."""
    try:
        return _compile(dict(document))
    except _UnsupportedError:
        return None


MAX_VIOLATIONS = 16
"""Violations reported for one call. One per item of a long array would make an answer larger
than gRPC sends (and an audit record of megabytes) from a request of 64 KiB; the search
stops there too."""


def _by_pointer(violation: SchemaViolation) -> tuple[str, str]:
    return violation.pointer, violation.message


class ArgumentSchema:
    """A compiled argument schema for one tool."""

    __slots__ = ("_fast", "_validator", "document")

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
        self._fast = compile_fast_check(self.document)

    def validate(self, arguments: Mapping[str, Any]) -> tuple[SchemaViolation, ...]:
        """The violations (at most ``MAX_VIOLATIONS``, then one saying there are more), sorted
        by pointer; empty when the arguments are valid."""
        if self._fast is not None and self._fast_valid(arguments):
            return ()
        try:
            with localcontext(_PRECISE):
                errors = list(islice(self._validator.iter_errors(arguments), MAX_VIOLATIONS + 1))
        except Exception as exc:
            return (SchemaViolation("", f"schema could not be applied: {type(exc).__name__}"),)
        found = sorted(
            {v for e in errors[:MAX_VIOLATIONS] for v in _violations(e)}, key=_by_pointer
        )
        if len(errors) > MAX_VIOLATIONS or len(found) > MAX_VIOLATIONS:
            more = f"more violations than the {MAX_VIOLATIONS} listed; fix these first"
            found = [*found[:MAX_VIOLATIONS], SchemaViolation("", more)]
        return tuple(found)

    def _fast_valid(self, arguments: Mapping[str, Any]) -> bool:
        """The fast path's verdict; anything unexpected defers to jsonschema."""
        assert self._fast is not None
        try:
            with localcontext(_PRECISE):
                return self._fast(arguments)
        except Exception:
            return False
