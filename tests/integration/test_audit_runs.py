"""What the audit log is for: redaction, run traces, replay against another policy, tracing."""

from __future__ import annotations

import base64
import json
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar import config, strictjson
from sidecar._proto.proviso.v1 import admin_service_pb2 as admin_pb
from sidecar._proto.proviso.v1 import admin_service_pb2_grpc as admin_grpc
from sidecar._proto.proviso.v1 import approval_service_pb2 as ap_pb
from sidecar._proto.proviso.v1 import authorization_service_pb2 as pb
from sidecar._proto.proviso.v1 import token_service_pb2 as token_pb
from sidecar.app import App
from sidecar.audit import replay
from sidecar.audit.files import log_files, records, verify_log
from sidecar.audit.redaction import KEY_FILE
from sidecar.clock import FixedClock
from sidecar.observability import tracing
from sidecar.policy.loader import load_policy
from tests.conftest import EXAMPLE_POLICIES, ROOT, TRIAGE_AGENT, Sidecar, make_settings
from tests.integration.test_approvals import ALICE, approve, refund_check, stub
from tests.integration.test_check import INVOICE_CONTEXT, refund
from tests.integration.test_server import identity
from tokens import Constraint, Grant

NOTE_GRANT = Grant("addInternalNote", MappingProxyType({"ticket_id": "T-1"}))
CARD_NOTE = '{"ticket_id": "T-1", "body": "customer read out 4111111111111111"}'


async def ask(
    sidecar: Sidecar, token: str, tool: str, arguments: str, run_id: str, **extra: object
) -> pb.CheckResponse:
    """One Check; ``extra`` sets further CheckRequest fields."""
    fields: dict[str, object] = {
        "context_json": INVOICE_CONTEXT,
        "idempotency_key": f"k-{uuid.uuid4().hex}",
        **extra,
    }
    request = pb.CheckRequest(
        token=token,
        tool=tool,
        arguments_json=arguments,
        run_id=run_id,
        **fields,  # type: ignore[arg-type]
    )
    return await sidecar.authz.Check(request)


def logged(sidecar: Sidecar) -> list[dict[str, object]]:
    return [
        r for r in records(log_files(sidecar.app.settings.audit_path)) if r["kind"] == "decision"
    ]


def proviso(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def replay_failing_on_change(sidecar: Sidecar, candidate: Path) -> dict[str, Any]:
    """``proviso replay --fail-on-change --format json`` of the sidecar's log against
    ``candidate``, which must change something (exit 1): its report."""
    cli = proviso(
        "replay", "--audit", str(sidecar.app.settings.audit_path), "--policies", str(candidate),
        "--format", "json", "--fail-on-change",
    )  # fmt: skip
    assert cli.returncode == 1, cli.stderr
    report: dict[str, Any] = json.loads(cli.stdout)
    return report


async def test_redacted_arguments_keep_a_keyed_hash_and_the_digest(sidecar: Sidecar) -> None:
    """A redacted argument is stored as an HMAC (equal values match), never as its value."""
    token = sidecar.token(TRIAGE_AGENT, (NOTE_GRANT,))
    first = await ask(sidecar, token, "addInternalNote", CARD_NOTE, "run-r")
    await ask(sidecar, token, "addInternalNote", CARD_NOTE, "run-r")
    await ask(sidecar, token, "addInternalNote", '{"ticket_id": "T-1", "body": "hello"}', "run-r")
    assert first.decision == pb.DECISION_DENY, "the card number is still denied"
    text = sidecar.app.settings.audit_path.read_text()
    assert "4111111111111111" not in text
    one, two, three = logged(sidecar)
    assert one["redacted"] == ["body"]
    assert one["arguments"]["ticket_id"] == "T-1"  # type: ignore[index]
    assert set(one["arguments"]["body"]) == {"hmac-sha256"}  # type: ignore[index]
    assert one["arguments"] == two["arguments"] != three["arguments"]
    assert one["args_digest"] == strictjson.digest(json.loads(CARD_NOTE))
    key = sidecar.app.settings.state_dir / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


async def test_get_run_trace_tells_what_happened_to_the_runs_approvals(sidecar: Sidecar) -> None:
    """The RPC carries the approval events and the chain names that `audit trace` shows."""
    token = sidecar.token()
    asked = await refund_check(sidecar, token, "120")
    await approve(sidecar, asked.approval_id, ALICE, "looks right")
    allowed = await refund_check(sidecar, token, "120", asked.approval_id)
    assert allowed.decision == pb.DECISION_ALLOW
    trace = (
        await admin_grpc.AdminServiceStub(sidecar.channel).GetRunTrace(
            admin_pb.GetRunTraceRequest(run_id="run-1"),
            metadata=identity(sidecar, "olivia@example.com"),
        )
    ).trace
    chain = sidecar.app.settings.audit_path.stem
    assert list(trace.chains) == [chain]
    assert [s.chain for s in trace.steps] == [chain, chain]
    agent = "billing-resolution-agent@service"
    assert [(e.approval_id, e.event, e.actor) for e in trace.approval_events] == [
        (asked.approval_id, "created", agent),
        (asked.approval_id, "approve", ALICE),
        (asked.approval_id, "approved", ALICE),
        (asked.approval_id, "consumed", agent),
    ]
    verdict = trace.approval_events[1]
    assert (verdict.comment, verdict.tool, verdict.tier) == (
        "looks right",
        "requestRefund",
        "supervisor",
    )
    assert verdict.chain == chain
    assert verdict.record_id
    assert verdict.seq > trace.steps[0].seq
    assert verdict.time.ToDatetime() >= trace.steps[0].time.ToDatetime()
    assert all(e.args_digest == trace.steps[0].args_digest for e in trace.approval_events)


async def test_records_carry_the_inputs_replay_needs(sidecar: Sidecar) -> None:
    """A decision record keeps the context and the verified token's claims."""
    token = sidecar.token(run_id="run-c")
    await ask(sidecar, token, "requestRefund", refund("10"), "run-c", context_json='{"due": 12.50}')
    (record,) = logged(sidecar)
    assert record["context"] == {"due": 12.5}
    claims = record["token"]
    assert isinstance(claims, dict)
    assert claims["subject"] == "billing-resolution-agent@service"
    assert claims["run_id"] == "run-c"
    assert claims["grants"] == [{"tool": "requestRefund", "pins": {"invoice_id": "in_93K2"}}]
    assert claims["kid"] == sidecar.app.keys.active.kid


async def test_get_run_trace_rebuilds_a_run_for_admins(sidecar: Sidecar) -> None:
    """GetRunTrace lists the run's Checks in order, with decisions, tiers, reasons and tokens."""
    token = sidecar.token()
    sent = [
        await ask(sidecar, token, "requestRefund", refund(a), "run-t", step_id=f"s{i}",
                  run_metadata={"model": "m-1"})
        for i, a in enumerate(("10", "120", "9000"))
    ]  # fmt: skip
    retried = await ask(
        sidecar, token, "requestRefund", refund("11"), "run-t", step_id="s3",
        idempotency_key="k-retried",
    )  # fmt: skip
    retry = await ask(
        sidecar, token, "requestRefund", refund("11"), "run-t", step_id="s3",
        idempotency_key="k-retried",
    )  # fmt: skip
    assert retry.replayed
    await ask(sidecar, token, "requestRefund", refund("10"), "run-other")
    stub = admin_grpc.AdminServiceStub(sidecar.channel)
    admin = identity(sidecar, "olivia@example.com")
    trace = (
        await stub.GetRunTrace(admin_pb.GetRunTraceRequest(run_id="run-t"), metadata=admin)
    ).trace
    *steps, replayed = trace.steps
    assert replayed.replay_of == retried.decision_id != replayed.decision_id
    assert [s.replay_of for s in steps] == ["", "", "", ""]
    del trace.steps[3:]  # the rest is about the first three Checks
    assert trace.run_id == "run-t"
    assert list(trace.agents) == ["billing-resolution-agent@service"]
    assert list(trace.policy_versions) == [sidecar.app.policy.current.version]
    assert dict(trace.run_metadata) == {"model": "m-1"}
    assert [s.decision_id for s in trace.steps] == [r.decision_id for r in sent]
    assert [s.step_id for s in trace.steps] == ["s0", "s1", "s2"]
    assert [s.decision for s in trace.steps] == [
        pb.DECISION_ALLOW, pb.DECISION_NEEDS_APPROVAL, pb.DECISION_DENY,
    ]  # fmt: skip
    assert [s.matched_tier for s in trace.steps] == ["auto", "supervisor", "over-limit"]
    assert trace.steps[1].approval_requirement.approver_roles == ["billing-supervisor"]
    assert trace.steps[2].reasons[0].code == pb.REASON_CODE_TIER_DENIED
    assert all(s.token_id for s in trace.steps)
    assert trace.steps[0].seq < trace.steps[1].seq < trace.steps[2].seq
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetRunTrace(admin_pb.GetRunTraceRequest(run_id="no-such-run"), metadata=admin)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as not_admin:
        await stub.GetRunTrace(
            admin_pb.GetRunTraceRequest(run_id="run-t"),
            metadata=identity(sidecar, "alice@example.com"),
        )
    assert not_admin.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await stub.GetRunTrace(admin_pb.GetRunTraceRequest(), metadata=admin)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cli_trace_prints_the_run(sidecar: Sidecar) -> None:
    """`proviso audit trace RUN_ID` prints the envelope and steps, as a table or as JSON."""
    token = sidecar.token()
    await ask(sidecar, token, "requestRefund", refund("120"), "run-cli")
    audit = str(sidecar.app.settings.audit_path)
    as_json = proviso("audit", "trace", "run-cli", "--audit", audit, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    trace = json.loads(as_json.stdout)
    assert [s["decision"] for s in trace["steps"]] == ["NEEDS_APPROVAL"]
    assert trace["steps"][0]["approval_requirement"]["approvals_required"] == 1
    table = proviso("audit", "trace", "run-cli", "--audit", audit)
    assert "NEEDS_APPROVAL" in table.stdout
    assert "needs 1 approval(s) from billing-supervisor" in table.stdout
    assert proviso("audit", "trace", "nope", "--audit", audit).returncode == 1


async def test_replay_against_a_lower_threshold_reports_exactly_the_changes(
    sidecar: Sidecar, tmp_path: Path
) -> None:
    """Lowering the auto-refund limit from 50 to 25 turns exactly the 30, 49.99 and 50 refunds."""
    token = sidecar.token()
    amounts = ("10", "30", "49.99", "50", "120", "9000")
    sent = {a: await ask(sidecar, token, "requestRefund", refund(a), "run-p") for a in amounts}
    await ask(sidecar, "", "requestRefund", refund("10"), "run-p")  # no token: DENY
    note = sidecar.token(TRIAGE_AGENT, (NOTE_GRANT,))
    await ask(sidecar, note, "addInternalNote", CARD_NOTE, "run-p")  # redacted
    candidate = shutil.copytree(EXAMPLE_POLICIES, tmp_path / "candidate")
    billing = candidate / "billing.yaml"
    billing.write_text(billing.read_text().replace("args.amount <= 50\n", "args.amount <= 25\n"))
    log = list(records(log_files(sidecar.app.settings.audit_path)))

    same = replay.replay(log, sidecar.app.policy.current)
    assert (same.records, same.replayed, same.changed) == (8, 7, 0), "inputs replay faithfully"

    report = replay.replay(log, load_policy(candidate))
    assert report.changed == 3
    assert report.transitions == {
        ("ALLOW", "ALLOW"): 1,
        ("ALLOW", "NEEDS_APPROVAL"): 3,
        ("NEEDS_APPROVAL", "NEEDS_APPROVAL"): 1,
        ("DENY", "DENY"): 2,
    }
    assert report.unreplayable == {"redacted arguments": 1}
    changed = {sent[a].decision_id for a in ("30", "49.99", "50")}
    assert {change.record_id for change in report.examples} == changed
    assert {change.new.matched_tier for change in report.examples} == {"supervisor"}

    output = replay_failing_on_change(sidecar, candidate)
    assert output["changed"] == 3
    assert output["by_tool"]["requestRefund"] == [
        {"from": "ALLOW", "to": "ALLOW", "count": 1},
        {"from": "ALLOW", "to": "NEEDS_APPROVAL", "count": 3},
        {"from": "DENY", "to": "DENY", "count": 2},
        {"from": "NEEDS_APPROVAL", "to": "NEEDS_APPROVAL", "count": 1},
    ]
    assert {e["decision_id"] for e in output["examples"]} == changed


async def test_replay_reports_a_call_that_would_need_other_approvers(
    sidecar: Sidecar, tmp_path: Path
) -> None:
    """Lowering the supervisor limit from 500 to 100 sends a 120 refund to the finance tier:
    still NEEDS_APPROVAL, but two finance approvers instead of one supervisor. That is a change
    (as the shadow counts it: decision or tier), reported with its tiers, shown as an example
    and failing --fail-on-change; a 60 refund stays with the supervisor and is unchanged."""
    token = sidecar.token()
    moved = await ask(sidecar, token, "requestRefund", refund("120"), "run-t")
    await ask(sidecar, token, "requestRefund", refund("60"), "run-t")
    candidate = shutil.copytree(EXAMPLE_POLICIES, tmp_path / "candidate")
    billing = candidate / "billing.yaml"
    billing.write_text(billing.read_text().replace("args.amount <= 500\n", "args.amount <= 100\n"))
    log = list(records(log_files(sidecar.app.settings.audit_path)))

    report = replay.replay(log, load_policy(candidate))

    assert report.transitions == {("NEEDS_APPROVAL", "NEEDS_APPROVAL"): 2}
    assert report.tier_changes == {("NEEDS_APPROVAL", "supervisor", "finance"): 1}
    assert report.changed == 1
    (example,) = report.examples
    assert (example.record_id, example.old_tier, example.new.matched_tier) == (
        moved.decision_id, "supervisor", "finance",
    )  # fmt: skip
    table = replay.to_table(report)
    assert "1 would change" in table
    assert "NEEDS_APPROVAL: supervisor -> finance" in table

    output = replay_failing_on_change(sidecar, candidate)
    assert output["changed"] == 1
    assert output["tier_changes"] == [
        {"decision": "NEEDS_APPROVAL", "from": "supervisor", "to": "finance", "count": 1}
    ]
    assert [e["decision_id"] for e in output["examples"]] == [moved.decision_id]


async def test_a_restarted_sidecar_continues_the_chain(tmp_path: Path) -> None:
    """Stopping and starting on the same state directory yields one chain that verifies."""
    settings = make_settings(tmp_path / "state")
    for _ in range(2):
        sidecar = Sidecar.connect(await App.start(settings))
        await ask(sidecar, sidecar.token(), "requestRefund", refund("10"), "run-s")
        keys = sidecar.app.keys.verification_keys()
        await sidecar.close()
    result = verify_log(log_files(settings.audit_path), keys)
    assert result.broken is None
    assert (result.state.records, result.state.checkpoints, result.state.unsealed) == (2, 2, 0)


async def test_each_check_is_one_span_with_its_decision(tmp_path: Path) -> None:
    """With tracing on, a Check makes one span carrying run, tool, decision and policy version."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    traces = tracing.Tracing(provider.get_tracer("test"), provider.shutdown)
    sidecar = Sidecar.connect(await App.start(make_settings(tmp_path / "state"), traces=traces))
    try:
        response = await ask(sidecar, sidecar.token(), "requestRefund", refund("120"), "run-o")
    finally:
        await sidecar.close()
    (span,) = exporter.get_finished_spans()
    assert span.name == "proviso.Check"
    assert dict(span.attributes or {}) | {} == {
        "proviso.decision_id": response.decision_id,
        "proviso.run_id": "run-o",
        "proviso.tool": "requestRefund",
        "proviso.agent": "billing-resolution-agent@service",
        "proviso.decision": "NEEDS_APPROVAL",
        "proviso.reason": "APPROVAL_REQUIRED",
        "proviso.matched_tier": "supervisor",
        "proviso.policy_version": response.policy_version,
        "proviso.replayed": False,
    }


def test_tracing_is_off_unless_an_exporter_is_named() -> None:
    """No OTEL_TRACES_EXPORTER (or 'none', or the SDK disabled) means no tracer at all."""
    build = {"policies": None, "listen": None, "metrics_listen": None, "state_dir": None}
    assert config.build(**build, env={}).trace_exporters == ()
    assert config.build(**build, env={"OTEL_TRACES_EXPORTER": "none"}).trace_exporters == ()
    disabled = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}
    assert config.build(**build, env=disabled).trace_exporters == ()
    assert tracing.start(()) is None
    console = config.build(**build, env={"OTEL_TRACES_EXPORTER": "console"})
    assert console.trace_exporters == ("console",)
    started = tracing.start(console.trace_exporters)
    assert started is not None
    started.shutdown()
    with pytest.raises(tracing.TracingConfigError, match="not installed"):
        tracing.start(("no-such-exporter",))


async def test_replay_keeps_revocations_and_constraints_faithful(sidecar: Sidecar) -> None:
    """A revoked token's denial is not re-decided without state, and a grant's constraint
    still bites in replay: the same policy changes nothing."""
    capped = Grant(
        "requestRefund",
        MappingProxyType({"invoice_id": "in_93K2"}),
        MappingProxyType({"amount": Constraint(max="20")}),
    )
    limited = sidecar.token(grants=(capped,))
    over = await ask(sidecar, limited, "requestRefund", refund("30"), "run-c")
    assert over.decision == pb.DECISION_DENY
    revoked = sidecar.token()
    claims = sidecar.app.tokens.verify(revoked, time.time())
    assert claims is not None
    assert not isinstance(claims, Exception)
    await sidecar.tokens.RevokeToken(
        token_pb.RevokeTokenRequest(token_id=claims.token_id, reason="leaked"),
        metadata=identity(sidecar, "olivia@example.com"),
    )
    denied = await ask(sidecar, revoked, "requestRefund", refund("10"), "run-c")
    assert denied.decision == pb.DECISION_DENY
    report = replay.replay(logged(sidecar), sidecar.app.policy.current)
    assert report.changed == 0, report.transitions
    assert sum(report.unreplayable.values()) == 1, "the revoked token's denial depended on state"


async def test_replay_of_refused_tokens_repeats_the_refusals(sidecar: Sidecar) -> None:
    """Checks with an expired, a not yet valid and a foreign token replay (CLI included) as the
    same DENY: a refusal's extra values (expired_at…) are not needed to decide it again."""
    now = time.time()
    refused = {
        "TOKEN_EXPIRED": sidecar.token(now=now - 3600, ttl=60),
        "TOKEN_NOT_YET_VALID": sidecar.token(now=now + 3600),
        "TOKEN_WRONG_AUDIENCE": sidecar.token(audience="elsewhere"),
    }
    for code, token in refused.items():
        response = await ask(sidecar, token, "requestRefund", refund("10"), "run-x")
        assert [pb.ReasonCode.Name(r.code) for r in response.reasons] == [f"REASON_CODE_{code}"]
    report = replay.replay(logged(sidecar), sidecar.app.policy.current)
    assert (report.records, report.replayed, report.changed) == (3, 3, 0)

    cli = proviso(
        "replay", "--audit", str(sidecar.app.settings.audit_path),
        "--policies", str(EXAMPLE_POLICIES), "--format", "json",
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    output = json.loads(cli.stdout)
    assert (output["records"], output["replayed"], output["changed"]) == (3, 3, 0)
    assert output["transitions"] == [{"from": "DENY", "to": "DENY", "count": 3}]


async def test_trace_shows_the_runs_approvals(tmp_path: Path) -> None:
    """`proviso audit trace` lists what happened to the run's approval requests among its
    Checks: created, verdicts, approved/rejected, consumed and expired (table and JSON)."""
    clock = FixedClock(time.time())
    sidecar = Sidecar.connect(await App.start(make_settings(tmp_path / "state"), clock=clock))
    try:
        token = sidecar.token(now=clock.now())
        granted = await refund_check(sidecar, token, "120")
        await approve(sidecar, granted.approval_id, ALICE, "looks right")
        allowed = await refund_check(sidecar, token, "120", granted.approval_id)
        assert allowed.decision == pb.DECISION_ALLOW
        refused = await refund_check(sidecar, token, "130")
        await stub(sidecar).RejectApproval(
            ap_pb.RejectApprovalRequest(approval_id=refused.approval_id, comment="no"),
            metadata=identity(sidecar, ALICE),
        )
        lapsed = await refund_check(sidecar, token, "140")
        await refund_check(sidecar, token, "120", run_id="run-2")  # another run's request
        clock.advance(24 * 3600 + 1)
        token = sidecar.token(now=clock.now())
        await refund_check(sidecar, token, "140", lapsed.approval_id)
    finally:
        await sidecar.close()
    audit = str(sidecar.app.settings.audit_path)

    as_json = proviso("audit", "trace", "run-1", "--audit", audit, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    found = json.loads(as_json.stdout)
    events = [(e["approval_id"], e["event"], e["actor"]) for e in found["approval_events"]]
    agent = "billing-resolution-agent@service"
    if events[-1][2] == "proviso":  # the sweeper (every minute) got there before the Check
        events[-1] = (events[-1][0], events[-1][1], agent)
    assert events == [
        (granted.approval_id, "created", agent),
        (granted.approval_id, "approve", ALICE),
        (granted.approval_id, "approved", ALICE),
        (granted.approval_id, "consumed", agent),
        (refused.approval_id, "created", agent),
        (refused.approval_id, "reject", ALICE),
        (refused.approval_id, "rejected", ALICE),
        (lapsed.approval_id, "created", agent),
        (lapsed.approval_id, "expired", agent),
    ]
    assert found["approval_events"][1]["comment"] == "looks right"
    assert [t["kind"] for t in found["timeline"]] == [
        "decision", "approval", "approval", "approval", "decision", "approval",
        "decision", "approval", "approval", "approval",
        "decision", "approval",
        "decision", "approval",
    ]  # fmt: skip
    assert len(found["steps"]) == 5, "approval events are not Checks"

    table = proviso("audit", "trace", "run-1", "--audit", audit)
    assert table.returncode == 0, table.stderr
    assert "5 checks" in table.stdout
    assert "; 9 approval event(s)" in table.stdout
    assert f'approval {granted.approval_id} approve by {ALICE}: "looks right"' in table.stdout
    assert f"approval {lapsed.approval_id} expired by " in table.stdout


async def test_get_run_trace_pages_a_run_too_large_for_one_message(sidecar: Sidecar) -> None:
    """An agent can make its run's trace large (run metadata: 32 values of 1 KiB a Check): it
    comes in pages under the message limit, every step once, in order, with the merged
    metadata bounded; page_size pages steps and approval events alike."""
    token = sidecar.token()
    checks = 40
    for i in range(checks):
        metadata = {f"k{i}_{j}": "v" * 1000 for j in range(32)}
        await ask(sidecar, token, "noSuchTool", "{}", "run-big", run_metadata=metadata)
    admin = admin_grpc.AdminServiceStub(sidecar.channel)
    olivia = identity(sidecar, "olivia@example.com")

    async def pages(run_id: str, page_size: int = 0) -> list[admin_pb.GetRunTraceResponse]:
        found, token = [], ""
        while True:
            request = admin_pb.GetRunTraceRequest(
                run_id=run_id, page_size=page_size, page_token=token
            )
            found.append(await admin.GetRunTrace(request, metadata=olivia))
            token = found[-1].next_page_token
            if not token:
                return found

    big = await pages("run-big")
    assert len(big) >= 3, "1.3 MB of steps cannot fit in two 512 KiB pages"
    assert all(page.ByteSize() < 1024 * 1024 for page in big)
    seqs = [step.seq for page in big for step in page.trace.steps]
    assert len(seqs) == checks
    assert seqs == sorted(seqs)
    assert {page.trace.run_id for page in big} == {"run-big"}
    assert all(len(page.trace.run_metadata) == 32 for page in big)
    assert set(big[0].trace.run_metadata) == {f"k0_{j}" for j in range(32)}, "the first seen"

    asked = await refund_check(sidecar, token, "120")
    await approve(sidecar, asked.approval_id, ALICE, "ok")
    await refund_check(sidecar, token, "120", asked.approval_id)
    small = await pages("run-1", page_size=1)
    assert [len(page.trace.steps) for page in small] == [1, 1, 0, 0]
    assert [len(page.trace.approval_events) for page in small] == [1, 1, 1, 1]
    whole = (await pages("run-1"))[0].trace
    assert [e.event for page in small for e in page.trace.approval_events] == [
        e.event for e in whole.approval_events
    ]

    huge_token = base64.urlsafe_b64encode(b"9" * 5000 + b".0").decode()  # int() refuses it
    for field, request in (
        ("page_size", admin_pb.GetRunTraceRequest(run_id="run-1", page_size=-1)),
        ("page_token", admin_pb.GetRunTraceRequest(run_id="run-1", page_token="bm9wZQ")),
        ("page_token", admin_pb.GetRunTraceRequest(run_id="run-1", page_token="OTkuMA")),
        ("page_token", admin_pb.GetRunTraceRequest(run_id="run-1", page_token=huge_token)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.GetRunTrace(request, metadata=olivia)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in str(refused.value.details())


async def test_trace_and_replay_warn_when_the_log_does_not_verify(
    sidecar: Sidecar, tmp_path: Path
) -> None:
    """trace and replay read the log as it is; on an edited copy they say on stderr that it
    does not verify (output and exit status as before), and on the real one nothing. With
    --require-verified they refuse it (exit 1, no output), a log without keys, and records no
    signed checkpoint covers yet (a live log's newest): anyone able to write could write
    those."""
    token = sidecar.token()
    await ask(sidecar, token, "requestRefund", refund("120"), "run-w")
    state = str(sidecar.app.settings.state_dir)
    audit = sidecar.app.settings.audit_path
    intact = proviso("audit", "trace", "run-w", "--audit", str(audit), "--state-dir", state)
    assert intact.returncode == 0, intact.stderr
    assert "warning" not in intact.stderr
    live = proviso(
        "audit", "trace", "run-w", "--audit", str(audit), "--state-dir", state,
        "--require-verified",
    )  # fmt: skip
    assert (live.returncode, live.stdout) == (1, ""), "its newest records are not signed yet"
    assert "follow its last signed checkpoint" in live.stderr

    edited = tmp_path / "edited" / audit.name
    edited.parent.mkdir()
    text = audit.read_text()
    assert '"NEEDS_APPROVAL"' in text
    edited.write_text(text.replace('"NEEDS_APPROVAL"', '"ALLOW"', 1))
    for command in (
        ("audit", "trace", "run-w", "--audit", str(edited)),
        ("replay", "--audit", str(edited), "--policies", str(EXAMPLE_POLICIES)),
    ):
        result = proviso(*command, "--state-dir", state)
        assert result.returncode == 0, result.stderr
        assert "warning: the audit log does not verify, BROKEN at" in result.stderr
        assert "HASH_MISMATCH" in result.stderr
        refused = proviso(*command, "--state-dir", state, "--require-verified")
        assert (refused.returncode, refused.stdout) == (1, ""), refused.stderr
        assert "does not verify, BROKEN at" in refused.stderr
        assert "refused (--require-verified)" in refused.stderr
        keyless = proviso(*command, "--state-dir", str(tmp_path / "none"), "--require-verified")
        assert (keyless.returncode, keyless.stdout) == (1, ""), keyless.stderr
        assert "no keys in" in keyless.stderr
    await sidecar.close()  # the stop checkpoint signs every record
    for command in (
        ("audit", "trace", "run-w", "--audit", str(audit)),
        ("replay", "--audit", str(audit), "--policies", str(EXAMPLE_POLICIES)),
    ):
        trusted = proviso(*command, "--state-dir", state, "--require-verified")
        assert trusted.returncode == 0, trusted.stderr
        assert "run-w" in trusted.stdout or "requestRefund" in trusted.stdout


async def test_require_verified_refuses_a_log_missing_a_workers_chain(tmp_path: Path) -> None:
    """Under serve --workers 2 each worker writes a chain, and each signed checkpoint names
    both: with one chain deleted the directory no longer holds the whole log. trace and
    replay warn; with --require-verified they refuse it, as `audit verify` fails it."""
    shared = make_settings(tmp_path / "state", workers=2)
    for index in range(2):
        worker = Sidecar.connect(
            await App.start(shared.for_worker(index, listen_port=0, metrics_port=0))
        )
        try:
            await ask(worker, worker.token(), "requestRefund", refund("10"), "run-m")
        finally:
            await worker.close()
    audit_dir = shared.audit_path.parent
    chains = sorted(audit_dir.glob("*.jsonl"))
    assert len(chains) == 2
    state = str(shared.state_dir)
    trusted = proviso("audit", "trace", "run-m", "--state-dir", state, "--require-verified")
    assert trusted.returncode == 0, trusted.stderr
    chains[1].unlink()
    for command in (
        ("audit", "trace", "run-m"),
        ("replay", "--policies", str(EXAMPLE_POLICIES)),
    ):
        warned = proviso(*command, "--state-dir", state)
        assert warned.returncode == 0, warned.stderr
        assert "INCOMPLETE" in warned.stderr
        refused = proviso(*command, "--state-dir", state, "--require-verified")
        assert (refused.returncode, refused.stdout) == (1, ""), refused.stderr
        assert "is missing" in refused.stderr or "are missing" in refused.stderr


async def test_an_empty_run_id_is_a_usage_error(sidecar: Sidecar) -> None:
    """A Check without a run id belongs to no run: `audit trace ''` (a script's unset
    variable) is refused as GetRunTrace refuses it, not printed as one run made of every
    run-less Check of every agent; `replay --run-id ''` and a negative --examples likewise."""
    await ask(sidecar, sidecar.token(), "requestRefund", refund("10"), "")
    audit = str(sidecar.app.settings.audit_path)
    for command in (
        ("audit", "trace", "", "--audit", audit),
        ("replay", "--audit", audit, "--policies", str(EXAMPLE_POLICIES), "--run-id", ""),
        ("replay", "--audit", audit, "--policies", str(EXAMPLE_POLICIES), "--examples", "-1"),
    ):
        result = proviso(*command)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert result.stdout == ""
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith(("proviso: ", "usage: ")), result.stderr


async def test_replay_counts_tools_no_policy_knows_together(sidecar: Sidecar) -> None:
    """Agents choose tool names: every made-up one is a DENY with its own audit record. Replay
    counts those (denied, and unknown to the candidate) under one '(unknown tools)' row, so
    a flood of names can neither bury the report nor grow it without bound, as the metrics
    count them as 'unknown'. A tool that was allowed keeps its name even if the candidate
    dropped it: that change is the point of the report."""
    token = sidecar.token()
    await ask(sidecar, token, "requestRefund", refund("10"), "run-u")
    for name in ("junk-1", "junk-2", "requestRefundd"):
        denied = await ask(sidecar, token, name, refund("10"), "run-u")
        assert denied.decision == pb.DECISION_DENY
    log = logged(sidecar)
    dropped = {**log[0], "tool": "retiredTool"}  # as if a tool the candidate dropped was allowed

    report = replay.replay([*log, dropped], sidecar.app.policy.current)

    assert report.by_tool == {
        "requestRefund": {("ALLOW", "ALLOW"): 1},
        "(unknown tools)": {("DENY", "DENY"): 3},
        "retiredTool": {("ALLOW", "DENY"): 1},
    }
    assert report.transitions == {("ALLOW", "ALLOW"): 1, ("DENY", "DENY"): 3, ("ALLOW", "DENY"): 1}
    assert "junk" not in replay.to_table(report)
