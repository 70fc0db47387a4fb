"""Offline verification of one tool call, for tool backends: defence in depth.

A tool service that is handed a capability token can check it itself, without the sidecar:
the signature against the sidecar's published JWKS, the claims, and whether the token allows
*this* call (tool, run, pins, argument constraints). The tool then refuses an out-of-scope
call even if the agent never asked the sidecar, or the sidecar was bypassed::

    keys = VerificationKeys.from_jwks(json.loads(jwks_text))   # fetched from the sidecar
    try:
        call = verify_call(token, keys, audience="proviso", issuer="proviso",
                           tool="requestRefund", arguments=request_body, now=time.time())
    except TokenError as refusal:
        return reject(refusal.code, refusal.message)
    ...  # do the work for call.claims.subject

What it cannot know offline: revocations (pass the ids the tool has learnt of in
``revoked``), the policy in force (roles, schemas, rules, tiers, budgets) and approvals. Keep
token lifetimes short; the sidecar's Check remains the authority.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from tokens.claims import CapabilityClaims, Grant
from tokens.errors import TokenOutOfScopeError, TokenRevokedError
from tokens.keys import VerificationKeys
from tokens.scope import ScopeViolation, find_grant
from tokens.verify import DEFAULT_LEEWAY_SECONDS, verify

__all__ = ["VerifiedCall", "parse_arguments", "verify_call"]


@dataclass(frozen=True, slots=True)
class VerifiedCall:
    """A call the token allows: the verified claims and the grant that allows the call."""

    claims: CapabilityClaims
    grant: Grant


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"arguments repeat the key {key!r}")
        result[key] = value
    return result


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"arguments hold the non-standard JSON constant {name}")


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except ArithmeticError:  # an exponent beyond what Decimal can hold
        raise ValueError(f"arguments hold a number out of range: {text[:20]}") from None


def parse_arguments(text: str | bytes) -> dict[str, Any]:
    """Read a call's arguments from JSON text exactly: decimals stay ``Decimal``.

    Duplicate keys and ``NaN``/``Infinity`` are refused, so this reads the text the same way
    the sidecar does.

    Raises:
        ValueError: ``text`` is not exactly one JSON object.
    """
    try:
        value = json.loads(
            text,
            parse_float=_decimal,
            object_pairs_hook=_refuse_duplicates,
            parse_constant=_refuse_constant,
        )
    except RecursionError:
        raise ValueError("arguments are nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError("arguments must be one JSON object")
    return value


def verify_call(
    token: str,
    keys: VerificationKeys,
    *,
    audience: str,
    issuer: str,
    tool: str,
    arguments: Mapping[str, Any] | str | bytes,
    now: float,
    run_id: str | None = None,
    leeway_seconds: int = DEFAULT_LEEWAY_SECONDS,
    revoked: Collection[str] = (),
) -> VerifiedCall:
    """Verify ``token`` completely and check that it allows calling ``tool`` with ``arguments``.

    Runs :func:`tokens.verify` (every check, in its order), then the revocation list, then
    the scope: the run, the tool, and every pin and argument constraint of some grant.

    Args:
        token: The capability token, exactly as received.
        keys: The sidecar's public keys, e.g. ``VerificationKeys.from_jwks(...)`` of its
            ``/.well-known/jwks.json``.
        audience: The sidecar's audience (``aud``), from configuration.
        issuer: The sidecar's issuer (``iss``), from configuration.
        tool: The tool being called: this service's own name for it.
        arguments: The call's arguments: a mapping, or the JSON text of the request (read
            with exact decimals, duplicate keys refused).
        now: The current Unix time in seconds.
        run_id: The run the call belongs to; a token bound to a run is refused without it.
        leeway_seconds: Clock skew tolerated, from 0 to ``MAX_LEEWAY_SECONDS``.
        revoked: Token ids known to be revoked; the token is refused if its own id or any
            ancestor's is among them.

    Warning:
        Take ``keys``, ``audience``, ``issuer``, ``tool`` and ``now`` from this service's own
        configuration and clock, never from the token or the request. ``tool`` in particular
        must be the operation about to run, not a name the caller sent.

    Returns:
        The verified claims and the grant that allows the call.

    Raises:
        TokenError: any refusal of :func:`tokens.verify`.
        TokenRevokedError: the token or an ancestor is in ``revoked``.
        TokenOutOfScopeError: the token does not allow this call; ``argument`` names the
            argument at fault, if one is.
        ValueError: ``arguments`` is text that is not one JSON object; or an argument of
            :func:`tokens.verify` is invalid.
        TypeError: as for :func:`tokens.verify`, or ``arguments`` is of another type.
    """
    claims = verify(
        token, keys, audience=audience, issuer=issuer, now=now, leeway_seconds=leeway_seconds
    )
    for token_id in claims.lineage:
        if token_id in revoked:
            whose = "the token" if token_id == claims.token_id else "an ancestor of the token"
            raise TokenRevokedError(f"{whose} ({token_id}) is revoked", token_id=token_id)
    if isinstance(arguments, str | bytes):
        arguments = parse_arguments(arguments)
    elif not isinstance(arguments, Mapping):
        raise TypeError(f"arguments must be a mapping or JSON text, not {type(arguments).__name__}")
    found = find_grant(claims, tool, arguments, run_id)
    if isinstance(found, ScopeViolation):
        raise TokenOutOfScopeError(found.message, tool=tool, argument=found.argument)
    return VerifiedCall(claims=claims, grant=found)
