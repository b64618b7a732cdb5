"""A node's durable copy of the cluster state: ``<state dir>/cluster/``.

Two things, both opaque bytes to this module (``ulog_disk.cluster.messages`` defines them):

* a **snapshot** file, ``snapshot``: the whole cluster state at an epoch, written to a new file,
  synced, renamed over the old one, the directory synced (it is replaced whole or not at all);
* the **cluster journal**, segments as the daemon's journal (``formats/journal.md``), of AGREED
  records: every state message this node applied after the snapshot, in the agreed order. A
  record names the snapshot it builds on, so that after a crash between a state transfer and the
  new snapshot's rename, records of the new history are never replayed onto the old snapshot.

A restart loads the snapshot and replays the records that build on it with an epoch past it.

A third file, ``left-behind``, is there while this node's copy is older than what other members
went on with: the node stopped (or lost its corosync) while they stayed. It holds the epoch the
copy was at, in decimal. A cluster forming anew from its state directories whose newest copy has
it waits for one of the nodes that went on (or for every node), as Galera waits for the node that
is safe to bootstrap.
"""

from __future__ import annotations

import os
import secrets
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import construct as c

from .journal import FILE_MODE, Journal, JournalError, Kind, Scan, fsync_dir, scan

SNAPSHOT_FILE_VERSION = 1
LEFT_BEHIND_FILE = "left-behind"

#: The snapshot file: the snapshot's id (what journal records name), the epoch it is at, the
#: snapshot bytes, a CRC-32 of everything before it.
SnapshotFileV1 = c.Struct(
    "body" / c.RawCopy(c.Struct(
        "magic" / c.Const(b"ULCF"),
        "version" / c.Const(SNAPSHOT_FILE_VERSION, c.Int16ul),
        "reserved" / c.Const(0, c.Int16ul),
        "snapshot_id" / c.Int64ul,
        "epoch" / c.Int64ul,
        "snapshot" / c.Prefixed(c.Int64ul, c.GreedyBytes),
    )),
    "crc" / c.Checksum(c.Int32ul, lambda data: zlib.crc32(data), c.this.body.data),
)

_AGREED_HEAD = struct.Struct("<IQ")


class ClusterStoreError(ValueError):
    """The cluster state directory holds something this version cannot read."""


@dataclass(frozen=True, slots=True)
class Applied:
    """One journaled message: its epoch after it was applied, its sender, its bytes."""

    epoch: int
    sender: int
    message: bytes


@dataclass
class Loaded:
    snapshot: bytes | None
    snapshot_id: int
    epoch: int
    records: list[Applied]
    #: Records found that build on another snapshot (a transfer whose snapshot never landed).
    skipped: int


class ClusterStore:
    """Appends on the request loop (``append``: a ``pwrite``), syncs on the cluster's sync
    thread (``sync``, ``write_snapshot``), never both at once on the journal's own data."""

    def __init__(self, directory: Path, segment_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        #: Present while this node's copy is older than what other members went on with.
        self.left_behind_path = self.directory / LEFT_BEHIND_FILE
        self.journal = Journal(self.directory, segment_bytes) if segment_bytes else Journal(self.directory)
        self.snapshot_id = 0
        self._lock = threading.Lock()
        #: (journal position after a record, its epoch), oldest first, for the durable epoch.
        self._positions: list[tuple[int, int]] = []
        self.durable_epoch = 0
        #: Damage the last load found in the journal (its records from there on were not used).
        self.damage: list[str] = []

    @property
    def snapshot_path(self) -> Path:
        return self.directory / "snapshot"

    def left_behind(self) -> int | None:
        """The epoch this node's copy was at when other members went on without it, or None."""
        return read_left_behind(self.left_behind_path)

    def mark_left_behind(self, epoch: int) -> None:
        tmp = self.left_behind_path.with_name("left-behind.new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            os.write(fd, f"{epoch}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.left_behind_path)
        fsync_dir(self.directory)

    def clear_left_behind(self) -> None:
        """Once this node's copy is the agreed one again, and durable."""
        try:
            self.left_behind_path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.directory)

    def load(self) -> Loaded:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        snapshot: bytes | None = None
        snapshot_id, epoch = 0, 0
        read = read_snapshot_file(self.snapshot_path)
        if read is not None:
            snapshot, snapshot_id, epoch = read
        found = scan(self.directory)
        # Records past damage may be anyone's: the state ends before it (an older epoch, which
        # the other members' newer copies replace when the cluster forms).
        stop = found.damage[0].start if found.damage else None
        records, skipped = [], 0
        first_needed: int | None = None
        for rec in found.records:
            if rec.kind is not Kind.AGREED:
                continue
            if stop is not None and rec.lsn >= stop:
                break
            if len(rec.body) < _AGREED_HEAD.size:
                raise ClusterStoreError(f"{self.directory}: a cluster journal record is too short")
            sender, base = _AGREED_HEAD.unpack_from(rec.body)
            if base != snapshot_id:
                skipped += 1
                continue
            if rec.luid > epoch:
                records.append(Applied(rec.luid, sender, rec.body[_AGREED_HEAD.size:]))
                if first_needed is None:
                    first_needed = rec.lsn
        self.damage = [f"{d.start}..{d.end}: {d.reason}" for d in found.damage]
        self.journal.open(found, base=found.end if first_needed is None else first_needed)
        self.snapshot_id = snapshot_id
        last = records[-1].epoch if records else epoch
        self.durable_epoch = last
        return Loaded(snapshot, snapshot_id, epoch, records, skipped)

    def append(self, epoch: int, sender: int, message: bytes) -> int:
        body = _AGREED_HEAD.pack(sender, self.snapshot_id) + message
        position = self.journal.append(Kind.AGREED, b"", epoch, body)
        with self._lock:
            self._positions.append((position, epoch))
        return position

    def sync(self) -> int:
        """Make every record appended so far durable; returns the epoch now durable."""
        durable = self.journal.sync()
        with self._lock:
            while self._positions and self._positions[0][0] <= durable:
                self.durable_epoch = max(self.durable_epoch, self._positions.pop(0)[1])
            return self.durable_epoch

    def new_history(self) -> None:
        """This node takes another node's state: nothing of the new history is durable here
        until its snapshot is written (what was, belongs to the history left behind)."""
        with self._lock:
            self.durable_epoch = 0
            self._positions.clear()

    def new_snapshot_id(self) -> int:
        """The id records appended from now on name (a state transfer starts a new history)."""
        self.snapshot_id = secrets.randbits(63) or 1
        return self.snapshot_id

    def write_snapshot(self, snapshot: bytes, snapshot_id: int, epoch: int, position: int) -> None:
        """Replace the snapshot file; then the journal before ``position`` (where it stood when
        the snapshot was taken: records after it may be newer than the snapshot) is no longer
        needed."""
        data = SnapshotFileV1.build({"body": {"value": {"snapshot_id": snapshot_id, "epoch": epoch,
                                                        "snapshot": snapshot}}})
        tmp = self.snapshot_path.with_name("snapshot.new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.snapshot_path)
        fsync_dir(self.directory)
        with self._lock:
            self.durable_epoch = max(self.durable_epoch, epoch)
            self._positions = [(p, e) for p, e in self._positions if e > epoch]
        self.journal.prepare()
        self.journal.cut(position)

    def close(self) -> None:
        self.journal.close()


def read_left_behind(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return 0  # damaged: still left behind, at an epoch unknown


def read_snapshot_file(path: Path) -> tuple[bytes, int, int] | None:
    """(snapshot, snapshot id, epoch) of a snapshot file, None if there is none."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        parsed = SnapshotFileV1.parse(data)
    except c.ConstructError as exc:
        raise ClusterStoreError(f"{path}: not a cluster snapshot file of version "
                                f"{SNAPSHOT_FILE_VERSION} (or damaged): {exc}") from None
    body = parsed.body.value
    return bytes(body.snapshot), body.snapshot_id, body.epoch


def agreed_head(body: bytes) -> tuple[int, int, bytes]:
    """(sender, snapshot id, message) of an AGREED record's body."""
    if len(body) < _AGREED_HEAD.size:
        raise ClusterStoreError("a cluster journal record is too short")
    sender, base = _AGREED_HEAD.unpack_from(body)
    return sender, base, body[_AGREED_HEAD.size:]


def read_cluster_dir(directory: Path, found: Scan | None = None) -> Loaded:
    """What :meth:`ClusterStore.load` would load, for the tools: never creates, opens for
    writing or removes anything (``load`` continues the journal in a new segment).

    ``found``, a scan of the journal the caller made, must be taken *before* the snapshot is
    read, as here without it: the daemon cuts the journal only after a newer snapshot is in
    place, so a snapshot read after the scan is never older than the records the scan misses."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ClusterStoreError(f"{directory}: no such cluster state directory")
    if found is None:
        found = scan(directory)
    snapshot, snapshot_id, epoch = None, 0, 0
    read = read_snapshot_file(directory / "snapshot")
    if read is not None:
        snapshot, snapshot_id, epoch = read
    stop = found.damage[0].start if found.damage else None
    records, skipped = [], 0
    for rec in found.records:
        if rec.kind is not Kind.AGREED:
            continue
        if stop is not None and rec.lsn >= stop:
            break
        try:
            sender, base, message = agreed_head(rec.body)
        except ClusterStoreError as exc:
            raise ClusterStoreError(f"{directory}: {exc}") from None
        if base != snapshot_id:
            skipped += 1
        elif rec.luid > epoch:
            records.append(Applied(rec.luid, sender, message))
    return Loaded(snapshot, snapshot_id, epoch, records, skipped)


__all__ = ["Applied", "ClusterStore", "ClusterStoreError", "JournalError", "Loaded", "SnapshotFileV1",
           "agreed_head", "read_cluster_dir", "read_snapshot_file"]


class _NoJournal:
    position = 0

    def wants_spare(self) -> bool:
        return False

    def prepare(self) -> None:
        pass

    def close(self) -> None:
        pass


class VolatileClusterStore:
    """The cluster state kept in memory only (``--backend memory``: the backend that keeps
    nothing, as cmirrord keeps nothing): what the other members hold survives one node's loss,
    nothing survives the whole cluster's. Same interface as :class:`ClusterStore`."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.left_behind_path = self.directory / LEFT_BEHIND_FILE  # never written: named in messages
        self.journal = _NoJournal()
        self.snapshot_id = 0
        self.durable_epoch = 0
        self.damage: list[str] = []
        self._lock = threading.Lock()
        self._last = 0

    def load(self) -> Loaded:
        return Loaded(None, 0, 0, [], 0)

    def left_behind(self) -> int | None:
        return None  # nothing survives a stop: the next start has no copy to be older

    def mark_left_behind(self, epoch: int) -> None:
        pass

    def clear_left_behind(self) -> None:
        pass

    def append(self, epoch: int, sender: int, message: bytes) -> int:
        with self._lock:
            self._last = max(self._last, epoch)
        return 0

    def sync(self) -> int:
        with self._lock:
            self.durable_epoch = max(self.durable_epoch, self._last)
            return self.durable_epoch

    def new_history(self) -> None:
        with self._lock:
            self.durable_epoch = self._last = 0

    def new_snapshot_id(self) -> int:
        self.snapshot_id = secrets.randbits(63) or 1
        return self.snapshot_id

    def write_snapshot(self, snapshot: bytes, snapshot_id: int, epoch: int, position: int) -> None:
        with self._lock:
            self.durable_epoch = max(self.durable_epoch, epoch)
            self._last = max(self._last, epoch)

    def close(self) -> None:
        pass
