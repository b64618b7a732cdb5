"""A host crash under a live mirror, on a real kernel (qemu, two boots on the same virtual disks).

Scenario ``tools/vm/scenarios/host-crash.sh`` (run by ``ulogvm.py run host-crash``, which attaches
the disks ``state``, ``leg0``, ``leg1`` and boots twice): boot 1 puts dm-ulogd's state directory on
an ext4 disk and the mirror's legs on two other disks (512 regions), resyncs the mirror fully, puts
O_DIRECT writes in flight (leg 1 slowed down by dm-delay) and crashes the guest kernel (sysrq c,
nothing flushed). Boot 2 mounts the state disk again, starts dm-ulogd on it and creates the mirror
again with the same table and uuid.

* ``lmdb``: only the regions dirty at the crash resync (at most the store's dirty count, far fewer
  than 512), every region the crash left different among them, legs identical.
* ``memory`` (the control, like cmirrord): the daemon remembers nothing, so all 512 regions resync
  (with the long real-kernel tests only, ``ULOG_KERNEL_LONG=1``).

Both runs take about 70-100 s each on a 2-core machine. Results in ``results/pytest-host-crash-lmdb/<run>/``
and ``results/pytest-host-crash-memory/<run>/`` (a failed run is kept); the numbers side by side in
``results/pytest-host-crash-summary.txt``. ``ULOG_SKIP_KERNEL=1`` skips.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import guests
import pytest
from test_real_kernel import ROOT, ScenarioRun, assert_values, require_daemon, require_harness

pytestmark = pytest.mark.kernel

REGIONS = 512
S = "host-crash"
#: The control (the memory backend, like cmirrord: every region resyncs) runs with the long
#: real-kernel tests only: it shows what the store saves, it guards nothing of the store itself,
#: and it costs the default CI run a boot pair (~75 s) of its 20 minutes.
LONG = os.environ.get("ULOG_KERNEL_LONG") == "1"


#: One run per backend (the memory control only with ULOG_KERNEL_LONG=1): two boots each.
RUNS = {backend: guests.Guest(f"{S}-{backend}", S, estimate=91, timeout=600, env=(f"BACKEND={backend}",),
                              backend=False)
        for backend in ("lmdb", "memory")}


def num(run: ScenarioRun, key: str) -> int:
    value = run.get(f"{S}.{key}")
    assert value is not None and value.isdigit(), f"{S}.{key}: got {value!r}\n{run.explain()}"
    return int(value)


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, ScenarioRun]]:
    """The runs this module's tests read (each test asks for its own), summed up side by side in
    ``results/pytest-host-crash-summary.txt`` once the module is done."""
    results: dict[str, ScenarioRun] = {}
    yield results
    lines = []
    for backend, run in results.items():
        lines.append(f"{backend}.regions_resynced={run.get(f'{S}.boot2_resynced')}\n")
        lines.append(f"{backend}.regions_dirty_in_store={run.get(f'{S}.boot2_store_dirty') or 'n/a'}\n")
        lines.append(f"{backend}.regions_different_after_crash={run.get(f'{S}.boot2_diff_regions')}\n")
        lines.append(f"{backend}.wall_seconds={(run.out / 'wall-seconds').read_text().strip()}\n"
                     if (run.out / "wall-seconds").is_file() else f"{backend}.wall_seconds=n/a\n")
    if results:
        lines.append(f"regions={REGIONS}\n")
        (ROOT / "results" / f"pytest-{S}-summary.txt").write_text("".join(lines))


def host_crash(runs: dict[str, ScenarioRun], backend: str) -> ScenarioRun:
    require_harness()
    require_daemon()
    if backend not in runs:
        runs[backend] = guests.result(RUNS[backend])
    return runs[backend]


def common_checks(run: ScenarioRun) -> None:
    assert run.rc == 0, run.explain()
    boots = (run.out / "boots.txt").read_text() if (run.out / "boots.txt").is_file() else ""
    assert boots.startswith("boot1=crashed "), f"boots.txt: {boots!r}\n{run.explain()}"
    assert "Kernel panic - not syncing: sysrq triggered crash" in (run.out / "console.log").read_text(
        errors="replace"), run.explain()
    assert_values(run, S, {
        # boot 1: a fully resynced mirror, then writes in flight at the crash
        "boot1_sync": f"{REGIONS}/{REGIONS}",
        "boot1_resync_initial": str(REGIONS),
        "boot1_legs_after_resync": "equal",
        "boot1_write_failures": "0",
        "boot1_sync_at_crash": f"{REGIONS}/{REGIONS}",
        "boot1_writes_in_flight": r"^[1-9][0-9]*",
        # boot 2 on the same disks: a new boot, the legs differed only where writes were in flight,
        # every one of those regions resynced, legs identical
        "boot2_diff_outside_in_flight": "0",
        "boot2_sync": f"{REGIONS}/{REGIONS}",
        "boot2_regions": str(REGIONS),
        "boot2_diff_not_resynced": "0",
        "boot2_legs_final": "equal",
        "remove_rc": "0",
        "stop_rc_2": "0",
        "rc": "0",
    })
    assert run.get(f"{S}.boot1_boot_id") != run.get(f"{S}.boot2_boot_id"), run.explain()
    resynced = num(run, "boot2_resynced")
    assert resynced == REGIONS - num(run, "boot2_in_sync_at_resume"), run.explain()
    assert resynced >= num(run, "boot2_diff_regions"), run.explain()


@pytest.mark.guest(RUNS["lmdb"])
def test_host_crash_lmdb_resyncs_only_the_dirty_regions(runs: dict[str, ScenarioRun]) -> None:
    run = host_crash(runs, "lmdb")
    common_checks(run)
    resynced = num(run, "boot2_resynced")
    dirty = num(run, "boot2_store_dirty")
    assert num(run, "boot2_store_out_of_sync") == 0, run.explain()
    assert resynced <= dirty, f"resynced {resynced} > {dirty} dirty in the store\n{run.explain()}"
    assert resynced < REGIONS, f"lmdb resynced all {REGIONS} regions\n{run.explain()}"
    assert resynced < REGIONS // 4, f"lmdb resynced {resynced} of {REGIONS} regions\n{run.explain()}"
    # Writes were in flight to a slowed-down leg: the crash left the legs different, and the store
    # knew about every such region.
    assert num(run, "boot2_diff_regions") >= 1, run.explain()


@pytest.mark.guest(RUNS["memory"])
@pytest.mark.skipif(not LONG, reason="the memory-backend control runs with ULOG_KERNEL_LONG=1 (~75 s)")
def test_host_crash_memory_control_resyncs_everything(runs: dict[str, ScenarioRun]) -> None:
    run = host_crash(runs, "memory")
    common_checks(run)
    assert_values(run, S, {"boot2_in_sync_at_resume": "0", "boot2_resynced": str(REGIONS)})
