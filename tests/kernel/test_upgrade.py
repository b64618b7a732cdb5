"""Upgrade under a live mirror, on a real kernel.

Scenario ``tools/vm/scenarios/upgrade.sh``: the previous release of dm-ulogd (the last commit before
store layout 3 and the daemon-wide journal, its ``ulog_disk/`` taken with ``git archive``) serves a
mirror with a writer running, is stopped with SIGTERM, and this release starts on the same state
directory: the store is migrated to layout 3, the writer never fails, nothing resyncs, the legs end
identical. Then the previous release on the migrated store: it refuses the layout with a clear
message, never misreads it (its log comes back all out of sync and resyncs whole). About 65 s, so
it runs with the long real-kernel tests only (``ULOG_KERNEL_LONG=1``), not in the default CI run
(which must stay under 20 minutes); the migration itself is tested in process by
``tests/test_lmdb_backend.py`` in every run.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile

import guests
import pytest
from test_real_kernel import ROOT, assert_values, daemon_run

pytestmark = pytest.mark.kernel

#: The previous release: the last commit with store layout 2 and per-instance journals.
PREVIOUS_RELEASE = "a368f59d657b172d854f17a5ae2ed908587e1fcf"


def previous_release() -> str:
    """A copy of the previous release's ulog_disk/ inside the checkout (the guest sees it there)."""
    out = ROOT / "results" / f"previous-release-{PREVIOUS_RELEASE[:12]}"
    if not (out / "ulog_disk" / "__main__.py").is_file():
        p = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE, "ulog_disk"],
                           capture_output=True, timeout=60)
        if p.returncode != 0:
            pytest.fail(f"cannot take the previous release {PREVIOUS_RELEASE} from git: "
                        f"{p.stderr.decode(errors='replace').strip()}", pytrace=False)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(p.stdout)) as tar:
            tar.extractall(out, filter="data")
    return str(out)


UPGRADE = guests.Guest("upgrade", "upgrade", estimate=65, timeout=420,
                       prepare=lambda: (f"OLD_CHECKOUT={previous_release()}",))


@pytest.mark.guest(UPGRADE)
@pytest.mark.skipif(os.environ.get("ULOG_KERNEL_LONG") != "1",
                    reason="long real-kernel test: set ULOG_KERNEL_LONG=1 (about 65 s under qemu)")
def test_upgrade_under_a_live_mirror_and_the_reverse() -> None:
    run = daemon_run(UPGRADE)
    assert_values(run, "upgrade", {
        "layout_before": "2", "layout_after": "3", "migrated_logged": "1", "writer_ok": "0",
        "sync_after_upgrade": "32/32", "resync_after_upgrade": "0", "legs_after_upgrade": "equal",
        "old_refuses_layout_3": "yes", "old_reads_all_out_of_sync": "0/32",
        "resync_by_previous_release": "32", "legs_after_reverse": "equal",
    })
