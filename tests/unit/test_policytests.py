"""Policy unit tests (``*_test.yaml``): the shipped suite, strict reading, and the reports."""

from __future__ import annotations

import json
import shutil
from decimal import Decimal
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import yaml
from jsonschema import Draft202012Validator

from sidecar.engine import Outcome
from sidecar.policy.loader import load_policy
from sidecar.policytests import (
    TEST_FORMAT_SCHEMA,
    format_text,
    load_cases,
    run_suite,
    to_json,
    to_junit,
)
from tests.conftest import EXAMPLE_POLICIES

REFUND_BOUNDARIES = {"50.00", "50.01", "500", "500.01", "5000", "5000.01"}

CASE = """\
agent: billing-resolution-agent@service
cases:
  - name: small refund
    tool: requestRefund
    args: {invoice_id: in_1, amount: 50.01, currency: USD, reason: x}
    context: {invoice: {amount_due: 100000, currency: USD}}
    expect: {decision: NEEDS_APPROVAL, tier: supervisor}
"""


def bundle_with(tmp_path: Path, tests: dict[str, str]) -> Path:
    """A copy of the example policy with the given test files instead of the shipped ones."""
    directory = tmp_path / "bundle"
    shutil.copytree(EXAMPLE_POLICIES, directory, ignore=shutil.ignore_patterns("*_test.yaml"))
    for name, text in tests.items():
        (directory / name).write_text(text)
    return directory


def test_the_shipped_examples_pass() -> None:
    """Every case in policies/*_test.yaml passes against the example policy."""
    report = run_suite(EXAMPLE_POLICIES)
    assert report.issues == ()
    assert report.failed == ()
    assert len(report.results) >= 30
    assert report.ok


def test_the_shipped_tests_cover_every_tool_and_every_refund_boundary() -> None:
    """Each example tool has a case, and each refund tier boundary is tested on both sides."""
    report = run_suite(EXAMPLE_POLICIES)
    policy = load_policy(EXAMPLE_POLICIES)
    assert set(policy.tools) <= {r.case.call.tool for r in report.results}
    amounts = {
        str(r.case.call.arguments["amount"])
        for r in report.results
        if r.case.call.tool == "requestRefund" and "amount" in r.case.call.arguments
    }
    assert amounts >= REFUND_BOUNDARIES


def test_decimals_stay_exact_and_the_default_token_is_the_narrowest(tmp_path: Path) -> None:
    """50.01 reaches the engine as Decimal('50.01'), and the default grant pins the invoice."""
    directory = bundle_with(tmp_path, {"a_test.yaml": CASE})
    cases, issues = load_cases(directory, "a_test.yaml", load_policy(directory))
    assert issues == ()
    [case] = cases
    amount = case.call.arguments["amount"]
    assert isinstance(amount, Decimal)
    assert amount == Decimal("50.01")
    [grant] = case.token.grants
    assert (grant.tool, dict(grant.pins)) == ("requestRefund", {"invoice_id": "in_1"})
    assert case.token.subject == "billing-resolution-agent@service"
    assert (case.line, case.col, case.expect.decision) == (3, 5, Outcome.NEEDS_APPROVAL)


def test_a_wrong_expectation_fails_with_a_diff(tmp_path: Path) -> None:
    """A case expecting ALLOW for 50.01 fails, and the report says what differed and why."""
    wrong = CASE.replace("decision: NEEDS_APPROVAL, tier: supervisor", "decision: ALLOW")
    report = run_suite(bundle_with(tmp_path, {"a_test.yaml": wrong}))
    assert not report.ok
    [failed] = report.failed
    assert [(m.field, m.expected, m.actual) for m in failed.mismatches] == [
        ("decision", "ALLOW", "NEEDS_APPROVAL")
    ]
    text = format_text(report)
    assert "FAIL  a_test.yaml:3  small refund" in text
    assert "decision: expected ALLOW, got NEEDS_APPROVAL" in text
    assert "why:      APPROVAL_REQUIRED" in text
    assert text.endswith("0 passed, 1 failed")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            CASE.replace("    expect:", "    expekt: {}\n    expect:"),
            "a_test.yaml:7:5: error UNKNOWN_FIELD: unknown field 'expekt' in test case 1"
            " (hint: did you mean 'expect'?)",
        ),
        (
            CASE.replace("decision: NEEDS_APPROVAL", "decision: NEEDS_APROVAL"),
            "a_test.yaml:7:24: error INVALID_VALUE: 'decision' must be one of ALLOW, DENY,"
            " NEEDS_APPROVAL, not 'NEEDS_APROVAL' (hint: did you mean 'NEEDS_APPROVAL'?)",
        ),
        (
            CASE.replace("tier: supervisor", "tier: supervisr"),
            "a_test.yaml:7:46: error UNDEFINED_TIER: tool 'requestRefund' has no tier"
            " 'supervisr' (its tiers: auto, supervisor, finance, over-limit)"
            " (hint: did you mean 'supervisor'?)",
        ),
        (
            CASE.replace("agent: billing-resolution-agent@service\n", ""),
            "a_test.yaml:2:5: error MISSING_FIELD: test case 1 names no agent",
        ),
        (
            CASE + CASE.split("cases:\n")[1],
            "a_test.yaml:8:11: error DUPLICATE_DEFINITION: two test cases are named"
            " 'small refund' (hint: first at line 3",
        ),
        (
            CASE.replace("tool: requestRefund", "tool: requestRefund\n    tool: getInvoice"),
            "a_test.yaml:5:5: error DUPLICATE_KEY: duplicate key 'tool'",
        ),
        (
            CASE.replace("amount: 50.01", "amount: .inf"),
            "a_test.yaml:5:38: error INVALID_NUMBER: '.inf' is not a number",
        ),
        # What Check refuses as a malformed call (INVALID_ARGUMENT) is not a case to decide:
        # a lone surrogate ended the run in a traceback, and the others were decided as if
        # a call could carry them (and 1e999999999 was written out in full for its digest).
        (
            CASE.replace("reason: x}", 'reason: "\\ud800"}'),
            "a_test.yaml:5:68: error INVALID_VALUE: a lone surrogate (\\ud800) is not a char",
        ),
        (
            CASE.replace("reason: x}", 'reason: x, "k\\0": 1}'),
            "a_test.yaml:5:71: error INVALID_VALUE: the key holds U+0000 (NUL)",
        ),
        (
            CASE.replace("amount: 50.01", "amount: 1e999999999"),
            "a_test.yaml:5:38: error INVALID_NUMBER: '1e999999999' is not a number a JSON call",
        ),
        (
            CASE.replace("amount: 50.01", "amount: " + "9" * 66),
            "a_test.yaml:5:38: error INVALID_NUMBER: '99999999999999999999...' is not a number",
        ),
        (
            CASE.replace("currency: USD}}", "currency: USD, d: " + "[" * 32 + "]" * 32 + "}}"),
            "a_test.yaml:6:14: error INVALID_VALUE: a call cannot carry this: nesting deeper",
        ),
        (
            CASE.replace("args: {", "args: [{"),
            "a_test.yaml:6:5: error YAML_SYNTAX",
        ),
        (
            "cases: []\n",
            "a_test.yaml:1:8: error INVALID_VALUE: 'cases' must have at least 1 item(s)",
        ),
        ("", "a_test.yaml: error MISSING_FIELD: the test file is empty"),
    ],
)
def test_test_files_are_read_strictly(tmp_path: Path, text: str, expected: str) -> None:
    """A broken test file is an error at its exact file:line:col, and none of its cases run."""
    report = run_suite(bundle_with(tmp_path, {"a_test.yaml": text, "b_test.yaml": CASE}))
    shown = [str(issue) for issue in report.issues if issue.file == "a_test.yaml"]
    assert shown, [str(i) for i in report.issues]
    assert shown[0].startswith(expected), shown
    assert {r.case.file for r in report.results} == {"b_test.yaml"}
    assert not report.ok


def test_no_test_files_is_a_failure(tmp_path: Path) -> None:
    """A bundle without tests does not pass silently: CI should notice the tests are missing."""
    report = run_suite(bundle_with(tmp_path, {}))
    assert [issue.code for issue in report.issues] == ["NO_TEST_FILES"]
    assert not report.ok


def test_a_broken_policy_runs_no_case(tmp_path: Path) -> None:
    """Tests of a bundle that does not load report the bundle's errors, with file:line."""
    directory = bundle_with(tmp_path, {"a_test.yaml": CASE})
    (directory / "extra.yaml").write_text("agents:\n  x@service:\n    rolez: [r]\n")
    report = run_suite(directory)
    assert report.results == ()
    assert any(str(i).startswith("extra.yaml:3:5: error UNKNOWN_FIELD") for i in report.issues)
    assert not report.ok


def test_json_and_junit_reports(tmp_path: Path) -> None:
    """JSON lists every case with its result; JUnit XML counts the failure under its file."""
    failing = CASE.replace("name: small refund", "name: wrong").replace(
        "decision: NEEDS_APPROVAL", "decision: DENY"
    )
    report = run_suite(bundle_with(tmp_path, {"a_test.yaml": CASE, "b_test.yaml": failing}))
    body = json.loads(to_json(report))
    assert (body["passed"], body["failed"]) == (1, 1)
    assert [c["name"] for c in body["cases"] if not c["passed"]] == ["wrong"]
    root = ET.fromstring(to_junit(report))  # noqa: S314 - our own output
    assert (root.get("tests"), root.get("failures")) == ("2", "1")
    [failure] = root.iter("failure")
    assert failure.get("message") == "decision: expected DENY, got NEEDS_APPROVAL"
    suites = {suite.get("name"): suite.get("failures") for suite in root.iter("testsuite")}
    assert suites == {"a_test.yaml": "0", "b_test.yaml": "1"}


def test_control_characters_are_escaped_in_the_table_and_the_junit_report(tmp_path: Path) -> None:
    """A case named with an escape sequence ("\\e[31m") rewrote the terminal's colours, and
    JUnit XML cannot hold control characters at all: the report CI reads did not parse."""
    failing = CASE.replace("name: small refund", 'name: "red \\e[31m \\x07"').replace(
        "decision: NEEDS_APPROVAL", "decision: DENY"
    )
    report = run_suite(bundle_with(tmp_path, {"a_test.yaml": failing}))
    table = format_text(report)
    assert "red \\x1b[31m \\x07" in table
    assert "\x1b" not in table
    [case] = ET.fromstring(to_junit(report)).iter("testcase")  # noqa: S314 - our own output
    assert case.get("name") == "red \\x1b[31m \\x07"


def test_the_test_format_schema_is_valid_and_the_shipped_files_follow_it() -> None:
    """The test-file schema passes the 2020-12 meta-schema; each shipped file validates."""
    Draft202012Validator.check_schema(TEST_FORMAT_SCHEMA)
    files = sorted(EXAMPLE_POLICIES.glob("*_test.yaml"))
    assert len(files) == 3
    for path in files:
        document = yaml.safe_load(path.read_text("utf-8"))
        assert list(Draft202012Validator(TEST_FORMAT_SCHEMA).iter_errors(document)) == []


def test_a_case_can_bind_its_token_to_a_run(tmp_path: Path) -> None:
    """``token_run_id`` binds the test token to a run, as ``token issue --run-id`` does: the
    same run passes, another one is OUT_OF_SCOPE at run_id, and without it any run is fine."""
    cases = """\
agent: billing-resolution-agent@service
cases:
  - name: the token's own run
    tool: getInvoice
    args: {invoice_id: in_1}
    run_id: run-1
    token_run_id: run-1
    expect: {decision: ALLOW}
  - name: another run
    tool: getInvoice
    args: {invoice_id: in_1}
    run_id: run-2
    token_run_id: run-1
    expect: {decision: DENY, reason: OUT_OF_SCOPE, field: run_id}
  - name: an unbound token
    tool: getInvoice
    args: {invoice_id: in_1}
    run_id: run-2
    expect: {decision: ALLOW}
"""
    directory = bundle_with(tmp_path, {"a_test.yaml": cases})
    report = run_suite(directory)
    assert report.issues == ()
    assert report.failed == (), format_text(report)
    assert [r.case.token.run_id for r in report.results] == ["run-1", "run-1", None]
