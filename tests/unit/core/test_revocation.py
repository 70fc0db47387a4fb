"""Who may revoke a token, and how long the revocation is kept."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from sidecar.identity import Identity
from sidecar.policy.model import Policy
from sidecar.revocation import UNKNOWN_TOKEN_RETENTION_SECONDS, revoke
from sidecar.state import IssuedToken
from sidecar.state.sqlite import SQLiteStore
from tests.conftest import BILLING_AGENT

ORCHESTRATOR = Identity("orchestrator@service", ("issuers",), "idp")
ADMIN = Identity("olivia@example.com", ("admins",), "idp")
NOBODY = Identity("alice@example.com", ("billing-supervisors",), "idp")
NOW = 10_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    """A store holding one token minted for the billing agent, expiring at 10 900."""
    opened = SQLiteStore(tmp_path / "state.db")
    opened.record_issued(IssuedToken("t1", BILLING_AGENT, "orchestrator@service", 10_900.0))
    yield opened
    opened.close()


def test_an_issuer_of_the_agent_revokes_until_the_token_expires(
    store: SQLiteStore, example_policy: Policy
) -> None:
    """The issuer's revocation is kept until the token's exp plus the largest leeway."""
    revocation, created = revoke(
        store, example_policy, ORCHESTRATOR, token_id="t1", reason=" leaked ", now=NOW
    )
    assert created
    assert (revocation.reason, revocation.revoked_by) == ("leaked", "orchestrator@service")
    assert revocation.expires_at == 10_900.0 + 30


def test_an_admin_may_revoke_an_id_never_minted_here(
    store: SQLiteStore, example_policy: Policy
) -> None:
    """An unknown id is kept for the conservative retention, since its expiry is unknown."""
    revocation, _ = revoke(store, example_policy, ADMIN, token_id="seen-in-audit", reason="x",
                           now=NOW)  # fmt: skip
    assert revocation.expires_at == NOW + UNKNOWN_TOKEN_RETENTION_SECONDS


def test_others_may_not_revoke(store: SQLiteStore, example_policy: Policy) -> None:
    """A non-issuer is refused; an issuer naming an unknown id is told it is not found."""
    with pytest.raises(PermissionDeniedError):
        revoke(store, example_policy, NOBODY, token_id="t1", reason="x", now=NOW)
    with pytest.raises(NotFoundError):
        revoke(store, example_policy, ORCHESTRATOR, token_id="nope", reason="x", now=NOW)
    with pytest.raises(InvalidRequestError):
        revoke(store, example_policy, ADMIN, token_id="t1", reason="x" * 1025, now=NOW)
