"""check_input: untrusted CheckRequest fields checked, each failure naming its field."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from sidecar._proto.proviso.v1 import authorization_service_pb2 as authz_pb
from sidecar.authorizer import CheckInput
from sidecar.errors import InvalidRequestError
from sidecar.server.convert import (
    MAX_IDENTIFIER_BYTES,
    MAX_RUN_METADATA_ENTRIES,
    MAX_RUN_METADATA_VALUE_BYTES,
    check_input,
)


def _check(**fields: Any) -> CheckInput:
    values: dict[str, Any] = {"token": "t.o.k", "tool": "requestRefund"}
    values.update(fields)
    return check_input(authz_pb.CheckRequest(**values))


def _field_of(**fields: Any) -> str:
    with pytest.raises(InvalidRequestError) as caught:
        _check(**fields)
    return caught.value.field


def test_a_full_request_becomes_a_tool_call() -> None:
    """Every field reaches the domain, with decimals parsed exactly."""
    parsed = _check(
        arguments_json='{"amount": 10.50, "n": 3}',
        context_json='{"env": "prod"}',
        run_id="run-1",
        step_id="step-2",
        idempotency_key="idem-3",
        approval_id="apr_4",
        dry_run=True,
        run_metadata={"model": "m-1"},
    )
    call = parsed.call
    assert parsed.token == "t.o.k"
    assert call.tool == "requestRefund"
    assert call.arguments == {"amount": Decimal("10.50"), "n": 3}
    assert str(call.arguments["amount"]) == "10.50"
    assert call.context == {"env": "prod"}
    assert (call.run_id, call.step_id, call.idempotency_key, call.approval_id) == (
        "run-1",
        "step-2",
        "idem-3",
        "apr_4",
    )
    assert call.dry_run is True
    assert parsed.run_metadata == {"model": "m-1"}


def test_empty_arguments_and_context_are_empty_objects() -> None:
    """Empty arguments_json and context_json mean {}; optional identifiers may be empty."""
    call = _check().call
    assert dict(call.arguments) == {}
    assert dict(call.context) == {}
    assert (call.run_id, call.step_id, call.idempotency_key, call.approval_id) == ("", "", "", "")


def test_empty_arguments_are_a_plain_dict_as_parsed_json_is() -> None:
    """Empty arguments_json gives the same kind of object as arguments_json '{}'."""
    assert isinstance(_check().call.arguments, dict)


def test_the_tool_name_is_kept_byte_exact() -> None:
    """Tool names are not case-folded or trimmed."""
    assert _check(tool="RequestRefund").call.tool == "RequestRefund"


@pytest.mark.parametrize(
    "tool",
    ["", "request Refund", "r\u00e9fund", "tab\there", "new\nline", "\u0440efund", "nul\x00",
     "del\x7f", "x" * (MAX_IDENTIFIER_BYTES + 1), "getInvoice\n", "\ngetInvoice"],
)  # fmt: skip
def test_a_bad_tool_name_is_refused_naming_tool(tool: str) -> None:
    """Empty, spaced, non-ASCII, control-character or over-long tool names name ``tool``."""
    assert _field_of(tool=tool) == "tool"


def test_an_identifier_of_exactly_the_maximum_length_is_accepted() -> None:
    """256 printable ASCII characters are accepted."""
    assert len(_check(tool="t" * MAX_IDENTIFIER_BYTES).call.tool) == MAX_IDENTIFIER_BYTES


@pytest.mark.parametrize("field", ["run_id", "step_id", "idempotency_key", "approval_id"])
@pytest.mark.parametrize(
    "value", ["has space", "caf\u00e9", "x" * (MAX_IDENTIFIER_BYTES + 1), "run-1\n"]
)
def test_bad_optional_identifiers_name_their_field(field: str, value: str) -> None:
    """Optional identifiers are checked like the tool name, and the error names them."""
    assert _field_of(**{field: value}) == field


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("arguments_json", "[1, 2]"),
        ("arguments_json", '{"a": 1, "a": 2}'),
        ("arguments_json", '{"a": NaN}'),
        ("arguments_json", "{"),
        ("context_json", '"text"'),
        ("context_json", '{"a": "\\ud800"}'),
        ("arguments_json", '{"body": "ok\\u00004111111111111111"}'),
        ("context_json", '{"amount_due\\u0000x": 1}'),
        ("arguments_json", '{"n": 1' + "0" * 70 + "}"),
    ],
)
def test_bad_json_names_its_field(field: str, text: str) -> None:
    """arguments_json and context_json failures are InvalidRequestError on that field."""
    assert _field_of(**{field: text}) == field


def test_run_metadata_at_its_limits_is_accepted() -> None:
    """32 entries, each value 1024 bytes, are accepted."""
    metadata = {
        f"k{i}": "v" * MAX_RUN_METADATA_VALUE_BYTES for i in range(MAX_RUN_METADATA_ENTRIES)
    }
    assert _check(run_metadata=metadata).run_metadata == metadata


def test_too_many_run_metadata_entries_are_refused() -> None:
    """33 entries are refused on field ``run_metadata``."""
    metadata = {f"k{i}": "v" for i in range(MAX_RUN_METADATA_ENTRIES + 1)}
    assert _field_of(run_metadata=metadata) == "run_metadata"


@pytest.mark.parametrize("key", ["has space", "caf\u00e9", "k" * (MAX_IDENTIFIER_BYTES + 1)])
def test_a_bad_run_metadata_key_is_refused(key: str) -> None:
    """run_metadata keys are identifiers."""
    assert _field_of(run_metadata={key: "v"}) == "run_metadata"


@pytest.mark.parametrize(
    "value",
    ["v" * (MAX_RUN_METADATA_VALUE_BYTES + 1), "\u00e9" * (MAX_RUN_METADATA_VALUE_BYTES // 2 + 1)],
)
def test_an_over_long_run_metadata_value_names_its_key(value: str) -> None:
    """A value over 1024 bytes (UTF-8, not characters) is refused as ``run_metadata[key]``."""
    assert _field_of(run_metadata={"model": value}) == "run_metadata[model]"
