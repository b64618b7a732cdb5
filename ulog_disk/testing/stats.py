"""The statistics of every figure: one percentile definition, so that a p99 of the reliability
suite and a p99 of the benchmarks are the same statistic."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100): the smallest value with at least ``q`` % of the
    values at or below it. Always one of the values, never an interpolation between two, so a
    latency figure is a latency that was measured."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = math.ceil(q * len(ordered) / 100)
    return ordered[min(len(ordered), max(1, rank)) - 1]


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)
