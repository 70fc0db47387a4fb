"""Checks one policy file against the policy format's own JSON Schema.

The schema (``policy_format.schema.json``) is the single statement of the format: editors can
use it for completion, and the loader enforces it here. jsonschema's errors name JSON paths and
Python reprs; we turn each into a ``PolicyIssue`` at the line:col of the offending key or value,
with a stable code and a message in the policy's own words.

Each check also reports which paths it leaves unusable ("blocked"), so later stages skip them
instead of piling follow-on errors onto one typo. An unknown field does not block: the rest of
the mapping is still well-formed.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

from sidecar.policy.issues import Code, PolicyIssue
from sidecar.policy.schemas import ecma_pattern_keyword
from sidecar.policy.yamlnodes import Path, YamlDocument

SCHEMA: dict[str, Any] = json.loads(
    resources.files("sidecar.policy").joinpath("policy_format.schema.json").read_text("utf-8")
)


_Validator: Any = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, {"pattern": ecma_pattern_keyword}
)
_VALIDATOR = _Validator(SCHEMA)
_DEFS = SCHEMA["$defs"]
_DURATION_PATTERN = _DEFS["duration"]["pattern"]
_NAME_PATTERN = _DEFS["name"]["pattern"]
_SUBJECT_PATTERN = _DEFS["subject"]["pattern"]
_APPROVAL_ONLY = tuple(_DEFS["tier"]["else"]["properties"])

SECTION_NOUNS = {
    "agents": "agent",
    "roles": "role",
    "approver_roles": "approver role",
    "issuers": "issuer",
    "dev_directory": "dev subject",
    "tools": "tool",
    "kill_switches": "kill switch",
}
"""Every named section and what one entry of it is called in messages."""

_JSON_TYPES = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "boolean": "true or false",
    "integer": "an integer",
    "number": "a number",
    "null": "empty",
}


@dataclass(frozen=True, slots=True)
class FormatCheck:
    """The issues of one file, and the paths those issues leave unusable."""

    issues: tuple[PolicyIssue, ...]
    blocked: frozenset[Path]

    def usable(self, path: Path) -> bool:
        """True if no blocking issue lies at, above or below ``path``."""
        return not any(path[: len(bad)] == bad or bad[: len(path)] == path for bad in self.blocked)

    def usable_above(self, path: Path) -> bool:
        """True if no blocking issue lies at or above ``path`` (some may lie below it): a list
        whose items are worth checking one by one."""
        return not any(path[: len(bad)] == bad for bad in self.blocked)


def format_validator(schema: dict[str, Any]) -> Any:
    """A validator for another YAML format of ours (policy tests), reporting like this one."""
    return _Validator(schema)


def check_format(document: YamlDocument, file: str, validator: Any = None) -> FormatCheck:
    """Validate a parsed file against the policy format (or the format ``validator`` checks)."""
    validator = _VALIDATOR if validator is None else validator
    if not isinstance(document.value, dict):
        found = _kind(document.value)
        issue = PolicyIssue(
            file,
            *document.value_position(()),
            Code.WRONG_TYPE,
            f"a policy file must be a mapping of sections, not {found}",
            hint="sections: " + ", ".join(SCHEMA["properties"]),
        )
        return FormatCheck((issue,), frozenset({()}))
    issues: list[PolicyIssue] = []
    blocked: set[Path] = set(document.damaged)
    for error in validator.iter_errors(document.value):
        path = tuple(error.absolute_path)
        if any(path[: len(bad)] == bad for bad in document.damaged):
            continue  # the YAML stage already reported this value
        for issue, bad in _translate(error, document, file):
            issues.append(issue)
            if bad is not None:
                blocked.add(bad)
    return FormatCheck(tuple(issues), frozenset(blocked))


def did_you_mean(word: str, candidates: Collection[str]) -> str:
    """A "did you mean 'x'?" hint for a near miss, or an empty string."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""


def describe(path: Path) -> str:
    """Name the thing at ``path`` the way an author thinks of it ("tier 2 of tool 'x'")."""
    if not path:
        return "the policy file"
    section = path[0]
    if section == "cases" and len(path) >= 2 and isinstance(path[1], int):
        return _describe_case(path)
    if len(path) == 1 or section not in SECTION_NOUNS:
        return f"'{section}'"
    thing = f"{SECTION_NOUNS[str(section)]} '{path[1]}'"
    if section == "tools" and len(path) >= 4 and path[2] == "tiers" and isinstance(path[3], int):
        return f"tier {path[3] + 1} of {thing}"
    return thing


def _describe_case(path: Path) -> str:
    """Parts of a policy test file: "test case 3", "'expect' of test case 3"."""
    case = f"test case {int(path[1]) + 1}"
    if len(path) == 2:
        return case
    if len(path) >= 4 and path[2] == "grants" and isinstance(path[3], int):
        return f"grant {path[3] + 1} of {case}"
    return f"'{path[2]}' of {case}"


def _field(path: Path) -> str:
    """Name the field at ``path``: its key, or "item N of 'key'"."""
    if not path:
        return "the policy file"
    last = path[-1]
    if isinstance(last, int):
        parent = f" of '{path[-2]}'" if len(path) > 1 else ""
        return f"item {last + 1}{parent}"
    return f"'{last}'"


def _quote(value: object) -> str:
    """A value for a message, quoted, with control characters escaped."""
    text = str(value)
    return f"'{text}'" if text.isprintable() else repr(text)


def _kind(value: object) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int):
        return "an integer"
    return "a number"


@dataclass(frozen=True, slots=True)
class _Error:
    """The parts of a jsonschema error we use, with plain types (its own are loosely typed)."""

    path: Path
    keyword: str
    expected: Any
    instance: Any
    schema: Any
    schema_path: tuple[str | int, ...]
    message: str

    @classmethod
    def of(cls, error: ValidationError) -> _Error:
        raw: Any = error
        return cls(
            path=tuple(raw.absolute_path),
            keyword=str(raw.validator) if raw.validator is not None else "false",
            expected=raw.validator_value,
            instance=raw.instance,
            schema=raw.schema,
            schema_path=tuple(raw.relative_schema_path),
            message=str(raw.message),
        )


@dataclass(frozen=True, slots=True)
class _Context:
    """Where issues go: the file, its positions, and the error being translated."""

    file: str
    document: YamlDocument
    error: _Error

    def at_key(self, where: Path, code: Code, message: str, hint: str = "") -> PolicyIssue:
        position = self.document.key_position(where)
        return PolicyIssue(self.file, *position, code, message, hint=hint)

    def at_value(self, where: Path, code: Code, message: str, hint: str = "") -> PolicyIssue:
        position = self.document.value_position(where)
        return PolicyIssue(self.file, *position, code, message, hint=hint)


_Translated = Iterator[tuple[PolicyIssue, Path | None]]


def _translate(error: ValidationError, document: YamlDocument, file: str) -> _Translated:
    """One jsonschema error → issues, each with the path it blocks (None: blocks nothing)."""
    context = _Context(file, document, _Error.of(error))
    if "propertyNames" in context.error.schema_path:
        return _invalid_name(context)
    handler = _HANDLERS.get(context.error.keyword, _invalid_value)
    return handler(context)


def _invalid_name(context: _Context) -> _Translated:
    error = context.error
    name = str(error.instance)
    where = (*error.path, name)
    noun = SECTION_NOUNS.get(str(error.path[0]), "entry") if error.path else "entry"
    yield context.at_key(where, Code.INVALID_NAME, _name_problem(noun, name, error)), where


def _unknown_fields(context: _Context) -> _Translated:
    error = context.error
    if not isinstance(error.instance, dict) or error.expected is not False:
        yield from _invalid_value(context)
        return
    allowed = list(error.schema.get("properties", {})) if isinstance(error.schema, dict) else []
    for extra in sorted(set(error.instance) - set(allowed)):
        hint = did_you_mean(extra, allowed) or "allowed: " + ", ".join(allowed)
        message = f"unknown field {_quote(extra)} in {describe(error.path)}"
        yield context.at_key((*error.path, extra), Code.UNKNOWN_FIELD, message, hint), None


def _not_allowed(context: _Context) -> _Translated:
    """A `false` schema: a field this entry may not have in its present form."""
    path = context.error.path
    if not path:
        return
    if path[0] == "kill_switches" and len(path) >= 2:
        target = (*path[:2], "target")
        message = "a global kill switch takes no 'target'"
        hint = "remove 'target', or make the switch's scope agent or tool"
        yield context.at_key(target, Code.FIELD_NOT_ALLOWED, message, hint), None
        return
    if path[-1] in _APPROVAL_ONLY:
        path = path[:-1]
    owner = _value_at(context.document.value, path)
    for key in _APPROVAL_ONLY:
        if isinstance(owner, dict) and key in owner:
            message = f"'{key}' is only allowed in a require_approval tier"
            yield context.at_key((*path, key), Code.FIELD_NOT_ALLOWED, message), None


def _missing(context: _Context) -> _Translated:
    error = context.error
    if not isinstance(error.instance, dict):
        return
    when = " when action is require_approval" if "then" in error.schema_path else ""
    for missing in error.expected:
        if missing not in error.instance:
            message = f"'{missing}' is required in {describe(error.path)}{when}"
            yield context.at_key(error.path, Code.MISSING_FIELD, message), (*error.path, missing)


def _wrong_type(context: _Context) -> _Translated:
    error = context.error
    message = (
        f"{_field(error.path)} must be {_expected(error.expected)}, not {_kind(error.instance)}"
    )
    yield context.at_value(error.path, Code.WRONG_TYPE, message), error.path


def _duplicate_items(context: _Context) -> _Translated:
    error = context.error
    if not isinstance(error.instance, list):
        return
    seen: dict[str, int] = {}
    for index, item in enumerate(error.instance):
        text = json.dumps(item, sort_keys=True)
        if text not in seen:
            seen[text] = index
            continue
        line, col = context.document.value_position((*error.path, seen[text]))
        message = f"{_field(error.path)} lists '{item}' twice"
        hint = f"first listed at {line}:{col}"
        yield context.at_value((*error.path, index), Code.DUPLICATE_ITEM, message, hint), None


def _pattern(context: _Context) -> _Translated:
    error = context.error
    if error.expected == _DURATION_PATTERN:
        message = f"{_field(error.path)} is not a duration: {_quote(error.instance)}"
        hint = "a positive whole number then s, m or h, e.g. 30s, 15m, 24h"
        yield context.at_value(error.path, Code.INVALID_DURATION, message, hint), error.path
    elif error.expected in (_NAME_PATTERN, _SUBJECT_PATTERN):
        message = _name_problem("", str(error.instance), error)
        yield context.at_value(error.path, Code.INVALID_NAME, message), error.path
    else:
        yield from _invalid_value(context)


def _not_an_option(context: _Context) -> _Translated:
    error = context.error
    options = [str(option) for option in error.expected]
    message = (
        f"{_field(error.path)} must be one of {', '.join(options)}, not {_quote(error.instance)}"
    )
    hint = did_you_mean(str(error.instance), options)
    yield context.at_value(error.path, Code.INVALID_VALUE, message, hint), error.path


_BOUNDS = {
    "minItems": "must have at least {} item(s)",
    "maxItems": "must have at most {} item(s)",
    "minLength": "must not be shorter than {} character(s)",
    "maxLength": "must not be longer than {} characters",
    "minimum": "must be at least {}",
    "maximum": "must be at most {}",
}


def _invalid_value(context: _Context) -> _Translated:
    error = context.error
    template = _BOUNDS.get(error.keyword)
    if template:
        message = f"{_field(error.path)} {template.format(error.expected)}"
    else:
        message = f"{_field(error.path)}: {error.message}"
    yield context.at_value(error.path, Code.INVALID_VALUE, message), error.path


_HANDLERS = {
    "additionalProperties": _unknown_fields,
    "false": _not_allowed,
    "required": _missing,
    "type": _wrong_type,
    "uniqueItems": _duplicate_items,
    "pattern": _pattern,
    "enum": _not_an_option,
}


def _name_problem(noun: str, name: str, error: _Error) -> str:
    what = f"{noun} name" if noun else "name"
    if error.keyword == "maxLength":
        return f"{what} {_quote(name)} is longer than {error.expected} characters"
    if error.expected == _NAME_PATTERN:
        rule = "a letter, then letters, digits, '_', '.' or '-'"
    else:
        rule = "printable ASCII without spaces"
    return f"{what} {_quote(name)} is not valid: use {rule}"


def _value_at(value: Any, path: Path) -> Any:
    for part in path:
        if isinstance(value, dict) and isinstance(part, str):
            value = value.get(part)
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]
        else:
            return None
    return value


def _expected(types: object) -> str:
    if isinstance(types, list):
        return " or ".join(_JSON_TYPES.get(str(t), str(t)) for t in types)
    return _JSON_TYPES.get(str(types), str(types))
