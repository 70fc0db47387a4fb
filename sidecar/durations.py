"""Durations as people write them in policy and on the command line: 30s, 15m, 24h, 7d."""

from __future__ import annotations

import re

_DURATION_RE = re.compile(r"([0-9]{1,9})([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in ``text``.

    Raises:
        ValueError: not an integer followed by one of s, m, h, d.
    """
    match = _DURATION_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"invalid duration {text!r}: use a whole number and s, m, h or d (15m)")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
