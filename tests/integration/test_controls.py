"""Operational controls over real gRPC: rules, idempotency, budgets, rate limits, kill switches,
dry runs. Each reason code comes from a realistic call sequence."""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import os
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from types import MappingProxyType

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar._proto.proviso.v1 import admin_service_pb2 as admin_pb
from sidecar._proto.proviso.v1 import admin_service_pb2_grpc as admin_grpc
from sidecar._proto.proviso.v1 import authorization_service_pb2 as pb
from sidecar.app import App
from sidecar.audit.writer import AuditLog
from sidecar.authorizer import CheckInput
from sidecar.server import convert
from tests.conftest import (
    BILLING_AGENT,
    EXAMPLE_POLICIES,
    INCIDENT_AGENT,
    Sidecar,
    make_settings,
)
from tests.integration.test_check import INVOICE_CONTEXT, check, codes, refund
from tests.integration.test_server import identity, scrape
from tokens import Grant


def verify_unchecked(token: str) -> dict[str, object]:
    """A token's claims, read without verifying (the test minted it)."""
    payload = token.split(".")[1]
    claims: dict[str, object] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


ADMIN = "olivia@example.com"
TOOL_SCOPE = admin_pb.KILL_SWITCH_SCOPE_TOOL


def audit_lines(sidecar: Sidecar) -> list[dict[str, object]]:
    text = sidecar.app.settings.audit_path.read_text()
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def bundle(tmp_path: Path) -> Callable[[str, str], Path]:
    """A copy of the example bundle with one file's text replaced, for controls under test."""

    def make(old: str, new: str, file: str = "common.yaml") -> Path:
        target = tmp_path / "policies"
        if not target.exists():
            shutil.copytree(EXAMPLE_POLICIES, target)
        text = (target / file).read_text()
        assert old in text, f"{old!r} not in {file}"
        (target / file).write_text(text.replace(old, new))
        return target

    return make


@pytest.fixture
async def custom(tmp_path: Path) -> AsyncIterator[Callable[[Path], object]]:
    """Start sidecars on a given bundle; all are stopped after the test."""
    started: list[Sidecar] = []

    async def start(policies: Path) -> Sidecar:
        running = Sidecar.connect(
            await App.start(make_settings(tmp_path / "state", policies=policies))
        )
        started.append(running)
        return running

    yield start
    for running in started:
        await running.close()


# ------------------------------------------------------------------ business rules


async def test_refund_over_the_amount_due_fails_its_rule(sidecar: Sidecar) -> None:
    """A refund larger than the invoice's amount due is denied by the rule, named."""
    context = '{"invoice": {"amount_due": 30, "currency": "USD"}}'
    response = await check(sidecar, sidecar.token(), "requestRefund", refund("40"), context=context)
    assert codes(response) == ["RULE_FAILED"]
    assert "within-amount-due" in response.reasons[0].message


async def test_refund_in_another_currency_fails_its_rule(sidecar: Sidecar) -> None:
    """A refund in a currency other than the invoice's is denied by the second rule."""
    context = '{"invoice": {"amount_due": 300, "currency": "EUR"}}'
    response = await check(sidecar, sidecar.token(), "requestRefund", refund("40"), context=context)
    assert codes(response) == ["RULE_FAILED"]
    assert "invoice-currency" in response.reasons[0].message


async def test_a_rule_that_cannot_be_evaluated_denies(sidecar: Sidecar) -> None:
    """Without the invoice facts the rule errors, and an erroring rule denies (fail closed)."""
    response = await check(sidecar, sidecar.token(), "requestRefund", refund("10"), context="")
    assert response.decision == pb.DECISION_DENY
    assert codes(response) == ["RULE_FAILED"]
    assert "could not be evaluated" in response.reasons[0].message


# ------------------------------------------------------------------ idempotency


async def test_write_tools_need_an_idempotency_key(sidecar: Sidecar) -> None:
    """A refund without an idempotency key is denied, naming the field."""
    response = await check(sidecar, sidecar.token(), "requestRefund", refund("10"), key="")
    assert codes(response) == ["IDEMPOTENCY_KEY_REQUIRED"]
    assert response.reasons[0].field == "idempotency_key"


async def test_same_key_same_call_replays_the_decision(sidecar: Sidecar) -> None:
    """A retried call returns the original decision id, marked replayed, and is audited."""
    token = sidecar.token()
    first = await check(sidecar, token, "requestRefund", refund("10"), key="refund-42")
    again = await check(sidecar, token, "requestRefund", refund("10.00"), key="refund-42")
    assert first.decision == again.decision == pb.DECISION_ALLOW
    assert (first.replayed, again.replayed) == (False, True)
    assert again.decision_id == first.decision_id
    records = audit_lines(sidecar)
    assert [r["replay_of"] for r in records] == ["", first.decision_id]


async def test_same_key_other_call_conflicts(sidecar: Sidecar) -> None:
    """The same key with different arguments is denied as a conflict."""
    token = sidecar.token()
    await check(sidecar, token, "requestRefund", refund("10"), key="refund-43")
    response = await check(sidecar, token, "requestRefund", refund("11"), key="refund-43")
    assert codes(response) == ["IDEMPOTENCY_CONFLICT"]


async def test_same_key_same_call_in_another_run_conflicts(sidecar: Sidecar) -> None:
    """A replay is for the same call in the same run: the key in another run is a conflict,
    so a decision never travels to a run whose budgets and approvals it was not judged in."""
    token = sidecar.token()
    first = await check(sidecar, token, "requestRefund", refund("10"), key="refund-44")
    assert first.decision == pb.DECISION_ALLOW
    response = await check(
        sidecar, token, "requestRefund", refund("10"), key="refund-44", run_id="run-2"
    )
    assert codes(response) == ["IDEMPOTENCY_CONFLICT"]
    assert not response.replayed


async def test_keys_are_scoped_per_agent(sidecar: Sidecar) -> None:
    """Another agent using the same key string does not see the first agent's decision."""
    await check(sidecar, sidecar.token(), "requestRefund", refund("10"), key="shared")
    token = sidecar.token(
        agent=INCIDENT_AGENT, grants=(Grant("openIncident", MappingProxyType({"service": "db"})),)
    )
    arguments = '{"service": "db", "severity": "sev3", "title": "slow"}'
    response = await check(sidecar, token, "openIncident", arguments, key="shared")
    assert response.decision == pb.DECISION_ALLOW
    assert not response.replayed


async def test_twenty_concurrent_checks_with_one_key_record_one_decision(
    sidecar: Sidecar,
) -> None:
    """Racing retries of one call yield exactly one decision; the others replay it."""
    token = sidecar.token()
    responses = await asyncio.gather(
        *(check(sidecar, token, "requestRefund", refund("10"), key="race") for _ in range(20))
    )
    assert len({r.decision_id for r in responses}) == 1
    assert sum(not r.replayed for r in responses) == 1
    assert all(r.decision == pb.DECISION_ALLOW for r in responses)


# ------------------------------------------------------------------ budgets


async def test_run_hits_its_tool_cap_exactly_under_concurrency(sidecar: Sidecar) -> None:
    """With 8 concurrent clients, a run gets exactly its 20 refunds, then BUDGET_EXCEEDED."""
    token = sidecar.token()
    results: list[pb.CheckResponse] = []

    async def client() -> None:
        for _ in range(5):
            results.append(
                await check(sidecar, token, "requestRefund", refund("1"), run_id="run-cap")
            )

    await asyncio.gather(*(client() for _ in range(8)))
    outcome = [codes(r)[0] for r in results]
    assert outcome.count("TIER_ALLOWED") == 20
    assert outcome.count("BUDGET_EXCEEDED") == 20
    denied = next(r for r in results if codes(r) == ["BUDGET_EXCEEDED"])
    assert "20 calls of 'requestRefund'" in denied.reasons[0].message


async def test_checks_in_flight_together_share_transactions_and_stay_exact(
    sidecar: Sidecar,
) -> None:
    """Bursts of 16 concurrent Checks over gRPC are decided in shared state transactions
    (fewer batches than Checks), and the run still gets exactly its 20 refunds."""
    token = sidecar.token()
    results: list[pb.CheckResponse] = []
    for _ in range(3):
        results += await asyncio.gather(
            *(
                check(sidecar, token, "requestRefund", refund("1"), run_id="run-b")
                for _ in range(16)
            )
        )
    outcome = [codes(r)[0] for r in results]
    assert (outcome.count("TIER_ALLOWED"), outcome.count("BUDGET_EXCEEDED")) == (20, 28)
    samples = scrape(sidecar)
    assert samples[("proviso_decision_batch_checks_sum", ())] == 48
    batches = samples[("proviso_decision_batch_checks_count", ())]
    assert batches < 48, "every Check was decided alone"
    records = [
        json.loads(line) for line in sidecar.app.settings.audit_path.read_text().splitlines()
    ]
    decided = [r["record_id"] for r in records if r["kind"] == "decision"]
    assert sorted(decided) == sorted(r.decision_id for r in results), "one record each"


async def test_a_batch_of_checks_goes_to_one_audit_fsync_at_once(tmp_path: Path) -> None:
    """The records of Checks decided in one batch are written together and at once: not split
    because the audit log's recent writes were smaller (it would send the first on alone, the
    others after a second fsync), nor held for the group commit window (5 s here)."""
    app = await App.start(make_settings(tmp_path / "state", audit_group_commit_seconds=5.0))
    sidecar = Sidecar.connect(app)
    token = sidecar.token()

    def request(i: int) -> Callable[[], CheckInput]:
        return partial(
            convert.check_input,
            pb.CheckRequest(
                token=token, tool="requestRefund", arguments_json=refund("1"),
                context_json=INVOICE_CONTEXT, run_id=f"run-{i}", idempotency_key=f"key-{i}",
            ),
        )  # fmt: skip

    def samples(name: str) -> float:
        return scrape(sidecar).get((name, ()), 0.0)

    async def burst(first: int) -> tuple[float, float]:
        """Eight Checks started in one turn of the loop: the decision batches and the audit
        writes they took."""
        batches = samples("proviso_decision_batch_checks_count")
        commits = samples("proviso_audit_batch_records_count")
        records = samples("proviso_audit_batch_records_sum")
        checks = (app.authorizer.check(request(i)) for i in range(first, first + 8))
        results = await asyncio.wait_for(asyncio.gather(*checks), 2.5)
        assert {r.decision.outcome.value for r in results} == {"ALLOW"}
        deadline = time.monotonic() + 10  # the writer reports a write just after answering
        while samples("proviso_audit_batch_records_sum") < records + 8:
            assert time.monotonic() < deadline, "the records were never reported written"
            await asyncio.sleep(0.01)
        return (
            samples("proviso_decision_batch_checks_count") - batches,
            samples("proviso_audit_batch_records_count") - commits,
        )

    try:
        batches, _ = await burst(0)  # each decided as it comes: nothing says more are coming
        assert batches > 1
        for attempt in range(1, 6):
            batches, writes = await burst(8 * attempt)
            if batches < 8:
                break
            # A slow machine started this burst more than two peak windows (0.2 s) after the
            # last, which are then forgotten: each Check was decided as it came. Try again.
        assert (batches, writes) == (1, 1), "one batch of eight, one write"
    finally:
        await sidecar.close()


async def test_checks_without_a_run_fall_under_a_per_token_budget(sidecar: Sidecar) -> None:
    """Without run ids, each token has its own budget, which no run id can name."""
    first, second = sidecar.token(), sidecar.token()
    for _ in range(20):
        await check(sidecar, first, "requestRefund", refund("1"), run_id="")
    spent = await check(sidecar, first, "requestRefund", refund("1"), run_id="")
    fresh = await check(sidecar, second, "requestRefund", refund("1"), run_id="")
    assert codes(spent) == ["BUDGET_EXCEEDED"]
    assert fresh.decision == pb.DECISION_ALLOW
    # A run id spelling the first token's budget key is a run of its own: it neither spends
    # nor is refused by that budget.
    jti = verify_unchecked(first)["jti"]
    for spelling in (f"token:{jti}", f"token_{jti}"):
        own_run = await check(sidecar, second, "requestRefund", refund("1"), run_id=spelling)
        assert own_run.decision == pb.DECISION_ALLOW, (spelling, codes(own_run))


async def test_cost_ceiling(bundle: Callable[..., Path], custom: Callable[..., object]) -> None:
    """The run's cost ceiling counts each tool's cost; the call that would exceed it is denied."""
    policies = bundle("    max_cost: 50\n", "    max_cost: 2.5\n")
    sidecar: Sidecar = await custom(policies)  # type: ignore[misc]
    token = sidecar.token()
    results = [
        codes(await check(sidecar, token, "requestRefund", refund("1"), run_id="r"))[0]
        for _ in range(3)
    ]
    assert results == ["TIER_ALLOWED", "TIER_ALLOWED", "BUDGET_EXCEEDED"]


async def test_three_invalid_calls_close_the_tool_for_the_run(sidecar: Sidecar) -> None:
    """After 3 invalid-argument denials in a row the 4th call is RETRY_BUDGET_EXHAUSTED."""
    token = sidecar.token()
    bad = refund("10.001")
    for _ in range(3):
        response = await check(sidecar, token, "requestRefund", bad, run_id="spin")
        assert codes(response) == ["INVALID_ARGUMENTS"]
    closed = await check(sidecar, token, "requestRefund", refund("10"), run_id="spin")
    assert codes(closed) == ["RETRY_BUDGET_EXHAUSTED"]
    other_run = await check(sidecar, token, "requestRefund", refund("10"), run_id="other")
    assert other_run.decision == pb.DECISION_ALLOW


async def test_invalid_arguments_name_every_missing_and_extra_field(sidecar: Sidecar) -> None:
    """Every missing and every unknown argument is its own reason, so the agent fixes them in
    one retry: named one at a time, it took a denial each and the third closed the tool."""
    token = sidecar.token()
    arguments = '{"invoice_id": "in_93K2", "memo": "x", "approved_by": "ceo"}'
    response = await check(sidecar, token, "requestRefund", arguments, run_id="fix-all")
    assert codes(response) == ["INVALID_ARGUMENTS"] * 5
    assert [r.field for r in response.reasons] == [
        "/amount", "/approved_by", "/currency", "/memo", "/reason",
    ]  # fmt: skip
    fixed = await check(sidecar, token, "requestRefund", refund("10"), run_id="fix-all")
    assert fixed.decision == pb.DECISION_ALLOW


async def test_a_valid_call_resets_the_retry_streak(sidecar: Sidecar) -> None:
    """Only consecutive failures count: a valid call in between resets the streak."""
    token = sidecar.token()
    for amount in ("10.001", "10.001", "10", "10.001", "10.001", "10"):
        response = await check(sidecar, token, "requestRefund", refund(amount), run_id="mixed")
    assert response.decision == pb.DECISION_ALLOW


# ------------------------------------------------------------------ rate limits


async def test_rate_limited_agent_gets_retry_after(sidecar: Sidecar) -> None:
    """The incident assistant's burst of 10 is allowed; the 11th call waits about a second."""
    token = sidecar.token(
        agent=INCIDENT_AGENT, grants=(Grant("openIncident", MappingProxyType({"service": "db"})),)
    )
    arguments = '{"service": "db", "severity": "sev3", "title": "slow queries"}'
    responses = [await check(sidecar, token, "openIncident", arguments) for _ in range(11)]
    assert [r.decision for r in responses[:10]] == [pb.DECISION_ALLOW] * 10
    limited = responses[10]
    assert codes(limited) == ["RATE_LIMITED"]
    assert 0 < limited.retry_after.ToTimedelta().total_seconds() <= 1.0


# ------------------------------------------------------------------ kill switches


async def set_switch(
    sidecar: Sidecar, engaged: bool, *, scope: int = TOOL_SCOPE, target: str = "requestRefund"
) -> admin_pb.SetKillSwitchResponse:
    stub = admin_grpc.AdminServiceStub(sidecar.channel)
    request = admin_pb.SetKillSwitchRequest(
        scope=scope,  # type: ignore[arg-type]
        target=target,
        engaged=engaged,
        reason="refunds misbehaving" if engaged else "",
    )
    return await stub.SetKillSwitch(request, metadata=identity(sidecar, ADMIN))


async def test_kill_switch_denies_the_next_check_and_survives_restart(
    custom: Callable[..., object],
) -> None:
    """An engaged switch denies at once, is audited and measured, and holds after a restart."""
    sidecar: Sidecar = await custom(EXAMPLE_POLICIES)  # type: ignore[misc]
    token = sidecar.token()
    assert (await check(sidecar, token, "requestRefund", refund("10"))).decision == (
        pb.DECISION_ALLOW
    )
    await set_switch(sidecar, engaged=True)
    denied = await check(sidecar, token, "requestRefund", refund("10"))
    assert codes(denied) == ["KILL_SWITCH"]
    assert "tool:requestRefund" in denied.reasons[0].message
    assert scrape(sidecar)[("proviso_kill_switches_active", ())] == 1
    await set_switch(sidecar, engaged=True)  # again: the reason is updated, the switch stays
    events = [r for r in audit_lines(sidecar) if r["kind"] == "kill_switch"]
    assert [(e["action"], e["by"], e["was_engaged"]) for e in events] == [
        ("engage", ADMIN, False),
        ("engage", ADMIN, True),
    ]

    await sidecar.close()
    restarted: Sidecar = await custom(EXAMPLE_POLICIES)  # type: ignore[misc]
    again = await check(restarted, token, "requestRefund", refund("10"))
    assert codes(again) == ["KILL_SWITCH"]
    await set_switch(restarted, engaged=False)
    released = await check(restarted, token, "requestRefund", refund("10"))
    assert released.decision == pb.DECISION_ALLOW
    release = [r for r in audit_lines(restarted) if r["kind"] == "kill_switch"][-1]
    assert (release["action"], release["was_engaged"]) == ("release", True)


async def test_the_kill_switch_gauge_counts_without_waiting_for_a_check(
    bundle: Callable[..., Path], custom: Callable[..., object]
) -> None:
    """``proviso_kill_switches_active`` holds what is engaged from the start (a restarted
    sidecar said 0 with a switch engaged until its first Check) and follows a policy reload."""
    policies = bundle("label: examples-2026-11\n", "label: examples-2026-11\n")
    sidecar: Sidecar = await custom(policies)  # type: ignore[misc]
    await set_switch(sidecar, engaged=True)
    await sidecar.close()
    restarted: Sidecar = await custom(policies)  # type: ignore[misc]
    assert scrape(restarted)[("proviso_kill_switches_active", ())] == 1
    common = policies / "common.yaml"
    common.write_text(
        common.read_text().replace(
            "tools:\n",
            "kill_switches:\n  no-notes:\n    scope: tool\n    target: addInternalNote\n"
            "    reason: notes are frozen\n\ntools:\n",
            1,
        )
    )
    _, changed = await restarted.app.reloader.reload("test")
    assert changed
    assert scrape(restarted)[("proviso_kill_switches_active", ())] == 2


async def test_every_worker_reports_the_shared_stores_switches_and_approvals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill switches and approval requests live in the store the workers share: a worker that
    did not handle the change (SetKillSwitch, a Check opening a request) reports it too, by
    the next minutely maintenance (here made quick), not only after a Check of its own."""
    monkeypatch.setattr("sidecar.app.PRUNE_INTERVAL_SECONDS", 0.05)
    shared = make_settings(tmp_path / "state", workers=2)
    workers = [
        Sidecar.connect(await App.start(shared.for_worker(index, listen_port=0, metrics_port=0)))
        for index in range(2)
    ]
    try:
        one, other = workers
        await set_switch(one, engaged=True, target="muteAlert")
        token = one.token()
        asked = await check(one, token, "requestRefund", refund("120"))
        assert asked.decision == pb.DECISION_NEEDS_APPROVAL
        assert scrape(one)[("proviso_approvals_pending", (("tier", "supervisor"),))] == 1
        deadline = time.monotonic() + 5
        wanted = {
            ("proviso_kill_switches_active", ()): 1,
            ("proviso_approvals_pending", (("tier", "supervisor"),)): 1,
        }
        while True:
            seen = {sample: scrape(other).get(sample) for sample in wanted}
            if seen == wanted:
                break
            assert time.monotonic() < deadline, f"the other worker still reports {seen}"
            await asyncio.sleep(0.05)
    finally:
        for worker in workers:
            await worker.close()


async def test_global_kill_switch_denies_even_without_a_token(sidecar: Sidecar) -> None:
    """The global switch stops everything, before the token is even looked at."""
    await set_switch(sidecar, engaged=True, scope=admin_pb.KILL_SWITCH_SCOPE_GLOBAL, target="")
    response = await check(sidecar, "", "requestRefund", refund("10"))
    assert codes(response) == ["KILL_SWITCH"]


async def test_agent_kill_switch_stops_only_that_agent(sidecar: Sidecar) -> None:
    """A switch on one agent leaves other agents working."""
    await set_switch(
        sidecar, engaged=True, scope=admin_pb.KILL_SWITCH_SCOPE_AGENT, target=INCIDENT_AGENT
    )
    incident = sidecar.token(
        agent=INCIDENT_AGENT, grants=(Grant("openIncident", MappingProxyType({"service": "db"})),)
    )
    arguments = '{"service": "db", "severity": "sev3", "title": "slow"}'
    assert codes(await check(sidecar, incident, "openIncident", arguments)) == ["KILL_SWITCH"]
    billing = await check(sidecar, sidecar.token(), "requestRefund", refund("10"))
    assert billing.decision == pb.DECISION_ALLOW


async def test_only_admins_set_kill_switches(sidecar: Sidecar) -> None:
    """A non-admin cannot engage a switch; an anonymous caller is unauthenticated."""
    stub = admin_grpc.AdminServiceStub(sidecar.channel)
    request = admin_pb.SetKillSwitchRequest(
        scope=TOOL_SCOPE, target="requestRefund", engaged=True, reason="x"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SetKillSwitch(request, metadata=identity(sidecar, "alice@example.com"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await stub.SetKillSwitch(request)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_engaging_needs_a_reason(sidecar: Sidecar) -> None:
    """A switch engaged without a reason is refused, naming the field."""
    stub = admin_grpc.AdminServiceStub(sidecar.channel)
    request = admin_pb.SetKillSwitchRequest(scope=TOOL_SCOPE, target="requestRefund", engaged=True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SetKillSwitch(request, metadata=identity(sidecar, ADMIN))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reason" in (caught.value.details() or "")


async def test_a_switch_reason_is_bounded(sidecar: Sidecar) -> None:
    """The reason goes into the answer to every call the switch stops and into each of their
    audit records: a pasted log of megabytes would swell them all (and a few such switches
    would make ListKillSwitches too large to receive). At most 1024 characters, as a
    revocation's reason."""
    stub = admin_grpc.AdminServiceStub(sidecar.channel)
    request = admin_pb.SetKillSwitchRequest(
        scope=TOOL_SCOPE, target="requestRefund", engaged=True, reason="x" * 1025
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SetKillSwitch(request, metadata=identity(sidecar, ADMIN))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("reason: at most 1024 characters")
    request.reason = "x" * 1024
    assert (await stub.SetKillSwitch(request, metadata=identity(sidecar, ADMIN))).engaged


async def test_policy_kill_switch(
    bundle: Callable[..., Path], custom: Callable[..., object]
) -> None:
    """A switch shipped in the policy denies and is listed with its source."""
    policies = bundle(
        "tools:\n",
        "kill_switches:\n  no-notes:\n    scope: tool\n    target: addInternalNote\n"
        "    reason: notes are frozen during the audit\n\ntools:\n",
    )
    sidecar: Sidecar = await custom(policies)  # type: ignore[misc]
    token = sidecar.token(
        grants=(Grant("addInternalNote", MappingProxyType({"ticket_id": "T-1"})),)
    )
    note = '{"ticket_id": "T-1", "body": "hello"}'
    response = await check(sidecar, token, "addInternalNote", note)
    assert codes(response) == ["KILL_SWITCH"]
    assert "notes are frozen" in response.reasons[0].message
    stub = admin_grpc.AdminServiceStub(sidecar.channel)
    listed = await stub.ListKillSwitches(
        admin_pb.ListKillSwitchesRequest(), metadata=identity(sidecar, ADMIN)
    )
    assert [(s.target, s.source) for s in listed.kill_switches] == [("addInternalNote", "policy")]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_switch(sidecar, engaged=False, target="addInternalNote")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "changing the policy" in (caught.value.details() or "")


async def test_a_switch_on_a_tool_or_agent_the_policy_lacks_is_refused(sidecar: Sidecar) -> None:
    """A typo (here the wrong case) would engage a switch that stops nothing while the admin is
    told "engaged": refused, naming the target and the near miss; nothing is stored or
    audited, and refunds are not thought stopped when they are not."""
    for scope, target, near in (
        (TOOL_SCOPE, "requestrefund", "requestRefund"),
        (admin_pb.KILL_SWITCH_SCOPE_AGENT, "billing-resolution-agent", BILLING_AGENT),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await set_switch(sidecar, engaged=True, scope=scope, target=target)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = caught.value.details() or ""
        assert details.startswith("target: "), details
        assert f"did you mean '{near}'?" in details, details
    listed = await admin_grpc.AdminServiceStub(sidecar.channel).ListKillSwitches(
        admin_pb.ListKillSwitchesRequest(), metadata=identity(sidecar, ADMIN)
    )
    assert not listed.kill_switches
    assert not [r for r in audit_lines(sidecar) if r["kind"] == "kill_switch"]


async def test_releasing_a_switch_that_is_not_engaged_is_not_found(sidecar: Sidecar) -> None:
    """Nothing changed, so the admin is told so (and nothing is audited) instead of
    'released'."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_switch(sidecar, engaged=False)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "tool:requestRefund is not engaged" in (caught.value.details() or "")
    assert not [r for r in audit_lines(sidecar) if r["kind"] == "kill_switch"]


# ------------------------------------------------------------------ dry runs


async def test_dry_runs_consume_nothing(sidecar: Sidecar) -> None:
    """Dry runs decide fully but spend no budget and record no idempotency key."""
    token = sidecar.token()
    for _ in range(25):
        response = await check(
            sidecar, token, "requestRefund", refund("1"), run_id="dry", dry_run=True
        )
        assert response.decision == pb.DECISION_ALLOW
    dry = await check(sidecar, token, "requestRefund", refund("1"), key="k-dry", dry_run=True)
    real = await check(sidecar, token, "requestRefund", refund("1"), key="k-dry", run_id="dry")
    assert not real.replayed
    assert real.decision_id != dry.decision_id
    assert real.decision == pb.DECISION_ALLOW, "the 25 dry runs did not spend the run's budget"
    assert [r["dry_run"] for r in audit_lines(sidecar)][-2:] == [True, False]


async def test_a_store_failure_while_deciding_is_unavailable(sidecar: Sidecar) -> None:
    """A Check whose state write fails answers UNAVAILABLE (decide safely or not at all)."""
    database = sqlite3.connect(sidecar.app.settings.state_dir / "state.db", isolation_level=None)
    database.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON run_usage BEGIN SELECT RAISE(ABORT, 'io'); END"
    )
    database.close()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check(sidecar, sidecar.token(), "requestRefund", refund("10"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
async def test_a_check_cancelled_before_its_record_failed_is_undone_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller's deadline passes while the record is being written, then the write fails:
    nobody waits for the answer any more, but the decision is still undone, so its
    idempotency key cannot replay an unrecorded ALLOW."""
    write = AuditLog._write

    def slow_write(self: AuditLog, data: bytes) -> None:
        time.sleep(0.5)  # on the writer thread: the Check's deadline passes meanwhile
        write(self, data)

    monkeypatch.setattr(AuditLog, "_write", slow_write)
    state = tmp_path / "state"
    broken = Sidecar.connect(await App.start(make_settings(state, audit_log=Path("/dev/full"))))
    try:
        request = pb.CheckRequest(
            token=broken.token(), tool="requestRefund", arguments_json=refund("10"),
            context_json=INVOICE_CONTEXT, run_id="run-1", idempotency_key="k-gone",
        )  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await broken.authz.Check(request, timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10
        while scrape(broken)[("proviso_audit_write_errors_total", ())] < 1:
            assert time.monotonic() < deadline, "the write never failed"
            await asyncio.sleep(0.05)
    finally:
        await broken.close()
    with sqlite3.connect(state / "state.db") as database:
        keys = database.execute("SELECT count(*) FROM idempotency_keys WHERE key = 'k-gone'")
        assert keys.fetchone() == (0,), "the unrecorded decision was forgotten"
    database.close()


async def test_a_decision_that_could_not_be_audited_is_never_replayed(
    tmp_path: Path,
) -> None:
    """Disk full: the Check is UNAVAILABLE; after a restart the same key gets a fresh,
    audited decision, not a replay of the unrecorded one."""
    state = tmp_path / "state"
    broken = Sidecar.connect(await App.start(make_settings(state, audit_log=Path("/dev/full"))))
    token = broken.token()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await check(broken, token, "requestRefund", refund("10"), key="k-lost")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await broken.close()
    fixed = Sidecar.connect(await App.start(make_settings(state)))
    try:
        again = await check(fixed, token, "requestRefund", refund("10"), key="k-lost")
        assert again.decision == pb.DECISION_ALLOW
        assert not again.replayed
        assert again.decision_id in {r["record_id"] for r in audit_lines(fixed)}
    finally:
        await fixed.close()


async def test_a_check_that_waited_for_a_busy_store_is_measured_as_it_waited(
    sidecar: Sidecar,
) -> None:
    """A Check may wait up to 5 s for a busy store and still be decided: its latency lands in
    a finite bucket of proviso_check_duration_seconds, so histogram_quantile can tell 1.5 s
    from 1 s (the buckets ended at 1 s: every slower Check was only '+Inf')."""
    lock = os.open(sidecar.app.settings.state_dir / "state.db.lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        decided = asyncio.ensure_future(
            check(sidecar, sidecar.token(), "requestRefund", refund("1"))
        )
        await asyncio.sleep(1.5)
    finally:
        os.close(lock)
    assert (await asyncio.wait_for(decided, 5)).decision == pb.DECISION_ALLOW
    samples = scrape(sidecar)
    bucket = "proviso_check_duration_seconds_bucket"
    assert samples[(bucket, (("le", "1.0"),))] == 0
    assert samples.get((bucket, (("le", "2.5"),))) == 1
    assert samples.get((bucket, (("le", "5.0"),))) == 1


async def test_a_busy_store_holds_the_writes_not_the_server(sidecar: Sidecar) -> None:
    """While another process holds the state store's lock (a CLI write, an operator's sqlite3),
    a Check and an admin's kill switch wait for it, but the server goes on answering (health);
    once free, both complete: the Check decided, the switch engaged."""
    health = health_pb2_grpc.HealthStub(sidecar.channel)
    token = sidecar.token()
    lock = os.open(sidecar.app.settings.state_dir / "state.db.lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        decided = asyncio.ensure_future(check(sidecar, token, "requestRefund", refund("1")))
        engaged = asyncio.ensure_future(set_switch(sidecar, True, target="getInvoice"))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        for _ in range(5):
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        answered_in = time.monotonic() - started
        assert not decided.done(), "nothing is decided while the store is held"
        assert not engaged.done()
    finally:
        os.close(lock)
    assert answered_in < 1.0, f"health checks took {answered_in:.2f} s while the store was busy"
    assert (await asyncio.wait_for(decided, 5)).decision == pb.DECISION_ALLOW
    assert (await asyncio.wait_for(engaged, 5)).engaged
