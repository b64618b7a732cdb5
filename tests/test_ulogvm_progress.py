"""tools/vm/ulogvm.py's live output and demo summary, without booting anything.

The lines below are copied from a real demo run's console (results/…/console.log); the real-kernel
tests show the same code at work under qemu."""

from __future__ import annotations

import importlib.util
import re
import sys
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
