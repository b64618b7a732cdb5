"""tools/vm/ulogvm.py's live output and demo summary, and the real-kernel tests' pool of guests
(tests/kernel/guests.py), without booting anything.

The lines below are copied from a real demo run's console (results/…/console.log); the real-kernel
tests show the same code at work under qemu."""

from __future__ import annotations

import importlib.util
import re
import sys
import threading
import time
from pathlib import Path

import pytest

from ulog_disk.testing.clock import ManualClock

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ulogvm", ROOT / "tools" / "vm" / "ulogvm.py")
assert _spec is not None and _spec.loader is not None
ulogvm = importlib.util.module_from_spec(_spec)
sys.modules["ulogvm"] = ulogvm  # dataclasses look their module up by name
_spec.loader.exec_module(ulogvm)

CONSOLE = """\
[    0.000000] Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org)
[    1.102334] ACPI: PM-Timer IO Port: 0x608
ulogvm: init started at uptime 1.60
ulogvm: running scenario at uptime 2.56
[3.44] demo: start
[20.40] demo: daemon killed with SIGKILL
[   35.455549] device-mapper: dm-log-userspace: Unable to send log request [10] to userspace: -3
[   35.460000] random: crng init done
[36.94] demo: ready_seconds_2=5.7

[48.37] demo: finished rc=0 in 45.2s
"""


def test_console_lines_shown_are_steps_init_and_mirror_kernel_messages() -> None:
    shown = [ulogvm.console_step(line) for line in CONSOLE.splitlines()]
    assert shown == [
        None,  # boot chatter stays in console.log
        None,
        (None, "init started at uptime 1.60"),
        (None, "running scenario at uptime 2.56"),
        (3.44, "demo: start"),
        (20.40, "demo: daemon killed with SIGKILL"),
        (35.455549,
         "kernel: device-mapper: dm-log-userspace: Unable to send log request [10] to userspace: -3"),
        None,  # a kernel message that is not about the mirror
        (36.94, "demo: ready_seconds_2=5.7"),
        None,
        (48.37, "demo: finished rc=0 in 45.2s"),
    ]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    c = ManualClock(1000.0)
    monkeypatch.setattr(ulogvm.time, "monotonic", c)
    return c


def test_progress_streams_steps_with_guest_time_and_speaks_up_when_silent(clock: ManualClock) -> None:
    out: list[str] = []
    p = ulogvm.Progress(1, 1, steps=True, write=out.append)
    clock.now += ulogvm.HEARTBEAT_S - 0.5
    p.tick()
    assert out == []  # not silent for long enough yet
    clock.now += 1
    p.tick()
    assert len(out) == 1 and "guest kernel booting" in out[0] and "wall" in out[0]
    for line in CONSOLE.splitlines():
        p.line(line)
    assert out[1:] == [
        "[guest         ] init started at uptime 1.60",
        "[guest         ] running scenario at uptime 2.56",
        "[guest    3.44s] demo: start",
        "[guest   20.40s] demo: daemon killed with SIGKILL",
        "[guest   35.46s] kernel: device-mapper: dm-log-userspace: Unable to send log request [10] to "
        "userspace: -3",
        "[guest   36.94s] demo: ready_seconds_2=5.7",
        "[guest   48.37s] demo: finished rc=0 in 45.2s",
    ]
    clock.now += ulogvm.HEARTBEAT_S
    p.tick()
    assert "scenario running, last step at guest 48.37s" in out[-1]


def test_a_kernel_message_storm_is_counted_not_streamed(clock: ManualClock) -> None:
    out: list[str] = []
    p = ulogvm.Progress(1, 1, steps=True, write=out.append)
    unable = "device-mapper: dm-log-userspace: Unable to send log request [1] to userspace: -3"
    p.line(f"[  516.000000] {unable}")
    for i in range(1, 1000):  # a storm: the same message every 10 µs
        p.line(f"[  516.{i * 10:06d}] {unable}")
        p.tick()
    assert out == [f"[guest  516.00s] kernel: {unable}"]
    clock.now += ulogvm.REPEAT_REPORT_S
    for i in range(1000, 1500):
        p.line(f"[  516.{i * 10:06d}] {unable}")
        p.tick()
    assert out[1:] == ["[guest  516.01s] kernel: the same message 1000 more times (all in console.log)"]
    p.line("[530.10] demo: ready_seconds_2=5.7")  # the storm's remainder is reported before the next step
    assert out[2:] == ["[guest  516.01s] kernel: the same message 499 more times (all in console.log)",
                       "[guest  530.10s] demo: ready_seconds_2=5.7"]
    # the kernel's retries every 2 s are not a storm: each is shown
    p.line(f"[  532.000000] {unable}")
    p.line(f"[  534.000000] {unable}")
    assert out[4:] == [f"[guest  532.00s] kernel: {unable}", f"[guest  534.00s] kernel: {unable}"]


def test_progress_with_the_console_echoed_only_keeps_the_heartbeat(clock: ManualClock) -> None:
    out: list[str] = []
    p = ulogvm.Progress(2, 3, steps=False, write=out.append)
    for line in CONSOLE.splitlines():
        p.line(line)
    assert out == []
    clock.now += ulogvm.HEARTBEAT_S
    p.tick()
    assert out == ["[boot 2/3 wall     8s] scenario running, last step at guest 48.37s"]


def test_run_qemu_passes_each_console_line_to_the_console_log_and_the_progress(tmp_path: Path) -> None:
    out: list[str] = []
    console = tmp_path / "console.log"
    script = "printf '%s\\n' 'ulogvm: running scenario at uptime 2.56' '[3.44] demo: start' 'noise'"
    with console.open("wb") as f:
        rc, raw = ulogvm.run_qemu(["sh", "-c", script], f, False, 30,
                                  ulogvm.Progress(1, 1, steps=True, write=out.append))
    assert rc == 0
    assert raw.decode().splitlines() == ["ulogvm: running scenario at uptime 2.56", "[3.44] demo: start",
                                         "noise"]
    assert console.read_bytes() == raw
    assert out == ["[guest         ] running scenario at uptime 2.56", "[guest    3.44s] demo: start"]


#: result.txt of a demo run (demo.* keys, prefix removed), as cmd_demo reads it.
DEMO = {
    "sync_initial": "32/32", "resync_initial": "32",
    "status_after_create": "0 32768 mirror 2 7:0 7:1 32/32 1 AA 1 clustered-core",
    "kill_uptime": "20.41", "dirty_region_count_at_crash": "2", "dirty_regions_at_crash": "17,25",
    "restart_uptime": "36.94", "outage_seconds": "16.5", "kernel_send_failures": "1", "kernel_timeouts": "1",
    "kernel_server_not_found": "1", "kernel_reconnects": "1", "writer": "writer: 192 writes of 64 KiB",
    "writes_failed": "0", "regions_resynced_after_restart": "0", "legs_after_restart": "equal",
    "regions_resynced_after_reactivation": "0", "legs_final": "equal",
    "status_final": "0 32768 mirror 2 7:0 7:1 32/32 1 AA 1 clustered-core",
}


def summary_line(lines: list[str], label: str) -> str:
    """The summary's entry for ``label``, its wrapped continuation lines joined."""
    starts = [i for i, line in enumerate(lines) if line.strip().startswith(label)]
    assert len(starts) == 1, (label, lines)
    entry = [lines[starts[0]]]
    for line in lines[starts[0] + 1:]:
        if not line.startswith("    "):
            break
        entry.append(line.strip())
    return " ".join(entry)


def test_demo_summary_tells_counts_from_region_numbers_and_says_why() -> None:
    lines = ulogvm.demo_summary(DEMO)
    assert "2 (regions 17, 25): writes in flight" in summary_line(lines, "regions marked dirty at the kill")
    one = ulogvm.demo_summary(dict(DEMO, dirty_region_count_at_crash="1", dirty_regions_at_crash="10"))
    assert "1 (region 10): writes in flight" in summary_line(one, "regions marked dirty at the kill")
    assert ("16.5 s (measured: killed at 20.41 s, serving again at 36.94 s)"
            in summary_line(lines, "daemon down for"))
    kernel = summary_line(lines, "kernel messages while it was down")
    assert "1 'Unable to send log request ... -3'" in kernel and "1 'Request timed out'" in kernel
    assert "0 of the random writer's 192 (64 KiB each" in summary_line(lines, "writes that failed")
    assert "0: a daemon-only crash needs none" in summary_line(lines, "regions resynced after the restart")
    assert "resyncs all 32" in summary_line(lines, "regions resynced after remove + create")
    # the values start in one column, long ones wrap under it
    column = {re.match(r"  \S+(?: \S+)* +", line).end() for line in lines if line[2] != " "}  # type: ignore[union-attr]
    assert len(column) == 1
    col = column.pop()
    continued = [line for line in lines if line[2] == " "]
    assert continued  # the kernel's line is long enough to wrap
    assert all(line[:col].strip() == "" and line[col] != " " for line in continued)
    assert all(len(line) <= ulogvm.SUMMARY_COLUMNS for line in lines)


def test_demo_summary_says_what_was_expected_and_leaves_out_what_is_missing() -> None:
    values = dict(DEMO, regions_resynced_after_restart="5", dirty_region_count_at_crash="0",
                  dirty_regions_at_crash="none")
    del values["outage_seconds"]
    lines = ulogvm.demo_summary(values)
    assert summary_line(lines, "regions resynced after the restart").endswith("5 (expected 0)")
    assert "0: no region was marked" in summary_line(lines, "regions marked dirty at the kill")
    assert not any("daemon down for" in line for line in lines)
    assert ulogvm.demo_summary({}) == []


# ---------------------------------------------------------------------------------------------
# The real-kernel tests' pool (tests/kernel/guests.py), with a stand-in for the boot

# A copy of its own, under a name of its own: the real one may be running guests in this session.
_gspec = importlib.util.spec_from_file_location("guests_under_test", ROOT / "tests" / "kernel" / "guests.py")
assert _gspec is not None and _gspec.loader is not None
guests = importlib.util.module_from_spec(_gspec)
sys.modules["guests_under_test"] = guests
_gspec.loader.exec_module(guests)


class FakeBoots:
    """Stands in for run_guest: each boot waits until released; records how many ran at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: list[str] = []
        self.running = 0
        self.most = 0
        self.release: dict[str, threading.Event] = {}
        self.fail: set[str] = set()

    def __call__(self, guest: guests.Guest) -> guests.ScenarioRun:
        with self.lock:
            self.started.append(guest.key)
            self.running += 0 if guest.idle else 1
            self.most = max(self.most, self.running)
            gate = self.release.setdefault(guest.key, threading.Event())
        gate.wait(10)
        with self.lock:
            self.running -= 0 if guest.idle else 1
        if guest.key in self.fail:
            raise RuntimeError(f"{guest.key} failed to boot")
        return guests.ScenarioRun(guest.key, 0, Path("/nonexistent"), {f"{guest.key}.rc": "0"}, "")

    def wait_started(self, n: int) -> None:
        deadline = time.monotonic() + 10
        while len(self.started) < n:
            assert time.monotonic() < deadline, self.started
            time.sleep(0.01)

    def finish(self, key: str) -> None:
        with self.lock:
            self.release.setdefault(key, threading.Event()).set()


@pytest.fixture
def boots(monkeypatch: pytest.MonkeyPatch) -> FakeBoots:
    fake = FakeBoots()
    monkeypatch.setattr(guests, "run_guest", fake)
    monkeypatch.setattr(guests, "TERMINAL", guests.Terminal(None))
    return fake


def G(key: str, estimate: float, idle: bool = False) -> guests.Guest:  # noqa: N802 - a constructor
    return guests.Guest(key, key, estimate=estimate, idle=idle)


def test_pool_starts_the_longest_first_one_beside_the_other_tests_then_two(boots: FakeBoots) -> None:
    short, long, middle = G("short", 30), G("long", 200), G("middle", 100)
    pool = guests.Pool([short, long, middle], jobs=2, main_busy=True)
    pool.start()
    try:
        boots.wait_started(1)
        time.sleep(0.1)
        assert boots.started == ["long"]  # pytest still runs tests without a guest: one core for guests
        pool.main_idle()
        boots.wait_started(2)
        assert boots.started == ["long", "middle"]
        time.sleep(0.1)
        assert boots.started == ["long", "middle"]  # never more than jobs at once
        boots.finish("middle")
        assert pool.result(middle) is not None and pool.result(middle).rc == 0
        boots.wait_started(3)
        boots.finish("long")
        boots.finish("short")
        assert pool.result(short).get("short.rc") == "0"
        assert pool.result(long).get("long.rc") == "0"
        assert boots.most == 2
    finally:
        pool.close()


def test_pool_an_idle_guest_takes_no_share_and_starts_first(boots: FakeBoots) -> None:
    timeout_test, work = G("sleeper", 35, idle=True), G("work", 100)
    pool = guests.Pool([work, timeout_test], jobs=1, main_busy=False)
    pool.start()
    try:
        boots.wait_started(2)
        assert boots.started == ["sleeper", "work"]
        boots.finish("work")
        boots.finish("sleeper")
        assert pool.result(work).rc == 0 and pool.result(timeout_test).rc == 0
    finally:
        pool.close()


def test_pool_a_failed_boot_fails_every_test_that_reads_it_and_no_other(boots: FakeBoots) -> None:
    bad, good = G("bad", 50), G("good", 40)
    boots.fail.add("bad")
    pool = guests.Pool([bad, good], jobs=2, main_busy=False)
    pool.start()
    try:
        boots.finish("bad")
        boots.finish("good")
        for _ in range(2):  # two tests reading the same run see the same failure
            with pytest.raises(RuntimeError, match="bad failed to boot"):
                pool.result(bad)
        assert pool.result(good).rc == 0
        assert pool.result(G("not-planned", 1)) is None  # the test then boots it itself
    finally:
        pool.close()


def test_pool_closed_early_fails_what_never_started(boots: FakeBoots) -> None:
    first, second = G("first", 50), G("second", 40)
    pool = guests.Pool([first, second], jobs=1, main_busy=False)
    pool.start()
    boots.wait_started(1)
    pool.close()  # the session ends (-x, Ctrl-C) while "first" runs
    boots.finish("first")
    with pytest.raises(RuntimeError, match="second not started: the session ended"):
        pool.result(second)
    assert boots.started == ["first"]
