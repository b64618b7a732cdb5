"""dm-ulogd's log line format: the time stamp it formats once per second is logging's own."""

from __future__ import annotations

import logging

from hypothesis import given
from hypothesis import strategies as st

from ulog_disk.daemon.service import _LogFormatter


@given(st.lists(st.floats(min_value=0, max_value=4e9, allow_nan=False), min_size=1, max_size=20))
def test_the_time_stamp_is_what_logging_formats(times):
    ours, theirs = _LogFormatter(), logging.Formatter(_LogFormatter()._fmt)
    for created in sorted(times) + times:  # in order, and jumping back and forth across seconds
        record = logging.makeLogRecord({"msg": "m", "levelname": "INFO", "name": "n"})
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == theirs.format(record)
        assert ours.formatTime(record, "%H") == theirs.formatTime(record, "%H")
