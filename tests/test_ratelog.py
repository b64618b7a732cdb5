"""Rate-limited log lines: the first few per kind and interval, then one summary with the count."""

from __future__ import annotations

import logging

from hypothesis import given
from hypothesis import strategies as st

from ulog_disk.log.ratelog import RateLimitedLog
from ulog_disk.testing.clock import ManualClock


def limiter(caplog, burst: int = 3, interval: float = 10.0) -> tuple[RateLimitedLog, ManualClock]:
    caplog.set_level(logging.DEBUG, logger="test.ratelog")
    clock = ManualClock()
    return RateLimitedLog(logging.getLogger("test.ratelog"), burst, interval, clock), clock


def test_a_flood_gives_the_first_lines_then_one_summary_per_interval(caplog) -> None:
    rl, clock = limiter(caplog)
    for i in range(3000):
        clock.now = i * 0.001  # 3000 lines in 3 s
        rl.log("junk frame", logging.WARNING, "dropped frame %d", i)
    assert [r.getMessage() for r in caplog.records] == [f"dropped frame {i}" for i in range(3)]
    clock.now = 11.0
    rl.log("junk frame", logging.WARNING, "dropped frame %d", 3000)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[3].startswith("2997 more junk frame line(s) not logged")
    assert messages[4] == "dropped frame 3000"
    assert rl.suppressed["junk frame"] == 2997


def test_kinds_are_limited_apart_and_flush_all_reports_what_is_left(caplog) -> None:
    rl, clock = limiter(caplog, burst=1)
    for _ in range(5):
        rl.log("a", logging.WARNING, "a")
        rl.log("b", logging.ERROR, "b")
    rl.flush()  # the intervals have not ended: nothing yet
    assert [r.getMessage() for r in caplog.records] == ["a", "b"]
    rl.flush_all()
    summaries = [(r.levelno, r.getMessage().split(" not logged")[0]) for r in caplog.records[2:]]
    assert summaries == [(logging.WARNING, "4 more a line(s)"), (logging.ERROR, "4 more b line(s)")]
    assert dict(rl.suppressed) == {"a": 4, "b": 4}


@given(times=st.lists(st.floats(0, 100, allow_nan=False), max_size=300), burst=st.integers(1, 5))
def test_every_line_is_logged_or_counted_and_no_interval_logs_more_than_the_burst(times, burst) -> None:
    logger = logging.getLogger("test.ratelog.prop")
    logger.propagate = False
    seen: list[tuple[float, str]] = []
    clock = ManualClock()

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((clock.now, record.getMessage()))

    handler = Catch()
    logger.addHandler(handler)
    try:
        rl = RateLimitedLog(logger, burst, 10.0, clock)
        for t in sorted(times):
            clock.now = t
            rl.log("k", logging.WARNING, "line")
        rl.flush_all()
    finally:
        logger.removeHandler(handler)
    lines = [t for t, m in seen if m == "line"]
    suppressed = sum(int(m.split()[0]) for _, m in seen if m != "line")
    assert len(lines) + suppressed == len(times) and suppressed == rl.suppressed["k"]
    # Windows open at the first line after the last one ended: each logs min(burst, its lines).
    windows: list[list[float]] = []
    for t in sorted(times):
        if not windows or t - windows[-1][0] >= 10.0:
            windows.append([t])
        else:
            windows[-1].append(t)
    assert len(lines) == sum(min(burst, len(w)) for w in windows)
