"""dm-ulogd --metrics-file: the node_exporter textfile."""

from __future__ import annotations

import errno
import logging
import math
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from ulog_disk.daemon.metrics import FLUSH_BUCKETS, Metrics, Snapshot, requests_by_type
from ulog_disk.log.engine import Stats
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import RequestType
from ulog_disk.testing.kernelmodel import KernelConnection
from ulog_disk.testing.launcher import Daemon, launch

#: Seconds to wait for something the daemon does within about a second (a slow CI machine).
PATIENCE = 30.0


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name → {sorted labels: value}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def by_label(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str,
             label: str) -> dict[str, float]:
    return {dict(k)[label]: v for k, v in samples.get(name, {}).items()}


def mirror_value(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, uuid: str,
                 luid: int) -> float:
    return samples[name][(("luid", f"{luid:#x}"), ("uuid", uuid))]


def ok(conn: KernelConnection, uuid: str, luid: int, rtype: RequestType, data: bytes = b"",
       max_reply: int = 0) -> None:
    error, _ = conn.send_request(uuid, luid, rtype, data, max_reply)
    assert error == 0, (rtype.name, error)


def wait_for(what: str, check: object, daemon: Daemon) -> None:
    deadline = time.monotonic() + PATIENCE
    while not check():  # type: ignore[operator]
        assert daemon.proc.poll() is None, daemon.log_text()[-3000:]
        assert time.monotonic() < deadline, f"{what}: not seen in {PATIENCE} s\n{daemon.log_text()[-3000:]}"
        time.sleep(0.05)


def test_metrics_file_counts_a_known_workload(tmp_path: Path) -> None:
    prom = tmp_path / "textfile" / "ulog.prom"
    prom.parent.mkdir()
    daemon = launch(tmp_path, capture=True, backend="lmdb", extra_args=["--metrics-file", str(prom)])
    conn = KernelConnection(str(daemon.socket_path), timeout=10)
    a, b = ("LVM-metrics-a", 0x10), ("LVM-metrics-b", 0x20)
    ok(conn, *a, RequestType.CTR, b"65536 clustered-core 1024", 128)   # 64 regions
    ok(conn, *b, RequestType.CTR, b"65536 clustered-core 512", 128)    # 128 regions
    for m in (a, b):
        ok(conn, *m, RequestType.RESUME)
    marks_a = [0, 1, 2, 40]
    for region in marks_a:                                              # one MARK_REGION each
        ok(conn, *a, RequestType.MARK_REGION, wire.build_regions([region]))
    ok(conn, *b, RequestType.MARK_REGION, wire.build_regions([10, 11, 12]))  # one, three regions
    flushes = 0
    for m in (a, a, b):
        ok(conn, *m, RequestType.FLUSH)
        flushes += 1
    for region in (5, 6, 40):                                           # recovered on A
        ok(conn, *a, RequestType.SET_REGION_SYNC, wire.build_set_region_sync(region, 1))
    # Written and in sync: clean again (a clear leaves an out-of-sync region dirty).
    ok(conn, *a, RequestType.CLEAR_REGION, wire.build_regions([40]))
    ok(conn, *a, RequestType.FLUSH)
    flushes += 1
    # The bad requests: a MARK_REGION for a log nobody created, and a malformed frame.
    error, _ = conn.send_request("LVM-nobody", 0x99, RequestType.MARK_REGION, wire.build_regions([1]))
    assert error == -errno.ESRCH
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    raw.connect(str(daemon.socket_path))
    raw.settimeout(10)
    frame = bytearray(wire.encode_request(wire.Request(
        luid=1, uuid="u", version=3, seq=7, request_type=RequestType.IN_SYNC, data=wire.build_u64(0))))
    frame[wire.CN_MSG_SIZE + 156] = 200  # data_size past the end: answerable, -EINVAL
    raw.send(bytes(frame))
    assert wire.decode_reply(raw.recv(65536)).error == -errno.EINVAL
    raw.close()
    conn.close()
    assert daemon.stop() == 0

    samples = parse(prom.read_text())
    requests = by_label(samples, "dm_ulogd_requests_total", "type")
    assert requests == {"CTR": 2, "RESUME": 2, "MARK_REGION": len(marks_a) + 1 + 1, "FLUSH": flushes,
                        "CLEAR_REGION": 1, "SET_REGION_SYNC": 3, "invalid": 1}
    assert by_label(samples, "dm_ulogd_errors_total", "type") == {"MARK_REGION": 1, "invalid": 1}
    assert samples["dm_ulogd_flush_latency_seconds_count"][()] == flushes
    buckets = by_label(samples, "dm_ulogd_flush_latency_seconds_bucket", "le")
    assert buckets["+Inf"] == flushes
    ordered = [buckets[repr(b)] for b in FLUSH_BUCKETS] + [buckets["+Inf"]]
    assert ordered == sorted(ordered)
    assert 0 < samples["dm_ulogd_flush_latency_seconds_sum"][()] < flushes * 15
    # Per mirror: regions, dirty (marked, not cleared), out of sync (fresh logs: all but the
    # regions set in sync).
    assert mirror_value(samples, "dm_ulogd_mirror_regions", *a) == 64
    assert mirror_value(samples, "dm_ulogd_mirror_regions", *b) == 128
    assert mirror_value(samples, "dm_ulogd_mirror_dirty_regions", *a) == len(marks_a) - 1
    assert mirror_value(samples, "dm_ulogd_mirror_dirty_regions", *b) == 3
    assert mirror_value(samples, "dm_ulogd_mirror_out_of_sync_regions", *a) == 64 - 3
    assert mirror_value(samples, "dm_ulogd_mirror_out_of_sync_regions", *b) == 128
    assert mirror_value(samples, "dm_ulogd_mirror_healthy", *a) == 1
    assert samples["dm_ulogd_mirror_info"][(("health", "A"), ("luid", "0x20"), ("state", "live"),
                                            ("uuid", b[0]))] == 1
    assert samples["dm_ulogd_mirrors"][()] == 2
    assert samples["dm_ulogd_commit_failures_total"][()] == 0
    assert 1 <= samples["dm_ulogd_journal_syncs_total"][()] <= flushes
    assert samples["dm_ulogd_stores"][()] == 2
    assert samples["dm_ulogd_store_disk_bytes"][()] > 0 and samples["dm_ulogd_journal_disk_bytes"][()] > 0
    # The file and the stop line count the same things.
    stop = re.search(r"stopped \((\d+) requests, (\d+) errors, (\d+) commits, (\d+) journal syncs .*?(\d+) "
                     r"checkpoints", daemon.log_text())
    assert stop, daemon.log_text()[-2000:]
    assert int(stop[1]) == sum(requests.values())
    assert int(stop[2]) == 2
    assert int(stop[3]) == samples["dm_ulogd_commits_total"][()]
    assert int(stop[4]) == samples["dm_ulogd_journal_syncs_total"][()]
    assert int(stop[5]) == samples["dm_ulogd_checkpoints_total"][()]
    assert not list(prom.parent.glob("*.prom.*")), "a temporary file was left behind"


def test_written_while_running_and_a_lost_directory_does_not_stop_serving(tmp_path: Path) -> None:
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    prom = textfile / "ulog.prom"
    daemon = launch(tmp_path, capture=True,
                    extra_args=["--metrics-file", str(prom), "--metrics-interval", "0.1"])
    conn = KernelConnection(str(daemon.socket_path), timeout=10)
    m = ("LVM-running", 7)
    ok(conn, *m, RequestType.CTR, b"8192 clustered-core 1024", 128)

    def ctr_counted() -> bool:
        return (prom.exists()
                and by_label(parse(prom.read_text()), "dm_ulogd_requests_total", "type") == {"CTR": 1})

    wait_for("the CTR in the metrics file", ctr_counted, daemon)

    shutil.rmtree(textfile)
    wait_for("the failure logged", lambda: "cannot write the metrics file" in daemon.log_text(), daemon)
    for _ in range(20):  # serving goes on while every write fails
        ok(conn, *m, RequestType.GET_SYNC_COUNT, b"", 8)
    textfile.mkdir()
    wait_for("the file written again", lambda: "written again" in daemon.log_text(), daemon)
    wait_for("the requests since counted",
             lambda: prom.exists() and by_label(parse(prom.read_text()), "dm_ulogd_requests_total",
                                                "type").get("GET_SYNC_COUNT") == 20, daemon)
    conn.close()
    assert daemon.stop() == 0  # a failed metrics write is no failure of the daemon
    assert daemon.log_text().count("cannot write the metrics file") == 1


@pytest.mark.parametrize(("path", "message"), [
    ("missing/ulog.prom", "does not exist"),
    ("", "is a directory"),
])
def test_metrics_file_refused_before_anything_is_created(tmp_path: Path, path: str, message: str) -> None:
    state = tmp_path / "state"
    result = subprocess.run(
        [sys.executable, "-m", "ulog_disk", "--listen", f"unix:{tmp_path / 's.sock'}", "--backend", "lmdb",
         "--state-dir", str(state), "--metrics-file", str(tmp_path / path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and "--metrics-file" in lines[0] and message in lines[0], result.stderr
    assert not state.exists()
    assert not (tmp_path / "s.sock").exists()


def test_write_failures_are_logged_once_until_a_write_succeeds(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics(tmp_path / "m.prom", interval=5)
    caplog.set_level(logging.INFO, logger="ulog_disk.metrics")
    for _ in range(7):
        assert metrics.written_or_not(OSError(errno.ENOSPC, "No space left on device")) is True
    failures = [r for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(failures) == 1 and "No space left" in failures[0].getMessage()
    metrics.written_or_not(None)
    assert any("written again (7 write(s) had failed)" in r.getMessage() for r in caplog.records)
    assert metrics.failing == 0


def empty_snapshot(**changes: object) -> Snapshot:
    values: dict[str, object] = dict(
        taken_at=0.0, started_at=0.0, requests={}, errors={}, flush_counts=[0] * (len(FLUSH_BUCKETS) + 1),
        flush_sum=0.0, stats=Stats(), journal_syncs=0, journal_sync_failures=0, journal_backlog=0,
        dropped_frames=0,
    )
    values.update(changes)
    return Snapshot(**values)  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FLUSH_BUCKETS), st.floats(0, 30, allow_nan=False)), max_size=40))
def test_flush_histogram_buckets_hold_every_value_up_to_their_bound(tmp_path_factory: pytest.TempPathFactory,
                                                                   latencies: list[float]) -> None:
    metrics = Metrics(tmp_path_factory.mktemp("h") / "m.prom")
    for seconds in latencies:
        metrics.flush.observe(seconds)
    metrics.write(empty_snapshot(flush_counts=metrics.flush.counts, flush_sum=metrics.flush.sum))
    samples = parse(metrics.path.read_text())
    buckets = by_label(samples, "dm_ulogd_flush_latency_seconds_bucket", "le")
    for bound in FLUSH_BUCKETS:
        assert buckets[repr(bound)] == sum(1 for v in latencies if v <= bound), bound
    assert buckets["+Inf"] == samples["dm_ulogd_flush_latency_seconds_count"][()] == len(latencies)
    assert math.isclose(samples["dm_ulogd_flush_latency_seconds_sum"][()], sum(latencies), abs_tol=1e-9)


@given(st.dictionaries(st.sampled_from(list(RequestType)), st.integers(1, 1000)),
       st.integers(0, 50), st.dictionaries(st.integers(0, 255), st.integers(1, 1000)))
def test_requests_and_errors_by_type_name(by_type: dict[RequestType, int], invalid: int,
                                          errors: dict[int, int]) -> None:
    stats = Stats(requests=sum(by_type.values()) + invalid)
    stats.by_type.update(by_type)
    stats.errors_by_type.update(errors)
    requests, named_errors = requests_by_type(stats)
    assert sum(requests.values()) == stats.requests
    assert requests.get("invalid", 0) == invalid
    assert sum(named_errors.values()) == stats.errors
    known = {int(t) for t in RequestType}
    assert named_errors.get("invalid", 0) == sum(n for t, n in errors.items() if t not in known)
    for t in RequestType:
        assert named_errors.get(t.name, 0) == errors.get(int(t), 0)


def test_requests_held_during_a_stalled_sync_are_counted(tmp_path: Path) -> None:
    metrics = Metrics(tmp_path / "m.prom")
    metrics.write(empty_snapshot(held_requests=3))
    assert parse(metrics.path.read_text())["dm_ulogd_requests_held_total"][()] == 3
