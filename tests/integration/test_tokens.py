"""The token lifecycle over real gRPC: issuers, constraints, attenuation, revocation (also
across a restart), key rotation without a restart, leeway, and failing closed."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from sidecar._proto.proviso.v1 import authorization_service_pb2 as pb
from sidecar._proto.proviso.v1 import token_service_pb2 as token_pb
from sidecar.app import App
from sidecar.keystore import load_or_create, rotate
from tests.conftest import BILLING_AGENT, EXAMPLE_POLICIES, TRIAGE_AGENT, Sidecar, make_settings
from tests.integration.test_check import check, codes, refund
from tests.integration.test_server import identity, scrape
from tests.jwks_server import IDP_ISSUER, es256_key, idp_token, serve_jwks
from tokens import Grant, VerificationKeys, issue, verify

ORCHESTRATOR = "orchestrator@service"
ADMIN = "olivia@example.com"
TRIAGE_ISSUER = "triage-orchestrator@service"
REFUND_LIMITED = token_pb.Grant(
    tool="requestRefund",
    pins={"invoice_id": "in_93K2"},
    constraints={
        "amount": token_pb.Constraint(max="50"),
        "currency": token_pb.Constraint(one_of=["USD", "EUR"]),
    },
)
INVOICE = token_pb.Grant(tool="getInvoice", pins={"invoice_id": "in_93K2"})

StartSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[StartSidecar]:
    """Start sidecars on a state dir of the test (several in turn: restarts); all stopped."""
    started: list[Sidecar] = []

    async def make(**overrides: object) -> Sidecar:
        values: dict[str, object] = {"key_refresh_seconds": 0.0, **overrides}
        running = Sidecar.connect(await App.start(make_settings(tmp_path / "state", **values)))
        started.append(running)
        return running

    yield make
    for running in started:
        await running.close()


async def issue_token(
    sidecar: Sidecar, *grants: token_pb.Grant, agent: str = BILLING_AGENT, ttl: int = 600
) -> token_pb.IssueTokenResponse:
    """IssueToken as the dev orchestrator."""
    request = token_pb.IssueTokenRequest(
        agent=agent, grants=list(grants or (REFUND_LIMITED, INVOICE)), ttl=Duration(seconds=ttl)
    )
    return await sidecar.tokens.IssueToken(request, metadata=identity(sidecar, ORCHESTRATOR))


async def attenuate(
    sidecar: Sidecar, parent: str, *grants: token_pb.Grant, ttl: int = 0
) -> token_pb.AttenuateTokenResponse:
    """AttenuateToken, with no identity: the parent token is the credential."""
    request = token_pb.AttenuateTokenRequest(
        parent_token=parent, grants=list(grants), ttl=Duration(seconds=ttl)
    )
    return await sidecar.tokens.AttenuateToken(request)


async def revoke(
    sidecar: Sidecar, token_id: str, subject: str | None = ORCHESTRATOR, reason: str = "leaked"
) -> token_pb.RevokeTokenResponse:
    """RevokeToken as ``subject`` (None: without credentials)."""
    metadata = identity(sidecar, subject) if subject else ()
    request = token_pb.RevokeTokenRequest(token_id=token_id, reason=reason)
    return await sidecar.tokens.RevokeToken(request, metadata=metadata)


async def status_of(call: Awaitable[object]) -> grpc.StatusCode:
    """The status an RPC fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


# ------------------------------------------------------------------ who may mint


async def test_an_issuer_for_other_agents_may_not_mint_for_this_one(
    tmp_path: Path, start: StartSidecar
) -> None:
    """An issuer the policy names only for the triage agent gets PERMISSION_DENIED for billing."""
    bundle = tmp_path / "policies"
    shutil.copytree(EXAMPLE_POLICIES, bundle)
    with (bundle / "issuers.yaml").open("w") as extra:
        extra.write(f"issuers:\n  {TRIAGE_ISSUER}:\n    agents: [{TRIAGE_AGENT}]\n")
    directory = (bundle / "dev-directory.yaml").read_text()
    (bundle / "dev-directory.yaml").write_text(
        directory + f"  {TRIAGE_ISSUER}: {{groups: [issuers]}}\n"
    )
    sidecar = await start(policies=bundle)
    request = token_pb.IssueTokenRequest(agent=BILLING_AGENT, grants=[INVOICE])
    denied = sidecar.tokens.IssueToken(request, metadata=identity(sidecar, TRIAGE_ISSUER))
    assert await status_of(denied) == grpc.StatusCode.PERMISSION_DENIED
    own = token_pb.IssueTokenRequest(
        agent=TRIAGE_AGENT, grants=[token_pb.Grant(tool="tagTicket", pins={"ticket_id": "T-1"})]
    )
    assert (await sidecar.tokens.IssueToken(own, metadata=identity(sidecar, TRIAGE_ISSUER))).token


# ------------------------------------------------------------------ constraints


async def test_an_issued_constraint_holds_at_check(start: StartSidecar) -> None:
    """A token minted with 'amount <= 50' allows 49 and denies 60 OUT_OF_SCOPE, naming it."""
    sidecar = await start()
    token = (await issue_token(sidecar)).token
    assert (await check(sidecar, token, "requestRefund", refund("49"))).decision == (
        pb.DECISION_ALLOW
    )
    over = await check(sidecar, token, "requestRefund", refund("60"))
    assert codes(over) == ["OUT_OF_SCOPE"]
    assert over.reasons[0].field == "/amount"
    assert "amount <= 50" in over.reasons[0].message


async def test_a_malformed_constraint_is_an_invalid_argument(start: StartSidecar) -> None:
    """A bound that is not a plain decimal is refused as INVALID_ARGUMENT naming the field."""
    sidecar = await start()
    bad = token_pb.Grant(
        tool="requestRefund",
        pins={"invoice_id": "in_93K2"},
        constraints={"amount": token_pb.Constraint(max="1e9")},
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await issue_token(sidecar, bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grants[0].constraints[amount]" in (caught.value.details() or "")


# ------------------------------------------------------------------ attenuation


async def test_an_attenuated_child_allows_its_subset_and_nothing_else(start: StartSidecar) -> None:
    """The child (refunds up to 20) is ALLOWed a refund of 10; getInvoice, which only the
    parent had, and 30, which only the parent allowed, are DENY OUT_OF_SCOPE."""
    sidecar = await start()
    parent = await issue_token(sidecar)
    narrower = token_pb.Grant(
        tool="requestRefund",
        pins={"invoice_id": "in_93K2"},
        constraints={
            "amount": token_pb.Constraint(max="20"),
            "currency": token_pb.Constraint(one_of=["USD"]),
        },
    )
    child = await attenuate(sidecar, parent.token, narrower, ttl=120)
    assert list(child.parent_token_ids) == [parent.token_id]
    assert child.expire_time.seconds <= parent.expire_time.seconds
    allowed = await check(sidecar, child.token, "requestRefund", refund("10"))
    assert allowed.decision == pb.DECISION_ALLOW
    only_parent = await check(sidecar, child.token, "getInvoice", '{"invoice_id": "in_93K2"}')
    assert codes(only_parent) == ["OUT_OF_SCOPE"]
    assert "getInvoice" in only_parent.reasons[0].message
    assert codes(await check(sidecar, child.token, "requestRefund", refund("30"))) == [
        "OUT_OF_SCOPE"
    ]
    assert codes(await check(sidecar, parent.token, "requestRefund", refund("30"))) == [
        "TIER_ALLOWED"
    ]


async def test_a_wider_child_is_refused_naming_the_grant(start: StartSidecar) -> None:
    """Asking for a looser bound than the parent's is PERMISSION_DENIED, naming the grant."""
    sidecar = await start()
    parent = await issue_token(sidecar)
    looser = token_pb.Grant(
        tool="requestRefund",
        pins={"invoice_id": "in_93K2"},
        constraints={
            "amount": token_pb.Constraint(max="500"),
            "currency": token_pb.Constraint(one_of=["USD"]),
        },
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await attenuate(sidecar, parent.token, INVOICE, looser)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "grants[1] (requestRefund)" in (caught.value.details() or "")
    assert "amount <= 50" in (caught.value.details() or "")


async def test_a_bad_or_revoked_parent_is_unauthenticated(start: StartSidecar) -> None:
    """A parent that does not verify, or is revoked, is no credential: UNAUTHENTICATED."""
    sidecar = await start()
    garbage = attenuate(sidecar, "not.a.token", INVOICE)
    assert await status_of(garbage) == grpc.StatusCode.UNAUTHENTICATED
    parent = await issue_token(sidecar)
    await revoke(sidecar, parent.token_id)
    revoked = attenuate(sidecar, parent.token, INVOICE)
    assert await status_of(revoked) == grpc.StatusCode.UNAUTHENTICATED
    samples = scrape(sidecar)
    assert samples[("proviso_tokens_rejected_total", (("reason", "TOKEN_MALFORMED"),))] == 1
    assert samples[("proviso_tokens_rejected_total", (("reason", "TOKEN_REVOKED"),))] == 1


# ------------------------------------------------------------------ revocation


async def test_revoking_a_parent_denies_its_child_also_after_a_restart(
    start: StartSidecar,
) -> None:
    """Once the parent is revoked, the child is DENY TOKEN_REVOKED, and still after restart."""
    first = await start()
    parent = await issue_token(first)
    child = await attenuate(first, parent.token, INVOICE)
    invoice = '{"invoice_id": "in_93K2"}'
    assert (await check(first, child.token, "getInvoice", invoice)).decision == pb.DECISION_ALLOW
    revoked = await revoke(first, parent.token_id, reason="orchestrator run aborted")
    assert revoked.created
    assert revoked.revocation.revoked_by == ORCHESTRATOR
    assert revoked.revocation.expire_time.seconds >= parent.expire_time.seconds
    denied = await check(first, child.token, "getInvoice", invoice)
    assert codes(denied) == ["TOKEN_REVOKED"]
    assert "orchestrator run aborted" in denied.reasons[0].message
    assert codes(await check(first, parent.token, "getInvoice", invoice)) == ["TOKEN_REVOKED"]
    assert scrape(first)[("proviso_tokens_revoked_total", ())] == 1
    await first.close()

    second = await start()
    assert codes(await check(second, child.token, "getInvoice", invoice)) == ["TOKEN_REVOKED"]
    again = await revoke(second, parent.token_id, reason="twice")
    assert not again.created
    assert again.revocation.reason == "orchestrator run aborted", "the first revocation stands"


async def test_revocation_drops_the_cached_verification(start: StartSidecar) -> None:
    """A token verified (and cached) by a Check leaves the cache when it is revoked."""
    sidecar = await start()
    token = await issue_token(sidecar)
    await check(sidecar, token.token, "getInvoice", '{"invoice_id": "in_93K2"}')
    assert len(sidecar.app.tokens) == 1
    await revoke(sidecar, token.token_id)
    assert len(sidecar.app.tokens) == 0


async def test_who_may_revoke(start: StartSidecar) -> None:
    """Issuers of the token's agent and admins may revoke; others may not; anonymous never."""
    sidecar = await start()
    token = await issue_token(sidecar)
    assert await status_of(revoke(sidecar, token.token_id, None)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert await status_of(revoke(sidecar, token.token_id, "alice@example.com")) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert await status_of(revoke(sidecar, "never-minted", ORCHESTRATOR)) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert await status_of(revoke(sidecar, token.token_id, reason=" ")) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    by_admin = await revoke(sidecar, "never-minted", ADMIN)
    assert by_admin.created, "an admin may revoke any id (e.g. one seen in the audit log)"
    assert (await revoke(sidecar, token.token_id, ADMIN)).revocation.revoked_by == ADMIN


async def test_an_unreadable_revocation_store_fails_closed(start: StartSidecar) -> None:
    """If revocations cannot be read, Check answers UNAVAILABLE, never ALLOW."""
    sidecar = await start()
    token = (await issue_token(sidecar)).token
    saboteur = sqlite3.connect(sidecar.app.settings.state_dir / "state.db", isolation_level=None)
    saboteur.execute("DROP TABLE revocations")
    saboteur.close()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check(sidecar, token, "getInvoice", '{"invoice_id": "in_93K2"}')
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------ keys


async def test_rotation_keeps_old_tokens_and_signs_new_ones_with_the_new_kid(
    start: StartSidecar,
) -> None:
    """After `keys rotate` on the state dir of a running server: old tokens still verify, new
    ones carry the new kid, and both keys are published; no restart."""
    sidecar = await start()
    old = await issue_token(sidecar)
    state_dir = sidecar.app.settings.state_dir
    ring, _ = rotate(state_dir, time.time(), retention_seconds=930)
    assert ring.active.kid != old.key_id
    new = await issue_token(sidecar)
    assert new.key_id == ring.active.kid
    invoice = '{"invoice_id": "in_93K2"}'
    for token in (old.token, new.token):
        assert (await check(sidecar, token, "getInvoice", invoice)).decision == pb.DECISION_ALLOW
    jwks = json.loads((await sidecar.tokens.GetJwks(token_pb.GetJwksRequest())).jwks_json)
    assert sorted(k["kid"] for k in jwks["keys"]) == sorted([old.key_id, new.key_id])
    keys = VerificationKeys.from_jwks(jwks)
    assert verify(old.token, keys, audience="proviso", issuer="proviso", now=time.time())
    url = f"http://127.0.0.1:{sidecar.app.http.port}/.well-known/jwks.json"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert json.loads(response.read()) == jwks, "HTTP publishes the same keys as GetJwks"


async def test_a_token_from_a_key_rotated_elsewhere_is_accepted(start: StartSidecar) -> None:
    """A token signed by a key another process just rotated in (unknown kid) makes the server
    re-read its keys and accept it."""
    sidecar = await start()
    state_dir = sidecar.app.settings.state_dir
    rotate(state_dir, time.time(), retention_seconds=930)
    elsewhere = load_or_create(state_dir).active
    token = issue(
        elsewhere, issuer="proviso", subject=BILLING_AGENT, audience="proviso",
        grants=[Grant("getInvoice", {"invoice_id": "in_93K2"})], ttl_seconds=60,
        now=int(time.time()),
    )  # fmt: skip
    response = await check(sidecar, token, "getInvoice", '{"invoice_id": "in_93K2"}')
    assert response.decision == pb.DECISION_ALLOW


async def test_a_retired_key_stops_verifying_once_its_tokens_have_expired(
    start: StartSidecar,
) -> None:
    """A key retired longer ago than the longest token life is no longer trusted."""
    sidecar = await start()
    old = await issue_token(sidecar)
    state_dir = sidecar.app.settings.state_dir
    long_ago = time.time() - 2 * 3600  # the example's longest role TTL is 30 minutes
    rotate(state_dir, long_ago, retention_seconds=930)
    response = await check(sidecar, old.token, "getInvoice", '{"invoice_id": "in_93K2"}')
    assert codes(response) == ["TOKEN_UNKNOWN_KEY"]


async def test_a_missing_key_directory_keeps_the_last_good_ring(start: StartSidecar) -> None:
    """A keys directory that vanishes under a running server (a restore, a bad deploy) is a
    broken one, not a fresh start: tokens keep verifying and no new key is made, which would
    disown every token issued so far and sign checkpoints with a key no backup holds."""
    sidecar = await start()
    issued = await issue_token(sidecar)
    state_dir = sidecar.app.settings.state_dir
    invoice = '{"invoice_id": "in_93K2"}'
    assert (await check(sidecar, issued.token, "getInvoice", invoice)).decision == (
        pb.DECISION_ALLOW
    )
    shutil.move(state_dir / "keys", state_dir / "keys.away")
    response = await check(sidecar, issued.token, "getInvoice", invoice)
    assert response.decision == pb.DECISION_ALLOW, codes(response)
    assert (await issue_token(sidecar)).key_id == issued.key_id
    assert not (state_dir / "keys").exists(), "no key ring was made in its place"
    (state_dir / "keys").write_text("not a directory")
    response = await check(sidecar, issued.token, "getInvoice", invoice)
    assert response.decision == pb.DECISION_ALLOW, codes(response)
    (state_dir / "keys").unlink()
    shutil.move(state_dir / "keys.away", state_dir / "keys")
    response = await check(sidecar, issued.token, "getInvoice", invoice)
    assert response.decision == pb.DECISION_ALLOW, codes(response)


# ------------------------------------------------------------------ leeway


@pytest.mark.parametrize(("leeway", "expected"), [(5, "TOKEN_EXPIRED"), (20, "TIER_ALLOWED")])
async def test_the_leeway_is_configurable(start: StartSidecar, leeway: int, expected: str) -> None:
    """A token expired 10 s ago is refused with the default 5 s leeway and accepted with 20 s."""
    sidecar = await start(leeway_seconds=leeway)
    token = sidecar.token(now=time.time() - 70, ttl=60)
    assert codes(await check(sidecar, token, "requestRefund", refund("10"))) == [expected]


# ------------------------------------------------------------------ a real IdP's JWKS


async def test_an_issuer_authenticated_by_an_https_idp_jwks_mints(
    tmp_path: Path, start: StartSidecar
) -> None:
    """With --idp-jwks https://... and its CA, an ES256 token from that IdP authenticates the
    orchestrator (no dev mode), and a token from another key is UNAUTHENTICATED."""
    key, jwk = es256_key("idp-1")
    stranger, _ = es256_key("idp-1")
    with serve_jwks(tmp_path, {"keys": [jwk]}) as idp:
        sidecar = await start(idp_jwks_url=idp.url, idp_ca_file=idp.ca_file, idp_issuer=IDP_ISSUER)
        assert sidecar.app.dev_idp is None
        request = token_pb.IssueTokenRequest(agent=BILLING_AGENT, grants=[INVOICE])
        bearer = (("authorization", f"Bearer {idp_token(key, 'idp-1')}"),)
        assert (await sidecar.tokens.IssueToken(request, metadata=bearer)).token
        forged = (("authorization", f"Bearer {idp_token(stranger, 'idp-1')}"),)
        denied = sidecar.tokens.IssueToken(request, metadata=forged)
        assert await status_of(denied) == grpc.StatusCode.UNAUTHENTICATED
        assert idp.requests == ["/jwks.json"], "fetched at start, then cached"


@pytest.mark.parametrize(("field", "value"), [("agent", "billing agent"), ("run_id", "run 1")])
async def test_issue_token_refuses_malformed_identifiers(
    sidecar: Sidecar, field: str, value: str
) -> None:
    """An agent or run id no Check could ever match is INVALID_ARGUMENT, naming the field."""
    request = token_pb.IssueTokenRequest(
        agent="billing-resolution-agent@service",
        grants=[token_pb.Grant(tool="getInvoice")],
    )
    setattr(request, field, value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sidecar.tokens.IssueToken(request, metadata=identity(sidecar, "orchestrator@service"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")


# ------------------------------------------------------------------ lifetimes


@pytest.mark.parametrize("nanos", [1, 500_000_000, 999_999_999])
async def test_a_sub_second_ttl_is_not_read_as_the_longest(start: StartSidecar, nanos: int) -> None:
    """A TTL under a second asks for the shortest token, so it must not round down to zero,
    which IssueToken reads as the role's ceiling (15 minutes) and AttenuateToken as the
    parent's whole life: it becomes one second."""
    sidecar = await start()
    request = token_pb.IssueTokenRequest(
        agent=BILLING_AGENT, grants=[INVOICE], ttl=Duration(seconds=0, nanos=nanos)
    )
    now = int(time.time())
    minted = await sidecar.tokens.IssueToken(request, metadata=identity(sidecar, ORCHESTRATOR))
    assert minted.expire_time.seconds <= now + 2
    parent = await issue_token(sidecar, ttl=600)
    child = await sidecar.tokens.AttenuateToken(
        token_pb.AttenuateTokenRequest(
            parent_token=parent.token, grants=[INVOICE], ttl=Duration(seconds=0, nanos=nanos)
        )
    )
    assert child.expire_time.seconds <= now + 2
    assert child.expire_time.seconds < parent.expire_time.seconds


# ------------------------------------------------------------------ size


async def test_grants_too_large_for_a_token_are_an_invalid_argument(start: StartSidecar) -> None:
    """Grants that would make a token over MAX_TOKEN_BYTES are the caller's mistake:
    INVALID_ARGUMENT naming 'grants' (not INTERNAL), for a root token and for a child."""
    sidecar = await start()
    many = [
        token_pb.Grant(tool="getInvoice", pins={"invoice_id": f"in_{i:05d}"}) for i in range(300)
    ]
    request = token_pb.IssueTokenRequest(agent=BILLING_AGENT, grants=many)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sidecar.tokens.IssueToken(request, metadata=identity(sidecar, ORCHESTRATOR))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grants" in (caught.value.details() or "")
    assert "MAX_TOKEN_BYTES" in (caught.value.details() or "")
    parent = await issue_token(sidecar)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await attenuate(sidecar, parent.token, *[INVOICE] * 300)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "MAX_TOKEN_BYTES" in (caught.value.details() or "")
