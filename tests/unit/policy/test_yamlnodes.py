"""YAML with line marks: hardened parsing, plain values and positions of keys and values."""

from __future__ import annotations

import math

import pytest

from sidecar.policy.issues import Code
from sidecar.policy.yamlnodes import Position, YamlDocument, parse_yaml


def parse(text: str) -> YamlDocument:
    """Parse text that must have no issues."""
    document, issues = parse_yaml(text, "f.yaml")
    assert issues == []
    assert document is not None
    return document


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("yes", "yes"),
        ("No", "No"),
        ("on", "on"),
        ("true", True),
        ("FALSE", False),
        ("017", 17),
        ("-3", -3),
        ("0o17", 15),
        ("0x1F", 31),
        ("1_000", "1_000"),
        ("2026-11-01", "2026-11-01"),
        ("12:30", "12:30"),
        ("0.5", 0.5),
        ("1e3", 1000.0),
        ("~", None),
        ("null", None),
        ("", None),
        ("'017'", "017"),
        ('"true"', "true"),
        ("!!str 12", "12"),
        ("!!int '12'", 12),
    ],
)
def test_scalars_follow_yaml_1_2_core(text: str, value: object) -> None:
    """Only YAML 1.2 core forms are booleans, numbers and nulls; everything else is a string."""
    assert parse(f"v: {text}\n").value == {"v": value}


def test_special_floats_are_refused() -> None:
    """.inf, .nan and a number beyond a double are no JSON numbers: each an INVALID_VALUE at
    its place, and the value is damaged (later stages skip it); finite floats read as before."""
    document, issues = parse_yaml("a: .inf\nb: -.Inf\nc: .nan\nd: 1e400\ne: 1.5e3\n", "f.yaml")
    assert [(i.line, i.col, i.code) for i in issues] == [
        (1, 4, Code.INVALID_VALUE), (2, 4, Code.INVALID_VALUE),
        (3, 4, Code.INVALID_VALUE), (4, 4, Code.INVALID_VALUE),
    ]  # fmt: skip
    assert "'1e400' is not a finite number" in issues[3].message
    assert document is not None
    assert document.damaged == {("a",), ("b",), ("c",), ("d",)}
    assert document.value["e"] == 1500.0
    assert all(math.isfinite(v) for v in document.value.values() if isinstance(v, float))


def test_positions_of_keys_and_values() -> None:
    """Keys and values report 1-based positions; list items have no key of their own."""
    document = parse("tools:\n  lookup:\n    pins: [a, b]\n")
    assert document.key_position(("tools", "lookup")) == Position(2, 3)
    assert document.value_position(("tools", "lookup", "pins")) == Position(3, 11)
    assert document.value_position(("tools", "lookup", "pins", 1)) == Position(3, 15)
    assert document.key_position(("tools", "lookup", "pins", 1)) == Position(3, 15)


def test_absent_paths_fall_back_to_the_nearest_ancestor() -> None:
    """A missing field is reported where its parent stands."""
    document = parse("tools:\n  lookup: {}\n")
    assert document.value_position(("tools", "lookup", "tiers", 0)) == Position(2, 11)
    assert document.key_position(("tools", "lookup", "tiers")) == Position(2, 3)


def test_empty_and_comment_only_files_have_no_document() -> None:
    """An empty file is not an error; it simply holds nothing."""
    assert parse_yaml("", "f.yaml") == (None, [])
    assert parse_yaml("# just a comment\n\n", "f.yaml") == (None, [])


def test_anchor_alone_is_refused() -> None:
    """Even an unused anchor is refused: the rule is simply "no anchors"."""
    document, issues = parse_yaml("a: &x 1\n", "f.yaml")
    assert [(i.code, i.line, i.col) for i in issues] == [(Code.YAML_ANCHOR, 1, 4)]
    assert document is not None
    assert document.value == {"a": 1}


def test_alias_value_is_damaged_not_expanded() -> None:
    """An alias never expands; its path is marked so later stages stay quiet about it."""
    document, issues = parse_yaml("a: &x [1, 2]\nb: *x\n", "f.yaml")
    assert [i.code for i in issues] == [Code.YAML_ANCHOR, Code.YAML_ALIAS]
    assert document is not None
    assert document.value == {"a": [1, 2], "b": None}
    assert document.damaged == frozenset({("b",)})


def test_duplicate_keys_keep_the_first_value() -> None:
    """The second key is reported (with the first one's line) and its value ignored."""
    document, issues = parse_yaml("a: 1\nb: 2\na: 3\n", "f.yaml")
    assert [(str(i)) for i in issues] == [
        "f.yaml:3:1: error DUPLICATE_KEY: duplicate key 'a' (hint: first defined at line 1)"
    ]
    assert document is not None
    assert document.value == {"a": 1, "b": 2}


def test_non_printable_characters_are_syntax_errors() -> None:
    """Control characters are reported at their position, not raised."""
    document, issues = parse_yaml("a: 1\nb: x\x07\n", "f.yaml")
    assert document is None
    assert [(i.code, i.line, i.col) for i in issues] == [(Code.YAML_SYNTAX, 2, 5)]


@pytest.mark.parametrize(
    "char", ["\x85", "\u2028", "\u2029", "\u202e", "\u2066", "\u200b", "\u200d", "\ufeff"]
)
def test_characters_that_hide_lines_or_reorder_text_are_refused(char: str) -> None:
    """PyYAML ends a comment at NEL, U+2028 and U+2029 where editors show one line (the key
    after it was live), bidi controls reorder what a reviewer sees, and invisible characters
    make a string differ from how it looks: refused, in test files too, at their line and
    column as an editor counts them."""
    document, issues = parse_yaml(f"a: 1  # note{char}b: 2\n", "f.yaml")
    assert document is None
    assert [(i.code, i.line, i.col) for i in issues] == [(Code.YAML_SYNTAX, 1, 13)]


def test_depth_bound_holds_for_block_nesting() -> None:
    """Deep block nesting is refused as well as deep flow nesting."""
    text = "".join(f"{'  ' * level}k{level}:\n" for level in range(70))
    document, issues = parse_yaml(text, "f.yaml")
    assert document is None
    assert [i.code for i in issues] == [Code.TOO_DEEP]


# Each case: YAML text for key `w`, the expression's error position (line, col, 1-based, inside
# the scalar's value), and where that character stands in the file.
SCALAR_CASES = [
    pytest.param("w: a && ^b\n", (1, 6), (1, 9), id="plain"),
    pytest.param("w: 'a == ''x'' ^ b'\n", (1, 10), (1, 16), id="single-quoted with ''"),
    pytest.param('w: "a \\t== \\"x\\" ^ b"\n', (1, 11), (1, 18), id="double-quoted with escapes"),
    pytest.param("w: |\n  a &&\n    ^b\n", (2, 3), (3, 5), id="literal block"),
    pytest.param("w: >-\n  a &&\n  ^b\n", (1, 6), (3, 3), id="folded block"),
    pytest.param("w: a &&\n  b ^\n", (1, 8), (2, 5), id="multi-line plain"),
    pytest.param("w: a &&\n  b ^\n", (1, 9), (2, 6), id="multi-line plain: at the end"),
    pytest.param("w: a &&\n  b ^\n", (3, 40), (2, 6), id="beyond the value: clamped"),
    pytest.param("w: ''\n", (1, 1), (1, 5), id="empty quoted"),
]


@pytest.mark.parametrize(("text", "inside", "expected"), SCALAR_CASES)
def test_position_in_scalar(text: str, inside: tuple[int, int], expected: tuple[int, int]) -> None:
    """A position inside a scalar's value maps to the file, whatever the scalar's style."""
    document = parse(text)
    assert document.position_in_scalar(("w",), *inside) == Position(*expected)
