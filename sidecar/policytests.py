"""Policy unit tests: ``*_test.yaml`` files next to the policy, evaluated in-process.

A test case names an agent, a tool call and the decision the policy must give it. Each case
runs through the real engine (``sidecar.engine.evaluate``) with token claims built from the
case's grants: what Check would answer after a token verified. No server, no signing, no clock.

Test files are read as strictly as policy files (YAML with line marks, a JSON Schema for the
format, every problem with file:line:col), so a typo in a test is a failure, not a test that
quietly checks nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any
from xml.etree import ElementTree as ET

from sidecar import strictjson
from sidecar.engine import Decision, Outcome, ReasonCode, ToolCall, evaluate
from sidecar.errors import PolicyLoadError
from sidecar.policy.issues import Code, PolicyIssue, Severity, sort_issues, with_fix_hint
from sidecar.policy.loader import load_policy, policy_test_files, read_text
from sidecar.policy.model import Policy
from sidecar.policy.policy_format import check_format, did_you_mean, format_validator
from sidecar.policy.yamlnodes import Path as NodePath
from sidecar.policy.yamlnodes import YamlDocument, parse_yaml
from sidecar.terminal import shown
from tokens import CapabilityClaims, Grant

TEST_TOKEN_ISSUER = "proviso-policy-test"  # noqa: S105 - an issuer name, not a secret
"""The ``token.issuer`` conditions see in a test case."""

_NAME = {"type": "string", "minLength": 1, "maxLength": 200}
_IDENTIFIER = {"type": "string", "pattern": "^[\\x21-\\x7e]+$", "maxLength": 256}
_GRANT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["tool"],
    "properties": {
        "tool": _IDENTIFIER,
        "pins": {"type": "object", "additionalProperties": _IDENTIFIER},
    },
}
_EXPECT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["decision"],
    "properties": {
        "decision": {"enum": [outcome.value for outcome in Outcome]},
        "reason": {"enum": [code.value for code in ReasonCode]},
        "tier": {"type": "string"},
        "approvals": {"type": "integer", "minimum": 1},
        "field": {"type": "string"},
        "message": {"type": "string", "minLength": 1},
    },
}
_CASE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "tool", "expect"],
    "properties": {
        "name": _NAME,
        "agent": _IDENTIFIER,
        "grants": {"type": "array", "items": _GRANT},
        "tool": _IDENTIFIER,
        "args": {"type": "object"},
        "context": {"type": "object"},
        "run_id": _IDENTIFIER,
        "token_run_id": _IDENTIFIER,
        "idempotency_key": {"type": "string", "maxLength": 256},
        "expect": _EXPECT,
    },
}
TEST_FORMAT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Proviso policy unit tests (*_test.yaml)",
    "type": "object",
    "additionalProperties": False,
    "required": ["cases"],
    "properties": {
        "agent": _IDENTIFIER,
        "cases": {"type": "array", "minItems": 1, "items": _CASE},
    },
}
"""The format of a test file, enforced like the policy format (documented in policies/README)."""

_VALIDATOR = format_validator(TEST_FORMAT_SCHEMA)


class TestFileCode(StrEnum):
    """Issue codes only test files have; the rest are the policy's own (``issues.Code``)."""

    __test__ = False  # not a pytest test class, despite the name

    NO_TEST_FILES = "NO_TEST_FILES"
    UNDEFINED_TIER = "UNDEFINED_TIER"
    INVALID_NUMBER = "INVALID_NUMBER"


_TEST_HINTS: dict[str, str] = {
    TestFileCode.NO_TEST_FILES: "add *_test.yaml files with cases next to the policy",
    TestFileCode.UNDEFINED_TIER: "name one of the tool's tiers, or correct the name",
    TestFileCode.INVALID_NUMBER: "write a finite decimal number, e.g. 50.01",
}


@dataclass(frozen=True, slots=True)
class Expectation:
    """What a case expects; None means "not checked"."""

    decision: Outcome
    reason: ReasonCode | None = None
    tier: str | None = None
    approvals: int | None = None
    field: str | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyTestCase:
    """One named case, ready to evaluate."""

    file: str
    line: int
    col: int
    name: str
    call: ToolCall
    token: CapabilityClaims
    expect: Expectation

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One expected field that the decision did not match."""

    field: str
    expected: str
    actual: str


@dataclass(frozen=True, slots=True)
class CaseResult:
    """A case, the decision the policy gave, and every way it differs from the expectation."""

    case: PolicyTestCase
    decision: Decision
    mismatches: tuple[Mismatch, ...]

    @property
    def passed(self) -> bool:
        return not self.mismatches


@dataclass(frozen=True, slots=True)
class SuiteReport:
    """A whole run: problems that stopped cases from running, and each case's result."""

    directory: Path
    policy_version: str
    issues: tuple[PolicyIssue, ...] = ()
    results: tuple[CaseResult, ...] = ()

    @property
    def errors(self) -> tuple[PolicyIssue, ...]:
        return tuple(issue for issue in self.issues if issue.severity is Severity.ERROR)

    @property
    def failed(self) -> tuple[CaseResult, ...]:
        return tuple(result for result in self.results if not result.passed)

    @property
    def ok(self) -> bool:
        """True only if something ran, nothing failed and no file had an error."""
        return bool(self.results) and not self.failed and not self.errors


def run_suite(directory: Path) -> SuiteReport:
    """Load the bundle in ``directory`` and run every case of its ``*_test.yaml`` files.

    A bundle with errors runs nothing (its issues are the report). A test file with errors
    contributes its issues and none of its cases: a half-read test file proves nothing.
    """
    try:
        policy = load_policy(directory)
    except PolicyLoadError as exc:
        return SuiteReport(directory, "", issues=tuple(exc.issues))  # type: ignore[arg-type]
    names = policy_test_files(directory)
    if not names:
        message = f"no policy test files (*_test.yaml) in '{directory}'"
        issue = PolicyIssue(".", 0, 0, TestFileCode.NO_TEST_FILES, message)
        return SuiteReport(directory, policy.version, issues=(_hinted(issue),))
    issues: list[PolicyIssue] = []
    results: list[CaseResult] = []
    for name in names:
        cases, file_issues = load_cases(directory, name, policy)
        issues.extend(file_issues)
        results.extend(run_case(policy, case) for case in cases)
    return SuiteReport(directory, policy.version, sort_issues(issues), tuple(results))


def load_cases(
    directory: Path, name: str, policy: Policy
) -> tuple[tuple[PolicyTestCase, ...], tuple[PolicyIssue, ...]]:
    """Read one test file: its cases, or none and every problem found in it."""
    issues: list[PolicyIssue] = []
    text = read_text(directory, name, issues)
    document = None
    if text is not None:
        document, yaml_issues = parse_yaml(text, name, finite_floats=False)
        issues.extend(yaml_issues)
    if document is None:
        if text is not None and not issues:
            issues.append(PolicyIssue(name, 0, 0, Code.MISSING_FIELD, "the test file is empty"))
        return (), tuple(_hinted(issue) for issue in issues)
    if not isinstance(document.value, dict):
        message = "a test file must be a mapping with 'cases', not a list or a value"
        issues.append(PolicyIssue(name, 1, 1, Code.WRONG_TYPE, message))
        return (), tuple(_hinted(issue) for issue in issues)
    issues.extend(check_format(document, name, _VALIDATOR).issues)
    if issues:
        return (), tuple(_hinted(issue) for issue in issues)
    reader = _CaseReader(name, document, policy)
    cases = tuple(reader.cases())
    if reader.issues:
        return (), tuple(_hinted(issue) for issue in reader.issues)
    return cases, ()


def run_case(policy: Policy, case: PolicyTestCase) -> CaseResult:
    """Evaluate one case with the engine and compare what it expects with what it got."""
    decision = evaluate(policy, case.call, case.token)
    return CaseResult(case, decision, tuple(_compare(case.expect, decision)))


def _compare(expect: Expectation, decision: Decision) -> Iterator[Mismatch]:
    first = decision.reasons[0] if decision.reasons else None
    if decision.outcome is not expect.decision:
        yield Mismatch("decision", expect.decision.value, decision.outcome.value)
    actual_reason = first.code.value if first else "(none)"
    if expect.reason is not None and actual_reason != expect.reason.value:
        yield Mismatch("reason", expect.reason.value, actual_reason)
    if expect.tier is not None and decision.matched_tier != expect.tier:
        yield Mismatch("tier", _show(expect.tier), _show(decision.matched_tier))
    if expect.approvals is not None:
        actual = decision.approval.approvals_required if decision.approval else 0
        if actual != expect.approvals:
            yield Mismatch("approvals", str(expect.approvals), str(actual))
    if expect.field is not None:
        actual_field = first.field if first else ""
        if actual_field != expect.field:
            yield Mismatch("field", _show(expect.field), _show(actual_field))
    if expect.message is not None:
        actual_message = first.message if first else ""
        if expect.message not in actual_message:
            yield Mismatch("message", f"contains {expect.message!r}", repr(actual_message))


def _show(value: str) -> str:
    return value if value else "(none)"


def _hinted(issue: PolicyIssue) -> PolicyIssue:
    issue = with_fix_hint(issue)
    return issue if issue.hint else replace(issue, hint=_TEST_HINTS.get(issue.code, ""))


class _CaseReader:
    """Turns a format-checked test file into cases, checking what the schema cannot."""

    def __init__(self, name: str, document: YamlDocument, policy: Policy) -> None:
        self.name = name
        self.document = document
        self.policy = policy
        self.issues: list[PolicyIssue] = []

    def issue(
        self, path: NodePath, code: str, message: str, *, key: bool = False, hint: str = ""
    ) -> None:
        doc = self.document
        line, col = doc.key_position(path) if key else doc.value_position(path)
        self.issues.append(PolicyIssue(self.name, line, col, code, message, hint=hint))

    def cases(self) -> Iterator[PolicyTestCase]:
        value = self.document.value
        default_agent = value.get("agent")
        seen: dict[str, int] = {}
        for index, body in enumerate(value["cases"]):
            path: NodePath = ("cases", index)
            name = body["name"]
            if name in seen:
                first = self.document.value_position(("cases", seen[name], "name"))
                self.issue(
                    (*path, "name"),
                    Code.DUPLICATE_DEFINITION,
                    f"two test cases are named '{name}'",
                    hint=f"first at line {first.line}; give each case its own name",
                )
            seen.setdefault(name, index)
            case = self._case(index, body, default_agent)
            if case is not None:
                yield case

    def _case(
        self, index: int, body: Mapping[str, Any], default_agent: str | None
    ) -> PolicyTestCase | None:
        path: NodePath = ("cases", index)
        agent = body.get("agent", default_agent)
        if agent is None:
            self.issue(
                path,
                Code.MISSING_FIELD,
                f"test case {index + 1} names no agent",
                key=True,
                hint="add 'agent' to the case, or a default 'agent' at the top of the file",
            )
            return None
        tool = body["tool"]
        before = len(self.issues)
        arguments = self._carried((*path, "args"), body.get("args", {}))
        context = self._carried((*path, "context"), body.get("context", {}))
        expect = self._expectation((*path, "expect"), body["expect"], tool)
        if len(self.issues) > before:
            return None  # reported; the file runs no case, and these values have no digest
        if "grants" in body:
            grants = tuple(
                Grant(g["tool"], MappingProxyType(dict(g.get("pins", {})))) for g in body["grants"]
            )
        else:
            grants = (self._narrowest_grant(tool, arguments),)
        line, col = self.document.key_position(path)
        return PolicyTestCase(
            file=self.name,
            line=line,
            col=col,
            name=body["name"],
            call=ToolCall(
                tool=tool,
                arguments=arguments,
                context=context,
                run_id=body.get("run_id", ""),
                # A real runtime sends a key with every write; a case may set its own, or ""
                # to see the denial for a missing one.
                idempotency_key=body.get("idempotency_key", f"test-{index + 1}"),
                args_digest=_digest(arguments),
            ),
            token=CapabilityClaims(
                issuer=TEST_TOKEN_ISSUER,
                subject=agent,
                audience="proviso",
                issued_at=0,
                not_before=0,
                expires_at=2**32,
                token_id=f"test-{self.name}-{index + 1}",
                grants=grants,
                run_id=body.get("token_run_id"),
            ),
            expect=expect,
        )

    def _narrowest_grant(self, tool: str, arguments: Mapping[str, Any]) -> Grant:
        """The token an issuer would mint for exactly this call: the tool, pinned to its args."""
        definition = self.policy.tools.get(tool)
        pins = {
            pin: arguments[pin]
            for pin in (definition.pins if definition else ())
            if isinstance(arguments.get(pin), str)
        }
        return Grant(tool, MappingProxyType(pins))

    def _expectation(self, path: NodePath, body: Mapping[str, Any], tool: str) -> Expectation:
        tier = body.get("tier")
        definition = self.policy.tools.get(tool)
        if tier and definition is not None:
            names = [t.name for t in definition.tiers]
            if tier not in names:
                self.issue(
                    (*path, "tier"),
                    TestFileCode.UNDEFINED_TIER,
                    f"tool '{tool}' has no tier '{tier}' (its tiers: {', '.join(names)})",
                    hint=did_you_mean(tier, names),
                )
        reason = body.get("reason")
        return Expectation(
            decision=Outcome(body["decision"]),
            reason=ReasonCode(reason) if reason is not None else None,
            tier=tier,
            approvals=body.get("approvals"),
            field=body.get("field"),
            message=body.get("message"),
        )

    def _carried(self, path: NodePath, value: Any) -> Any:
        """``args`` or ``context`` exactly as Check would receive them, or an issue where Check
        would refuse the call as malformed (INVALID_ARGUMENT) instead of deciding it."""
        before = len(self.issues)
        exact = self._exact(path, value)
        if len(self.issues) == before:
            try:  # the whole object: nesting depth and size, as the server reads it
                strictjson.parse_object(strictjson.canonical(exact))
            except strictjson.JSONInputError as exc:
                self.issue(path, Code.INVALID_VALUE, f"a call cannot carry this: {exc}")
        return exact

    def _exact(self, path: NodePath, value: Any) -> Any:
        """Arguments as Check sees them: YAML decimals become exact ``Decimal``s, as JSON's do;
        what Check refuses (NUL, lone surrogates, numbers beyond 10^64) is reported."""
        if isinstance(value, dict):
            for key in value:
                self._string((*path, key), key, key=True)
            return {k: self._exact((*path, k), v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._exact((*path, i), v) for i, v in enumerate(value)]
        if isinstance(value, str):
            self._string(path, value)
        elif type(value) is int and len(str(abs(value))) > strictjson.MAX_DECIMAL_EXPONENT + 1:
            self._number(path, str(value))
        if isinstance(value, float):
            node = self.document.node(path)
            text = str(node.value) if node is not None else repr(value)
            try:
                number = Decimal(text)
            except InvalidOperation:
                number = Decimal("NaN")
            if not number.is_finite() or abs(number.adjusted()) > strictjson.MAX_DECIMAL_EXPONENT:
                self._number(path, text)
            return number
        return value

    def _number(self, path: NodePath, text: str) -> None:
        short = text if len(text) <= 24 else f"{text[:20]}..."
        message = f"'{short}' is not a number a JSON call can carry"
        if not text.lstrip("+-").startswith("."):
            message += f" (Check refuses numbers beyond 10^{strictjson.MAX_DECIMAL_EXPONENT})"
        self.issue(path, TestFileCode.INVALID_NUMBER, message)

    def _string(self, path: NodePath, text: str, *, key: bool = False) -> None:
        refused = strictjson.REFUSED_CHAR_RE.search(text)  # as Check refuses
        if refused is None:
            return
        what = "U+0000 (NUL)" if refused.group() == "\x00" else "a lone surrogate"
        where = "key" if key else "string"
        message = f"the {where} holds {what}: Check refuses such a call (INVALID_ARGUMENT)"
        self.issue(path, Code.INVALID_VALUE, message, key=key)


def _digest(arguments: dict[str, Any]) -> str:
    """The call's digest; empty for arguments with a non-finite number (reported, never run)."""
    try:
        return strictjson.digest(arguments)
    except TypeError:
        return ""


# ---------------------------------------------------------------- reports


@dataclass(frozen=True, slots=True)
class _Row:
    status: str
    where: str
    name: str
    got: str
    details: tuple[str, ...] = field(default_factory=tuple)


def _got(decision: Decision) -> str:
    code = decision.primary_code
    parts = [decision.outcome.value, code.value if code else ""]
    if decision.matched_tier:
        parts.append(f"tier {decision.matched_tier}")
    return "  ".join(part for part in parts if part)


def format_text(report: SuiteReport) -> str:
    """A table of every case (PASS/FAIL) with each failure's diff, file errors, the totals."""
    lines: list[str] = []
    rows = [
        _Row(
            "PASS" if r.passed else "FAIL",
            f"{r.case.file}:{r.case.line}",
            shown(r.case.name),
            _got(r.decision),
            () if r.passed else _diff(r),
        )
        for r in report.results
    ]
    if rows:
        where = max(len(row.where) for row in rows)
        name = max(len(row.name) for row in rows)
        for row in rows:
            lines.append(f"{row.status}  {row.where:<{where}}  {row.name:<{name}}  {row.got}")
            lines.extend(" " * 6 + shown(detail) for detail in row.details)
    if report.issues:  # last, next to the summary, where they are seen
        if lines:
            lines.append("")
        lines.extend(shown(str(issue)) for issue in report.issues)
    summary = f"{len(report.results) - len(report.failed)} passed, {len(report.failed)} failed"
    if report.errors:
        summary += f", {len(report.errors)} error(s) in the files"
    version = f" (policy {report.policy_version})" if report.policy_version else ""
    lines.append(f"{report.directory}{version}: {summary}")
    return "\n".join(lines)


def _diff(result: CaseResult) -> tuple[str, ...]:
    width = max(len(m.field) for m in result.mismatches)
    out = [
        f"{m.field + ':':<{width + 1}} expected {m.expected}, got {m.actual}"
        for m in result.mismatches
    ]
    for reason in result.decision.reasons:
        where = f" at {reason.field}" if reason.field else ""
        out.append(f"{'why:':<{width + 1}} {reason.code.value}{where}: {reason.message}")
    return tuple(out)


def to_json(report: SuiteReport) -> str:
    """The report for scripts: counts, issues, and every case with its result."""
    cases = []
    for result in report.results:
        decision = result.decision
        cases.append(
            {
                "file": result.case.file,
                "line": result.case.line,
                "name": result.case.name,
                "passed": result.passed,
                "decision": decision.outcome.value,
                "reason": decision.primary_code.value if decision.primary_code else "",
                "tier": decision.matched_tier,
                "mismatches": [
                    {"field": m.field, "expected": m.expected, "actual": m.actual}
                    for m in result.mismatches
                ],
            }
        )
    body = {
        "directory": str(report.directory),
        "policy_version": report.policy_version,
        "passed": len(report.results) - len(report.failed),
        "failed": len(report.failed),
        "issues": [
            {
                "file": i.file,
                "line": i.line,
                "col": i.col,
                "code": str(i.code),
                "message": i.message,
                "severity": str(i.severity),
                "hint": i.hint,
            }
            for i in report.issues
        ],
        "cases": cases,
    }
    return json.dumps(body, indent=2, ensure_ascii=False)


def to_junit(report: SuiteReport) -> bytes:
    """JUnit XML, one test suite per test file, for CI systems that draw test reports."""
    by_file: dict[str, list[CaseResult]] = {}
    for result in report.results:
        by_file.setdefault(result.case.file, []).append(result)
    issues_by_file: dict[str, list[PolicyIssue]] = {}
    for issue in report.errors:
        issues_by_file.setdefault(issue.file, []).append(issue)
    root = ET.Element(
        "testsuites",
        name="proviso policy tests",
        tests=str(len(report.results) + len(issues_by_file)),
        failures=str(len(report.failed)),
        errors=str(len(issues_by_file)),
    )
    for file in sorted(set(by_file) | set(issues_by_file)):
        results = by_file.get(file, [])
        problems = issues_by_file.get(file, [])
        suite = ET.SubElement(
            root,
            "testsuite",
            name=file,
            tests=str(len(results) + (1 if problems else 0)),
            failures=str(sum(1 for r in results if not r.passed)),
            errors="1" if problems else "0",
        )
        if problems:
            case = ET.SubElement(suite, "testcase", classname=file, name="(reading the file)")
            error = ET.SubElement(case, "error", message=shown(str(problems[0])), type="FileError")
            error.text = "\n".join(shown(str(p)) for p in problems)
        for result in results:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=file,
                name=shown(result.case.name),
                file=file,
                line=str(result.case.line),
                time="0",
            )
            if not result.passed:
                first = result.mismatches[0]
                failure = ET.SubElement(
                    case,
                    "failure",
                    message=shown(f"{first.field}: expected {first.expected}, got {first.actual}"),
                    type="PolicyTestFailure",
                )
                failure.text = "\n".join(shown(line) for line in _diff(result))
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return xml
