"""write_when_free: store writes from the event loop while another process holds the store."""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.errors import StoreBusyError
from sidecar.policy.model import KillScope, KillSwitch
from sidecar.state.patience import write_when_free
from sidecar.state.sqlite import SQLiteStore

SWITCH = KillSwitch(KillScope.TOOL, "t", "broken", "api", "olivia@example.com", 1000.0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "state.db", busy_timeout_seconds=1.0)
    yield opened
    opened.close()


def hold_lock(tmp_path: Path) -> int:
    """The writers' lock, taken as another process would (its own open file)."""
    holder = os.open(tmp_path / "state.db.lock", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    return holder


async def test_a_write_waits_for_the_store_without_holding_the_loop(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """Held for 0.3 s: the write completes once the lock is free, and the loop ran on."""
    holder = hold_lock(tmp_path)
    asyncio.get_running_loop().call_later(0.3, os.close, holder)
    ticks = [time.monotonic()]

    async def tick() -> None:
        while len(ticks) < 40:
            await asyncio.sleep(0.01)
            ticks.append(time.monotonic())

    ticking = asyncio.ensure_future(tick())
    switch, was_engaged = await write_when_free(store, lambda: store.set_kill_switch(SWITCH))
    await ticking
    assert not was_engaged
    assert switch.target == "t"
    assert store.kill_switches() == (SWITCH,)
    assert ticks[-1] - ticks[0] > 0.3, "the write came after the lock was freed"
    longest = max(b - a for a, b in itertools.pairwise(ticks))
    assert longest < 0.1, f"the loop was held {longest:.3f} s"


async def test_a_store_busy_past_its_timeout_fails_closed_and_writes_nothing(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """Held past the busy timeout (1 s): StoreBusyError, nothing written; afterwards the
    store waits its full busy timeout again (the short patience was only for those tries)."""
    holder = hold_lock(tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(StoreBusyError):
            await write_when_free(store, lambda: store.set_kill_switch(SWITCH))
        assert 1.0 <= time.monotonic() - started < 2.0
        started = time.monotonic()
        with pytest.raises(StoreBusyError), store.decision():
            pass
        assert time.monotonic() - started >= 1.0, "patience restored to the busy timeout"
    finally:
        os.close(holder)
    assert store.kill_switches() == ()
