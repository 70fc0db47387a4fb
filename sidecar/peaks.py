"""The recent peak of a count: how many things came together lately, forgotten when quiet.

Group commit and decision batching both wait for company only while recent bursts were that
large: the largest count of the current window and of the one before it. Windows start when
due, so after two quiet windows the peak is 0 and nothing waits.
"""

from __future__ import annotations


class RecentPeak:
    """The largest count observed in this window and the one before (windows start when due)."""

    def __init__(self, window_seconds: float) -> None:
        self._window = window_seconds
        self._peak = 0  # the largest count in this window
        self._peak_before = 0  # and in the window before it
        self._until = 0.0  # when this window ends

    def observe(self, count: int, now: float) -> None:
        """Note a count seen at ``now`` (seconds on a monotonic clock)."""
        self._roll(now)
        self._peak = max(self._peak, count)

    def current(self, now: float) -> int:
        """The peak as of ``now``."""
        self._roll(now)
        return max(self._peak, self._peak_before)

    def _roll(self, now: float) -> None:
        if now >= self._until:
            recent = now < self._until + self._window
            self._peak_before, self._peak = (self._peak if recent else 0), 0
            self._until = now + self._window
