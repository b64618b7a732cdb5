"""64 mirrors on one daemon through the kernel model.

One dm-ulogd (LMDB) and one kernel connection shared by 64 mirror threads, as the kernel's one
connector socket is shared by every kmirrord: each mirror writes (mark, flush, write both legs,
clear), recovers regions, reads its status, and now and then suspends and resumes. For the run's
length (60 s by default, ``ULOG_REL_LOAD_SECONDS``; 600 s in the long mode):

* no reply takes longer than the kernel's 15 s timeout (the model resends after 15 s, as the
  kernel does: 0 resends), and no request fails;
* the daemon's memory is flat: VmRSS is sampled every second, and the median of the last quarter of
  the run may exceed the median of the first quarter (after a warm-up) by at most 10 % + 8 MiB; the
  number of open file descriptors does not grow;
* every region the log calls in sync is identical on both legs, at the end.

Figures: requests and FLUSHes served, p50/p99/max FLUSH round trip, the slowest reply of any
kind, RSS at the start, end and peak. Timing is recorded, never asserted on, except the 15 s limit.
"""

from __future__ import annotations

import os
import random
import resource
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

from rel_lib import figures, launch, scale

from ulog_disk.protocol.wire import RequestType as T
from ulog_disk.testing.client import Client, ctr_text
from ulog_disk.testing.kernelmodel import KERNEL_TIMEOUT, KernelConnection, Mirror, UserspaceLog
from ulog_disk.testing.stats import percentile

SECONDS = float(scale("ULOG_REL_LOAD_SECONDS", 60.0, 600.0))
MIRRORS = int(scale("ULOG_REL_LOAD_MIRRORS", 64, 64))
WARMUP = min(10.0, SECONDS / 6)


class TimedConnection(KernelConnection):
    """The kernel's transfer layer, timing every request (FLUSH round trips kept whole)."""

    def __init__(self, *args, **kwargs):
        self.stat_lock = threading.Lock()
        self.flush_seconds: list[float] = []
        self.max_seconds = 0.0
        self.max_kind = ""
        self.count: Counter = Counter()
        self.failed: Counter = Counter()
        super().__init__(*args, **kwargs)

    def send_request(self, uuid, luid, rtype, data=b"", max_reply=0):
        t0 = time.perf_counter()
        error, out = super().send_request(uuid, luid, rtype, data, max_reply)
        dt = time.perf_counter() - t0
        with self.stat_lock:
            self.count[rtype.name] += 1
            if rtype is T.FLUSH:
                self.flush_seconds.append(dt)
            if dt > self.max_seconds:
                self.max_seconds, self.max_kind = dt, rtype.name
            if error:
                self.failed[f"{rtype.name} {error}"] += 1
        return error, out


def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_64_mirrors_on_one_daemon(tmp_path: Path) -> None:
    d = launch(tmp_path, state_dir=tmp_path / "state")
    conn = TimedConnection(str(d.socket_path), timeout=KERNEL_TIMEOUT)
    mirrors: list[Mirror] = []
    try:
        for i in range(MIRRORS):
            kind = ("clustered-core", f"clustered-disk 253:{i}", "core")[i % 3]
            regions = (256, 1024, 4096)[i % 3]
            log = UserspaceLog(conn, f"LVM-load-{i:02d}", 0x10000 + i, f"{regions * 1024} {kind} 1024",
                               integrated_flush=i % 4 == 1, reconnect_delay=0.5)
            m = Mirror(log)
            assert m.construct() == 0
            m.resume()
            mirrors.append(m)
        stop = threading.Event()
        errors: list[str] = []
        done = Counter()

        def drive(m: Mirror, seed: int) -> None:
            rng = random.Random(seed)
            try:
                while not stop.is_set():
                    pick = rng.random()
                    if pick < 0.6:
                        m.write(rng.sample(range(m.log.region_count), rng.randint(1, 8)))
                        m.update_states()
                        done["writes"] += 1
                    elif pick < 0.9:
                        m.recover_one()
                        done["recoveries"] += 1
                    elif pick < 0.995:
                        m.status()
                        done["status"] += 1
                    else:
                        m.suspend()
                        m.resume()
                        done["suspend_resume"] += 1
                    if m.log_failure:
                        errors.append(f"{m.log.uuid}: log failure: {m.log.errors[-3:]}")
                        return
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(f"{m.log.uuid}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=drive, args=(m, i), daemon=True) for i, m in enumerate(mirrors)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        rss: list[tuple[float, int]] = []
        fds: list[int] = []
        while time.monotonic() - t0 < SECONDS and not errors:
            time.sleep(1.0)
            rss.append((time.monotonic() - t0, d.rss_kib()))
            fds.append(daemon_fds(d.pid))
        stop.set()
        for t in threads:
            t.join(KERNEL_TIMEOUT * 2)
            assert not t.is_alive(), "a mirror thread hangs"
        elapsed = time.monotonic() - t0
        assert not errors, errors[:5]
        # every region the log calls in sync is the same on both legs
        diverged = {m.log.uuid: bad for m in mirrors if (bad := m.legs_identical_where_in_sync())}
        assert not diverged, diverged
        failed = dict(conn.failed)
        assert not failed, failed
        assert conn.resends == 0, f"{conn.resends} requests waited longer than {KERNEL_TIMEOUT} s"
        assert conn.max_seconds < KERNEL_TIMEOUT
        # memory flat
        steady = [kib for t, kib in rss if t >= WARMUP]
        quarter = max(1, len(steady) // 4)
        first, last = statistics.median(steady[:quarter]), statistics.median(steady[-quarter:])
        growth_kib = last - first
        flushes = conn.flush_seconds
        requests = sum(conn.count.values())
        figures("load.64_mirrors", mirrors=MIRRORS, seconds=round(elapsed, 1), requests=requests,
                requests_per_second=round(requests / elapsed), flushes=len(flushes),
                flush_p50_ms=round(percentile(flushes, 50) * 1e3, 2),
                flush_p99_ms=round(percentile(flushes, 99) * 1e3, 2),
                flush_max_ms=round(max(flushes) * 1e3, 1), slowest_reply_ms=round(conn.max_seconds * 1e3, 1),
                slowest_kind=conn.max_kind, replies_over_15s=conn.resends, actions=dict(done),
                rss_first_quarter_mib=round(first / 1024, 1), rss_last_quarter_mib=round(last / 1024, 1),
                rss_peak_mib=round(max(k for _, k in rss) / 1024, 1), fds_start=fds[0], fds_end=fds[-1],
                violations=0)
        assert growth_kib <= 0.10 * first + 8 * 1024, f"RSS grew from {first} KiB to {last} KiB"
        assert max(fds) <= fds[0] + 8, f"open file descriptors grew: {fds[0]} -> {max(fds)}"
        for m in mirrors:
            m.suspend()
            m.destroy()
        conn.close()
        assert d.stop() == 0
    finally:
        if d.alive():
            d.kill9()


def test_mirror_churn_does_not_leak_descriptors(tmp_path: Path) -> None:
    """Create and remove 100 mirrors of distinct uuids under a 128-descriptor limit (pvmove makes a
    temporary mirror of a new uuid each time). (Found by this test: every uuid's environment stayed
    open for the daemon's lifetime and the 39th new mirror failed; fixed in 94e3b18.)"""
    d = launch(tmp_path, state_dir=tmp_path / "state",
               preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128)))
    try:
        c = Client(d.socket_path)  # type: ignore[arg-type]
        start = daemon_fds(d.pid)
        failures = []
        for i in range(100):
            uuid = f"LVM-churn-{i:03d}"
            for rtype, data in ((T.CTR, ctr_text(64).encode()), (T.RESUME, b""), (T.PRESUSPEND, b""),
                                (T.POSTSUSPEND, b""), (T.DTR, b"")):
                error, _ = c.request(uuid, 1, rtype, data)
                if error:
                    failures.append(f"{uuid} {rtype.name}: {error}")
        end = daemon_fds(d.pid)
        c.close()
        assert d.stop() == 0
        figures("load.uuid_churn", mirrors_created_and_removed=100, fds_start=start, fds_end=end,
                failed_requests=len(failures),
                violations=len(failures) + (end > start + 8))
        assert not failures, failures[:5]
        assert end <= start + 8, f"open descriptors grew from {start} to {end}"
    finally:
        if d.alive():
            d.kill9()
