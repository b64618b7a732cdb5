"""Real-kernel tests: dm-log-userspace under qemu, driven by tools/vm/ulogvm.py.

Each test boots a guest (software emulation, ~20 s per boot plus the scenario) and asserts on the
``key=value`` lines the scenario wrote to ``result.txt``. Results are kept in
``<checkout>/results/pytest-<scenario>/<time>-<pid>/`` (console log, dmesg, daemon logs, captures;
``latest`` links the newest run; a run that failed is kept, one that passed goes at the next run).

Prerequisite: ``python3 tools/vm/ulogvm.py setup`` (host packages, kernel package, initramfs).
Set ``ULOG_SKIP_KERNEL=1`` to skip these tests; otherwise a missing harness is a failure.
``ULOG_KERNEL_BACKEND=memory`` runs the daemon scenarios with another backend (default: lmdb).

A test shows its scenario's steps on the terminal as they happen (``ulogvm.py`` streams them on its
stderr, ``run_ulogvm`` passes them on past pytest's capture; ``-q`` silences them): a boot takes
minutes under emulation and must not look like a hang.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ULOGVM = ROOT / "tools" / "vm" / "ulogvm.py"
SETUP_HINT = "run `python3 tools/vm/ulogvm.py setup` first (needs root and the Debian package mirror)"

pytestmark = pytest.mark.kernel

REGIONS = "32/32"
LEGS = r"7:\d+ 7:\d+"


@dataclass
class ScenarioRun:
    name: str
    rc: int
    out: Path
    results: dict[str, str]
    stderr: str

    def get(self, key: str) -> str | None:
        return self.results.get(key)

    def explain(self) -> str:
        failed = [f"{k}={v}" for k, v in self.results.items() if k.endswith(".failed")]
        log = self.out / "scenario.log"
        tail = log.read_text(errors="replace").splitlines()[-30:] if log.is_file() else []
        return (f"scenario {self.name}: exit code {self.rc}; results in {self.out}\n"
                f"failed checks: {failed or 'none'}\nulogvm: {self.stderr.strip()[-2000:]}\n"
                "scenario.log tail:\n" + "\n".join(tail))


def parse_results(path: Path) -> dict[str, str]:
    results: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                if key.endswith(".failed") and key in results:
                    value = f"{results[key]}; {value}"
                results[key] = value
    return results


class _Live:
    """Where ``show`` writes: the running pytest's config (set by tests/kernel/conftest.py)."""

    config: pytest.Config | None = None


LIVE = _Live()


def show(line: str) -> None:
    """Put ``line`` on the terminal now, past pytest's output capture (a real-kernel test runs for a
    minute or more; its progress is no use in a report at the end)."""
    config = LIVE.config
    if config is None or config.get_verbosity() < 0:
        return
    capman = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if capman is None or reporter is None:  # -p no:capture or no terminal: nothing is in the way
        print(line, file=sys.stderr, flush=True)
        return
    with capman.global_and_fixture_disabled():
        reporter.write_line(line)


def run_ulogvm(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``tools/vm/ulogvm.py ARGS``, its stderr (a line per scenario step, see ``ulogvm.Progress``)
    shown as it comes and returned with its stdout. Raises subprocess.TimeoutExpired after
    ``timeout`` seconds (qemu dies with ulogvm: PR_SET_PDEATHSIG)."""
    cmd = [sys.executable, str(ULOGVM), *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace")
    out_pipe, err_pipe = proc.stdout, proc.stderr
    assert out_pipe is not None and err_pipe is not None
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.append(out_pipe.read()), daemon=True)
    reader.start()
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    stderr: list[str] = []
    try:
        for line in err_pipe:
            stderr.append(line)
            show("    " + line.rstrip("\n"))
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # an exception here (Ctrl-C): never leave ulogvm (and qemu) behind
            proc.kill()
            proc.wait()
    reader.join()
    if killed.is_set():
        raise subprocess.TimeoutExpired(cmd, timeout, "".join(stdout), "".join(stderr))
    return subprocess.CompletedProcess(cmd, rc, "".join(stdout), "".join(stderr))


def require_harness() -> None:
    if os.environ.get("ULOG_SKIP_KERNEL") == "1":
        pytest.skip("ULOG_SKIP_KERNEL=1: real-kernel (qemu) tests skipped")
    p = subprocess.run([sys.executable, str(ULOGVM), "check"], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        pytest.fail(f"real-kernel harness not ready: {p.stderr.strip()}\n{SETUP_HINT}", pytrace=False)


def require_daemon() -> None:
    if not (ROOT / "ulog_disk" / "__main__.py").is_file():
        pytest.fail("ulog_disk/__main__.py is missing: `python -m ulog_disk` (dm-ulogd) cannot start in the "
                    "guest; the daemon scenarios need it", pytrace=False)


def run_dir(name: str) -> Path:
    """A results directory of its own for this run: ``results/pytest-<name>/<UTC time>-<pid>``.

    Earlier runs of the scenario that passed (exit code 0, no failed check) are removed; a run
    that failed keeps its evidence (console, dmesg, daemon logs, captures) until removed by hand,
    whatever runs after it (issue #12: a failure whose directory the next run emptied)."""
    base = ROOT / "results" / f"pytest-{name}"
    if base.is_dir():
        for old in base.iterdir():
            rc = old / "rc.txt"
            if old.is_dir() and rc.is_file() and rc.read_text().strip() == "0" and not any(
                    k.endswith(".failed") for k in parse_results(old / "result.txt")):
                shutil.rmtree(old, ignore_errors=True)
    out = base / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}"
    latest = base / "latest"
    base.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        latest.unlink()
    latest.symlink_to(out.name)
    return out


def finished(out: Path, rc: int) -> None:
    """Record the run's exit code (what run_dir reads to tell a passed run from a failed one)."""
    with contextlib.suppress(OSError):
        (out / "rc.txt").write_text(f"{rc}\n")


def run_scenario(name: str, timeout: int = 600, env: tuple[str, ...] = ()) -> ScenarioRun:
    out = run_dir(name)
    args = ["run", name, "--out", str(out), "--timeout", str(timeout)]
    backend = os.environ.get("ULOG_KERNEL_BACKEND")
    for item in (*env, *([f"BACKEND={backend}"] if backend else [])):
        args += ["--env", item]
    p = run_ulogvm(args, timeout=timeout + 90)
    finished(out, p.returncode)
    if p.returncode == 2 and "setup" in p.stderr:
        pytest.fail(f"{p.stderr.strip()}\n{SETUP_HINT}", pytrace=False)
    return ScenarioRun(name, p.returncode, out, parse_results(out / "result.txt"), p.stderr)


def assert_values(run: ScenarioRun, prefix: str, expected: dict[str, str]) -> None:
    """Every ``prefix.key`` must equal the expected value, or fully match it if it starts with ``^``."""
    for key, want in expected.items():
        got = run.get(f"{prefix}.{key}")
        ok = got is not None and (re.fullmatch(want[1:], got) if want.startswith("^") else got == want)
        assert ok, f"{prefix}.{key}: got {got!r}, want {want!r}\n{run.explain()}"


@pytest.fixture(scope="module")
def harness() -> None:
    require_harness()


# ---------------------------------------------------------------------------------------------
# Harness self-tests (no dependency on the ulog_disk package)


def test_unknown_scenario_is_refused() -> None:
    if os.environ.get("ULOG_SKIP_KERNEL") == "1":
        pytest.skip("ULOG_SKIP_KERNEL=1: real-kernel (qemu) tests skipped")
    p = subprocess.run([sys.executable, str(ULOGVM), "run", "no-such-scenario"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2
    assert "no scenario" in p.stderr


def test_smoke_listener(harness: None) -> None:
    run = run_scenario("smoke-listener", timeout=300)
    assert run.rc == 0, run.explain()
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


def test_guest_timeout_is_enforced(harness: None) -> None:
    run = run_scenario("selftest-timeout", timeout=45)
    assert run.rc == 124, run.explain()
    assert run.get("selftest-timeout.sleeping") == "yes"
    assert (run.out / "console.log").is_file()
    assert float((run.out / "wall-seconds").read_text()) < 45 + 15


# ---------------------------------------------------------------------------------------------
# dm-ulogd scenarios (need the daemon: python -m ulog_disk)


@pytest.fixture(scope="module")
def suite_core(harness: None) -> Iterator[ScenarioRun]:
    require_daemon()
    yield run_scenario("suite-core", timeout=900)


@pytest.fixture(scope="module")
def suite_restart(harness: None) -> Iterator[ScenarioRun]:
    require_daemon()
    yield run_scenario("suite-restart", timeout=600)


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


def test_basic_core(suite_core: ScenarioRun) -> None:
    common_mirror_checks(suite_core, "basic-core")
    assert_values(suite_core, "basic-core", {
        "write_on_all_legs": "yes",
        "legs_after_write": "equal",
        "status": rf"^0 32768 mirror 2 {LEGS} 32/32 1 AA 1 clustered-core",
        "table": r"^0 32768 mirror userspace 3 ulogvm-basic-core clustered-core 1024 2 7:\d+ 0 7:\d+ 0",
        "stop_rc_1": "0",
    })


def test_basic_disk(suite_core: ScenarioRun) -> None:
    common_mirror_checks(suite_core, "basic-disk")
    assert_values(suite_core, "basic-disk", {
        "write_on_all_legs": "yes",
        "status": rf"^0 32768 mirror 2 {LEGS} 32/32 1 AA 3 clustered-disk 7:\d+ A",
        "table": r"^0 32768 mirror userspace 4 ulogvm-basic-disk clustered-disk 7:\d+ 1024 2 7:\d+ 0 7:\d+ 0",
        "stop_rc_1": "0",
    })


def test_integrated_flush(suite_core: ScenarioRun) -> None:
    common_mirror_checks(suite_core, "integrated-flush")
    assert_values(suite_core, "integrated-flush", {
        "write_on_all_legs": "yes",
        "legs_after_write2": "equal",
        "table": r"^0 32768 mirror userspace 4 ulogvm-iflush integrated_flush clustered-core 1024 2 .*",
        "capture_mark_region": "0",
        "capture_flush_with_payload": r"^[1-9][0-9]*",
    })


def test_suspend_resume(suite_core: ScenarioRun) -> None:
    common_mirror_checks(suite_core, "suspend-resume")
    assert_values(suite_core, "suspend-resume", {
        "suspend_rc": "0",
        "write_blocked_while_suspended": "yes",
        "resume_rc": "0",
        "blocked_write_rc": "0",
        "sync_after_resume": REGIONS,
        "resync_after_resume": "0",
        "legs_after_resume": "equal",
    })


def test_reload_same_uuid(suite_core: ScenarioRun) -> None:
    common_mirror_checks(suite_core, "reload-same-uuid")
    assert_values(suite_core, "reload-same-uuid", {
        "reload_rc": "0",
        "inactive_table_present": "1",
        "resume_rc": "0",
        "sync_after_swap": REGIONS,
        "full_resync_after_swap": "no",
        "legs_after_swap": "equal",
        "luids_in_capture": "2",
    })


def test_clear_inactive(suite_core: ScenarioRun) -> None:
    common_mirror_checks(suite_core, "clear-inactive")
    assert_values(suite_core, "clear-inactive", {
        "clear_rc": "0",
        "inactive_table_present": "0",
        "clear2_rc": "0",
        "sync_after_clear": REGIONS,
        "resync_after_clear": "0",
        "daemon_alive": "yes",
    })


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


#: Error replies a scenario expects: the memory backend forgets its logs at a restart and answers
#: the kernel's next requests with -ESRCH (3), which makes the kernel re-register them.
EXPECTED_ERRORS = {"kill9-memory": {3}}


@pytest.mark.parametrize("suite", ["suite-core", "suite-restart"])
def test_no_unexpected_error_replies(suite: str, suite_core: ScenarioRun, suite_restart: ScenarioRun) -> None:
    """Every request the kernel sent was captured; no reply carried an error the scenario did not expect."""
    run = suite_core if suite == "suite-core" else suite_restart
    scenarios = [p for p in run.out.iterdir() if p.is_dir()]
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


def test_readme_demo(harness: None) -> None:
    """The README's main command: kill -9 under a live mirror costs no resync, data identical."""
    require_daemon()
    out = run_dir("demo")
    p = run_ulogvm(["demo", "--out", str(out), "--timeout", "600"], timeout=700)
    finished(out, p.returncode)
    run = ScenarioRun("demo", p.returncode, out, parse_results(out / "result.txt"), p.stderr)
    assert run.rc == 0, run.explain()
    assert "dm-ulogd demo on a real kernel (passed)" in p.stdout
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
    assert "demo: daemon killed with SIGKILL" in p.stderr and "[guest " in p.stderr
    assert "a daemon-only crash needs none" in p.stdout


def test_state_directory_lost_under_a_live_mirror_gives_a_full_resync_never_clean(harness: None) -> None:
    """Issue #12 item 3: the daemon killed, its state directory wiped, started again with nothing
    while a writer runs: the kernel re-registers the log, which comes back all out of sync (logged
    once), is resynced whole, and the legs end identical."""
    require_daemon()
    run = run_scenario("state-lost", timeout=300)
    assert run.rc == 0, run.explain()
    assert_values(run, "state-lost", {
        "no_state_logged": "1", "sync_after_reconnect": "0/32", "writer_ok": "0",
        "resync_after_state_lost": "32", "legs_final": "equal",
    })
