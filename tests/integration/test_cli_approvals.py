"""`proviso approvals` as an approver runs it: every page, and verdicts that did not count."""

from __future__ import annotations

import asyncio
import json

from sidecar._proto.proviso.v1 import authorization_service_pb2 as pb
from tests.conftest import Sidecar
from tests.integration.test_check import check, refund
from tests.integration.test_cli import run


async def _pending(sidecar: Sidecar, *amounts: str) -> list[str]:
    """One pending approval request per refund amount; their ids."""
    token = sidecar.token()
    ids = []
    for amount in amounts:
        response = await check(sidecar, token, "requestRefund", refund(amount))
        assert response.decision == pb.DECISION_NEEDS_APPROVAL, response
        ids.append(response.approval_id)
    return ids


def _as(sidecar: Sidecar, subject: str) -> list[str]:
    state = str(sidecar.app.settings.state_dir)
    return ["--target", sidecar.target, "--state-dir", state, "--as", subject]


async def test_approvals_list_says_there_are_more_and_pages_on(sidecar: Sidecar) -> None:
    """A first page that is not the last says so (a --page-token hint on stderr, in both
    formats: the JSON list stays a bare array); --page-token gives the rest."""
    ids = await _pending(sidecar, "120", "130", "140")
    alice = _as(sidecar, "alice@example.com")
    first = await asyncio.to_thread(run, "approvals", "list", "--page-size", "2", *alice)
    assert first.returncode == 0, first.stderr
    hint = first.stderr.strip().splitlines()[-1]
    assert hint.startswith("proviso: more requests: --page-token "), first.stderr
    page_token = hint.rsplit(" ", 1)[1]
    shown = await asyncio.to_thread(
        run, "approvals", "list", "--page-size", "2", "--format", "json", *alice
    )
    listed = json.loads(shown.stdout)
    assert shown.stderr.strip().splitlines()[-1] == hint, "JSON stays an array; hint on stderr"
    seen = [row["approval_id"] for row in listed]
    assert len(seen) == 2
    rest = await asyncio.to_thread(
        run, "approvals", "list", "--page-size", "2", "--page-token", page_token, *alice
    )
    assert rest.returncode == 0, rest.stderr
    assert "more requests" not in rest.stderr
    seen += [i for i in ids if i in rest.stdout]
    assert sorted(seen) == sorted(ids)
    last = await asyncio.to_thread(
        run, "approvals", "list", "--page-size", "2", "--page-token", page_token,
        "--format", "json", *alice,
    )  # fmt: skip
    assert len(json.loads(last.stdout)) == 1
    assert "more requests" not in last.stderr


async def test_a_second_verdict_by_the_same_person_exits_1(sidecar: Sidecar) -> None:
    """Approving and then rejecting (or approving twice) counts once: the second command says
    so, names the verdict that stands, and exits 1; the request is unchanged."""
    (approval_id,) = await _pending(sidecar, "1000")  # the finance tier: two approvals
    frank = _as(sidecar, "frank@example.com")
    approved = await asyncio.to_thread(
        run, "approvals", "approve", approval_id, "--comment", "checked the invoice", *frank
    )
    assert approved.returncode == 0, approved.stderr
    for command in ("reject", "approve"):
        again = await asyncio.to_thread(run, "approvals", command, approval_id, *frank)
        assert again.returncode == 1, (command, again.stdout, again.stderr)
        assert "you had already given a verdict" in again.stderr
        assert "frank@example.com approved it at " in again.stderr
        assert "'checked the invoice'" in again.stderr
        assert "pending" in again.stdout, "the request is shown as it stands"
    fiona = await asyncio.to_thread(
        run, "approvals", "reject", approval_id, *_as(sidecar, "fiona@example.com")
    )
    assert fiona.returncode == 0, fiona.stderr
    assert "already" not in fiona.stderr


async def test_approve_shows_the_call_and_can_insist_on_its_arguments(sidecar: Sidecar) -> None:
    """The approver sees the exact call judged (arguments and run, not only the agent and the
    tool the list shows), and ``--args-digest`` (as ``show`` prints it) judges only that call:
    a wrong or mistyped id names another call, which is then left alone (exit 1)."""
    first, other = await _pending(sidecar, "120", "130")
    alice = _as(sidecar, "alice@example.com")
    shown = await asyncio.to_thread(run, "approvals", "show", first, "--format", "json", *alice)
    digest = json.loads(shown.stdout)["args_digest"]
    wrong = await asyncio.to_thread(
        run, "approvals", "approve", other, "--args-digest", digest, *alice
    )
    assert wrong.returncode == 1, (wrong.stdout, wrong.stderr)
    assert "not the call" in wrong.stderr
    untouched = await asyncio.to_thread(run, "approvals", "show", other, *alice)
    assert '"verdicts"' not in untouched.stdout, "no verdict was recorded"
    bare = digest.removeprefix("sha256:").upper()  # as copied from elsewhere: still that call
    approved = await asyncio.to_thread(
        run, "approvals", "approve", first, "--args-digest", bare, *alice
    )
    assert approved.returncode == 0, approved.stderr
    assert '"amount":120' in approved.stdout, approved.stdout
    assert "run-1" in approved.stdout
