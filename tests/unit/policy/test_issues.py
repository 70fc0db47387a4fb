"""PolicyIssue as data: OPA-style text, JSON for scripts, a stable sort order."""

from __future__ import annotations

import json

from sidecar.policy.issues import (
    FIX_HINTS,
    Code,
    PolicyIssue,
    Severity,
    format_issues,
    sort_issues,
    with_fix_hint,
)

UNKNOWN = PolicyIssue(
    "common.yaml",
    12,
    5,
    Code.UNKNOWN_FIELD,
    "unknown field 'grups' in approver role 'ops'",
    hint="did you mean 'groups'?",
)
CEL = PolicyIssue("billing.yaml", 41, 29, Code.CEL_SYNTAX, "Syntax error: mismatched input")
WARNING = PolicyIssue(
    "billing.yaml", 3, 3, Code.WRITE_TOOL_WITHOUT_PINS, "no pins", severity=Severity.WARNING
)
BUNDLE = PolicyIssue(".", 0, 0, Code.NO_POLICY_FILES, "no policy files")


def test_text_form_is_file_line_col_severity_code_message() -> None:
    """Each issue prints as one grep-able line, with its hint in parentheses."""
    assert str(CEL) == "billing.yaml:41:29: error CEL_SYNTAX: Syntax error: mismatched input"
    assert str(UNKNOWN) == (
        "common.yaml:12:5: error UNKNOWN_FIELD: unknown field 'grups' in approver role 'ops'"
        " (hint: did you mean 'groups'?)"
    )
    assert str(WARNING) == "billing.yaml:3:3: warning WRITE_TOOL_WITHOUT_PINS: no pins"


def test_whole_file_issues_have_no_position() -> None:
    """Line 0 means the issue is about a whole file (or the bundle, '.')."""
    assert str(BUNDLE) == ".: error NO_POLICY_FILES: no policy files"


def test_issues_sort_by_file_then_position_then_code() -> None:
    """Sorting is by location, so output reads top to bottom through each file."""
    same_place = PolicyIssue("billing.yaml", 3, 3, Code.DUPLICATE_DEFINITION, "twice")
    assert sort_issues([UNKNOWN, CEL, WARNING, BUNDLE, same_place]) == (
        BUNDLE,
        same_place,
        WARNING,
        CEL,
        UNKNOWN,
    )


def test_duplicates_are_removed() -> None:
    """The same issue found twice (e.g. by two checks) is reported once."""
    copy = PolicyIssue(CEL.file, CEL.line, CEL.col, CEL.code, CEL.message)
    assert sort_issues([CEL, copy, CEL]) == (CEL,)


def test_format_text() -> None:
    """Text output is the sorted issues, one per line."""
    assert format_issues([UNKNOWN, CEL], "text") == f"{CEL}\n{UNKNOWN}"
    assert format_issues([], "text") == ""


def test_format_json() -> None:
    """JSON output is a sorted list of objects with every field, for scripts."""
    parsed = json.loads(format_issues([UNKNOWN, WARNING], "json"))
    assert parsed == [
        {
            "file": "billing.yaml",
            "line": 3,
            "col": 3,
            "code": "WRITE_TOOL_WITHOUT_PINS",
            "message": "no pins",
            "severity": "warning",
            "hint": "",
        },
        {
            "file": "common.yaml",
            "line": 12,
            "col": 5,
            "code": "UNKNOWN_FIELD",
            "message": "unknown field 'grups' in approver role 'ops'",
            "severity": "error",
            "hint": "did you mean 'groups'?",
        },
    ]
    assert json.loads(format_issues([], "json")) == []


def test_codes_are_their_own_names() -> None:
    """Codes are SCREAMING_SNAKE strings equal to their names, so they never drift."""
    for code in Code:
        assert code.value == code.name
        assert code.value.isupper()


def test_every_code_has_a_fix_hint() -> None:
    """Each stable code has a one-line default fix hint, so no issue reaches an author bare."""
    assert set(FIX_HINTS) == set(Code)
    assert all(hint and "\n" not in hint for hint in FIX_HINTS.values())


def test_a_specific_hint_wins_over_the_default() -> None:
    """A check's own hint (a "did you mean") is kept; a bare issue gets its code's hint."""
    assert with_fix_hint(UNKNOWN).hint == "did you mean 'groups'?"
    assert with_fix_hint(CEL).hint == FIX_HINTS[Code.CEL_SYNTAX]
