"""Overload and deadlines: a bounded number of Checks in flight, and no answer after the deadline.

The audit write is held back (so Checks stay in flight as long as the test wants); beyond the
limit a Check is refused at once with RESOURCE_EXHAUSTED, and a caller whose deadline passes
gets DEADLINE_EXCEEDED, promptly, never an ALLOW.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar._proto.proviso.v1 import authorization_service_pb2 as pb
from sidecar.app import App
from sidecar.audit.writer import AuditLog, Receipt
from tests.conftest import Sidecar, make_settings
from tests.integration.test_check import INVOICE_CONTEXT, refund

LIMIT = 3


@pytest.fixture
async def held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Sidecar, asyncio.Event]]:
    """A sidecar (at most LIMIT Checks in flight) whose audit writes wait for an event."""
    release = asyncio.Event()
    enqueue = AuditLog.enqueue

    def held_enqueue(
        self: AuditLog, body: Mapping[str, Any], *, gathered: bool = False
    ) -> asyncio.Future[Receipt]:
        if body.get("kind") != "decision":
            return enqueue(self, body, gathered=gathered)

        async def when_released() -> Receipt:
            await release.wait()
            return await enqueue(self, body)  # alone: its batch's send_gathered came long ago

        return asyncio.ensure_future(when_released())

    monkeypatch.setattr(AuditLog, "enqueue", held_enqueue)
    app = await App.start(make_settings(tmp_path / "state", max_in_flight=LIMIT))
    running = Sidecar.connect(app)
    try:
        yield running, release
    finally:
        release.set()
        await running.close()


def _request(token: str, i: int) -> pb.CheckRequest:
    return pb.CheckRequest(
        token=token, tool="requestRefund", arguments_json=refund("10"),
        context_json=INVOICE_CONTEXT, run_id=f"run-{i}", idempotency_key=f"k-{i}",
    )  # fmt: skip


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_checks_beyond_the_limit_are_refused_at_once(
    held: tuple[Sidecar, asyncio.Event],
) -> None:
    """With LIMIT Checks in flight, one more is RESOURCE_EXHAUSTED at once; the others finish."""
    sidecar, release = held
    token = sidecar.token()
    in_flight = [
        asyncio.ensure_future(sidecar.authz.Check(_request(token, i), timeout=10))
        for i in range(LIMIT)
    ]
    metrics = sidecar.app.metrics
    await _until(lambda: metrics.checks_in_flight._value.get() == LIMIT)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await sidecar.authz.Check(_request(token, 99), timeout=10)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - started < 1.0, "refused at once, not queued"
    assert metrics.checks_rejected._value.get() == 1
    release.set()
    answers = await asyncio.gather(*in_flight)
    assert [a.decision for a in answers] == [pb.DECISION_ALLOW] * LIMIT
    again = await sidecar.authz.Check(_request(token, 100), timeout=10)
    assert again.decision == pb.DECISION_ALLOW, "the limit frees up once calls finish"


async def test_a_deadline_that_passes_gets_no_allow_and_no_hang(
    held: tuple[Sidecar, asyncio.Event],
) -> None:
    """A caller whose deadline passes mid-Check gets DEADLINE_EXCEEDED promptly; the slot frees."""
    sidecar, release = held
    token = sidecar.token()
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await sidecar.authz.Check(_request(token, 1), timeout=0.3)
    assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0
    metrics = sidecar.app.metrics
    await _until(lambda: metrics.checks_in_flight._value.get() == 0)
    release.set()
    answer = await sidecar.authz.Check(_request(token, 2), timeout=10)
    assert answer.decision == pb.DECISION_ALLOW


async def test_an_expired_deadline_is_not_decided(tmp_path: Path) -> None:
    """A Check that arrives with its deadline already gone is refused without a decision."""
    running = Sidecar.connect(await App.start(make_settings(tmp_path / "state")))
    try:
        token = running.token()
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await running.authz.Check(_request(token, 1), timeout=0.000001)
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        counted = [m.samples for m in running.app.metrics.decisions.collect()]
        assert not [s for samples in counted for s in samples if s.value]
    finally:
        await running.close()
