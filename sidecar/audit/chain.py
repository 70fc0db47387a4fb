"""The audit log's hash chain: canonical JSON, record hashes, signed checkpoints, verification.

Pure: no I/O, no clock, no threads. The writer and ``proviso audit verify`` both use these
functions, so what is written and what is checked are computed by the same code.

Every line of the log is one record, a JSON object carrying ``seq`` (1, 2, 3… across files),
``prev`` (the ``hash`` of the record before it; ``GENESIS`` for the first) and ``hash``:
``sha256:`` + the SHA-256 of the record's canonical JSON without its ``hash`` member. Editing,
deleting, inserting or reordering a line breaks the chain at that line. Every so often the
writer adds a ``kind: checkpoint`` record, in the same chain, whose Ed25519 signature covers its
``seq`` and ``prev``: the head of the chain, and so every record before it. A rewritten chain
(hashes are not secret) is caught at the next checkpoint, whose signature needs the key.

Canonical JSON is RFC 8785 (JCS): members sorted by their names' UTF-16 code units, no
whitespace, strings escaped as ECMAScript's ``JSON.stringify`` does (only ``"``, ``\\`` and
control characters; lone surrogates are refused), UTF-8. One deliberate difference, for
numbers: JCS writes every number as the shortest form of the nearest IEEE double, which would
round the exact decimals that arguments carry (``0.1``, an invoice total with 20 digits), so
here a number keeps its exact value in plain decimal notation, without exponent and without
trailing zeros: ``49.00`` → ``49``, ``1E-7`` → ``0.0000001``. For integers of magnitude below
2**53 and for decimals of at most 15 significant digits between 1e-6 and 1e21 this is the very
text JCS gives (a test checks it against the ``rfc8785`` package). Lines are parsed back with
decimals as ``Decimal``, so re-encoding a parsed line gives the same bytes and verification
recomputes the same hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import json.encoder
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature

from sidecar.strictjson import JSON_LEAVES, sorted_json
from tokens import SigningKey, VerificationKeys

GENESIS = "sha256:" + "0" * 64
"""The ``prev`` of the first record of a log."""

CHECKPOINT_CONTEXT = b"proviso.audit.checkpoint.v1\n"
"""Prefix of every signed checkpoint message: such a signature can never pass for a token's."""

CHAIN_FIELDS = ("seq", "prev", "hash")
"""Members the writer assigns; a record body must not carry them."""

_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")

# The C-accelerated JSON string encoder escapes exactly what ECMAScript's JSON.stringify does:
# '"', '\\', the short escapes \b \f \n \r \t, and other control characters as \u00xx.
# Lone surrogates pass through it; encoding the result as strict UTF-8 refuses them.
_string: Callable[[str], str] = json.encoder.encode_basestring


class CanonicalJSONError(ValueError):
    """A value has no canonical JSON form (a non-string key, NaN, a lone surrogate…)."""


# ---------------------------------------------------------------- canonical JSON


MAX_CANONICAL_EXPONENT = 1000
"""Numbers beyond 10^±1000 have no canonical form here. Nothing written is near it (Check
inputs stop at 10^±64, floats at 10^±308); a log line holding one (``1e5000``) is malformed,
not a number to write out in 5,000 digits (or a billion, for ``1e-999999999``)."""


def _number(value: int | float | Decimal) -> str:
    if isinstance(value, int):
        return str(value)  # parsing refuses integers of more than 4,300 digits
    if isinstance(value, float):
        value = Decimal(repr(value))
    if not value.is_finite():
        raise CanonicalJSONError(f"{value} is not a JSON number")
    if value and abs(value.adjusted()) > MAX_CANONICAL_EXPONENT:
        raise CanonicalJSONError(f"{value:.3E} is out of range for canonical JSON")
    if value == value.to_integral_value():
        return str(int(value))
    # "f" writes every digit exactly (normalize() would round to the context's precision).
    return format(value, "f").rstrip("0")


def _utf16(name: str) -> bytes:
    return name.encode("utf-16-be", "surrogatepass")


def _order(names: Iterable[str]) -> list[str]:
    """Member names in JCS order: by UTF-16 code units (code point order for ASCII names)."""
    listed = list(names)
    if "".join(listed).isascii():
        return sorted(listed)
    return sorted(listed, key=_utf16)


def _object(members: Mapping[str, str]) -> str:
    """An object from already-encoded member values, in canonical member order."""
    return "{" + ",".join([_string(k) + ":" + members[k] for k in _order(members)]) + "}"


class Encoded:
    """A JSON value already in canonical form (from ``encoded``): written as is, not re-encoded.

    For parts of records that repeat unchanged from record to record (a token's claims), so
    they are encoded once. Only ``encoded`` makes one, so the text is always ``_encode``'s
    (or one of the writer's placeholders for the chain fields).
    """

    __slots__ = ("fragment", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.fragment = orjson.Fragment(text)


def encoded(value: Any) -> Encoded:
    """``value`` in canonical form, to place in record bodies as is.

    Raises:
        CanonicalJSONError: ``value`` is not JSON.
    """
    return Encoded(_encode(value))


def _encode(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return _string(value)
    if kind is Encoded:
        return value.text  # type: ignore[no-any-return]
    if kind is dict:
        return _object(_members(value))
    if kind is int:
        return str(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if kind is list:
        return "[" + ",".join([_encode(item) for item in value]) + "]"
    if isinstance(value, Mapping):
        return _object(_members(value))
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, int | float | Decimal):
        return _number(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join([_encode(item) for item in value]) + "]"
    raise CanonicalJSONError(f"{type(value).__name__} is not a JSON value")


def _members(value: Mapping[Any, Any]) -> dict[str, str]:
    members: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise CanonicalJSONError(f"an object key is a {type(key).__name__}, not a string")
        members[key] = _encode(item)
    return members


def _default(value: Any) -> Any:
    """orjson's hook: exact decimals, pre-encoded parts, and other mappings."""
    kind = type(value)
    if kind is Decimal:
        return orjson.Fragment(_number(value))
    if kind is Encoded:
        return value.fragment
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(kind.__name__)


_LEAVES: frozenset[type] = JSON_LEAVES | frozenset({Encoded})


def canonical(value: Any) -> bytes:
    """The canonical JSON of ``value`` (see the module docstring), as UTF-8.

    orjson writes it when it can write it exactly (``strictjson.sorted_json``: the usual case,
    many times faster); the Python encoder below writes everything else, and is the reference.

    Raises:
        CanonicalJSONError: ``value`` is not JSON (a set, a non-string key, NaN…).
    """
    fast = sorted_json(value, _default, leaves=_LEAVES, utf16_keys=True)
    if fast is not None:
        return fast
    return _utf8(_encode(value))


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise CanonicalJSONError("a string holds a lone surrogate") from None


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_line(raw: bytes) -> dict[str, Any]:
    """One log line as a JSON object, decimals as ``Decimal`` so they re-encode exactly.

    Raises:
        ValueError: the line is not UTF-8, not JSON, has duplicate keys or is not an object.
    """
    value = json.loads(
        raw.decode("utf-8"),
        parse_float=Decimal,
        parse_constant=_reject_constant,
        object_pairs_hook=_reject_duplicates,
    )
    if not isinstance(value, dict):
        raise ValueError("a record must be a JSON object")
    return value


# ---------------------------------------------------------------- sealing records


@dataclass(frozen=True, slots=True)
class Sealed:
    """A record ready to append: its line (ending in a newline), ``seq`` and ``hash``."""

    line: bytes
    seq: int
    hash: str


_SEQ_MARK, _PREV_MARK, _HASH_MARK = "\x00seq", "\x00prev", "\x00hash"
"""Placeholders for the chain fields: a raw NUL never occurs in JSON text (strings escape it)."""
_PLACEHOLDERS = {
    "seq": Encoded(_SEQ_MARK),
    "prev": Encoded(_PREV_MARK),
    "hash": Encoded(_HASH_MARK),
}
_SEQ_BYTES, _PREV_BYTES, _HASH_BYTES = (m.encode() for m in (_SEQ_MARK, _PREV_MARK, _HASH_MARK))
_HASH_MEMBER = b'"hash":' + _HASH_BYTES


class Prepared:
    """A record body encoded ahead of its place in the chain: only ``seq`` and ``prev`` are missing.

    Encoding the body is most of the cost of sealing, and it does not depend on where the record
    lands, so callers do it on their own thread (``prepare``): the canonical text of the body
    with placeholders for the three chain fields, in their sorted places. The audit writer then
    only fills them in (``seal``), in write order.
    """

    __slots__ = ("_text",)

    def __init__(self, text: bytes) -> None:
        self._text = text

    def seal(self, *, seq: int, prev: str) -> Sealed:
        """The record at ``seq`` after the record whose hash is ``prev``."""
        text = self._text.replace(_SEQ_BYTES, str(seq).encode(), 1)
        text = text.replace(_PREV_BYTES, _utf8(_string(prev)), 1)
        at = text.index(_HASH_MEMBER)
        if text[at - 1 : at] == b",":
            unhashed = text[: at - 1] + text[at + len(_HASH_MEMBER) :]
        else:  # the first member: drop the comma after it
            unhashed = text[:at] + text[at + len(_HASH_MEMBER) + 1 :]
        digest = "sha256:" + hashlib.sha256(unhashed).hexdigest()
        line = text.replace(_HASH_BYTES, _utf8(_string(digest)), 1)
        return Sealed(line + b"\n", seq, digest)


def prepare(body: Mapping[str, Any]) -> Prepared:
    """Encode ``body`` for sealing later (see ``Prepared``).

    Raises:
        CanonicalJSONError: the body is not JSON.
        ValueError: the body already carries ``seq``, ``prev`` or ``hash``.
    """
    taken = [name for name in CHAIN_FIELDS if name in body]
    if taken:
        raise ValueError(f"a record body must not set {', '.join(taken)}: the writer does")
    return Prepared(canonical({**body, **_PLACEHOLDERS}))


def seal(body: Mapping[str, Any], *, seq: int, prev: str) -> Sealed:
    """Put ``body`` in the chain at ``seq`` after the record whose hash is ``prev``.

    Each member is encoded once; the hash covers every member but ``hash`` itself.

    Raises:
        CanonicalJSONError: the body is not JSON.
        ValueError: the body already carries ``seq``, ``prev`` or ``hash``.
    """
    return prepare(body).seal(seq=seq, prev=prev)


def record_hash(record: Mapping[str, Any]) -> str:
    """The hash a record should carry: over its canonical JSON without ``hash``.

    Raises:
        CanonicalJSONError: the record is not JSON.
    """
    return (
        "sha256:"
        + hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _checkpoint_message(record: Mapping[str, Any]) -> bytes:
    """What a checkpoint's signature covers: the record without ``signature`` and ``hash``."""
    unsigned = {k: v for k, v in record.items() if k not in ("signature", "hash")}
    return CHECKPOINT_CONTEXT + canonical(unsigned)


def seal_checkpoint(
    *,
    seq: int,
    prev: str,
    first_seq: int,
    time: str,
    key: SigningKey,
    logs: Sequence[str] = (),
) -> Sealed:
    """A signed checkpoint at ``seq``, covering records ``first_seq`` to ``seq - 1``.

    The signature covers ``seq`` and ``prev`` (the chain's head), so it vouches for every
    record before it, back to the first. ``logs`` names every chain written beside this one
    (their active files' names): a whole chain deleted then shows, since signed checkpoints
    of the others still name it.
    """
    body: dict[str, Any] = {
        "kind": "checkpoint",
        "time": time,
        "first_seq": first_seq,
        "last_seq": seq - 1,
        "kid": key.kid,
    }
    if logs:
        body["logs"] = sorted(logs)
    message = _checkpoint_message({**body, "seq": seq, "prev": prev})
    body["signature"] = _b64url(key.sign(message))
    return seal(body, seq=seq, prev=prev)


# ---------------------------------------------------------------- verification


class Problem(StrEnum):
    """Why a line breaks the chain. Stable: scripts may match on these."""

    TRUNCATED = "TRUNCATED"
    MALFORMED = "MALFORMED"
    HASH_MISMATCH = "HASH_MISMATCH"
    MISSING_RECORDS = "MISSING_RECORDS"
    OUT_OF_ORDER = "OUT_OF_ORDER"
    PREV_MISMATCH = "PREV_MISMATCH"
    BAD_CHECKPOINT = "BAD_CHECKPOINT"
    UNKNOWN_KEY = "UNKNOWN_KEY"
    BAD_SIGNATURE = "BAD_SIGNATURE"


@dataclass(frozen=True, slots=True)
class Break:
    """The first line that does not verify, and why. ``seq`` is what the line claims, if any."""

    file: str
    line: int
    problem: Problem
    message: str
    seq: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.problem}: {self.message}"


@dataclass(slots=True)
class ChainState:
    """Where verification stands after the lines fed so far."""

    seq: int = 0
    head: str = GENESIS
    sealed_seq: int = 0
    """The ``seq`` of the last checkpoint: records after it are chained but not yet signed."""
    first_seq: int | None = None
    records: int = 0
    checkpoints: int = 0
    kids: set[str] = field(default_factory=set)
    logs: set[str] = field(default_factory=set)
    """The sibling logs (``serve --workers N``'s chains) that signed checkpoints name."""

    @property
    def unsealed(self) -> int:
        """How many records follow the last checkpoint."""
        return self.seq - self.sealed_seq if self.seq > self.sealed_seq else 0


def _chain_fields(record: Mapping[str, Any]) -> tuple[int, str, str] | str:
    seq, prev, digest = record.get("seq"), record.get("prev"), record.get("hash")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        return "'seq' is missing or not a positive integer"
    if not isinstance(prev, str) or not _HASH_RE.fullmatch(prev):
        return "'prev' is missing or not a sha256 hash"
    if not isinstance(digest, str) or not _HASH_RE.fullmatch(digest):
        return "'hash' is missing or not a sha256 hash"
    return seq, prev, digest


class ChainVerifier:
    """Checks lines one at a time, in log order, and stops trusting at the first break.

    ``keys`` verify checkpoint signatures; without them a checkpoint cannot be trusted and
    is a break (``UNKNOWN_KEY``). Start from a known state to verify only a tail of the log.
    """

    def __init__(self, keys: VerificationKeys | None, state: ChainState | None = None) -> None:
        self._keys = keys
        self.state = state or ChainState()
        self.broken: Break | None = None

    def feed(self, raw: bytes, *, file: str, line: int, complete: bool = True) -> Break | None:
        """Check one line (without its newline); ``complete`` is False when it had none."""
        if self.broken is not None:
            return self.broken
        found = self._check(raw, complete)
        if isinstance(found, tuple):
            problem, message, seq = found
            self.broken = Break(file, line, problem, message, seq)
        return self.broken

    def _check(self, raw: bytes, complete: bool) -> tuple[Problem, str, int | None] | None:
        state = self.state
        if not complete:
            return Problem.TRUNCATED, "the last line is incomplete: the log was cut here", None
        try:
            record = parse_line(raw)
        except (ValueError, RecursionError) as exc:
            return Problem.MALFORMED, f"not a JSON record ({exc})", None
        fields = _chain_fields(record)
        if isinstance(fields, str):
            return Problem.MALFORMED, fields, None
        seq, prev, digest = fields
        try:
            expected_hash = record_hash(record)
        except CanonicalJSONError as exc:
            return Problem.MALFORMED, str(exc), seq
        if digest != expected_hash:
            return Problem.HASH_MISMATCH, "the content does not match its hash: edited", seq
        expected = state.seq + 1
        if seq > expected:
            missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected}-{seq - 1}"
            return (
                Problem.MISSING_RECORDS,
                f"expected seq {expected}, found {seq}: {missing} is missing here "
                "(deleted, or moved elsewhere)",
                seq,
            )
        if seq < expected:
            return (
                Problem.OUT_OF_ORDER,
                f"expected seq {expected}, found {seq} again: this line or the one before it "
                "was inserted, duplicated or moved",
                seq,
            )
        if prev != state.head:
            return (
                Problem.PREV_MISMATCH,
                "'prev' is not the hash of the record before it: a line before it was "
                "inserted, replaced or removed",
                seq,
            )
        if record.get("kind") == "checkpoint":
            problem = self._check_checkpoint(record, seq)
            if problem is not None:
                return (*problem, seq)
            state.sealed_seq = seq
            state.checkpoints += 1
        else:
            state.records += 1
        if state.first_seq is None:
            state.first_seq = seq
        state.seq, state.head = seq, digest
        return None

    def _check_checkpoint(self, record: Mapping[str, Any], seq: int) -> tuple[Problem, str] | None:
        first, last = record.get("first_seq"), record.get("last_seq")
        if first != self.state.sealed_seq + 1 or last != seq - 1:
            return (
                Problem.BAD_CHECKPOINT,
                f"covers seq {first}-{last}, but the records since the last checkpoint are "
                f"seq {self.state.sealed_seq + 1}-{seq - 1}",
            )
        logs = record.get("logs", [])
        if not isinstance(logs, list) or not all(
            isinstance(name, str) and name and "/" not in name and name not in (".", "..")
            for name in logs
        ):
            return Problem.BAD_CHECKPOINT, "'logs' is not a list of log file names"
        kid, signature = record.get("kid"), record.get("signature")
        public = self._keys.get(kid) if self._keys is not None and isinstance(kid, str) else None
        if public is None:
            return Problem.UNKNOWN_KEY, f"signed with key {kid!r}, which is not among the keys"
        try:
            raw_signature = base64.urlsafe_b64decode(str(signature) + "==")
            public.verify(raw_signature, _checkpoint_message(record))
        except (InvalidSignature, binascii.Error, ValueError):
            return Problem.BAD_SIGNATURE, f"the signature does not verify with key {kid!r}"
        self.state.kids.add(str(kid))
        self.state.logs.update(logs)
        return None
