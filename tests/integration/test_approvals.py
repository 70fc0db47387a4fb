"""Human approvals over real gRPC: N-of-M requests bound to the exact call, single use."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from sidecar._proto.proviso.v1 import admin_service_pb2 as admin_pb
from sidecar._proto.proviso.v1 import admin_service_pb2_grpc as admin_grpc
from sidecar._proto.proviso.v1 import approval_service_pb2 as ap_pb
from sidecar._proto.proviso.v1 import approval_service_pb2_grpc as ap_grpc
from sidecar._proto.proviso.v1 import authorization_service_pb2 as pb
from sidecar.app import App
from sidecar.clock import FixedClock
from sidecar.engine.evaluate import MAX_PENDING_APPROVALS_PER_AGENT
from tests.conftest import BILLING_AGENT, EXAMPLE_POLICIES, Sidecar, make_settings
from tests.integration.test_check import codes, refund
from tests.integration.test_server import identity, scrape

ALICE, FRANK, FIONA = "alice@example.com", "frank@example.com", "fiona@example.com"


def stub(sidecar: Sidecar) -> ap_grpc.ApprovalServiceAsyncStub:
    return ap_grpc.ApprovalServiceStub(sidecar.channel)


async def approve(
    sidecar: Sidecar, approval_id: str, who: str, comment: str = "ok"
) -> ap_pb.ApproveApprovalResponse:
    return await stub(sidecar).ApproveApproval(
        ap_pb.ApproveApprovalRequest(approval_id=approval_id, comment=comment),
        metadata=identity(sidecar, who),
    )


async def refund_check(
    sidecar: Sidecar, token: str, amount: str, approval_id: str = "", **kwargs: object
) -> pb.CheckResponse:
    """A refund Check, optionally presenting an approval id."""
    request = pb.CheckRequest(
        token=token,
        tool="requestRefund",
        arguments_json=refund(amount),
        context_json='{"invoice": {"amount_due": 100000, "currency": "USD"}}',
        run_id="run-1",
        idempotency_key=f"k-{time.monotonic_ns()}",
        approval_id=approval_id,
    )
    for name, value in kwargs.items():
        setattr(request, name, value)
    return await sidecar.authz.Check(request)


async def test_every_approval_tier_is_reported_from_the_start(sidecar: Sidecar) -> None:
    """proviso_approvals_pending has a sample for each approval tier of the policy, at 0, before
    any request: an alert on it must not read a fresh sidecar as "not reported"."""
    samples = scrape(sidecar)
    for tier in ("supervisor", "finance"):
        assert samples[("proviso_approvals_pending", (("tier", tier),))] == 0


async def test_supervisor_approval_allows_the_call_once(sidecar: Sidecar) -> None:
    """120 needs approval; a supervisor approves; the call with the id is allowed exactly once."""
    token = sidecar.token()
    needed = await refund_check(sidecar, token, "120")
    assert needed.decision == pb.DECISION_NEEDS_APPROVAL
    assert needed.approval_id.startswith("apr_")
    again = await refund_check(sidecar, token, "120.00")
    assert again.approval_id == needed.approval_id, "the same call finds the open request"
    still = await refund_check(sidecar, token, "120", needed.approval_id)
    assert still.decision == pb.DECISION_NEEDS_APPROVAL
    assert still.approval_id == needed.approval_id

    approved = await approve(sidecar, needed.approval_id, ALICE)
    assert approved.approval.state == ap_pb.APPROVAL_STATE_APPROVED
    assert [v.approver for v in approved.approval.verdicts] == [ALICE]

    allowed = await refund_check(sidecar, token, "120", needed.approval_id)
    assert allowed.decision == pb.DECISION_ALLOW
    assert codes(allowed) == ["APPROVAL_GRANTED"]
    assert ALICE in allowed.reasons[0].message
    second = await refund_check(sidecar, token, "120", needed.approval_id)
    assert codes(second) == ["APPROVAL_CONSUMED"]
    got = await stub(sidecar).GetApproval(
        ap_pb.GetApprovalRequest(approval_id=needed.approval_id), metadata=identity(sidecar, ALICE)
    )
    assert got.approval.state == ap_pb.APPROVAL_STATE_CONSUMED


async def test_approval_for_other_arguments_is_a_mismatch(sidecar: Sidecar) -> None:
    """An approval for 120 cannot be used for 121."""
    token = sidecar.token()
    needed = await refund_check(sidecar, token, "120")
    await approve(sidecar, needed.approval_id, ALICE)
    response = await refund_check(sidecar, token, "121", needed.approval_id)
    assert codes(response) == ["APPROVAL_MISMATCH"]
    assert response.reasons[0].field == "approval_id"
    other_run = await refund_check(sidecar, token, "120", needed.approval_id, run_id="run-2")
    assert codes(other_run) == ["APPROVAL_MISMATCH"]
    unknown = await refund_check(sidecar, token, "120", "apr_nonexistent")
    assert codes(unknown) == ["APPROVAL_NOT_FOUND"]


async def test_a_used_approval_does_not_replay_in_another_run(sidecar: Sidecar) -> None:
    """The idempotency key of the approved call, retried in another run, conflicts: the
    approval was for that run, and it is used up."""
    token = sidecar.token()
    needed = await refund_check(sidecar, token, "120", idempotency_key="K1")
    await approve(sidecar, needed.approval_id, ALICE)
    allowed = await refund_check(sidecar, token, "120", needed.approval_id, idempotency_key="K1")
    assert codes(allowed) == ["APPROVAL_GRANTED"]
    retried = await refund_check(sidecar, token, "120", needed.approval_id, idempotency_key="K1")
    assert (retried.replayed, retried.decision_id) == (True, allowed.decision_id)
    for run in ("run-2", "run-3"):
        elsewhere = await refund_check(sidecar, token, "120", run_id=run, idempotency_key="K1")
        assert elsewhere.decision == pb.DECISION_DENY
        assert codes(elsewhere) == ["IDEMPOTENCY_CONFLICT"]
        assert not elsewhere.replayed


async def test_a_replayed_approved_allow_names_its_approval(sidecar: Sidecar) -> None:
    """An idempotent retry of the approved call returns the recorded decision exactly: with the
    approval it used (CheckResponse.approval_id), also when the retry does not present it."""
    token = sidecar.token()
    needed = await refund_check(sidecar, token, "120", idempotency_key="K-named")
    await approve(sidecar, needed.approval_id, ALICE)
    allowed = await refund_check(
        sidecar, token, "120", needed.approval_id, idempotency_key="K-named"
    )
    assert allowed.approval_id == needed.approval_id
    for presented in (needed.approval_id, ""):
        retried = await refund_check(sidecar, token, "120", presented, idempotency_key="K-named")
        assert (retried.replayed, retried.decision_id) == (True, allowed.decision_id)
        assert codes(retried) == ["APPROVAL_GRANTED"]
        assert retried.approval_id == needed.approval_id


async def test_finance_tier_needs_two_distinct_approvers(sidecar: Sidecar) -> None:
    """900 needs two finance approvers; one person approving twice is still one approval."""
    token = sidecar.token()
    needed = await refund_check(sidecar, token, "900")
    first = await approve(sidecar, needed.approval_id, FRANK)
    twice = await approve(sidecar, needed.approval_id, FRANK)
    assert first.counted
    assert not twice.counted
    assert twice.approval.state == ap_pb.APPROVAL_STATE_PENDING
    pending = await refund_check(sidecar, token, "900", needed.approval_id)
    assert pending.decision == pb.DECISION_NEEDS_APPROVAL
    done = await approve(sidecar, needed.approval_id, FIONA)
    assert done.approval.state == ap_pb.APPROVAL_STATE_APPROVED
    allowed = await refund_check(sidecar, token, "900", needed.approval_id)
    assert allowed.decision == pb.DECISION_ALLOW


async def test_only_the_tiers_roles_may_approve(sidecar: Sidecar) -> None:
    """A billing supervisor cannot approve the finance tier; an admin cannot approve at all."""
    needed = await refund_check(sidecar, sidecar.token(), "900")
    for person in (ALICE, "olivia@example.com"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await approve(sidecar, needed.approval_id, person)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_agent_and_its_issuer_can_never_approve(sidecar: Sidecar) -> None:
    """Even holding the approver group, the agent itself and its token issuer are refused."""
    needed = await refund_check(sidecar, sidecar.token(), "120")
    idp = sidecar.app.dev_idp
    assert idp is not None
    for subject in (BILLING_AGENT, "orchestrator@service"):
        jwt = idp.mint(subject, ("billing-supervisors",), time.time())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub(sidecar).ApproveApproval(
                ap_pb.ApproveApprovalRequest(approval_id=needed.approval_id),
                metadata=(("authorization", f"Bearer {jwt}"),),
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_rejection_denies(sidecar: Sidecar) -> None:
    """One rejection (the default veto count) closes the request; the call is then denied."""
    token = sidecar.token()
    needed = await refund_check(sidecar, token, "120")
    rejected = await stub(sidecar).RejectApproval(
        ap_pb.RejectApprovalRequest(approval_id=needed.approval_id, comment="not this one"),
        metadata=identity(sidecar, ALICE),
    )
    assert rejected.approval.state == ap_pb.APPROVAL_STATE_REJECTED
    response = await refund_check(sidecar, token, "120", needed.approval_id)
    assert codes(response) == ["APPROVAL_REJECTED"]
    with pytest.raises(grpc.aio.AioRpcError) as closed:
        await approve(sidecar, needed.approval_id, ALICE)
    assert closed.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_unauthenticated_callers_are_refused(sidecar: Sidecar) -> None:
    """Every ApprovalService call needs an IdP identity."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(sidecar).ListApprovals(ap_pb.ListApprovalsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_only_approvers_and_admins_may_read_requests(sidecar: Sidecar) -> None:
    """Requests carry the call's arguments: an IdP identity without an approver role (the
    issuer here) is refused Get, List and Watch; an admin may read them."""
    needed = await refund_check(sidecar, sidecar.token(), "120")
    outsider = identity(sidecar, "orchestrator@service")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(sidecar).GetApproval(
            ap_pb.GetApprovalRequest(approval_id=needed.approval_id), metadata=outsider
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(sidecar).ListApprovals(ap_pb.ListApprovalsRequest(), metadata=outsider)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub(sidecar).WatchApprovals(
            ap_pb.WatchApprovalsRequest(), metadata=outsider
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    admin = identity(sidecar, "olivia@example.com")
    listed = await stub(sidecar).ListApprovals(ap_pb.ListApprovalsRequest(), metadata=admin)
    assert [a.approval_id for a in listed.approvals] == [needed.approval_id]


async def test_expiry_with_an_injected_clock(tmp_path: Path) -> None:
    """After the tier's 24 h the request is expired: the Check is denied and approving fails."""
    clock = FixedClock(time.time())
    sidecar = Sidecar.connect(await App.start(make_settings(tmp_path / "s"), clock=clock))
    try:
        needed = await refund_check(sidecar, sidecar.token(now=clock.now()), "120")
        clock.advance(24 * 3600 + 1)
        token = sidecar.token(now=clock.now())
        expired = await refund_check(sidecar, token, "120", needed.approval_id)
        assert codes(expired) == ["APPROVAL_EXPIRED"]
        idp = sidecar.app.dev_idp
        assert idp is not None
        jwt = idp.mint(ALICE, ("billing-supervisors",), clock.now())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub(sidecar).ApproveApproval(
                ap_pb.ApproveApprovalRequest(approval_id=needed.approval_id),
                metadata=(("authorization", f"Bearer {jwt}"),),
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        fresh = await refund_check(sidecar, token, "120")
        assert fresh.approval_id != needed.approval_id, "a new request replaces the expired one"
    finally:
        await sidecar.close()


async def test_a_policy_change_in_between_still_bites(sidecar: Sidecar) -> None:
    """An approved call is evaluated again: a kill switch engaged after approval denies it."""
    token = sidecar.token()
    needed = await refund_check(sidecar, token, "120")
    await approve(sidecar, needed.approval_id, ALICE)
    await admin_grpc.AdminServiceStub(sidecar.channel).SetKillSwitch(
        admin_pb.SetKillSwitchRequest(
            scope=admin_pb.KILL_SWITCH_SCOPE_TOOL, target="requestRefund", engaged=True,
            reason="incident",
        ),
        metadata=identity(sidecar, "olivia@example.com"),
    )  # fmt: skip
    response = await refund_check(sidecar, token, "120", needed.approval_id)
    assert codes(response) == ["KILL_SWITCH"]


async def watch(sidecar: Sidecar, into: list[ap_pb.WatchApprovalsResponse], count: int) -> None:
    call = stub(sidecar).WatchApprovals(
        ap_pb.WatchApprovalsRequest(), metadata=identity(sidecar, ALICE)
    )
    async for change in call:
        into.append(change)
        if len(into) >= count:
            call.cancel()
            return


async def test_watch_sees_create_approve_consume(sidecar: Sidecar) -> None:
    """The Watch stream reports each change of a request, in order."""
    seen: list[ap_pb.WatchApprovalsResponse] = []
    watcher = asyncio.create_task(watch(sidecar, seen, 4))
    await asyncio.sleep(0.3)
    token = sidecar.token()
    needed = await refund_check(sidecar, token, "120")
    await approve(sidecar, needed.approval_id, ALICE)
    await refund_check(sidecar, token, "120", needed.approval_id)
    await asyncio.wait_for(watcher, timeout=10)
    assert [(c.event, c.actor) for c in seen] == [
        ("created", BILLING_AGENT),
        ("approve", ALICE),
        ("approved", ALICE),
        ("consumed", BILLING_AGENT),
    ]
    assert {c.approval.approval_id for c in seen} == {needed.approval_id}
    assert seen[0].sequence < seen[-1].sequence


async def test_list_filters_and_pages(sidecar: Sidecar) -> None:
    """ListApprovals filters by state and pages with an opaque token."""
    token = sidecar.token()
    ids = [(await refund_check(sidecar, token, str(100 + i))).approval_id for i in range(5)]
    await approve(sidecar, ids[0], ALICE)
    listing = stub(sidecar)
    pending = await listing.ListApprovals(
        ap_pb.ListApprovalsRequest(state=ap_pb.APPROVAL_STATE_PENDING, page_size=2),
        metadata=identity(sidecar, ALICE),
    )
    collected = [a.approval_id for a in pending.approvals]
    while pending.next_page_token:
        pending = await listing.ListApprovals(
            ap_pb.ListApprovalsRequest(
                state=ap_pb.APPROVAL_STATE_PENDING, page_size=2, page_token=pending.next_page_token
            ),
            metadata=identity(sidecar, ALICE),
        )
        collected += [a.approval_id for a in pending.approvals]
    assert collected == list(reversed(ids[1:]))
    arguments = json.loads(
        (await listing.GetApproval(
            ap_pb.GetApprovalRequest(approval_id=ids[1]), metadata=identity(sidecar, ALICE)
        )).approval.arguments_json
    )  # fmt: skip
    assert arguments["amount"] == 101
    samples = scrape(sidecar)
    assert samples[("proviso_approvals_pending", (("tier", "supervisor"),))] == 4
    assert samples[("proviso_approvals_total", (("outcome", "created"),))] == 5
    assert samples[("proviso_approvals_total", (("outcome", "approved"),))] == 1
    for approval_id in ids[1:]:
        await listing.RejectApproval(
            ap_pb.RejectApprovalRequest(approval_id=approval_id, comment="no"),
            metadata=identity(sidecar, ALICE),
        )
    drained = scrape(sidecar)
    assert drained[("proviso_approvals_pending", (("tier", "supervisor"),))] == 0, "0, not absent"


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    """Pending requests stay pending and consumed ones stay consumed across a restart."""
    settings = make_settings(tmp_path / "s")
    first = Sidecar.connect(await App.start(settings))
    token = first.token()
    pending = await refund_check(first, token, "130")
    used = await refund_check(first, token, "140")
    await approve(first, used.approval_id, ALICE)
    assert (await refund_check(first, token, "140", used.approval_id)).decision == (
        pb.DECISION_ALLOW
    )
    await first.close()
    second = Sidecar.connect(await App.start(settings))
    try:
        again = await refund_check(second, token, "130")
        assert again.approval_id == pending.approval_id
        reused = await refund_check(second, token, "140", used.approval_id)
        assert codes(reused) == ["APPROVAL_CONSUMED"]
    finally:
        await second.close()


async def test_racing_approvers_and_racing_consumers(sidecar: Sidecar) -> None:
    """Two approvers at once both count; two Checks racing to use one approval: one wins."""
    token = sidecar.token()
    needed = await refund_check(sidecar, token, "900")
    results = await asyncio.gather(
        approve(sidecar, needed.approval_id, FRANK), approve(sidecar, needed.approval_id, FIONA)
    )
    assert all(r.counted for r in results)
    final = max(results, key=lambda r: len(r.approval.verdicts)).approval
    assert final.state == ap_pb.APPROVAL_STATE_APPROVED
    racers = await asyncio.gather(
        *(refund_check(sidecar, token, "900", needed.approval_id) for _ in range(10))
    )
    outcomes = sorted(codes(r)[0] for r in racers)
    assert outcomes.count("APPROVAL_GRANTED") == 1
    assert outcomes.count("APPROVAL_CONSUMED") == 9


async def test_every_event_is_audited(sidecar: Sidecar) -> None:
    """Created, each verdict, approved and consumed are audit lines linked by approval id."""
    token = sidecar.token()
    needed = await refund_check(sidecar, token, "120")
    await approve(sidecar, needed.approval_id, ALICE, comment="checked the invoice")
    await refund_check(sidecar, token, "120", needed.approval_id)
    lines = [json.loads(x) for x in sidecar.app.settings.audit_path.read_text().splitlines()]
    events = [
        (r["event"], r["actor"], r["comment"])
        for r in lines
        if r["kind"] == "approval" and r["approval_id"] == needed.approval_id
    ]
    assert events == [
        ("created", BILLING_AGENT, ""),
        ("approve", ALICE, "checked the invoice"),
        ("approved", ALICE, ""),
        ("consumed", BILLING_AGENT, ""),
    ]
    assert all(r["run_id"] == "run-1" for r in lines if r["kind"] == "approval")


async def approve_as_the_agents_owner(sidecar: Sidecar, approval_id: str) -> None:
    """Fiona, a finance approver whose IdP claims say she owns the billing agent, approves."""
    idp = sidecar.app.dev_idp
    assert idp is not None
    owner = idp.mint(
        FIONA, ("finance-approvers",), time.time(), extra={"owns_agents": [BILLING_AGENT]}
    )
    await stub(sidecar).ApproveApproval(
        ap_pb.ApproveApprovalRequest(approval_id=approval_id),
        metadata=(("authorization", f"Bearer {owner}"),),
    )


async def test_the_agents_owner_is_not_an_eligible_approver(sidecar: Sidecar) -> None:
    """The finance tier's approver condition excludes a finance approver who owns the agent."""
    needed = await refund_check(sidecar, sidecar.token(), "900")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await approve_as_the_agents_owner(sidecar, needed.approval_id)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "approver condition" in (caught.value.details() or "")
    idp = sidecar.app.dev_idp
    assert idp is not None
    other = idp.mint(FRANK, ("finance-approvers",), time.time(), extra={"owns_agents": ["x"]})
    counted = await stub(sidecar).ApproveApproval(
        ap_pb.ApproveApprovalRequest(approval_id=needed.approval_id),
        metadata=(("authorization", f"Bearer {other}"),),
    )
    assert counted.counted


@pytest.fixture
async def editable(tmp_path: Path) -> AsyncIterator[Sidecar]:
    """A sidecar on a copy of the example bundle, which the test edits and reloads."""
    policies = tmp_path / "policies"
    shutil.copytree(EXAMPLE_POLICIES, policies)
    running = Sidecar.connect(await App.start(make_settings(tmp_path / "state", policies=policies)))
    try:
        yield running
    finally:
        await running.close()


async def edit_and_reload(sidecar: Sidecar, file: str, old: str, new: str) -> None:
    path = sidecar.app.reloader.directory / file
    text = path.read_text()
    assert old in text, f"{old!r} not in {file}"
    path.write_text(text.replace(old, new))
    _, changed = await sidecar.app.reloader.reload("test")
    assert changed


async def test_a_shortened_ttl_expires_older_requests_and_approvals(editable: Sidecar) -> None:
    """A policy that shortens the tier's TTL (24 h to 1 s) bites on requests made before it:
    an approval given under the old TTL is expired once the new one has run out since the
    request was made, the same call is not handed that request again, and the sweep expires
    such requests (approved or waiting)."""
    token = editable.token()
    needed = await refund_check(editable, token, "120")
    waiting = await refund_check(editable, token, "121")
    await approve(editable, needed.approval_id, ALICE)
    await edit_and_reload(
        editable,
        "billing.yaml",
        "        approver_roles: [billing-supervisor]\n        ttl: 24h\n",
        "        approver_roles: [billing-supervisor]\n        ttl: 1s\n",
    )
    await asyncio.sleep(1.1)
    loaded = editable.app.policy.snapshot()  # the sweep expires the request still waiting
    assert await editable.app.approvals.sweep(loaded.policy, loaded.loaded_at) == 2
    got = await stub(editable).GetApproval(
        ap_pb.GetApprovalRequest(approval_id=waiting.approval_id),
        metadata=identity(editable, ALICE),
    )
    assert got.approval.state == ap_pb.APPROVAL_STATE_EXPIRED
    used = await refund_check(editable, token, "120", needed.approval_id)
    assert codes(used) == ["APPROVAL_EXPIRED"]
    again = await refund_check(editable, token, "120")
    assert again.decision == pb.DECISION_NEEDS_APPROVAL
    assert again.approval_id != needed.approval_id


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        # The group no longer grants the tier's role: alice is no approver any more.
        ("common.yaml", "groups: [billing-supervisors]", "groups: [billing-leads]"),
        # A new approver condition excludes her.
        (
            "billing.yaml",
            "        approver_roles: [billing-supervisor]\n        ttl: 24h\n",
            "        approver_roles: [billing-supervisor]\n        ttl: 24h\n"
            '        approver_condition: approver.subject != "alice@example.com"\n',
        ),
    ],
    ids=["group-removed", "condition-added"],
)
async def test_an_approval_given_under_rules_since_changed_is_not_used(
    editable: Sidecar, file: str, old: str, new: str
) -> None:
    """A reload that takes an approver's right away takes away the approvals already given:
    the presented approval is not used, and the call asks for approval anew."""
    token = editable.token()
    needed = await refund_check(editable, token, "120")
    await approve(editable, needed.approval_id, ALICE)
    await edit_and_reload(editable, file, old, new)

    response = await refund_check(editable, token, "120", needed.approval_id)

    assert response.decision == pb.DECISION_NEEDS_APPROVAL, codes(response)
    assert response.approval_id not in ("", needed.approval_id), "a new request"


async def test_a_request_whose_tier_changed_cannot_be_judged(editable: Sidecar) -> None:
    """A pending request made under other approval rules (the tier renamed, or its approver
    roles changed) is refused to every approver: FAILED_PRECONDITION, nothing counted; the
    agent's next Check opens a request under the current rules, which the right people judge.
    (The owner of the agent, whom the finance tier's approver condition excludes, could
    approve the request once its tier was gone.)"""
    token = editable.token()
    needed = await refund_check(editable, token, "900")
    await edit_and_reload(editable, "billing.yaml", "- name: finance\n", "- name: finance2\n")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await approve_as_the_agents_owner(editable, needed.approval_id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no longer" in (caught.value.details() or "")

    await edit_and_reload(
        editable,
        "billing.yaml",
        "approver_roles: [finance-approver]",
        "approver_roles: [billing-supervisor]",
    )
    renewed = await refund_check(editable, token, "900")
    assert renewed.decision == pb.DECISION_NEEDS_APPROVAL
    assert renewed.approval_id != needed.approval_id, "not the stale request"
    assert list(renewed.approval_requirement.approver_roles) == ["billing-supervisor"]
    counted = await approve(editable, renewed.approval_id, ALICE)
    assert counted.counted


async def test_a_watch_ends_once_the_watcher_may_no_longer_read(editable: Sidecar) -> None:
    """The reader's rights are checked before every batch of changes: after a reload takes
    alice's approver role away, her open stream ends PERMISSION_DENIED instead of sending her
    the next request's arguments."""
    seen: list[ap_pb.WatchApprovalsResponse] = []
    watcher = asyncio.create_task(watch(editable, seen, 2))
    await asyncio.sleep(0.3)
    await refund_check(editable, editable.token(), "120")
    deadline = time.monotonic() + 5
    while not seen:
        assert time.monotonic() < deadline, "the first change never came"
        await asyncio.sleep(0.05)
    await edit_and_reload(
        editable, "common.yaml", "groups: [billing-supervisors]", "groups: [billing-leads]"
    )
    await refund_check(editable, editable.token(), "130")
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(watcher, timeout=5)
    assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [c.event for c in seen] == ["created"], "nothing after the role was taken away"


async def test_the_sweep_expires_requests_made_under_rules_since_changed(
    editable: Sidecar,
) -> None:
    """Requests nobody can judge or use any more do not stay pending for their whole ttl (in
    lists and in proviso_approvals_pending): the sweep expires them, audited; others stay."""
    token = editable.token()
    supervised = await refund_check(editable, token, "120")
    finance = await refund_check(editable, token, "900")
    old = editable.app.policy.snapshot()
    await edit_and_reload(editable, "billing.yaml", "approvals: 2\n", "approvals: 3\n")
    newer = await refund_check(editable, token, "901")  # under the policy now in force

    # A worker still on the old policy (another process, not reloaded yet) leaves alone what
    # was made under the newer one: to it that request only looks stale.
    assert await editable.app.approvals.sweep(old.policy, old.loaded_at) == 0
    loaded = editable.app.policy.snapshot()
    assert await editable.app.approvals.sweep(loaded.policy, loaded.loaded_at) == 1

    listed = await stub(editable).ListApprovals(
        ap_pb.ListApprovalsRequest(state=ap_pb.APPROVAL_STATE_PENDING),
        metadata=identity(editable, ALICE),
    )
    assert {a.approval_id for a in listed.approvals} == {
        supervised.approval_id,
        newer.approval_id,
    }
    got = await stub(editable).GetApproval(
        ap_pb.GetApprovalRequest(approval_id=finance.approval_id),
        metadata=identity(editable, ALICE),
    )
    assert got.approval.state == ap_pb.APPROVAL_STATE_EXPIRED
    expired = [
        line for line in editable.app.settings.audit_path.read_text().splitlines()
        if '"event":"expired"' in line.replace(" ", "")
    ]  # fmt: skip
    assert len(expired) == 1
    assert finance.approval_id in expired[0]


async def test_an_approver_who_becomes_an_issuer_of_the_agent_no_longer_counts(
    editable: Sidecar,
) -> None:
    """Frank approves; a reload makes him an issuer of the agent (he may now mint its tokens):
    his approval no longer counts, so fiona's alone does not approve the two-person tier, and
    the call still needs approval. The same person never both mints the token and approves."""
    token = editable.token()
    needed = await refund_check(editable, token, "900")
    await approve(editable, needed.approval_id, FRANK)
    await edit_and_reload(
        editable,
        "common.yaml",
        "issuers:\n",
        f"issuers:\n  {FRANK}:\n    agents: [{BILLING_AGENT}]\n",
    )
    second = await approve(editable, needed.approval_id, FIONA)
    assert second.counted
    assert second.approval.state == ap_pb.APPROVAL_STATE_PENDING, "frank's no longer counts"
    response = await refund_check(editable, token, "900", needed.approval_id)
    assert response.decision == pb.DECISION_NEEDS_APPROVAL, codes(response)
    assert response.approval_id == needed.approval_id


async def test_an_approval_is_not_used_once_an_approver_became_an_issuer(
    editable: Sidecar,
) -> None:
    """Approved by frank and fiona; a reload makes frank an issuer of the agent: the approval
    no longer has two approvers who count, so it is not used and the call asks again."""
    token = editable.token()
    needed = await refund_check(editable, token, "900")
    await approve(editable, needed.approval_id, FRANK)
    approved = await approve(editable, needed.approval_id, FIONA)
    assert approved.approval.state == ap_pb.APPROVAL_STATE_APPROVED
    await edit_and_reload(
        editable,
        "common.yaml",
        "issuers:\n",
        f"issuers:\n  {FRANK}:\n    agents: [{BILLING_AGENT}]\n",
    )
    response = await refund_check(editable, token, "900", needed.approval_id)
    assert response.decision == pb.DECISION_NEEDS_APPROVAL, codes(response)
    assert response.approval_id not in ("", needed.approval_id)


async def test_a_watch_ends_when_the_watchers_identity_token_expires(sidecar: Sidecar) -> None:
    """The stream is no longer than the identity that opened it: once the token's exp (and
    the leeway that verification allows, 5 s) has passed it ends UNAUTHENTICATED (checked
    before every batch, without verifying the JWT again)."""
    idp = sidecar.app.dev_idp
    assert idp is not None
    # Expired 4 s ago: still inside the leeway when the stream opens, out of it in 1 s.
    short = idp.mint(ALICE, ("billing-supervisors",), time.time() - 6, ttl_seconds=2)
    call = stub(sidecar).WatchApprovals(
        ap_pb.WatchApprovalsRequest(), metadata=(("authorization", f"Bearer {short}"),)
    )
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        async for _ in call:
            pass
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (ended.value.details() or "")
    assert time.monotonic() - started < 3


async def test_the_pruner_logs_a_failed_sweep_and_still_prunes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One failing step of the minutely pruning (here the approvals sweep, made to fail) is
    logged, and the next steps still run: expired idempotency keys are dropped."""
    monkeypatch.setattr("sidecar.app.PRUNE_INTERVAL_SECONDS", 0.05)
    sidecar = Sidecar.connect(await App.start(make_settings(tmp_path / "state")))
    try:

        async def broken_sweep(*_: object) -> int:
            raise RuntimeError("sweep broke")

        monkeypatch.setattr(sidecar.app.approvals, "sweep", broken_sweep)
        pruned: list[int] = []
        store = sidecar.app.store
        real_prune = store.prune

        def counting_prune(now: float) -> int:
            pruned.append(real_prune(now))
            return pruned[-1]

        monkeypatch.setattr(store, "prune", counting_prune)
        deadline = time.monotonic() + 5
        while not pruned:
            assert time.monotonic() < deadline, "prune never ran after the sweep failed"
            await asyncio.sleep(0.02)
    finally:
        await sidecar.close()
    assert "expiring approval requests failed" in caplog.text
    assert "sweep broke" in caplog.text


async def test_an_agent_cannot_open_approval_requests_without_bound(sidecar: Sidecar) -> None:
    """Each distinct call opens a request for people to read: an agent (or the model driving
    it) varying a free-text argument must not flood the approvers' queue. Past the cap of
    pending requests per agent a new one is refused (APPROVALS_PENDING_LIMIT, not remembered
    under the idempotency key); a call whose request is open still gets its id; closing one
    frees room."""
    token = sidecar.token()
    opened = [
        await refund_check(
            sidecar, token, "120", arguments_json=refund("120", reason=f"attempt {i}")
        )
        for i in range(MAX_PENDING_APPROVALS_PER_AGENT)
    ]
    assert {r.decision for r in opened} == {pb.DECISION_NEEDS_APPROVAL}
    assert len({r.approval_id for r in opened}) == MAX_PENDING_APPROVALS_PER_AGENT
    over = await refund_check(
        sidecar, token, "120", arguments_json=refund("120", reason="one more"), idempotency_key="K"
    )
    assert over.decision == pb.DECISION_DENY
    assert codes(over) == ["APPROVALS_PENDING_LIMIT"]
    assert not over.approval_id
    again = await refund_check(
        sidecar, token, "120", arguments_json=refund("120", reason="attempt 0")
    )
    assert again.approval_id == opened[0].approval_id, "an open request is still found"
    listed = await stub(sidecar).ListApprovals(
        ap_pb.ListApprovalsRequest(page_size=500), metadata=identity(sidecar, ALICE)
    )
    assert len(listed.approvals) == MAX_PENDING_APPROVALS_PER_AGENT
    await stub(sidecar).RejectApproval(
        ap_pb.RejectApprovalRequest(approval_id=opened[0].approval_id),
        metadata=identity(sidecar, ALICE),
    )
    room = await refund_check(
        sidecar, token, "120", arguments_json=refund("120", reason="one more"), idempotency_key="K"
    )
    assert room.decision == pb.DECISION_NEEDS_APPROVAL
    assert room.approval_id
    assert not room.replayed
