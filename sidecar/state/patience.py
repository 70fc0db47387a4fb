"""Store writes from the event loop that wait for a busy store without holding the loop.

Every serving process shares the store with the others and with the CLI. Another worker holds
it for a fraction of a millisecond; another process (a CLI write, an operator's ``sqlite3``, a
WAL checkpoint) may hold it for seconds. A write waits on the loop only ``LOCK_SPIN_SECONDS``;
beyond that it sleeps asynchronously and tries again, so health checks and Checks go on being
answered, and fails closed (``StoreBusyError``) after the store's busy timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from sidecar.errors import StoreBusyError
from sidecar.state.store import Store

T = TypeVar("T")

LOCK_SPIN_SECONDS = 0.002
"""How long a write waits for the store's lock on the event loop before it yields the loop."""

LOCK_RETRY_FIRST_SECONDS = 0.001
LOCK_RETRY_LONGEST_SECONDS = 0.05
"""A write the store kept waiting is tried again after 1 ms, doubling to at most 50 ms."""


async def write_when_free(store: Store, write: Callable[[], T]) -> T:
    """``write()``, one store transaction (it may not have committed anything when the lock
    wait fails, so it can be tried again whole), without holding the event loop while another
    process holds the store.

    Raises:
        StoreBusyError: the store stayed busy for its busy timeout.
        Exception: whatever ``write`` raised.
    """
    deadline = time.monotonic() + store.busy_timeout_seconds
    pause = LOCK_RETRY_FIRST_SECONDS
    while True:
        try:
            with store.patience(LOCK_SPIN_SECONDS):
                return write()
        except StoreBusyError:
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, LOCK_RETRY_LONGEST_SECONDS)
