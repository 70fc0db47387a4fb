"""Checks in flight together are decided together: one state transaction, one lock, one commit.

Under load the event loop is the bottleneck. A Check decided alone pays a file lock, ``BEGIN``
and ``COMMIT`` of its own, and runs the engine on caches that the gRPC work since the last
Check has made cold (the same ``decide`` takes ~70 us there against ~30 us right after
another). So while several Checks are in flight, one that arrives waits until every Check in
flight has arrived (as many as the recent peak), for as long as the next keeps coming within
``arrival_gap`` and at most ``window`` from the first one waiting. Then they are decided one
after the other in one ``Store.decisions`` transaction, each in a savepoint of its own:

- each sees the writes of those before it, so budgets and idempotency keys stay as exact as
  with a transaction each;
- a Check that fails undoes only its own writes and gets its own error;
- a failure of the batch (the lock, the commit) fails every Check in it: nothing is answered
  that was not committed.

Each Check is prepared first (the authorizer parses its request and verifies its token
there), all of them back to back before the lock is taken: run together, that work too finds
warm caches (~10 % more Checks/s at 16 in flight), and a Check that fails it (a malformed
request) fails alone without holding the lock. Once the batch is committed, each Check's
``committed`` step (the authorizer queues its audit record there) runs before any of them
resumes, so a Check cancelled after its decision was committed still leaves its record. The
lock is held only while the batch is decided, synchronously, never across an ``await``. A call
alone waits at most the arrival gap, and not at all when few recent Checks came within the gap
of the one before (moderate traffic: at 300 Checks/s the peak in flight is 2 or 3, yet a Check is
usually alone, and waiting for company that does not come was most of its latency). A Check
cancelled while it waits (its deadline passed) is not prepared or decided at all.

Waiting for the store never holds the event loop long. Another worker's batch holds the
writers' lock for a fraction of a millisecond, so a batch waits for it on the loop, briefly
(``LOCK_SPIN_SECONDS``, as ``state.patience`` lets other writes wait). When another process
holds it longer (a CLI write, a checkpoint, an operator's ``sqlite3``), the batch goes back to
the queue and is tried again on a timer, with every Check that arrives meanwhile, while the
loop answers health checks and other RPCs. Past the store's busy timeout they all fail closed,
``StoreBusyError`` (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sidecar.errors import StoreBusyError, StoreUnavailableError
from sidecar.peaks import RecentPeak
from sidecar.state import StateTransaction, Store
from sidecar.state.patience import (
    LOCK_RETRY_FIRST_SECONDS,
    LOCK_RETRY_LONGEST_SECONDS,
    LOCK_SPIN_SECONDS,
)

P = TypeVar("P")
T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("proviso.batching")

PEAK_WINDOW_SECONDS = 0.1
"""Checks in flight are counted over windows this long; the larger of the last two counts."""

ARRIVAL_GAP_SECONDS = 0.0003
"""The longest a batch waits for its next Check. At 16 in flight the Checks of a burst arrive
~50 us apart; when traffic is only moderately busy, the next one may be far off."""

CLOSE_ARRIVALS_WEIGHT = 0.2
"""How much each arrival moves the share of Checks that came close: within the arrival gap of
the one before, or of the end of the last batch (an exponentially weighted mean: the last five
arrivals or so weigh most)."""

SPARSE_SHARE = 1 / 3
"""Below this share of close arrivals, a Check alone in flight does not wait for company. A
third, not a half: two Checks in flight answered together come back one after a gap and one
close behind it, and their share settles between 0.44 and 0.56."""


class DecisionBatcher(Generic[R]):
    """Gathers the Checks of one event loop and decides them in batches (see the module)."""

    def __init__(
        self,
        store: Store,
        *,
        window_seconds: float,
        arrival_gap_seconds: float = ARRIVAL_GAP_SECONDS,
        peak_window_seconds: float = PEAK_WINDOW_SECONDS,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._store = store
        self._window = window_seconds
        self._gap = arrival_gap_seconds
        self._on_batch = on_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: list[_Waiting[Any, Any, R]] = []
        self._first_waiting = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._active = 0  # Checks between arrival and answer
        self._in_flight_peak = RecentPeak(peak_window_seconds)
        self._last_busy = 0.0  # the last arrival, or the end of the last batch if later
        self._close_arrivals = 1.0  # of recent arrivals; company is likely until shown not
        self._busy_since = -1.0  # when the store first kept the waiting Checks waiting
        self._retry_wait = LOCK_RETRY_FIRST_SECONDS

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Count a Check from its arrival to its answer (its audit record included)."""
        self._active += 1
        self._in_flight_peak.observe(self._active, time.monotonic())
        try:
            yield
        finally:
            self._active -= 1

    async def decide(
        self,
        prepare: Callable[[], P],
        work: Callable[[P, StateTransaction], T],
        committed: Callable[[P, T], R],
    ) -> R:
        """Within the next batch: ``prepare`` before its lock, ``work`` on what that returned in
        a transaction of its own, then, once the batch is committed, ``committed`` on both
        (before any Check of the batch resumes: a Check cancelled from then on has had it
        run); the latter's result.

        Raises:
            StoreUnavailableError: the batch could not be locked or committed.
            Exception: whatever ``prepare`` raised (nothing was decided), ``work`` raised (its
                writes are undone) or ``committed`` did.
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._move_to(loop)
        waiter: asyncio.Future[R] = loop.create_future()
        now = time.monotonic()
        # Close to the last arrival, or to the end of the last batch: a Check that comes right
        # after a batch came while the loop was busy, not after a quiet spell (Checks decided
        # one by one as they come, or under overload, arrive a decision's work apart).
        close = now - self._last_busy < self._gap
        self._close_arrivals += (close - self._close_arrivals) * CLOSE_ARRIVALS_WEIGHT
        self._last_busy = now
        if not self._waiting:
            self._first_waiting = now
        self._waiting.append(_Waiting(prepare, work, committed, waiter))
        if self._busy_since >= 0:
            return await waiter  # the store is busy: the retry timer decides it with the rest
        waited = now - self._first_waiting
        if (
            waited >= self._window
            or self._active >= self._in_flight_peak.current(now)
            or (self._active == 1 and self._close_arrivals < SPARSE_SHARE)
        ):
            # Every Check in flight is here, or the batch waited long enough, or this one is
            # alone and few Checks lately came close enough to be worth waiting for.
            self.run()
        else:  # wait for the next one, briefly: Checks that come together come close together
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_later(min(self._window - waited, self._gap), self.run)
        return await waiter

    def _move_to(self, loop: asyncio.AbstractEventLoop) -> None:
        """Checks now come from another event loop (tests): the last one's are abandoned."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for waiting in self._waiting:
            with contextlib.suppress(RuntimeError, asyncio.InvalidStateError):  # loop closed
                waiting.waiter.set_exception(
                    StoreUnavailableError("the Check's event loop was replaced")
                )
        self._waiting = []
        self._busy_since = -1.0
        self._loop = loop

    def run(self) -> None:
        """Decide every Check waiting now, in one transaction."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = [waiting for waiting in self._waiting if not waiting.waiter.done()]
        self._waiting = []
        deferred = False
        try:
            deferred = self._run(batch)
            self._last_busy = time.monotonic()
        finally:  # a BaseException (KeyboardInterrupt) out of a step: nobody is left waiting
            if not deferred:
                # However the batch ended (decided, failed, interrupted), no retry is due: the
                # next arrival must run its own batch, not wait for a timer that never comes.
                self._busy_since = -1.0
            for waiting in () if deferred else batch:
                if not waiting.waiter.done():
                    waiting.waiter.set_exception(
                        StoreUnavailableError("the decision batch was interrupted")
                    )

    def _run(self, batch: list[_Waiting[Any, Any, R]]) -> bool:
        """Prepare each Check, decide those prepared in one transaction, settle them; True if
        the store was busy and the batch is queued again for the retry timer."""
        prepared: list[tuple[_Waiting[Any, Any, R], Any]] = []
        for waiting in batch:
            try:
                prepared.append((waiting, waiting.prepare()))
            except Exception as exc:
                waiting.waiter.set_exception(exc)
        if not prepared:
            return False
        decided: list[tuple[_Waiting[Any, Any, R], Any, Any, Exception | None]] = []
        retrying = self._busy_since >= 0
        patience = self._store.patience(0.0 if retrying else LOCK_SPIN_SECONDS)
        try:
            with patience, self._store.decisions() as transactions:
                for waiting, value in prepared:
                    try:
                        with transactions.decision() as transaction:
                            decided.append((waiting, value, waiting.work(value, transaction), None))
                    except Exception as exc:
                        decided.append((waiting, value, None, exc))
        except StoreBusyError:
            if self._wait_for_store([waiting for waiting, _ in prepared]):
                return True
            waited = time.monotonic() - self._busy_since
            message = f"state store unavailable: another writer held it for {waited:.1f} s"
            self._fail(prepared, StoreBusyError(message))
            return False
        except Exception as exc:
            self._fail(prepared, exc)
            return False
        if retrying:
            waited = time.monotonic() - self._busy_since
            log.info("the state store is free again after %.3f s", waited)
        self._settle(decided, len(prepared))
        return False

    def _wait_for_store(self, batch: list[_Waiting[Any, Any, R]]) -> bool:
        """Queue ``batch`` again, to be tried on a timer while the loop serves other calls;
        False once the store has been busy for its busy timeout."""
        now = time.monotonic()
        if self._busy_since < 0:
            self._busy_since = now
            self._retry_wait = LOCK_RETRY_FIRST_SECONDS
            log.warning("the state store is busy (another writer holds it): Checks wait")
        elif now - self._busy_since >= self._store.busy_timeout_seconds:
            return False
        assert self._loop is not None  # set by decide() before any batch
        self._waiting = batch + self._waiting
        self._timer = self._loop.call_later(self._retry_wait, self.run)
        self._retry_wait = min(self._retry_wait * 2, LOCK_RETRY_LONGEST_SECONDS)
        return True

    @staticmethod
    def _fail(prepared: list[tuple[_Waiting[Any, Any, R], Any]], exc: Exception) -> None:
        for waiting, _ in prepared:
            waiting.waiter.set_exception(exc)

    def _settle(
        self, decided: list[tuple[_Waiting[Any, Any, R], Any, Any, Exception | None]], size: int
    ) -> None:
        """After the commit: every Check's ``committed`` step in order, then the answers."""
        outcomes: list[tuple[asyncio.Future[R], R | None, Exception | None]] = []
        for waiting, value, work_done, failed in decided:
            result, error = None, failed
            if failed is None:
                try:
                    result = waiting.committed(value, work_done)
                except Exception as exc:
                    error = exc
            outcomes.append((waiting.waiter, result, error))
        if self._on_batch is not None:
            try:
                self._on_batch(size)
            except Exception:
                log.exception("the decision batch's observer failed")
        for waiter, result, error in outcomes:
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(result)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class _Waiting(Generic[P, T, R]):
    """A Check waiting for its batch: what it does before the lock, its state work, what
    follows the commit, and its answer."""

    prepare: Callable[[], P]
    work: Callable[[P, StateTransaction], T]
    committed: Callable[[P, T], R]
    waiter: asyncio.Future[R]
