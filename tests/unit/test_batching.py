"""The decision batcher on a real SQLite store: who waits, for how long, and what a failure
takes down with it."""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import NoReturn

import pytest

from sidecar.batching import DecisionBatcher
from sidecar.errors import StoreBusyError, StoreUnavailableError
from sidecar.state import DecisionBatch, StateTransaction
from sidecar.state.sqlite import SQLiteStore
from tests.state.test_store import SCOPE, count_call


def calls(store: SQLiteStore) -> int:
    with store.decision() as transaction:
        return transaction.view(SCOPE, 1000.0).usage.calls


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "state.db", busy_timeout_seconds=0.2)
    yield opened
    opened.close()


class Checks:
    """Checks on one batcher that stay in flight after their decision until released, as a
    real Check does while its audit record is written."""

    def __init__(
        self, store: SQLiteStore, window_seconds: float, arrival_gap_seconds: float = 60.0
    ) -> None:
        self.batches: list[int] = []
        self.batcher: DecisionBatcher[int] = DecisionBatcher(
            store,
            window_seconds=window_seconds,
            arrival_gap_seconds=arrival_gap_seconds,
            peak_window_seconds=60.0,
            on_batch=self.batches.append,
        )
        self.answered = asyncio.Event()
        self.committed: list[int] = []  # what each Check's committed step saw, in order

        self.steps: list[str] = []  # the phases of every Check, in the order they ran

    def prepare(self) -> None:
        self.steps.append("prepare")

    def after_commit(self, _: None, calls: int) -> int:
        self.steps.append("committed")
        self.committed.append(calls)
        return calls

    async def check(
        self,
        work: Callable[[StateTransaction], int] = count_call,
        prepare: Callable[[], None] | None = None,
    ) -> int:
        def decide(_: None, transaction: StateTransaction) -> int:
            self.steps.append("work")
            return work(transaction)

        with self.batcher.in_flight():
            result = await self.batcher.decide(prepare or self.prepare, decide, self.after_commit)
            await self.answered.wait()
            return result

    async def burst(
        self, count: int, work: Callable[[StateTransaction], int] = count_call
    ) -> list[int]:
        """``count`` Checks in flight together, answered once all are decided."""
        self.answered.clear()
        decided = sum(self.batches) + count
        tasks = [asyncio.create_task(self.check(work)) for _ in range(count)]
        deadline = time.monotonic() + 10
        while sum(self.batches) < decided:
            assert time.monotonic() < deadline, "the burst was never decided"
            await asyncio.sleep(0.001)
        self.answered.set()
        return await asyncio.gather(*tasks)


async def test_checks_in_flight_together_are_decided_in_one_batch_in_order(
    store: SQLiteStore,
) -> None:
    """The first burst teaches the batcher how many Checks fly together (each is decided as it
    comes); the next one waits for all of them and is decided in one transaction, in order."""
    checks = Checks(store, window_seconds=5.0)
    assert await checks.burst(8) == list(range(8))
    assert checks.batches == [1] * 8
    started = time.monotonic()
    assert await checks.burst(8) == list(range(8, 16)), "each saw the writes before it"
    assert checks.batches[8:] == [8]
    assert time.monotonic() - started < 2.0, "the last arrival ran the batch, not the window"
    assert calls(store) == 16
    assert checks.steps[24:] == ["prepare"] * 8 + ["work"] * 8 + ["committed"] * 8, (
        "each phase ran for the whole batch back to back, the work in one transaction"
    )


async def test_fewer_checks_than_the_peak_wait_for_the_window_only(store: SQLiteStore) -> None:
    """When fewer Checks come than flew together before, they wait out the window, no more."""
    checks = Checks(store, window_seconds=0.05)
    await checks.burst(8)
    started = time.monotonic()
    assert await checks.burst(3) == [8, 9, 10]
    waited = time.monotonic() - started
    assert checks.batches[8:] == [3]
    assert 0.04 <= waited < 1.0


async def test_a_batch_waits_only_while_checks_keep_coming(store: SQLiteStore) -> None:
    """Short of the peak, a batch waits for its next Check for the arrival gap only: Checks
    that come close together are decided together, and one far from the next is not held for
    the whole window."""
    checks = Checks(store, window_seconds=30.0, arrival_gap_seconds=1.0)
    await checks.burst(8)
    checks.answered.set()
    started = time.monotonic()
    close_together = []
    for _ in range(3):
        close_together.append(asyncio.create_task(checks.check()))
        await asyncio.sleep(0.02)
    assert await asyncio.wait_for(asyncio.gather(*close_together), 10) == [8, 9, 10]
    assert await asyncio.wait_for(checks.check(), 10) == 11, "alone, after the gap"
    assert time.monotonic() - started < 10, "nothing waited for the 30 s window"
    assert checks.batches[8:] == [3, 1]


async def test_a_check_alone_in_moderate_traffic_does_not_wait_for_company(
    store: SQLiteStore,
) -> None:
    """Once Checks keep coming further apart than the arrival gap, one alone in flight is
    decided at once, though more flew together before (the peak): waiting for company that
    does not come was most of its latency. Until then it waits the gap, as after a burst."""
    checks = Checks(store, window_seconds=30.0, arrival_gap_seconds=0.2)
    await checks.burst(8)
    checks.answered.set()
    waits = []
    for _ in range(8):
        await asyncio.sleep(0.25)  # further apart than the gap
        started = time.monotonic()
        await asyncio.wait_for(checks.check(), 10)
        waits.append(time.monotonic() - started)
    assert waits[0] >= 0.19, "right after a burst, a Check alone waits the gap for company"
    assert max(waits[-3:]) < 0.1, f"after sparse arrivals, none waits: {waits}"
    assert checks.batches[8:] == [1] * 8


async def test_checks_decided_one_by_one_are_not_taken_for_sparse_traffic(
    store: SQLiteStore,
) -> None:
    """Checks that reach the batcher a decision's work apart (each decided as it came, or the
    loop is overloaded) came together: the time spent deciding is not a gap in the traffic,
    so the next Check alone still waits for company."""
    checks = Checks(store, window_seconds=30.0, arrival_gap_seconds=0.05)

    def slow(transaction: StateTransaction) -> int:
        time.sleep(0.06)  # longer than the arrival gap
        return count_call(transaction)

    await checks.burst(8, slow)  # the peak is unknown yet: each is decided as it comes
    assert checks.batches == [1] * 8
    checks.answered.set()
    started = time.monotonic()
    await asyncio.wait_for(checks.check(), 10)
    assert time.monotonic() - started >= 0.045, "it waited the gap for company"


async def test_two_checks_answered_together_stay_batched_together(store: SQLiteStore) -> None:
    """Two Checks in flight, answered together and sent again at once: each time one comes
    after a gap and one close behind it. Half the arrivals are close, which is no sparse
    traffic: the first waits for the second, and they are decided together."""
    checks = Checks(store, window_seconds=30.0, arrival_gap_seconds=0.05)
    for _ in range(12):
        await asyncio.sleep(0.1)  # longer than the gap
        await checks.burst(2)
    assert checks.batches[-4:] == [2, 2, 2, 2]


async def test_a_call_alone_never_waits(store: SQLiteStore) -> None:
    """One call in flight at a time is decided at once, whatever the window."""
    checks = Checks(store, window_seconds=5.0)
    checks.answered.set()
    started = time.monotonic()
    for expected in range(5):
        assert await checks.check() == expected
    assert time.monotonic() - started < 1.0
    assert checks.batches == [1] * 5


async def test_a_failing_check_is_undone_alone(store: SQLiteStore) -> None:
    """A Check whose work raises gets its own error and leaves no writes; the others in its
    batch are decided and committed."""
    checks = Checks(store, window_seconds=5.0)
    await checks.burst(3)

    def count_then_fail(transaction: StateTransaction) -> int:
        count_call(transaction)
        raise ValueError("engine bug")

    checks.answered.clear()
    tasks = [
        asyncio.create_task(checks.check()),
        asyncio.create_task(checks.check(count_then_fail)),
        asyncio.create_task(checks.check()),
    ]
    await asyncio.sleep(0.05)
    checks.answered.set()
    first, failed, third = await asyncio.gather(*tasks, return_exceptions=True)
    assert (first, third) == (3, 4), "the third saw the first's call, not the failed one's"
    assert isinstance(failed, ValueError)
    assert checks.batches[3:] == [3]
    assert calls(store) == 5


async def test_a_check_that_fails_to_prepare_fails_alone_and_decides_nothing(
    store: SQLiteStore,
) -> None:
    """A Check whose preparation raises (a malformed request) gets its own error, without a
    transaction of its own; the others in its batch are decided, and see no write of it."""
    checks = Checks(store, window_seconds=5.0)
    await checks.burst(3)

    def malformed() -> None:
        raise ValueError("not a valid request")

    checks.answered.clear()
    tasks = [
        asyncio.create_task(checks.check()),
        asyncio.create_task(checks.check(prepare=malformed)),
        asyncio.create_task(checks.check()),
    ]
    await asyncio.sleep(0.05)
    checks.answered.set()
    first, failed, third = await asyncio.gather(*tasks, return_exceptions=True)
    assert (first, third) == (3, 4)
    assert isinstance(failed, ValueError)
    assert checks.batches[3:] == [2], "the batch decided the two Checks that prepared"
    assert checks.steps[9:] == ["prepare", "prepare", "work", "work", "committed", "committed"]
    assert calls(store) == 5


@pytest.mark.parametrize("phase", ["prepare", "work"])
async def test_an_interrupted_batch_leaves_no_check_waiting_and_commits_nothing(
    store: SQLiteStore, phase: str
) -> None:
    """A BaseException (KeyboardInterrupt) out of any Check's step propagates, rolls the batch
    back, and answers every Check of the batch with StoreUnavailableError."""
    checks = Checks(store, window_seconds=30.0, arrival_gap_seconds=30.0)
    await checks.burst(3)
    checks.answered.set()

    def interrupt(*_: object) -> NoReturn:
        raise KeyboardInterrupt

    tasks = [
        asyncio.create_task(checks.check()),
        asyncio.create_task(
            checks.check(prepare=interrupt) if phase == "prepare" else checks.check(interrupt)
        ),
    ]
    await asyncio.sleep(0.05)
    assert len(checks.batcher._waiting) == 2, "both wait for the third Check of the peak"
    with pytest.raises(KeyboardInterrupt):
        checks.batcher.run()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert all(isinstance(r, StoreUnavailableError) for r in results), results
    assert calls(store) == 3, "the first Check's write was rolled back with the batch"
    assert checks.committed == [0, 1, 2]


async def test_a_batch_that_cannot_lock_fails_every_check_in_it(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """Another writer holding the store past the busy timeout fails the whole batch closed:
    every Check gets StoreUnavailableError and nothing is written."""
    checks = Checks(store, window_seconds=5.0)
    await checks.burst(4)
    writer = os.open(tmp_path / "state.db.lock", os.O_RDWR)
    try:
        fcntl.flock(writer, fcntl.LOCK_EX)
        checks.answered.set()
        started = time.monotonic()
        results = await asyncio.gather(*(checks.check() for _ in range(4)), return_exceptions=True)
        waited = time.monotonic() - started
    finally:
        os.close(writer)
    assert all(isinstance(r, StoreUnavailableError) for r in results), results
    assert waited < 0.6, "one batch waited for the lock (0.2 s), not four Checks one by one"
    assert calls(store) == 4
    assert checks.committed == list(range(4)), "no committed step ran for a failed batch"


async def test_checks_wait_for_a_busy_store_without_holding_the_event_loop(
    tmp_path: Path,
) -> None:
    """Another process holding the writers' lock (a CLI write, an operator's sqlite3) keeps
    the Checks waiting, not the event loop: it keeps serving (health checks, other RPCs), Checks
    arriving meanwhile join the wait, and all are decided once the store is free."""
    busy_store = SQLiteStore(tmp_path / "state.db", busy_timeout_seconds=5.0)
    checks = Checks(busy_store, window_seconds=5.0)
    checks.answered.set()
    writer = os.open(tmp_path / "state.db.lock", os.O_RDWR)
    try:
        fcntl.flock(writer, fcntl.LOCK_EX)
        first = [asyncio.create_task(checks.check()) for _ in range(3)]
        ticks = [time.monotonic()]
        for _ in range(30):
            await asyncio.sleep(0.005)
            ticks.append(time.monotonic())
        later = [asyncio.create_task(checks.check()) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in first + later), "nothing decided while busy"
        released = time.monotonic()
    finally:
        os.close(writer)
    try:
        results = await asyncio.wait_for(asyncio.gather(*first, *later), 5)
        assert time.monotonic() - released < 0.5, "tried again soon after the store was free"
        assert sorted(results) == list(range(5))
        assert calls(busy_store) == 5
        longest_tick = max(b - a for a, b in itertools.pairwise(ticks))
        assert longest_tick < 0.1, f"the event loop was held {longest_tick:.3f} s"
    finally:
        busy_store.close()


async def test_checks_all_cancelled_while_the_store_is_busy_leave_the_next_one_decided(
    tmp_path: Path,
) -> None:
    """If every Check waiting for a busy store is cancelled (their deadlines passed), no retry
    is due: a Check arriving later still gets its batch run, and is decided."""
    busy_store = SQLiteStore(tmp_path / "state.db", busy_timeout_seconds=5.0)
    checks = Checks(busy_store, window_seconds=0.3)  # the next waits for two, at most 0.3 s
    checks.answered.set()
    writer = os.open(tmp_path / "state.db.lock", os.O_RDWR)
    try:
        fcntl.flock(writer, fcntl.LOCK_EX)
        waiting = [asyncio.create_task(checks.check()) for _ in range(2)]
        await asyncio.sleep(0.05)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        await asyncio.sleep(0.2)  # the retry timer finds nobody left
    finally:
        os.close(writer)
    try:
        assert await asyncio.wait_for(checks.check(), 2) == 0, "decided, and the first"
        assert calls(busy_store) == 1
    finally:
        busy_store.close()


async def test_a_writer_that_skips_the_file_lock_keeps_checks_waiting_not_the_loop(
    tmp_path: Path,
) -> None:
    """An operator's sqlite3 holds SQLite's own write lock (it takes no file lock): the batch's
    BEGIN finds it busy at once, and waits off the loop like for the file lock."""
    busy_store = SQLiteStore(tmp_path / "state.db", busy_timeout_seconds=5.0)
    checks = Checks(busy_store, window_seconds=5.0)
    checks.answered.set()
    operator = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    try:
        operator.execute("BEGIN IMMEDIATE")
        waiting = asyncio.create_task(checks.check())
        ticks = [time.monotonic()]
        for _ in range(20):
            await asyncio.sleep(0.01)
            ticks.append(time.monotonic())
        assert not waiting.done(), "nothing decided while busy"
        operator.execute("ROLLBACK")
        assert await asyncio.wait_for(waiting, 2) == 0
        longest_tick = max(b - a for a, b in itertools.pairwise(ticks))
        assert longest_tick < 0.1, f"the event loop was held {longest_tick:.3f} s"
    finally:
        operator.close()
        busy_store.close()


class _FailsOnceAfterBusy:
    """The real store, except that it is busy once and then fails once (a commit error)."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.busy_timeout_seconds = store.busy_timeout_seconds
        self.patience = store.patience
        self.opened = 0

    def decisions(self) -> AbstractContextManager[DecisionBatch]:
        self.opened += 1
        if self.opened == 1:
            raise StoreBusyError("another writer holds it")
        if self.opened == 2:
            raise StoreUnavailableError("state store commit failed: disk I/O error")
        return self.store.decisions()


async def test_a_retry_that_fails_leaves_the_next_check_decided(store: SQLiteStore) -> None:
    """The store was busy, then the retry failed another way: that Check fails closed, and
    the next one is decided (no retry is due; nothing may wait for one)."""
    busy_then_broken = _FailsOnceAfterBusy(store)
    batcher: DecisionBatcher[int] = DecisionBatcher(
        busy_then_broken,  # type: ignore[arg-type]
        window_seconds=0.01,
        peak_window_seconds=60.0,
    )

    async def check() -> int:
        with batcher.in_flight():
            return await batcher.decide(lambda: None, lambda _, t: count_call(t), lambda _, n: n)

    with pytest.raises(StoreUnavailableError, match="disk I/O"):
        await asyncio.wait_for(check(), 2)
    assert await asyncio.wait_for(check(), 2) == 0
    assert busy_then_broken.opened == 3


async def test_a_check_cancelled_while_it_waits_is_not_decided(store: SQLiteStore) -> None:
    """A Check whose deadline passes while it waits for company is dropped from the batch."""
    checks = Checks(store, window_seconds=0.05)
    await checks.burst(2)
    checks.answered.set()
    cancelled = asyncio.create_task(checks.check())
    await asyncio.sleep(0)
    assert checks.batcher._waiting, "it waits for the second Check of the peak"
    cancelled.cancel()
    assert await checks.check() == 2, "only the Check still waiting was decided"
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert calls(store) == 3
    assert checks.steps[6:] == ["prepare", "work", "committed"], "nor even prepared"


async def test_a_check_cancelled_after_its_batch_committed_has_its_committed_step_run(
    store: SQLiteStore,
) -> None:
    """The committed step (where the authorizer queues the audit record) runs inside the batch,
    before any Check resumes: a Check cancelled once its decision is committed (gRPC cancels on
    a deadline or a reset) never leaves a committed decision without its record."""
    checks = Checks(store, window_seconds=5.0)
    await checks.burst(2)
    checks.answered.set()
    first = asyncio.create_task(checks.check())
    await asyncio.sleep(0)  # it waits for the second Check of the peak
    assert await checks.check() == 3, "the second ran the batch"
    first.cancel()  # its result is set, but it has not resumed yet
    with pytest.raises(asyncio.CancelledError):
        await first
    assert checks.committed[2:] == [2, 3], "the cancelled Check's committed step ran"
    assert calls(store) == 4


def test_checks_from_a_new_event_loop_are_not_held_by_the_last_ones(tmp_path: Path) -> None:
    """A loop that ended with a Check waiting (and its timer) does not stall the next loop's
    Checks: they are decided, and the abandoned one is not."""
    store = SQLiteStore(tmp_path / "state.db")
    checks = Checks(store, window_seconds=5.0, arrival_gap_seconds=0.2)

    async def first() -> None:
        await checks.burst(4)
        checks.answered.set()
        asyncio.get_running_loop().create_task(checks.check())  # waits for three more
        await asyncio.sleep(0.01)

    async def second() -> int:
        checks.answered = asyncio.Event()
        checks.answered.set()
        return await asyncio.wait_for(checks.check(), 2)  # the arrival gap (0.2 s), no more

    try:
        asyncio.run(first())
        assert asyncio.run(second()) == 4
    finally:
        store.close()
