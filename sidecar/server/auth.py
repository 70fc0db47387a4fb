"""Who is calling: identities from bearer JWTs, and the role checks shared by RPCs."""

from __future__ import annotations

import asyncio
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


async def caller(
    context: grpc.aio.ServicerContext[Any, Any], identities: IdentityVerifier, now: float
) -> Identity:
    """The verified identity of the caller, verified on a thread: verifying may fetch the
    IdP's keys (stale, or a new kid), up to the fetch timeout, which must not hold up the
    event loop and every Check on it.

    Raises:
        UnauthenticatedError: no bearer token, or one that does not verify.
    """
    token = bearer_token(metadata(context))
    return await asyncio.to_thread(identities.verify, token, now)


def require_admin(identity: Identity, policy: Policy) -> Identity:
    """``identity`` if one of its groups is an admin group of the policy in force.

    Raises:
        PermissionDeniedError: it is not.
    """
    if not set(identity.groups) & set(policy.admin_groups):
        raise PermissionDeniedError(f"'{identity.subject}' is not an admin")
    return identity


def require_approval_reader(identity: Identity, policy: Policy) -> Identity:
    """``identity`` if it holds an approver role or is an admin of the policy in force.

    Approval requests carry the call's full arguments (an invoice, a customer's message):
    being known to the IdP is not enough to read them.

    Raises:
        PermissionDeniedError: it holds neither.
    """
    if policy.approver_roles_of(identity.groups) or set(identity.groups) & set(policy.admin_groups):
        return identity
    raise PermissionDeniedError(
        f"'{identity.subject}' holds no approver role and is not an admin: "
        "approval requests are shown only to those"
    )
