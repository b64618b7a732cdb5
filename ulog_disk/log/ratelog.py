"""Log lines that a sender controls, rate-limited by kind.

A buggy or hostile sender (or a kernel resending every 2 s during an outage) decides how often
the daemon would log "dropped an unanswerable frame" or "request rejected": one line each would
let it fill the journal and the disk. Per kind, the first :data:`BURST` lines of every
:data:`INTERVAL` seconds are logged; the rest are counted, and one summary line per kind says
how many were suppressed when the interval ends (or at :meth:`RateLimitedLog.flush`). The exact
totals stay available (:attr:`RateLimitedLog.suppressed`) for the stop line.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

BURST = 5
INTERVAL = 10.0


@dataclass
class _Window:
    start: float
    logged: int = 0
    suppressed: int = 0
    level: int = logging.WARNING


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, burst: int = BURST, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self._windows: dict[str, _Window] = {}
        #: Lines not logged, per kind, since the start.
        self.suppressed: collections.Counter[str] = collections.Counter()

    def log(self, kind: str, level: int, msg: str, *args: object) -> None:
        now = self.clock()
        window = self._windows.get(kind)
        if window is None or now - window.start >= self.interval:
            if window is not None:
                self._summary(kind, window)
            window = self._windows[kind] = _Window(now)
        if window.logged < self.burst:
            window.logged += 1
            self.logger.log(level, msg, *args, stacklevel=2)
            return
        window.suppressed += 1
        window.level = max(window.level, level)
        self.suppressed[kind] += 1

    def flush(self) -> None:
        """Summaries of the windows that have ended (all of them at stop: call with ``all``)."""
        now = self.clock()
        for kind, window in list(self._windows.items()):
            if now - window.start >= self.interval:
                self._summary(kind, window)
                del self._windows[kind]

    def flush_all(self) -> None:
        for kind, window in list(self._windows.items()):
            self._summary(kind, window)
        self._windows.clear()

    def _summary(self, kind: str, window: _Window) -> None:
        if window.suppressed:
            self.logger.log(window.level, "%d more %s line(s) not logged in %.0f s (%d logged; at most %d "
                            "per %.0f s)", window.suppressed, kind, self.clock() - window.start,
                            window.logged, self.burst, self.interval)
            window.suppressed = 0
