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

Once the batch is committed, each Check's ``committed`` step (the authorizer queues its audit
record there) runs before any of them resumes, so a Check cancelled after its decision was
committed still leaves its record. The lock is held only while the batch is decided,
synchronously, never across an ``await``. A call alone waits at most the arrival gap; a Check
cancelled while it waits (its deadline passed) is not decided at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sidecar.errors import StoreUnavailableError
from sidecar.peaks import RecentPeak
from sidecar.state import StateTransaction, Store

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("proviso.batching")

PEAK_WINDOW_SECONDS = 0.1
"""Checks in flight are counted over windows this long; the larger of the last two counts."""

ARRIVAL_GAP_SECONDS = 0.0003
"""The longest a batch waits for its next Check. At 16 in flight the Checks of a burst arrive
~50 us apart; when traffic is only moderately busy, the next one may be far off."""


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
        self._waiting: list[_Waiting[Any, R]] = []
        self._first_waiting = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._active = 0  # Checks between arrival and answer
        self._in_flight_peak = RecentPeak(peak_window_seconds)

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Count a Check from its arrival to its answer (its audit record included)."""
        self._active += 1
        self._in_flight_peak.observe(self._active, time.monotonic())
        try:
            yield
        finally:
            self._active -= 1

    async def decide(self, work: Callable[[StateTransaction], T], committed: Callable[[T], R]) -> R:
        """Run ``work`` in a transaction of its own within the next batch, then, once the batch
        is committed, ``committed`` on what it returned (before any Check of the batch resumes:
        a Check cancelled from then on has had it run); the latter's result.

        Raises:
            StoreUnavailableError: the batch could not be locked or committed.
            Exception: whatever ``work`` raised (its writes are undone) or ``committed`` did.
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._move_to(loop)
        waiter: asyncio.Future[R] = loop.create_future()
        now = time.monotonic()
        if not self._waiting:
            self._first_waiting = now
        self._waiting.append(_Waiting(work, committed, waiter))
        waited = now - self._first_waiting
        if waited >= self._window or self._active >= self._in_flight_peak.current(now):
            self.run()  # every Check in flight is here (or the batch waited long enough)
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
        self._loop = loop

    def run(self) -> None:
        """Decide every Check waiting now, in one transaction."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = [waiting for waiting in self._waiting if not waiting.waiter.done()]
        self._waiting = []
        if not batch:
            return
        decided: list[tuple[_Waiting[Any, R], Any, Exception | None]] = []
        try:
            with self._store.decisions() as transactions:
                for waiting in batch:
                    try:
                        with transactions.decision() as transaction:
                            decided.append((waiting, waiting.work(transaction), None))
                    except Exception as exc:
                        decided.append((waiting, None, exc))
        except BaseException as exc:
            failure = (
                exc
                if isinstance(exc, Exception)
                else StoreUnavailableError("the decision batch was interrupted")
            )
            for waiting in batch:
                waiting.waiter.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        try:
            self._settle(decided, len(batch))
        finally:  # a BaseException (KeyboardInterrupt) out of a step: nobody is left waiting
            for waiting in batch:
                if not waiting.waiter.done():
                    waiting.waiter.set_exception(
                        StoreUnavailableError("the decision batch was interrupted")
                    )

    def _settle(
        self, decided: list[tuple[_Waiting[Any, R], Any, Exception | None]], size: int
    ) -> None:
        """After the commit: every Check's ``committed`` step in order, then the answers."""
        outcomes: list[tuple[asyncio.Future[R], R | None, Exception | None]] = []
        for waiting, value, failed in decided:
            result, error = None, failed
            if failed is None:
                try:
                    result = waiting.committed(value)
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
class _Waiting(Generic[T, R]):
    """A Check waiting for its batch: its state work, what follows the commit, its answer."""

    work: Callable[[StateTransaction], T]
    committed: Callable[[T], R]
    waiter: asyncio.Future[R]
