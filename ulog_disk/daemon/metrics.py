"""``dm-ulogd --metrics-file PATH``: the daemon's counters in the node_exporter textfile format.

No network listener: a root daemon that every mirror write depends on must not open one. The
file is meant for node_exporter's textfile collector (``--collector.textfile.directory``), which
reads every ``*.prom`` file of a directory at each scrape (``docs/metrics.md``).

Three steps, so that the request loop pays almost nothing:

* **counting** is what the daemon and the engine do anyway: plain integer increments on the loop
  thread (:class:`ulog_disk.log.engine.Stats`, the group commit's counters). The one counter kept only
  for this, the FLUSH latency histogram (:class:`FlushLatency`), is a list of integers updated
  under the send lock the reply already holds;
* a **snapshot** (:meth:`Metrics.snapshot`) copies those numbers and a few per mirror into plain
  tuples, on the loop thread, because the engine's state is only ever read there. It costs a
  popcount of each mirror's clean bitmap (4 KiB at 32 K regions);
* **writing** (:meth:`Metrics.job`) builds the prometheus-client objects from the snapshot (a
  custom collector: nothing prometheus-client owns lives between two writes), measures the
  journal and stores on disk, and replaces the file. It runs on the store worker as background
  work (``Daemon.background``): formatting a few thousand mirrors takes tens of milliseconds of
  Python, which must not sit between two requests on the loop; on the worker it is one job,
  taken only when the worker is idle, like a checkpoint.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from ..log.engine import Stats
from ..log.ratelog import RateLimitedLog
from ..protocol.wire import Request, RequestType
from ..storage import journal as jn
from .applier import Applier

log = logging.getLogger("ulog_disk.metrics")

#: Seconds between two writes of the metrics file (node_exporter is scraped every 15 s or more).
DEFAULT_INTERVAL = 5.0
#: Upper bounds of the FLUSH latency buckets (seconds): from a tmpfs sync (tens of µs) through
#: a disk's (a few ms) to the kernel's 15 s request timeout.
FLUSH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                 1.0, 2.5, 5.0, 15.0)
#: Label value of the requests no type name fits: type 0, unknown types, malformed frames.
INVALID = "invalid"
#: A failure to write the file is logged once; while it keeps failing, one summary line per this
#: many seconds says how many more writes failed.
FAILURE_LOG_INTERVAL = 600.0

_TYPE_NAMES = {int(t): t.name for t in RequestType}


class FlushLatency:
    """A histogram of FLUSH latency, request received → reply sent, as plain integers.

    ``started`` holds the receive time of each FLUSH not answered yet, by the identity of its
    decoded request (the object every reply to it carries). :meth:`answered` runs under the
    daemon's send lock, whichever thread sends the reply, so the counts never need a lock of
    their own; :meth:`copy` takes the same lock for a consistent snapshot.
    """

    def __init__(self) -> None:
        self.started: dict[int, float] = {}
        self.counts = [0] * (len(FLUSH_BUCKETS) + 1)
        self.sum = 0.0

    def received(self, request: Request) -> None:
        self.started[id(request)] = time.monotonic()

    def answered(self, request: Request) -> None:
        started = self.started.pop(id(request), None)
        if started is not None:
            self.observe(time.monotonic() - started)

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus ``le``).
        self.counts[bisect.bisect_left(FLUSH_BUCKETS, seconds)] += 1
        self.sum += seconds

    def copy(self, lock: threading.Lock) -> tuple[list[int], float]:
        with lock:
            return list(self.counts), self.sum


class MirrorSample(NamedTuple):
    """One log instance's numbers. A plain tuple: the loop makes thousands per snapshot."""

    uuid: str
    luid: int
    state: str
    health: str
    regions: int
    dirty: int
    out_of_sync: int


@dataclass
class Snapshot:
    """Everything a metrics file says, copied on the loop thread."""

    taken_at: float
    started_at: float
    requests: dict[str, int]
    errors: dict[str, int]
    flush_counts: list[int]
    flush_sum: float
    stats: Stats
    journal_syncs: int
    journal_sync_failures: int
    journal_backlog: int
    dropped_frames: int
    mirrors: list[MirrorSample] = field(default_factory=list)
    #: Requests held back because a journal sync had stalled (the state disk), since start.
    held_requests: int = 0
    #: ``ClusterNode.status()`` in cluster mode (a copy), else None.
    cluster: ClusterSample | None = None


class ClusterSample(NamedTuple):
    """What the metrics say of the cluster node (``dm-ulogd --cluster``), copied on the loop."""

    node: int
    members: int
    quorate: bool
    current: bool
    epoch: int
    logs: int
    pending: int
    waiting: int
    unfenced: int
    agreed: int
    applied: int
    held: int
    rule_errors: int
    transfers_sent: int
    transfers_taken: int
    departed: int
    fenced: int
    latency_sum: float
    latency_count: int

    @classmethod
    def of(cls, status: Mapping[str, Any]) -> ClusterSample:
        """From ``ClusterNode.status()``: lists are counted, the rest copied (plain values)."""
        return cls(
            node=int(status["node"]), members=len(status["members"]), quorate=bool(status["quorate"]),
            current=bool(status["current"]), epoch=int(status["epoch"]), logs=int(status["logs"]),
            pending=int(status["pending"]), waiting=int(status["waiting"]), unfenced=len(status["unfenced"]),
            agreed=int(status["agreed"]), applied=int(status["applied"]), held=int(status["held"]),
            rule_errors=int(status["rule_errors"]), transfers_sent=int(status["transfers_sent"]),
            transfers_taken=int(status["transfers_taken"]), departed=int(status["departed"]),
            fenced=int(status["fenced"]), latency_sum=float(status["latency_sum"]),
            latency_count=int(status["latency_count"]))


class ClusterStatus(Protocol):
    """What the metrics read of the cluster node (``ulog_disk.daemon.cluster.ClusterNode``)."""

    def status(self) -> Mapping[str, Any]: ...


def requests_by_type(stats: Stats) -> tuple[dict[str, int], dict[str, int]]:
    """Requests and errors by type name. Requests of no known type (type 0, unknown types,
    malformed frames) are not in ``stats.by_type``: they are what the total has beyond it."""
    requests = {kind.name: n for kind, n in stats.by_type.items()}
    invalid = stats.requests - sum(requests.values())
    if invalid:
        requests[INVALID] = invalid
    errors: dict[str, int] = {}
    for number, n in stats.errors_by_type.items():
        name = _TYPE_NAMES.get(number, INVALID)
        errors[name] = errors.get(name, 0) + n
    return requests, errors


def disk_bytes(state_dir: Path | None) -> tuple[int, int, int]:
    """(journal bytes, store bytes, stores) allocated on disk in the state directory: journal
    segments (the prepared spare included) and every store's ``data.mdb`` (stores moved aside
    as damaged included: they take space until someone removes them)."""
    if state_dir is None:
        return 0, 0, 0
    journal = stores = count = 0
    with os.scandir(state_dir) as entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    st = os.stat(os.path.join(entry.path, "data.mdb"))
                    stores += st.st_blocks * 512
                    count += 1
                elif jn.parse_segment_name(entry.name) is not None:
                    journal += entry.stat(follow_symlinks=False).st_blocks * 512
            except FileNotFoundError:  # not a store, or removed since the listing
                continue
    return journal, stores, count


def plain_families(kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
                   rows: Iterable[tuple[str, str, float]]) -> Iterator[CounterMetricFamily
                                                                       | GaugeMetricFamily]:
    """One unlabelled family of ``kind`` per (name, help, value) row, in the rows' order."""
    for name, doc, value in rows:
        yield kind(name, doc, value=value)


class SnapshotCollector(Collector):
    """The prometheus-client view of one snapshot (built at write time, dropped after it)."""

    def __init__(self, snap: Snapshot, state_dir: Path | None) -> None:
        self.snap = snap
        self.state_dir = state_dir

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
                                  | SummaryMetricFamily]:
        s = self.snap
        st = s.stats
        yield GaugeMetricFamily("dm_ulogd_start_time_seconds", "When the daemon started (unix time).",
                                value=s.started_at)
        requests = CounterMetricFamily("dm_ulogd_requests", "Requests received, by request type.",
                                       labels=["type"])
        for name, n in sorted(s.requests.items()):
            requests.add_metric([name], n)
        yield requests
        errors = CounterMetricFamily("dm_ulogd_errors", "Requests answered with an error, by request type.",
                                     labels=["type"])
        for name, n in sorted(s.errors.items()):
            errors.add_metric([name], n)
        yield errors
        yield CounterMetricFamily("dm_ulogd_dropped_frames", "Frames dropped unanswered (too short to "
                                  "carry a request header).", value=s.dropped_frames)
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(FLUSH_BUCKETS, s.flush_counts, strict=False):
            running += n
            buckets.append((repr(bound), running))
        buckets.append(("+Inf", running + s.flush_counts[-1]))
        yield HistogramMetricFamily("dm_ulogd_flush_latency_seconds", "FLUSH requests, from received to "
                                    "answered (journal sync and group-commit wait included).",
                                    buckets=buckets, sum_value=s.flush_sum)
        yield from plain_families(CounterMetricFamily, (
            ("dm_ulogd_commits", "Durable points reached for a request: FLUSHes made durable, lifecycle "
             "writes to a store.", st.commits),
            ("dm_ulogd_commit_failures", "Durable points that failed (answered -EIO).", st.commit_failures),
            ("dm_ulogd_journal_syncs", "Journal syncs (one fdatasync each, shared by every FLUSH waiting: "
             "group commit).", s.journal_syncs),
            ("dm_ulogd_journal_sync_failures", "Journal syncs that failed.", s.journal_sync_failures),
            ("dm_ulogd_requests_held", "Requests that would write the journal, held back while a journal "
             "sync had run over 1 s (a slow or stalled state disk); the others were answered meanwhile.",
             s.held_requests),
            ("dm_ulogd_checkpoints", "Store writes of a log's changes (background checkpoints, lifecycle "
             "writes).", st.checkpoints),
            ("dm_ulogd_checkpoint_failures", "Store writes that failed (retried later; the journal keeps the "
             "changes).", st.checkpoint_failures),
        ))
        journal, stores, count = disk_bytes(self.state_dir)
        yield from plain_families(GaugeMetricFamily, (
            ("dm_ulogd_journal_backlog_bytes", "Journal bytes not yet in the stores (what a restart would "
             "replay).", s.journal_backlog),
            ("dm_ulogd_journal_disk_bytes", "Disk space of the journal segments.", journal),
            ("dm_ulogd_store_disk_bytes", "Disk space of the LMDB stores.", stores),
            ("dm_ulogd_stores", "Stores (one per uuid) in the state directory.", count),
            ("dm_ulogd_mirrors", "Log instances in the table.", len(s.mirrors)),
        ))
        labels = ["uuid", "luid"]
        families = {
            "regions": GaugeMetricFamily("dm_ulogd_mirror_regions", "Regions of the log.", labels=labels),
            "dirty": GaugeMetricFamily("dm_ulogd_mirror_dirty_regions", "Regions marked dirty (being "
                                       "written, or to be resynced after a crash).", labels=labels),
            "out_of_sync": GaugeMetricFamily("dm_ulogd_mirror_out_of_sync_regions", "Regions whose legs "
                                             "may differ (to be resynced).", labels=labels),
            "healthy": GaugeMetricFamily("dm_ulogd_mirror_healthy", "1 when the log's health is A; 0 when "
                                         "a journal write (D) or a commit (F) failed.", labels=labels),
        }
        info = GaugeMetricFamily("dm_ulogd_mirror_info", "Always 1: the log's lifecycle state and health "
                                 "character (as in dmsetup status).", labels=[*labels, "state", "health"])
        for m in s.mirrors:
            key = [m.uuid, f"{m.luid:#x}"]
            families["regions"].add_metric(key, m.regions)
            families["dirty"].add_metric(key, m.dirty)
            families["out_of_sync"].add_metric(key, m.out_of_sync)
            families["healthy"].add_metric(key, 1 if m.health == "A" else 0)
            info.add_metric([*key, str(m.state), m.health], 1)
        yield from families.values()
        yield info
        if s.cluster is not None:
            yield from cluster_families(s.cluster)


def cluster_families(c: ClusterSample) -> Iterator[CounterMetricFamily | GaugeMetricFamily
                                                   | SummaryMetricFamily]:
    """The ``dm_ulogd_cluster_*`` families (cluster mode only; ``docs/metrics.md``)."""
    yield from plain_families(GaugeMetricFamily, (
        ("dm_ulogd_cluster_node_id", "This node's corosync node id.", c.node),
        ("dm_ulogd_cluster_members", "Nodes of the cluster group (this one included) in the last "
         "membership.", c.members),
        ("dm_ulogd_cluster_quorate", "1 while corosync says the cluster is quorate (agreed requests wait "
         "while it is not).", int(c.quorate)),
        ("dm_ulogd_cluster_current", "1 once this node holds the state agreed in the membership (after the "
         "state exchange of a join).", int(c.current)),
        ("dm_ulogd_cluster_epoch", "How far along the agreed history this node's cluster state is (inputs "
         "applied).", c.epoch),
        ("dm_ulogd_cluster_logs", "Clustered logs in the cluster state.", c.logs),
        ("dm_ulogd_cluster_pending_requests", "Agreed requests of this node multicast and not answered "
         "yet.", c.pending),
        ("dm_ulogd_cluster_waiting_requests", "Agreed requests waiting to be multicast (not quorate, or not "
         "current yet).", c.waiting),
        ("dm_ulogd_cluster_unfenced_nodes", "Departed nodes not fenced yet (their regions are held out of "
         "sync, handed to nobody).", c.unfenced),
    ))
    yield from plain_families(CounterMetricFamily, (
        ("dm_ulogd_cluster_agreed_requests", "Agreed requests this node multicast (resends after a "
         "membership change included).", c.agreed),
        ("dm_ulogd_cluster_applied", "Cluster messages applied to the cluster state (every node's, in the "
         "agreed order).", c.applied),
        ("dm_ulogd_cluster_requests_held", "Agreed requests that had to wait before being multicast (not "
         "quorate, not current, state exchange).", c.held),
        ("dm_ulogd_cluster_rule_errors", "Cluster messages every node refused alike (a region past the "
         "log's end, an unknown log).", c.rule_errors),
    ))
    transfers = CounterMetricFamily("dm_ulogd_cluster_state_transfers", "Whole-state transfers at a join: "
                                    "sent as the donor, taken from a donor.", labels=["direction"])
    transfers.add_metric(["sent"], c.transfers_sent)
    transfers.add_metric(["taken"], c.transfers_taken)
    yield transfers
    yield from plain_families(CounterMetricFamily, (
        ("dm_ulogd_cluster_departed_nodes", "Nodes declared departed (left the membership without closing "
         "their logs).", c.departed),
        ("dm_ulogd_cluster_fenced_nodes", "Departed nodes declared fenced (their held regions released for "
         "recovery).", c.fenced),
    ))
    yield SummaryMetricFamily("dm_ulogd_cluster_agreed_latency_seconds", "This node's agreed requests, from "
                              "multicast to answer (agreed, applied, and for a FLUSH with marks or a "
                              "RESUME durable here and on another member).",
                              count_value=c.latency_count, sum_value=c.latency_sum)


class Metrics:
    """The ``--metrics-file`` writer of one daemon."""

    def __init__(self, path: Path, interval: float = DEFAULT_INTERVAL, state_dir: Path | None = None) -> None:
        self.path = path
        self.interval = interval
        self.state_dir = state_dir
        self.started_at = time.time()
        self.flush = FlushLatency()
        #: When the next write is due (monotonic): the first at the first background turn.
        self.due = 0.0
        self.failing = 0
        self.written = 0
        self.noisy = RateLimitedLog(log, burst=1, interval=FAILURE_LOG_INTERVAL)
        #: The cluster node in cluster mode (set by the service); read at each snapshot.
        self.cluster: ClusterStatus | None = None

    def snapshot(self, applier: Applier, journal_syncs: tuple[int, int], dropped_frames: int,
                 send_lock: threading.Lock, held_requests: int = 0) -> Snapshot:
        """Copy the numbers (loop thread only: the engine's state is read nowhere else);
        ``journal_syncs``: the group commit's syncs and failed syncs."""
        engine = applier.engine
        stats = engine.stats
        requests, errors = requests_by_type(stats)
        counts, total = self.flush.copy(send_lock)
        mirrors = []
        for inst in engine.table.values():
            rl = inst.log
            n = rl.region_count
            # Padding bits past region_count are 0 in both maps (regionlog invariant). The state
            # is a StrEnum member, immutable: its text is taken on the worker.
            mirrors.append(MirrorSample(inst.uuid, inst.luid, inst.state, inst.health, n,
                                        n - rl.clean.count(), n - rl.sync_count))
        return Snapshot(
            taken_at=time.time(), started_at=self.started_at, requests=requests, errors=errors,
            flush_counts=counts, flush_sum=total,
            stats=Stats(commits=stats.commits, commit_failures=stats.commit_failures,
                        checkpoints=stats.checkpoints, checkpoint_failures=stats.checkpoint_failures),
            journal_syncs=journal_syncs[0], journal_sync_failures=journal_syncs[1],
            journal_backlog=max(0, applier.backend.position() - applier.needed()),
            dropped_frames=dropped_frames, mirrors=mirrors, held_requests=held_requests,
            # Under the cluster node's own lock (its thread and the loop change it).
            cluster=None if self.cluster is None else ClusterSample.of(self.cluster.status()),
        )

    def write(self, snap: Snapshot) -> None:
        """Replace the file (any thread). ``write_to_textfile`` writes a temporary file in the
        same directory and renames it over the file: a reader sees the old file or the new one,
        never a part. No fsync: the file is rewritten every few seconds and means nothing after
        a host crash (the daemon that wrote it is gone); syncing would put a disk wait in the
        store worker's queue for nothing."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SnapshotCollector(snap, self.state_dir))
        write_to_textfile(str(self.path), registry)

    def written_or_not(self, exc: BaseException | None) -> bool:
        """The outcome of a write (run as background work on the store worker): only logged, a
        metrics file that cannot be written never fails anything else."""
        if exc is None:
            self.written += 1
            if self.failing:
                log.info("metrics file %s written again (%d write(s) had failed)", self.path, self.failing)
                self.failing = 0
        else:
            self.failing += 1
            self.noisy.log("metrics file write failure", logging.WARNING,
                           "cannot write the metrics file %s: %s (serving goes on; retried every %g s)",
                           self.path, exc, self.interval)
        return True

    def write_now(self, snap: Snapshot) -> None:
        """The last write, at stop, on the caller's thread."""
        try:
            self.write(snap)
        except Exception as exc:  # noqa: BLE001 - logged; the stop goes on
            self.written_or_not(exc)
        else:
            self.written_or_not(None)
        self.noisy.flush_all()


def check_metrics_path(path: Path) -> None:
    """Refuse a ``--metrics-file`` that could never be written (before anything is created)."""
    parent = path.parent
    if not path.name or path.name in (".", ".."):
        raise ValueError(f"--metrics-file {str(path)!r} names no file")
    if not parent.is_dir():
        raise ValueError(f"--metrics-file {path}: directory {parent} does not exist")
    if path.is_dir():
        raise ValueError(f"--metrics-file {path} is a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--metrics-file {path}: directory {parent} is not writable "
                         f"({os.strerror(errno.EACCES)})")
