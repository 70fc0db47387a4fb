"""Load a policy bundle: a directory of YAML files → one immutable, compiled ``Policy``.

The stages, each collecting every issue it finds rather than stopping at the first:

1. find and read the bundle's files (``*.yaml``/``*.yml``, recursively, sorted; ``*_test.yaml``
   files are policy unit tests and not part of the policy);
2. parse YAML with line marks (``yamlnodes``), refusing duplicate keys, anchors and aliases;
3. check each file against the policy format's JSON Schema (``policy_format``);
4. merge the sections of all files; a name defined twice is an error;
5. resolve references (agent → roles, role → tools, tier → approver roles, issuer → agents);
6. compile each tool's argument schema and each tier's CEL condition;
7. semantic checks (unreachable tiers, pins, redacted arguments, write tools without pins).

``load_policy`` builds the ``Policy`` only when no error was found, so the sidecar either swaps
in a whole, valid policy or keeps the one it has. ``lint_policy`` returns every issue.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

from sidecar.errors import PolicyLoadError
from sidecar.policy.conditions import (
    Condition,
    ConditionCompileError,
    ConditionEvaluationError,
    bind_variables,
)
from sidecar.policy.issues import Code, PolicyIssue, Severity, sort_issues, with_fix_hint
from sidecar.policy.model import (
    DEFAULT_APPROVAL_TTL_SECONDS,
    Agent,
    ApproverRole,
    Controls,
    DevSubject,
    Issuer,
    KillScope,
    KillSwitch,
    Policy,
    RateLimit,
    Role,
    Rule,
    SourceLocation,
    Tier,
    TierAction,
    Tool,
    _frozen,
)
from sidecar.policy.policy_format import (
    SECTION_NOUNS,
    FormatCheck,
    check_format,
    describe,
    did_you_mean,
)
from sidecar.policy.schemas import (
    SCHEMA_KEYWORDS,
    ArgumentSchema,
    ArgumentSchemaError,
    unknown_keywords,
)
from sidecar.policy.yamlnodes import Path as NodePath
from sidecar.policy.yamlnodes import YamlDocument, parse_yaml

POLICY_SUFFIXES = (".yaml", ".yml")
TEST_SUFFIXES = ("_test.yaml", "_test.yml")
MAX_FILE_BYTES = 1024 * 1024
"""Policies are small; a bigger file is a mistake (or an attack on the loader)."""

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}
_BUNDLE = "."


def load_policy(directory: Path) -> Policy:
    """Load and compile the bundle in ``directory``.

    Raises:
        PolicyLoadError: the bundle has errors; ``issues`` holds every error, sorted. Warnings
            never block loading (``lint_policy`` reports them).
    """
    policy, issues, version = _compile(directory)
    errors = tuple(issue for issue in issues if issue.severity is Severity.ERROR)
    if errors or policy is None:
        raise PolicyLoadError(errors, version=version)
    return policy


def lint_policy(directory: Path) -> tuple[PolicyIssue, ...]:
    """Every issue of the bundle in ``directory``, errors and warnings, sorted by location."""
    return _compile(directory)[1]


def policy_files(directory: Path) -> tuple[str, ...]:
    """The bundle's policy files, relative POSIX paths, sorted; hidden files and dirs skipped."""
    return _yaml_files(directory, tests=False)


def policy_test_files(directory: Path) -> tuple[str, ...]:
    """The bundle's policy unit tests (``*_test.yaml``), found by the same rules as policy."""
    return _yaml_files(directory, tests=True)


def _yaml_files(directory: Path, *, tests: bool) -> tuple[str, ...]:
    found: list[str] = []
    for root, dirnames, filenames in os.walk(directory, followlinks=False):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in filenames:
            lowered = name.lower()
            if name.startswith(".") or not lowered.endswith(POLICY_SUFFIXES):
                continue
            if lowered.endswith(TEST_SUFFIXES) is tests:
                found.append((Path(root) / name).relative_to(directory).as_posix())
    return tuple(sorted(found))


def bundle_fingerprint(directory: Path) -> str:
    """The version the bundle in ``directory`` would load as, from its bytes alone.

    Cheap next to a load (no parsing or compiling), so a watcher can poll it. Unreadable or
    oversized files hash as empty: the load that follows reports them properly.
    """
    contents: dict[str, bytes] = {}
    for name in policy_files(directory):
        contents[name] = _read(directory / name, name, []) or b""
    return bundle_version(contents)


def read_text(directory: Path, name: str, issues: list[PolicyIssue]) -> str | None:
    """One bundle file's text under the policy files' limits (size, UTF-8), or None."""
    data = _read(directory / name, name, issues)
    return None if data is None else _decode(data, name, issues)


def bundle_version(contents: Mapping[str, bytes]) -> str:
    """The content hash of a bundle: any byte changed, added or renamed gives a new version."""
    digest = hashlib.sha256()
    for name in sorted(contents):
        data = contents[name]
        encoded = name.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big") + encoded)
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()[:16]


@dataclass(slots=True)
class _File:
    """One parsed file of the bundle and what its format check left usable."""

    name: str
    document: YamlDocument
    check: FormatCheck

    def usable(self, path: NodePath) -> bool:
        return self.check.usable(path)

    def issue(
        self,
        path: NodePath,
        code: Code,
        message: str,
        *,
        hint: str = "",
        key: bool = False,
        severity: Severity = Severity.ERROR,
    ) -> PolicyIssue:
        where = self.document.key_position(path) if key else self.document.value_position(path)
        return PolicyIssue(self.name, where.line, where.col, code, message, severity, hint)

    def location(self, path: NodePath) -> SourceLocation:
        line, col = self.document.key_position(path)
        return SourceLocation(self.name, line, col)


@dataclass(slots=True)
class _Definition:
    """A named entry of a section (an agent, a tool…) and where it was defined."""

    file: _File
    path: NodePath
    body: Any

    @property
    def name(self) -> str:
        return str(self.path[1])

    def usable(self, *sub: str | int) -> bool:
        return self.file.usable((*self.path, *sub))


@dataclass(slots=True)
class _Bundle:
    """Every file's sections merged, plus what compiling them produced."""

    definitions: dict[str, dict[str, _Definition]] = field(
        default_factory=lambda: {section: {} for section in SECTION_NOUNS}
    )
    label: tuple[_File, str] | None = None
    admins: tuple[_File, Any] | None = None
    controls: tuple[_File, Any] | None = None
    duplicates: list[_Definition] = field(default_factory=list)
    schemas: dict[tuple[str, str], ArgumentSchema] = field(default_factory=dict)
    conditions: dict[tuple[str, str, str, int], Condition] = field(default_factory=dict)
    issues: list[PolicyIssue] = field(default_factory=list)

    def every(self, section: str) -> list[_Definition]:
        """All definitions in a section, duplicates included: their problems count too."""
        first = list(self.definitions[section].values())
        return first + [d for d in self.duplicates if d.path[0] == section]


def _compile(directory: Path) -> tuple[Policy | None, tuple[PolicyIssue, ...], str]:
    """The policy (None on any error), every issue, and the version of the bytes read (as
    ``bundle_fingerprint`` would hash them; empty when no file was found)."""
    bundle = _Bundle()
    contents, files, read = _read_bundle(directory, bundle.issues)
    for file in files:
        _merge(bundle, file)
    _resolve_references(bundle)
    _check_cost_precision(bundle)
    _compile_tools(bundle)
    issues = sort_issues(with_fix_hint(issue) for issue in bundle.issues)
    version = bundle_version(read) if read else ""
    if not contents or any(issue.severity is Severity.ERROR for issue in issues):
        return None, issues, version
    return _build(bundle, tuple(sorted(contents)), version), issues, version


def _read_bundle(
    directory: Path, issues: list[PolicyIssue]
) -> tuple[dict[str, bytes], list[_File], dict[str, bytes]]:
    """Read and parse every policy file; the raw bytes feed the version hash.

    Returns the files read, parsed, and every file's bytes as hashed for the version (those
    that could not be read as empty, as ``bundle_fingerprint`` does).
    """
    if not directory.is_dir():
        issues.append(
            PolicyIssue(_BUNDLE, 0, 0, Code.READ_ERROR, f"'{directory}' is not a directory")
        )
        return {}, [], {}
    names = policy_files(directory)
    if not names:
        message = f"no policy files (*.yaml, *.yml) in '{directory}'"
        issues.append(PolicyIssue(_BUNDLE, 0, 0, Code.NO_POLICY_FILES, message))
        return {}, [], {}
    contents: dict[str, bytes] = {}
    read: dict[str, bytes] = {}
    files: list[_File] = []
    for name in names:
        data = _read(directory / name, name, issues)
        read[name] = data or b""
        if data is None:
            continue
        contents[name] = data
        text = _decode(data, name, issues)
        if text is None:
            continue
        document, yaml_issues = parse_yaml(text, name)
        issues.extend(yaml_issues)
        if document is None:
            continue
        check = check_format(document, name)
        issues.extend(check.issues)
        files.append(_File(name, document, check))
    return contents, files, read


def _read(path: Path, name: str, issues: list[PolicyIssue]) -> bytes | None:
    """A policy file's bytes; only a regular file (or a link to one) is read.

    Opened without blocking, and anything else refused before reading: opening a named pipe
    (or a device) called ``x.yaml`` would otherwise wait for a writer forever, and with it the
    load, the server's reload lock and its watcher.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as stream:
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                message = "cannot read the file: not a regular file"
                issues.append(PolicyIssue(name, 0, 0, Code.READ_ERROR, message))
                return None
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        issues.append(PolicyIssue(name, 0, 0, Code.READ_ERROR, f"cannot read the file: {reason}"))
        return None
    if len(data) > MAX_FILE_BYTES:
        message = f"the file is larger than {MAX_FILE_BYTES // 1024} KiB"
        issues.append(PolicyIssue(name, 0, 0, Code.FILE_TOO_LARGE, message))
        return None
    return data


def _decode(data: bytes, name: str, issues: list[PolicyIssue]) -> str | None:
    """Policies are UTF-8 (a leading byte-order mark is tolerated)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        col = len(data[line_start : exc.start].decode("utf-8", "replace")) + 1
        message = f"the file is not valid UTF-8 (byte 0x{data[exc.start]:02x})"
        issues.append(PolicyIssue(name, line, col, Code.INVALID_ENCODING, message))
        return None


def _merge(bundle: _Bundle, file: _File) -> None:
    """Add one file's sections to the bundle; the first definition of a name wins."""
    value = file.document.value
    if not isinstance(value, dict):
        return
    for section, entries in value.items():
        if section not in SECTION_NOUNS or not isinstance(entries, dict):
            continue
        defined = bundle.definitions[section]
        for name, body in entries.items():
            path = (section, name)
            first = defined.get(name)
            if first is None:
                defined[name] = _Definition(file, path, body)
                continue
            bundle.duplicates.append(_Definition(file, path, body))
            message = f"{SECTION_NOUNS[section]} '{name}' is defined twice"
            hint = f"first defined at {first.file.location(first.path)}"
            bundle.issues.append(
                file.issue(path, Code.DUPLICATE_DEFINITION, message, hint=hint, key=True)
            )
    if "label" in value and file.usable(("label",)):
        if bundle.label is None:
            bundle.label = (file, str(value["label"]))
        else:
            first_file = bundle.label[0]
            hint = f"first set at {first_file.location(('label',))}"
            message = "the bundle's label is set in more than one file"
            bundle.issues.append(
                file.issue(("label",), Code.DUPLICATE_LABEL, message, hint=hint, key=True)
            )
    for once in ("admins", "controls"):
        if once not in value:
            continue
        first = getattr(bundle, once)
        if first is None:
            setattr(bundle, once, (file, value[once]))
            continue
        hint = f"first set at {first[0].location((once,))}"
        message = f"'{once}' is set in more than one file"
        bundle.issues.append(
            file.issue((once,), Code.DUPLICATE_DEFINITION, message, hint=hint, key=True)
        )


def _references(definition: _Definition, field_name: str) -> Iterator[tuple[NodePath, str]]:
    """The names a definition lists under ``field_name``, with their paths; none if unusable."""
    if not definition.usable(field_name) or not isinstance(definition.body, dict):
        return
    names = definition.body.get(field_name)
    if not isinstance(names, list):
        return
    for index, name in enumerate(names):
        if isinstance(name, str):
            yield (*definition.path, field_name, index), name


def _resolve_references(bundle: _Bundle) -> None:
    """Every name a definition uses must be defined somewhere in the bundle."""
    defined = bundle.definitions
    checks = (
        ("agents", "roles", "roles", Code.UNDEFINED_ROLE),
        ("roles", "tools", "tools", Code.UNDEFINED_TOOL),
        ("issuers", "agents", "agents", Code.UNDEFINED_AGENT),
    )
    for section, field_name, target, code in checks:
        for definition in bundle.every(section):
            for path, name in _references(definition, field_name):
                if name in defined[target]:
                    continue
                noun = SECTION_NOUNS[target]
                message = f"{describe(definition.path)} refers to undefined {noun} '{name}'"
                hint = did_you_mean(name, defined[target])
                bundle.issues.append(definition.file.issue(path, code, message, hint=hint))
    for tool in bundle.every("tools"):
        for index, tier in _tiers(tool):
            tier_definition = _Definition(tool.file, (*tool.path, "tiers", index), tier)
            for path, name in _references(tier_definition, "approver_roles"):
                if name in defined["approver_roles"]:
                    continue
                message = (
                    f"tier '{tier.get('name', index + 1)}' of tool '{tool.name}' "
                    f"refers to undefined approver role '{name}'"
                )
                hint = did_you_mean(name, defined["approver_roles"])
                bundle.issues.append(
                    tool.file.issue(path, Code.UNDEFINED_APPROVER_ROLE, message, hint=hint)
                )
    _resolve_control_references(bundle)


def _resolve_control_references(bundle: _Bundle) -> None:
    """Budgets, rate limits and kill switches must name tools and agents that exist."""
    defined = bundle.definitions
    named: list[tuple[_File, NodePath, str, str]] = []
    if bundle.controls is not None and isinstance(bundle.controls[1], dict):
        file, controls = bundle.controls
        budget = controls.get("run_budget")
        per_tool = budget.get("max_calls_per_tool") if isinstance(budget, dict) else None
        if isinstance(per_tool, dict) and file.usable(("controls", "run_budget")):
            path: NodePath = ("controls", "run_budget", "max_calls_per_tool")
            named += [(file, (*path, name), name, "tools") for name in per_tool]
        limits = controls.get("rate_limits")
        agents = limits.get("agents") if isinstance(limits, dict) else None
        if isinstance(agents, dict) and file.usable(("controls", "rate_limits")):
            path = ("controls", "rate_limits", "agents")
            named += [(file, (*path, name), name, "agents") for name in agents]
    for switch in bundle.every("kill_switches"):
        body = switch.body
        if isinstance(body, dict) and switch.usable() and body.get("scope") in ("agent", "tool"):
            target = str(body.get("target", ""))
            section = "agents" if body["scope"] == "agent" else "tools"
            named.append((switch.file, (*switch.path, "target"), target, section))
    codes = {"tools": Code.UNDEFINED_TOOL, "agents": Code.UNDEFINED_AGENT}
    for file, path, name, section in named:
        if name in defined[section]:
            continue
        message = f"{describe(path[:2])} refers to undefined {SECTION_NOUNS[section]} '{name}'"
        hint = did_you_mean(name, defined[section])
        key = path[-1] == name
        bundle.issues.append(file.issue(path, codes[section], message, hint=hint, key=key))


COST_DECIMALS = 6
"""Budgets count costs in millionths (integers in the state store)."""


def _check_cost_precision(bundle: _Bundle) -> None:
    """A ``cost`` or ``max_cost`` finer than a millionth is an error: the store counts
    millionths, so a cost of 0.0000004 was counted as 0 and never spent the run's budget."""
    places: list[tuple[_File, NodePath, Any]] = []
    for tool in bundle.every("tools"):
        if isinstance(tool.body, dict) and "cost" in tool.body and tool.usable("cost"):
            places.append((tool.file, (*tool.path, "cost"), tool.body["cost"]))
    if bundle.controls is not None and isinstance(bundle.controls[1], dict):
        file, controls = bundle.controls
        budget = controls.get("run_budget")
        path: NodePath = ("controls", "run_budget", "max_cost")
        if isinstance(budget, dict) and "max_cost" in budget and file.usable(path):
            places.append((file, path, budget["max_cost"]))
    for file, path, value in places:
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        number = Decimal(str(value))
        exponent = number.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -COST_DECIMALS:
            message = f"'{path[-1]}' {number:f} is finer than a millionth"
            hint = f"budgets count costs in millionths: use at most {COST_DECIMALS} decimals"
            bundle.issues.append(file.issue(path, Code.INVALID_VALUE, message, hint=hint))


def _tiers(tool: _Definition) -> Iterator[tuple[int, dict[str, Any]]]:
    """The tool's usable tiers, with their indexes: one broken tier does not hide the errors
    of the others (their conditions are still compiled and their references checked)."""
    if not isinstance(tool.body, dict) or not tool.file.check.usable_above((*tool.path, "tiers")):
        return
    tiers = tool.body.get("tiers")
    if not isinstance(tiers, list):
        return
    for index, tier in enumerate(tiers):
        if isinstance(tier, dict) and tool.usable("tiers", index):
            yield index, tier


def _compile_tools(bundle: _Bundle) -> None:
    for tool in bundle.every("tools"):
        if not isinstance(tool.body, dict):
            continue
        schema = _compile_arguments(bundle, tool)
        _check_pins(bundle, tool, schema)
        known = _argument_names(schema)
        _compile_rules(bundle, tool, known)
        _check_redact(bundle, tool, schema)
        _compile_tiers(bundle, tool, known)


class _Arguments(NamedTuple):
    """The arguments a tool's schema names, and whether it allows no others."""

    names: frozenset[str]
    closed: bool
    """``additionalProperties: false`` without ``patternProperties``: another name is never
    present in a call that reaches a condition."""


def _argument_names(schema: ArgumentSchema | None) -> _Arguments | None:
    """The arguments the schema names (None when it names none: nothing to check against)."""
    document = schema.document if schema is not None else {}
    properties = document.get("properties")
    if not isinstance(properties, dict) or not properties:
        return None
    closed = document.get("additionalProperties") is False and not document.get("patternProperties")
    return _Arguments(frozenset(properties), closed)


def _compile_arguments(bundle: _Bundle, tool: _Definition) -> ArgumentSchema | None:
    """Compile the arguments' JSON Schema; problems point into the schema itself."""
    document = tool.body.get("arguments")
    if not tool.usable("arguments") or not isinstance(document, dict):
        return None
    arguments_path = (*tool.path, "arguments")
    problems = list(_reference_problems(document, ()))
    try:
        schema = ArgumentSchema(document)
    except ArgumentSchemaError as exc:
        problems.append((_schema_path(document, exc.path), exc.message))
        schema = None
    for where, message in problems:
        bundle.issues.append(
            tool.file.issue(
                (*arguments_path, *where),
                Code.INVALID_SCHEMA,
                f"invalid arguments schema of tool '{tool.name}' at {_at(where)}: {message}",
            )
        )
    for where in unknown_keywords(document):
        keyword = str(where[-1])
        bundle.issues.append(
            tool.file.issue(
                (*arguments_path, *where),
                Code.UNKNOWN_SCHEMA_KEYWORD,
                f"unknown keyword '{keyword}' in the arguments schema of tool '{tool.name}' "
                f"at {_at(where[:-1])}: JSON Schema ignores it, so it constrains nothing",
                hint=did_you_mean(keyword, sorted(SCHEMA_KEYWORDS)),
                key=True,
            )
        )
    if schema is not None and not problems:
        bundle.schemas[tool.file.name, tool.name] = schema
    return None if problems else schema


def _at(where: NodePath) -> str:
    """A place in an arguments schema as its issues name it: ``/properties/amount``, ``/``."""
    return "".join(f"/{part}" for part in where) or "/"


def _schema_path(document: Any, pointer: str) -> NodePath:
    """A JSON pointer into the schema → a node path (list indexes as ints)."""
    parts: list[str | int] = []
    value = document
    for raw in pointer.split("/")[1:] if pointer else []:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(value, list) and token.isdigit():
            parts.append(int(token))
            value = value[int(token)] if int(token) < len(value) else None
        else:
            parts.append(token)
            value = value.get(token) if isinstance(value, dict) else None
    return tuple(parts)


_SCHEMA_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
"""Keywords whose values are instance data, not schemas: a ``$ref`` in them refers nowhere."""


def _reference_problems(
    schema: Any, where: NodePath, resource: Any = None
) -> Iterator[tuple[NodePath, str]]:
    """``$ref``s must point inside the schema and resolve; nothing is ever fetched.

    jsonschema would only notice a dangling reference when a call arrives, and then every call
    of the tool would be denied; we would rather say so at load.
    """
    if isinstance(schema, list):
        for index, item in enumerate(schema):
            yield from _reference_problems(item, (*where, index), resource)
        return
    if not isinstance(schema, dict):
        return
    if resource is None or "$id" in schema:
        resource = schema
    for key, value in schema.items():
        if key in ("$ref", "$dynamicRef") and isinstance(value, str):
            if not value.startswith("#"):
                yield (*where, key), f"'{value}' is not a reference inside the schema"
            elif value.startswith("#/") and not _resolves(resource, value[1:]):
                yield (*where, key), f"'{value}' does not resolve"
            elif value != "#" and value[1] != "/" and value[1:] not in _anchors(resource):
                yield (*where, key), f"'{value}' does not resolve: no such $anchor"
        elif key not in _SCHEMA_DATA_KEYWORDS:
            yield from _reference_problems(value, (*where, key), resource)


def _anchors(resource: Any, *, top: bool = True) -> set[str]:
    """The ``$anchor`` and ``$dynamicAnchor`` names a ``#name`` reference in ``resource`` may
    point to: its own, not those of a resource nested in it (with its own ``$id``)."""
    found: set[str] = set()
    if isinstance(resource, list):
        for item in resource:
            found |= _anchors(item, top=False)
    elif isinstance(resource, dict) and (top or "$id" not in resource):
        for key, value in resource.items():
            if key in ("$anchor", "$dynamicAnchor") and isinstance(value, str):
                found.add(value)
            elif key not in _SCHEMA_DATA_KEYWORDS:
                found |= _anchors(value, top=False)
    return found


def _resolves(document: Any, pointer: str) -> bool:
    value = document
    for raw in pointer.split("/")[1:]:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict) and token in value:
            value = value[token]
        elif isinstance(value, list) and token.isdigit() and int(token) < len(value):
            value = value[int(token)]
        else:
            return False
    return True


def _check_pins(bundle: _Bundle, tool: _Definition, schema: ArgumentSchema | None) -> None:
    """Pins name string arguments (a token pins them to one value); writes should have some."""
    body = tool.body
    pins = body.get("pins") if tool.usable("pins") else None
    if body.get("writes") is True and tool.usable("writes") and not pins:
        message = (
            f"write tool '{tool.name}' has no pins: "
            "a token for it cannot be limited to one resource"
        )
        hint = "add 'pins' naming the argument that identifies the resource, if there is one"
        bundle.issues.append(
            tool.file.issue(
                tool.path,
                Code.WRITE_TOOL_WITHOUT_PINS,
                message,
                hint=hint,
                key=True,
                severity=Severity.WARNING,
            )
        )
    if schema is None or not isinstance(pins, list):
        return
    properties = schema.document.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    strings = [
        name
        for name, subschema in properties.items()
        if isinstance(subschema, dict) and subschema.get("type") == "string"
    ]
    for index, pin in enumerate(pins):
        if pin in strings:
            continue
        message = f"pin '{pin}' of tool '{tool.name}' is not a string property of its arguments"
        hint = did_you_mean(str(pin), strings)
        bundle.issues.append(
            tool.file.issue((*tool.path, "pins", index), Code.PIN_NOT_IN_SCHEMA, message, hint=hint)
        )


def _check_redact(bundle: _Bundle, tool: _Definition, schema: ArgumentSchema | None) -> None:
    """Redacted arguments must be properties of the schema: a typo would leak the value."""
    names = tool.body.get("redact") if tool.usable("redact") else None
    if schema is None or not isinstance(names, list):
        return
    properties = schema.document.get("properties")
    known = list(properties) if isinstance(properties, dict) else []
    for index, name in enumerate(names):
        if name in known:
            continue
        message = f"redacted argument '{name}' of tool '{tool.name}' is not in its arguments schema"
        bundle.issues.append(
            tool.file.issue(
                (*tool.path, "redact", index),
                Code.REDACT_NOT_IN_SCHEMA,
                message,
                hint=did_you_mean(str(name), known),
            )
        )


def _compile_tiers(bundle: _Bundle, tool: _Definition, known: _Arguments | None) -> None:
    """Compile conditions; check tier names are unique and every tier can be reached."""
    names: dict[str, int] = {}
    always: str | None = None  # why the tiers from here on can never match
    for index, tier in _tiers(tool):
        tier_path = (*tool.path, "tiers", index)
        name = tier.get("name")
        if isinstance(name, str):
            if name in names:
                message = f"tool '{tool.name}' has two tiers named '{name}'"
                first = tool.file.document.key_line((*tool.path, "tiers", names[name]))
                hint = f"first at line {first}"
                bundle.issues.append(
                    tool.file.issue(
                        (*tier_path, "name"), Code.DUPLICATE_DEFINITION, message, hint=hint
                    )
                )
            else:
                names[name] = index
        label = f"'{name}'" if isinstance(name, str) else str(index + 1)
        if always is not None:
            message = f"tier {label} of tool '{tool.name}' can never match"
            bundle.issues.append(
                tool.file.issue(tier_path, Code.UNREACHABLE_TIER, message, hint=always)
            )
        if "approver_condition" in tier:  # a tier without `when` has one too (the catch-all)
            what = f"approver condition of tier {label} of tool '{tool.name}'"
            where = ("tiers", index, "approver_condition")
            _compile_condition(bundle, tool, where, what, approver=True)
        line = tool.file.document.value_position(tier_path).line
        source = tier.get("when")
        if source is None or (isinstance(source, str) and source.strip() == "true"):
            if always is None:
                always = f"tier '{name}' at line {line} has no condition and always matches"
            continue
        what = f"condition of tier {label} of tool '{tool.name}'"
        _compile_condition(bundle, tool, ("tiers", index, "when"), what, known)
        condition = bundle.conditions.get((tool.file.name, tool.name, "tiers", index))
        if always is None and condition is not None and _always_holds(condition):
            always = f"the condition of tier '{name}' at line {line} is always true"


def _always_holds(condition: Condition) -> bool:
    """True for a condition that reads no variable and holds: ``1 == 1``, ``(true)``."""
    if condition.variables:
        return False
    try:
        return condition.evaluate(bind_variables({}))
    except ConditionEvaluationError:
        return False


def _compile_rules(bundle: _Bundle, tool: _Definition, known: _Arguments | None) -> None:
    """Compile each business rule's ``require`` expression."""
    rules = tool.body.get("rules") if tool.usable("rules") else None
    if not isinstance(rules, list):
        return
    names: dict[str, int] = {}
    for index, rule in enumerate(rules):
        if isinstance(rule, dict):
            name = rule.get("name")
            if isinstance(name, str) and name in names:  # a denial names its rule
                first = tool.file.document.key_line((*tool.path, "rules", names[name]))
                bundle.issues.append(
                    tool.file.issue(
                        (*tool.path, "rules", index, "name"),
                        Code.DUPLICATE_DEFINITION,
                        f"tool '{tool.name}' has two rules named '{name}'",
                        hint=f"first at line {first}",
                    )
                )
            elif isinstance(name, str):
                names[name] = index
            label = f"'{rule['name']}'" if isinstance(rule.get("name"), str) else str(index + 1)
            what = f"rule {label} of tool '{tool.name}'"
            _compile_condition(bundle, tool, ("rules", index, "require"), what, known)


def _compile_condition(
    bundle: _Bundle,
    tool: _Definition,
    where: tuple[str, int, str],
    what: str,
    known: _Arguments | None = None,
    *,
    approver: bool = False,
) -> None:
    """Compile one CEL expression; an error points inside the expression in the file.

    CEL sees ``args`` as a map of anything, so a misspelt argument type-checks and only fails
    (closed) at run time: ``args.NAME`` for a NAME the schema lacks is warned about here.
    """
    section, index, key = where
    path = (*tool.path, *where)
    source = tool.body[section][index].get(key)
    if not isinstance(source, str) or not tool.file.usable(path):
        return
    try:
        slot = "approver" if approver else section
        bundle.conditions[tool.file.name, tool.name, slot, index] = Condition(
            source, approver=approver
        )
    except ConditionCompileError as exc:
        code = Code.CEL_SYNTAX if exc.message.startswith("Syntax error") else Code.CEL_TYPE
        line, col = tool.file.document.position_in_scalar(path, exc.line, exc.col)
        message = f"{what}: {exc.message}"
        bundle.issues.append(PolicyIssue(tool.file.name, line, col, code, message))
        return
    for offset, problem in _regex_problems(source):
        line, col = _position_in(tool.file, path, source, offset)
        message = f"{what}: {problem}"
        bundle.issues.append(PolicyIssue(tool.file.name, line, col, Code.CEL_SYNTAX, message))
    if known is None or approver:
        return
    for offset, name in _argument_references(source):
        if name in known.names:
            continue
        line, col = _position_in(tool.file, path, source, offset)
        message = f"{what} reads args.{name}, which the tool's arguments schema does not define"
        if known.closed:  # it can never be there: `!has(args.typo) || ...` always holds
            message += ", and its additionalProperties: false refuses any other argument"
        bundle.issues.append(
            PolicyIssue(
                tool.file.name, line, col, Code.CEL_UNKNOWN_ARGUMENT, message,
                severity=Severity.ERROR if known.closed else Severity.WARNING,
                hint=did_you_mean(name, known.names),
            )
        )  # fmt: skip


def _position_in(file: _File, path: NodePath, source: str, offset: int) -> tuple[int, int]:
    """The file's line and column of ``source[offset]``, ``source`` being the scalar at
    ``path``."""
    before = source[:offset]
    return file.document.position_in_scalar(
        path, before.count("\n") + 1, offset - before.rfind("\n")
    )


_CEL_STRING_RE = re.compile(
    r"""[rRbB]*(?:'''.*?'''|\"\"\".*?\"\"\"|'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")""",
    re.DOTALL,
)
"""A CEL string or bytes literal (quoted, triple-quoted, raw): blanked before looking for
``args.`` so that text inside strings is not taken for a reference."""
_ARGS_FIELD_RE = re.compile(r"(?<![\w.])args\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)\b(?!\s*\()")
"""``args.NAME``, not ``args.size()`` or ``args.all(k, ...)``: a method of the map itself."""


def _without_strings(source: str) -> str:
    """``source`` with every string literal blanked, offsets kept: what is code in it."""
    return _CEL_STRING_RE.sub(lambda m: " " * len(m.group()), source)


_MATCHES_CALL_RE = re.compile(r"\.\s*matches\s*\(")


def _regex_problems(source: str) -> Iterator[tuple[int, str]]:
    """``(offset, problem)`` of each ``.matches('literal')`` whose pattern RE2 refuses.

    CEL compiles such a pattern only when it runs: the condition would load, then fail (deny)
    on every call. Each literal is tried once, as CEL itself reads it.
    """
    literals = {m.start(): m.group() for m in _CEL_STRING_RE.finditer(source)}
    for call in _MATCHES_CALL_RE.finditer(_without_strings(source)):
        start = call.end() + len(source[call.end() :]) - len(source[call.end() :].lstrip())
        literal = literals.get(start)
        if literal is None or literal[0] in "bB":
            continue
        try:
            Condition(f"''.matches({literal})").evaluate(bind_variables({}))
        except ConditionCompileError:
            continue  # not a string literal CEL takes here; the condition compiled regardless
        except ConditionEvaluationError as exc:
            yield start, str(exc).removeprefix("INVALID_ARGUMENT: ")


def _argument_references(source: str) -> Iterator[tuple[int, str]]:
    """``(offset, name)`` of each ``args.name`` outside string literals."""
    for match in _ARGS_FIELD_RE.finditer(_without_strings(source)):
        yield match.start(1), match.group(1)


def _seconds(duration: str) -> int:
    return int(duration[:-1]) * _DURATION_UNITS[duration[-1]]


def _build(bundle: _Bundle, sources: tuple[str, ...], version: str) -> Policy:
    """Assemble the Policy. Only called without errors, so every value has its format's type."""
    defined = bundle.definitions
    agents = {
        d.name: Agent(d.name, tuple(d.body["roles"]), d.file.location(d.path))
        for d in defined["agents"].values()
    }
    roles = {
        d.name: Role(
            d.name,
            frozenset(d.body["tools"]),
            _seconds(d.body["max_token_ttl"]),
            d.file.location(d.path),
        )
        for d in defined["roles"].values()
    }
    approver_roles = {
        d.name: ApproverRole(d.name, tuple(d.body["groups"]), d.file.location(d.path))
        for d in defined["approver_roles"].values()
    }
    issuers = {
        d.name: Issuer(d.name, frozenset(d.body["agents"]), d.file.location(d.path))
        for d in defined["issuers"].values()
    }
    dev_directory = {
        d.name: DevSubject(d.name, tuple(d.body["groups"]), d.file.location(d.path))
        for d in defined["dev_directory"].values()
    }
    tools = {d.name: _build_tool(bundle, d) for d in defined["tools"].values()}
    admin_groups: tuple[str, ...] = ()
    if bundle.admins is not None:
        admin_groups = tuple(bundle.admins[1]["groups"])
    kill_switches = tuple(
        KillSwitch(KillScope(d.body["scope"]), d.body.get("target", ""), d.body["reason"])
        for d in defined["kill_switches"].values()
    )
    return Policy(
        version=version,
        label=bundle.label[1] if bundle.label else "",
        sources=sources,
        agents=_frozen(dict(sorted(agents.items()))),
        roles=_frozen(dict(sorted(roles.items()))),
        tools=_frozen(dict(sorted(tools.items()))),
        approver_roles=_frozen(dict(sorted(approver_roles.items()))),
        issuers=_frozen(dict(sorted(issuers.items()))),
        admin_groups=admin_groups,
        dev_directory=_frozen(dict(sorted(dev_directory.items()))),
        controls=_controls(bundle.controls[1] if bundle.controls else {}),
        kill_switches=kill_switches,
    )


def _rate_limit(body: Mapping[str, Any]) -> RateLimit:
    return RateLimit(per_second=float(body["per_second"]), burst=int(body["burst"]))


def _controls(body: Mapping[str, Any]) -> Controls:
    budget = body.get("run_budget", {})
    limits = body.get("rate_limits", {})
    max_cost = budget.get("max_cost")
    return Controls(
        max_calls_per_run=int(budget.get("max_calls", 0)),
        max_calls_per_tool=_frozen(dict(budget.get("max_calls_per_tool", {}))),
        max_cost_per_run=None if max_cost is None else Decimal(str(max_cost)),
        max_consecutive_failures=int(body.get("max_consecutive_failures", 0)),
        idempotency_window_seconds=_seconds(body.get("idempotency_window", "24h")),
        default_rate_limit=_rate_limit(limits["default"]) if "default" in limits else None,
        agent_rate_limits=_frozen(
            {agent: _rate_limit(limit) for agent, limit in limits.get("agents", {}).items()}
        ),
    )


def _build_tool(bundle: _Bundle, tool: _Definition) -> Tool:
    body = tool.body
    tiers = []
    for index, tier in enumerate(body["tiers"]):
        tier_path = (*tool.path, "tiers", index)
        action = TierAction(tier["action"])
        approval = action is TierAction.REQUIRE_APPROVAL
        tiers.append(
            Tier(
                name=tier["name"],
                action=action,
                when=bundle.conditions.get((tool.file.name, tool.name, "tiers", index)),
                location=tool.file.location(tier_path),
                approvals=int(tier["approvals"]) if approval else 0,
                approver_roles=tuple(tier["approver_roles"]) if approval else (),
                ttl_seconds=_seconds(tier["ttl"])
                if "ttl" in tier
                else DEFAULT_APPROVAL_TTL_SECONDS,
                message=tier.get("message", ""),
                vetoes=int(tier.get("vetoes", 1)),
                # Indexed, not .get(): a condition in the file that was not compiled must
                # fail the load, never leave the tier open to every eligible approver.
                approver_condition=bundle.conditions[tool.file.name, tool.name, "approver", index]
                if "approver_condition" in tier
                else None,
            )
        )
    rules = tuple(
        Rule(
            name=rule["name"],
            require=bundle.conditions[tool.file.name, tool.name, "rules", index],
            message=rule["message"],
            location=tool.file.location((*tool.path, "rules", index)),
        )
        for index, rule in enumerate(body.get("rules", ()))
    )
    return Tool(
        name=tool.name,
        arguments=bundle.schemas[tool.file.name, tool.name],
        tiers=tuple(tiers),
        location=tool.file.location(tool.path),
        description=body.get("description", ""),
        writes=bool(body.get("writes", False)),
        pins=tuple(body.get("pins", ())),
        rules=rules,
        cost=Decimal(str(body.get("cost", 0))),
        redact=tuple(body.get("redact", ())),
    )
