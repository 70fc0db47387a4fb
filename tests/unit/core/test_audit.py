"""The audit log (group-commit writer thread) and the JSON line of one record."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import pytest

from sidecar import strictjson
from sidecar.audit import writer
from sidecar.audit.record import AuditRecord
from sidecar.audit.writer import AuditLog
from sidecar.engine import ApprovalRequirement, Decision, Outcome, Reason, ReasonCode
from sidecar.errors import AuditWriteError

REAL_WRITE: Final = os.write
REAL_FSYNC: Final = os.fsync


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    """An audit log in a fresh directory, closed after the test."""
    audit = AuditLog(tmp_path / "audit" / "decisions.jsonl")
    try:
        yield audit
    finally:
        audit.close()


class _PatchedOS:
    """The ``os`` module as the writer sees it, with ``write``/``fsync`` replaceable."""

    def __init__(self) -> None:
        self.write: Callable[[int, Any], int] = REAL_WRITE
        self.fsync: Callable[[Any], None] = REAL_FSYNC

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


# --- AuditLog ---------------------------------------------------------------------------------


async def test_concurrent_appends_land_whole_in_order_of_completion(log: AuditLog) -> None:
    """Lines appended by many tasks at once are all in the file, whole, in completion order."""
    completed: list[bytes] = []

    async def one(index: int) -> None:
        line = json.dumps({"i": index, "pad": "x" * (index % 50)}).encode() + b"\n"
        await log.append(line)
        completed.append(line)

    await asyncio.gather(*(one(i) for i in range(300)))
    data = log.path.read_bytes()
    lines = data.splitlines(keepends=True)
    assert len(lines) == 300
    assert lines == completed
    assert sorted(json.loads(line)["i"] for line in lines) == list(range(300))


async def test_a_returned_append_is_already_in_the_file(log: AuditLog) -> None:
    """When append returns, the line can be read back."""
    await log.append(b'{"first":1}\n')
    assert log.path.read_bytes() == b'{"first":1}\n'
    await log.append(b'{"second":2}\n')
    assert log.path.read_bytes() == b'{"first":1}\n{"second":2}\n'


def test_the_file_is_private_and_appended_to(tmp_path: Path) -> None:
    """The audit file is created with mode 0600, and a reopened log appends, never truncates."""
    path = tmp_path / "deep" / "dir" / "audit.jsonl"
    first = AuditLog(path)
    first.submit(b"one\n").result(timeout=5)
    first.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = AuditLog(path)
    second.submit(b"two\n").result(timeout=5)
    second.close()
    assert path.read_bytes() == b"one\ntwo\n"


async def test_a_full_disk_fails_every_line_of_the_batch() -> None:
    """Writing to /dev/full raises AuditWriteError for every appended line."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    full = AuditLog(Path("/dev/full"))
    try:
        results = await asyncio.gather(
            *(full.append(b"line %d\n" % i) for i in range(20)), return_exceptions=True
        )
    finally:
        full.close()
    assert len(results) == 20
    assert all(isinstance(r, AuditWriteError) for r in results)
    assert "audit write failed" in str(results[0])


async def test_a_torn_write_is_cut_off_and_the_log_recovers(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that fails after writing half leaves no partial line; later lines land whole."""
    await log.append(b'{"before":1}\n')
    patched = _PatchedOS()
    calls = 0

    def half_then_enospc(fd: int, data: bytes | memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return REAL_WRITE(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    patched.write = half_then_enospc
    monkeypatch.setattr(writer, "os", patched)
    with pytest.raises(AuditWriteError, match="No space left"):
        await log.append(b'{"torn":"' + b"x" * 200 + b'"}\n')
    assert calls == 2
    assert log.path.read_bytes() == b'{"before":1}\n'

    patched.write = REAL_WRITE
    await log.append(b'{"after":1}\n')
    assert log.path.read_bytes() == b'{"before":1}\n{"after":1}\n'


async def test_a_failed_fsync_fails_the_line_and_cuts_it_off(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line written but not synced is not durable: it fails, and is removed from the file."""
    patched = _PatchedOS()

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    patched.fsync = failing_fsync
    monkeypatch.setattr(writer, "os", patched)
    with pytest.raises(AuditWriteError, match="Input/output error"):
        await log.append(b"unsynced\n")
    assert log.path.read_bytes() == b""


def test_close_drains_queued_lines(tmp_path: Path) -> None:
    """Lines queued before close are written before the file closes."""
    audit = AuditLog(tmp_path / "a.jsonl")
    futures = [audit.submit(b"%d\n" % i) for i in range(200)]
    audit.close()
    assert all(f.done() and f.exception() is None for f in futures)
    assert audit.path.read_bytes().splitlines() == [b"%d" % i for i in range(200)]


async def test_append_after_close_raises(tmp_path: Path) -> None:
    """A closed log refuses appends with AuditWriteError and writes nothing."""
    audit = AuditLog(tmp_path / "a.jsonl")
    audit.close()
    audit.close()  # closing twice is harmless
    with pytest.raises(AuditWriteError, match="closed"):
        await audit.append(b"late\n")
    assert audit.path.read_bytes() == b""


def test_a_batch_never_exceeds_max_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With max_batch=4, no single write+fsync covers more than four lines."""
    patched = _PatchedOS()
    gate = threading.Event()
    sizes: list[int] = []

    def counting_write(fd: int, data: bytes | memoryview) -> int:
        gate.wait(5)
        sizes.append(bytes(data).count(b"\n"))
        return REAL_WRITE(fd, data)

    patched.write = counting_write
    monkeypatch.setattr(writer, "os", patched)
    audit = AuditLog(tmp_path / "a.jsonl", max_batch=4)
    futures = [audit.submit(b"%d\n" % i) for i in range(10)]
    gate.set()
    audit.close()
    assert all(f.exception() is None for f in futures)
    assert sum(sizes) == 10
    assert max(sizes) <= 4


async def test_a_cancelled_append_does_not_stop_the_writer(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling one waiting append (client gone) must not wedge the lines after it."""
    patched = _PatchedOS()
    entered, release = threading.Event(), threading.Event()

    def slow_first_fsync(fd: int) -> None:
        if not entered.is_set():
            entered.set()
            release.wait(5)
        REAL_FSYNC(fd)

    patched.fsync = slow_first_fsync
    monkeypatch.setattr(writer, "os", patched)
    # The writer thread dies with an unhandled exception; keep it out of pytest's hook.
    monkeypatch.setattr(threading, "excepthook", lambda args: None)

    first = asyncio.ensure_future(log.append(b"first\n"))
    await asyncio.to_thread(entered.wait, 5)  # the writer is now busy with the first line
    doomed = asyncio.ensure_future(log.append(b"doomed\n"))
    survivor = asyncio.ensure_future(log.append(b"survivor\n"))
    await asyncio.sleep(0)  # both lines are queued behind the first
    doomed.cancel()
    release.set()
    await first
    await asyncio.wait_for(survivor, timeout=0.5)
    await asyncio.wait_for(log.append(b"later\n"), timeout=0.5)
    assert log.path.read_bytes().endswith(b"survivor\nlater\n")


# --- AuditRecord ------------------------------------------------------------------------------


def _decision(**overrides: Any) -> Decision:
    values: dict[str, Any] = {
        "outcome": Outcome.NEEDS_APPROVAL,
        "reasons": (Reason(ReasonCode.APPROVAL_REQUIRED, "needs\none approval", ""),),
        "policy_version": "abc123",
        "matched_tier": "supervisor",
        "approval": ApprovalRequirement("supervisor", 1, ("billing-supervisor",), 86400),
        "agent": "billing@service",
        "token_id": "tok-1",
    }
    values.update(overrides)
    return Decision(**values)


def _record(decision: Decision, arguments_json: str, **overrides: Any) -> AuditRecord:
    arguments = strictjson.parse_object(arguments_json)
    values: dict[str, Any] = {
        "record_id": "dec_1",
        "time": "2026-01-01T00:00:00Z",
        "decision": decision,
        "tool": "requestRefund",
        "args_digest": strictjson.digest(arguments),
        "arguments_canonical": strictjson.canonical(arguments),
        "latency_ms": 1.23456,
        "run_id": "run-1",
        "run_metadata": {"model": "m-1"},
    }
    values.update(overrides)
    return AuditRecord(**values)


def test_a_record_is_one_line_of_valid_json() -> None:
    """to_json_line is exactly one newline-terminated line of JSON, even with newlines inside."""
    line = _record(_decision(), '{"reason": "a\\nb", "amount": 1}').to_json_line()
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    body = json.loads(line)
    assert body["kind"] == "decision"
    assert body["arguments"] == {"reason": "a\nb", "amount": 1}
    assert body["reasons"] == [
        {"code": "APPROVAL_REQUIRED", "message": "needs\none approval", "field": ""}
    ]


def test_decimal_arguments_keep_their_exact_value() -> None:
    """An amount sent as 10.50 is 10.5 exactly in the record, read with parse_float=Decimal."""
    line = _record(
        _decision(), '{"amount": 10.50, "tiny": 0.1, "big": 12345678901234567.89}'
    ).to_json_line()
    arguments = json.loads(line, parse_float=Decimal)["arguments"]
    assert arguments["amount"] == Decimal("10.5")
    assert str(arguments["amount"]) == "10.5"
    assert arguments["tiny"] == Decimal("0.1")
    assert arguments["big"] == Decimal("12345678901234567.89")
    assert b'"amount":10.5' in line


def test_a_record_carries_the_decision_and_the_call() -> None:
    """The line names decision, reasons, tier, policy version, agent, token, digest and run."""
    record = _record(_decision(), '{"amount": 10.50}', step_id="s-2", dry_run=True)
    body = json.loads(record.to_json_line())
    assert body["decision"] == "NEEDS_APPROVAL"
    assert body["matched_tier"] == "supervisor"
    assert body["policy_version"] == "abc123"
    assert (body["agent"], body["token_id"]) == ("billing@service", "tok-1")
    assert body["args_digest"] == strictjson.digest({"amount": Decimal("10.5")})
    assert (body["run_id"], body["step_id"], body["dry_run"]) == ("run-1", "s-2", True)
    assert body["run_metadata"] == {"model": "m-1"}
    assert body["latency_ms"] == 1.235
    assert body["approval_requirement"] == {
        "tier": "supervisor",
        "approvals_required": 1,
        "approver_roles": ["billing-supervisor"],
        "ttl_seconds": 86400,
    }


def test_a_record_without_approval_has_no_requirement() -> None:
    """An ALLOW or DENY record has no approval_requirement member."""
    decision = _decision(
        outcome=Outcome.ALLOW,
        reasons=(Reason(ReasonCode.TIER_ALLOWED, "ok"),),
        approval=None,
        matched_tier="auto",
    )
    body = json.loads(_record(decision, "{}").to_json_line())
    assert "approval_requirement" not in body
    assert body["arguments"] == {}


def test_non_ascii_is_written_as_utf8() -> None:
    """Non-ASCII text in arguments and messages is UTF-8 in the line, not \\u escapes."""
    decision = _decision(reasons=(Reason(ReasonCode.TIER_DENIED, "refus\u00e9"),), approval=None)
    line = _record(decision, '{"reason": "caf\u00e9"}').to_json_line()
    assert "caf\u00e9".encode() in line
    assert "refus\u00e9".encode() in line
    assert json.loads(line)["arguments"]["reason"] == "caf\u00e9"


def test_record_keys_are_sorted_with_arguments_last() -> None:
    """The top-level keys of the line are sorted, then the spliced-in arguments come last."""
    keys = list(json.loads(_record(_decision(), '{"a": 1}').to_json_line()))
    assert keys[-1] == "arguments"
    assert keys[:-1] == sorted(keys[:-1])
