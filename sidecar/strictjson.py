"""Strict parsing of untrusted JSON objects, and their canonical form and digest.

The tool must act on exactly what was validated, so anything a parser could read two ways is
refused: duplicate keys, NaN/Infinity, lone surrogates, NUL characters, non-object tops. Size
and nesting depth are checked before parsing so a hostile document costs at most one linear
scan. Numbers with a fraction or exponent parse as ``Decimal`` so ``0.01`` stays exact; no
number may be beyond 10^±64.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import orjson

MAX_JSON_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32

# A string runs to its closing quote or, unterminated, to the end of the text: the possessive
# quantifier never backtracks, so hostile input (many unterminated quotes) stays linear.
_STRINGS_RE = re.compile(r'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_BRACKETS_RE = re.compile(r"[\[\]{}]")
SURROGATE_RE = re.compile("[\ud800-\udfff]")
"""A lone surrogate: not a character, and UTF-8 (the audit log, CEL) cannot hold it."""
REFUSED_CHAR_RE = re.compile("[\x00\ud800-\udfff]")
"""What no string or key of a call may hold: NUL, or a lone surrogate."""


class JSONInputError(ValueError):
    """The text is not one acceptable JSON object; the message says why."""


MAX_DECIMAL_EXPONENT = 64


def _decimal(text: str) -> Decimal:
    """Parse a JSON number with a fraction or exponent, refusing absurd magnitudes."""
    try:
        value = Decimal(text)
    except ArithmeticError:  # an exponent beyond what Decimal can hold (1e99999999999999999999)
        raise JSONInputError(f"number {text[:20]} is out of range") from None
    if abs(value.adjusted()) > MAX_DECIMAL_EXPONENT:
        raise JSONInputError(f"number {text[:20]} is out of range")
    return value


def _integer(text: str) -> int:
    """Parse a JSON integer, refusing more digits than a decimal may have (10^64)."""
    if len(text) > MAX_DECIMAL_EXPONENT + 1 and len(text.lstrip("-")) > MAX_DECIMAL_EXPONENT + 1:
        raise JSONInputError(f"number {text[:20]}... is out of range")
    return int(text)


def _refuse_constant(name: str) -> Any:
    raise JSONInputError(f"{name} is not allowed")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JSONInputError(f"duplicate key {key!r}")
            seen.add(key)
    return result


# One decoder for every call: json.loads with hooks would build a decoder (and its scanner)
# each time. Decoding keeps no state between calls, so sharing it is safe.
_DECODER = json.JSONDecoder(
    parse_float=_decimal,
    parse_int=_integer,
    parse_constant=_refuse_constant,
    object_pairs_hook=_object_without_duplicates,
)
_UTF8_BYTES_PER_CHAR = 4


def _depth(text: str) -> int:
    deepest = depth = 0
    for bracket in _BRACKETS_RE.findall(_STRINGS_RE.sub('""', text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_object(
    text: str, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> dict[str, Any]:
    """Parse ``text`` as one JSON object, refusing anything ambiguous or oversized.

    Raises:
        JSONInputError: with a message fit to show the caller.
    """
    if len(text) * _UTF8_BYTES_PER_CHAR > max_bytes:  # else it cannot be too large
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise JSONInputError(f"{size} bytes exceeds the limit of {max_bytes}")
    # Nesting cannot be deeper than the number of opening brackets: count them (in C) first.
    if text.count("{") + text.count("[") > max_depth and _depth(text) > max_depth:
        raise JSONInputError(f"nesting deeper than {max_depth} levels")
    try:
        value = _DECODER.decode(text)
    except JSONInputError:
        raise
    except (ValueError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "invalid JSON"
        raise JSONInputError(f"not valid JSON: {detail}") from None
    if not isinstance(value, dict):
        raise JSONInputError("must be a JSON object")
    if SURROGATE_RE.search(text):
        raise JSONInputError("lone surrogates are not allowed")
    if r"\u" in text.lower():  # only an escape can put these characters in a string
        refused = _refused_char(value)
        if refused == "\x00":
            # CEL (and C code in many tools) reads a string only up to its first NUL, so a
            # rule would judge a different string from the one the tool receives.
            raise JSONInputError("U+0000 (NUL) is not allowed in strings")
        if refused is not None:
            raise JSONInputError("lone surrogates are not allowed")
    return value


def _refused_char(value: Any) -> str | None:
    """The first NUL or lone surrogate in any key or string of ``value``, if there is one."""
    if isinstance(value, str):
        found = REFUSED_CHAR_RE.search(value)
        return found.group() if found else None
    if isinstance(value, dict):
        items: Any = (text for pair in value.items() for text in pair)
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        refused = _refused_char(item)
        if refused is not None:
            return refused
    return None


def _number(value: Decimal | int) -> str:
    """The shortest exact decimal form: 120, 120.0 and 1.2E2 all read 120."""
    if isinstance(value, int):
        return str(value)
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise TypeError(f"not a finite number: {value}")
    while len(digits) > 1 and digits[-1] == 0:  # strip trailing zeros exactly (no rounding)
        digits, exponent = digits[:-1], exponent + 1
    if digits == (0,):
        return "0"
    return format(Decimal((sign, digits, exponent)), "f")


_string = json.encoder.encode_basestring
"""JSON string text as ``json.dumps(value, ensure_ascii=False)`` writes it, without its overhead."""


# ---------------------------------------------------------------- the orjson fast path

JSON_LEAVES: frozenset[type] = frozenset({str, int, bool, type(None), Decimal})
"""The scalar types ``sorted_json`` writes (Decimals through its ``default``)."""
_BELOW_UTF16_SURROGATES = "\ue000"
"""Keys below this sort alike by code point (orjson, Python) and by UTF-16 code unit (JCS)."""


def _plain(value: Any, leaves: frozenset[type], utf16_keys: bool) -> bool:
    """True if orjson writes ``value`` as the Python encoders here do.

    That holds for dicts with string keys, lists, tuples, strings, booleans, None, ints and
    Decimals (through ``default``): not for floats (orjson writes ``1.0`` and ``1e-7``) nor
    anything else. With ``utf16_keys`` a non-ASCII key must also sort the same by code point
    as by UTF-16 code unit. Ints beyond 64 bits make orjson raise, which callers also catch.
    """
    kind = type(value)
    if kind is list or kind is tuple:
        items = value
    elif kind is dict or (kind not in leaves and isinstance(value, Mapping)):
        try:
            keys = "".join(value)  # TypeError unless every key is a string
        except TypeError:
            return False
        if utf16_keys and not keys.isascii() and max(keys) >= _BELOW_UTF16_SURROGATES:
            return False
        items = value.values()
    else:
        return kind in leaves
    for item in items:
        if type(item) not in leaves and not _plain(item, leaves, utf16_keys):
            return False
    return True


def sorted_json(
    value: Any,
    default: Callable[[Any], Any],
    *,
    leaves: frozenset[type] = JSON_LEAVES,
    utf16_keys: bool = False,
) -> bytes | None:
    """``value`` as compact JSON with sorted keys, written by orjson, or None if orjson cannot
    write it exactly as the Python encoder would (the caller then uses that).

    ``default`` turns a ``Decimal`` (or another type of ``leaves``) into an ``orjson.Fragment``
    of its exact text, and any other ``Mapping`` into a dict. orjson escapes strings exactly as
    ``json.encoder.encode_basestring`` does and sorts keys by code point, as ``sorted`` does.
    """
    if not _plain(value, leaves, utf16_keys):
        return None
    try:
        return orjson.dumps(value, default=default, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # an int beyond 64 bits, a NaN Decimal, a lone surrogate
        return None


def _default(value: Any) -> Any:
    if type(value) is Decimal:
        return orjson.Fragment(_number(value))
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(type(value).__name__)


# ---------------------------------------------------------------- canonical form


def canonical(value: Any) -> str:
    """Canonical JSON text: keys sorted, no whitespace, numbers in shortest exact form.

    Two documents that mean the same call have the same canonical form, so the digest binds
    approvals and idempotency keys to the call, not to its formatting.
    """
    fast = sorted_json(value, _default)
    if fast is not None:
        return fast.decode("utf-8")
    return _canonical(value)


def _canonical(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return _string(value)
    if kind is dict:
        return "{" + _members(value) + "}"
    if kind is Decimal or kind is int:
        return _number(value)
    if kind is list:
        return "[" + ",".join([_canonical(v) for v in value]) + "]"
    if isinstance(value, dict):
        return "{" + _members(value) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join([_canonical(v) for v in value]) + "]"
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | Decimal):
        return _number(value)
    if isinstance(value, float):
        return _number(Decimal(repr(value)))
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _members(value: dict[Any, Any]) -> str:
    """The members in key order (a key that is not a string as ``json.dumps`` writes it)."""
    return ",".join(
        [
            (_string(k) if isinstance(k, str) else json.dumps(k, ensure_ascii=False))
            + ":"
            + _canonical(v)
            for k, v in sorted(value.items())
        ]
    )


def digest(value: Any) -> str:
    """``sha256:`` + hex digest of the canonical form."""
    text = sorted_json(value, _default)
    if text is None:
        text = _canonical(value).encode()
    return "sha256:" + hashlib.sha256(text).hexdigest()
