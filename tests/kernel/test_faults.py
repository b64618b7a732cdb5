"""Faults operators meet, on a real kernel: a stalled state disk, and the daemon under a descriptor
and a memory limit.

Each takes minutes under emulation, so they run with the long real-kernel tests only
(``ULOG_KERNEL_LONG=1``, or ``tools/reliability/run.py --long --only faults``), not in the default
CI run, which must stay under 20 minutes. What they rest on is tested in every run in process:
``tests/test_daemon_loop.py`` (requests held while a sync stalls, the others answered),
``tests/test_engine.py`` (a resent request does what the original alone does) and
``tests/test_limits.py``.
"""

from __future__ import annotations

import os
import sys

import guests
import pytest
from test_real_kernel import ROOT, assert_values, require_daemon, require_harness

sys.path.insert(0, str(ROOT / "tests" / "reliability"))
from rel_lib import figures  # noqa: E402 - the reliability runner collects these figures

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.environ.get("ULOG_KERNEL_LONG") != "1",
                       reason="long real-kernel test: set ULOG_KERNEL_LONG=1 (minutes under qemu)"),
]


STATE_STALL = guests.Guest("state-stall", "state-stall", estimate=150, timeout=420)
LIMITS = guests.Guest("limits", "limits", estimate=200, timeout=600)


@pytest.mark.guest(STATE_STALL)
def test_a_stalled_state_disk_costs_no_resync_and_reads_go_on() -> None:
    """The state directory's disk holds every I/O for 25 s (dm suspend --nolockfs) while a mirror
    writes: the kernel times out and resends; every request and resend is answered, `dmsetup
    status` is answered during the stall with health A, the writer goes on, nothing resyncs."""
    require_harness()
    require_daemon()
    run = guests.result(STATE_STALL)
    assert run.rc == 0, run.explain()
    assert_values(run, "state-stall", {
        "health_during_stall": "A", "writer_ok": "0", "timed_out": r"^[1-9]\d*", "unanswered": "0",
        "resync_after_stall": "0", "legs_final": "equal", "sync_final": "32/32",
    })
    assert run.get("state-stall.resends_answered") == run.get("state-stall.timed_out"), run.explain()
    # Answered during the stall, not after it: well under the kernel's 15 s timeout.
    assert int(run.get("state-stall.status_during_stall") or 0) >= 3, run.explain()
    assert float(run.get("state-stall.status_during_stall_max_seconds") or 99) < 15, run.explain()
    figures("faults.state_stall", **{k.removeprefix("state-stall."): v for k, v in run.results.items()})


@pytest.mark.guest(LIMITS)
def test_limits_refuse_one_mirror_clearly_and_the_others_go_on() -> None:
    """`ulimit -n 64` and a cgroup memory.max: 24 mirrors served; one whose bitmaps cannot fit fails
    its CTR (ENOMEM, one log line naming the limit); never OOM-killed; a kill -9 loses nothing."""
    require_harness()
    require_daemon()
    run = guests.result(LIMITS)
    assert run.rc == 0, run.explain()
    assert_values(run, "limits", {
        "mirrors_working": "24", "memory_limit_lines": "1", "oom_kills": "0",
        "mirrors_working_after_restart": "24", "resync_after_restart": "0", "legs_identical": "24",
        "huge_create_rc": r"^[1-9]\d*",
    })
    figures("faults.limits", **{k.removeprefix("limits."): v for k, v in run.results.items()})
