"""YAML with line marks: plain Python values plus the source position of every key and value.

Policy authors need ``file:line:col`` for every problem, so we never use ``yaml.safe_load``
(which forgets positions). We compose the node tree with a hardened ``SafeLoader`` and convert it
ourselves, recording each node under its path (``("tools", "requestRefund", "tiers", 0)``).

Hardening, each reported as an issue rather than an exception:

* duplicate mapping keys are errors (PyYAML silently keeps the last one);
* anchors and aliases are refused (they make "billion laughs" documents possible and hide what a
  policy says from its reviewers);
* keys must be strings; only the standard tags (str, int, float, bool, null, seq, map) are read;
* scalars resolve with the YAML 1.2 core schema, so ``yes``/``no``/``on``/``off`` and dates stay
  strings (``NO`` is Norway, not false) and a mistyped boolean is a type error, not a surprise;
* one document per file, and nesting is bounded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import yaml
from yaml.events import AliasEvent, Event, StreamEndEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from sidecar import strictjson
from sidecar.policy.issues import Code, PolicyIssue

MAX_DEPTH = 64
"""Deeper documents are refused: PyYAML composes recursively, and policies are shallow."""

MAX_INTEGER_DIGITS = 1000
"""Longer integers are refused: Python will not convert one of more than 4300 decimal digits
(to or from text), and no policy value comes near this."""

PathPart = str | int
Path = tuple[PathPart, ...]

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (f"{_TAG}{t}" for t in ("str", "int", "float", "bool", "null"))
_SEQ, _MAP = f"{_TAG}seq", f"{_TAG}map"
_REFUSED_ALIAS = "!proviso/refused-alias"

_INT_RE = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_FLOAT_RE = re.compile(
    r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)
_BOOL_RE = re.compile(r"true|True|TRUE|false|False|FALSE")
_NULL_RE = re.compile(r"~|null|Null|NULL|")

_TYPE_NAMES = {_STR: "string", _INT: "integer", _FLOAT: "number", _BOOL: "boolean", _NULL: "null"}


class Position(NamedTuple):
    """A 1-based line and column."""

    line: int
    col: int


# PyYAML's stubs leave the event API untyped; these are its documented signatures.
_peek_event = cast(Callable[[yaml.SafeLoader], Event], yaml.SafeLoader.peek_event)
_get_event = cast(Callable[[yaml.SafeLoader], Event], yaml.SafeLoader.get_event)
_compose_document = cast(Callable[[yaml.SafeLoader], Node], yaml.SafeLoader.compose_document)


class _Refusal(yaml.YAMLError):
    """Stops composing a document we will not read (too deep)."""

    def __init__(self, code: Code, message: str, mark: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """A SafeLoader that composes nodes only, with the YAML 1.2 core schema, refusing aliases."""

    yaml_implicit_resolvers = {}  # noqa: RUF012 - PyYAML's own class-level registry, replaced

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.refusals: list[tuple[Code, str, Any]] = []
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        """Refuse aliases and anchors (recording them) and bound the nesting depth."""
        event = _peek_event(self)
        if isinstance(event, AliasEvent):
            _get_event(self)
            self.refusals.append(
                (Code.YAML_ALIAS, f"alias '*{event.anchor}' is not allowed", event.start_mark)
            )
            marks: tuple[Any, Any] = (event.start_mark, event.end_mark)
            return ScalarNode(_REFUSED_ALIAS, "", *marks)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self.refusals.append(
                (Code.YAML_ANCHOR, f"anchor '&{anchor}' is not allowed", event.start_mark)
            )
        if self._depth >= MAX_DEPTH:
            raise _Refusal(
                Code.TOO_DEEP, f"nesting deeper than {MAX_DEPTH} levels", event.start_mark
            )
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        return cast(Node, node)  # never None here: the parser raises before that


for _tag, _regexp, _first in (
    (_BOOL, _BOOL_RE, "tTfF"),
    (_INT, _INT_RE, "-+0123456789"),
    (_FLOAT, _FLOAT_RE, "-+.0123456789"),
    (_NULL, _NULL_RE, ["~", "n", "N", ""]),
):
    _Loader.add_implicit_resolver(_tag, re.compile(rf"(?:{_regexp.pattern})\Z"), list(_first))


@dataclass(frozen=True, slots=True)
class _Entry:
    node: Node
    key: Node | None


@dataclass(frozen=True, slots=True)
class YamlDocument:
    """A parsed file: its plain value and where each part of it came from."""

    text: str
    value: Any
    entries: Mapping[Path, _Entry]
    damaged: frozenset[Path] = frozenset()
    """Paths whose values were refused (aliases, unknown tags): already reported, not usable."""

    def node(self, path: Path) -> Node | None:
        """The value node at ``path``, if there is one."""
        entry = self.entries.get(path)
        return entry.node if entry else None

    def value_position(self, path: Path) -> Position:
        """Where the value at ``path`` starts; the nearest existing ancestor if it is absent."""
        entry = self._nearest(path)
        return _position(entry.node.start_mark) if entry else Position(1, 1)

    def key_position(self, path: Path) -> Position:
        """Where the key of a mapping entry stands (its value's position for sequence items)."""
        entry = self._nearest(path)
        if entry is None:
            return Position(1, 1)
        return _position((entry.key or entry.node).start_mark)

    def key_line(self, path: Path) -> int:
        """The line of a key, for hints such as "first defined at line 3"."""
        return self.key_position(path).line

    def position_in_scalar(self, path: Path, line: int, col: int) -> Position:
        """Map a 1-based position inside a scalar's *value* to its position in the file.

        Compilers (CEL) report positions inside the string they were given; YAML quoting,
        escapes, folding and block indentation shift those. We align the value's non-blank
        characters with the source's, which holds for every scalar style.
        """
        node = self.node(path)
        if not isinstance(node, ScalarNode):
            return self.value_position(path)
        value = str(node.value)
        lines = value.split("\n")
        line = min(max(line, 1), len(lines))
        offset = sum(len(text) + 1 for text in lines[: line - 1]) + max(col - 1, 0)
        offset = min(offset, len(value))
        sources = _source_positions(self.text, node)
        wanted = sum(1 for ch in value[:offset] if not ch.isspace())
        if sources is None or len(sources) != sum(1 for ch in value if not ch.isspace()):
            return _position(node.start_mark)
        if offset < len(value) and not value[offset].isspace() and wanted < len(sources):
            return sources[wanted]
        if wanted == 0:
            if sources:
                return sources[0]
            start = _position(node.start_mark)
            quoted = node.style in ("'", '"')
            return Position(start.line, start.col + 1) if quoted else start
        before = sources[wanted - 1]
        return Position(before.line, before.col + 1)

    def _nearest(self, path: Path) -> _Entry | None:
        for end in range(len(path), -1, -1):
            entry = self.entries.get(path[:end])
            if entry is not None:
                return entry
        return None


def _position(mark: yaml.Mark) -> Position:
    return Position(mark.line + 1, mark.column + 1)


def parse_yaml(
    text: str, file: str, *, finite_floats: bool = True
) -> tuple[YamlDocument | None, list[PolicyIssue]]:
    """Parse one file. The document is None when the file is empty or cannot be read at all.

    Problems that leave the rest readable (a duplicate key, an alias, an odd tag) are reported
    and the document is still returned, so later checks can run on what remains.

    With ``finite_floats`` (policy files), a float that is not finite (``.inf``, ``.nan``, or
    ``1e400``, which overflows a double) is an ``INVALID_VALUE``: policy values are JSON values,
    and there 1e400 silently meant "no limit" and NaN defeats every comparison. Policy test
    files read numbers exactly from the text instead, and check them themselves.
    """
    issues: list[PolicyIssue] = []

    def issue(code: Code, mark: yaml.Mark, message: str, hint: str = "") -> None:
        issues.append(PolicyIssue(file, mark.line + 1, mark.column + 1, code, message, hint=hint))

    hidden = sorted(_hidden_characters(text, file))
    if hidden:  # the file does not read as it looks: nothing of it is used
        return None, hidden
    loader: _Loader | None = None
    root: Node | None = None
    try:
        loader = _Loader(text)
        root = _compose_single(loader, issue)
    except _Refusal as exc:
        issue(exc.code, exc.mark, exc.message)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        context = ""
        if exc.context and exc.context_mark is not None:
            context = f"{exc.context} at line {exc.context_mark.line + 1}"
        problem = exc.problem or exc.context or "invalid YAML"
        if mark is None:
            issues.append(PolicyIssue(file, 1, 1, Code.YAML_SYNTAX, problem, hint=context))
        else:
            issue(Code.YAML_SYNTAX, mark, problem, context if context != problem else "")
    except yaml.reader.ReaderError as exc:
        line, col = _line_col(text, exc.position)
        char = exc.character if isinstance(exc.character, int) else 0
        message = f"character U+{char:04X} is not allowed in YAML"
        issues.append(PolicyIssue(file, line, col, Code.YAML_SYNTAX, message))
    finally:
        if loader is not None:
            loader.dispose()
    for code, message, mark in loader.refusals if loader is not None else ():
        issue(code, mark, message)
    if root is None:  # empty, or not readable as YAML
        return None, issues
    converter = _Converter(issue, finite_floats=finite_floats)
    value = converter.convert(root, (), None)
    document = YamlDocument(text, value, converter.entries, frozenset(converter.damaged))
    return document, issues


_LAYOUT_RE = re.compile("[\x85\u2028\u2029\u202a-\u202e\u2066-\u2069]")
"""Characters that change how the file is split into lines or shown, wherever they are."""
_LAYOUT = {
    "\x85": "a next-line character, NEL",
    "\u2028": "a line separator",
    "\u2029": "a paragraph separator",
}
_INVISIBLE_RE = re.compile(
    "[\u00ad\u034f\u061c\u180e\u200b-\u200f\u2060-\u2064\ufeff\U000e0000-\U000e007f]+"
)
"""Runs of characters that show as nothing (or almost): soft hyphen, zero-width space and
joiners, direction marks, word joiner, a byte-order mark past the start, tag characters."""
_DIRECTION_MARKS = frozenset("\u200e\u200f\u061c")
_RIGHT_TO_LEFT_RE = re.compile("[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefc]")


def _hidden_characters(text: str, file: str) -> Iterator[PolicyIssue]:
    """Characters that make a file read otherwise than it looks in an editor or a review.

    PyYAML breaks lines at NEL, U+2028 and U+2029 (YAML 1.1; YAML 1.2 does not), where editors
    and diffs show one line: ``# comment<U+2028>  action: allow`` is a comment to a reviewer
    and a key to the loader. Bidirectional controls reorder what is shown ("Trojan Source").
    Both are refused wherever they are. Invisible characters make ``"bad-agent@service"`` in a
    deny tier a string no agent id equals; they are refused next to ASCII, and allowed where
    text needs them: inside other scripts and emoji (a joiner between two non-ASCII
    characters), and direction marks on a line of right-to-left text. Written as an escape
    (``"\\u200d"``) any of them shows, and is accepted.
    """
    for found in _LAYOUT_RE.finditer(text):
        char = found.group()
        what = _LAYOUT.get(char, "a bidirectional text control")
        yield _hidden(text, file, found.start(), char, what)
    for found in _INVISIBLE_RE.finditer(text):
        run, start, end = found.group(), found.start(), found.end()
        before = text[start - 1] if start > 0 else "\n"
        after = text[end] if end < len(text) else "\n"
        if before > "\x7f" and after > "\x7f":
            continue  # within a script or an emoji sequence: visible text around it
        line = text[text.rfind("\n", 0, start) + 1 : text.find("\n", end) % (len(text) + 1)]
        if set(run) <= _DIRECTION_MARKS and _RIGHT_TO_LEFT_RE.search(line):
            continue
        yield _hidden(text, file, start, run[0], "an invisible character")


def _hidden(text: str, file: str, offset: int, char: str, what: str) -> PolicyIssue:
    line, col = _line_col(text, offset)
    message = f"character U+{ord(char):04X} ({what}) is not allowed here"
    hint = (
        "remove it, or write it as an escape (\\u...) in a quoted string: editors and reviews "
        "do not show the file as the loader reads it"
    )
    return PolicyIssue(file, line, col, Code.YAML_SYNTAX, message, hint=hint)


_IssueSink = Callable[..., None]


def _compose_single(loader: _Loader, issue: _IssueSink) -> Node | None:
    """Compose the only document; a second one is an error (one document per file)."""
    _get_event(loader)  # stream start
    if loader.check_event(StreamEndEvent):
        return None
    root = _compose_document(loader)
    if not loader.check_event(StreamEndEvent):
        event = _get_event(loader)
        issue(
            Code.MULTIPLE_DOCUMENTS,
            event.start_mark,
            "a policy file holds one YAML document; found another",
            "split it into separate files",
        )
    return root


class _Converter:
    """Turns a node tree into plain values, recording positions and what could not be read."""

    def __init__(self, issue: _IssueSink, *, finite_floats: bool) -> None:
        self.issue = issue
        self.finite_floats = finite_floats
        self.entries: dict[Path, _Entry] = {}
        self.damaged: set[Path] = set()

    def convert(self, node: Node, path: Path, key: Node | None) -> Any:
        self.entries[path] = _Entry(node, key)
        if isinstance(node, MappingNode):
            self._check_tag(node, path, _MAP)
            return self._mapping(node, path)
        if isinstance(node, SequenceNode):
            self._check_tag(node, path, _SEQ)
            return [self.convert(item, (*path, i), None) for i, item in enumerate(node.value)]
        return self._scalar(node, path)

    def _mapping(self, node: MappingNode, path: Path) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            name = self._key(key_node)
            if name is None:
                continue
            if name in result:
                self.issue(
                    Code.DUPLICATE_KEY,
                    key_node.start_mark,
                    f"duplicate key '{name}'",
                    f"first defined at line {first_lines[name]}",
                )
                continue
            first_lines[name] = key_node.start_mark.line + 1
            result[name] = self.convert(value_node, (*path, name), key_node)
        return result

    def _check_tag(self, node: Node, path: Path, expected: str) -> None:
        if node.tag != expected:
            self.issue(
                Code.YAML_TAG, node.start_mark, f"tag '{_show_tag(node.tag)}' is not allowed"
            )
            self.damaged.add(path)

    def _key(self, node: Node) -> str | None:
        """Mapping keys are names: plain or quoted strings, nothing else."""
        if node.tag == _REFUSED_ALIAS:
            return None
        if not isinstance(node, ScalarNode):
            self.issue(
                Code.INVALID_KEY, node.start_mark, "a key must be a string, not a collection"
            )
            return None
        if node.tag != _STR:
            kind = _TYPE_NAMES.get(node.tag, f"'{_show_tag(node.tag)}'")
            message = f"key '{node.value}' reads as {kind}; keys must be strings"
            self.issue(Code.INVALID_KEY, node.start_mark, message, "quote it")
            return None
        if not self._characters(node):
            return None
        return str(node.value)

    def _characters(self, node: Node) -> bool:
        """False (reported) for a string holding a lone surrogate: it is not a character, and
        JSON, UTF-8 and CEL cannot hold it (a tier's message with one made every Check that
        reached the tier fail to be audited, and a condition with one ended lint in a
        traceback)."""
        # Only a double-quoted escape ("\\ud800") can put one in a string.
        found = strictjson.SURROGATE_RE.search(str(node.value))
        if found is None:
            return True
        message = f"a lone surrogate (\\u{ord(found.group()):04x}) is not a character"
        hint = "write the character itself, or its pair of surrogates as one \\U escape"
        self.issue(Code.INVALID_VALUE, node.start_mark, message, hint)
        return False

    def _scalar(self, node: Node, path: Path) -> Any:
        """Read a scalar by its (resolved or explicit) tag; unknown tags are refused."""
        text = str(node.value)
        tag = node.tag
        if tag == _REFUSED_ALIAS:
            self.damaged.add(path)
            return None
        if tag == _STR:
            if not self._characters(node):
                self.damaged.add(path)
            return text
        reader = _READERS.get(tag)
        if reader is None:
            self.issue(Code.YAML_TAG, node.start_mark, f"tag '{_show_tag(tag)}' is not allowed")
            self.damaged.add(path)
            return text
        pattern, read = reader
        if not pattern.fullmatch(text):
            message = f"'{text}' is not a valid {_TYPE_NAMES[tag]}"
            self.issue(Code.YAML_TAG, node.start_mark, message)
            self.damaged.add(path)
            return text
        if tag == _INT and len(text) > MAX_INTEGER_DIGITS:
            message = f"'{text[:20]}...' has more than {MAX_INTEGER_DIGITS} digits"
            self.issue(Code.INVALID_VALUE, node.start_mark, message, "write a smaller number")
            self.damaged.add(path)
            return text
        value = read(text)
        if self.finite_floats and isinstance(value, float) and not math.isfinite(value):
            message = f"'{text}' is not a finite number"
            hint = "JSON has no infinity or NaN: write the number you mean"
            self.issue(Code.INVALID_VALUE, node.start_mark, message, hint)
            self.damaged.add(path)
            return text
        return value


def _show_tag(tag: str) -> str:
    return f"!!{tag.removeprefix(_TAG)}" if tag.startswith(_TAG) else tag


def _read_int(text: str) -> int:
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text)


def _read_float(text: str) -> float:
    lowered = text.lower()
    if lowered.endswith(".inf"):
        return -math.inf if lowered.startswith("-") else math.inf
    if lowered == ".nan":
        return math.nan
    return float(text)


_READERS: dict[str, tuple[re.Pattern[str], Callable[[str], Any]]] = {
    _NULL: (_NULL_RE, lambda _: None),
    _BOOL: (_BOOL_RE, lambda text: text.lower() == "true"),
    _INT: (_INT_RE, _read_int),
    _FLOAT: (_FLOAT_RE, _read_float),
}


def _line_col(text: str, index: int) -> tuple[int, int]:
    before = text[:index]
    line = before.count("\n") + 1
    return line, index - (before.rfind("\n") + 1) + 1


_ESCAPES = yaml.scanner.Scanner.ESCAPE_REPLACEMENTS
_ESCAPE_LENGTHS = yaml.scanner.Scanner.ESCAPE_CODES


def _source_positions(text: str, node: ScalarNode) -> list[Position] | None:
    """The file position of each non-blank character of a scalar's value, in order.

    None when the source cannot be aligned (it should not happen; callers then fall back to
    the scalar's start).
    """
    start, end = node.start_mark.index, node.end_mark.index
    if not 0 <= start <= end <= len(text):
        return None
    line, col = node.start_mark.line, node.start_mark.column
    out: list[Position] = []
    style = node.style
    i = start

    def step(count: int) -> None:
        nonlocal i, line, col
        for _ in range(count):
            if text[i] == "\n":
                line, col = line + 1, 0
            else:
                col += 1
            i += 1

    if style in ("|", ">"):
        while i < end and text[i] != "\n":  # the header line: indicator and comment
            step(1)
    elif style in ("'", '"'):
        step(1)
        end -= 1
    while i < end:
        ch = text[i]
        if style == "'" and ch == "'" and i + 1 < end and text[i + 1] == "'":
            out.append(Position(line + 1, col + 1))
            step(2)
        elif style == '"' and ch == "\\" and i + 1 < end:
            code = text[i + 1]
            if code in _ESCAPE_LENGTHS:
                length = _ESCAPE_LENGTHS[code]
                try:
                    decoded = chr(int(text[i + 2 : i + 2 + length], 16))
                except ValueError:
                    return None
                size = 2 + length
            elif code in _ESCAPES:
                decoded, size = _ESCAPES[code], 2
            elif code in "\r\n":
                decoded, size = "", 1  # an escaped line break: the break itself is blank
            else:
                return None
            if decoded and not decoded.isspace():
                out.append(Position(line + 1, col + 1))
            step(size)
        else:
            if not ch.isspace():
                out.append(Position(line + 1, col + 1))
            step(1)
    return out
