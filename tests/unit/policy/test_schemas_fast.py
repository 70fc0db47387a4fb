"""The JSON Schema fast path never says "valid" where jsonschema finds an error.

``ArgumentSchema.validate`` answers from a compiled predicate when it says the arguments are
valid, and asks jsonschema otherwise; so the predicate must be sound (valid => jsonschema finds
no error). These tests compare the two on the example bundle's schemas and on random schemas
built from the keywords the fast path implements, with random instances (Decimal numbers, as
strictjson parses them).
"""

from __future__ import annotations

import time
from decimal import Decimal, localcontext
from typing import Any, Final

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema._utils import uniq as jsonschema_uniq

from sidecar import strictjson
from sidecar.policy.loader import load_policy
from sidecar.policy.schemas import (
    _PRECISE,
    MAX_VIOLATIONS,
    ArgumentSchema,
    _decimals,
    _Validator,
    compile_fast_check,
    unique_items_keyword,
)
from tests.conftest import ROOT

PROPERTY_SETTINGS: Final = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
EXAMPLES = load_policy(ROOT / "policies")

names = st.sampled_from(["a", "b", "invoice_id", "amount", "tags", "x/y", "~"])
strings = st.one_of(
    st.sampled_from(["", "in_93K2", "in_93K2\n", "USD", "EUR", "T-12", "a", "ab", "P1"]),
    st.text(max_size=6),
)
numbers = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6),
    st.decimals(allow_nan=False, allow_infinity=False, places=3, min_value=-1000, max_value=1000),
    st.sampled_from([Decimal("0.01"), Decimal("10.005"), Decimal("1E+70"), Decimal("2.0")]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
instances = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(names, children, max_size=4),
    max_leaves=12,
)

types = st.sampled_from(["string", "number", "integer", "object", "array", "boolean", "null"])
leaf_schemas = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(types, st.lists(types, min_size=1, max_size=3, unique=True)),
        "enum": st.lists(strings, min_size=1, max_size=3),
        "const": strings,
        "pattern": st.sampled_from(["^in_[A-Za-z0-9]+$", "^T-[0-9]+$", "a", "^$"]),
        "minLength": st.integers(0, 3),
        "maxLength": st.integers(0, 5),
        "minimum": numbers,
        "maximum": numbers,
        "exclusiveMinimum": numbers,
        "exclusiveMaximum": numbers,
        "multipleOf": st.sampled_from([1, 2, Decimal("0.01"), Decimal("0.5"), 0.25]),
        "minItems": st.integers(0, 2),
        "maxItems": st.integers(0, 3),
        "uniqueItems": st.booleans(),
        "description": st.just("annotations change nothing"),
    },
)


def _with_children(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["object", "array"]),
            "properties": st.dictionaries(names, children, max_size=3),
            "required": st.lists(names, max_size=3, unique=True),
            "additionalProperties": st.booleans(),
            "items": children,
        },
    )


schemas = st.recursive(leaf_schemas | st.booleans(), _with_children, max_leaves=6)


def _jsonschema_valid(schema: Any, instance: Any) -> bool:
    validator = _Validator(_decimals(schema))  # as ArgumentSchema compiles it
    try:
        with localcontext(_PRECISE):
            return not list(validator.iter_errors(instance))
    except Exception:  # jsonschema cannot apply it: validate() reports a violation then
        return False


def _fast_valid(schema: Any, instance: Any) -> bool:
    check = compile_fast_check(schema) if isinstance(schema, dict) else None
    if check is None:
        return False
    with localcontext(_PRECISE):
        try:
            return check(instance)
        except Exception:
            return False


@PROPERTY_SETTINGS
@given(schema=schemas, instance=instances)
def test_the_fast_path_never_accepts_what_jsonschema_refuses(schema: Any, instance: Any) -> None:
    """Whenever the compiled predicate says valid, jsonschema finds no error either."""
    if _fast_valid(schema, instance):
        assert _jsonschema_valid(schema, instance), (schema, instance)


@PROPERTY_SETTINGS
@given(tool=st.sampled_from(sorted(EXAMPLES.tools)), instance=instances)
def test_the_example_schemas_agree_with_jsonschema(tool: str, instance: Any) -> None:
    """On the example bundle's schemas, validate() gives exactly jsonschema's violations."""
    schema = EXAMPLES.tools[tool].arguments
    if not isinstance(instance, dict):
        instance = {"value": instance}
    reference = ArgumentSchema(schema.document)
    reference._fast = None  # jsonschema alone
    assert schema.validate(instance) == reference.validate(instance)


def test_the_example_schemas_all_take_the_fast_path() -> None:
    """Every example tool's schema compiles, and a valid refund is accepted without jsonschema."""
    assert all(t.arguments._fast is not None for t in EXAMPLES.tools.values())
    schema = EXAMPLES.tools["requestRefund"].arguments
    arguments = strictjson.parse_object(
        '{"invoice_id": "in_93K2", "amount": 49.00, "currency": "USD", "reason": "x"}'
    )
    assert schema._fast is not None
    assert schema._fast(arguments)
    assert schema.validate(arguments) == ()


def test_keywords_it_does_not_implement_leave_the_schema_to_jsonschema() -> None:
    """$ref, anyOf, patternProperties, numeric enums… make the whole schema use jsonschema."""
    unsupported: tuple[dict[str, Any], ...] = (
        {"$ref": "#/$defs/a", "$defs": {"a": {"type": "string"}}},
        {"anyOf": [{"type": "string"}]},
        {"type": "object", "patternProperties": {"^a": {}}, "additionalProperties": False},
        {"enum": [1, 2]},
        {"properties": {"a": {"not": {}}}},
        {"x-unknown": 1},
    )
    for schema in unsupported:
        assert compile_fast_check(schema) is None, schema


def test_violations_still_come_from_jsonschema() -> None:
    """An invalid call gets jsonschema's pointers and messages, as before the fast path."""
    schema = EXAMPLES.tools["requestRefund"].arguments
    arguments = strictjson.parse_object(
        '{"invoice_id": "in_93K2\\n", "amount": 10.005, "currency": "usd", "reason": "x"}'
    )
    pointers = [v.pointer for v in schema.validate(arguments)]
    assert pointers == ["/amount", "/currency", "/invoice_id"]


@PROPERTY_SETTINGS
@given(items=st.lists(instances, max_size=6))
def test_unique_items_judges_equality_as_jsonschema_does(items: list[Any]) -> None:
    """The linear ``uniqueItems`` finds duplicates exactly when jsonschema's pairwise one does
    (1 and 1.0 are equal, true and 1 are not, objects regardless of key order)."""
    mine = list(unique_items_keyword(_Validator({}), True, items, {}))
    assert (not mine) == jsonschema_uniq(items)


def test_a_long_mixed_array_is_judged_at_once_with_a_bounded_answer() -> None:
    """~10,000 items jsonschema cannot sort took it ~6 s (pairwise ``uniqueItems``), on the
    event loop; and 32,000 bad items made one violation each, an answer gRPC refused to send.
    Now both take milliseconds and give at most MAX_VIOLATIONS + 1 violations."""
    schema = ArgumentSchema(
        {
            "type": "object",
            "properties": {
                "tags": {
                    "type": "array",
                    "maxItems": 5,
                    "uniqueItems": True,
                    "items": {"type": "string", "maxLength": 3},
                }
            },
        }
    )
    for tags in ([str(i) if i % 2 else i for i in range(10_000)], [0] * 32_000):
        started = time.perf_counter()
        violations = schema.validate({"tags": tags})
        assert time.perf_counter() - started < 1.0
        assert len(violations) == MAX_VIOLATIONS + 1
        assert violations[-1].pointer == ""
        assert "more violations than the 16 listed" in violations[-1].message
    assert [v.message for v in schema.validate({"tags": ["a", "a"]})] == [
        "fails the 'uniqueItems' constraint"
    ]


def test_every_missing_and_extra_property_is_named_within_the_bound() -> None:
    """Each missing required property and each extra one (not a property, nor matching a
    pattern property) is a violation of its own; many still make at most MAX_VIOLATIONS + 1."""
    schema = ArgumentSchema(
        {
            "type": "object",
            "required": ["a", "b"],
            "properties": {"a": {}, "b": {}},
            "patternProperties": {"^x_": {}},
            "additionalProperties": False,
        }
    )
    violations = schema.validate({"x_1": 1, "y": 2, "z~": 3})
    assert [(v.pointer, v.message) for v in violations] == [
        ("/a", "'a' is required"),
        ("/b", "'b' is required"),
        ("/y", "'y' is not allowed"),
        ("/z~0", "'z~' is not allowed"),
    ]
    many = ArgumentSchema({"type": "object", "required": [f"p{i:02}" for i in range(40)]})
    violations = many.validate({})
    assert len(violations) == MAX_VIOLATIONS + 1
    assert violations[-1].pointer == ""
