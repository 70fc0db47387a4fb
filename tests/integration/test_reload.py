"""Hot reload over real gRPC: ReloadPolicy, the directory watcher, and reload under load."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sidecar._proto.proviso.v1 import admin_service_pb2 as admin_pb
from sidecar._proto.proviso.v1 import admin_service_pb2_grpc as admin_grpc
from sidecar._proto.proviso.v1 import authorization_service_pb2 as pb
from sidecar.app import App
from sidecar.policy.loader import load_policy
from sidecar.policy.model import Policy
from tests.conftest import EXAMPLE_POLICIES, Sidecar, make_settings
from tests.integration.test_check import check, refund
from tests.integration.test_server import identity, scrape

ADMIN = "olivia@example.com"
AUTO_LIMIT = "      - name: auto\n        when: args.amount <= 50\n"
LABEL = "label: examples-2026-11\n"


def copy_bundle(destination: Path) -> Path:
    """A private copy of the example policy (policy files only)."""
    shutil.copytree(EXAMPLE_POLICIES, destination, ignore=shutil.ignore_patterns("*.md", "*_t*"))
    return destination


def write(path: Path, text: str) -> None:
    """Replace a file atomically, as a deploy tool would (no reader sees half of it)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def set_variant(bundle: Path, *, auto_limit: int, label: str) -> None:
    """Rewrite two files of the bundle: the refund auto-approve limit and the label."""
    billing = (EXAMPLE_POLICIES / "billing.yaml").read_text()
    common = (EXAMPLE_POLICIES / "common.yaml").read_text()
    assert AUTO_LIMIT in billing
    assert LABEL in common
    write(
        bundle / "billing.yaml",
        billing.replace(AUTO_LIMIT, AUTO_LIMIT.replace("50", str(auto_limit))),
    )
    write(bundle / "common.yaml", common.replace(LABEL, f"label: {label}\n"))


def version_of(auto_limit: int, label: str, scratch: Path) -> str:
    """The version a bundle variant loads as (a content hash: the same wherever it lives)."""
    bundle = copy_bundle(scratch)
    set_variant(bundle, auto_limit=auto_limit, label=label)
    return load_policy(bundle).version


@pytest.fixture
async def reloadable(tmp_path: Path) -> AsyncIterator[Sidecar]:
    """A sidecar serving a private copy of the examples, with the watcher off."""
    bundle = copy_bundle(tmp_path / "bundle")
    settings = make_settings(tmp_path / "state", policies=bundle, watch_interval_seconds=0)
    running = Sidecar.connect(await App.start(settings))
    try:
        yield running
    finally:
        await running.close()


def admin_stub(sidecar: Sidecar) -> admin_grpc.AdminServiceAsyncStub:
    return admin_grpc.AdminServiceStub(sidecar.channel)


async def reload(sidecar: Sidecar) -> admin_pb.ReloadPolicyResponse:
    return await admin_stub(sidecar).ReloadPolicy(
        admin_pb.ReloadPolicyRequest(), metadata=identity(sidecar, ADMIN)
    )


def reload_count(sidecar: Sidecar, result: str, bundle: str = "active") -> float:
    labels = (("bundle", bundle), ("result", result))
    return scrape(sidecar).get(("proviso_policy_reload_total", labels), 0.0)


async def test_reload_swaps_in_the_new_version(reloadable: Sidecar) -> None:
    """After an edit, ReloadPolicy puts the new version in force and Checks use it."""
    bundle = reloadable.app.settings.policies
    old = reloadable.app.policy.current
    before = await check(reloadable, reloadable.token(), "requestRefund", refund("75"))
    assert (before.decision, before.policy_version) == (pb.DECISION_NEEDS_APPROVAL, old.version)
    set_variant(bundle, auto_limit=100, label="raised-auto-limit")
    response = await reload(reloadable)
    assert response.changed
    assert response.policy.version != old.version
    assert response.policy.label == "raised-auto-limit"
    assert response.policy.load_time.seconds >= int(time.time()) - 60
    after = await check(reloadable, reloadable.token(), "requestRefund", refund("75"))
    assert (after.decision, after.matched_tier) == (pb.DECISION_ALLOW, "auto")
    assert after.policy_version == response.policy.version
    got = await admin_stub(reloadable).GetPolicy(
        admin_pb.GetPolicyRequest(), metadata=identity(reloadable, ADMIN)
    )
    assert got.policy.version == response.policy.version
    samples = scrape(reloadable)
    assert reload_count(reloadable, "success") == 1
    info = (("label", "raised-auto-limit"), ("version", response.policy.version))
    assert samples[("proviso_policy_info", info)] == 1
    stale = (("label", old.label), ("version", old.version))
    assert ("proviso_policy_info", stale) not in samples, "only the version in force is info"


async def test_reload_without_a_change_keeps_the_version(reloadable: Sidecar) -> None:
    """Reloading identical content reports no change and keeps the load time."""
    loaded_at = reloadable.app.policy.loaded_at
    response = await reload(reloadable)
    assert not response.changed
    assert response.policy.version == reloadable.app.policy.current.version
    assert reloadable.app.policy.loaded_at == loaded_at
    assert reload_count(reloadable, "unchanged") == 1


async def test_a_broken_edit_keeps_the_old_version_serving(
    reloadable: Sidecar, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle with errors is refused with file:line; the old version serves; the metric moves.
    The log line holds the first issues (here made one) and how many there are."""
    monkeypatch.setattr("sidecar.reloader.MAX_LOGGED_ISSUES", 1)
    old = reloadable.app.policy.current.version
    billing = reloadable.app.settings.policies / "billing.yaml"
    write(billing, billing.read_text().replace("    roles: [billing-resolution]", "    rolez: []"))
    with (
        caplog.at_level(logging.ERROR, logger="proviso.reload"),
        pytest.raises(grpc.aio.AioRpcError) as caught,
    ):
        await reload(reloadable)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(caught.value)
    assert status is not None
    failure = error_details_pb2.PreconditionFailure()
    assert status.details[0].Unpack(failure)
    assert [(v.type, v.subject) for v in failure.violations] == [
        ("MISSING_FIELD", "billing.yaml:3:3"),
        ("UNKNOWN_FIELD", "billing.yaml:4:5"),
    ]
    assert "did you mean 'roles'" in failure.violations[1].description
    [record] = [r for r in caplog.records if r.name == "proviso.reload"]
    assert len(record.issues) == 1  # type: ignore[attr-defined]
    assert record.issues[0].startswith("billing.yaml:3:3: error MISSING_FIELD")  # type: ignore[attr-defined]
    assert record.issue_count == 2  # type: ignore[attr-defined]
    assert reload_count(reloadable, "error") == 1
    response = await check(reloadable, reloadable.token(), "requestRefund", refund("10"))
    assert (response.decision, response.policy_version) == (pb.DECISION_ALLOW, old)


async def test_a_reload_that_read_an_edit_in_progress_reads_again(
    reloadable: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file caught half written (an editor saving in place) made the load fail, and the
    refusal stood: the watcher does not retry content it saw refused, though what it refused
    was never on disk. A failed load whose files changed while they were read is read again,
    as a successful one is."""
    bundle = reloadable.app.settings.policies
    set_variant(bundle, auto_limit=100, label="saved-in-place")
    billing = bundle / "billing.yaml"
    saved = billing.read_text()
    loads: list[str] = []

    def load_during_a_save(directory: Path) -> Policy:
        if not loads:
            billing.write_text(saved[: len(saved) // 2])  # the editor has written half
            try:
                return load_policy(directory)
            finally:
                loads.append("torn")
                billing.write_text(saved)  # and then the rest
        loads.append("whole")
        return load_policy(directory)

    monkeypatch.setattr("sidecar.reloader.load_policy", load_during_a_save)
    response = await reload(reloadable)
    assert loads == ["torn", "whole"]
    assert (response.changed, response.policy.label) == (True, "saved-in-place")
    assert reload_count(reloadable, "error") == 0


async def test_a_refusal_with_many_errors_still_reaches_the_caller(reloadable: Sidecar) -> None:
    """The errors travel in the status trailer, which gRPC clients refuse past 8-16 KiB: with
    a few dozen errors (a role renamed everywhere but where it is defined) the caller got
    RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" and no file:line at all.
    The first errors are listed, and the message says how many there are."""
    bundle = reloadable.app.settings.policies
    broken = "".join(
        f"  bad{i}:\n    arguments: {{type: object}}\n"
        f"    tiers:\n      - {{name: a, when: 'args.x <=', action: allow}}\n"
        for i in range(300)
    )
    write(bundle / "broken.yaml", "tools:\n" + broken)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reload(reloadable)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has 300 error(s)" in str(caught.value.details())
    status = rpc_status.from_call(caught.value)
    assert status is not None
    failure = error_details_pb2.PreconditionFailure()
    assert status.details[0].Unpack(failure)
    assert 0 < len(failure.violations) < 300
    assert failure.violations[0].subject == "broken.yaml:5:35"
    assert f"the first {len(failure.violations)} are listed" in str(caught.value.details())

    huge = "k" * 100_000  # one error quoting a 100 KB key still reaches the caller, cut short
    write(bundle / "broken.yaml", f"tools:\n  ? {huge}\n  : {{tiers: []}}\n")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reload(reloadable)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(caught.value)
    assert status is not None
    assert status.details[0].Unpack(failure)
    assert failure.violations
    assert all(len(v.description) <= 512 for v in failure.violations)


async def test_reload_needs_an_admin(reloadable: Sidecar) -> None:
    """Only an admin identity may reload the policy."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin_stub(reloadable).ReloadPolicy(
            admin_pb.ReloadPolicyRequest(), metadata=identity(reloadable, "alice@example.com")
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reload_count(reloadable, "success") == 0


async def wait_for(predicate: object, timeout: float = 10.0) -> None:
    """Poll ``predicate`` (a callable) until it is true, or fail after ``timeout`` seconds."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_the_watcher_reloads_edits_and_refuses_broken_ones(tmp_path: Path) -> None:
    """With the watcher on, an edit is picked up by itself; a broken one is refused once."""
    bundle = copy_bundle(tmp_path / "bundle")
    settings = make_settings(tmp_path / "state", policies=bundle, watch_interval_seconds=0.05)
    sidecar = Sidecar.connect(await App.start(settings))
    try:
        old = sidecar.app.policy.current.version
        set_variant(bundle, auto_limit=100, label="watched")
        await wait_for(lambda: sidecar.app.policy.current.version != old)
        assert sidecar.app.policy.current.label == "watched"
        edited = sidecar.app.policy.current.version
        (bundle / "broken.yaml").write_text("tools: [\n")
        await wait_for(lambda: reload_count(sidecar, "error") >= 1)
        await asyncio.sleep(0.3)  # several more polls of the same broken content
        assert reload_count(sidecar, "error") == 1, "the same broken content is not retried"
        assert sidecar.app.policy.current.version == edited
        response = await check(sidecar, sidecar.token(), "requestRefund", refund("75"))
        assert (response.decision, response.policy_version) == (pb.DECISION_ALLOW, edited)
    finally:
        await sidecar.close()


async def test_fifty_reloads_under_load_never_mix_versions(
    reloadable: Sidecar, tmp_path: Path
) -> None:
    """Checks hammered during 50 reloads each match the tier of the version they name."""
    versions = {
        version_of(50, "a", tmp_path / "a"): (pb.DECISION_NEEDS_APPROVAL, "supervisor"),
        version_of(100, "b", tmp_path / "b"): (pb.DECISION_ALLOW, "auto"),
    }
    version_a, version_b = versions
    start = reloadable.app.policy.current.version  # the examples: 75 needs a supervisor too
    versions[start] = (pb.DECISION_NEEDS_APPROVAL, "supervisor")
    bundle = reloadable.app.settings.policies
    token = reloadable.token()
    seen: list[pb.CheckResponse] = []
    done = asyncio.Event()

    async def hammer() -> None:
        while not done.is_set():
            run_id = f"run-{len(seen)}-{time.monotonic_ns()}"
            seen.append(
                await check(reloadable, token, "requestRefund", refund("75"), run_id=run_id)
            )

    async def reload_fifty_times() -> None:
        try:
            for index in range(50):
                limit, label, expected = (
                    (50, "a", version_a) if index % 2 else (100, "b", version_b)
                )
                set_variant(bundle, auto_limit=limit, label=label)
                response = await reload(reloadable)
                assert (response.changed, response.policy.version) == (True, expected)
                await asyncio.sleep(0.005)
        finally:
            done.set()

    await asyncio.gather(reload_fifty_times(), *(hammer() for _ in range(4)))
    assert reload_count(reloadable, "success") == 50
    counts = {version: 0 for version in versions}
    for response in seen:
        assert response.policy_version in versions, f"unknown version {response.policy_version}"
        expected = versions[response.policy_version]
        decision = response.decision
        if [r.code for r in response.reasons] == [pb.REASON_CODE_APPROVALS_PENDING_LIMIT]:
            # Each Check is a run of its own, so each needing approval opens a request: past
            # the agent's cap of pending ones the approval tier answers DENY instead.
            decision = pb.DECISION_NEEDS_APPROVAL
        assert (decision, response.matched_tier) == expected, response
        counts[response.policy_version] += 1
    assert counts[version_a] >= 10, counts
    assert counts[version_b] >= 10, counts
