"""The writer on real files: group commit, chain order, checkpoints, rotation and resuming."""

from __future__ import annotations

import asyncio
import json
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from sidecar.audit.chain import Problem
from sidecar.audit.files import log_files, verify_log
from sidecar.audit.writer import AuditLog, AuditLogCorruptError, AuditLogInUseError
from sidecar.errors import AuditWriteError
from tokens import SigningKey, VerificationKeys

KEY = SigningKey.generate(kid="writer-test")
KEYS = VerificationKeys.from_signing_keys([KEY])


def open_log(path: Path, **options: object) -> AuditLog:
    return AuditLog(path, signer=KEY, **options)  # type: ignore[arg-type]


def counting_log(path: Path, **options: object) -> tuple[AuditLog, list[int]]:
    """A log, and the number of records in each durable write (checkpoint-only writes left out)."""
    batches: list[int] = []

    def count(records: int, _checkpoint: bool) -> None:
        if records:
            batches.append(records)

    return open_log(path, on_commit=count, **options), batches


def read(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_concurrent_appends_share_fsyncs_and_chain_in_write_order(tmp_path: Path) -> None:
    """200 concurrent appends land with seq 1..N in file order, in fewer writes than records."""
    log, commits = counting_log(tmp_path / "a.jsonl")
    receipts = await asyncio.gather(*(log.append({"kind": "t", "i": i}) for i in range(200)))
    log.close()
    records = read(tmp_path / "a.jsonl")
    decisions = [r for r in records if r["kind"] == "t"]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert sorted(r.seq for r in receipts) == [r["seq"] for r in decisions]
    assert sum(commits) == 200
    assert len(commits) < 200, "concurrent appends share an fsync"
    assert records[-1]["kind"] == "checkpoint", "close seals the log"
    assert verify_log(log_files(tmp_path / "a.jsonl"), KEYS).broken is None


async def test_appends_on_a_loop_go_to_the_writer_in_batches(tmp_path: Path) -> None:
    """Records appended while a batch is being written all go in the next one (group commit)."""
    log, commits = counting_log(tmp_path / "a.jsonl")
    first = asyncio.ensure_future(log.append({"kind": "t", "i": 0}))
    await asyncio.sleep(0)  # the first record is on its way to the writer
    rest = [asyncio.ensure_future(log.append({"kind": "t", "i": i})) for i in range(1, 50)]
    await asyncio.gather(first, *rest)
    log.close()
    assert commits[:2] == [1, 49]
    assert verify_log(log_files(tmp_path / "a.jsonl"), KEYS).broken is None


async def _burst(log: AuditLog, size: int) -> None:
    """``size`` records appended together, the way concurrent Checks reach the log."""
    await asyncio.gather(*(log.append({"kind": "t", "i": i}) for i in range(size)))


async def test_records_arriving_together_wait_for_as_many_as_the_last_batches(
    tmp_path: Path,
) -> None:
    """After a batch of 3, the next records gather to 3 before the writer gets them.

    The windows are far longer than the test: had the burst waited for its window, or
    forgotten the batch of 3, the test would say so.
    """
    log, commits = counting_log(
        tmp_path / "a.jsonl", group_commit_seconds=30, peak_window_seconds=3600
    )
    loop = asyncio.get_running_loop()
    await _burst(log, 4)  # the first goes alone (nothing seen yet), the 3 others together
    started = loop.time()
    await _burst(log, 3)
    await _burst(log, 3)
    assert loop.time() - started < 10, "a full batch does not wait for the window"
    log.close()
    assert commits == [1, 3, 3, 3]


async def test_a_record_alone_after_a_busy_moment_waits_at_most_the_window(
    tmp_path: Path,
) -> None:
    """The wait is bounded: a record that finds no company goes when the window closes."""
    log, commits = counting_log(
        tmp_path / "a.jsonl", group_commit_seconds=0.3, peak_window_seconds=3600
    )
    loop = asyncio.get_running_loop()
    await _burst(log, 4)
    started = loop.time()
    await asyncio.wait_for(log.append({"kind": "t", "i": "lone"}), 10)
    assert loop.time() - started >= 0.29
    log.close()
    assert commits == [1, 3, 1]


async def test_once_the_busy_spell_is_over_a_record_goes_at_once(tmp_path: Path) -> None:
    """Batch sizes are forgotten after two quiet windows: one call in flight never waits.

    The group commit window (30 s) is longer than the test's time limit, so a wait would fail.
    """
    log = open_log(tmp_path / "a.jsonl", group_commit_seconds=30, peak_window_seconds=0.05)
    await _burst(log, 4)
    await asyncio.sleep(0.2)  # more than two windows since the last batch was handed over
    await asyncio.wait_for(log.append({"kind": "t", "i": "idle"}), 10)
    log.close()


async def test_send_gathered_hands_over_the_records_waiting_for_company(
    tmp_path: Path,
) -> None:
    """A decided batch of Checks knows no more records are coming with its own: it sends them
    at once instead of letting them wait for as many as the last batches held."""
    log, commits = counting_log(
        tmp_path / "a.jsonl", group_commit_seconds=30, peak_window_seconds=3600
    )
    await _burst(log, 4)  # batches of 1 and 3: the next records wait for three
    waiting = [asyncio.ensure_future(log.append({"kind": "t", "i": i})) for i in range(2)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiting), "they wait for a third"
    log.send_gathered()
    await asyncio.wait_for(asyncio.gather(*waiting), 10)
    # Records sent while a batch is being written go as soon as it is done, not after a wait.
    more = [asyncio.ensure_future(log.append({"kind": "t", "i": i})) for i in range(2, 4)]
    await asyncio.sleep(0)  # both are appended, and wait for a third
    log.send_gathered()  # they are being written...
    last = asyncio.ensure_future(log.append({"kind": "t", "i": "last"}))
    await asyncio.sleep(0)  # ...while this one is appended behind them
    log.send_gathered()
    await asyncio.wait_for(asyncio.gather(*more, last), 10)
    log.close()
    assert commits == [1, 3, 2, 2, 1]


async def test_gathered_records_wait_for_send_gathered_even_after_a_quiet_spell(
    tmp_path: Path,
) -> None:
    """A decision batch's records go to one fsync together: the first does not go alone
    because nothing was seen lately. Without ``send_gathered`` they go when the window closes."""
    log, commits = counting_log(
        tmp_path / "a.jsonl", group_commit_seconds=0.3, peak_window_seconds=0.01
    )
    loop = asyncio.get_running_loop()
    batch = [log.enqueue({"kind": "t", "i": i}, gathered=True) for i in range(3)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in batch), "they wait for send_gathered"
    log.send_gathered()
    await asyncio.wait_for(asyncio.gather(*batch), 10)
    await asyncio.sleep(0.05)  # a quiet spell: the batch of 3 is forgotten
    started = loop.time()
    left = [log.enqueue({"kind": "t", "i": i}, gathered=True) for i in range(2)]
    await asyncio.wait_for(asyncio.gather(*left), 10)
    assert loop.time() - started >= 0.29, "without send_gathered, the window"
    log.close()
    assert commits == [3, 2]


async def test_a_zero_window_never_holds_a_record_back(tmp_path: Path) -> None:
    log, commits = counting_log(tmp_path / "a.jsonl", group_commit_seconds=0)
    await _burst(log, 4)
    await asyncio.wait_for(log.append({"kind": "t", "i": "next"}), 10)
    log.close()
    assert commits == [1, 3, 1]


def test_a_loop_that_ended_with_a_record_gathering_does_not_stall_the_next(
    tmp_path: Path,
) -> None:
    """A record left gathering on a loop that ended is written; the next loop is not blocked
    waiting for the first loop to hear that its batch is done (it never will)."""
    log = open_log(tmp_path / "a.jsonl", group_commit_seconds=30, peak_window_seconds=3600)

    async def first() -> None:
        await _burst(log, 4)  # a batch of 3: the next record waits for company
        left = asyncio.ensure_future(log.append({"kind": "t", "i": "left"}))
        await asyncio.sleep(0.05)
        left.cancel()

    async def second() -> None:
        await asyncio.wait_for(_burst(log, 3), 10)  # as many as the batch of 3: no wait

    asyncio.run(first())
    asyncio.run(second())
    log.close()
    written = [r.get("i") for r in read(tmp_path / "a.jsonl")]
    assert "left" in written, "a record appended is written even if its caller is gone"
    assert verify_log(log_files(tmp_path / "a.jsonl"), KEYS).broken is None


async def test_close_writes_the_records_still_gathering(tmp_path: Path) -> None:
    """Records waiting for company when the log closes are written, and their callers told."""
    log = open_log(tmp_path / "a.jsonl", group_commit_seconds=30, peak_window_seconds=3600)
    await _burst(log, 4)
    waiting = asyncio.ensure_future(log.append({"kind": "t", "i": "last"}))
    await asyncio.sleep(0.05)
    assert not waiting.done(), "it waits for the others the last batches promised"
    log.close()
    receipt = await asyncio.wait_for(waiting, 5)
    records = read(tmp_path / "a.jsonl")
    assert [r["seq"] for r in records if r.get("i") == "last"] == [receipt.seq]
    assert verify_log(log_files(tmp_path / "a.jsonl"), KEYS).broken is None


def test_appends_from_many_threads_never_interleave_the_chain(tmp_path: Path) -> None:
    """Threads submitting at once still yield one unbroken chain."""
    log = open_log(tmp_path / "a.jsonl", checkpoint_every=25)

    def submit(worker: int) -> None:
        for i in range(50):
            log.submit({"kind": "t", "worker": worker, "i": i}).result(timeout=10)

    threads = [threading.Thread(target=submit, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    result = verify_log(log_files(tmp_path / "a.jsonl"), KEYS)
    assert result.broken is None
    assert result.state.records == 200
    assert result.state.checkpoints >= 8
    assert result.state.unsealed == 0


async def test_a_checkpoint_is_written_when_time_is_up(tmp_path: Path) -> None:
    """An idle log with unsealed records gets a checkpoint after checkpoint_seconds."""
    log = open_log(tmp_path / "a.jsonl", checkpoint_seconds=0.05)
    await log.append({"kind": "t"})
    for _ in range(100):
        if len(read(tmp_path / "a.jsonl")) == 2:
            break
        await asyncio.sleep(0.01)
    assert [r["kind"] for r in read(tmp_path / "a.jsonl")] == ["t", "checkpoint"]
    log.close()


async def test_an_invalid_body_fails_alone(tmp_path: Path) -> None:
    """A body that is not JSON fails its own append; the others in the batch are written."""
    log = open_log(tmp_path / "a.jsonl")
    good, bad = await asyncio.gather(
        log.append({"kind": "t", "amount": Decimal("0.10")}),
        log.append({"kind": "t", "bad": {1, 2}}),
        return_exceptions=True,
    )
    log.close()
    assert isinstance(bad, AuditWriteError)
    assert not isinstance(good, BaseException)
    assert good.seq == 1
    assert read(tmp_path / "a.jsonl")[0]["amount"] == 0.1


async def test_rotation_continues_the_chain_across_files(tmp_path: Path) -> None:
    """Rotated segments end with a checkpoint and the chain runs on through every file."""
    active = tmp_path / "decisions.jsonl"
    log = open_log(active, max_file_bytes=2000)
    for i in range(40):
        await log.append({"kind": "t", "i": i, "pad": "x" * 100})
    log.close()
    files = log_files(tmp_path)
    assert len(files) > 3
    assert files[-1] == active
    assert files[0].name == "decisions.000000000001.jsonl"
    for segment in files[:-1]:
        assert read(segment)[-1]["kind"] == "checkpoint"
    result = verify_log(files, KEYS)
    assert result.broken is None
    assert result.state.records == 40


async def test_a_restart_resumes_the_chain(tmp_path: Path) -> None:
    """Reopening a log continues seq and prev from its last record."""
    path = tmp_path / "a.jsonl"
    first = open_log(path)
    await first.append({"kind": "t"})
    first.close()
    second = open_log(path)
    receipt = await second.append({"kind": "t"})
    second.close()
    assert receipt.seq == 3, "after the record and the closing checkpoint"
    result = verify_log(log_files(path), KEYS)
    assert result.broken is None
    assert (result.state.records, result.state.checkpoints) == (2, 2)


async def test_a_torn_last_line_is_cut_off_on_resume(tmp_path: Path) -> None:
    """A half-written line (never acknowledged) is removed, and the chain goes on."""
    path = tmp_path / "a.jsonl"
    log = open_log(path)
    await log.append({"kind": "t"})
    log.close()
    with path.open("ab") as stream:
        stream.write(b'{"kind":"t","seq":3,"pr')
    resumed = open_log(path)
    receipt = await resumed.append({"kind": "t"})
    resumed.close()
    assert receipt.seq == 3
    assert verify_log(log_files(path), KEYS).broken is None


async def test_a_crash_without_checkpoint_resumes_from_the_unsealed_tail(tmp_path: Path) -> None:
    """Records after the last checkpoint (a crash) are checked and the chain continues."""
    path = tmp_path / "a.jsonl"
    log = open_log(path, checkpoint_every=3)
    for i in range(5):
        await log.append({"kind": "t", "i": i})
    lines = path.read_bytes().splitlines(keepends=True)
    log.close()
    path.write_bytes(b"".join(lines))  # as the crash left it: no closing checkpoint
    resumed = open_log(path, checkpoint_every=3)
    receipt = await resumed.append({"kind": "t"})
    resumed.close()
    assert receipt.seq == len(lines) + 1
    assert verify_log(log_files(path), KEYS).broken is None


async def test_an_edited_tail_stops_the_start(tmp_path: Path) -> None:
    """A record edited after the last checkpoint makes the writer refuse to extend the chain."""
    path = tmp_path / "a.jsonl"
    log = open_log(path)
    for _ in range(3):
        await log.append({"kind": "t", "decision": "DENY"})
    lines = path.read_bytes().splitlines(keepends=True)
    log.close()
    lines[1] = lines[1].replace(b'"DENY"', b'"ALLOW"')
    path.write_bytes(b"".join(lines))
    with pytest.raises(AuditLogCorruptError, match=Problem.HASH_MISMATCH):
        open_log(path)


def test_a_log_without_a_chain_stops_the_start(tmp_path: Path) -> None:
    """A file of plain JSON lines (no seq, prev, hash) is not continued."""
    path = tmp_path / "a.jsonl"
    path.write_text('{"kind":"decision","record_id":"dec_1"}\n')
    with pytest.raises(AuditLogCorruptError, match="MALFORMED"):
        open_log(path)


async def test_an_edited_checkpoint_stops_the_start(tmp_path: Path) -> None:
    """The last checkpoint's own hash is checked before the chain is continued from it."""
    path = tmp_path / "a.jsonl"
    log = open_log(path)
    await log.append({"kind": "t"})
    log.close()
    path.write_bytes(path.read_bytes().replace(b'"first_seq":1', b'"first_seq":2'))
    with pytest.raises(AuditLogCorruptError, match="checkpoint"):
        open_log(path)


async def test_appends_after_close_fail(tmp_path: Path) -> None:
    """A closed log refuses records rather than dropping them."""
    log = open_log(tmp_path / "a.jsonl")
    log.close()
    with pytest.raises(AuditWriteError):
        await log.append({"kind": "t"})


def test_a_second_writer_of_an_open_log_is_refused_and_the_chain_stays_whole(
    tmp_path: Path,
) -> None:
    """Two servers on one state directory would interleave their records and fork the chain:
    the second is refused at once (the lock is per open file, so this holds between two opens
    in one process as between two processes), and can open the log once the first closed it."""
    path = tmp_path / "a.jsonl"
    first = open_log(path)
    first.submit({"kind": "t", "i": 1}).result(timeout=5)
    with pytest.raises(AuditLogInUseError, match="another process"):
        open_log(path)
    first.close()
    second = open_log(path)
    second.submit({"kind": "t", "i": 2}).result(timeout=5)
    second.close()
    assert verify_log(log_files(path), KEYS).broken is None
    assert [r["i"] for r in read(path) if r["kind"] == "t"] == [1, 2]


def test_logs_of_different_files_do_not_lock_each_other(tmp_path: Path) -> None:
    """Each worker of ``serve --workers N`` writes its own chain, each with its own lock."""
    w0, w1 = open_log(tmp_path / "decisions.w0.jsonl"), open_log(tmp_path / "decisions.w1.jsonl")
    w0.close()
    w1.close()
    assert {p.name for p in tmp_path.glob("*.jsonl")} == {
        "decisions.w0.jsonl",
        "decisions.w1.jsonl",
    }
