"""Time is an input: the system clock in production, a fixed one in tests."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


def timestamp(now: float) -> str:
    """RFC 3339 UTC with milliseconds, as records and logs show time: 2026-11-25T10:00:00.000Z."""
    return (
        datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class Clock(Protocol):
    """Seconds since the epoch."""

    def now(self) -> float: ...


class SystemClock:
    """The wall clock."""

    def now(self) -> float:
        return time.time()


class FixedClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float) -> None:
        self._now = now

    def now(self) -> float:
        return self._now

    def set(self, now: float) -> None:
        self._now = now

    def advance(self, seconds: float) -> None:
        self._now += seconds
