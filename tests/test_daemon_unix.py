"""dm-ulogd as a process, driven by the kernel model over the unix transport."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from ulog_disk.protocol import wire
from ulog_disk.protocol.capture import FROM_DAEMON, TO_DAEMON, read_capture
from ulog_disk.protocol.wire import RequestType
from ulog_disk.testing.kernelmodel import KernelConnection, Mirror, UserspaceLog
from ulog_disk.testing.launcher import Daemon, launch


def make_mirror(conn: KernelConnection, uuid: str, luid: int, ctr: str, integrated: bool = False) -> Mirror:
    mirror = Mirror(UserspaceLog(conn, uuid, luid, ctr, integrated_flush=integrated, reconnect_delay=0.05))
    assert mirror.construct() == 0
    return mirror


def test_three_mirrors_full_lifecycle(daemon: Daemon) -> None:
    """Three mirrors' whole life over the unix socket: create, write, recover, suspend, reload, remove."""
    conn = KernelConnection(str(daemon.socket_path), timeout=10)
    core = make_mirror(conn, "LVM-core", 0x1000, "65536 clustered-core 1024")
    integ = make_mirror(conn, "LVM-integ", 0x2000, "32768 clustered-core 512", integrated=True)
    disk = make_mirror(conn, "LVM-disk", 0x3000, "16384 clustered-disk 7:3 1024 block_on_error")
    assert disk.log.device == b"7:3\0"
    mirrors = [core, integ, disk]
    for m in mirrors:
        # Before the first resume: not in sync, and status answers.
        assert m.log.get_sync_count() == 0
        assert m.status().startswith(f"2 0/{m.log.region_count} 1 AA ")
        m.resume()
    for m in mirrors:
        m.write([0, 1, 5])
        m.update_states()
        recovered = m.recover_all()
        assert recovered == m.log.region_count
        assert m.log.get_sync_count() == m.log.region_count
        assert m.legs_identical_where_in_sync() == []
        m.write([2, 3])
        m.update_states()
        assert m.legs is not None and m.legs[0] == m.legs[1]
    assert core.status() == "2 64/64 1 AA 1 clustered-core"
    assert disk.status() == "2 16/16 1 AA 3 clustered-disk 7:3 A"

    # Reload the core mirror with the same uuid and a new luid while it is live.
    new = make_mirror(conn, "LVM-core", 0x1001, "131072 clustered-core 1024")  # grown
    assert new.log.get_sync_count() == 0
    core.write([7])  # the old instance keeps serving, independent of the new one
    assert core.log.is_clean(7) is False
    assert new.log.is_clean(7) is True  # the new instance's bits are its own
    core.suspend()
    new.resume()
    # The new instance took the old one's state: the old 64 regions stay in sync (the write
    # to region 7 was cleared at suspend); only the 64 new regions need a resync.
    assert new.log.get_sync_count() == 64
    core.destroy()
    recovered = new.recover_all()
    assert sorted(new.recovered) == list(range(64, 128))
    assert recovered == 64
    for m in (new, integ, disk):
        m.suspend()
        m.destroy()
    for m in (core, new, integ, disk):
        assert m.log.errors == [], m.log.errors
    assert conn.resends == 0
    conn.close()
    assert daemon.stop() == 0
    text = daemon.log_text()
    assert "uuid='LVM-core' luid=0x1001 adopts the state of luid=0x1000" in text


def test_unknown_log_gets_esrch_and_reconnect_recreates_it(daemon: Daemon, tmp_path: Path) -> None:
    conn = KernelConnection(str(daemon.socket_path), timeout=10)
    m = make_mirror(conn, "LVM-x", 0x77, "8192 clustered-core 1024")
    m.resume()
    m.recover_all()
    daemon.stop(signal.SIGKILL)
    fresh = launch(tmp_path, capture=True, name="second", listen=f"unix:{daemon.socket_path}")
    conn.reconnect()
    # The restarted (memory) daemon does not know the log: the first request gets -ESRCH,
    # the model runs the reconnect loop (CTR + NUL, RESUME) and the request then succeeds.
    m.write([3])
    assert m.log.reconnects == 1
    assert m.log.errors == []
    fresh.stop()
    records = list(read_capture(fresh.capture_path.read_bytes()))
    requests = [wire.decode_frame(r.frame) for r in records if r.direction == TO_DAEMON]
    replies = [wire.decode_reply(r.frame) for r in records if r.direction == FROM_DAEMON]
    kinds = [RequestType(r.request_type).name for r in requests]
    assert kinds[:3] == ["IN_SYNC", "CTR", "RESUME"]
    assert replies[0].error == -errno.ESRCH
    ctr = requests[1]
    assert ctr.data.endswith(b"\0")
    assert replies[1].error == 0 and replies[1].data == b""  # reconnect CTR: no reply data


def test_malformed_frames_do_not_disturb_other_logs(daemon: Daemon) -> None:
    conn = KernelConnection(str(daemon.socket_path), timeout=10)
    m = make_mirror(conn, "LVM-ok", 1, "8192 clustered-core 1024")
    m.resume()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    raw.connect(str(daemon.socket_path))
    raw.settimeout(5)
    raw.send(b"\x07\x00")  # shorter than cn_msg: dropped
    good = wire.Request(luid=9, uuid="u", version=3, seq=4242, request_type=RequestType.IN_SYNC,
                        data=wire.build_u64(0))
    frame = bytearray(wire.encode_request(good))
    frame[wire.CN_MSG_SIZE + 156] = 200  # data_size past the end
    raw.send(bytes(frame))
    reply = wire.decode_reply(raw.recv(65536))
    assert (reply.seq, reply.error) == (4242, -errno.EINVAL)
    bad_type = wire.Request(luid=1, uuid="LVM-ok", version=3, seq=4343, request_type=99, data=b"")
    raw.send(wire.encode_request(bad_type))
    reply = wire.decode_reply(raw.recv(65536))
    assert (reply.seq, reply.error) == (4343, -errno.EINVAL)
    raw.close()
    assert m.log.in_sync(0) is False
    assert m.log.get_sync_count() == 0
    assert m.log.errors == []
    assert daemon.proc.poll() is None


def test_second_daemon_on_same_state_dir_refused(daemon: Daemon, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ulog_disk", "--listen", f"unix:{tmp_path}/other.sock",
         "--backend", "memory", "--state-dir", str(daemon.state_dir)],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert "in use by another dm-ulogd" in proc.stderr
    assert str(daemon.proc.pid) in proc.stderr


def test_state_dir_and_socket_modes(daemon: Daemon) -> None:
    assert daemon.state_dir.stat().st_mode & 0o777 == 0o700
    assert daemon.socket_path.stat().st_mode & 0o777 == 0o600


def test_unknown_backend_lists_installed(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ulog_disk", "--listen", f"unix:{tmp_path}/s", "--backend", "nope",
         "--state-dir", str(tmp_path / "st")],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert "no backend named 'nope'" in proc.stderr
    assert "lmdb" in proc.stderr and "memory" in proc.stderr


def test_sigterm_exits_zero_and_notifies(tmp_path: Path) -> None:
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(10)
    d = launch(tmp_path, capture=True, env={"NOTIFY_SOCKET": str(notify)})
    assert listener.recv(100) == b"READY=1"
    assert d.stop(signal.SIGTERM) == 0
    assert listener.recv(100) == b"STOPPING=1"
    assert "stopped" in d.log_text()


def test_third_party_backend_plugin_via_entry_point(tmp_path: Path) -> None:
    """A plugin installed as a distribution (entry point), not named by import path."""
    site = tmp_path / "site"
    pkg = site / "acme_ulog"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from ulog_disk.storage.memory import MemoryBackend

        class CountingBackend(MemoryBackend):
            name = "acme"

            def commit(self, commit):
                with open(self.state_dir / "acme-commits", "a") as f:
                    f.write(f"{commit.record.uuid} {commit.record.luid}\\n")
    '''))
    dist = site / "acme_ulog-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-ulog\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ulog_disk.backends]\nacme = acme_ulog:CountingBackend\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    d = launch(tmp_path, capture=True, backend="acme", env=env)
    conn = KernelConnection(str(d.socket_path), timeout=10)
    m = make_mirror(conn, "LVM-acme", 5, "4096 clustered-core 1024 nosync")
    m.resume()
    m.write([1])
    assert m.log.errors == []
    assert d.stop() == 0
    lines = (d.state_dir / "acme-commits").read_text().splitlines()
    assert "LVM-acme 5" in lines
    assert len(lines) >= 3  # RESUME, FLUSH, and the commit at stop


def test_kernel_resend_after_timeout_is_harmless(daemon: Daemon) -> None:
    """A stalled daemon: the kernel times out and resends with a new seq; the late reply to the old
    seq is dropped, and the repeated GET_RESYNC_WORK hands out the same region again."""
    import threading
    import time

    conn = KernelConnection(str(daemon.socket_path), timeout=0.5)
    m = make_mirror(conn, "LVM-slow", 0x42, "8192 clustered-core 1024")
    m.resume()
    daemon.proc.send_signal(signal.SIGSTOP)
    # kill() returns before every thread has stopped: on a loaded machine the daemon answered
    # a request sent right after it (seen in CI). Ask once all its threads are stopped.
    tasks = Path(f"/proc/{daemon.proc.pid}/task")
    deadline = time.monotonic() + 60
    while not all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for t in tasks.iterdir()):
        assert time.monotonic() < deadline, "the daemon did not stop"
        time.sleep(0.01)
    got: list[int | None] = []
    asker = threading.Thread(target=lambda: got.append(m.log.get_resync_work()))
    asker.start()
    # Stopped until the kernel timed out twice (the request sent three times), however slowly
    # the asker's thread runs.
    deadline = time.monotonic() + 60
    while conn.resends < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    daemon.proc.send_signal(signal.SIGCONT)
    asker.join(10)
    assert got == [0]
    assert conn.resends >= 2
    assert m.log.get_resync_work() == 0  # still the same region until SET_REGION_SYNC
    m.log.set_region_sync(0, True)
    assert m.log.get_resync_work() == 1
    assert daemon.stop() == 0
    records = list(read_capture(daemon.capture_path.read_bytes()))
    asks = [wire.decode_frame(r.frame) for r in records if r.direction == TO_DAEMON]
    asks = [a for a in asks if a.request_type == RequestType.GET_RESYNC_WORK]
    assert len({a.seq for a in asks}) == len(asks) >= 4  # every resend has a new seq


def test_every_request_gets_exactly_one_reply_whichever_thread_sends_it(tmp_path: Path) -> None:
    """A successful FLUSH is answered by its uuid's worker, everything else by the loop: each
    request still gets one reply, in the order the kernel's one-at-a-time caller sees them,
    and the capture records each reply once, after its request."""
    d = launch(tmp_path, capture=True, backend="lmdb")
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    raw.connect(str(d.socket_path))
    raw.settimeout(10)
    seq = 0

    def call(rtype: RequestType, data: bytes = b"") -> wire.Reply:
        nonlocal seq
        seq += 1
        raw.send(wire.encode_request(wire.Request(luid=1, uuid="LVM-one", version=3, seq=seq,
                                                  request_type=rtype, data=data)))
        reply = wire.decode_reply(raw.recv(65536))
        assert (reply.seq, reply.error) == (seq, 0), (rtype, reply)
        return reply

    call(RequestType.CTR, b"131072 clustered-core 1024\0")  # 128 regions
    call(RequestType.RESUME)
    for region in range(40):
        call(RequestType.MARK_REGION, wire.build_u64(region))
        call(RequestType.FLUSH)
        call(RequestType.FLUSH, wire.build_u64(region + 40))  # integrated marks
        assert wire.parse_s64(call(RequestType.IS_CLEAN, wire.build_u64(region)).data) == 0
        call(RequestType.CLEAR_REGION, wire.build_u64(region))
    raw.settimeout(0.3)
    try:
        extra = raw.recv(65536)
    except TimeoutError:
        extra = b""
    assert extra == b"", wire.decode_reply(extra)
    raw.close()
    assert d.stop() == 0
    records = list(read_capture(d.capture_path.read_bytes()))
    seqs = [(r.direction, wire.decode_frame(r.frame).seq if r.direction == TO_DAEMON
             else wire.decode_reply(r.frame).seq) for r in records]
    assert seqs == [(direction, s) for s in range(1, seq + 1) for direction in (TO_DAEMON, FROM_DAEMON)]


def test_an_empty_message_is_an_unanswerable_frame_not_the_end_of_the_connection(
        daemon: Daemon) -> None:
    """A zero-length SOCK_SEQPACKET message reads as b"" like a hang-up; the daemon must tell them
    apart (a fuzzer's empty probe once closed its connection, and its next send got EPIPE)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(str(daemon.socket_path))
    sock.settimeout(10)
    for seq in (1, 2):
        sock.send(b"")
        request = wire.Request(luid=1, uuid="LVM-nobody", version=3, seq=seq,
                               request_type=RequestType.GET_REGION_SIZE, data=b"")
        sock.send(wire.encode_request(request))
        reply = wire.decode_reply(sock.recv(65536))
        assert (reply.seq, reply.error) == (seq, -errno.EINVAL)  # answered: the connection lives
    sock.close()
    assert daemon.stop() == 0
    text = daemon.log_text()
    assert text.count("dropped an unanswerable frame (0 bytes)") == 2
    assert "2 unanswerable frames dropped" in text


def test_a_flood_of_junk_frames_logs_a_few_lines_and_counts_them_all(daemon: Daemon) -> None:
    """3000 junk frames once gave ~1600 log lines. Now the first few of each kind per
    interval, one summary, and the exact counts in the stop line."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(str(daemon.socket_path))
    sock.settimeout(10)
    for i in range(3000):
        sock.send(bytes([i & 0xFF]) * (1 + i % 17))  # shorter than cn_msg: unanswerable
    request = wire.Request(luid=1, uuid="LVM-nobody", version=3, seq=1, request_type=RequestType.IN_SYNC,
                           data=wire.build_u64(0))
    sock.send(wire.encode_request(request))
    assert wire.decode_reply(sock.recv(65536)).seq == 1  # every junk frame read, the daemon serving
    sock.close()
    assert daemon.stop() == 0
    text = daemon.log_text()
    lines = text.count("dropped an unanswerable frame")
    assert 1 <= lines <= 10, lines
    assert "3000 unanswerable frames dropped" in text
    assert "more unanswerable frame line(s) not logged" in text
    assert len(text.splitlines()) < 60
