"""Percentiles and summaries, kept dependency-free so every figure is computed one way."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

NS_PER_MS = 1_000_000
NS_PER_US = 1_000


def percentile(sorted_values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile of already sorted values (a value that was really observed)."""
    if not sorted_values:
        raise ValueError("no samples")
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True, slots=True)
class Summary:
    """Latency distribution of one set of samples, in nanoseconds."""

    count: int
    mean_ns: float
    p50_ns: int
    p90_ns: int
    p99_ns: int
    p999_ns: int
    max_ns: int

    @classmethod
    def of(cls, samples: Sequence[int]) -> Summary:
        ordered = sorted(samples)
        return cls(
            count=len(ordered),
            mean_ns=sum(ordered) / len(ordered),
            p50_ns=percentile(ordered, 50),
            p90_ns=percentile(ordered, 90),
            p99_ns=percentile(ordered, 99),
            p999_ns=percentile(ordered, 99.9),
            max_ns=ordered[-1],
        )

    def in_units(self, ns_per_unit: int) -> dict[str, float]:
        """The figures scaled to ms or µs, rounded for the JSON file."""
        return {
            "mean": round(self.mean_ns / ns_per_unit, 3),
            "p50": round(self.p50_ns / ns_per_unit, 3),
            "p90": round(self.p90_ns / ns_per_unit, 3),
            "p99": round(self.p99_ns / ns_per_unit, 3),
            "p99.9": round(self.p999_ns / ns_per_unit, 3),
            "max": round(self.max_ns / ns_per_unit, 3),
        }
