"""strictjson: refusing ambiguous or oversized JSON, and the canonical form and digest."""

from __future__ import annotations

import hashlib
import json
import re
import time
from decimal import Decimal
from typing import Any, Final

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import strictjson
from sidecar.strictjson import (
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    JSONInputError,
    canonical,
    digest,
    parse_object,
)
from tests.json_values import any_values

PROPERTY_SETTINGS: Final = settings(max_examples=200, deadline=None, database=None)


def nested(depth: int) -> str:
    """An object holding ``depth`` levels of brackets in all (the outer object included)."""
    return '{"a":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


# --- parse_object: what is accepted -------------------------------------------------------------


def test_numbers_keep_their_type_and_exact_digits() -> None:
    """Integers parse as int, fractions and exponents as exact Decimals."""
    value = parse_object('{"i": 7, "d": 0.01, "e": 1.2E2, "neg": -0.50}')
    assert value == {"i": 7, "d": Decimal("0.01"), "e": Decimal("120"), "neg": Decimal("-0.5")}
    assert type(value["i"]) is int
    assert str(value["d"]) == "0.01"
    assert str(value["neg"]) == "-0.50"


def test_an_ordinary_object_round_trips() -> None:
    """Strings, booleans, null, lists and nested objects are read as usual."""
    text = '{"s": "h\\u00e9\\n", "b": [true, false, null], "o": {"k": []}, "": ""}'
    assert parse_object(text) == {
        "s": "h\u00e9\n",
        "b": [True, False, None],
        "o": {"k": []},
        "": "",
    }


def test_a_valid_surrogate_pair_is_accepted() -> None:
    """An escaped surrogate pair is one astral character, not a lone surrogate."""
    assert parse_object('{"e": "\\ud83d\\ude00"}') == {"e": "\U0001f600"}


def test_a_65_digit_integer_is_kept_exactly() -> None:
    """Integers up to 10^64 (65 digits), as decimals, parse exactly."""
    digits = "9" * 65
    assert parse_object(f'{{"n": {digits}, "m": -{digits}}}') == {
        "n": int(digits),
        "m": -int(digits),
    }


# --- parse_object: what is refused --------------------------------------------------------------


def test_the_size_cap_is_checked_before_parsing() -> None:
    """Oversized text is refused for its size, even when it is not JSON at all."""
    with pytest.raises(JSONInputError, match=r"bytes exceeds the limit of 100"):
        parse_object("x" * 101, max_bytes=100)


def test_the_size_cap_counts_utf8_bytes_not_characters() -> None:
    """Fifty two-byte characters are 100 bytes, over a cap of 99."""
    text = '{"a":"' + "\u00e9" * 50 + '"}'
    with pytest.raises(JSONInputError, match="exceeds"):
        parse_object(text, max_bytes=len(text.encode()) - 1)
    assert parse_object(text, max_bytes=len(text.encode()))["a"] == "\u00e9" * 50


def test_the_default_size_cap_is_64_kib() -> None:
    """A document of exactly MAX_JSON_BYTES parses; one byte more is refused."""
    padding = MAX_JSON_BYTES - len('{"a":""}')
    text = '{"a":"' + "x" * padding + '"}'
    assert len(parse_object(text)["a"]) == padding
    with pytest.raises(JSONInputError, match="exceeds"):
        parse_object('{"a":"' + "x" * (padding + 1) + '"}')


def test_nesting_at_the_depth_cap_parses_and_one_deeper_is_refused() -> None:
    """MAX_JSON_DEPTH levels are fine; one more is refused before parsing."""
    assert parse_object(nested(MAX_JSON_DEPTH))
    with pytest.raises(JSONInputError, match=f"deeper than {MAX_JSON_DEPTH}"):
        parse_object(nested(MAX_JSON_DEPTH + 1))


def test_depth_is_checked_before_parsing() -> None:
    """Deep nesting is reported as such even when the text is not valid JSON."""
    with pytest.raises(JSONInputError, match="deeper than 3"):
        parse_object("{{{{ not json", max_depth=3)


def test_very_deep_nesting_is_refused_quickly_without_recursion_error() -> None:
    """Ten thousand levels are refused by the depth scan, fast, not by a RecursionError."""
    start = time.perf_counter()
    with pytest.raises(JSONInputError, match="deeper"):
        parse_object('{"a":' + "[" * 10_000 + "]" * 10_000 + "}", max_bytes=10**6)
    assert time.perf_counter() - start < 1.0


def test_brackets_inside_strings_do_not_count_towards_depth() -> None:
    """Brackets in string values or keys, escaped quotes included, are not nesting."""
    brackets = "[{" * 100
    text = json.dumps({"a": brackets, '{"[': '\\"[[[[[[', "b": ["]]]]", '"{{{{']})
    assert parse_object(text, max_depth=2)["a"] == brackets


@pytest.mark.parametrize(
    "text",
    ['{"a": 1, "a": 1}', '{"a": 1, "b": {"c": 1, "c": 2}}', '{"x": [{"k": 1, "k": 1}]}'],
)
def test_duplicate_keys_are_refused_at_any_level(text: str) -> None:
    """A key repeated in any object is refused, even with the same value."""
    with pytest.raises(JSONInputError, match="duplicate key"):
        parse_object(text)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_standard_constants_are_refused(constant: str) -> None:
    """NaN, Infinity and -Infinity are not JSON and are refused by name."""
    with pytest.raises(JSONInputError, match=re.escape(f"{constant} is not allowed")):
        parse_object(f'{{"a": [1, {constant}]}}')


@pytest.mark.parametrize(
    "text",
    [
        '{"a": "\\ud800"}',
        '{"a": "\\uDFFF"}',
        '{"a": "x\\udc00y"}',
        '{"\\ud83d": 1}',
        '{"a": ["\\ude00\\ud83d"]}',
        '{"a": {"b": "\\uD83D"}}',
    ],
)
def test_escaped_lone_surrogates_are_refused(text: str) -> None:
    """A lone surrogate escape, high or low, in a value or key, any case, is refused."""
    with pytest.raises(JSONInputError, match="lone surrogates"):
        parse_object(text)


@pytest.mark.parametrize("text", ['{"a": "\ud800"}', '{"\udfff": 1}'])
def test_raw_lone_surrogates_are_refused(text: str) -> None:
    """A lone surrogate code point in the text itself is refused."""
    with pytest.raises(JSONInputError, match="lone surrogates"):
        parse_object(text)


@pytest.mark.parametrize("text", ["[]", "[{}]", '"obj"', "1", "1.5", "null", "true", "false"])
def test_a_top_level_other_than_an_object_is_refused(text: str) -> None:
    """Only an object may be the top-level value."""
    with pytest.raises(JSONInputError, match="must be a JSON object"):
        parse_object(text)


@pytest.mark.parametrize(
    "number",
    [
        "1e999999", "1E65", "-1e65", "1e-65", "0.1e-64", "1E+100",
        "1e99999999999999999999", "-1e-99999999999999999999",  # beyond what Decimal can hold
    ],
)  # fmt: skip
def test_numbers_with_absurd_exponents_are_refused(number: str) -> None:
    """Decimal magnitudes beyond 10^±64 are refused (no huge Decimal work downstream)."""
    with pytest.raises(JSONInputError, match="out of range"):
        parse_object(f'{{"n": {number}}}')


@pytest.mark.parametrize("number", ["1E64", "-9.99E64", "1e-64"])
def test_numbers_at_the_exponent_limit_are_accepted(number: str) -> None:
    """Magnitudes up to 10^±64 are still numbers."""
    assert parse_object(f'{{"n": {number}}}')["n"] == Decimal(number)


@pytest.mark.parametrize("digits", [66, 4000, 5000])
def test_integers_beyond_10_to_the_64_are_refused(digits: int) -> None:
    """Like decimals, integers beyond 10^64 are out of range (no vague schema error later)."""
    with pytest.raises(JSONInputError, match="out of range"):
        parse_object('{"n": ' + "1" * digits + "}")
    with pytest.raises(JSONInputError, match="out of range"):
        parse_object('{"n": [-' + "1" * digits + "]}")


@pytest.mark.parametrize(
    "text",
    [
        '{"body": "ok\\u00004111111111111111"}',
        '{"a\\u0000b": 1}',
        '{"a": [{"b": ["x", "\\u0000"]}]}',
    ],
)
def test_nul_characters_are_refused_in_keys_and_strings(text: str) -> None:
    """CEL would read a string only up to a NUL: a rule would judge another string."""
    with pytest.raises(JSONInputError, match="NUL"):
        parse_object(text)


def test_an_escaped_backslash_before_u0000_is_not_a_nul() -> None:
    """The six characters \\u0000 after an escaped backslash are text, not a NUL."""
    assert parse_object('{"a": "\\\\u0000"}') == {"a": "\\u0000"}


@pytest.mark.parametrize(
    "text", ["", " ", "{", '{"a": 1} {}', '{"a": 1,}', "{'a': 1}", '{"a": 01}', '{"a": .5}']
)
def test_malformed_json_is_refused(text: str) -> None:
    """Text that is not exactly one JSON object is a JSONInputError naming invalid JSON."""
    with pytest.raises(JSONInputError, match="not valid JSON"):
        parse_object(text)


# --- canonical and digest --------------------------------------------------------------------


@pytest.mark.parametrize("number", ["120", "120.0", "1.2E2", "1.20e+2", "120.000", "12E1"])
def test_equal_numbers_have_one_canonical_form(number: str) -> None:
    """120, 120.0 and 1.2E2 all read 120, so they digest the same."""
    value = parse_object(f'{{"n": {number}}}')
    assert canonical(value) == '{"n":120}'
    assert digest(value) == digest({"n": 120})


@pytest.mark.parametrize(
    ("number", "text"),
    [
        ("10.50", "10.5"),
        ("0.010", "0.01"),
        ("-0.0", "0"),
        ("-0.50", "-0.5"),
        ("1E-7", "0.0000001"),
        ("1.5E3", "1500"),
        ("1E64", "1" + "0" * 64),
    ],
)
def test_decimals_are_written_in_shortest_exact_positional_form(number: str, text: str) -> None:
    """Trailing zeros go, exponents are expanded, negative zero is zero."""
    assert canonical(parse_object(f'{{"n": {number}}}')) == f'{{"n":{text}}}'


def test_key_order_and_whitespace_do_not_matter() -> None:
    """Keys are sorted at every level and no whitespace is written."""
    first = parse_object('{"b": 1, "a": {"y": [1, 2], "x": null}}')
    second = parse_object('{ "a" : { "x" : null , "y" : [ 1 , 2 ] } , "b" : 1 }')
    assert canonical(first) == canonical(second) == '{"a":{"x":null,"y":[1,2]},"b":1}'
    assert digest(first) == digest(second)


def test_list_order_matters() -> None:
    """Lists are ordered: [1, 2] and [2, 1] are different calls."""
    assert digest({"a": [1, 2]}) != digest({"a": [2, 1]})


def test_unicode_is_kept_not_escaped() -> None:
    """Non-ASCII characters are written as themselves; control characters are escaped."""
    assert (
        canonical({"k\u00e9": "\u65e5\u672c\n\U0001f600"})
        == '{"k\u00e9":"\u65e5\u672c\\n\U0001f600"}'
    )


def test_types_are_not_conflated() -> None:
    """true, 1, "1" and null are four different values."""
    digests = {digest({"v": v}) for v in (True, 1, "1", None, [1], {"1": 1})}
    assert len(digests) == 6
    assert canonical({"t": True, "f": False, "n": None}) == '{"f":false,"n":null,"t":true}'


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.1, "0.1"), (1.5, "1.5"), (2.0, "2"), (-3.25, "-3.25"), (1e20, "1" + "0" * 20)],
)
def test_floats_are_written_by_their_shortest_repr(value: float, text: str) -> None:
    """A float is written as the shortest decimal that reads back as it (0.1, not 0.1000...)."""
    assert canonical(value) == text
    assert canonical(value) == canonical(Decimal(text))


def test_a_non_json_value_is_a_type_error() -> None:
    """Sets, bytes and arbitrary objects have no canonical form."""
    for value in ({1}, b"x", object()):
        with pytest.raises(TypeError, match="not a JSON value"):
            canonical({"a": value})


def test_digest_is_sha256_of_the_canonical_utf8() -> None:
    """The digest is ``sha256:`` and 64 hex digits of the canonical text's UTF-8."""
    value = {"b": Decimal("1.0"), "a": "\u00e9"}
    expected = hashlib.sha256('{"a":"\u00e9","b":1}'.encode()).hexdigest()
    assert digest(value) == f"sha256:{expected}"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest({})) is not None


def test_different_amounts_have_different_digests() -> None:
    """10.50 and 10.05 differ, so an approval for one does not cover the other."""
    assert digest({"amount": Decimal("10.50")}) != digest({"amount": Decimal("10.05")})


@pytest.mark.parametrize(
    ("precise", "rounded"),
    [
        ("10.000000000000000000000000001", "10"),
        ("12345678901234567890123456789.5", "12345678901234567890123456790"),
        ("0.12345678901234567890123456789", "0.1234567890123456789012345679"),
    ],
)
def test_numbers_beyond_28_digits_keep_their_own_digest(precise: str, rounded: str) -> None:
    """Two different numbers never share a canonical form, however many digits they have."""
    exact = parse_object(f'{{"n": {precise}}}')
    other = parse_object(f'{{"n": {rounded}}}')
    assert exact["n"] != other["n"]
    assert canonical(exact) != canonical(other)


# --- properties ------------------------------------------------------------------------------

json_decimals = st.builds(
    lambda mantissa, exponent: Decimal(mantissa).scaleb(exponent),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.integers(min_value=-30, max_value=30),
)
json_floats = st.floats(
    min_value=-1e15, max_value=1e15, allow_nan=False, allow_infinity=False
).filter(lambda f: f == 0 or abs(f) > 1e-30)
json_text = st.characters(exclude_characters="\x00", exclude_categories=["Cs"])  # as parsed
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    json_decimals,
    json_floats,
    st.text(json_text, max_size=16),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(json_text, max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(json_text, max_size=8), json_values, max_size=6)


@PROPERTY_SETTINGS
@given(value=json_objects)
def test_canonical_is_a_fixed_point_of_parsing(value: dict[str, Any]) -> None:
    """canonical(parse_object(canonical(x))) == canonical(x) for any JSON object x."""
    text = canonical(value)
    assert canonical(parse_object(text)) == text
    assert "\n" not in text


def _exact(value: Any) -> Any:
    """``value`` with floats replaced by the Decimal of their shortest repr."""
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, dict):
        return {k: _exact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_exact(v) for v in value]
    return value


@PROPERTY_SETTINGS
@given(value=json_objects)
def test_canonical_text_reads_back_as_an_equal_value(value: dict[str, Any]) -> None:
    """The canonical text is strict JSON that parses back to the same (exact) value."""
    assert parse_object(canonical(value)) == _exact(value)


@PROPERTY_SETTINGS
@given(value=json_objects)
def test_the_digest_ignores_key_insertion_order(value: dict[str, Any]) -> None:
    """Rebuilding every object with reversed key order leaves the digest unchanged."""

    def reversed_keys(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: reversed_keys(v[k]) for k in reversed(list(v))}
        if isinstance(v, list):
            return [reversed_keys(x) for x in v]
        return v

    assert digest(reversed_keys(value)) == digest(value)


def _canonical_as_first_released(value: Any) -> str:
    """canonical() as it was first written: digests are stored (idempotency keys, approvals),
    so a faster canonical() must produce exactly these bytes, forever."""
    if isinstance(value, dict):
        items = ",".join(
            f"{json.dumps(k, ensure_ascii=False)}:{_canonical_as_first_released(v)}"
            for k, v in sorted(value.items())
        )
        return "{" + items + "}"
    if isinstance(value, list):
        return "[" + ",".join(_canonical_as_first_released(v) for v in value) + "]"
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | Decimal):
        return canonical(value)
    assert isinstance(value, float)
    return canonical(Decimal(repr(value)))


@PROPERTY_SETTINGS
@given(value=json_objects)
def test_canonical_text_never_changes(value: dict[str, Any]) -> None:
    """The canonical form (and so every stored digest) is the one first released."""
    assert canonical(value) == _canonical_as_first_released(value)


def test_hostile_unterminated_strings_are_refused_in_linear_time() -> None:
    """Many unterminated quotes under the size cap are refused at once, not after seconds."""
    hostile = "[" * 33 + '"\\' * 21000
    started = time.perf_counter()
    with pytest.raises(JSONInputError):
        parse_object(hostile)
    assert time.perf_counter() - started < 0.25
    nested_quotes = '{"a": "' + '\\"' * 20000 + '"}'
    assert parse_object(nested_quotes)["a"] == '"' * 20000


@PROPERTY_SETTINGS
@given(any_values)
def test_the_orjson_fast_path_writes_exactly_what_the_python_encoder_writes(value: Any) -> None:
    """canonical() and digest() take orjson when they can; the text must be the reference's."""
    reference = strictjson._canonical(value)
    assert canonical(value) == reference
    assert digest(value) == "sha256:" + hashlib.sha256(reference.encode()).hexdigest()


def test_orjson_writes_the_usual_values_and_declines_the_rest() -> None:
    """The fast path is taken for what requests hold, and declined where orjson would differ."""
    usual = {"b": [1, "x", None, True], "a": Decimal("49.00"), "c": {"é": Decimal("1E+2")}}
    assert strictjson.sorted_json(usual, strictjson._default) == (
        '{"a":49,"b":[1,"x",null,true],"c":{"é":100}}'.encode()
    )
    for declined in ({"a": 1.0}, {"a": 2**64}, {1: "a"}, {"a": {1, 2}}):
        assert strictjson.sorted_json(declined, strictjson._default) is None
    keys = {"\ue000": 1, "😀": 2}  # code point order and UTF-16 order differ
    assert strictjson.sorted_json(keys, strictjson._default) is not None
    assert strictjson.sorted_json(keys, strictjson._default, utf16_keys=True) is None
