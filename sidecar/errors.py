"""Exception roots of the sidecar. A deny is data; an exception means "could not decide"."""

from __future__ import annotations


class SidecarError(Exception):
    """Root of every error the sidecar raises on purpose."""


class InvalidRequestError(SidecarError):
    """A request is malformed; ``field`` names the offending request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnauthenticatedError(SidecarError):
    """The caller presented no identity, or one that does not verify."""


class PermissionDeniedError(SidecarError):
    """The caller is known but may not do this."""


class NotFoundError(SidecarError):
    """The named thing does not exist."""


class ConflictError(SidecarError):
    """The request conflicts with the current state."""


class OverloadedError(SidecarError):
    """Too many calls in flight: refused at once rather than queued without bound."""


class DeadlineExceededError(SidecarError):
    """The caller's deadline passed before the call could be decided; nothing was decided."""


class StoreUnavailableError(SidecarError):
    """State or audit storage cannot be read or written; decisions must fail closed."""


class StoreBusyError(StoreUnavailableError):
    """Another writer held the state store all the time we waited for it (nothing was done)."""


class AuditWriteError(StoreUnavailableError):
    """An audit record could not be made durable; the answer must not be ALLOW."""


class PolicyLoadError(SidecarError):
    """A policy bundle could not be loaded; ``issues`` holds every problem found, sorted.

    ``version`` is the content hash of the files as they were read (empty if none was), so a
    reloader can tell a refused bundle from one an edit landed in while it was read.
    """

    def __init__(self, issues: tuple[object, ...], *, version: str = "") -> None:
        self.issues = issues
        self.version = version
        first = str(issues[0]) if issues else "unknown problem"
        more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
        super().__init__(f"{first}{more}")


class ShadowPolicyLoadError(PolicyLoadError):
    """The shadow (candidate) bundle could not be loaded at start."""
