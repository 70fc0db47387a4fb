"""Minting capability tokens within the ceiling the agent's roles allow.

Every refusal names the offending grant, so an orchestrator can fix its request.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.errors import InvalidRequestError, PermissionDeniedError
from sidecar.policy.model import Policy
from tokens import AttenuationError, CapabilityClaims, Grant, SigningKey, attenuate, issue


class GrantRefusedError(PermissionDeniedError):
    """A requested grant exceeds what the agent's roles allow."""

    def __init__(self, index: int, tool: str, message: str) -> None:
        super().__init__(f"grants[{index}] ({tool}): {message}")
        self.index = index
        self.tool = tool


@dataclass(frozen=True, slots=True)
class MintedToken:
    """A freshly signed token and what it says."""

    token: str
    token_id: str
    key_id: str
    expires_at: int
    ttl_seconds: int


def authorize_issuer(policy: Policy, issuer_subject: str, agent: str) -> None:
    """The caller may mint for ``agent``.

    Raises:
        PermissionDeniedError: the policy does not name the caller an issuer for that agent.
    """
    issuer = policy.issuers.get(issuer_subject)
    if issuer is None:
        raise PermissionDeniedError(f"'{issuer_subject}' is not an issuer")
    if agent not in issuer.agents:
        raise PermissionDeniedError(f"'{issuer_subject}' may not mint tokens for '{agent}'")


def mint(
    policy: Policy,
    key: SigningKey,
    *,
    agent: str,
    grants: Sequence[Grant],
    ttl_seconds: int,
    now: float,
    issuer: str,
    audience: str,
    run_id: str | None = None,
) -> MintedToken:
    """Sign a token for ``agent`` if every grant is within its roles' ceiling.

    ``ttl_seconds`` is capped at the roles' maximum; 0 asks for the maximum.

    Raises:
        InvalidRequestError: no grants, a negative TTL, or grants too large for one token
            (``MAX_TOKEN_BYTES``).
        PermissionDeniedError: the agent is unknown, or a grant exceeds the ceiling
            (``GrantRefusedError`` names it).
    """
    if not grants:
        raise InvalidRequestError("grants", "at least one grant is required")
    if ttl_seconds < 0:
        raise InvalidRequestError("ttl", "must not be negative")
    if agent not in policy.agents:
        raise PermissionDeniedError(f"agent '{agent}' is not in the policy")
    permitted = policy.tools_permitted(agent)
    for index, grant in enumerate(grants):
        if grant.tool not in policy.tools:
            raise GrantRefusedError(index, grant.tool, "the policy defines no such tool")
        if grant.tool not in permitted:
            raise GrantRefusedError(index, grant.tool, f"the roles of '{agent}' do not permit it")
        missing = [pin for pin in policy.tools[grant.tool].pins if pin not in grant.pins]
        if missing:
            raise GrantRefusedError(
                index, grant.tool, f"the tool requires pins: {', '.join(missing)}"
            )
    ceiling = policy.max_token_ttl_seconds(agent)
    ttl = min(ttl_seconds, ceiling) if ttl_seconds else ceiling
    if ttl <= 0:
        raise PermissionDeniedError(f"the roles of '{agent}' allow no token lifetime")
    token_id = secrets.token_urlsafe(16)
    try:
        token = issue(
            key,
            issuer=issuer,
            subject=agent,
            audience=audience,
            grants=grants,
            ttl_seconds=ttl,
            now=int(now),
            run_id=run_id or None,
            token_id=token_id,
        )
    except ValueError as exc:  # the inputs are checked above: the token would be too large
        raise InvalidRequestError("grants", str(exc)) from None
    return MintedToken(
        token=token,
        token_id=token_id,
        key_id=key.kid,
        expires_at=int(now) + ttl,
        ttl_seconds=ttl,
    )


class AttenuationRefusedError(PermissionDeniedError):
    """The requested child would carry more than its parent; the message names the grant."""


def attenuate_token(
    parent: CapabilityClaims,
    key: SigningKey,
    *,
    grants: Sequence[Grant],
    ttl_seconds: int,
    now: float,
    run_id: str | None = None,
) -> MintedToken:
    """Sign a child of a verified, unrevoked ``parent`` that is narrower than it.

    ``ttl_seconds`` of 0 means until the parent expires; longer is capped there.

    Raises:
        InvalidRequestError: no grants, a negative TTL, or grants too large for one token.
        AttenuationRefusedError: a grant is not within the parent's (named), the run differs,
            the chain is too long, or the parent is about to expire.
    """
    if not grants:
        raise InvalidRequestError("grants", "at least one grant is required")
    if ttl_seconds < 0:
        raise InvalidRequestError("ttl", "must not be negative")
    issued_at = int(now)
    token_id = secrets.token_urlsafe(16)
    try:
        token = attenuate(
            parent,
            key,
            grants=grants,
            now=issued_at,
            ttl_seconds=ttl_seconds,
            run_id=run_id or None,
            token_id=token_id,
        )
    except AttenuationError as exc:
        raise AttenuationRefusedError(str(exc)) from None
    except ValueError as exc:  # the inputs are checked above: the child would be too large
        raise InvalidRequestError("grants", str(exc)) from None
    expires_at = parent.expires_at
    if ttl_seconds:
        expires_at = min(issued_at + ttl_seconds, expires_at)
    return MintedToken(
        token=token,
        token_id=token_id,
        key_id=key.kid,
        expires_at=expires_at,
        ttl_seconds=expires_at - issued_at,
    )
