"""Checks in flight together are decided together: one state transaction, one lock, one commit.

Under load the event loop is the bottleneck. A Check decided alone pays a file lock, ``BEGIN``
and ``COMMIT`` of its own, and runs the engine on caches that the gRPC work since the last
Check has made cold (the same ``decide`` takes ~70 us there against ~30 us right after
another). So while several Checks are in flight, one that arrives waits, at most ``window``
from the first one waiting, until every Check in flight has arrived (as many as the recent
peak); then they are decided one after the other in one ``Store.decisions`` transaction, each
in a savepoint of its own:

- each sees the writes of those before it, so budgets and idempotency keys stay as exact as
  with a transaction each;
- a Check that fails undoes only its own writes and gets its own error;
- a failure of the batch (the lock, the commit) fails every Check in it: nothing is answered
  that was not committed.

The lock is held only while the batch is decided, synchronously, never across an ``await``. A
call alone (the recent peak is one) waits for nothing; a Check cancelled while it waits (its
deadline passed) is not decided at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from sidecar.errors import StoreUnavailableError
from sidecar.state import StateTransaction, Store

T = TypeVar("T")

PEAK_WINDOW_SECONDS = 0.1
"""Checks in flight are counted over windows this long; the larger of the last two counts."""


class DecisionBatcher(Generic[T]):
    """Gathers the Checks of one event loop and decides them in batches (see the module)."""

    def __init__(
        self,
        store: Store,
        *,
        window_seconds: float,
        peak_window_seconds: float = PEAK_WINDOW_SECONDS,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._store = store
        self._window = window_seconds
        self._peak_window = peak_window_seconds
        self._on_batch = on_batch
        self._waiting: list[tuple[Callable[[StateTransaction], T], asyncio.Future[T]]] = []
        self._first_waiting = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._active = 0  # Checks between arrival and answer
        self._peak = 0  # the most in flight at once in this window
        self._peak_before = 0  # and in the window before it
        self._peak_until = 0.0

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Count a Check from its arrival to its answer (its audit record included)."""
        self._active += 1
        now = time.monotonic()
        self._recent_peak(now)
        self._peak = max(self._peak, self._active)
        try:
            yield
        finally:
            self._active -= 1

    async def decide(self, work: Callable[[StateTransaction], T]) -> T:
        """Run ``work`` in a transaction of its own within the next batch; its result.

        Raises:
            StoreUnavailableError: the batch could not be locked or committed.
            Exception: whatever ``work`` raised (its writes are undone).
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()
        now = time.monotonic()
        if not self._waiting:
            self._first_waiting = now
        self._waiting.append((work, waiter))
        waited = now - self._first_waiting
        if waited >= self._window or self._active >= self._recent_peak(now):
            self.run()  # every Check in flight is here (or waited long enough)
        elif self._timer is None:
            self._timer = loop.call_later(self._window - waited, self.run)
        return await waiter

    def _recent_peak(self, now: float) -> int:
        if now >= self._peak_until:
            recent = now < self._peak_until + self._peak_window
            self._peak_before, self._peak = (self._peak if recent else 0), 0
            self._peak_until = now + self._peak_window
        return max(self._peak, self._peak_before)

    def run(self) -> None:
        """Decide every Check waiting now, in one transaction."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = [(work, waiter) for work, waiter in self._waiting if not waiter.done()]
        self._waiting = []
        if not batch:
            return
        outcomes: list[tuple[asyncio.Future[T], T | None, Exception | None]] = []
        try:
            with self._store.decisions() as transactions:
                for work, waiter in batch:
                    try:
                        with transactions.decision() as transaction:
                            outcomes.append((waiter, work(transaction), None))
                    except Exception as exc:
                        outcomes.append((waiter, None, exc))
        except BaseException as exc:
            failure = (
                exc
                if isinstance(exc, Exception)
                else StoreUnavailableError("the decision batch was interrupted")
            )
            for _, waiter in batch:
                waiter.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        for waiter, result, error in outcomes:
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(result)  # type: ignore[arg-type]
        if self._on_batch is not None:
            self._on_batch(len(batch))
