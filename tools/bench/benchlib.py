"""Shared pieces of the benchmark suite: the daemon as a process, clients, floors, statistics.

Nothing here knows a target; ``run.py`` decides what is measured against what.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ulog_disk import wire
from ulog_disk.wire import Request, RequestType

ROOT = Path(__file__).resolve().parents[2]
PAGE = 4096


# --- statistics ---------------------------------------------------------------------------------


def pct(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    xs = sorted(samples)
    k = max(0, min(len(xs) - 1, int(round(q / 100.0 * len(xs) + 0.5)) - 1))
    return xs[k]


def median(values: list[float]) -> float:
    return pct(values, 50)


def human_count(n: float) -> str:
    """32768 -> "32K", 33554432 -> "32M" (binary multiples: region counts are powers of two)."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{int(n // size)}{unit}"
    return f"{n:g}"


# --- the daemon -----------------------------------------------------------------------------------


@dataclass
class DaemonProc:
    """``dm-ulogd --listen unix:PATH`` as a subprocess (no capture: it is not on a real path)."""

    proc: subprocess.Popen[bytes]
    socket_path: Path
    state_dir: Path
    log_path: Path
    #: Seconds from ``Popen`` to the ready file: interpreter start, imports, store restore.
    start_seconds: float = 0.0

    @classmethod
    def start(cls, workdir: Path, name: str, backend: str, state_dir: Path,
              boot_id: str | None = None, timeout: float = 120.0, nofile: int | None = None) -> DaemonProc:
        """``nofile``: start the daemon with that soft RLIMIT_NOFILE (the hard limit unchanged;
        the daemon may raise its soft limit itself)."""
        workdir.mkdir(parents=True, exist_ok=True)
        sock = workdir / f"{name}.sock"
        ready = workdir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        log_path = workdir / f"{name}.log"
        args = [sys.executable, "-m", "ulog_disk", "--listen", f"unix:{sock}", "--backend", backend,
                "--state-dir", str(state_dir), "--ready-file", str(ready)]
        if boot_id:
            args += ["--boot-id", boot_id]
        with open(log_path, "ab") as log_file:
            t0 = time.perf_counter()
            proc = subprocess.Popen(args, stdout=log_file, stderr=log_file, cwd=ROOT,
                                    preexec_fn=None if nofile is None else lambda: soft_nofile_limit(nofile))
        deadline = t0 + timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"dm-ulogd exited with {proc.returncode}:\n{log_path.read_text()}")
            if time.perf_counter() > deadline:
                proc.kill()
                raise RuntimeError(f"dm-ulogd not ready after {timeout}s:\n{log_path.read_text()}")
            time.sleep(0.0005)
        started = time.perf_counter() - t0
        return cls(proc, sock, state_dir, log_path, started)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def memory(self) -> dict[str, int]:
        """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of the daemon, in bytes."""
        out: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
        return out

    def threads(self) -> int:
        return thread_count(self.pid)

    def fds(self) -> int:
        return fd_count(self.pid)

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def soft_nofile_limit(soft: int) -> None:
    """Set this process's soft RLIMIT_NOFILE to ``soft`` (at most the hard limit); for preexec_fn."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = soft if hard == resource.RLIM_INFINITY else min(soft, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def thread_count(pid: int) -> int:
    """Threads of a process (entries of /proc/PID/task)."""
    return len(os.listdir(f"/proc/{pid}/task"))


def fd_count(pid: int) -> int:
    """Open descriptors of a process (entries of /proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_of(pid: int) -> tuple[str, str]:
    """(soft, hard) 'Max open files' of a process, from /proc/PID/limits, as printed there."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line[len("Max open files"):].split()[:2]
                return soft, hard
    return "?", "?"


class PeakSampler:
    """The most threads and descriptors a process had, sampled every ``interval`` seconds in a
    background thread between ``start()`` and ``stop()`` (``see()`` adds a reading taken elsewhere)."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.pid = pid
        self.interval = interval
        self.threads = 0
        self.fds = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-sampler")

    def see(self, threads: int, fds: int) -> None:
        self.threads = max(self.threads, threads)
        self.fds = max(self.fds, fds)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.see(thread_count(self.pid), fd_count(self.pid))
                self.samples += 1
            except OSError:  # the process is gone, or a descriptor closed while listed
                pass
            self._stop.wait(self.interval)

    def start(self) -> PeakSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --- a client without the kernel model's threads ---------------------------------------------------


class RawClient:
    """One request at a time on one SOCK_SEQPACKET connection, in the caller's thread."""

    def __init__(self, path: Path | str, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.seq = 0

    def frame(self, uuid: str, luid: int, rtype: RequestType, data: bytes = b"") -> bytes:
        self.seq += 1
        return wire.encode_request(Request(luid=luid, uuid=uuid, version=wire.DM_ULOG_REQUEST_VERSION,
                                           seq=self.seq, request_type=rtype, data=data,
                                           cn_seq=self.seq))

    def request(self, uuid: str, luid: int, rtype: RequestType, data: bytes = b"") -> tuple[int, bytes]:
        self.sock.send(self.frame(uuid, luid, rtype, data))
        reply = wire.decode_reply(self.sock.recv(65536))
        if reply.seq != self.seq:
            raise RuntimeError(f"reply seq {reply.seq} != {self.seq}")
        return reply.error, reply.data

    def ok(self, uuid: str, luid: int, rtype: RequestType, data: bytes = b"") -> bytes:
        error, out = self.request(uuid, luid, rtype, data)
        if error:
            raise RuntimeError(f"{rtype.name} for {uuid} answered {error}")
        return out

    def many(self, requests: list[tuple[str, int, RequestType, bytes]], window: int = 32) -> list[int | None]:
        """Send ``requests`` (uuid, luid, type, data) keeping at most ``window`` unanswered, as
        the kernel does with requests of many mirrors; return each one's error (0: answered
        successfully), or None for those left unanswered when the connection closed or a reply
        took longer than the socket's timeout (the connection is then unusable: open another).

        The window stays well under what the daemon can send before our receive queue is full
        (its replies would be dropped, not delayed)."""
        results: list[int | None] = [None] * len(requests)
        waiting: dict[int, int] = {}
        i = 0
        try:
            while i < len(requests) or waiting:
                while i < len(requests) and len(waiting) < window:
                    frame = self.frame(*requests[i])
                    waiting[self.seq] = i
                    self.sock.send(frame)
                    i += 1
                data = self.sock.recv(65536)
                if not data:
                    break
                reply = wire.decode_reply(data)
                index = waiting.pop(reply.seq, None)
                if index is not None:
                    results[index] = reply.error
        except OSError:  # timeout, reset, or the daemon gone
            pass
        return results

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class FrameTemplate:
    """One request frame built once with ``wire.encode_request``; each use patches only the two
    sequence numbers and the payload, so a load generator spends almost nothing per request (the
    real kernel's cost per request is a few microseconds in C)."""

    def __init__(self, uuid: str, luid: int, rtype: RequestType, data_len: int = 0):
        frame = wire.encode_request(Request(luid=luid, uuid=uuid, version=wire.DM_ULOG_REQUEST_VERSION,
                                            seq=0x01020304, request_type=rtype, data=bytes(data_len),
                                            cn_seq=0x01020304))
        marker = (0x01020304).to_bytes(4, sys.byteorder)
        self.cn_seq_at = frame.index(marker)
        self.seq_at = frame.index(marker, self.cn_seq_at + 4)
        self.data_at = len(frame) - data_len
        self.buf = bytearray(frame)
        # The error field of a reply's header sits 8 bytes before its seq (wire.UlogHeader).
        self.error_at = self.seq_at - 4
        check = wire.decode_frame(self.build(7, bytes(range(data_len))))
        assert check.seq == 7 and check.cn_seq == 7 and check.data == bytes(range(data_len)), check

    def build(self, seq: int, data: bytes = b"") -> bytes:
        buf = self.buf
        buf[self.cn_seq_at : self.cn_seq_at + 4] = seq.to_bytes(4, sys.byteorder)
        buf[self.seq_at : self.seq_at + 4] = seq.to_bytes(4, sys.byteorder)
        if data:
            buf[self.data_at :] = data
        return bytes(buf)

    def reply_ok(self, reply: bytes) -> bool:
        """A full-form reply with error 0 (the ACK form and errors are not ok)."""
        return len(reply) >= self.data_at and reply[self.error_at : self.error_at + 4] == b"\0\0\0\0"


class LeanClient:
    """Requests for one log from frame templates, one at a time, in the caller's thread: what is
    left of the client's cost is a send and a recv (no kernel-model threads, no construct)."""

    def __init__(self, path: Path | str, uuid: str, luid: int):
        self.sock = RawClient(path).sock
        self.seq = 0
        self.t = {
            "mark": FrameTemplate(uuid, luid, RequestType.MARK_REGION, 8),
            "flush": FrameTemplate(uuid, luid, RequestType.FLUSH, 0),
            "flush1": FrameTemplate(uuid, luid, RequestType.FLUSH, 8),
            "in_sync": FrameTemplate(uuid, luid, RequestType.IN_SYNC, 8),
        }

    def call(self, kind: str, region: int | None = None) -> None:
        self.seq += 1
        t = self.t[kind]
        self.sock.send(t.build(self.seq, b"" if region is None else region.to_bytes(8, sys.byteorder)))
        if not t.reply_ok(self.sock.recv(65536)):
            raise RuntimeError(f"{kind} failed")

    def mark_flush(self, region: int) -> None:
        self.call("mark", region)
        self.call("flush")

    def close(self) -> None:
        self.sock.close()


def ctr_string(regions: int, region_size: int = 1024, extra: str = "nosync") -> str:
    """A core-log constructor string for ``regions`` regions (target sectors / region size)."""
    return f"{regions * region_size} clustered-core {region_size}{' ' + extra if extra else ''}"


# --- physical floors --------------------------------------------------------------------------------


@dataclass
class SyncWriter:
    """``pwrite`` of ``size`` bytes at offset 0 + ``fdatasync`` on a preallocated file.

    The file is written and fsynced once first, so every timed write is an overwrite of allocated
    blocks (no metadata change), as LMDB's page rewrites and the kernel's log-device writes are.
    """

    path: Path
    size: int
    fd: int = -1
    buf: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.buf = bytes(range(256)) * (-(-self.size // 256))
        self.buf = self.buf[: self.size]
        os.pwrite(self.fd, self.buf, 0)
        os.fsync(self.fd)
        self.flip = 0

    def sample(self) -> float:
        # Alternate the first byte so every write changes the data.
        self.flip ^= 1
        buf = bytes([self.flip]) + self.buf[1:] if self.size < (1 << 20) else self.buf
        t0 = time.perf_counter()
        os.pwrite(self.fd, buf, 0)
        os.fdatasync(self.fd)
        return time.perf_counter() - t0

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


class LmdbFloor:
    """The least a durable LMDB commit of the store's shape costs: one meta record and one bitmap
    chunk, py-lmdb with the store's options (sync, metasync, no writemap), nothing else.
    ``options`` override those (tools/bench/journal_alternatives.py measures the others)."""

    def __init__(self, path: Path, chunks: int, **options: bool):
        import lmdb  # noqa: PLC0415

        from ulog_disk.regionlog import CHUNK_BYTES  # noqa: PLC0415

        path.mkdir(parents=True, exist_ok=True)
        durable = {"sync": True, "metasync": True, "writemap": False, "map_async": False}
        self.path = path
        self.env = lmdb.open(str(path), map_size=64 << 20, max_dbs=4, **{**durable, **options})
        self.meta = self.env.open_db(b"meta")
        self.clean = self.env.open_db(b"clean")
        self.chunks = chunks
        self.values = [bytes([v]) * CHUNK_BYTES for v in (0x55, 0xAA)]
        with self.env.begin(write=True) as txn:
            for i in range(chunks):
                txn.put(i.to_bytes(4, "big"), self.values[0], db=self.clean)
        self.i = 0

    def sample(self) -> float:
        self.i += 1
        meta = self.i.to_bytes(8, "little") * 15
        t0 = time.perf_counter()
        with self.env.begin(write=True) as txn:
            txn.put(b"record", meta, db=self.meta)
            txn.put((self.i * 7 % self.chunks).to_bytes(4, "big"), self.values[self.i & 1], db=self.clean)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.env.close()


# --- load generators for concurrent mirrors (run in their own processes) ---------------------------

STRIDE = 104729


def mirror_uuid(index: int) -> tuple[str, int]:
    return f"bench-mirror-{index}", 0x600 + index


def load_worker(index: int, path: str, regions: int, workdir: str, pipe: object) -> None:
    """One mirror's kernel in its own process. Told ``(kind, seconds)``, runs that load for that
    long and answers ``(count, seconds)``; told None, exits. Kinds: ``lean`` (MARK_REGION + FLUSH
    from frame templates, one region per write), ``kmodel`` (the same through the kernel model),
    ``lmdb`` (bare py-lmdb durable commits into its own environment), ``fdatasync`` (4 KiB
    pwrite + fdatasync into its own file)."""
    from ulog_disk.kernelmodel import KernelConnection, UserspaceLog  # noqa: PLC0415

    uuid, luid = mirror_uuid(index)
    done = 0
    state: dict[str, object] = {}
    while True:
        msg = pipe.recv()  # type: ignore[attr-defined]
        if msg is None:
            break
        kind, seconds = msg
        count = 0
        if kind == "lean":
            if "sock" not in state:
                state["sock"] = RawClient(path).sock
                state["mark"] = FrameTemplate(uuid, luid, RequestType.MARK_REGION, 8)
                state["flush"] = FrameTemplate(uuid, luid, RequestType.FLUSH, 0)
            sock = state["sock"]
            mark, flush = state["mark"], state["flush"]
            seq = 1 + 2 * done
            t0 = time.perf_counter()
            end = t0 + seconds
            while True:
                region = ((done + count) * STRIDE) % regions
                sock.send(mark.build(seq, region.to_bytes(8, sys.byteorder)))  # type: ignore[attr-defined]
                if not mark.reply_ok(sock.recv(65536)):  # type: ignore[attr-defined]
                    raise RuntimeError("MARK_REGION failed")
                sock.send(flush.build(seq + 1))  # type: ignore[attr-defined]
                if not flush.reply_ok(sock.recv(65536)):  # type: ignore[attr-defined]
                    raise RuntimeError("FLUSH failed")
                seq += 2
                count += 1
                if time.perf_counter() >= end:
                    break
        elif kind == "kmodel":
            if "log" not in state:
                state["conn"] = KernelConnection(path)
                state["log"] = UserspaceLog(state["conn"], uuid, luid, ctr_string(regions))  # type: ignore[arg-type]
            log = state["log"]
            t0 = time.perf_counter()
            end = t0 + seconds
            while True:
                log.mark_region(((done + count) * STRIDE) % regions)  # type: ignore[attr-defined]
                if log.flush():  # type: ignore[attr-defined]
                    raise RuntimeError("FLUSH failed")
                count += 1
                if time.perf_counter() >= end:
                    break
        elif kind in ("lmdb", "fdatasync"):
            if kind not in state:
                state[kind] = (LmdbFloor(Path(workdir) / f"lmdb-floor-{index}", 32) if kind == "lmdb"
                               else SyncWriter(Path(workdir) / f"floor-{index}.dat", 4096))
            floor = state[kind]
            t0 = time.perf_counter()
            end = t0 + seconds
            while True:
                floor.sample()  # type: ignore[attr-defined]
                count += 1
                if time.perf_counter() >= end:
                    break
        else:
            raise ValueError(kind)
        done += count
        pipe.send((count, time.perf_counter() - t0))  # type: ignore[attr-defined]


class TwoSyncFloor:
    """What any commit that orders its data before its root pointer pays at least, and LMDB's
    with ``sync`` and ``metasync`` does: a 4 KiB pwrite + fdatasync, then a 120-byte pwrite on a
    second descriptor opened O_DSYNC (LMDB writes its meta page that way)."""

    def __init__(self, path: Path):
        self.data = SyncWriter(path, 4096)
        self.meta_fd = os.open(path, os.O_RDWR | os.O_DSYNC)
        self.i = 0

    def sample(self) -> float:
        self.i += 1
        meta = self.i.to_bytes(8, "little") * 15
        t0 = time.perf_counter()
        os.pwrite(self.data.fd, self.data.buf, 8192)
        os.fdatasync(self.data.fd)
        os.pwrite(self.meta_fd, meta, 0)
        return time.perf_counter() - t0

    def close(self) -> None:
        os.close(self.meta_fd)
        self.data.close()


# --- CPU accounting -----------------------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads, so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    return sum(cpu_times(pid))


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat (iowait counts as idle)."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def placements() -> dict[str, tuple[int | None, int | None]]:
    """Where a client and its server run in the request-rate benchmark: both on one CPU (the
    round trip is the two processes' CPU cost plus two context switches), on two CPUs (plus two
    cross-CPU wake-ups), or wherever the scheduler puts them (what the other metrics do)."""
    cpus = sorted(os.sched_getaffinity(0))
    out: dict[str, tuple[int | None, int | None]] = {"client and server on one CPU": (cpus[-1], cpus[-1])}
    if len(cpus) > 1:
        out["client and server on two CPUs"] = (cpus[-2], cpus[-1])
    out["unpinned"] = (None, None)
    return out


@contextlib.contextmanager
def pinned(pid: int, cpu: int | None):
    """Pin every thread of ``pid`` to ``cpu`` for the duration (None: leave it alone)."""
    if cpu is None:
        yield
        return
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    before = {tid: os.sched_getaffinity(tid) for tid in tids}
    for tid in tids:
        os.sched_setaffinity(tid, {cpu})
    try:
        yield
    finally:
        for tid, mask in before.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)


# --- machine ---------------------------------------------------------------------------------------


def filesystem_of(path: Path) -> str:
    """``<fstype> on <mount point> (<device>)`` for the mount holding ``path``."""
    best = ("?", "?", "?")
    target = str(path.resolve())
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype, *_ = line.split()
            mnt = mnt.replace("\\040", " ")
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                best = (fstype, mnt, dev)
    return f"{best[0]} on {best[1]} ({best[2]})"


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machine(state_parent: Path) -> dict[str, str]:
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import lmdb  # noqa: PLC0415 - version only

    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "lmdb": f"py-lmdb {lmdb.__version__}, LMDB {'.'.join(map(str, lmdb.version()))}",
        "state_dir_fs": filesystem_of(state_parent),
        "state_parent": str(state_parent),
    }
