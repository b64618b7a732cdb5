"""A clock that only the test moves: hand it to code that takes a clock, or patch it over
``time.monotonic`` where the code reads that."""

from __future__ import annotations


class ManualClock:
    """Reads ``now``; the test sets or advances it."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
