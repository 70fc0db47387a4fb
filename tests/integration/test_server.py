"""The sidecar around Check: audit, metrics, health, reflection, token issuance, fail-closed."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from sidecar._proto.proviso.v1 import admin_service_pb2 as admin_pb
from sidecar._proto.proviso.v1 import admin_service_pb2_grpc as admin_grpc
from sidecar._proto.proviso.v1 import authorization_service_pb2 as pb
from sidecar._proto.proviso.v1 import token_service_pb2 as token_pb
from sidecar.app import App
from sidecar.web.http import _QuietHandler
from tests.conftest import BILLING_AGENT, TRIAGE_AGENT, Sidecar, make_settings
from tests.integration.test_check import check, refund
from tokens import VerificationKeys, verify


def scrape(sidecar: Sidecar) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed with prometheus-client's own parser."""
    with urllib.request.urlopen(sidecar.metrics_url, timeout=5) as response:  # noqa: S310
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def identity(sidecar: Sidecar, subject: str) -> tuple[tuple[str, str], ...]:
    """Metadata carrying a dev-IdP identity token for ``subject``."""
    idp = sidecar.app.dev_idp
    assert idp is not None
    groups = sidecar.app.policy.current.dev_directory[subject].groups
    return (("authorization", f"Bearer {idp.mint(subject, groups, time.time())}"),)


async def test_each_decision_is_one_audit_line(sidecar: Sidecar) -> None:
    """Every Check appends exactly one durable JSON line carrying its decision id."""
    responses = [
        await check(sidecar, sidecar.token(), "requestRefund", refund(amount))
        for amount in ("10", "120", "9000")
    ]
    lines = sidecar.app.settings.audit_path.read_text().splitlines()
    every = [json.loads(line) for line in lines]
    records = [r for r in every if r["kind"] == "decision"]
    assert [r["record_id"] for r in records] == [r.decision_id for r in responses]
    events = [(r["kind"], r["event"], r["approval_id"]) for r in every if r["kind"] != "decision"]
    assert events == [("approval", "created", responses[1].approval_id)]
    first = records[0]
    assert first["decision"] == "ALLOW"
    assert first["agent"] == BILLING_AGENT
    assert first["tool"] == "requestRefund"
    assert first["policy_version"] == responses[0].policy_version
    assert first["args_digest"].startswith("sha256:")
    assert first["arguments"]["amount"] == 10
    assert first["token_id"]
    assert first["run_id"] == "run-1"
    assert [r["decision"] for r in records] == ["ALLOW", "NEEDS_APPROVAL", "DENY"]
    assert records[1]["approval_requirement"]["approvals_required"] == 1


async def test_metrics_parse_and_move(sidecar: Sidecar) -> None:
    """/metrics parses with prometheus-client, and the decision counters move."""
    await check(sidecar, sidecar.token(), "requestRefund", refund("10"))
    await check(sidecar, sidecar.token(), "requestRefund", refund("10"))
    await check(sidecar, sidecar.token(), "noSuchTool", "{}")
    samples = scrape(sidecar)
    allow = (("decision", "ALLOW"), ("reason", "TIER_ALLOWED"), ("tool", "requestRefund"))
    assert samples[("proviso_decisions_total", allow)] == 2
    unknown = (("decision", "DENY"), ("reason", "OUT_OF_SCOPE"), ("tool", "unknown"))
    assert samples[("proviso_decisions_total", unknown)] == 1
    assert samples[("proviso_check_duration_seconds_count", ())] == 3
    version = sidecar.app.policy.current.version
    label = sidecar.app.policy.current.label
    assert samples[("proviso_policy_info", (("label", label), ("version", version)))] == 1


async def test_health_reports_serving(sidecar: Sidecar) -> None:
    """The standard health service answers SERVING, overall and per service."""
    stub = health_pb2_grpc.HealthStub(sidecar.channel)
    for service in ("", "proviso.v1.AuthorizationService", "proviso.v1.TokenService"):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(sidecar: Sidecar) -> None:
    """Server reflection lists our services, so grpcurl works without proto files."""
    stub = reflection_pb2_grpc.ServerReflectionStub(sidecar.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names = set()
    async for response in stub.ServerReflectionInfo(iter([request])):
        names |= {s.name for s in response.list_services_response.service}
    assert {"proviso.v1.AuthorizationService", "proviso.v1.TokenService"} <= names


async def test_issue_token_for_an_issuer(sidecar: Sidecar) -> None:
    """The orchestrator gets a token that verifies against the published JWKS and is usable."""
    request = token_pb.IssueTokenRequest(
        agent=BILLING_AGENT,
        grants=[token_pb.Grant(tool="requestRefund", pins={"invoice_id": "in_93K2"})],
        ttl=Duration(seconds=3600),
        run_id="run-1",
    )
    response = await sidecar.tokens.IssueToken(
        request, metadata=identity(sidecar, "orchestrator@service")
    )
    jwks = json.loads((await sidecar.tokens.GetJwks(token_pb.GetJwksRequest())).jwks_json)
    claims = verify(
        response.token,
        VerificationKeys.from_jwks(jwks),
        audience="proviso",
        issuer="proviso",
        now=time.time(),
    )
    assert claims.subject == BILLING_AGENT
    assert claims.expires_at - claims.issued_at == 15 * 60, "TTL is capped at the role's 15m"
    assert response.token_id == claims.token_id
    decision = await check(sidecar, response.token, "requestRefund", refund("10"))
    assert decision.decision == pb.DECISION_ALLOW
    samples = scrape(sidecar)
    assert samples[("proviso_tokens_issued_total", (("agent", BILLING_AGENT),))] == 1


async def test_issue_token_without_credentials_is_unauthenticated(sidecar: Sidecar) -> None:
    """Minting needs an issuer identity."""
    request = token_pb.IssueTokenRequest(
        agent=BILLING_AGENT, grants=[token_pb.Grant(tool="getInvoice")]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sidecar.tokens.IssueToken(request)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_issue_token_by_a_non_issuer_is_denied(sidecar: Sidecar) -> None:
    """A person who is not an issuer cannot mint tokens."""
    request = token_pb.IssueTokenRequest(
        agent=BILLING_AGENT, grants=[token_pb.Grant(tool="getInvoice")]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sidecar.tokens.IssueToken(request, metadata=identity(sidecar, "alice@example.com"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_issue_token_beyond_the_role_names_the_grant(sidecar: Sidecar) -> None:
    """A grant outside the agent's roles is refused, naming the grant."""
    request = token_pb.IssueTokenRequest(
        agent=TRIAGE_AGENT,
        grants=[
            token_pb.Grant(tool="tagTicket", pins={"ticket_id": "T-1"}),
            token_pb.Grant(tool="requestRefund", pins={"invoice_id": "in_1"}),
        ],
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sidecar.tokens.IssueToken(request, metadata=identity(sidecar, "orchestrator@service"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "grants[1] (requestRefund)" in (caught.value.details() or "")


async def test_issue_token_without_required_pin_is_refused(sidecar: Sidecar) -> None:
    """A refund grant without its invoice pin is refused."""
    request = token_pb.IssueTokenRequest(
        agent=BILLING_AGENT, grants=[token_pb.Grant(tool="requestRefund")]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sidecar.tokens.IssueToken(request, metadata=identity(sidecar, "orchestrator@service"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "invoice_id" in (caught.value.details() or "")


async def test_a_silent_http_connection_is_closed(
    sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that connects to the metrics listener and sends nothing is cut off after the
    handler's timeout (here made short), instead of holding a server thread for ever; the
    listener goes on answering scrapes."""
    assert 0 < _QuietHandler.timeout <= 30, "silent connections are cut off by default"
    monkeypatch.setattr("sidecar.web.http._QuietHandler.timeout", 0.3)
    with socket.create_connection(("127.0.0.1", sidecar.app.http.port), timeout=5) as silent:
        started = time.monotonic()
        assert silent.recv(1024) == b"", "closed by the server"
        assert time.monotonic() - started < 4
    url = f"http://127.0.0.1:{sidecar.app.http.port}/healthz"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200


async def test_jwks_over_http(sidecar: Sidecar) -> None:
    """The token JWKS is published on the metrics listener."""
    url = f"http://127.0.0.1:{sidecar.app.http.port}/.well-known/jwks.json"
    with urllib.request.urlopen(url, timeout=5) as response:
        jwks = json.loads(response.read())
    assert [k["kid"] for k in jwks["keys"]] == [sidecar.app.keys.active.kid]
    assert "d" not in jwks["keys"][0], "no private key material is published"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
async def test_audit_write_failure_fails_closed(tmp_path: Path) -> None:
    """When the audit log cannot be written, Check answers UNAVAILABLE, never ALLOW."""
    sidecar = Sidecar.connect(
        await App.start(make_settings(tmp_path / "state", audit_log=Path("/dev/full")))
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await check(sidecar, sidecar.token(), "requestRefund", refund("10"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert scrape(sidecar)[("proviso_audit_write_errors_total", ())] == 1
        allowed = ("decision", "ALLOW")
        assert not any(
            name == "proviso_decisions_total" and allowed in labels
            for name, labels in scrape(sidecar)
        )
        # A call that needs approval opens a request in its transaction; unrecorded, the agent
        # never gets its id, so the request is expired rather than left pending (it would fill
        # the agent's pending requests with ones nobody can trace).
        with pytest.raises(grpc.aio.AioRpcError) as unrecorded:
            await check(sidecar, sidecar.token(), "requestRefund", refund("120"))
        assert unrecorded.value.code() == grpc.StatusCode.UNAVAILABLE
        assert sidecar.app.store.pending_by_tier() == {}
    finally:
        await sidecar.close()


@pytest.mark.parametrize("how", ["deleted", "moved away"])
async def test_a_deleted_audit_log_fails_closed(sidecar: Sidecar, how: str) -> None:
    """Records written to an audit file deleted while open are on no disk (the inode goes when
    the server stops), and those written to one moved away (a log rotation of its own) are not
    where the log is read, a restart beginning a new chain: the Check answers UNAVAILABLE,
    never ALLOW, and so do later ones. The health service then says NOT_SERVING and /healthz
    503, so that traffic moves elsewhere, and the app's serve loop ends (serve exits 1)."""
    first = await check(sidecar, sidecar.token(), "requestRefund", refund("10"))
    assert first.decision == pb.DECISION_ALLOW
    audit_path = sidecar.app.settings.audit_path
    if how == "deleted":
        audit_path.unlink()
    else:
        audit_path.rename(audit_path.with_name("rotated.jsonl"))
        audit_path.touch()
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await check(sidecar, sidecar.token(), "requestRefund", refund("10"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert scrape(sidecar)[("proviso_audit_write_errors_total", ())] == 2
    stub = health_pb2_grpc.HealthStub(sidecar.channel)
    deadline = time.monotonic() + 5
    for service in ("", "proviso.v1.AuthorizationService"):
        while True:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            assert time.monotonic() < deadline, f"{service!r} still {response.status}"
            await asyncio.sleep(0.1)
    url = f"http://127.0.0.1:{sidecar.app.http.port}/healthz"
    with pytest.raises(urllib.error.HTTPError) as unhealthy:
        urllib.request.urlopen(url, timeout=5)
    assert unhealthy.value.code == 503
    assert b"deleted or moved while open" in unhealthy.value.read()
    stop = asyncio.Event()
    assert "deleted or moved" in await asyncio.wait_for(sidecar.app.serve_until(stop), 5)


async def test_get_policy_needs_an_admin(sidecar: Sidecar) -> None:
    """GetPolicy describes the policy in force, for admins only."""
    stub = admin_grpc.AdminServiceStub(sidecar.channel)
    response = await stub.GetPolicy(
        admin_pb.GetPolicyRequest(), metadata=identity(sidecar, "olivia@example.com")
    )
    policy = sidecar.app.policy.current
    assert response.policy.version == policy.version
    assert response.policy.label == policy.label
    assert "requestRefund" in response.policy.tools
    assert "billing.yaml" in response.policy.source_files
    assert abs(response.policy.load_time.seconds - time.time()) < 60
    with pytest.raises(grpc.aio.AioRpcError) as not_admin:
        await stub.GetPolicy(
            admin_pb.GetPolicyRequest(), metadata=identity(sidecar, "alice@example.com")
        )
    assert not_admin.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await stub.GetPolicy(admin_pb.GetPolicyRequest())
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
