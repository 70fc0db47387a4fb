"""Who is calling: identities from bearer JWTs, and the admin check shared by admin RPCs."""

from __future__ import annotations

from typing import Any

import grpc

from sidecar.errors import PermissionDeniedError
from sidecar.identity import Identity, IdentityVerifier, bearer_token
from sidecar.policy.model import Policy


def metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    """Invocation metadata as a dict of text values (binary headers are skipped)."""
    return {
        key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)
    }


def caller(
    context: grpc.aio.ServicerContext[Any, Any], identities: IdentityVerifier, now: float
) -> Identity:
    """The verified identity of the caller.

    Raises:
        UnauthenticatedError: no bearer token, or one that does not verify.
    """
    return identities.verify(bearer_token(metadata(context)), now)


def require_admin(identity: Identity, policy: Policy) -> Identity:
    """``identity`` if one of its groups is an admin group of the policy in force.

    Raises:
        PermissionDeniedError: it is not.
    """
    if not set(identity.groups) & set(policy.admin_groups):
        raise PermissionDeniedError(f"'{identity.subject}' is not an admin")
    return identity
