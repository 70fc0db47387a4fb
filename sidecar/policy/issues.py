"""Policy problems as data: where (file:line:col), what (a stable code), and how bad.

The loader never stops at the first problem: it collects every issue, de-duplicates and sorts
them by location, so one ``proviso lint`` run shows an author everything to fix. Codes are part
of the interface (scripts and tests match on them); messages are for people and may change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
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
    PIN_NOT_IN_SCHEMA = "PIN_NOT_IN_SCHEMA"
    REDACT_NOT_IN_SCHEMA = "REDACT_NOT_IN_SCHEMA"
    UNREACHABLE_TIER = "UNREACHABLE_TIER"
    # Warnings
    WRITE_TOOL_WITHOUT_PINS = "WRITE_TOOL_WITHOUT_PINS"


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


def sort_issues(issues: Iterable[PolicyIssue]) -> tuple[PolicyIssue, ...]:
    """De-duplicate and sort, so the same bundle always yields the same list."""
    return tuple(sorted(set(issues)))


def format_issues(issues: Iterable[PolicyIssue], fmt: Literal["text", "json"]) -> str:
    """Render issues for people (one OPA-style line each) or scripts (a JSON list)."""
    ordered = sort_issues(issues)
    if fmt == "json":
        return json.dumps([asdict(issue) for issue in ordered], indent=2, ensure_ascii=False)
    return "\n".join(str(issue) for issue in ordered)
