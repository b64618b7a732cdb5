"""Read a state directory without disturbing the daemon, and judge what is in it.

Every environment is opened **read-only** (``lmdb.open(..., readonly=True, lock=True)``): the
reader registers in LMDB's reader table like any reader and reads one snapshot in one read
transaction, so it never waits for the daemon's write lock, and the daemon's commits never wait
for it (LMDB writers do not block on readers; they only keep the pages the snapshot uses). A
snapshot is a committed transaction: the tools see the store exactly as a restart would.
The store is read and judged by the daemon's own reader (:mod:`ulog_disk.storage.lmdb_reader`):
the same snapshot, the same decoding, the same findings (an ``error`` is what makes the daemon
refuse the store).

The daemon-wide journal (``formats/journal.md``) is scanned once per read, before any store
(:func:`read_store` says why), and every instance of a layout-3 store gets the journal records
:func:`~ulog_disk.storage.lmdb_reader.plan_replay` picks for the daemon's restore; the bitmaps
shown are what a restart serves from them, by :mod:`ulog_disk.log.restore`'s rule: the stored ones
with the same ops replayed, and an instance the restore would distrust (no checkpoint, a
checkpoint naming a journal that is not there, journal damage after its checkpoint) all dirty and
out of sync, with a warning. A layout-1/2 store is read as it is, its per-instance journal files
folded in as its migration to layout 3 folds them (:func:`~ulog_disk.storage.lmdb_reader.old_journal`).

py-lmdb refuses to open one environment twice in one process, so an environment is opened,
read whole into Python objects and closed again before anything else (the write paths of
``ulog-recover``, which go through :class:`~ulog_disk.storage.lmdb_store.LmdbBackend`) opens it.

Verdicts (``ulog-recover list``), first match wins; whether a state is ever handed over again, and
which one is the uuid's newest, is decided by :mod:`ulog_disk.log.lifecycle`, the rules the daemon
applies:

``damaged``      the instance's records fail verification (the daemon would move the whole store
                 of its uuid aside at its next start), or the store cannot be opened at all.
``superseded``   its superseded flag is set (another instance adopted its state), or it is not live
                 in this boot and another state of the uuid (any instance, or the retained state)
                 has a higher generation: the daemon never hands its state to anyone again.
``orphaned``     recorded under another boot id (the kernel that owned it is gone) and not
                 superseded: if it holds the uuid's newest state, the next RESUME of the uuid
                 adopts it.
``live``, ``presuspended``, ``suspended``, ``constructed``  the lifecycle state the daemon last
                 committed for an instance of this boot.
``retained``     the uuid's retained state (left by the last DTR), when nothing newer exists.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
from bitarray import bitarray

from ..log import restore
from ..log.lifecycle import IN_USE, never_handed_over, newest_state, outranked
from ..log.regionlog import exact_bits
from ..storage import journal as jn
from ..storage.lmdb_env import DIR_MODE, FILE_MODE, open_readonly
from ..storage.lmdb_reader import (
    ERROR,
    NOTE,
    WARNING,
    Finding,
    Snapshot,
    decode_store,
    journal_records_by_instance,
    old_journal,
    plan_replay,
    snapshot,
)
from ..storage.store_format import (
    LAYOUT_VERSION,
    CheckpointRecord,
    FormatRecord,
    MetaRecord,
    RetainedRecord,
    decode_dir_name,
    instance_db_name,
    journal_file_name,
    parse_damaged_dir_name,
)
from .common import DaemonStatus, bit_ranges, daemon_status, is_journal_file, iso, luid_hex, when

_JOURNAL_NAME = re.compile(r"journal\.([0-9a-f]{16})")


@dataclass
class JournalView:
    """What the daemon's next start does with one instance's journal records.

    Layout 3: the daemon-wide journal (``formats/journal.md``). ``checkpoint`` is the instance's
    checkpoint record; ``records``, ``ops`` and ``damaged`` come from
    :func:`~ulog_disk.storage.lmdb_reader.plan_replay`, the function the daemon's restore calls,
    so the state shown is the one the daemon would restore.

    Layouts 1-2: the instance's own ``journal.<luid>`` file, which the daemon folds into the
    bitmaps when it migrates the store to layout 3
    (:func:`~ulog_disk.storage.lmdb_reader.old_journal` judges it for both), then removes.
    """

    layout: int
    ops: list[tuple[int, int]] = field(default_factory=list)
    #: The ops are applied to the state shown (as the daemon's restore or migration would).
    replayed: bool = False
    problem: str | None = None
    # --- layout 3
    checkpoint: CheckpointRecord | None = None
    #: Records of the instance at or after its checkpoint.
    records: int = 0
    #: Position of the first of them (or of the checkpoint when damaged): the journal is needed
    #: from there until the instance's next checkpoint.
    first: int | None = None
    #: Why requests answered since the checkpoint may be missing: the instance then comes back
    #: all dirty and out of sync.
    damaged: str | None = None
    same_boot: bool = True
    #: Ops of those records the restore's rule does not replay (kept for the day it does: the
    #: rule lives in ``plan_replay`` alone).
    dropped: int = 0
    # --- layouts 1-2
    path: Path | None = None
    size: int = 0
    exists: bool = False
    header_luid: int | None = None
    header_seq: int | None = None
    #: The header follows the meta's commit: the migration folds these ops in (same boot).
    follows_meta: bool = False

    def describe(self) -> str:
        if self.layout < 3:
            return self._describe_old()
        c = self.checkpoint
        if c is None:
            text = "no checkpoint record"
        else:
            text = (f"checkpoint at position {c.position} of journal {c.journal_id.hex()[:12]}, "
                    f"{self.records} record(s) after it, {len(self.ops)} op(s) replayed")
            if self.dropped:
                text += f", {self.dropped} op(s) of them not replayed (the restore's rule)"
        if self.damaged:
            text += f"; DAMAGED: {self.damaged}: every region comes back dirty and out of sync"
        if self.problem:
            text += f"; {self.problem}"
        return text

    def _describe_old(self) -> str:
        if not self.exists:
            return "no journal file"
        if self.header_seq is None:
            text = f"{self.path.name if self.path else 'journal'}: {self.size} bytes, no valid header"
        else:
            text = f"{self.path.name if self.path else 'journal'}: header commit {self.header_seq}, " \
                   f"{len(self.ops)} op(s)"
            if self.follows_meta:
                text += ", folded into the state shown by the migration to layout 3" if self.replayed \
                    else ", not folded by the migration (the instance is of another boot)"
        if self.damaged:
            text += f"; DAMAGED: {self.damaged}: the migration takes every region as dirty and out of sync"
        if self.problem:
            text += f"; {self.problem}"
        return text

    def as_json(self) -> dict[str, Any]:
        c = self.checkpoint
        return {"layout": self.layout, "ops": len(self.ops), "replayed": self.replayed,
                "problem": self.problem, "damaged": self.damaged,
                "journal_id": None if c is None else c.journal_id.hex(),
                "checkpoint": None if c is None else c.position,
                "records": self.records, "first": self.first, "same_boot": self.same_boot,
                "dropped": self.dropped,
                "path": None if self.path is None else str(self.path), "exists": self.exists,
                "size": self.size, "header_commit_seq": self.header_seq,
                "follows_meta": self.follows_meta}


@dataclass
class JournalState:
    """The daemon-wide journal of a state directory, scanned once per store read."""

    scan: jn.Scan
    error: str | None = None
    by_instance: dict[tuple[str, int], list[jn.Record]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def journal_id(self) -> bytes | None:
        return self.scan.journal_id

    def records_of(self, uuid: str, luid: int) -> list[jn.Record]:
        return self.by_instance.get((uuid, luid), [])

    def as_json(self) -> dict[str, Any]:
        sc = self.scan
        return {"exists": sc.exists, "journal_id": None if sc.journal_id is None else sc.journal_id.hex(),
                "segments": len(sc.segments), "base": sc.base, "end": sc.end, "durable": sc.durable,
                "records": len(sc.records),
                "damage": [{"start": d.start, "end": d.end, "reason": d.reason} for d in sc.damage],
                "problems": list(sc.problems), "error": self.error,
                "findings": [f.as_json() for f in self.findings]}


def scan_journal(state_dir: Path, attempts: int = 3) -> jn.Scan:
    """``journal.scan`` of ``state_dir``; a scan that finds damage is repeated.

    Why: a segment is read with one ``read`` while the daemon may be appending to it, and the
    kernel copies page after page, so a reader can get a record's page from before its write and
    a later record's page from after its own: the first looks torn while the second, synced
    meanwhile, claims it durable, which reads as damage. Real damage stays on the next scan.
    """
    found = jn.scan(state_dir)
    for _ in range(attempts - 1):
        if not found.damage:
            break
        found = jn.scan(state_dir)
    return found


def read_journal_state(state_dir: Path) -> JournalState:
    """Scan the journal (read-only) and judge it: damage and problems as findings."""
    try:
        found = scan_journal(state_dir)
    except OSError as exc:
        st = JournalState(jn.Scan(state_dir), error=str(exc))
        st.findings.append(Finding(ERROR, "journal", f"cannot read the journal: {exc} (the daemon "
                                   "refuses to start until it can)"))
        return st
    st = JournalState(found, by_instance=dict(journal_records_by_instance(found)))
    for problem in found.problems:
        st.findings.append(Finding(WARNING, "journal", f"{problem}: ignored by the daemon"))
    for d in found.damage:
        st.findings.append(Finding(WARNING, "journal", f"damaged between positions {d.start} and {d.end}: "
                                   f"{d.reason}; instances whose checkpoint is before it come back all "
                                   "dirty and out of sync"))
    return st


@dataclass
class StateView:
    """One instance, or the uuid's retained state, as stored (plus journal ops a restart replays)."""

    uuid: str
    kind: str  # "instance" | "retained"
    luid: int | None = None
    meta: MetaRecord | None = None
    retained: RetainedRecord | None = None
    region_count: int = 0
    generation: int = 0
    committed_at: float = 0.0
    #: Bitmaps as committed (engine layout, padded to whole bytes).
    committed_clean: bytes = b""
    committed_sync: bytes = b""
    #: Bitmaps as a restart of the daemon would see them (journal applied), exactly
    #: ``region_count`` bits; None when the records could not be read.
    clean: bitarray | None = None
    sync: bitarray | None = None
    journal: JournalView | None = None
    findings: list[Finding] = field(default_factory=list)
    verdict: str = ""
    reason: str = ""

    @property
    def damaged(self) -> bool:
        return any(f.level == ERROR for f in self.findings)

    @property
    def boot_id(self) -> str | None:
        return self.meta.boot_id if self.meta else None

    @property
    def state(self) -> str | None:
        return self.meta.state if self.meta else None

    @property
    def resumed(self) -> bool:
        return self.kind == "retained" or bool(self.meta and self.meta.resumed)

    def in_sync(self) -> int | None:
        return None if self.sync is None else self.sync.count(1)

    def dirty(self) -> int | None:
        return None if self.clean is None else self.clean.count(0)

    def out_of_sync_ranges(self) -> str:
        return "" if self.sync is None else bit_ranges(self.sync, 0)

    def dirty_ranges(self) -> str:
        return "" if self.clean is None else bit_ranges(self.clean, 0)

    def label(self) -> str:
        if self.kind == "retained":
            return f"the retained state (generation {self.generation})"
        return f"luid {luid_hex(self.luid)} ({self.state}, generation {self.generation})"

    def as_json(self, regions: bool = False) -> dict[str, Any]:
        m = self.meta
        out: dict[str, Any] = {
            "kind": self.kind, "uuid": self.uuid, "luid": self.luid,
            "luid_hex": None if self.luid is None else luid_hex(self.luid),
            "verdict": self.verdict, "reason": self.reason,
            "state": self.state, "generation": self.generation,
            "boot_id": self.boot_id,
            "resumed": self.resumed if m else None,
            "superseded_flag": m.superseded if m else None,
            "log_type": m.log_type if m else None, "ctr": m.ctr if m else None,
            "region_size": m.region_size if m else None, "region_count": self.region_count or None,
            "cursor": m.cursor if m else None, "commit_seq": m.commit_seq if m else None,
            "committed_at": self.committed_at, "committed_at_iso": iso(self.committed_at),
            "source_luid": self.retained.source_luid if self.retained else None,
            "in_sync": self.in_sync(), "dirty": self.dirty(),
            "out_of_sync_ranges": None if self.sync is None else self.out_of_sync_ranges(),
            "dirty_ranges": None if self.clean is None else self.dirty_ranges(),
            "journal": self.journal.as_json() if self.journal else None,
            "findings": [f.as_json() for f in self.findings],
        }
        if regions and self.clean is not None and self.sync is not None:
            out["regions"] = [{"region": r, "clean": bool(self.clean[r]), "in_sync": bool(self.sync[r])}
                              for r in range(self.region_count)]
        return out


@dataclass
class EnvView:
    """One environment directory (a uuid's store), or a store the daemon moved aside."""

    name: str
    path: Path
    uuid: str | None
    #: The boot id taken as the current one when it was read.
    boot_id: str = ""
    #: "store" (an environment the daemon uses) or "moved-aside" (``<name>.damaged-<time>``).
    kind: str = "store"
    moved_at: int | None = None
    format: FormatRecord | None = None
    instances: list[StateView] = field(default_factory=list)
    retained: StateView | None = None
    findings: list[Finding] = field(default_factory=list)
    opened: bool = False
    stat: dict[str, int] = field(default_factory=dict)
    info: dict[str, int] = field(default_factory=dict)
    data_bytes: int = 0
    #: Sub-databases and their LMDB statistics (``txn.stat``), by name.
    databases: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Layouts 1-2: the per-instance journal files in the directory (read only to show what the
    #: migration to layout 3 folds in).
    journals: list[str] = field(default_factory=list)
    #: Their contents, read *before* the LMDB snapshot: a layout-2 daemon wrote a journal's new
    #: header only after the commit it follows was durable, so a journal read first never follows
    #: a commit newer than the snapshot (a header ahead of its meta is then real, not a race).
    journal_data: dict[str, bytes | OSError] = field(default_factory=dict, repr=False)

    @property
    def states(self) -> list[StateView]:
        return self.instances + ([self.retained] if self.retained else [])

    @property
    def damaged(self) -> bool:
        return self.kind == "moved-aside" or any(f.level == ERROR for f in self.all_findings())

    def all_findings(self) -> list[Finding]:
        out = list(self.findings)
        for s in self.states:
            out.extend(s.findings)
        return out

    def damage_reason(self) -> str:
        if self.kind == "moved-aside":
            return (f"moved aside by the daemon at {when(self.moved_at)} because it failed verification; "
                    "kept for inspection only")
        errors = [f"{f.where}: {f.message}" for f in self.all_findings() if f.level == ERROR]
        return errors[0] if errors else ""

    def max_generation(self) -> int:
        return max([s.generation for s in self.states], default=0)


@dataclass
class StoreView:
    state_dir: Path
    boot_id: str
    daemon: DaemonStatus
    envs: list[EnvView] = field(default_factory=list)
    #: Names in the state directory that are neither a store nor one moved aside.
    ignored: list[str] = field(default_factory=list)
    exists: bool = True
    #: The daemon-wide journal, scanned once, before any store is read.
    journal: JournalState | None = None

    def env(self, uuid: str) -> EnvView | None:
        for e in self.envs:
            if e.kind == "store" and e.uuid == uuid:
                return e
        return None


# --- reading -------------------------------------------------------------------------------------


def _mode_findings(ev: EnvView) -> None:
    try:
        mode = stat.S_IMODE(os.stat(ev.path).st_mode)
        if mode & ~DIR_MODE:
            ev.findings.append(Finding(WARNING, "store", f"directory mode {mode:o}: others may read the "
                                       f"store (the daemon creates it {DIR_MODE:o})"))
        for entry in os.scandir(ev.path):
            if entry.is_file(follow_symlinks=False):
                fmode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                if fmode & ~FILE_MODE:
                    ev.findings.append(Finding(WARNING, "store", f"{entry.name} has mode {fmode:o} "
                                               f"(the daemon creates its files {FILE_MODE:o})"))
    except OSError as exc:
        ev.findings.append(Finding(ERROR, "store", f"cannot read the directory: {exc}"))


def _read_old_journal(ev: EnvView, sv: StateView, boot_id: str) -> None:
    """Layouts 1-2: the instance's own journal file, as the migration to layout 3 folds it in
    (:func:`~ulog_disk.storage.lmdb_reader.old_journal`, which the migration calls too)."""
    assert sv.meta is not None and sv.luid is not None
    where = f"luid {luid_hex(sv.luid)}"
    name = journal_file_name(sv.luid)
    j = old_journal(sv.meta, ev.journal_data.get(name), boot_id)
    jv = JournalView(layout=ev.format.version if ev.format else 1, path=ev.path / name, same_boot=j.same_boot,
                     exists=j.exists, size=j.size, damaged=j.damaged)
    sv.journal = jv
    if j.unreadable is not None:
        jv.problem = j.unreadable
        sv.findings.append(Finding(WARNING, where, f"journal {name}: {jv.problem}"))
        return
    if j.header is not None:
        jv.header_luid, jv.header_seq = j.header.luid, j.header.commit_seq
    if j.stale:
        jv.problem = (f"stale: follows commit {jv.header_seq}, the meta holds commit {sv.meta.commit_seq}; "
                      "its ops are in the commit, the migration drops it")
        sv.findings.append(Finding(NOTE, where, f"journal {name}: {jv.problem}"))
        return
    if j.folded:
        jv.ops, jv.follows_meta, jv.replayed = j.ops, True, True
        if j.cut:
            jv.problem = f"{j.cut} (the migration folds the ops before it)"
            sv.findings.append(Finding(NOTE, where, f"journal {name}: {jv.problem}"))
    if jv.damaged:
        sv.findings.append(Finding(WARNING, where, f"{jv.damaged}: the daemon's migration to layout 3 "
                                   "takes every region of this instance as dirty and out of sync (a full "
                                   "resync at its next resume)"))


def _plan_journal(sv: StateView, ckpt: CheckpointRecord | None, journal: JournalState | None,
                  boot_id: str) -> None:
    """Layout 3: what the daemon's restore replays for this instance (its own function)."""
    assert sv.meta is not None and sv.luid is not None
    where = f"luid {luid_hex(sv.luid)}"
    scan = journal.scan if journal is not None else jn.Scan(Path("."))
    records = journal.records_of(sv.meta.uuid, sv.luid) if journal is not None else []
    plan = plan_replay(sv.meta, ckpt, records, scan, scan.journal_id)
    jv = JournalView(layout=3, checkpoint=ckpt, ops=plan.ops, replayed=True, damaged=plan.damaged,
                     records=plan.records, first=plan.first, same_boot=sv.meta.boot_id == boot_id)
    start = ckpt.position if ckpt is not None else 0
    if ckpt is not None and ckpt.journal_id == scan.journal_id:
        jv.dropped = sum(len(r.ops) for r in records if r.lsn >= start) - len(plan.ops)
    sv.journal = jv
    # What the instance's FLUSHes since the checkpoint changed (as the restore takes it).
    sv.generation, sv.committed_at = plan.record.generation, plan.record.committed_at
    if journal is not None and journal.error:
        jv.problem = f"the journal could not be read ({journal.error}): shown as stored"
        jv.replayed, jv.ops, jv.damaged = False, [], None
        sv.findings.append(Finding(WARNING, where, jv.problem))
        return
    if plan.damaged:
        sv.findings.append(Finding(WARNING, where, f"{plan.damaged}: the daemon's restore takes every region "
                                   "of this instance as dirty and out of sync (a full resync at its next "
                                   "resume)"))
    elif ckpt is not None and ckpt.position > scan.end:
        sv.findings.append(Finding(NOTE, where, f"checkpoint at position {ckpt.position}, past the journal's "
                                   f"end ({scan.end}): the store is ahead of the journal, nothing to replay "
                                   "(the daemon continues the journal past it)"))


def _apply_journal(sv: StateView) -> None:
    """What a restart serves: :mod:`ulog_disk.log.restore`'s rule over the planned ops."""
    j = sv.journal
    ops = j.ops if j is not None and j.replayed else []
    log = restore.replayed(sv.region_count, sv.committed_clean, sv.committed_sync, ops,
                           j.damaged if j is not None and j.damaged else None).log
    sv.clean = log.clean[: sv.region_count]
    sv.sync = log.sync[: sv.region_count]


def _decode_env(ev: EnvView, snap: Snapshot, boot_id: str, journal: JournalState | None) -> None:
    """The reader's decoding of one environment, as views, each state with what a restart serves."""
    contents = decode_store(snap, ev.uuid)
    ev.format = contents.format
    ev.uuid = uuid = contents.uuid
    ev.findings.extend(contents.findings)
    layout = ev.format.version if ev.format is not None else LAYOUT_VERSION
    for inst in contents.instances:
        sv = StateView(uuid=uuid or "?", kind="instance", luid=inst.luid, findings=list(inst.findings))
        ev.instances.append(sv)
        meta = inst.meta
        if meta is None:
            continue
        sv.meta = meta
        sv.region_count, sv.generation = meta.region_count, meta.generation
        sv.committed_at = meta.committed_at
        if not inst.bitmaps:
            continue
        sv.committed_clean, sv.committed_sync = inst.clean, inst.sync
        if ev.kind == "store" and not sv.damaged:
            # The daemon reads a store moved aside never, a damaged one not for its data.
            if layout >= 3:
                _plan_journal(sv, inst.checkpoint, journal, boot_id)
            else:
                _read_old_journal(ev, sv, boot_id)
            _apply_journal(sv)
        else:
            sv.clean = exact_bits(sv.committed_clean, sv.region_count)
            sv.sync = exact_bits(sv.committed_sync, sv.region_count)
    r = contents.retained
    if r is not None:
        sv = StateView(uuid=uuid or "?", kind="retained", findings=list(r.findings))
        ev.retained = sv
        if r.record is not None:
            sv.retained, sv.region_count, sv.generation = r.record, r.record.region_count, r.record.generation
            sv.committed_at = r.record.committed_at
            if r.bitmaps:
                sv.committed_clean, sv.committed_sync = r.clean, r.sync
                sv.clean = exact_bits(sv.committed_clean, sv.region_count)
                sv.sync = exact_bits(sv.committed_sync, sv.region_count)
    luids = {s.luid for s in ev.instances}
    old_layout = ev.format is not None and ev.format.version < 3
    for name in ev.journals:
        m = _JOURNAL_NAME.fullmatch(name)
        if m and (not old_layout or int(m.group(1), 16) not in luids):
            why = "left over from a DTR" if old_layout else "a layout-2 journal file in a layout-3 store"
            ev.findings.append(Finding(NOTE, "store", f"{name} has no instance ({why}; never read by the "
                                       "daemon)"))


def read_env(path: Path, uuid: str | None, boot_id: str, kind: str = "store",
             moved_at: int | None = None, journal: JournalState | None = None) -> EnvView:
    """Read one environment read-only, in one read transaction, then close it; ``journal`` is the
    state directory's journal, scanned before (:func:`read_store` says why)."""
    ev = EnvView(name=path.name, path=path, uuid=uuid, boot_id=boot_id, kind=kind, moved_at=moved_at)
    if kind == "moved-aside":
        ev.findings.append(Finding(WARNING, "store", f"moved aside by the daemon at {when(moved_at)} (it "
                                   "failed verification; the uuid started from a full resync): kept for "
                                   "inspection, never used again; remove it when done"))
    _mode_findings(ev)
    try:
        ev.journals = sorted(n for n in os.listdir(path) if n.startswith("journal."))
        ev.data_bytes = (path / "data.mdb").stat().st_size
    except OSError as exc:
        ev.findings.append(Finding(ERROR, "store", f"no LMDB data file: {exc}"))
        return ev
    for name in ev.journals:
        try:
            ev.journal_data[name] = (path / name).read_bytes()
        except FileNotFoundError:
            pass  # removed by a DTR meanwhile
        except OSError as exc:
            ev.journal_data[name] = exc
    try:
        env = open_readonly(path)
    except (lmdb.Error, OSError, ValueError) as exc:
        ev.findings.append(Finding(ERROR, "store", f"LMDB cannot open the environment: {exc}"))
        return ev
    try:
        for _attempt in range(3):
            try:
                with env.begin() as txn:
                    snap = snapshot(env, txn, stats=True)
                break
            except lmdb.MapResizedError:
                env.set_mapsize(0)  # the daemon grew the map meanwhile: adopt its size, read again
        else:  # pragma: no cover - the map would have to grow three times during one read
            raise lmdb.MapResizedError("map resized while reading")
        ev.stat = dict(env.stat())
        ev.info = {k: v for k, v in env.info().items() if isinstance(v, int)}
        ev.opened = True
    except lmdb.Error as exc:
        ev.findings.append(Finding(ERROR, "store", f"LMDB error while reading every record: {exc}"))
        return ev
    finally:
        env.close()
    ev.databases = snap.databases
    _decode_env(ev, snap, boot_id, journal)
    return ev


def _judge(ev: EnvView, boot_id: str, daemon_running: bool = True) -> None:
    """Give every state of one environment its verdict and reason."""
    good = [s for s in ev.states if not s.damaged and (s.meta or s.retained)]
    for s in ev.states:
        s.verdict, s.reason = _verdict(s, good, boot_id, ev)
        if s.verdict in IN_USE and not daemon_running:
            s.reason += " (dm-ulogd is not running: the kernel retries its requests until it is back)"


def is_live_now(s: StateView, boot_id: str) -> bool:
    return s.meta is not None and s.meta.boot_id == boot_id and s.meta.state in IN_USE


def _verdict(s: StateView, good: list[StateView], boot_id: str, ev: EnvView) -> tuple[str, str]:
    if ev.kind == "moved-aside":
        return "damaged", ev.damage_reason()
    if s.damaged or (s.meta is None and s.retained is None):
        errors = [f"{f.where}: {f.message}" for f in s.findings if f.level == ERROR]
        return "damaged", (errors[0] if errors else "unreadable") + \
            " (the daemon moves this uuid's store aside at its next start: a full resync)"
    flagged = s.meta is not None and s.meta.superseded
    others = [o for o in good if o is not s]
    if never_handed_over(flagged, s.resumed, is_live_now(s, boot_id), s.generation,
                         [o.generation for o in others]):
        if flagged:
            return "superseded", ("another instance adopted its state (superseded flag); it is never "
                                  "handed over again")
        top = max(others, key=lambda o: o.generation)
        return "superseded", f"a newer state exists: {top.label()}"
    if s.kind == "retained":
        src = s.retained.source_luid if s.retained else None
        origin = "imported from a disk log" if src == 0 else f"the state of luid {luid_hex(src)}"
        return "retained", f"the uuid's retained state ({origin}); the next RESUME of the uuid adopts it"
    assert s.meta is not None
    if s.meta.boot_id != boot_id:
        if not s.meta.resumed:
            return "orphaned", f"recorded under boot {s.meta.boot_id}, never resumed: holds no state"
        return "orphaned", (f"recorded under boot {s.meta.boot_id}, not this boot: the kernel that owned it "
                            "is gone; the next RESUME of the uuid adopts its state (generation "
                            f"{s.generation})")
    reasons = {
        "live": "resumed by the running kernel (this boot); its state changes with the mirror's I/O",
        "presuspended": "being suspended by the running kernel (this boot)",
        "suspended": "suspended in this boot: its state is handed over to the next instance of the uuid "
                     "that resumes (or kept at its DTR)",
        "constructed": "loaded in this boot, not resumed yet (an inactive table)",
        "destroyed": "destroyed, its removal from the store did not complete",
    }
    return s.meta.state, reasons.get(s.meta.state, s.meta.state)


def newest(ev: EnvView) -> list[StateView]:
    """The uuid's newest states: what the next RESUME of a new instance of the uuid adopts, picked
    by the hand-over rule (:func:`ulog_disk.log.lifecycle.newest_state`: this boot's instances, then
    the gone states, the retained one and earlier boots' instances) among the states that can still
    be handed over (readable, resumed, not flagged superseded); a state of generation 0 counts
    too, so that the tools can act on it. First the rule's pick, then any other state of the same
    generation (an inconsistent store, which ``verify`` reports). Empty: no state to adopt."""
    candidates = [s for s in ev.states if not s.damaged and s.clean is not None and s.resumed
                  and not (s.meta and s.meta.superseded)]
    instances = [s for s in candidates if s.kind == "instance" and s.boot_id == ev.boot_id]
    gone = [s for s in candidates if s not in instances]
    top = newest_state(-1, -1, instances, gone)
    if top is None:
        return []
    return [top] + [s for s in candidates if s is not top and s.generation == top.generation]


def check_generations(ev: EnvView, boot_id: str) -> None:
    """Invariants on generations (``ulog-recover verify``):

    * a never-resumed instance has generation 0 (checked while decoding);
    * non-zero generations are unique among the uuid's instances and retained state: each commit
      of a new state takes the next generation, a hand-over copies it into an instance that then
      commits a newer one, and a retained state takes the next one at DTR;
    * an instance flagged superseded is never the uuid's newest state: whoever adopted its state
      committed a higher generation;
    * at most one instance of the uuid is live in this boot (one active table per device).
    """
    seen: dict[int, StateView] = {}
    for s in ev.states:
        if s.damaged or not s.generation:
            continue
        if s.generation in seen:
            ev.findings.append(Finding(ERROR, "generations", f"{seen[s.generation].label()} and {s.label()} "
                                       "share a generation: which one a RESUME adopts is undefined"))
        seen[s.generation] = s
    good = [s for s in ev.states if not s.damaged and s.clean is not None]
    for s in good:
        if s.meta and s.meta.superseded and s.generation and \
                not outranked(s.generation, [o.generation for o in good if o is not s]):
            ev.findings.append(Finding(WARNING, "generations", f"{s.label()} is flagged superseded, yet no "
                                       "newer state of the uuid exists: the state that adopted it was lost"))
    live = [s for s in ev.instances if is_live_now(s, boot_id)]
    if len(live) > 1:
        ev.findings.append(Finding(WARNING, "generations", "more than one instance is live in this boot: "
                                   + ", ".join(s.label() for s in live)))


#: ``dm-ulogd --cluster``'s directory in a state directory (``tools.clusterview`` reads it).
CLUSTER_DIR = "cluster"


def read_store(state_dir: Path, boot_id: str, uuids: Iterable[str] | None = None,
               only: Path | None = None, moved_aside: bool = True,
               journal: JournalState | None = None) -> StoreView:
    """Read every environment of ``state_dir`` (or just ``only``, one environment directory).

    ``uuids`` limits the stores read; ``moved_aside`` also reads the directories the daemon
    moved aside as damaged. ``journal`` is a scan of the state directory's journal made by the
    caller; without it the journal is scanned here.

    The journal is scanned **before** any store is read. While the daemon runs, it removes a
    journal segment once every record in it is in the stores; a store snapshot read first could
    be older than the checkpoints that let a segment go, and its records after its checkpoint
    could then be gone by the time the journal is read. Read in this order, every record a
    snapshot needs that existed at the scan is in the scan (a snapshot is never older than the
    scan, and the scan starts at the newest segment's base, below every needed record); records
    appended after the scan are missing, so the view is the state at some moment between the
    scan and the snapshot, never a mix with a hole in it.
    """
    view = StoreView(state_dir=state_dir, boot_id=boot_id, daemon=daemon_status(state_dir))
    wanted = set(uuids) if uuids is not None else None
    if only is not None:
        entries = [only]
    else:
        if not state_dir.is_dir():
            view.exists = False
            return view
    view.journal = journal if journal is not None else read_journal_state(state_dir)
    if only is None:
        entries = sorted((Path(e.path) for e in os.scandir(state_dir)), key=lambda p: p.name)
    for path in entries:
        if not path.is_dir() or path.is_symlink():
            if path.name != "lock" and not is_journal_file(path.name):
                view.ignored.append(path.name)
            continue
        if path.name == CLUSTER_DIR and only is None:
            continue  # dm-ulogd --cluster's state, not a store: the tools read it with clusterview
        uuid = decode_dir_name(path.name)
        if uuid is not None:
            if wanted is not None and uuid not in wanted:
                continue
            ev = read_env(path, uuid, boot_id, journal=view.journal)
        else:
            aside = parse_damaged_dir_name(path.name)
            if aside is None:
                view.ignored.append(path.name)
                continue
            if not moved_aside or (wanted is not None and aside[0] not in wanted):
                continue
            ev = read_env(path, aside[0], boot_id, kind="moved-aside", moved_at=aside[1])
        _judge(ev, boot_id, view.daemon.running)
        check_generations(ev, boot_id)
        view.envs.append(ev)
    return view


def env_dir_argument(path: Path) -> bool:
    """True if ``path`` is one environment directory (a uuid's store, or one moved aside)."""
    return path.is_dir() and (path / "data.mdb").exists() and (
        decode_dir_name(path.name) is not None or parse_damaged_dir_name(path.name) is not None)


__all__ = ["EnvView", "Finding", "JournalState", "JournalView", "StateView", "StoreView", "instance_db_name",
           "newest", "read_env", "read_journal_state", "read_store", "scan_journal"]
