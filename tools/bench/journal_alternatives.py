"""The durable point of a FLUSH: the daemon-wide journal against the alternatives it was chosen over.

    .venv/bin/python tools/bench/journal_alternatives.py [--quick] [--dir DIR] [--samples N]
        [--seconds S] [--only 1,4] [--also DIR [--also-only 1,2,4]] [--out FILE]

Every figure is a ratio against a floor measured in the same run, on the same filesystem (a fresh
directory under ``--dir``, default ``/var/tmp``): one 4 KiB ``pwrite`` + ``fdatasync`` overwriting
an already written and fsynced block (``benchlib.SyncWriter``), about what the kernel's own
``disk`` log pays per flush. Floor samples are taken in blocks interleaved with the alternatives'
samples, so a change of load during the run moves both.

1. a durable append of a 112-byte record (a journal FLUSH record carrying one mark), one sync
   per record: (a) ``pwrite`` into a zero-filled, fsynced 4 MiB file + ``fdatasync`` (the
   journal's way); (b) the same into a file preallocated with ``fallocate`` only (unwritten
   extents); (c) ``O_APPEND`` to a growing file + ``fdatasync``; (d) ``pwrite`` on an ``O_DSYNC``
   descriptor into the zero-filled file; (e) (a) with ``fsync``; (f) ``O_DIRECT|O_DSYNC`` writes
   of the 4 KiB blocks holding the record (skipped where the filesystem refuses O_DIRECT); and
   (m) the ``pwrite`` alone, no sync: what a MARK record costs the journal;
2. an LMDB commit as the durable point (meta + one bitmap chunk, what the old design paid per
   FLUSH): durable (``sync``, ``metasync``), ``metasync=False``, ``writemap`` (msync MS_SYNC),
   ``writemap`` + ``map_async``;
3. one LMDB environment per uuid against one for all: commit latency with 8 threads into 8
   environments and into 1, and the descriptors and maps an open environment costs;
4. group commit: K threads (1, 2, 4, 8) each appending a record and waiting for it to be durable,
   (i) each with its own ``fdatasync``, (ii) one syncer thread syncing for everything appended so
   far, (iii) leader/follower (the first waiter syncs for all, the others wait for it), (iv) each
   writing on an ``O_DSYNC`` descriptor: durable records/s and syncs per record.

Each row also counts what reached the block device under the directory (write and flush requests,
``/sys/class/block/DEV/stat``) and, on a filesystem with one, jbd2 commits (``/proc/fs/jbd2``):
the device is shared, so the floor's counts are the background. ``--also DIR`` runs the metrics of
``--also-only`` again on another filesystem (e.g. a journaled ext4 when the state directory's has
no journal) into the same results file. The load average at the start and end and the share of
CPU used by other processes are printed and recorded: on a busy machine (load > 1.5), rerun.

One line per figure (value, floor, ratio, INFO) as in ``run.py``; the results go to ``--out``
(default ``docs/benchmarks/journal-alternatives.json``; ``--quick``: ``...-quick.json``).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import PAGE, LmdbFloor, Row, SyncWriter  # noqa: E402

from ulog_disk.log.regionlog import CHUNK_BYTES  # noqa: E402
from ulog_disk.storage import journal  # noqa: E402
from ulog_disk.storage.lmdb_store import INITIAL_MAP_SIZE  # noqa: E402
from ulog_disk.testing.stats import percentile  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MS = 1e3
US = 1e6
SEGMENT = journal.SEGMENT_BYTES
#: A journal FLUSH record carrying one mark, for a uuid as LVM names them (112 bytes padded).
RECORD = journal.encode_record(journal.Kind.FLUSH, 0, 0, b"LVM-" + b"x" * 32, 0x601,
                               *journal.flush_body(7, 0, 1.0e9, [(1, 12345)]))


@dataclass(frozen=True)
class Config:
    samples: int
    warmup: int
    block: int
    #: Seconds per run of a concurrent configuration (metrics 3 and 4).
    seconds: float
    rounds: int
    floor_block: int


FULL = Config(samples=2000, warmup=50, block=100, seconds=1.5, rounds=2, floor_block=200)
QUICK = Config(samples=200, warmup=10, block=50, seconds=0.3, rounds=1, floor_block=50)


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.extra: dict[str, object] = {}

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(row.line(), flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


@dataclass
class Dist:
    """Latency samples in seconds."""

    samples: list[float]

    @property
    def p50(self) -> float:
        return percentile(self.samples, 50)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    def summary(self) -> dict[str, float]:
        return {"n": len(self.samples), "p50_ms": self.p50 * MS, "p99_ms": self.p99 * MS,
                "mean_ms": self.mean * MS, "max_ms": max(self.samples) * MS}


def latency_rows(report: Report, metric: str, name: str, d: Dist, floor: Dist, note: str = "") -> None:
    mean = f"mean {d.mean * MS:.3f} ms = {d.mean / floor.mean:.2f}x the floor's mean"
    note = f"{note}; {mean}" if note else mean
    report.add(Row(metric, f"{name} p50", d.p50 * MS, "ms", floor.p50 * MS,
                   "4 KiB pwrite+fdatasync p50", d.p50 / floor.p50, note))
    report.add(Row(metric, f"{name} p99", d.p99 * MS, "ms", floor.p99 * MS,
                   "4 KiB pwrite+fdatasync p99", d.p99 / floor.p99))


# --- metric 1: appenders -------------------------------------------------------------------------


def zero_file(path: Path, size: int) -> int:
    """A file of ``size`` zero bytes, written and fsynced (the journal's segments); its fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    zero = bytes(1 << 20)
    offset = 0
    while offset < size:
        offset += os.pwrite(fd, zero[: min(len(zero), size - offset)], offset)
    os.fsync(fd)
    return fd


class Appender:
    """Appends ``RECORD`` at increasing offsets of a 4 MiB file; ``sample()`` times one durable
    append. A full file is replaced by a fresh one outside the timing (a new segment)."""

    name = ""

    def __init__(self, directory: Path, tag: str) -> None:
        self.directory = directory
        self.tag = tag
        self.generation = 0
        self.offset = 0
        self.fd = -1
        self.path = directory / f"{tag}.0"
        self.fresh()

    def fresh(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.path.unlink(missing_ok=True)
        self.generation += 1
        self.path = self.directory / f"{self.tag}.{self.generation}"
        self.offset = 0
        self.fd = self.make(self.path)

    def make(self, path: Path) -> int:
        raise NotImplementedError

    def write(self) -> None:
        raise NotImplementedError

    def sample(self) -> float:
        if self.offset + 2 * PAGE + len(RECORD) > SEGMENT:
            self.fresh()
        t0 = time.perf_counter()
        self.write()
        dt = time.perf_counter() - t0
        self.offset += len(RECORD)
        return dt

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


class ZeroFilled(Appender):
    """(a) pwrite + fdatasync into a zero-filled file; ``sync=os.fsync`` for (e)."""

    def __init__(self, directory: Path, tag: str, sync: Callable[[int], None] = os.fdatasync) -> None:
        self.sync = sync
        super().__init__(directory, tag)

    def make(self, path: Path) -> int:
        return zero_file(path, SEGMENT)

    def write(self) -> None:
        os.pwrite(self.fd, RECORD, self.offset)
        self.sync(self.fd)


class NoSync(Appender):
    """(m) pwrite into a zero-filled file, no sync: what a MARK, CLEAR or SET_REGION_SYNC record
    costs the journal (it is made durable by the next FLUSH's sync)."""

    def make(self, path: Path) -> int:
        return zero_file(path, SEGMENT)

    def write(self) -> None:
        os.pwrite(self.fd, RECORD, self.offset)


class Fallocated(ZeroFilled):
    """(b) the same into a file preallocated with fallocate() only: unwritten extents."""

    def make(self, path: Path) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.posix_fallocate(fd, 0, SEGMENT)
        os.fsync(fd)
        return fd


class Growing(Appender):
    """(c) O_APPEND to a file that grows + fdatasync (every sync carries a size change)."""

    def make(self, path: Path) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        os.fsync(fd)
        return fd

    def write(self) -> None:
        os.write(self.fd, RECORD)
        os.fdatasync(self.fd)


class Dsync(Appender):
    """(d) pwrite on an O_DSYNC descriptor into a zero-filled file (every write is synchronous)."""

    def make(self, path: Path) -> int:
        os.close(zero_file(path, SEGMENT))
        return os.open(path, os.O_WRONLY | os.O_DSYNC)

    def write(self) -> None:
        os.pwrite(self.fd, RECORD, self.offset)


class Direct(Appender):
    """(f) O_DIRECT|O_DSYNC: the record copied into an aligned image of the block(s) holding it,
    and those 4 KiB blocks written (a record that straddles a block boundary writes two)."""

    def __init__(self, directory: Path, tag: str) -> None:
        self.buf = mmap.mmap(-1, 2 * PAGE)  # page-aligned, as O_DIRECT wants
        self.image = bytearray(SEGMENT)
        super().__init__(directory, tag)

    def make(self, path: Path) -> int:
        os.close(zero_file(path, SEGMENT))
        self.image[:] = bytes(SEGMENT)
        return os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)

    def write(self) -> None:
        end = self.offset + len(RECORD)
        self.image[self.offset : end] = RECORD
        first = self.offset - self.offset % PAGE
        last = end + (-end % PAGE)
        n = last - first
        self.buf[:n] = self.image[first:last]
        with memoryview(self.buf) as mv:
            os.pwrite(self.fd, mv[:n], first)

    def close(self) -> None:
        super().close()
        self.buf.close()


def direct_supported(directory: Path) -> str | None:
    """None if O_DIRECT 4 KiB writes work in ``directory``, else why not."""
    path = directory / "odirect-probe"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as exc:
        return f"open(O_DIRECT) fails: {exc}"
    buf = mmap.mmap(-1, PAGE)
    try:
        os.pwrite(fd, buf, 0)
    except OSError as exc:
        return f"an aligned 4 KiB O_DIRECT write fails: {exc}"
    finally:
        buf.close()
        os.close(fd)
        path.unlink(missing_ok=True)
    return None


def unwritten_extents(path: Path) -> str:
    """What filefrag says about the extents of a fallocated file (flags 'unwritten' expected)."""
    tool = shutil.which("filefrag") or next((p for p in ("/usr/sbin/filefrag", "/sbin/filefrag")
                                             if os.path.exists(p)), None)
    if tool is None:
        return "not checked (no filefrag)"
    try:
        out = subprocess.run([tool, "-v", str(path)], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"not checked ({exc})"
    extents = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    unwritten = sum("unwritten" in line for line in extents)
    return f"{unwritten} of {len(extents)} extents unwritten (filefrag)"


class IoCounters:
    """Counts of the block device under a directory (``/sys/class/block/DEV/stat``: write
    requests, flush requests) and of its filesystem's jbd2 journal (transactions), where they
    exist. The device is shared with every other process writing to it: compare with the
    floor's counts, taken the same way, for the background."""

    def __init__(self, directory: Path) -> None:
        dev = benchlib.filesystem_of(directory).rsplit("(", 1)[-1].rstrip(")")
        self.dev = dev
        name = os.path.basename(dev)
        self.stat = Path(f"/sys/class/block/{name}/stat")
        if not self.stat.exists() or len(self.stat.read_text().split()) < 17:
            self.stat = None  # type: ignore[assignment]
        infos = sorted(Path("/proc/fs/jbd2").glob(f"{name}-*/info")) if name else []
        self.jbd2 = infos[0] if infos else None
        task = Path(f"/sys/fs/ext4/{name}/journal_task")
        self.journal = (f"jbd2 journal {self.jbd2.parent.name}" if self.jbd2 else
                        f"no jbd2 journal on {dev} (/proc/fs/jbd2 has no entry"
                        + (f"; {task}: {task.read_text().strip()})" if task.exists() else ")"))

    def read(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.stat is not None:
            fields = self.stat.read_text().split()
            out["device writes"] = int(fields[4])
            out["device flushes"] = int(fields[15])
        if self.jbd2 is not None:
            with open(self.jbd2) as f:
                out["jbd2 commits"] = int(f.readline().split()[0])
        return out

    @staticmethod
    def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        return {k: after[k] - before[k] for k in before}

    @staticmethod
    def per(counts: dict[str, int], n: int) -> dict[str, float]:
        return {k: v / max(1, n) for k, v in counts.items()}

    @staticmethod
    def text(per: dict[str, float], unit: str = "sample") -> str:
        return ", ".join(f"{v:.2f} {k}" for k, v in per.items()) + f" per {unit}" if per else ""


def interleaved(samplers: dict[str, Callable[[], float]], cfg: Config,
                io: IoCounters | None = None) -> tuple[dict[str, Dist], dict[str, dict[str, float]]]:
    """``cfg.samples`` samples of each, taken in blocks of ``cfg.block`` in turn, after
    ``cfg.warmup`` each that are thrown away; and the I/O counts per sample during each one's
    blocks."""
    for sample in samplers.values():
        for _ in range(cfg.warmup):
            sample()
    out: dict[str, list[float]] = {k: [] for k in samplers}
    counts: dict[str, dict[str, int]] = {k: {} for k in samplers}
    while any(len(v) < cfg.samples for v in out.values()):
        for key, sample in samplers.items():
            got = out[key]
            before = io.read() if io else {}
            for _ in range(min(cfg.block, cfg.samples - len(got))):
                got.append(sample())
            if io:
                for k, v in io.delta(before, io.read()).items():
                    counts[key][k] = counts[key].get(k, 0) + v
    per = {k: IoCounters.per(counts[k], len(out[k])) for k in samplers}
    return {k: Dist(v) for k, v in out.items()}, per


def metric1(report: Report, work: Path, cfg: Config) -> None:
    print(f"\n== 1. durable append of a {len(RECORD)}-byte record, one sync per record", flush=True)
    d = work / "m1"
    d.mkdir()
    floor = SyncWriter(d / "floor.dat", PAGE)
    appenders: dict[str, Appender] = {
        "a": ZeroFilled(d, "zero"),
        "b": Fallocated(d, "falloc"),
        "c": Growing(d, "grow"),
        "d": Dsync(d, "dsync"),
        "e": ZeroFilled(d, "fsync", sync=os.fsync),
        "m": NoSync(d, "nosync"),
    }
    extents = unwritten_extents(appenders["b"].path)
    why_not = direct_supported(d)
    if why_not is None:
        appenders["f"] = Direct(d, "direct")
    samplers: dict[str, Callable[[], float]] = {"floor": floor.sample}
    samplers.update({k: a.sample for k, a in appenders.items()})
    io = IoCounters(d)
    t0 = time.perf_counter()
    dists, counts = interleaved(samplers, cfg, io)
    took = time.perf_counter() - t0
    fl = dists["floor"]
    report.add(Row("1", "floor: 4 KiB pwrite+fdatasync overwrite p50", fl.p50 * MS, "ms", None, "", None,
                   f"p99 {fl.p99 * MS:.3f} ms, mean {fl.mean * MS:.3f} ms, n={len(fl.samples)}; "
                   f"{IoCounters.text(counts['floor'])}; {io.journal}"))
    names = {
        "a": "(a) pwrite into zero-filled file + fdatasync [journal]",
        "b": "(b) pwrite into fallocate()d file (unwritten extents) + fdatasync",
        "c": "(c) O_APPEND to a growing file + fdatasync",
        "d": "(d) pwrite on an O_DSYNC fd into zero-filled file",
        "e": "(e) pwrite into zero-filled file + fsync",
        "f": "(f) O_DIRECT|O_DSYNC 4 KiB-aligned block write(s) into zero-filled file",
        "m": "(m) pwrite into zero-filled file, no sync (a MARK record)",
    }
    notes = {"b": extents}
    for key in appenders:
        note = "; ".join(x for x in (notes.get(key, ""), IoCounters.text(counts[key])) if x)
        latency_rows(report, f"1{key}", names[key], dists[key], fl, note)
    if why_not is not None:
        report.note(f"(f) skipped: {why_not}")
    report.extra["metric1"] = {"floor": fl.summary(), "record_bytes": len(RECORD), "seconds": took,
                               "fallocate_extents": extents, "direct": why_not or "supported",
                               "device": io.dev, "fs_journal": io.journal, "io_per_sample": counts,
                               **{names[k]: dists[k].summary() for k in appenders}}
    floor.close()
    for a in appenders.values():
        a.close()


# --- metric 2: LMDB as the durable point ---------------------------------------------------------


class LmdbCommit(LmdbFloor):
    """A commit of the store's shape (meta record + one bitmap chunk) with given LMDB options."""

    def __init__(self, path: Path, chunks: int = 32, **options: bool) -> None:
        super().__init__(path, chunks, **options)


LMDB_VARIANTS: dict[str, tuple[str, dict[str, bool], str]] = {
    "durable": ("durable commit (sync, metasync) [old design, the stores' settings]",
                {"sync": True, "metasync": True, "writemap": False, "map_async": False},
                "nothing: data pages fdatasync'd, then the meta page written on an O_DSYNC fd"),
    "nometasync": ("metasync=False (MDB_NOMETASYNC)",
                   {"sync": True, "metasync": False, "writemap": False, "map_async": False},
                   "the last commit's durability: its meta page is written, not synced, until the "
                   "next commit's sync; a host crash can roll back to the previous commit"),
    "writemap": ("writemap=True (msync MS_SYNC)",
                 {"sync": True, "metasync": True, "writemap": True, "map_async": False},
                 "protection from stray writes: the map is writable, a bug in the process can "
                 "corrupt the store; data.mdb is sized to the whole map"),
    "writemap_async": ("writemap=True + map_async=True (msync MS_ASYNC)",
                       {"sync": True, "metasync": True, "writemap": True, "map_async": True},
                       "durability at commit altogether: nothing is on disk when the commit returns; "
                       "a host crash can lose recent commits or corrupt the store (LMDB docs)"),
}


def metric2(report: Report, work: Path, cfg: Config) -> None:
    print("\n== 2. an LMDB commit (meta + 1 chunk) as the durable point", flush=True)
    d = work / "m2"
    d.mkdir()
    floor = SyncWriter(d / "floor.dat", PAGE)
    envs = {k: LmdbCommit(d / k, **opts) for k, (_, opts, _) in LMDB_VARIANTS.items()}
    samplers: dict[str, Callable[[], float]] = {"floor": floor.sample}
    samplers.update({k: e.sample for k, e in envs.items()})
    io = IoCounters(d)
    dists, counts = interleaved(samplers, cfg, io)
    fl = dists["floor"]
    report.add(Row("2", "floor: 4 KiB pwrite+fdatasync overwrite p50", fl.p50 * MS, "ms", None, "", None,
                   f"p99 {fl.p99 * MS:.3f} ms, n={len(fl.samples)}; {IoCounters.text(counts['floor'])}"))
    out: dict[str, object] = {"floor": fl.summary(), "io_per_sample": counts}
    for key, (name, opts, gives_up) in LMDB_VARIANTS.items():
        st = (d / key / "data.mdb").stat()
        files = f"data.mdb {st.st_size >> 10} KiB apparent, {st.st_blocks * 512 >> 10} KiB allocated"
        latency_rows(report, "2", f"LMDB {name}", dists[key], fl,
                     f"{files}; {IoCounters.text(counts[key], 'commit')}")
        out[key] = {"name": name, "options": opts, "gives_up": gives_up, "data_mdb": files,
                    **dists[key].summary()}
    report.extra["metric2"] = out
    floor.close()
    for e in envs.values():
        e.close()


# --- metric 3: one environment per uuid or one for all -------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


#: A thread's work in a timed run: ``body(i, deadline)`` for thread ``i``; (count, latencies).
Body = Callable[[int, float], tuple[int, list[float]]]


def timed(one: Callable[[int], None]) -> Body:
    """The body that does ``one(i)`` again and again until the deadline, timing each."""

    def body(i: int, deadline: float) -> tuple[int, list[float]]:
        lat: list[float] = []
        while True:
            t0 = time.perf_counter()
            one(i)
            t1 = time.perf_counter()
            lat.append(t1 - t0)
            if t1 >= deadline:
                return len(lat), lat

    return body


def run_threads(n: int, body: Body, seconds: float) -> tuple[int, list[float], float]:
    """Run ``body(i, deadline)`` in ``n`` threads started together; (total count, all latencies,
    elapsed seconds)."""
    results: list[tuple[int, list[float]]] = [(0, [])] * n
    barrier = threading.Barrier(n + 1)
    deadline = [0.0]

    def run(i: int) -> None:
        barrier.wait()
        results[i] = body(i, deadline[0])

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return sum(r[0] for r in results), [x for r in results for x in r[1]], elapsed


def metric3(report: Report, work: Path, cfg: Config) -> None:
    import lmdb  # noqa: PLC0415

    print("\n== 3. one LMDB environment per uuid vs one for all, 8 threads committing", flush=True)
    d = work / "m3"
    d.mkdir()
    floor = SyncWriter(d / "floor.dat", PAGE)
    n = 8
    opts = {"sync": True, "metasync": True, "writemap": False, "map_async": False}
    fds0, maps0 = _fds(), _maps()
    per_uuid = [lmdb.open(str(d / f"env{i}"), map_size=INITIAL_MAP_SIZE, max_dbs=16, **opts)
                for i in range(n)]
    fds_per_env = (_fds() - fds0) / n
    maps_per_env = (_maps() - maps0) / n
    shared = lmdb.open(str(d / "shared"), map_size=INITIAL_MAP_SIZE, max_dbs=4 * n, **opts)
    value = bytes([0x55]) * CHUNK_BYTES
    # One uuid = its own sub-databases (meta, clean) in its environment or in the shared one.
    layouts: dict[str, list[tuple[object, object, object]]] = {
        "1 thread, 1 env": [(per_uuid[0], per_uuid[0].open_db(b"meta"), per_uuid[0].open_db(b"clean"))],
        f"{n} threads, {n} envs": [(e, e.open_db(b"meta"), e.open_db(b"clean")) for e in per_uuid],
        f"{n} threads, 1 env": [(shared, shared.open_db(f"meta.{i}".encode()),
                                 shared.open_db(f"clean.{i}".encode())) for i in range(n)],
    }
    for lay in layouts.values():
        for env, _, clean in lay:
            with env.begin(write=True) as txn:  # type: ignore[attr-defined]
                for c in range(32):
                    txn.put(c.to_bytes(4, "big"), value, db=clean)

    def committer(lay: list[tuple[object, object, object]]) -> Body:
        commits = [itertools.count(1) for _ in lay]

        def one(i: int) -> None:
            env, meta, clean = lay[i]
            k = next(commits[i])
            with env.begin(write=True) as txn:  # type: ignore[attr-defined]
                txn.put(b"record", k.to_bytes(8, "little") * 15, db=meta)
                txn.put((k * 7 % 32).to_bytes(4, "big"), value, db=clean)

        return timed(one)

    floor_samples: list[float] = []
    runs: dict[str, list[tuple[int, list[float], float]]] = {k: [] for k in layouts}
    for _ in range(cfg.rounds):
        for key, lay in layouts.items():
            floor_samples += [floor.sample() for _ in range(cfg.floor_block)]
            runs[key].append(run_threads(len(lay), committer(lay), cfg.seconds))
    floor_samples += [floor.sample() for _ in range(cfg.floor_block)]
    fl = Dist(floor_samples)
    report.add(Row("3", "floor: 4 KiB pwrite+fdatasync overwrite p50", fl.p50 * MS, "ms", None, "", None,
                   f"one thread, blocks of {cfg.floor_block} between the runs, n={len(fl.samples)}"))
    out: dict[str, object] = {"floor": fl.summary()}
    rates: dict[str, float] = {}
    for key, rs in runs.items():
        count = sum(r[0] for r in rs)
        elapsed = sum(r[2] for r in rs)
        lat = Dist([x for r in rs for x in r[1]])
        rates[key] = count / elapsed
        report.add(Row("3", f"LMDB commit latency p50, {key}", lat.p50 * MS, "ms", fl.p50 * MS,
                       "4 KiB pwrite+fdatasync p50, one thread", lat.p50 / fl.p50,
                       f"p99 {lat.p99 * MS:.3f} ms"))
        report.add(Row("3", f"LMDB commits/s, {key}", rates[key], "commit/s", 1 / fl.p50,
                       "1 / floor p50", rates[key] * fl.p50))
        out[key] = {"commits_per_s": rates[key], "latency": lat.summary(), "seconds": elapsed}
    a, b = f"{n} threads, {n} envs", f"{n} threads, 1 env"
    report.add(Row("3", f"commits/s, {b} against {a}", rates[b], "commit/s", rates[a], a,
                   rates[b] / rates[a]))
    report.add(Row("3", "descriptors per open environment", fds_per_env, "fd", None, "", None,
                   f"memory maps per environment: {maps_per_env:g}; address space reserved: the map "
                   f"size ({INITIAL_MAP_SIZE >> 20} MiB here, the store's initial size)"))
    out["fds_per_env"] = fds_per_env
    out["maps_per_env"] = maps_per_env
    report.extra["metric3"] = out
    for e in [*per_uuid, shared]:
        e.close()
    floor.close()


# --- metric 4: group commit ----------------------------------------------------------------------


class SharedLog:
    """A zero-filled 4 MiB file appended to by several threads (wrapping: every write is an
    overwrite of initialized blocks), with the bookkeeping of a group commit."""

    def __init__(self, path: Path) -> None:
        self.fd = zero_file(path, SEGMENT)
        self.path = path
        self.slots = (SEGMENT - PAGE) // len(RECORD)
        lock = threading.Lock()
        #: Appenders wait on ``cond`` for durability; the syncer thread on ``work`` (same lock).
        self.cond = threading.Condition(lock)
        self.work = threading.Condition(lock)
        self.appended = 0   # records appended
        self.durable = 0    # records durable
        self.syncs = 0
        self.syncing = False
        self.stop = False
        self.extra_fds: list[int] = []

    def append_dsync(self, fd: int) -> None:
        """Reserve a slot under the lock, write the record outside it on an O_DSYNC ``fd``."""
        with self.cond:
            slot = self.appended % self.slots
            self.appended += 1
        os.pwrite(fd, RECORD, slot * len(RECORD))

    def append(self) -> int:
        """Append one record; returns how many records are appended with it (its durable target)."""
        with self.cond:
            slot = self.appended % self.slots
            os.pwrite(self.fd, RECORD, slot * len(RECORD))
            self.appended += 1
            return self.appended

    def close(self) -> None:
        for fd in [self.fd, *self.extra_fds]:
            os.close(fd)
        self.path.unlink(missing_ok=True)


def own_sync(log: SharedLog) -> Body:
    def one(_i: int) -> None:
        log.append()
        os.fdatasync(log.fd)
        with log.cond:
            log.syncs += 1

    return timed(one)


def syncer_thread(log: SharedLog) -> threading.Thread:
    """One thread that syncs whenever records were appended since its last sync."""

    def run() -> None:
        while True:
            with log.work:
                while log.appended <= log.durable and not log.stop:
                    log.work.wait()
                if log.stop:
                    return
                target = log.appended
            os.fdatasync(log.fd)
            with log.cond:
                log.durable = target
                log.syncs += 1
                log.cond.notify_all()

    t = threading.Thread(target=run, daemon=True, name="syncer")
    t.start()
    return t


def wait_syncer(log: SharedLog) -> Body:
    def one(_i: int) -> None:
        target = log.append()
        with log.cond:
            log.work.notify()
            while log.durable < target:
                log.cond.wait()

    return timed(one)


def leader_follower(log: SharedLog) -> Body:
    def one(_i: int) -> None:
        target = log.append()
        with log.cond:
            while log.durable < target:
                if log.syncing:
                    log.cond.wait()
                    continue
                log.syncing = True
                upto = log.appended
                log.cond.release()
                try:
                    os.fdatasync(log.fd)
                finally:
                    log.cond.acquire()
                    log.syncing = False
                log.durable = max(log.durable, upto)
                log.syncs += 1
                log.cond.notify_all()

    return timed(one)


def own_dsync(log: SharedLog) -> Body:
    fd = os.open(log.path, os.O_WRONLY | os.O_DSYNC)
    log.extra_fds.append(fd)

    def one(_i: int) -> None:
        log.append_dsync(fd)
        with log.cond:
            log.syncs += 1

    return timed(one)


GROUP_MODES = {
    "own": "(i) each its own fdatasync",
    "syncer": "(ii) one syncer thread for all",
    "leader": "(iii) leader/follower, first waiter syncs for all",
    "dsync": "(iv) each its own write on an O_DSYNC fd",
}


def metric4(report: Report, work: Path, cfg: Config) -> None:
    print("\n== 4. group commit: K threads append a record each and wait for it to be durable", flush=True)
    d = work / "m4"
    d.mkdir()
    floor = SyncWriter(d / "floor.dat", PAGE)
    io = IoCounters(d)
    ks = (1, 2, 4, 8)
    bodies = {"own": own_sync, "dsync": own_dsync, "syncer": wait_syncer, "leader": leader_follower}
    floor_samples: list[float] = []
    floor_io: dict[str, int] = {}
    results: dict[tuple[str, int], list[tuple[int, int, list[float], float, dict[str, int]]]] = {}

    def add(into: dict[str, int], more: dict[str, int]) -> dict[str, int]:
        for key, v in more.items():
            into[key] = into.get(key, 0) + v
        return into

    for _ in range(cfg.rounds):
        for k in ks:
            for mode in GROUP_MODES:
                before = io.read()
                floor_samples += [floor.sample() for _ in range(cfg.floor_block // 2)]
                add(floor_io, io.delta(before, io.read()))
                log = SharedLog(d / f"log-{mode}-{k}")
                syncer = syncer_thread(log) if mode == "syncer" else None
                before = io.read()
                count, lat, elapsed = run_threads(k, bodies[mode](log), cfg.seconds)
                if syncer is not None:
                    with log.cond:
                        log.stop = True
                        log.work.notify()
                    syncer.join()
                results.setdefault((mode, k), []).append(
                    (count, log.syncs, lat, elapsed, io.delta(before, io.read())))
                log.close()
    fl = Dist(floor_samples)
    floor_rate = 1 / fl.p50
    floor_per = IoCounters.per(floor_io, len(floor_samples))
    report.add(Row("4", "floor: 4 KiB pwrite+fdatasync overwrite p50", fl.p50 * MS, "ms", None, "", None,
                   f"one thread: 1 / p50 = {floor_rate:.0f} syncs/s (mean {fl.mean * MS:.3f} ms); "
                   f"n={len(fl.samples)}; {IoCounters.text(floor_per)}"))
    out: dict[str, object] = {"floor": fl.summary(), "floor_rate": floor_rate,
                              "floor_io_per_sample": floor_per}
    own1 = 0.0
    for k in ks:
        for mode, label in GROUP_MODES.items():
            rs = results[(mode, k)]
            count = sum(r[0] for r in rs)
            syncs = sum(r[1] for r in rs)
            elapsed = sum(r[3] for r in rs)
            counts: dict[str, int] = {}
            for r in rs:
                add(counts, r[4])
            per = IoCounters.per(counts, count)
            lat = Dist([x for r in rs for x in r[2]])
            rate = count / elapsed
            own1 = own1 or rate
            report.add(Row("4", f"K={k} {label}: durable records/s", rate, "rec/s", floor_rate,
                           "1 / floor p50", rate / floor_rate,
                           f"{rate / own1:.2f}x K=1 (i); {syncs / count:.3f} syncs/record, "
                           f"{IoCounters.text(per, 'record')}; wait per record p50 {lat.p50 * MS:.3f} ms "
                           f"({lat.p50 / fl.p50:.2f}x floor), p99 {lat.p99 * MS:.3f} ms"))
            out[f"{mode} K={k}"] = {"records_per_s": rate, "syncs": syncs, "records": count,
                                    "syncs_per_record": syncs / count, "seconds": elapsed,
                                    "io_per_record": per, "latency": lat.summary()}
    report.extra["metric4"] = out
    floor.close()


# --- main ----------------------------------------------------------------------------------------


def df_t(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"df -T failed: {exc}"


def _own_cpu() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    t = os.times()
    return t.user + t.system


def run_suite(directory: Path, only: set[int], cfg: Config) -> dict[str, object]:
    """The metrics ``only`` in a fresh directory under ``directory``; what goes in the results."""
    directory.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ulog-journal-alt-", dir=directory))
    machine = benchlib.machine(work)
    if machine["state_dir_fs"].startswith("tmpfs"):
        print("warning: tmpfs: fdatasync is free there, the ratios mean nothing", flush=True)
    load_start = benchlib.loadavg()
    busy0, total0 = benchlib.machine_ticks()
    own0 = _own_cpu()
    started = datetime.datetime.now(datetime.UTC)
    print(f"journal alternatives: {work} on {machine['state_dir_fs']}; kernel {machine['kernel']}; "
          f"{machine['nproc']} CPUs; load average at start {load_start}", flush=True)
    if float(load_start.split()[0]) > 1.5:
        print("warning: the machine is busy (1-minute load > 1.5): rerun when it is quieter", flush=True)
    report = Report()
    t0 = time.perf_counter()
    try:
        for number, fn in ((1, metric1), (2, metric2), (3, metric3), (4, metric4)):
            if number in only:
                fn(report, work, cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    busy1, total1 = benchlib.machine_ticks()
    load_end = benchlib.loadavg()
    busy = (busy1 - busy0) / max(1, total1 - total0)
    tick = os.sysconf("SC_CLK_TCK")
    others = max(0.0, (busy1 - busy0) / tick - (_own_cpu() - own0)) / max(1e-9, (total1 - total0) / tick)
    print(f"\nload average at start {load_start}, at end {load_end} (this benchmark's threads count in "
          f"it); CPUs {busy:.0%} busy during the run, {others:.0%} by other processes; {elapsed:.0f} s",
          flush=True)
    return {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "dir": str(directory),
        "machine": {**machine, "df_T": df_t(directory)},
        "load_start": load_start,
        "load_end": load_end,
        "cpu_busy_during_run": round(busy, 3),
        "cpu_busy_by_others": round(others, 3),
        "seconds": round(elapsed, 1),
        "rows": [asdict(r) for r in report.rows],
        "notes": report.notes,
        **report.extra,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few samples, short runs (~10 s)")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="where the files go (a fresh directory under it; default /var/tmp, never tmpfs)")
    p.add_argument("--also", type=Path, action="append", default=[], metavar="DIR",
                   help="then run --also-only on another filesystem too (repeatable); its results go "
                   "in the same file under 'also'")
    p.add_argument("--samples", type=int, help="samples per latency figure (default 2000, quick 200)")
    p.add_argument("--seconds", type=float, help="seconds per run of a concurrent configuration")
    p.add_argument("--only", default="1,2,3,4", help="metrics to run, e.g. 1,4")
    p.add_argument("--also-only", default="1,2,4", help="metrics to run on the --also directories")
    p.add_argument("--out", type=Path, help="results file (default docs/benchmarks/journal-alternatives"
                   "[-quick].json)")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.samples:
        cfg = Config(**{**asdict(cfg), "samples": args.samples})
    if args.seconds:
        cfg = Config(**{**asdict(cfg), "seconds": args.seconds})
    suffix = "-quick" if args.quick else ""
    out = args.out or ROOT / "docs" / "benchmarks" / f"journal-alternatives{suffix}.json"

    def metrics(text: str) -> set[int]:
        return {int(x) for x in text.split(",") if x.strip()}

    result: dict[str, object] = {
        "command": " ".join([".venv/bin/python", "tools/bench/journal_alternatives.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "config": asdict(cfg),
        **run_suite(args.dir, metrics(args.only), cfg),
    }
    also = []
    for directory in args.also:
        print(f"\n===== again on {directory}", flush=True)
        also.append(run_suite(directory, metrics(args.also_only), cfg))
    if also:
        result["also"] = also
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
