"""Policy errors as golden data: each ``testdata/<case>/`` bundle and the issues it must yield.

``expected.txt`` lists one issue per line, ``file:line:col: severity CODE``, optionally followed
by ``: text`` that must appear in the issue's message or hint. Blank lines and ``#`` comments
are ignored. The order is the loader's: sorted by file, line, column and code.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sidecar.errors import PolicyLoadError
from sidecar.policy.issues import Code, PolicyIssue, Severity
from sidecar.policy.loader import lint_policy, load_policy

TESTDATA = Path(__file__).parent / "testdata"
CASES = sorted(path.name for path in TESTDATA.iterdir() if path.is_dir())
_LINE = re.compile(r"(?P<head>\S+: (?:error|warning) [A-Z_]+)(?:: (?P<text>.+))?")

# Codes that need a file system trick rather than checked-in data; test_loader.py covers them.
CODES_TESTED_ELSEWHERE = {Code.READ_ERROR, Code.FILE_TOO_LARGE}


def expected_issues(case: str) -> list[tuple[str, str]]:
    """The (head, text) pairs of a case's expected.txt."""
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate((TESTDATA / case / "expected.txt").read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = _LINE.fullmatch(line)
        assert match, f"{case}/expected.txt:{number}: cannot read {line!r}"
        pairs.append((match["head"], match["text"] or ""))
    return pairs


def head(issue: PolicyIssue) -> str:
    """The part of an issue a golden line must match exactly."""
    return f"{issue.location}: {issue.severity} {issue.code}"


def details(issue: PolicyIssue) -> str:
    """The part a golden line's text may match loosely."""
    return f"{issue.message} (hint: {issue.hint})" if issue.hint else issue.message


@pytest.mark.parametrize("case", CASES)
def test_lint_yields_exactly_the_expected_issues(case: str) -> None:
    """A broken bundle yields exactly its golden issues, at their exact file:line:col."""
    expected = expected_issues(case)
    issues = lint_policy(TESTDATA / case)
    assert [head(issue) for issue in issues] == [line for line, _ in expected]
    for issue, (_, text) in zip(issues, expected, strict=True):
        assert text in details(issue), f"{head(issue)}: {details(issue)!r} lacks {text!r}"


@pytest.mark.parametrize("case", CASES)
def test_load_policy_fails_with_the_errors_or_loads(case: str) -> None:
    """load_policy raises with exactly the error-severity issues, or loads when there are none."""
    issues = lint_policy(TESTDATA / case)
    errors = tuple(issue for issue in issues if issue.severity is Severity.ERROR)
    if not errors:
        assert load_policy(TESTDATA / case).version
        return
    with pytest.raises(PolicyLoadError) as raised:
        load_policy(TESTDATA / case)
    assert raised.value.issues == errors


def test_every_case_has_an_expected_file() -> None:
    """A test data directory without expected.txt would silently test nothing."""
    assert CASES
    missing = [case for case in CASES if not (TESTDATA / case / "expected.txt").is_file()]
    assert missing == []


def test_every_issue_code_has_a_golden_case() -> None:
    """Adding an issue code without a golden case (or a named test) fails here."""
    seen = {line.split()[-1] for case in CASES for line, _ in expected_issues(case)}
    assert set(Code) - CODES_TESTED_ELSEWHERE == {Code(code) for code in seen}


@pytest.mark.parametrize("case", CASES)
def test_every_issue_has_a_one_line_fix_hint(case: str) -> None:
    """Every issue lint reports carries a non-empty, single-line hint on how to fix it."""
    for issue in lint_policy(TESTDATA / case):
        assert issue.hint, f"{head(issue)} has no hint"
        assert "\n" not in issue.hint, f"{head(issue)}: the hint is not one line"
