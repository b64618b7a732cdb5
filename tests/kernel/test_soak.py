"""Real-kernel soak: tools/vm/scenarios/soak.sh under qemu.

A writer runs for ``SOAK_SECONDS`` (default 120 here, to keep CI within its budget; the long soak
is ``ULOG_SOAK_SECONDS=600``) while the mirror is suspended/resumed and reloaded with the same uuid
over and over, and dm-ulogd is killed with SIGKILL twice and restarted. Asserted: every write
succeeded, every dmsetup call too, both kills happened, no event cost a full resync (no RESUME left
the log with nothing in sync), and the legs are identical at the end.

Like tests/kernel/test_real_kernel.py: ``ULOG_SKIP_KERNEL=1`` skips; results are kept in
``results/pytest-soak/``.
"""

from __future__ import annotations

import os

import guests
import pytest
from test_real_kernel import assert_values, daemon_run

pytestmark = pytest.mark.kernel

SOAK_SECONDS = int(os.environ.get("ULOG_SOAK_SECONDS", "120"))
SOAK = guests.Guest("soak", "soak", estimate=SOAK_SECONDS + 45, timeout=SOAK_SECONDS + 420,
                    env=(f"SOAK_SECONDS={SOAK_SECONDS}",))


@pytest.mark.guest(SOAK)
def test_soak_writer_suspend_reload_and_two_kills() -> None:
    run = daemon_run(SOAK)
    assert_values(run, "soak", {
        "create_rc": "0",
        "sync_initial": "32/32",
        "legs_after_resync": "equal",
        "writer_rc": "0",
        "writer_ok": "0",
        "dmsetup_failures": "0",
        "kills": "2",
        "full_resync_per_event": "no",
        "full_resyncs_after_setup": "0",
        "final_suspend_rc": "0",
        "final_resume_rc": "0",
        "sync_final": "32/32",
        "legs_final": "equal",
        "remove_rc": "0",
        "rc": "0",
    })
    assert int(run.get("soak.reloads") or 0) >= 2, run.explain()
    assert int(run.get("soak.suspend_resumes") or 0) >= 2, run.explain()
    assert int(run.get("soak.max_resync_per_event") or 99) < 32
