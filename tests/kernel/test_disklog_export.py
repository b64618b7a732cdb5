"""The real kernel loads what ``ulog-recover export`` writes as its own ``disk`` log (qemu).

Scenario ``tools/vm/scenarios/disklog-export.sh``: a mirror resynced by dm-ulogd is exported as a
disk log on a loop device; the kernel accepts the header (create succeeds) and reports n/n in sync
without a resync; with 4 regions exported out of sync (and leg 1 held suspended so no recovery can
finish) the sync count starts at n - 4; LVM's fresh-log marker gives 0/n; and the kernel's log read
back with ``ulog-recover import`` lets dm-ulogd serve the mirror again with nothing to resync.
"""

from __future__ import annotations

import guests
import pytest
from test_real_kernel import assert_values, harness, require_daemon  # noqa: F401

pytestmark = pytest.mark.kernel

N = 32
DISKLOG_EXPORT = guests.Guest("disklog-export", "disklog-export", estimate=197, timeout=900)


@pytest.mark.guest(DISKLOG_EXPORT)
def test_disklog_export_and_import_on_a_real_kernel(harness: None) -> None:  # noqa: F811
    require_daemon()
    run = guests.result(DISKLOG_EXPORT)
    assert run.rc == 0, run.explain()
    assert_values(run, "disklog-export", {
        "verify_rc": "0",
        "export_clean_regions": str(N),
        "export_clean_bytes": "1536",
        "disklog_clean_verdict": "valid",
        "kernel_accepts_clean_export": f"{N}/{N}",
        "status_clean_export": rf"^0 32768 mirror 2 7:\d+ 7:\d+ {N}/{N} 1 AA 3 disk 7:\d+ A",
        "kernel_rewrote_clean": f"{N}/{N}",
        "legs_after_clean_export": "equal",
        "export_dirty_rc": "0",
        "export_dirty_block_device": "true",
        "export_dirty_not_clean": "3,10-12",
        "export_onto_busy_log_rc": "1",
        "export_onto_busy_log_says": "1",
        "diff_regions_before": "4",
        "kernel_sync_dirty_export": f"{N - 4}/{N}",
        "kernel_sync_dirty_export_held": f"{N - 4}/{N}",
        "legs_after_dirty_export": "equal",
        "kernel_log_after_recovery": str(N),
        "disklog_lvm_verdict": "lvm-fresh",
        "kernel_sync_lvm_marker": f"0/{N}",
        "kernel_rewrote_lvm_marker": str(N),
        "kernel_header_errors": "0",
        "import_rc": "0",
        "sync_after_import": f"{N}/{N}",
        "resync_after_import": "0",
        "legs_final": "equal",
    })
