"""Real-kernel tests: dm-log-userspace under qemu, driven by tools/vm/ulogvm.py.

Each test reads a guest run (software emulation, a few seconds per boot plus the scenario) and
asserts on the ``key=value`` lines the scenario wrote to ``result.txt``. The guests run side by side
while the tests that need none run (tests/kernel/guests.py); several tests may read one run (a suite
boots once for several scenarios). Results are kept in
``<checkout>/results/pytest-<run>/<time>-<pid>/`` (console log, dmesg, daemon logs, captures;
``latest`` links the newest run; a run that failed is kept, one that passed goes at the next run).

Prerequisite: ``python3 tools/vm/ulogvm.py setup`` (host packages, kernel package, initramfs).
Set ``ULOG_SKIP_KERNEL=1`` to skip these tests; otherwise a missing harness is a failure.
``ULOG_KERNEL_BACKEND=memory`` runs the daemon scenarios with another backend (default: lmdb).

While a guest runs, its steps go to the terminal as they happen (``ulogvm.py`` streams them on its
stderr, tests/kernel/guests.py passes them on past pytest's capture, each led by the run's name;
``-q`` silences them): a boot takes minutes under emulation and must not look like a hang.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import guests
import pytest
from guests import (  # noqa: F401 - the other real-kernel test modules import them from here
    ROOT,
    SETUP_HINT,
    ULOGVM,
    Guest,
    ScenarioRun,
    finished,
    parse_results,
    run_dir,
    run_ulogvm,
)

pytestmark = pytest.mark.kernel

REGIONS = "32/32"
LEGS = r"7:\d+ 7:\d+"

_HARNESS: list[str] = []  # ulogvm check's verdict, once per session: "" ready, else why not


def require_harness() -> None:
    if os.environ.get("ULOG_SKIP_KERNEL") == "1":
        pytest.skip("ULOG_SKIP_KERNEL=1: real-kernel (qemu) tests skipped")
    if not _HARNESS:
        p = subprocess.run([sys.executable, str(ULOGVM), "check"], capture_output=True, text=True,
                           timeout=120)
        _HARNESS.append("" if p.returncode == 0 else p.stderr.strip())
    if _HARNESS[0]:
        pytest.fail(f"real-kernel harness not ready: {_HARNESS[0]}\n{SETUP_HINT}", pytrace=False)


def require_daemon() -> None:
    if not (ROOT / "ulog_disk" / "__main__.py").is_file():
        pytest.fail("ulog_disk/__main__.py is missing: `python -m ulog_disk` (dm-ulogd) cannot start in the "
                    "guest; the daemon scenarios need it", pytrace=False)


def run_scenario(name: str, timeout: int = 600, env: tuple[str, ...] = ()) -> ScenarioRun:
    """Boot scenario ``name`` now, in this test (what the pool does for a planned run)."""
    return guests.result(Guest(name, name, estimate=0, timeout=timeout, env=env))


def daemon_run(guest: Guest) -> ScenarioRun:
    """The run of a dm-ulogd scenario that must have exited 0 (harness and daemon checked first)."""
    require_harness()
    require_daemon()
    run = guests.result(guest)
    assert run.rc == 0, run.explain()
    return run


def assert_values(run: ScenarioRun, prefix: str, expected: dict[str, str]) -> None:
    """Every ``prefix.key`` must equal the expected value, or fully match it if it starts with ``^``."""
    for key, want in expected.items():
        got = run.get(f"{prefix}.{key}")
        ok = got is not None and (re.fullmatch(want[1:], got) if want.startswith("^") else got == want)
        assert ok, f"{prefix}.{key}: got {got!r}, want {want!r}\n{run.explain()}"


@pytest.fixture(scope="module")
def harness() -> None:
    require_harness()


#: The guest runs of this module; ``estimate``: seconds alone on a quiet 2-core machine. One boot
#: runs the scenarios that need no restart of the guest (each still its own test): suite-core (the
#: harness's listener, then dm-ulogd without restarts), suite-restart (dm-ulogd restarted, its state
#: lost).
SELFTEST_TIMEOUT = Guest("selftest-timeout", "selftest-timeout", estimate=35, timeout=45, idle=True)
SUITE_CORE = Guest("suite-core", "suite-core", estimate=200, timeout=900)
SUITE_RESTART = Guest("suite-restart", "suite-restart", estimate=180, timeout=900)
DEMO = Guest("demo", "demo", estimate=70, command="demo", timeout=600, backend=False)  # the README's own


# ---------------------------------------------------------------------------------------------
# Harness self-tests (no dependency on the ulog_disk package)


def test_unknown_scenario_is_refused() -> None:
    if os.environ.get("ULOG_SKIP_KERNEL") == "1":
        pytest.skip("ULOG_SKIP_KERNEL=1: real-kernel (qemu) tests skipped")
    p = subprocess.run([sys.executable, str(ULOGVM), "run", "no-such-scenario"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2
    assert "no scenario" in p.stderr


@pytest.mark.guest(SUITE_CORE)
def test_smoke_listener(harness: None) -> None:
    """The harness's own listener (tools/vm/smoke_listener.py, no ulog_disk) serves a mirror."""
    run = guests.result(SUITE_CORE)
    assert_values(run, "smoke-listener", {
        "create_rc": "0",
        "sync_final": REGIONS,
        "legs_after_resync": "equal",
        "resync_regions": "32",
        "write_on_all_legs": "yes",
        "legs_after_write": "equal",
        "status": rf"^0 32768 mirror 2 {LEGS} 32/32 1 AA 1 clustered-core",
        "table": r"^0 32768 mirror userspace 3 ulogvm-smoke-0001 clustered-core 1024 2 7:\d+ 0 7:\d+ 0",
        "suspend_rc": "0",
        "resume_rc": "0",
        "reload_rc": "0",
        "swap_resume_rc": "0",
        "luids_for_uuid": "2",
        "legs_after_swap": "equal",
        "clear_rc": "0",
        "remove_rc": "0",
        "listener_clean_stop": "1",
        "timeouts_in_dmesg": "0",
        "rc": "0",
    })
    assert int(run.get("smoke-listener.requests") or 0) > 100
    assert (run.out / "smoke-listener" / "trace.txt").is_file()


@pytest.mark.guest(SELFTEST_TIMEOUT)
def test_guest_timeout_is_enforced(harness: None) -> None:
    run = guests.result(SELFTEST_TIMEOUT)
    assert run.rc == 124, run.explain()
    assert run.get("selftest-timeout.sleeping") == "yes"
    assert (run.out / "console.log").is_file()
    assert float((run.out / "wall-seconds").read_text()) < 45 + 15


# ---------------------------------------------------------------------------------------------
# dm-ulogd scenarios (need the daemon: python -m ulog_disk)


@pytest.fixture(scope="module")
def suite_core(harness: None) -> Iterator[ScenarioRun]:
    require_daemon()
    yield guests.result(SUITE_CORE)


@pytest.fixture(scope="module")
def suite_restart(harness: None) -> Iterator[ScenarioRun]:
    require_daemon()
    yield guests.result(SUITE_RESTART)


def common_mirror_checks(run: ScenarioRun, name: str) -> None:
    assert_values(run, name, {
        "ready_seconds_1": r"^[0-9.]+",
        "create_rc": "0",
        "sync_initial": REGIONS,
        "legs_after_resync": "equal",
        "resync_initial": "32",
        "remove_rc": "0",
        "rc": "0",
    })


#: What each dm-ulogd scenario of suite-core wrote, beyond what every mirror's scenario does
#: (common_mirror_checks): one test each.
CORE_SCENARIOS: dict[str, dict[str, str]] = {
    "basic-core": {
        "write_on_all_legs": "yes",
        "legs_after_write": "equal",
        "status": rf"^0 32768 mirror 2 {LEGS} 32/32 1 AA 1 clustered-core",
        "table": r"^0 32768 mirror userspace 3 ulogvm-basic-core clustered-core 1024 2 7:\d+ 0 7:\d+ 0",
        "stop_rc_1": "0",
    },
    "basic-disk": {
        "write_on_all_legs": "yes",
        "status": rf"^0 32768 mirror 2 {LEGS} 32/32 1 AA 3 clustered-disk 7:\d+ A",
        "table": r"^0 32768 mirror userspace 4 ulogvm-basic-disk clustered-disk 7:\d+ 1024 2 7:\d+ 0 7:\d+ 0",
        "stop_rc_1": "0",
    },
    "integrated-flush": {
        "write_on_all_legs": "yes",
        "legs_after_write2": "equal",
        "table": r"^0 32768 mirror userspace 4 ulogvm-iflush integrated_flush clustered-core 1024 2 .*",
        "capture_mark_region": "0",
        "capture_flush_with_payload": r"^[1-9][0-9]*",
        "delayed_flush_wait_seconds": r"^[0-9]+\.[0-9]$",  # the payload-less FLUSH after clears came
    },
    "suspend-resume": {
        "suspend_rc": "0",
        "write_blocked_while_suspended": "yes",
        "resume_rc": "0",
        "blocked_write_rc": "0",
        "sync_after_resume": REGIONS,
        "resync_after_resume": "0",
        "legs_after_resume": "equal",
    },
    "reload-same-uuid": {
        "reload_rc": "0",
        "inactive_table_present": "1",
        "resume_rc": "0",
        "sync_after_swap": REGIONS,
        "full_resync_after_swap": "no",
        "legs_after_swap": "equal",
        "luids_in_capture": "2",
    },
    "clear-inactive": {
        "clear_rc": "0",
        "inactive_table_present": "0",
        "clear2_rc": "0",
        "sync_after_clear": REGIONS,
        "resync_after_clear": "0",
        "daemon_alive": "yes",
    },
}


@pytest.mark.guest(SUITE_CORE)
@pytest.mark.parametrize("name", CORE_SCENARIOS)
def test_core_scenario(suite_core: ScenarioRun, name: str) -> None:
    common_mirror_checks(suite_core, name)
    assert_values(suite_core, name, CORE_SCENARIOS[name])


@pytest.mark.guest(SUITE_RESTART)
@pytest.mark.parametrize("mode", ["kill9", "sigterm"])
def test_restart(suite_restart: ScenarioRun, mode: str) -> None:
    name = f"{mode}-restart"
    common_mirror_checks(suite_restart, name)
    assert_values(suite_restart, name, {
        "writer_rc": "0",
        "writer_ok": "0",
        "legs_after_writer": "equal",
        "sync": REGIONS,
        "legs_final": "equal",
    })
    if mode == "sigterm":
        assert_values(suite_restart, name, {"stop_rc_1": "0"})


@pytest.mark.guest(SUITE_RESTART)
def test_restart_resyncs_only_what_was_dirty(suite_restart: ScenarioRun) -> None:
    """LMDB: nothing to resync after kill -9 (the kernel lived on); memory: every region, like cmirrord."""
    assert_values(suite_restart, "kill9-restart", {"resync_after_restart": "0", "resync_after_resume": "0"})
    # A clean stop leaves group 7 first and answers what was queued: no kernel request times out.
    assert_values(suite_restart, "sigterm-restart", {"resync_after_restart": "0", "resync_after_resume": "0",
                                                     "dmesg_timed_out": "0"})
    common_mirror_checks(suite_restart, "kill9-memory")
    assert_values(suite_restart, "kill9-memory", {
        "resync_after_resume": "32",
        "legs_final": "equal",
        "sync": REGIONS,
    })


#: Error replies a scenario expects: the memory backend forgets its logs at a restart, and a lost
#: state directory loses them too; the daemon answers the kernel's next requests with -ESRCH (3),
#: which makes the kernel re-register them.
EXPECTED_ERRORS = {"kill9-memory": {3}, "state-lost": {3}}
#: Scenarios served by something else than dm-ulogd (their capture is not in its format).
NOT_DM_ULOGD = {"smoke-listener"}


@pytest.mark.parametrize("suite", [pytest.param("suite_core", marks=pytest.mark.guest(SUITE_CORE)),
                                   pytest.param("suite_restart", marks=pytest.mark.guest(SUITE_RESTART))])
def test_no_unexpected_error_replies(suite: str, request: pytest.FixtureRequest) -> None:
    """Every request the kernel sent was captured; no reply carried an error the scenario did not expect."""
    run: ScenarioRun = request.getfixturevalue(suite)
    scenarios = [p for p in run.out.iterdir() if p.is_dir() and p.name not in NOT_DM_ULOGD]
    assert scenarios, run.explain()
    for scen in scenarios:
        captures = sorted(scen.glob("capture*.bin"))
        assert captures, f"{scen.name}: no capture"
        p = subprocess.run([sys.executable, str(ROOT / "tools" / "vm" / "capture_scan.py"), "errors",
                            *map(str, captures)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        allowed = EXPECTED_ERRORS.get(scen.name, set())
        unexpected = [line for line in p.stdout.splitlines() if int(line.split()[1]) not in allowed]
        assert not unexpected, f"{scen.name}: unexpected error replies:\n" + "\n".join(unexpected[:20])


@pytest.mark.guest(DEMO)
def test_readme_demo(harness: None) -> None:
    """The README's main command: kill -9 under a live mirror costs no resync, data identical."""
    require_daemon()
    run = guests.result(DEMO)
    assert run.rc == 0, run.explain()
    assert "dm-ulogd demo on a real kernel (passed)" in run.stdout
    assert_values(run, "demo", {
        "dirty_regions_at_crash": r"^(none|[0-9,-]+)$",
        "regions_resynced_after_restart": "0",
        "writes_failed": "0",
        "legs_after_restart": "equal",
        "regions_resynced_after_reactivation": "0",
        "legs_final": "equal",
        "status_final": rf"^0 32768 mirror 2 {LEGS} 32/32 1 AA 1 clustered-core",
        "dirty_region_count_at_crash": r"^[0-9]+$",
        "kill_uptime": r"^[0-9]+\.[0-9]+$",
        "restart_uptime": r"^[0-9]+\.[0-9]+$",
        "outage_seconds": r"^[0-9]+\.[0-9]$",
        "kernel_send_failures": r"^[0-9]+$",
    })
    # The count and the region numbers agree ("none" exactly when 0).
    count, regions = run.get("demo.dirty_region_count_at_crash"), run.get("demo.dirty_regions_at_crash")
    assert (count == "0") == (regions == "none"), run.explain()
    # The outage is measured on the guest clock: the scenario keeps the daemon down 5 s after the kill.
    killed, back = float(run.get("demo.kill_uptime") or 0), float(run.get("demo.restart_uptime") or 0)
    assert float(run.get("demo.outage_seconds") or 0) == pytest.approx(back - killed, abs=0.06)
    assert back - killed >= 5
    # Live output (ulogvm's stderr, streamed by run_ulogvm) and a summary that says why.
    assert "demo: daemon killed with SIGKILL" in run.stderr and "[guest " in run.stderr
    assert "a daemon-only crash needs none" in run.stdout


@pytest.mark.guest(SUITE_RESTART)
def test_state_directory_lost_under_a_live_mirror_gives_a_full_resync_never_clean(
        suite_restart: ScenarioRun) -> None:
    """The daemon killed, its state directory wiped, started again with nothing
    while a writer runs: the kernel re-registers the log, which comes back all out of sync (logged
    once), is resynced whole, and the legs end identical."""
    run = suite_restart
    assert_values(run, "state-lost", {
        "rc": "0", "no_state_logged": "1", "sync_after_reconnect": "0/32", "writer_ok": "0",
        "resync_after_state_lost": "32", "legs_final": "equal",
    })
