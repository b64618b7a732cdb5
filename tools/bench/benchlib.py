"""Shared pieces of the benchmark suite: floors, load generators, CPU and machine accounting.

Nothing here knows a target; ``run.py`` decides what is measured against what. The daemon as a
process, the clients and the percentiles are :mod:`ulog_disk.testing`'s, shared with the tests.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ulog_disk.protocol.wire import RequestType
from ulog_disk.testing.client import Client, FrameTemplate, ctr_text
from ulog_disk.testing.launcher import fd_count, thread_count

ROOT = Path(__file__).resolve().parents[2]
PAGE = 4096


# --- formatting -----------------------------------------------------------------------------------


def human_count(n: float) -> str:
    """32768 -> "32K", 33554432 -> "32M" (binary multiples: region counts are powers of two)."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{int(n // size)}{unit}"
    return f"{n:g}"


# --- the daemon's process (launcher: ulog_disk.testing.launcher) ----------------------------------


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


# --- clients (ulog_disk.testing.client) ------------------------------------------------------------


def ctr_string(regions: int, region_size: int = 1024, extra: str = "nosync") -> str:
    """The benchmarks' constructor string: a core log of ``regions`` regions of ``region_size``
    sectors, ``nosync`` unless told otherwise."""
    return ctr_text(regions, region_size, extra=extra)


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

        from ulog_disk.log.regionlog import CHUNK_BYTES  # noqa: PLC0415

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
    from ulog_disk.testing.kernelmodel import KernelConnection, UserspaceLog  # noqa: PLC0415

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
                state["sock"] = Client(path).sock
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


def request_rate(path: Path, frame: bytes, n: int, pid: int) -> tuple[float, float]:
    """Requests/s with one in flight, and the server's CPU seconds per request (metrics 3 and 10)."""
    sock = Client(path).sock
    send, recv = sock.send, sock.recv
    for _ in range(50):
        send(frame)
        recv(65536)
    c0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    for _ in range(n):
        send(frame)
        recv(65536)
    dt = time.perf_counter() - t0
    c1 = cpu_seconds(pid)
    sock.close()
    return n / dt, (c1 - c0) / n


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


@dataclass
class Row:
    """One figure of a benchmark: value, floor, ratio, and a target where there is one."""

    metric: int | str
    name: str
    value: float
    unit: str
    floor: float | None
    floor_name: str
    ratio: float | None
    target: str = ""
    #: True met, False missed, None: informational (no target on this row).
    met: bool | None = None
    note: str = ""

    def line(self) -> str:
        def fmt(v: float) -> str:
            return f"{v:.4g}"

        verdict = "INFO" if self.met is None else ("MET" if self.met else "MISSED")
        floor = f"{fmt(self.floor)} {self.unit} ({self.floor_name})" if self.floor is not None else "-"
        ratio = f"{self.ratio:.3g}x" if self.ratio is not None else "-"
        target = f" target {self.target}" if self.target else ""
        note = f"  [{self.note}]" if self.note else ""
        return (f"[{self.metric}] {self.name}: {fmt(self.value)} {self.unit} | floor {floor} | "
                f"ratio {ratio} |{target} {verdict}{note}")
