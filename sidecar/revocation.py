"""Revoking capability tokens: who may, and how long the record must be kept.

A revocation names a token id; the token and every token attenuated from it (they carry its
id in their ``parent`` chain) are denied ``TOKEN_REVOKED`` from the next Check on, by every
process sharing the store, and after restarts. The record is kept until the token has
expired for good (its ``exp`` plus the largest leeway): descendants never outlive it.
"""

from __future__ import annotations

from sidecar.engine import Revocation
from sidecar.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from sidecar.identity import Identity
from sidecar.minting import authorize_issuer
from sidecar.policy.model import Policy
from sidecar.state import Store
from tokens import MAX_LEEWAY_SECONDS

UNKNOWN_TOKEN_RETENTION_SECONDS = 30 * 24 * 3600
"""How long an admin's revocation of an id this sidecar never minted is kept: its expiry is
unknown, so long enough to outlast any token lifetime a policy would allow."""

MAX_REASON_CHARS = 1024


def is_admin(identity: Identity, policy: Policy) -> bool:
    return bool(set(identity.groups) & set(policy.admin_groups))


def revoke(
    store: Store,
    policy: Policy,
    identity: Identity,
    *,
    token_id: str,
    reason: str,
    now: float,
) -> tuple[Revocation, bool]:
    """Revoke ``token_id`` on behalf of ``identity``: an admin, or an issuer for its agent.

    Returns the revocation in force and whether this call created it (the first one stands).

    Raises:
        InvalidRequestError: no reason, or one too long.
        PermissionDeniedError: the caller is neither an admin nor an issuer for the agent the
            token was minted for.
        NotFoundError: a non-admin named a token this sidecar did not mint.
        StoreUnavailableError: the store cannot be read or written.
    """
    reason = reason.strip()
    if not reason:
        raise InvalidRequestError("reason", "say why the token is revoked")
    if len(reason) > MAX_REASON_CHARS:
        raise InvalidRequestError("reason", f"at most {MAX_REASON_CHARS} characters")
    issued = store.issued(token_id)
    if not is_admin(identity, policy):
        if identity.subject not in policy.issuers:
            raise PermissionDeniedError(f"'{identity.subject}' is neither an issuer nor an admin")
        if issued is None:
            raise NotFoundError(
                f"no token '{token_id}' was minted here; an admin can revoke any token id"
            )
        authorize_issuer(policy, identity.subject, issued.agent)
    expires_at = (
        issued.expires_at + MAX_LEEWAY_SECONDS
        if issued is not None
        else now + UNKNOWN_TOKEN_RETENTION_SECONDS
    )
    return store.revoke(Revocation(token_id, reason, identity.subject, now, expires_at))
