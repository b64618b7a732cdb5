"""The one reader of the LMDB store: what an environment holds, judged record by record, and
which journal records apply to each instance.

Used by the backend's restore (and its migration of layouts 1-2) and by ``ulog-dump`` /
``ulog-recover`` (:mod:`ulog_disk.tools.storeview`), so the tools see exactly what a restart sees:

* :func:`snapshot` reads every record of an environment in one read transaction (the backend's
  open environment, or :func:`~.lmdb_env.open_readonly` for the tools, which never disturbs the
  daemon);
* :func:`decode_store` decodes and verifies it (:mod:`ulog_disk.storage.store_format` only) into
  :class:`StoreContents`, noting every problem as a :class:`Finding` instead of stopping at the
  first, so a tool can show all of them. An ``error`` is damage: the daemon's restore refuses
  the store (moves it aside, its uuid resyncs in full), and the tools say so; a ``warning`` or
  ``note`` is for people, the daemon reads past it;
* :func:`plan_replay` picks an instance's journal records since its checkpoint (layout 3) and
  says whether the journal can be trusted there; :func:`old_journal` does the same for a
  layout-1/2 store's per-instance journal file. What a restart then serves from them is the
  rule of :mod:`ulog_disk.log.restore`.

Nothing here writes.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field

import lmdb

from ..log import regionlog
from ..log.records import InstanceRecord, StoredState
from ..log.regionlog import chunk_count, format_ranges
from . import journal as jn
from . import store_format as sf
from .lmdb_env import Env

ERROR, WARNING, NOTE = "error", "warning", "note"


@dataclass
class Finding:
    """One thing the reader found: ``error`` (damage: the daemon refuses the store), ``warning``
    or ``note`` (for people; the daemon reads past it)."""

    level: str
    where: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"level": self.level, "where": self.where, "message": self.message}

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def luid_where(luid: int) -> str:
    return f"luid {luid:#018x}"


# --- the snapshot ---------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Every record of one environment, as one read transaction saw it."""

    #: The main database's own records (not sub-database names).
    plain: dict[bytes, bytes] = field(default_factory=dict)
    #: Every sub-database, read whole (which makes LMDB walk every page of it).
    subs: dict[bytes, dict[bytes, bytes]] = field(default_factory=dict)
    #: LMDB's statistics of each sub-database (``txn.stat``), when asked for.
    databases: dict[str, dict[str, int]] = field(default_factory=dict)


def snapshot(env: lmdb.Environment, txn: lmdb.Transaction, stats: bool = False) -> Snapshot:
    """Read every record of ``env`` in ``txn``."""
    snap = Snapshot()
    for name, value in list(txn.cursor()):
        try:
            db = env.open_db(name, txn=txn, create=False)
        except lmdb.IncompatibleError:  # a plain record, not a sub-database
            snap.plain[name] = value
            continue
        if stats:
            snap.databases[name.decode("latin-1")] = dict(txn.stat(db))
        snap.subs[name] = dict(txn.cursor(db=db))
    return snap


def read_snapshot(e: Env) -> Snapshot:
    """The snapshot of one of the backend's open environments."""
    with e.lock, e.env.begin() as txn:
        return snapshot(e.env, txn)


# --- decoding -------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class StoredBitmaps:
    """What an instance and the retained state both are when decoded: a record's two bitmaps and
    what reading them found."""

    #: The bitmaps as stored (whole bytes; a chunk that is missing or fails verification reads as
    #: zeros: dirty, out of sync); empty when they could not be read (no chunk size known).
    clean: bytes = b""
    sync: bytes = b""
    #: The bitmaps were read.
    bitmaps: bool = False
    findings: list[Finding] = field(default_factory=list)

    @property
    def damaged(self) -> bool:
        return any(f.level == ERROR for f in self.findings)


@dataclass
class InstanceContents(StoredBitmaps):
    """One instance's sub-databases (``meta/clean/sync.<luid>``), decoded."""

    luid: int
    meta: sf.MetaRecord | None = None
    checkpoint: sf.CheckpointRecord | None = None


@dataclass
class RetainedContents(StoredBitmaps):
    """The uuid's retained state (``retained.meta/clean/sync``), decoded."""

    record: sf.RetainedRecord | None = None

    def state(self, uuid: str) -> StoredState:
        rr = self.record
        assert rr is not None
        return StoredState(uuid=uuid, generation=rr.generation, region_count=rr.region_count,
                           clean=self.clean, sync=self.sync, source_luid=rr.source_luid,
                           committed_at=rr.committed_at)


@dataclass
class StoreContents:
    """One environment, decoded."""

    uuid: str | None
    format: sf.FormatRecord | None = None
    #: Instances by luid, ascending.
    instances: list[InstanceContents] = field(default_factory=list)
    retained: RetainedContents | None = None
    #: The environment's own findings (format, unknown records, leftovers).
    findings: list[Finding] = field(default_factory=list)

    def all_findings(self) -> list[Finding]:
        out = list(self.findings)
        for i in self.instances:
            out.extend(i.findings)
        if self.retained is not None:
            out.extend(self.retained.findings)
        return out

    def damage(self) -> str | None:
        """The first error (why the daemon refuses the store), or None."""
        for f in self.all_findings():
            if f.level == ERROR:
                return str(f)
        return None


def read_format(raw: bytes) -> sf.FormatRecord:
    """The format record of a stored ``format`` value (StoreFormatError saying what is wrong)."""
    try:
        return sf.read_format_value(raw)
    except sf.StoreFormatError as exc:
        raise type(exc)(f"format record: {exc}") from exc


def format_mismatch(fmt: sf.FormatRecord, uuid: str) -> str | None:
    """Why the environment of ``uuid`` does not belong to it, or None."""
    if fmt.uuid == uuid:
        return None
    return (f"format record names uuid {fmt.uuid!r}, the directory {uuid!r}: the environment belongs to "
            "another uuid")


def decode_store(snap: Snapshot, uuid: str | None) -> StoreContents:
    """Decode and verify every record of one environment (``uuid``: its directory's, None when
    unknown: then the format record's)."""
    out = StoreContents(uuid=uuid)
    plain = dict(snap.plain)
    raw_format = plain.pop(sf.FORMAT_KEY, None)
    chunk_bytes = 0
    if raw_format is None:
        if plain or snap.subs:
            out.findings.append(Finding(ERROR, "store", "the environment holds data but no format record"))
        else:
            out.findings.append(Finding(NOTE, "store", "empty environment (no records yet)"))
    else:
        try:
            fmt = out.format = read_format(raw_format)
        except sf.StoreFormatError as exc:
            out.findings.append(Finding(ERROR, "store", str(exc)))
        else:
            chunk_bytes = fmt.chunk_bytes
            if uuid is not None and (why := format_mismatch(fmt, uuid)) is not None:
                out.findings.append(Finding(ERROR, "store", why))
            if not fmt.sealed:
                out.findings.append(Finding(NOTE, "store", f"layout {fmt.version}: values without checksums; "
                                            f"the daemon migrates it to layout {sf.LAYOUT_VERSION} when it "
                                            "next opens it"))
            elif fmt.version < sf.LAYOUT_VERSION:
                out.findings.append(Finding(NOTE, "store", f"layout {fmt.version}: the daemon migrates it to "
                                            f"layout {sf.LAYOUT_VERSION} when it next opens it (each "
                                            "instance's journal file is folded into its bitmaps, then "
                                            "removed)"))
            elif chunk_bytes != (want := regionlog.CHUNK_BYTES):
                out.findings.append(Finding(NOTE, "store", f"written with {chunk_bytes}-byte chunks: the "
                                            f"daemon re-chunks it to {want} when it next opens it"))
    for name in plain:
        out.findings.append(Finding(WARNING, "store", f"unknown record {name!r} in the main database "
                                    "(ignored by the daemon)"))
    if uuid is None and out.format is not None:
        uuid = out.uuid = out.format.uuid
    # Without a readable format record the layout is unknown: records are taken as sealed
    # (this version's layout), so a layout-1 record reads as failing its checksum.
    sealed = out.format is None or out.format.sealed
    layout = out.format.version if out.format is not None else sf.LAYOUT_VERSION
    groups: dict[int, dict[str, dict[bytes, bytes]]] = {}
    for name, content in snap.subs.items():
        parsed = sf.parse_instance_db_name(name)
        if parsed is not None:
            groups.setdefault(parsed[1], {})[parsed[0]] = content
        elif name not in (sf.RETAINED_META, sf.RETAINED_CLEAN, sf.RETAINED_SYNC):
            out.findings.append(Finding(WARNING, "store", f"unknown sub-database {name!r} (ignored by the "
                                        "daemon)"))
    for luid in sorted(groups):
        dbs = groups[luid]
        if "meta" not in dbs:
            kinds = "/".join(sorted(dbs))
            out.findings.append(Finding(WARNING, luid_where(luid), f"{kinds} sub-database(s) without their "
                                        "meta (left over; ignored by the daemon)"))
            continue
        inst = InstanceContents(luid)
        out.instances.append(inst)
        _decode_instance(inst, dbs, uuid, layout, sealed, chunk_bytes)
    raw = snap.subs.get(sf.RETAINED_META, {}).get(sf.RECORD_KEY)
    if raw is not None or sf.RETAINED_CLEAN in snap.subs or sf.RETAINED_SYNC in snap.subs:
        out.retained = _decode_retained(snap, raw, uuid, sealed, chunk_bytes)
    return out


def _decode_instance(inst: InstanceContents, dbs: dict[str, dict[bytes, bytes]], uuid: str | None,
                     layout: int, sealed: bool, chunk_bytes: int) -> None:
    luid, found = inst.luid, inst.findings
    where = f"meta.{luid:016x}"
    meta_db = dbs["meta"]
    raw = meta_db.get(sf.RECORD_KEY)
    extra = set(meta_db) - ({sf.RECORD_KEY, sf.CHECKPOINT_KEY} if layout >= 3 else {sf.RECORD_KEY})
    if extra:
        found.append(Finding(WARNING, where, f"unexpected keys {sorted(extra)!r}"))
    if raw is None:
        found.append(Finding(ERROR, where, "sub-database has no record"))
        return
    try:
        meta = inst.meta = sf.MetaRecord.decode(sf.record_bytes(where.encode(), raw, sealed))
    except sf.StoreFormatError as exc:
        found.append(Finding(ERROR, where, str(exc)))
        return
    raw_ckpt = meta_db.get(sf.CHECKPOINT_KEY)
    if layout >= 3 and raw_ckpt is not None:
        try:
            inst.checkpoint = sf.read_checkpoint_value(where.encode(), raw_ckpt)
        except sf.StoreFormatError as exc:
            found.append(Finding(ERROR, where, str(exc)))
    if meta.luid != luid or (uuid is not None and meta.uuid != uuid):
        found.append(Finding(ERROR, where, f"holds the record of uuid={meta.uuid!r} luid={meta.luid:#018x}"))
    if not meta.resumed and meta.generation != 0:
        found.append(Finding(WARNING, where, f"never resumed but generation {meta.generation} (only a "
                             "RESUME gives an instance a generation)"))
    if not chunk_bytes:
        return
    committed = meta.committed_at > 0
    count = meta.region_count
    inst.clean = _bitmap(found, f"clean.{luid:016x}", dbs.get("clean"), count, chunk_bytes, sealed, committed)
    inst.sync = _bitmap(found, f"sync.{luid:016x}", dbs.get("sync"), count, chunk_bytes, sealed, committed)
    inst.bitmaps = True
    for kind in ("clean", "sync"):
        if kind not in dbs:
            found.append(Finding(NOTE, where, f"no {kind}.{luid:016x} sub-database"))


def _decode_retained(snap: Snapshot, raw: bytes | None, uuid: str | None, sealed: bool,
                     chunk_bytes: int) -> RetainedContents:
    out = RetainedContents()
    where = sf.RETAINED_META.decode()
    if raw is None:
        out.findings.append(Finding(WARNING, where, "retained bitmaps without a retained record (left over; "
                                    "ignored by the daemon)"))
        return out
    try:
        rr = out.record = sf.RetainedRecord.decode(sf.record_bytes(sf.RETAINED_META, raw, sealed))
    except sf.StoreFormatError as exc:
        out.findings.append(Finding(ERROR, where, str(exc)))
        return out
    if uuid is not None and rr.uuid != uuid:
        out.findings.append(Finding(ERROR, where, f"names uuid {rr.uuid!r}"))
    if chunk_bytes:
        count = rr.region_count
        out.clean = _bitmap(out.findings, sf.RETAINED_CLEAN.decode(), snap.subs.get(sf.RETAINED_CLEAN), count,
                            chunk_bytes, sealed, True)
        out.sync = _bitmap(out.findings, sf.RETAINED_SYNC.decode(), snap.subs.get(sf.RETAINED_SYNC), count,
                           chunk_bytes, sealed, True)
        out.bitmaps = True
    return out


def _bitmap(found: list[Finding], what: str, chunks: dict[bytes, bytes] | None, count: int, chunk_bytes: int,
            sealed: bool, expect_whole: bool) -> bytes:
    """One bitmap (sub-database ``what``) from its chunks, every chunk verified; a chunk that fails
    (its checksum, its key, its place in the geometry, its length) is an error and reads as zeros
    (dirty, out of sync), as does a missing one."""
    total = sf.bitmap_bytes(count)
    n = chunk_count(count, chunk_bytes)
    out = bytearray(total)
    seen: set[int] = set()
    name = what.encode("latin-1")
    for key, value in (chunks or {}).items():
        try:
            index = sf.decode_chunk_key(key)
        except sf.StoreFormatError as exc:
            found.append(Finding(ERROR, what, f"bad chunk key {key.hex()}: {exc}"))
            continue
        if index >= n:
            found.append(Finding(ERROR, what, f"chunk {index} lies past the {n} chunk(s) of {count} regions "
                                 "(geometry does not match the bitmap)"))
            continue
        want = sf.chunk_length(index, count, chunk_bytes)
        seen.add(index)
        try:
            value = sf.unseal_chunk(name, key, value, sealed)
        except sf.StoreFormatError as exc:
            found.append(Finding(ERROR, what, str(exc)))
            continue
        if len(value) != want:
            found.append(Finding(ERROR, what, f"chunk {index} holds {len(value)} bytes, {want} expected for "
                                 f"{count} regions"))
            continue
        out[index * chunk_bytes : index * chunk_bytes + want] = value
    if expect_whole and len(seen) < n:
        missing = sorted(set(range(n)) - seen)
        found.append(Finding(WARNING, what, f"chunk(s) {format_ranges(missing)} missing: read as dirty and "
                             "out of sync (every commit since the first writes whole bitmaps)"))
    if count % 8 and total and out[-1] >> (count % 8):
        # Sealed, so written as they are: not damage, and no region's state (the daemon's bitmaps
        # drop them when it reads them).
        found.append(Finding(WARNING, what, f"padding bits past region {count - 1} are set (last byte "
                             f"{out[-1]:#04x}; ignored by the daemon)"))
    return bytes(out)


# --- the daemon-wide journal (layout 3) -------------------------------------------------------------


@dataclass
class Replay:
    """What a restart replays for one stored instance (:func:`plan_replay`)."""

    #: The instance's meta with what its FLUSHes since the checkpoint changed.
    record: InstanceRecord
    #: The ops to replay over its stored bitmaps, in order.
    ops: list[tuple[int, int]]
    #: Why answered requests may be missing (the instance then comes back all dirty and out of
    #: sync), or None.
    damaged: str | None
    #: Journal position of the first record of the instance at or after its checkpoint (or of
    #: the checkpoint itself when damaged): the journal is needed from there until the next
    #: checkpoint. None when nothing is replayed.
    first: int | None
    #: Journal records of the instance at or after its checkpoint.
    records: int = 0


def journal_records_by_instance(found: jn.Scan) -> dict[tuple[str, int], list[jn.Record]]:
    """The OPS and FLUSH records of the journal, per (uuid, luid), in journal order."""
    by_instance: dict[tuple[str, int], list[jn.Record]] = collections.defaultdict(list)
    for r in found.records:
        if r.kind is jn.Kind.OPS or r.kind is jn.Kind.FLUSH:
            by_instance[(r.uuid, r.luid)].append(r)
    return by_instance


def plan_replay(meta: sf.MetaRecord, ckpt: sf.CheckpointRecord | None, records: Sequence[jn.Record],
                found: jn.Scan, journal_id: bytes | None) -> Replay:
    """The journal records of one instance since its checkpoint (``formats/journal.md``): the ops
    to replay, the meta its FLUSHes changed, and whether the journal can be trusted there.

    Every record the scan found was written by the daemon after it applied and answered the
    request, and the scan ends at the first record missing (a host crash keeps a prefix of what
    was appended: at least everything synced). So the instance comes back as it was after a
    prefix of its answered requests that holds at least every FLUSH answered; the same rule for
    the same boot (the daemon died: the prefix is everything) and after a reboot, where the
    engine then turns every region that is dirty in it out of sync.
    """
    rec = meta.instance()
    start = ckpt.position if ckpt is not None else 0
    damaged = None
    if ckpt is None:
        damaged = "its store has no checkpoint record"
    elif ckpt.journal_id != journal_id:
        damaged = (f"its store follows journal {ckpt.journal_id.hex()} up to position {ckpt.position}, "
                   f"and that journal is not in the state directory")
    elif (d := found.damaged_after(start)) is not None:
        damaged = f"the journal is damaged at positions {d.start}-{d.end} ({d.reason})"
    ops: list[tuple[int, int]] = []
    first = None
    count = 0
    if ckpt is not None and ckpt.journal_id == journal_id:
        for r in records:
            if r.lsn < start:
                continue
            count += 1
            if first is None:
                first = r.lsn
            if r.kind is jn.Kind.FLUSH:
                rec.generation, rec.cursor, rec.committed_at = r.generation, r.cursor, r.committed_at
            ops.extend(r.ops)
    if damaged is not None:
        first = start if first is None else min(first, start)
    return Replay(rec, ops, damaged, first, count)


# --- layouts 1-2: one journal file per instance ------------------------------------------------------


@dataclass
class OldJournal:
    """What the migration to layout 3 does with an instance's own journal file
    (``journal.<luid>``, layouts 1-2), by the rule the daemon of that layout restored with: the
    file's ops are folded into the bitmaps only for an instance of the current boot (after a
    reboot that layout never used its journal: the kernel's state was gone), and only when its
    header follows the meta's commit; a header that cannot be read, names another luid, or is
    ahead of the meta's commit makes the instance all dirty and out of sync."""

    name: str
    exists: bool = False
    size: int = 0
    #: Why the file could not be read (the tools report it; the migration fails on it).
    unreadable: str | None = None
    same_boot: bool = True
    header: sf.JournalHeader | None = None
    #: The ops, folded into the bitmaps when ``folded``.
    ops: list[tuple[int, int]] = field(default_factory=list)
    folded: bool = False
    #: Follows an older commit than the meta's: its ops are in the commit; dropped.
    stale: bool = False
    #: Why reading stopped before the end (the ops before it are folded).
    cut: str | None = None
    #: Why the instance is taken as all dirty and out of sync, or None.
    damaged: str | None = None


def old_journal(meta: sf.MetaRecord, data: bytes | OSError | None, boot_id: str) -> OldJournal:
    """Judge one layout-1/2 journal file (``data``: its bytes, None when there is none, the
    error when it could not be read) for the instance ``meta`` describes."""
    name = sf.journal_file_name(meta.luid)
    out = OldJournal(name=name, same_boot=meta.boot_id == boot_id)
    if data is None:
        return out
    out.exists = True
    if isinstance(data, OSError):
        out.unreadable = f"cannot read: {data}"
        return out
    out.size = len(data)
    if not data or not out.same_boot:
        return out  # nothing to fold, or another boot: dropped unread
    try:
        header = out.header = sf.JournalHeader.decode(data)
    except sf.StoreFormatError as exc:
        out.damaged = f"its journal {name} has an unreadable header ({exc})"
        return out
    if header.luid != meta.luid:
        out.damaged = f"its journal {name} names luid {header.luid:#018x}"
    elif header.commit_seq > meta.commit_seq:
        out.damaged = (f"its journal {name} follows commit {header.commit_seq}, newer than the meta's "
                       f"commit {meta.commit_seq}")
    elif header.commit_seq < meta.commit_seq:
        out.stale = True
    else:
        out.ops, _valid, out.cut = sf.decode_journal_ops(data[sf.JOURNAL_HEADER_SIZE:])
        out.folded = True
    return out


__all__ = ["ERROR", "NOTE", "WARNING", "Finding", "InstanceContents", "OldJournal", "Replay",
           "RetainedContents", "Snapshot", "StoreContents", "decode_store", "format_mismatch",
           "journal_records_by_instance", "old_journal", "plan_replay", "read_format", "read_snapshot",
           "snapshot"]
