"""The tools' read-only view of a state directory's cluster state (``<state dir>/cluster``,
written by ``dm-ulogd --cluster``): the snapshot, the AGREED records after it replayed as the
daemon's restart replays them, and the invariants of the state they give.

Nothing here writes: :func:`ulog_disk.storage.cluster_store.read_cluster_dir` reads what
``ClusterStore.load`` would, without continuing the journal in a new segment as ``load`` does.
The journal is scanned before the snapshot is read (the order the daemon's snapshot-then-cut
relies on, see ``read_cluster_dir``), so a daemon running meanwhile gives a state it had at some
moment, never a mix with a hole in it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cluster import messages as msg
from ..cluster.shared import ClusterRuleError, ClusterState, SharedLog
from ..log.regionlog import format_ranges
from ..storage import journal as jn
from ..storage.cluster_store import (
    LEFT_BEHIND_FILE,
    ClusterStoreError,
    agreed_head,
    read_cluster_dir,
    read_left_behind,
)
from ..storage.lmdb_reader import ERROR, NOTE, WARNING, Finding
from .common import bit_ranges, luid_hex
from .storeview import CLUSTER_DIR, scan_journal

SNAPSHOT_FILE = "snapshot"


LOG_WHERE = "cluster log "


def log_where(uuid: str) -> str:
    """A finding's ``where`` for one clustered log."""
    return f"{LOG_WHERE}{uuid!r}"


def cluster_dir(state_dir: Path) -> Path | None:
    """``state_dir``'s cluster directory, None if it has none (the daemon never ran clustered)."""
    path = Path(state_dir) / CLUSTER_DIR
    return path if path.is_dir() and not path.is_symlink() else None


def is_cluster_dir(path: Path) -> bool:
    """True for a cluster directory given itself (``ulog-dump journal DIR/cluster``)."""
    path = Path(path)
    return path.is_dir() and (path.name == CLUSTER_DIR or (path / SNAPSHOT_FILE).is_file())


@dataclass
class ClusterView:
    directory: Path
    scan: jn.Scan | None = None
    #: The state the daemon's restart would load; None if the directory cannot be read.
    state: ClusterState | None = None
    has_snapshot: bool = False
    snapshot_id: int = 0
    snapshot_epoch: int = 0
    #: AGREED records replayed onto the snapshot, and records naming another snapshot.
    replayed: int = 0
    skipped: int = 0
    #: Why the directory cannot be read at all (the daemon refuses to start clustered on it).
    error: str | None = None
    #: The epoch its copy was at when other members went on without this node (its
    #: ``left-behind`` file), or None.
    left_behind: int | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.level in (ERROR, WARNING)]

    def logs(self, uuids: Iterable[str] | None = None, luid: int | None = None) -> list[SharedLog]:
        """The clustered logs, by uuid; only ``uuids`` and those some node has open as ``luid``
        when given."""
        if self.state is None:
            return []
        wanted = None if uuids is None else set(uuids)
        return [self.state.logs[u] for u in sorted(self.state.logs)
                if (wanted is None or u in wanted)
                and (luid is None or any(o.luid == luid for o in self.state.logs[u].opened.values()))]

    def findings_for(self, uuids: Iterable[str] | None) -> list[Finding]:
        """The findings about these logs and those about the whole directory."""
        if uuids is None:
            return list(self.findings)
        mine = {log_where(u) for u in uuids}
        return [f for f in self.findings if f.where in mine or not f.where.startswith(LOG_WHERE)]

    def generation(self) -> str:
        """The state's place in the agreed history, as one phrase."""
        if self.state is None:
            return "unreadable"
        if not self.has_snapshot:
            return f"epoch {self.state.epoch} (no snapshot, {self.replayed} record(s))"
        return (f"epoch {self.state.epoch} (snapshot {self.snapshot_id:016x} at epoch {self.snapshot_epoch}, "
                f"{self.replayed} record(s) after it)")


def read_cluster(directory: Path) -> ClusterView:
    """Read and judge a cluster directory; never raises for what is in it (``view.error``)."""
    view = ClusterView(Path(directory))
    where = str(view.directory)
    try:
        view.scan = scan_journal(view.directory)
        loaded = read_cluster_dir(view.directory, view.scan)
    except OSError as exc:
        return _unreadable(view, f"cannot read the cluster state: {exc.strerror or exc}")
    except ClusterStoreError as exc:
        return _unreadable(view, str(exc))
    try:
        state = msg.decode_snapshot(loaded.snapshot) if loaded.snapshot is not None else ClusterState()
    except msg.MessageError as exc:
        return _unreadable(view, f"{view.directory / SNAPSHOT_FILE}: {exc}")
    view.has_snapshot = loaded.snapshot is not None
    view.left_behind = read_left_behind(view.directory / LEFT_BEHIND_FILE)
    if view.left_behind is not None:
        view.findings.append(Finding(
            NOTE, where, f"left behind at epoch {view.left_behind}: this node stopped while other members "
            "went on, its copy is older than theirs; a cluster forming anew waits for one of them, or for "
            "every node (docs/cluster.md, Epochs and the state exchange)"))
    view.snapshot_id, view.snapshot_epoch, view.skipped = loaded.snapshot_id, loaded.epoch, loaded.skipped
    for problem in view.scan.problems:
        view.findings.append(Finding(WARNING, f"{where} journal", f"{problem}: ignored by the daemon"))
    for d in view.scan.damage:
        view.findings.append(Finding(WARNING, f"{where} journal", f"damaged between positions {d.start} and "
                                     f"{d.end}: {d.reason}; the state is the one before it (older: the "
                                     "other members' newer copies replace it when the cluster forms)"))
    if loaded.skipped:
        view.findings.append(Finding(NOTE, f"{where} journal", f"{loaded.skipped} record(s) build on another "
                                     "snapshot (a state transfer whose snapshot never landed): not used"))
    # As the daemon's restart does (ClusterNode._load): replay until a record does not apply.
    expected = state.epoch
    for applied in loaded.records:
        try:
            state.apply(msg.as_input(applied.sender, msg.decode_stored(applied.message)))
        except (msg.MessageError, ClusterRuleError) as exc:
            view.findings.append(Finding(WARNING, f"{where} journal", f"the record of epoch {applied.epoch} "
                                         f"does not apply ({exc}): the state ends before it"))
            break
        view.replayed += 1
        expected += 1
        if applied.epoch != expected:
            view.findings.append(Finding(WARNING, f"{where} journal", f"records jump from epoch "
                                         f"{expected - 1} to {applied.epoch}: agreed messages between them "
                                         "are missing"))
            expected = state.epoch = applied.epoch
    view.state = state
    view.findings.extend(check_state(state))
    return view


def _unreadable(view: ClusterView, reason: str) -> ClusterView:
    reason = " ".join(reason.split())  # construct's errors span lines; a tool's message is one
    view.error = reason
    view.findings.append(Finding(ERROR, str(view.directory), f"{reason} (dm-ulogd --cluster refuses to "
                                 "start on it)"))
    return view


def check_state(state: ClusterState) -> list[Finding]:
    """The cluster state's invariants: :meth:`ClusterState.check` and what a kernel relies on
    (no region reads clean while a node holds it marked; a departed node's regions stay out of
    sync, handed to nobody, until it is fenced)."""
    out = []
    for uuid, shared in sorted(state.logs.items()):
        where = log_where(uuid)
        out.extend(Finding(ERROR, where, p.removeprefix(f"{uuid}: ")) for p in shared.check())
        n = shared.region_count
        for node, bits in sorted(shared.marks.items()):
            clean = [r for r in bits.search(1) if r < n and shared.is_clean(r)]
            if clean:
                out.append(Finding(ERROR, where, f"region(s) {format_ranges(clean)} marked by node {node} "
                                   "are counted clean"))
        for node, bits in sorted(shared.held.items()):
            regions = list(bits.search(1))
            if any(r < n and shared.is_clean(r) for r in regions):
                out.append(Finding(ERROR, where, f"a region held for node {node}'s fence is counted clean"))
            handed = [r for r in regions if r in shared.recovering]
            if handed:
                out.append(Finding(ERROR, where, f"region(s) {format_ranges(handed)} held for node {node}'s "
                                   "fence are handed out for recovery"))
            if node not in state.unfenced:
                out.append(Finding(ERROR, where, f"regions are held for node {node}, which is not among the "
                                   "departed nodes waiting for a fence"))
        released_in_sync = shared.released & shared.sync
        if released_in_sync.any():
            out.append(Finding(ERROR, where, f"released region(s) {bit_ranges(released_in_sync)} are in "
                               "sync"))
        outside = sorted(r for r in shared.recovering if not 0 <= r < n)
        if outside:
            out.append(Finding(ERROR, where, f"region(s) {format_ranges(outside)} being recovered are past "
                               f"the log's end ({n} regions)"))
    return out


# --- text and JSON ----------------------------------------------------------------------------


def _regions(bits: Iterable[int]) -> str:
    return format_ranges(sorted(bits))


def _short(boot_id: str) -> str:
    """A kernel boot id (a UUID) by its first 8 characters, as ulog-recover list shows them;
    any other (--boot-id) whole."""
    return boot_id[:8] if len(boot_id) >= 32 else boot_id


def log_json(shared: SharedLog) -> dict[str, Any]:
    return {
        "uuid": shared.uuid, "region_count": shared.region_count, "in_sync": shared.sync_count,
        "out_of_sync": bit_ranges(~shared.sync[: shared.region_count]) if shared.region_count else "",
        "opened": [{"node": node, "luid": o.luid, "luid_hex": luid_hex(o.luid), "boot_id": o.boot_id}
                   for node, o in sorted(shared.opened.items())],
        "marks": [{"node": node, "count": bits.count(1), "regions": bit_ranges(bits)}
                  for node, bits in sorted(shared.marks.items())],
        "held": [{"node": node, "count": bits.count(1), "regions": bit_ranges(bits)}
                 for node, bits in sorted(shared.held.items())],
        "released": {"count": shared.released.count(1), "regions": bit_ranges(shared.released)},
        "recovering": [{"region": r, "node": node} for r, node in sorted(shared.recovering.items())],
        "cursors": [{"node": node, "cursor": c} for node, c in sorted(shared.cursor.items())],
    }


def view_json(view: ClusterView, uuids: Iterable[str] | None = None,
              luid: int | None = None) -> dict[str, Any]:
    sc = view.scan
    state = view.state
    return {
        "directory": str(view.directory), "readable": view.error is None, "error": view.error,
        "healthy": not [f for f in view.findings_for(uuids) if f.level in (ERROR, WARNING)],
        "epoch": None if state is None else state.epoch,
        "snapshot": None if not view.has_snapshot else {
            "id": view.snapshot_id, "id_hex": f"{view.snapshot_id:016x}", "epoch": view.snapshot_epoch},
        "records_replayed": view.replayed, "records_skipped": view.skipped,
        "journal": None if sc is None else {
            "exists": sc.exists, "journal_id": None if sc.journal_id is None else sc.journal_id.hex(),
            "segments": len(sc.segments), "base": sc.base, "end": sc.end, "durable": sc.durable,
            "records": len(sc.records),
            "damage": [{"start": d.start, "end": d.end, "reason": d.reason} for d in sc.damage],
            "problems": list(sc.problems)},
        "unfenced": [] if state is None else list(state.unfenced),
        "left_behind": view.left_behind,
        "logs": [log_json(shared) for shared in view.logs(uuids, luid)],
        "findings": [f.as_json() for f in view.findings_for(uuids)],
    }


def log_lines(shared: SharedLog, indent: str = "  ", cursors: bool = False) -> list[str]:
    n = shared.region_count
    out_of_sync = bit_ranges(~shared.sync[:n]) if n else ""
    head = (f"{indent}clustered log {shared.uuid!r}: {n} regions, {shared.sync_count} in sync"
            + (f" (out of sync: {out_of_sync})" if out_of_sync else ""))
    rows: list[tuple[str, str]] = [
        ("open on", "; ".join(f"node {node} (luid {luid_hex(o.luid)}, boot {_short(o.boot_id)})"
                              for node, o in sorted(shared.opened.items())) or "no node"),
        ("marked", "; ".join(f"node {node}: {bits.count(1)} ({bit_ranges(bits)})"
                             for node, bits in sorted(shared.marks.items())) or "none"),
    ]
    if shared.held:
        rows.append(("held", "; ".join(f"node {node}: {bits.count(1)} ({bit_ranges(bits)})"
                                       for node, bits in sorted(shared.held.items()))
                     + ", waiting for the fence"))
    released = shared.released.count(1)
    rows.append(("released", f"{released} ({bit_ranges(shared.released)})" if released else "none"))
    recovering = sorted(shared.recovering.items())
    rows.append(("recovering", ", ".join(f"{r} by node {node}" for r, node in recovering) or "none"))
    if cursors:
        cursor = sorted(shared.cursor.items())
        rows.append(("resync cursor", "; ".join(f"node {node}: {c}" for node, c in cursor) or "none"))
    width = max(len(k) for k, _ in rows)
    return [head] + [f"{indent}    {k.ljust(width)}  {v}" for k, v in rows]


def view_lines(view: ClusterView, uuids: Iterable[str] | None = None, luid: int | None = None,
               cursors: bool = False) -> list[str]:
    """The state's header line, each (selected) log, and the findings."""
    if view.state is None:
        return [f"cluster state {view.directory}: CANNOT BE READ"] + [
            f"  {f.level:<7}  {f.where}: {f.message}" for f in view.findings]
    state = view.state
    unfenced = ", ".join(str(n) for n in state.unfenced) or "none"
    logs = view.logs(uuids, luid)
    shown = "" if len(logs) == len(state.logs) else f" ({len(logs)} shown)"
    out = [f"cluster state {view.directory}: {view.generation()}; {len(state.logs)} clustered log(s){shown}; "
           f"departed nodes waiting for a fence: {unfenced}"]
    for shared in logs:
        out.extend(log_lines(shared, cursors=cursors))
    out.extend(f"  {f.level:<7}  {f.where}: {f.message}" for f in view.findings_for(uuids))
    return out


# --- AGREED records -------------------------------------------------------------------------------


@dataclass
class Agreed:
    """An AGREED record of the cluster journal, decoded."""

    epoch: int
    sender: int
    snapshot_id: int
    message: msg.Decoded | None
    error: str | None = None


def decode_agreed(record: jn.Record) -> Agreed:
    try:
        sender, snapshot_id, data = agreed_head(record.body)
    except ClusterStoreError as exc:
        return Agreed(record.luid, 0, 0, None, str(exc))
    try:
        return Agreed(record.luid, sender, snapshot_id, msg.decode_stored(data))
    except msg.MessageError as exc:
        return Agreed(record.luid, sender, snapshot_id, None, str(exc))


def message_fields(message: msg.Decoded) -> dict[str, Any]:
    """A message's fields as JSON values (region lists as ranges, bytes as hex)."""
    out: dict[str, Any] = {}
    for key, value in message.fields.items():
        if key.startswith("_"):
            continue
        if key in ("marks", "clears"):
            out[key] = _regions(value)
        elif isinstance(value, bytes | bytearray):
            out[key] = bytes(value).hex()
        elif isinstance(value, list):
            out[key] = [int(v) for v in value]
        else:
            out[key] = value if isinstance(value, bool | str) else int(value)
    return out


def message_text(message: msg.Decoded) -> str:
    parts = []
    for key, value in message_fields(message).items():
        if key == "token" and not value:
            continue
        if isinstance(value, list):
            value = ",".join(str(v) for v in value) or "none"
        elif key == "luid":
            value = luid_hex(value)
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        elif value == "" and key in ("marks", "clears"):
            value = "none"
        parts.append(f"{key} {value}")
    return f"{message.kind.name} " + ", ".join(parts)


def agreed_json(a: Agreed) -> dict[str, Any]:
    return {"epoch": a.epoch, "sender": a.sender, "snapshot_id": a.snapshot_id,
            "snapshot_id_hex": f"{a.snapshot_id:016x}",
            "message_kind": None if a.message is None else a.message.kind.name,
            "fields": None if a.message is None else message_fields(a.message), "error": a.error}


def agreed_text(a: Agreed) -> str:
    what = f"NOT A CLUSTER MESSAGE ({a.error})" if a.message is None else message_text(a.message)
    return f"epoch {a.epoch}, node {a.sender}: {what}"


__all__ = ["CLUSTER_DIR", "SNAPSHOT_FILE", "Agreed", "ClusterView", "agreed_json", "agreed_text",
           "check_state", "cluster_dir", "decode_agreed", "is_cluster_dir", "log_json", "log_lines",
           "log_where", "message_fields", "message_text", "read_cluster", "view_json", "view_lines"]
