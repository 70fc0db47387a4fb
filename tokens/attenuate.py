"""Attenuation: deriving a narrower child from a verified token, e.g. for a sub-agent.

A child may only ever carry less than its parent: a subset of its grants, each keeping every
pin (more may be added) and every constraint (equal or tighter; more may be added), the same
subject, audience, issuer and run, and an expiry no later than the parent's. It names its
ancestors in ``parent`` (root first, at most ``MAX_PARENT_CHAIN``), so revoking any ancestor
stops it. Since every step can only narrow, no sequence of attenuations widens authority.

The child is signed with the given key: a holder has no key, so a service that holds one (the
sidecar's ``AttenuateToken``) verifies the parent and signs the child for it.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokens.claims import MAX_PARENT_CHAIN, CapabilityClaims, Constraint, Grant
from tokens.issue import issue
from tokens.keys import SigningKey

__all__ = ["AttenuationError", "attenuate", "constraint_within", "grant_within"]


class AttenuationError(ValueError):
    """The requested child would not be narrower than its parent.

    ``index`` and ``tool`` name the offending grant (``None`` when the problem is not one
    grant's, e.g. the chain is too long or the run differs).
    """

    def __init__(self, message: str, *, index: int | None = None, tool: str | None = None) -> None:
        where = f"grants[{index}] ({tool}): " if index is not None else ""
        super().__init__(f"{where}{message}")
        self.message = message
        self.index = index
        self.tool = tool


def constraint_within(child: Constraint, parent: Constraint) -> bool:
    """Whether every value ``child`` admits is admitted by ``parent`` too."""
    if parent.one_of is not None:
        return child.one_of is not None and set(child.one_of) <= set(parent.one_of)
    if child.one_of is not None:
        return False  # a set admits strings; numeric bounds admit numbers only
    if parent.min is not None and (child.min is None or child.min < parent.min):
        return False
    return parent.max is None or (child.max is not None and child.max <= parent.max)


def grant_within(child: Grant, parent: Grant) -> str | None:
    """Why ``child`` allows a call that ``parent`` does not, or ``None`` when it never does.

    A pin of the parent's must be kept as it is. A constraint of the parent's must be kept,
    equal or tighter, except that a pin of a value inside a parent's set satisfies that set.
    """
    if child.tool != parent.tool:
        return f"grants tool '{child.tool}', not '{parent.tool}'"
    for name, value in sorted(parent.pins.items()):
        if child.pins.get(name) != value:
            return f"does not keep the parent's pin {name} = {value}"
    for name, constraint in sorted(parent.constraints.items()):
        pinned = child.pins.get(name)
        if pinned is not None and constraint.one_of is not None and pinned in constraint.one_of:
            continue
        narrower = child.constraints.get(name)
        if narrower is None:
            return f"drops the parent's constraint {constraint.describe(name)}"
        if not constraint_within(narrower, constraint):
            return (
                f"loosens the parent's constraint {constraint.describe(name)} "
                f"to {narrower.describe(name)}"
            )
    return None


def _within_any(child: Grant, parents: Sequence[Grant]) -> str | None:
    candidates = [grant for grant in parents if grant.tool == child.tool]
    if not candidates:
        return f"the parent token does not grant tool '{child.tool}'"
    problems = [grant_within(child, grant) for grant in candidates]
    if any(problem is None for problem in problems):
        return None
    return problems[0]


def attenuate(
    parent: CapabilityClaims,
    key: SigningKey,
    *,
    grants: Sequence[Grant],
    now: int,
    ttl_seconds: int = 0,
    run_id: str | None = None,
    token_id: str | None = None,
) -> str:
    """Mint a child of ``parent`` that allows at most what it allows.

    Args:
        parent: The parent's claims, as :func:`tokens.verify` returned them. Check its
            revocation first: a child of a revoked token is useless, and is denied anyway.
        key: The key to sign the child with (a key the parent's verifiers trust).
        grants: What the child allows; each must be within some grant of the parent.
        now: The current Unix time in whole seconds.
        ttl_seconds: The child's lifetime; 0, or anything beyond the parent's expiry, means
            until the parent expires.
        run_id: Bind the child to a run. A parent bound to a run binds its children to the
            same run.
        token_id: The child's ``jti``; random by default.

    Warning:
        Pass only verified claims as ``parent``: their grants are the ceiling of the child.

    Returns:
        The child token, with ``parent`` = the parent's ancestors and the parent's id.

    Raises:
        AttenuationError: a grant is not within the parent's (it is named), the run differs
            from the parent's, the chain would exceed ``MAX_PARENT_CHAIN``, or the parent is
            not valid yet or expires at or before ``now``.
        ValueError, TypeError: as for :func:`tokens.issue`, or ``ttl_seconds`` is negative.
    """
    if not isinstance(parent, CapabilityClaims):
        raise TypeError(f"parent must be CapabilityClaims, not {type(parent).__name__}")
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds < 0:
        raise ValueError(f"ttl_seconds must be a non-negative int, got {ttl_seconds!r}")
    if not grants:
        raise ValueError("grants must not be empty")
    for index, grant in enumerate(grants):
        if not isinstance(grant, Grant):
            raise TypeError(f"grants must hold Grant objects, not {type(grant).__name__}")
        problem = _within_any(grant, parent.grants)
        if problem is not None:
            raise AttenuationError(problem, index=index, tool=grant.tool)
    if parent.run_id is not None and run_id is not None and run_id != parent.run_id:
        raise AttenuationError(f"the parent token is bound to run '{parent.run_id}'")
    if parent.not_before > now:
        raise AttenuationError("the parent token is not valid yet")
    lineage = parent.lineage
    if len(lineage) > MAX_PARENT_CHAIN:
        raise AttenuationError(
            f"the parent is already attenuated {len(parent.parents)} times; at most "
            f"{MAX_PARENT_CHAIN} ancestors are allowed"
        )
    expires_at = parent.expires_at if not ttl_seconds else min(now + ttl_seconds, parent.expires_at)
    if expires_at <= now:
        raise AttenuationError("the parent token expires before the child could be used")
    return issue(
        key,
        issuer=parent.issuer,
        subject=parent.subject,
        audience=parent.audience,
        grants=grants,
        ttl_seconds=expires_at - now,
        now=now,
        run_id=parent.run_id if parent.run_id is not None else run_id,
        token_id=token_id,
        parents=lineage,
    )
