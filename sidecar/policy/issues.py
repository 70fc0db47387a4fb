"""Policy problems as data: where (file:line:col), what (a stable code), and how bad.

The loader never stops at the first problem: it collects every issue, de-duplicates and sorts
them by location, so one ``proviso lint`` run shows an author everything to fix. Codes are part
of the interface (scripts and tests match on them); messages are for people and may change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Literal


class Severity(StrEnum):
    """An error blocks loading the bundle; a warning is reported and the bundle still loads."""

    ERROR = "error"
    WARNING = "warning"


class Code(StrEnum):
    """Stable issue codes. Add new ones; never rename or reuse one."""

    # Reading files
    NO_POLICY_FILES = "NO_POLICY_FILES"
    READ_ERROR = "READ_ERROR"
    FILE_TOO_LARGE = "FILE_TOO_LARGE"
    INVALID_ENCODING = "INVALID_ENCODING"
    # YAML
    YAML_SYNTAX = "YAML_SYNTAX"
    MULTIPLE_DOCUMENTS = "MULTIPLE_DOCUMENTS"
    DUPLICATE_KEY = "DUPLICATE_KEY"
    INVALID_KEY = "INVALID_KEY"
    YAML_ANCHOR = "YAML_ANCHOR"
    YAML_ALIAS = "YAML_ALIAS"
    YAML_TAG = "YAML_TAG"
    TOO_DEEP = "TOO_DEEP"
    # The policy format
    UNKNOWN_FIELD = "UNKNOWN_FIELD"
    WRONG_TYPE = "WRONG_TYPE"
    MISSING_FIELD = "MISSING_FIELD"
    FIELD_NOT_ALLOWED = "FIELD_NOT_ALLOWED"
    INVALID_VALUE = "INVALID_VALUE"
    INVALID_NAME = "INVALID_NAME"
    INVALID_DURATION = "INVALID_DURATION"
    DUPLICATE_ITEM = "DUPLICATE_ITEM"
    # The bundle as a whole
    DUPLICATE_DEFINITION = "DUPLICATE_DEFINITION"
    DUPLICATE_LABEL = "DUPLICATE_LABEL"
    UNDEFINED_ROLE = "UNDEFINED_ROLE"
    UNDEFINED_TOOL = "UNDEFINED_TOOL"
    UNDEFINED_APPROVER_ROLE = "UNDEFINED_APPROVER_ROLE"
    UNDEFINED_AGENT = "UNDEFINED_AGENT"
    # Compiling tools
    CEL_SYNTAX = "CEL_SYNTAX"
    CEL_TYPE = "CEL_TYPE"
    INVALID_SCHEMA = "INVALID_SCHEMA"
    UNKNOWN_SCHEMA_KEYWORD = "UNKNOWN_SCHEMA_KEYWORD"
    PIN_NOT_IN_SCHEMA = "PIN_NOT_IN_SCHEMA"
    REDACT_NOT_IN_SCHEMA = "REDACT_NOT_IN_SCHEMA"
    UNREACHABLE_TIER = "UNREACHABLE_TIER"
    # Warnings
    WRITE_TOOL_WITHOUT_PINS = "WRITE_TOOL_WITHOUT_PINS"
    CEL_UNKNOWN_ARGUMENT = "CEL_UNKNOWN_ARGUMENT"


@dataclass(frozen=True, slots=True, order=True)
class PolicyIssue:
    """One problem in a policy bundle.

    ``file`` is relative to the bundle directory (POSIX style, ``.`` for the bundle itself);
    ``line`` and ``col`` are 1-based, or 0 when the issue concerns a whole file. The field order
    is the sort order: by file, then position, then code.
    """

    file: str
    line: int
    col: int
    code: str
    message: str
    severity: Severity = Severity.ERROR
    hint: str = ""

    @property
    def location(self) -> str:
        """``file:line:col``, or just ``file`` for a whole-file issue."""
        if self.line <= 0:
            return self.file
        return f"{self.file}:{self.line}:{self.col}"

    def __str__(self) -> str:
        hint = f" (hint: {self.hint})" if self.hint else ""
        return f"{self.location}: {self.severity} {self.code}: {self.message}{hint}"


FIX_HINTS: Mapping[str, str] = {
    Code.REDACT_NOT_IN_SCHEMA: "list only property names of the tool's arguments schema",
    Code.NO_POLICY_FILES: "point at the directory that holds the bundle's *.yaml files",
    Code.READ_ERROR: "check that the path exists and the sidecar's user can read it",
    Code.FILE_TOO_LARGE: "split it into smaller files: a policy file is at most 1 MiB",
    Code.INVALID_ENCODING: "save the file as UTF-8",
    Code.YAML_SYNTAX: "fix the YAML here: indentation, a missing ':' or an unclosed bracket",
    Code.MULTIPLE_DOCUMENTS: "split it into separate files",
    Code.DUPLICATE_KEY: "remove or rename one of the two keys",
    Code.INVALID_KEY: "quote the key",
    Code.YAML_ANCHOR: "write the value out in full where it applies",
    Code.YAML_ALIAS: "write the value out in full where it applies",
    Code.YAML_TAG: "remove the tag and write a plain value",
    Code.TOO_DEEP: "flatten the structure",
    Code.UNKNOWN_FIELD: "remove the field or correct its name",
    Code.WRONG_TYPE: "write a value of the type the message names",
    Code.MISSING_FIELD: "add the field the message names",
    Code.FIELD_NOT_ALLOWED: "remove the field, or make the tier's action require_approval",
    Code.INVALID_VALUE: "use a value the message allows",
    Code.INVALID_NAME: "rename it as the message says",
    Code.INVALID_DURATION: "a positive whole number then s, m or h, e.g. 30s, 15m, 24h",
    Code.DUPLICATE_ITEM: "remove the repeated item",
    Code.DUPLICATE_DEFINITION: "keep one definition and remove or rename the other",
    Code.DUPLICATE_LABEL: "set 'label' in one file only",
    Code.UNDEFINED_ROLE: "define the role under 'roles', or correct the name",
    Code.UNDEFINED_TOOL: "define the tool under 'tools', or correct the name",
    Code.UNDEFINED_APPROVER_ROLE: "define it under 'approver_roles', or correct the name",
    Code.UNDEFINED_AGENT: "define the agent under 'agents', or correct the name",
    Code.CEL_SYNTAX: "fix the expression at this position (CEL syntax: see policies/README.md)",
    Code.CEL_TYPE: "use args, agent, token or context, and make the condition boolean",
    Code.INVALID_SCHEMA: (
        "fix the schema: JSON Schema 2020-12, with $ref only inside it ('#/...', '#anchor')"
    ),
    Code.UNKNOWN_SCHEMA_KEYWORD: "correct the keyword, or start an annotation of yours with 'x-'",
    Code.PIN_NOT_IN_SCHEMA: "add it to the arguments as a string property, or remove the pin",
    Code.UNREACHABLE_TIER: "move the unconditional tier last, or give it a 'when'",
    Code.WRITE_TOOL_WITHOUT_PINS: "add 'pins' naming the argument that identifies the resource",
    Code.CEL_UNKNOWN_ARGUMENT: "name an argument of the tool's schema (or add it there)",
}
"""A one-line fix for each code, used when the check that found an issue has no better one."""


def with_fix_hint(issue: PolicyIssue) -> PolicyIssue:
    """``issue`` with a hint: its own if it has one (a "did you mean"), else its code's."""
    if issue.hint:
        return issue
    return replace(issue, hint=FIX_HINTS.get(issue.code, ""))


def sort_issues(issues: Iterable[PolicyIssue]) -> tuple[PolicyIssue, ...]:
    """De-duplicate and sort, so the same bundle always yields the same list."""
    return tuple(sorted(set(issues)))


def format_issues(issues: Iterable[PolicyIssue], fmt: Literal["text", "json"]) -> str:
    """Render issues for people (one OPA-style line each) or scripts (a JSON list)."""
    ordered = sort_issues(issues)
    if fmt == "json":
        return json.dumps([asdict(issue) for issue in ordered], indent=2, ensure_ascii=False)
    return "\n".join(str(issue) for issue in ordered)
