"""The pure hash chain: canonical JSON against RFC 8785, sealing, checkpoints, verification."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
import rfc8785
from hypothesis import given
from hypothesis import strategies as st

from sidecar.audit import chain as chain_module
from sidecar.audit.chain import (
    GENESIS,
    CanonicalJSONError,
    ChainVerifier,
    Problem,
    Sealed,
    canonical,
    encoded,
    parse_line,
    prepare,
    record_hash,
    seal,
    seal_checkpoint,
)
from tests.json_values import any_values
from tokens import SigningKey, VerificationKeys

KEY = SigningKey.generate(kid="audit-test")
KEYS = VerificationKeys.from_signing_keys([KEY])

# Values RFC 8785 and our canonical form must agree on: no floats (JCS would round decimals).
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.text()  # hypothesis' text() never yields lone surrogates
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_canonical_is_rfc8785_for_json_without_decimals(value: Any) -> None:
    """For strings, integers, literals, arrays and objects the bytes are exactly RFC 8785's."""
    assert canonical(value) == rfc8785.dumps(value)


def _jcs_plain(d: Decimal) -> bool:
    """Zero, or at most 15 significant digits between 1e-6 and 1e15: a double keeps it exactly."""
    digits = len(d.normalize().as_tuple().digits)
    return d == 0 or (Decimal("1e-6") <= abs(d) < Decimal("1e15") and digits <= 15)


@given(st.decimals(allow_nan=False, allow_infinity=False, places=6).filter(_jcs_plain))
def test_decimals_in_the_common_range_are_written_as_rfc8785_writes_them(value: Decimal) -> None:
    """A decimal of at most 15 significant digits in JCS's plain range reads as JCS writes it."""
    assert canonical(value) == rfc8785.dumps(float(value))


@pytest.mark.parametrize(
    ("number", "text"),
    [
        (Decimal("49.00"), "49"),
        (Decimal("0.10"), "0.1"),
        (Decimal("1E-7"), "0.0000001"),
        (Decimal("12345678901234567890.123456789"), "12345678901234567890.123456789"),
        (2**64, "18446744073709551616"),
        (Decimal("-0"), "0"),
        (1.25, "1.25"),
    ],
)
def test_numbers_keep_their_exact_value(number: Any, text: str) -> None:
    """Numbers are exact and plain, where JCS would round them to a double or use an exponent."""
    assert canonical({"n": number}) == b'{"n":' + text.encode() + b"}"


def test_members_sort_by_utf16_code_units() -> None:
    """A name beyond the BMP sorts by its surrogates, before U+E000..U+FFFF, as JCS says."""
    value = {"\ue000": 1, "\U0001f600": 2, "a": 3}
    assert canonical(value) == rfc8785.dumps(value)
    assert canonical(value).index("\U0001f600".encode()) < canonical(value).index("\ue000".encode())


@pytest.mark.parametrize(
    "value",
    [
        {1: "x"}, {"x": float("nan")}, {"x": "\ud800"}, {"x": {1, 2}}, {"x": Decimal("Inf")},
        {"x": Decimal("1e5000")}, {"x": Decimal("1e-999999999")},
    ],
)  # fmt: skip
def test_values_without_a_canonical_form_are_refused(value: Any) -> None:
    """Non-string keys, NaN, lone surrogates and non-JSON types have no canonical form."""
    with pytest.raises(CanonicalJSONError):
        canonical(value)


@given(json_values, st.decimals(allow_nan=False, allow_infinity=False))
def test_a_parsed_line_re_encodes_to_the_same_bytes(value: Any, number: Decimal) -> None:
    """Parsing a sealed line and hashing it again gives its hash: verification is stable."""
    sealed = seal({"kind": "test", "value": value, "number": number}, seq=1, prev=GENESIS)
    record = parse_line(sealed.line.rstrip(b"\n"))
    assert record_hash(record) == sealed.hash
    assert canonical(record) + b"\n" == sealed.line


def test_seal_refuses_chain_fields_in_the_body() -> None:
    """Only the writer assigns seq, prev and hash."""
    with pytest.raises(ValueError, match="seq"):
        seal({"seq": 3}, seq=1, prev=GENESIS)


def chain(count: int, *, checkpoint_at: tuple[int, ...] = ()) -> list[Sealed]:
    """A well-formed chain of ``count`` records, with checkpoints after the given seqs."""
    sealed: list[Sealed] = []
    prev, first = GENESIS, 1
    for index in range(count):
        record = seal({"kind": "decision", "n": index}, seq=len(sealed) + 1, prev=prev)
        sealed.append(record)
        prev = record.hash
        if record.seq in checkpoint_at:
            point = seal_checkpoint(
                seq=record.seq + 1, prev=prev, first_seq=first, time="t", key=KEY
            )
            sealed.append(point)
            prev, first = point.hash, point.seq + 1
    return sealed


def verify(lines: list[bytes], keys: VerificationKeys | None = KEYS) -> ChainVerifier:
    verifier = ChainVerifier(keys)
    for number, line in enumerate(lines, 1):
        complete = line.endswith(b"\n")
        verifier.feed(line.rstrip(b"\n"), file="log", line=number, complete=complete)
    return verifier


def test_a_well_formed_chain_verifies_with_its_checkpoints() -> None:
    """Records and signed checkpoints verify; the records after the last one are unsealed."""
    lines = [s.line for s in chain(10, checkpoint_at=(4, 8))]
    verifier = verify(lines)
    assert verifier.broken is None
    state = verifier.state
    assert (state.records, state.checkpoints, state.seq) == (10, 2, 12)
    assert (state.sealed_seq, state.unsealed) == (9, 3)
    assert state.kids == {"audit-test"}


@pytest.mark.parametrize("number", [b"1e5000", b"1e-999999999"])
def test_a_number_out_of_range_is_a_malformed_line_not_a_crash(number: bytes) -> None:
    """An edited line holding 1e5000 is reported MALFORMED at its line (it used to end
    `audit verify` in a traceback; 1e-999999999 would have been written out in full)."""
    lines = [s.line for s in chain(3)]
    lines[1] = lines[1].replace(b'"n":1', b'"n":' + number)
    broken = verify(lines).broken
    assert broken is not None
    assert (broken.line, broken.problem) == (2, Problem.MALFORMED)


def test_a_checkpoint_with_an_unknown_key_breaks_the_chain() -> None:
    """Without the signer's public key a checkpoint proves nothing, so verification stops."""
    lines = [s.line for s in chain(4, checkpoint_at=(2,))]
    other = VerificationKeys.from_signing_keys([SigningKey.generate(kid="other")])
    broken = verify(lines, other).broken
    assert broken is not None
    assert (broken.line, broken.problem) == (3, Problem.UNKNOWN_KEY)


def test_a_forged_signature_is_caught() -> None:
    """A checkpoint signed by another key under the right kid does not verify."""
    lines = [s.line for s in chain(4, checkpoint_at=(2,))]
    impostor = SigningKey.generate(kid="audit-test")
    records = [parse_line(line.rstrip(b"\n")) for line in lines[:2]]
    forged = seal_checkpoint(seq=3, prev=records[1]["hash"], first_seq=1, time="t", key=impostor)
    broken = verify([*lines[:2], forged.line]).broken
    assert broken is not None
    assert (broken.line, broken.problem) == (3, Problem.BAD_SIGNATURE)


def test_a_checkpoint_must_cover_exactly_the_records_since_the_last_one() -> None:
    """A checkpoint that claims another range is refused even when correctly signed."""
    lines = [s.line for s in chain(3)]
    head = parse_line(lines[-1].rstrip(b"\n"))["hash"]
    wrong = seal_checkpoint(seq=4, prev=head, first_seq=2, time="t", key=KEY)
    broken = verify([*lines, wrong.line]).broken
    assert broken is not None
    assert (broken.line, broken.problem) == (4, Problem.BAD_CHECKPOINT)


def test_a_checkpoint_names_the_sibling_chains_under_its_signature() -> None:
    """The chains a checkpoint names are collected; a name that is a path is refused."""
    lines = [s.line for s in chain(3)]
    head = parse_line(lines[-1].rstrip(b"\n"))["hash"]
    names = ["d.w1.jsonl", "d.w0.jsonl"]
    point = seal_checkpoint(seq=4, prev=head, first_seq=1, time="t", key=KEY, logs=names)
    verifier = verify([*lines, point.line])
    assert verifier.broken is None
    assert verifier.state.logs == set(names)
    assert parse_line(point.line.rstrip(b"\n"))["logs"] == sorted(names)
    for bad in (["../d.w1.jsonl"], [""], [7]):
        odd = seal_checkpoint(seq=4, prev=head, first_seq=1, time="t", key=KEY, logs=bad)  # type: ignore[arg-type]
        broken = verify([*lines, odd.line]).broken
        assert broken is not None
        assert (broken.line, broken.problem) == (4, Problem.BAD_CHECKPOINT)


def test_the_signature_cannot_be_moved_to_another_head() -> None:
    """The signature covers seq and prev: pasted onto another chain it does not verify."""
    good = chain(2, checkpoint_at=(2,))
    signature = json.loads(good[-1].line)["signature"]
    first = seal({"kind": "decision", "n": "other"}, seq=1, prev=GENESIS)
    other = [first, seal({"kind": "decision", "n": "other"}, seq=2, prev=first.hash)]
    head = other[-1].hash
    body = {"kind": "checkpoint", "time": "t", "first_seq": 1, "last_seq": 2, "kid": "audit-test"}
    pasted = seal({**body, "signature": signature}, seq=3, prev=head)
    broken = verify([other[0].line, other[1].line, pasted.line]).broken
    assert broken is not None
    assert broken.problem is Problem.BAD_SIGNATURE


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6), st.integers(1, 2**40))
def test_a_prepared_record_seals_to_the_bytes_the_verifier_recomputes(
    body: dict[str, Any], seq: int
) -> None:
    """Encoding ahead of time changes nothing: the line parses back to the hash it carries."""
    body = {k: v for k, v in body.items() if k not in ("seq", "prev", "hash")}
    sealed = prepare(body).seal(seq=seq, prev=GENESIS)
    record = parse_line(sealed.line.rstrip(b"\n"))
    assert record_hash(record) == sealed.hash == record["hash"]
    assert (record["seq"], record["prev"]) == (seq, GENESIS)
    assert sealed.line == canonical(record) + b"\n"


@given(json_values)
def test_an_encoded_value_is_written_exactly_as_the_value_itself(value: Any) -> None:
    """A value encoded once (a token's claims) gives the same record as the value inline."""
    inline = seal({"v": value, "w": [value]}, seq=1, prev=GENESIS)
    once = encoded(value)
    assert seal({"v": once, "w": [once]}, seq=1, prev=GENESIS) == inline


@given(any_values)
def test_the_orjson_fast_path_writes_exactly_what_the_python_encoder_writes(value: Any) -> None:
    """canonical() takes orjson when it can; its bytes must be the reference encoder's."""
    assert canonical(value) == chain_module._utf8(chain_module._encode(value))


@given(
    st.dictionaries(
        st.text(max_size=5).filter(lambda k: k not in chain_module.CHAIN_FIELDS),
        any_values,
        max_size=5,
    ),
    st.integers(1, 2**40),
)
def test_a_prepared_record_of_any_body_verifies(body: dict[str, Any], seq: int) -> None:
    """Sealing splices the chain fields into the prepared text; the verifier's hash agrees."""
    sealed = prepare(body).seal(seq=seq, prev=GENESIS)
    record = parse_line(sealed.line.rstrip(b"\n"))
    assert record["seq"] == seq
    assert record["prev"] == GENESIS
    assert record["hash"] == sealed.hash == record_hash(record)
