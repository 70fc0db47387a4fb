"""from_exception: each domain error is one gRPC status; surprises are INTERNAL and opaque."""

from __future__ import annotations

import logging
import re

import grpc
import pytest
from google.rpc import error_details_pb2

from sidecar import errors
from sidecar.minting import GrantRefusedError
from sidecar.server.status import RpcError, from_exception


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.UnauthenticatedError("who are you"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.PermissionDeniedError("no"), grpc.StatusCode.PERMISSION_DENIED),
        (GrantRefusedError(0, "t", "no"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.NotFoundError("gone"), grpc.StatusCode.NOT_FOUND),
        (errors.ConflictError("clash"), grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_each_domain_error_maps_to_one_status_with_its_message(
    exc: errors.SidecarError, code: grpc.StatusCode
) -> None:
    """Caller-facing domain errors keep their message and get their one status code."""
    assert from_exception(exc, "M") == RpcError(code, str(exc))


def test_an_invalid_request_names_its_field() -> None:
    """InvalidRequestError is INVALID_ARGUMENT with the field, and a BadRequest detail."""
    error = from_exception(errors.InvalidRequestError("tool", "is required"), "Check")
    assert error == RpcError(grpc.StatusCode.INVALID_ARGUMENT, "tool: is required", "tool")
    status = error.rich_status()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert len(status.details) == 1
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("tool", "tool: is required")
    ]


def test_a_status_without_field_has_no_details() -> None:
    """A rich status carries details only where a field applies."""
    status = from_exception(errors.NotFoundError("gone"), "M").rich_status()
    assert status.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert status.message == "gone"
    assert list(status.details) == []


@pytest.mark.parametrize(
    "exc",
    [
        errors.StoreUnavailableError("sqlite at /var/secret/state.db is locked"),
        errors.AuditWriteError("audit write failed: /var/secret/audit.jsonl: ENOSPC"),
    ],
)
def test_storage_failures_are_unavailable_without_details(
    exc: errors.SidecarError, caplog: pytest.LogCaptureFixture
) -> None:
    """Storage failures answer UNAVAILABLE 'treat as denied', log the detail, and hide it."""
    with caplog.at_level(logging.ERROR, logger="proviso.server"):
        error = from_exception(exc, "Check")
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert "denied" in error.message
    assert "/var/secret" not in error.message
    assert any(getattr(r, "error", "") == str(exc) for r in caplog.records)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("password=hunter2 at db.internal:5432"),
        KeyError("hunter2"),
        ValueError("hunter2"),
    ],
)
def test_an_unexpected_exception_is_internal_with_an_opaque_id(
    exc: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    """Anything else is INTERNAL with an ``err_`` id; the exception text never leaves."""
    with caplog.at_level(logging.ERROR, logger="proviso.server"):
        error = from_exception(exc, "Check")
    assert error.code is grpc.StatusCode.INTERNAL
    assert "hunter2" not in error.message
    assert error.field == ""
    match = re.search(r"\berr_[0-9a-f]{12}\b", error.message)
    assert match is not None
    logged = [r for r in caplog.records if getattr(r, "error_id", None) == match.group(0)]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert logged[0].exc_info[1] is exc


def test_internal_error_ids_differ_per_error() -> None:
    """Two unexpected errors get two different ids (ids correlate one log line each)."""
    messages = {from_exception(RuntimeError("x"), "M").message for _ in range(10)}
    assert len(messages) == 10
