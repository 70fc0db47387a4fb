"""Each domain exception maps to exactly one gRPC status. Details are logged, not returned."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from sidecar import errors

log = logging.getLogger("proviso.server")

MAX_POLICY_VIOLATIONS_BYTES = 4096
"""The policy errors a refusal lists, in bytes of text: the status details travel in a trailer,
and gRPC clients refuse trailers past 8 KiB (at random from there, always past 16 KiB) once
base64-encoded. The rest are in ``proviso lint``'s output (the server's log has the first 100)."""
MAX_VIOLATION_CHARS = 512
"""Each listed error at most: one quoting a huge key or value would fill the trailer alone."""


@dataclass(frozen=True, slots=True)
class RpcError:
    """What the caller is told: a code, a message, and optional rich details."""

    code: grpc.StatusCode
    message: str
    field: str = ""
    preconditions: tuple[tuple[str, str, str], ...] = ()
    """(type, subject, description) of each failed precondition, e.g. a policy error."""

    def rich_status(self) -> status_pb2.Status:
        """A ``google.rpc.Status`` carrying a BadRequest field violation where one applies."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        if self.preconditions:
            failure = error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=kind, subject=subject, description=description
                    )
                    for kind, subject, description in self.preconditions
                ]
            )
            detail = any_pb2.Any()
            detail.Pack(failure)
            status.details.append(detail)
        if self.field:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=self.field, description=self.message
                    )
                ]
            )
            detail = any_pb2.Any()
            detail.Pack(bad_request)
            status.details.append(detail)
        return status


_SIMPLE: tuple[tuple[type[errors.SidecarError], grpc.StatusCode], ...] = (
    (errors.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def from_exception(exc: BaseException, method: str) -> RpcError:
    """The status for ``exc``; unexpected exceptions become INTERNAL with an opaque id."""
    if isinstance(exc, errors.InvalidRequestError):
        return RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field)
    if isinstance(exc, errors.StoreUnavailableError):
        log.error("could not decide safely", extra={"method": method, "error": str(exc)})
        return RpcError(
            grpc.StatusCode.UNAVAILABLE, "could not decide safely; treat this call as denied"
        )
    if isinstance(exc, errors.PolicyLoadError):
        return _policy_refused(exc)
    for kind, code in _SIMPLE:
        if isinstance(exc, kind):
            return RpcError(code, str(exc))
    error_id = "err_" + secrets.token_hex(6)
    log.error("unexpected error", exc_info=exc, extra={"method": method, "error_id": error_id})
    return RpcError(grpc.StatusCode.INTERNAL, f"internal error (id {error_id})")


def _policy_refused(exc: errors.PolicyLoadError) -> RpcError:
    """A bundle with errors: each one as a violation (code, file:line:col, message + hint)."""
    violations: list[tuple[str, str, str]] = []
    size = 0
    for issue in exc.issues:
        code = str(getattr(issue, "code", "POLICY_ERROR"))
        location = str(getattr(issue, "location", "."))
        message = str(getattr(issue, "message", issue))
        hint = str(getattr(issue, "hint", ""))
        text = f"{message} (hint: {hint})" if hint else message
        if len(text) > MAX_VIOLATION_CHARS:  # one issue may quote a huge key or value
            text = text[: MAX_VIOLATION_CHARS - 3] + "..."
        violation = (code, location[:MAX_VIOLATION_CHARS], text)
        size += sum(len(part.encode()) for part in violation)
        if violations and size > MAX_POLICY_VIOLATIONS_BYTES:
            break
        violations.append(violation)
    count = len(exc.issues)
    message = f"the policy bundle has {count} error(s); the version in force keeps serving"
    if len(violations) < count:
        message += f" (the first {len(violations)} are listed; 'proviso lint' prints them all)"
    return RpcError(grpc.StatusCode.FAILED_PRECONDITION, message, preconditions=tuple(violations))
