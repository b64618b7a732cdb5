"""The daemon-wide write-ahead journal: one durable point for every log instance.

Layout (``formats/journal.md`` says the same in prose; the construct definitions below are the
one definition, the ``struct`` forms are generated from them and checked by the golden vectors
and a property test):

* the journal is a sequence of **segment files** ``journal.<start:016x>`` in the state directory,
  each :data:`SEGMENT_BYTES` long (unless the daemon is told another size), preallocated with
  zeros (so a sync overwrites initialized blocks of a file whose size never changes:
  ``fdatasync`` writes the data and flushes the device, one synchronous write, no file-system
  metadata);
* a segment starts with a :data:`SegmentHeaderV1` in its first :data:`HEADER_BYTES`; its records
  cover journal positions ``[start, start + capacity)``, the position of a byte being its
  offset in the journal as a whole (an LSN);
* a record (:data:`RecordV1`) is 8-byte aligned and self-checking: a CRC-32 of all its bytes
  after the CRC, its own position, its length, and the position up to which the journal was
  durable when it was written (the *durable claim*, which tells damage from a torn tail).

Writing: records are appended with ``pwrite`` (a daemon crash keeps them: the page cache
survives the process), and :meth:`Journal.sync` makes everything appended so far durable with
one ``fdatasync`` per segment touched since the last sync. Bytes appended since the last
successful sync are also kept in memory until a sync covers them: after a failed ``fdatasync``
the kernel may have dropped those pages, so the next sync writes them again first. Appending
never makes a segment (a 4 MiB write and three syncs): the store worker makes the next one
ahead (:meth:`Journal.prepare`), and the daemon holds back the requests that write while
:meth:`Journal.short_of_room` says the appends have caught up with it.

Reading (:func:`scan`): from the newest segment's base (every record below it was already in the
stores), record after record; the first record that fails is the end of the journal unless a
later valid record claims the journal was durable past it — then those bytes had been made
durable and are now wrong: that is damage, reported as a range, and reading goes on after it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import construct as c

from ..log.records import OP_CLEAR, OP_MARK, OP_SET_NOSYNC, OP_SET_SYNC
from ..protocol.fastpath import const, flat_struct
from ..protocol.requests import REQUESTS
from .store_format import FLAG_RESUMED, FLAG_SUPERSEDED, STATES

#: Bytes of a segment file, header included.
SEGMENT_BYTES = 4 * 1024 * 1024
#: The segment header's place at the start of each segment file (one page).
HEADER_BYTES = 4096
CAPACITY = SEGMENT_BYTES - HEADER_BYTES
ALIGN = 8
JOURNAL_VERSION = 1
FILE_MODE = 0o600
log = logging.getLogger("ulog_disk.journal")
_SEGMENT_NAME = re.compile(r"journal\.([0-9a-f]{16})")


class JournalError(ValueError):
    """Bytes that are not a valid journal (damage, or not ours)."""


class Kind(IntEnum):
    OPS = 1      # MARK / CLEAR / SET_REGION_SYNC applied to an instance
    FLUSH = 2    # a FLUSH of an instance: the instance's commit point, answered once durable
    EVENT = 3    # a lifecycle request (CTR, RESUME, ...), for the record
    SWITCH = 4   # the journal goes on in the segment starting at ``next_start``
    #: Only in a cluster journal (``<state dir>/cluster``): one agreed cluster message as it was
    #: applied. ``luid`` holds the cluster epoch after it, the uuid field is empty, the body is
    #: the sender's node id (u32), the snapshot id it builds on (u64), then the message
    #: (formats/cluster.md).
    AGREED = 5


#: The lifecycle event codes an EVENT record may carry: the request table's ``journal_event``
#: column (code 3 is reserved for PRESUSPEND, which is not journaled).
Event = IntEnum("Event", {kind.name: facts.journal_event for kind, facts in REQUESTS.items()
                          if facts.journal_event is not None})
_EVENTS = frozenset(int(e) for e in Event)

#: Region ops of OPS and FLUSH records (the backend interface's ``OP_*`` codes).
OP_NAMES = {OP_MARK: "mark", OP_CLEAR: "clear", OP_SET_SYNC: "in-sync", OP_SET_NOSYNC: "out-of-sync"}
OPS = frozenset(OP_NAMES)
#: An op is packed as ``op << 56 | region``: regions are below ``geometry.MAX_REGION_COUNT`` (2**31).
_OP_SHIFT = 56
_REGION_MASK = (1 << _OP_SHIFT) - 1

#: Lifecycle state code → name: the store's codes (``store_format.STATES``), which EVENT records
#: carry too.
STATE_NAMES = {v: k for k, v in STATES.items()}

# --- the one definition --------------------------------------------------------------------------

SegmentHeaderV1 = c.Struct(
    "magic" / c.Const(b"ULGW"),            # 0
    "version" / c.Const(JOURNAL_VERSION, c.Int16ul),  # 4
    "reserved" / c.Const(0, c.Int16ul),    # 6
    "journal_id" / c.Bytes(16),            # 8: the same in every segment of one journal
    "start" / c.Int64ul,                   # 24: position of the segment's first record byte
    "base" / c.Int64ul,                    # 32: every record below it was in the stores when
                                           #     the segment was made
    "capacity" / c.Int64ul,                # 40: record bytes of the segment
    "created_at" / c.Float64l,             # 48: unix time
    "crc" / c.Int32ul,                     # 56: CRC-32 of bytes 0..55
)
SEGMENT_HEADER_SIZE = SegmentHeaderV1.sizeof()

#: The fixed part of every record.
RecordHeaderV1 = c.Struct(
    "crc" / c.Int32ul,           # 0: CRC-32 of bytes 4..length
    "length" / c.Int32ul,        # 4: bytes of the record, padding to 8 not counted
    "lsn" / c.Int64ul,           # 8: the record's own journal position
    "durable" / c.Int64ul,       # 16: the journal was durable up to here when it was written
    "kind" / c.Int8ul,           # 24: Kind
    "uuid_length" / c.Int8ul,    # 25
    "count" / c.Int16ul,         # 26: ops of an OPS or FLUSH record, else 0
    "reserved" / c.Const(0, c.Int32ul),  # 28
    "luid" / c.Int64ul,          # 32
)
RECORD_HEADER_SIZE = RecordHeaderV1.sizeof()

#: A FLUSH carries the marks integrated in it (``count`` ops, as in an OPS record) and the
#: instance's meta that the engine changes at a commit.
FlushBodyV1 = c.Struct(
    "generation" / c.Int64ul,
    "cursor" / c.Int64ul,
    "committed_at" / c.Float64l,
    "ops" / c.Array(c.this._.count, c.Int64ul),
)
EventBodyV1 = c.Struct(
    "event" / c.Int8ul,          # Event
    "state" / c.Int8ul,          # the instance's lifecycle state after it (STATES)
    "flags" / c.Int16ul,         # bit 0 resumed, bit 1 superseded
    "reserved" / c.Const(0, c.Int32ul),
    "generation" / c.Int64ul,
    "region_count" / c.Int64ul,
)
SwitchBodyV1 = c.Struct("next_start" / c.Int64ul)

#: A whole record: the header, the uuid (latin-1), the kind's body, zero padding to 8 bytes.
RecordV1 = c.Struct(
    "crc" / c.Int32ul,
    "length" / c.Int32ul,
    "lsn" / c.Int64ul,
    "durable" / c.Int64ul,
    "kind" / c.Int8ul,
    "uuid_length" / c.Int8ul,
    "count" / c.Int16ul,
    "reserved" / c.Const(0, c.Int32ul),
    "luid" / c.Int64ul,
    "uuid" / c.Bytes(c.this.uuid_length),
    "body" / c.Switch(c.this.kind, {
        Kind.OPS: c.Struct("ops" / c.Array(c.this._.count, c.Int64ul)),
        Kind.FLUSH: FlushBodyV1,
        Kind.EVENT: EventBodyV1,
        Kind.SWITCH: SwitchBodyV1,
        Kind.AGREED: c.Bytes(lambda this: this.length - RECORD_HEADER_SIZE - this.uuid_length),
    }),
    "padding" / c.Padding(lambda this: -this.length % ALIGN),
)

# --- the struct forms of the hot paths, generated from the definitions above ---------------------

_SEGMENT_HEADER = flat_struct(SegmentHeaderV1)
_SEGMENT_MAGIC = const(SegmentHeaderV1, "magic")
_HEADER = flat_struct(RecordHeaderV1)
_FLUSH = flat_struct(FlushBodyV1, prefix=True)
_EVENT = flat_struct(EventBodyV1)
_SWITCH = flat_struct(SwitchBodyV1)
_CRC = flat_struct(RecordHeaderV1.crc.subcon)
_LSN = flat_struct(RecordHeaderV1.lsn.subcon)
assert _HEADER.size == RECORD_HEADER_SIZE == 40 and _FLUSH.size == 24
#: Bytes of a SWITCH record: every segment keeps room for one after its last other record.
SWITCH_BYTES = RECORD_HEADER_SIZE + _SWITCH.size


def _padded(n: int) -> int:
    return n + (-n % ALIGN)


def pack_op(op: int, region: int) -> int:
    return op << _OP_SHIFT | region


def encode_record(kind: int, lsn: int, durable: int, uuid: bytes, luid: int, body: bytes,
                  count: int = 0) -> bytes:
    """One record's bytes (padded): the CRC over everything after it."""
    length = RECORD_HEADER_SIZE + len(uuid) + len(body)
    head = _HEADER.pack(0, length, lsn, durable, kind, len(uuid), count, 0, luid)
    raw = head + uuid + body + bytes(-length % ALIGN)
    crc = zlib.crc32(memoryview(raw)[4:length])
    return _CRC.pack(crc) + raw[4:]


def ops_body(ops: Iterable[tuple[int, int]]) -> tuple[bytes, int]:
    packed = [op << _OP_SHIFT | region for op, region in ops]
    return struct.pack(f"<{len(packed)}Q", *packed), len(packed)


def flush_body(generation: int, cursor: int, committed_at: float,
               ops: Iterable[tuple[int, int]] = ()) -> tuple[bytes, int]:
    packed = [op << _OP_SHIFT | region for op, region in ops]
    body = _FLUSH.pack(generation, cursor, committed_at) + struct.pack(f"<{len(packed)}Q", *packed)
    return body, len(packed)


def event_body(event: int, state: str, resumed: bool, superseded: bool, generation: int,
               region_count: int) -> bytes:
    flags = (FLAG_RESUMED if resumed else 0) | (FLAG_SUPERSEDED if superseded else 0)
    return _EVENT.pack(event, STATES[state], flags, 0, generation, region_count)


def encode_segment_header(journal_id: bytes, start: int, base: int, created_at: float,
                          capacity: int = CAPACITY) -> bytes:
    head = _SEGMENT_HEADER.pack(_SEGMENT_MAGIC, JOURNAL_VERSION, 0, journal_id, start, base, capacity,
                                created_at, 0)
    crc = zlib.crc32(head[:-4])
    return head[:-4] + _CRC.pack(crc)


@dataclass(slots=True, frozen=True)
class SegmentHeader:
    journal_id: bytes
    start: int
    base: int
    capacity: int
    created_at: float


def decode_segment_header(data: bytes) -> SegmentHeader:
    if len(data) < SEGMENT_HEADER_SIZE:
        raise JournalError(f"segment header of {len(data)} bytes is too short")
    magic, version, reserved, jid, start, base, capacity, created_at, crc = _SEGMENT_HEADER.unpack_from(data)
    if magic != _SEGMENT_MAGIC:
        raise JournalError(f"segment header has magic {magic!r}, expected {_SEGMENT_MAGIC!r}")
    if version != JOURNAL_VERSION:
        raise JournalError(f"journal segment of version {version}; this ulog-disk reads only version "
                           f"{JOURNAL_VERSION}: refusing to read it")
    if crc != zlib.crc32(data[: SEGMENT_HEADER_SIZE - 4]):
        raise JournalError("segment header fails its checksum")
    if reserved or capacity <= SWITCH_BYTES or capacity % ALIGN or start % ALIGN or base > start + capacity:
        raise JournalError("segment header does not add up (reserved bits, capacity, start or base)")
    return SegmentHeader(jid, start, base, capacity, created_at)


@dataclass(slots=True)
class Record:
    """A decoded record. ``ops`` for OPS; ``generation``/``cursor``/``committed_at`` for FLUSH;
    ``event``/``state``/``flags``/``generation``/``region_count`` for EVENT; ``next_start``
    for SWITCH."""

    kind: Kind
    lsn: int
    length: int
    durable: int
    uuid: str
    luid: int
    ops: list[tuple[int, int]] = field(default_factory=list)
    generation: int = 0
    cursor: int = 0
    committed_at: float = 0.0
    event: int = 0
    state: str = ""
    flags: int = 0
    region_count: int = 0
    next_start: int = 0
    body: bytes = b""

    @property
    def end(self) -> int:
        return self.lsn + _padded(self.length)


def decode_record(data: bytes | memoryview, offset: int, lsn: int) -> Record:
    """The record at ``offset`` of ``data`` that must sit at journal position ``lsn``;
    :class:`JournalError` if it is not a whole, valid record there."""
    if len(data) - offset < RECORD_HEADER_SIZE:
        raise JournalError("no room for a record header")
    crc, length, at, durable, kind, ulen, count, reserved, luid = _HEADER.unpack_from(data, offset)
    if length < RECORD_HEADER_SIZE or offset + _padded(length) > len(data):
        raise JournalError(f"record length {length} does not fit")
    if at != lsn:
        raise JournalError(f"record claims position {at}, found at {lsn}")
    if crc != zlib.crc32(memoryview(data)[offset + 4 : offset + length]):
        raise JournalError("record fails its checksum")
    if reserved:
        raise JournalError("record has reserved bits set")
    pos = offset + RECORD_HEADER_SIZE
    uuid = bytes(data[pos : pos + ulen]).decode("latin-1")
    pos += ulen
    body = length - RECORD_HEADER_SIZE - ulen
    try:
        kind = Kind(kind)
    except ValueError:
        raise JournalError(f"record of unknown kind {kind}") from None
    rec = Record(kind, at, length, durable, uuid, luid)
    if kind is Kind.OPS or kind is Kind.FLUSH:
        fixed = _FLUSH.size if kind is Kind.FLUSH else 0
        if body != fixed + 8 * count or (count == 0 and kind is Kind.OPS):
            raise JournalError(f"{kind.name} record of {count} ops has a body of {body} bytes")
        if fixed:
            rec.generation, rec.cursor, rec.committed_at = _FLUSH.unpack_from(data, pos)
        for value in struct.unpack_from(f"<{count}Q", data, pos + fixed):
            op = value >> _OP_SHIFT
            if op not in OPS:
                raise JournalError(f"unknown region op {op}")
            rec.ops.append((op, value & _REGION_MASK))
    elif kind is Kind.EVENT:
        if body != _EVENT.size or count:
            raise JournalError("EVENT record of the wrong size")
        event, state, rec.flags, reserved, rec.generation, rec.region_count = _EVENT.unpack_from(data, pos)
        rec.event = event
        if reserved or state not in STATE_NAMES or event not in _EVENTS:
            raise JournalError("EVENT record with an unknown event, state or reserved bits")
        rec.state = STATE_NAMES[state]
    elif kind is Kind.AGREED:
        if count or ulen:
            raise JournalError("AGREED record with ops or a uuid")
        rec.body = bytes(data[pos : pos + body])
    else:
        if body != _SWITCH.size or count or ulen:
            raise JournalError("SWITCH record of the wrong size")
        (rec.next_start,) = _SWITCH.unpack_from(data, pos)
    return rec


def segment_name(start: int) -> str:
    return f"journal.{start:016x}"


def parse_segment_name(name: str) -> int | None:
    m = _SEGMENT_NAME.fullmatch(name)
    return int(m.group(1), 16) if m else None


def fsync_dir(path: Path) -> None:
    """Make a directory entry change (create, rename) durable: a host crash must not lose it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading -------------------------------------------------------------------------------------


@dataclass
class Damage:
    start: int
    end: int
    reason: str


@dataclass
class Scan:
    """What a journal holds, as the daemon's restore and the tools read it."""

    directory: Path
    journal_id: bytes | None = None
    #: segment start → header (only segments whose header is valid and of this journal)
    segments: dict[int, SegmentHeader] = field(default_factory=dict)
    #: Every record below it was in the stores when the newest segment was made.
    base: int = 0
    #: Where the next record goes: the end of the last valid record (or ``base``).
    end: int = 0
    #: The highest durable claim of a valid record: the journal was durable at least up to here.
    durable: int = 0
    records: list[Record] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    #: Files that look like segments and could not be used (why).
    problems: list[str] = field(default_factory=list)

    @property
    def exists(self) -> bool:
        return self.journal_id is not None

    def damaged_after(self, position: int) -> Damage | None:
        """The first damage at or past ``position``: records there could be anyone's."""
        for d in self.damage:
            if d.end > position:
                return d
        return None


def scan(directory: Path) -> Scan:
    """Read the whole journal of ``directory`` (read-only; never writes)."""
    directory = Path(directory)
    result = Scan(directory)
    headers: list[tuple[SegmentHeader, Path]] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return result
    for name in names:
        start = parse_segment_name(name)
        if start is None:
            continue
        path = directory / name
        try:
            with open(path, "rb") as f:
                header = decode_segment_header(f.read(SEGMENT_HEADER_SIZE))
        except (OSError, JournalError) as exc:
            result.problems.append(f"{name}: {exc}")
            continue
        if header.start != start:
            result.problems.append(f"{name}: its header says it starts at {header.start}")
            continue
        headers.append((header, path))
    if not headers:
        return result
    # One journal per state directory: the newest segment names it.
    headers.sort(key=lambda h: h[0].start)
    jid = headers[-1][0].journal_id
    for header, path in headers:
        if header.journal_id != jid:
            result.problems.append(f"{path.name}: belongs to another journal (id {header.journal_id.hex()})")
    headers = [h for h in headers if h[0].journal_id == jid]
    result.journal_id = jid
    result.segments = {h.start: h for h, _ in headers}
    result.base = max(h.base for h, _ in headers)
    paths = {h.start: p for h, p in headers}
    order = sorted(result.segments)
    first = next((s for s in order if s <= result.base < s + result.segments[s].capacity), None)
    if first is None:
        if result.base < order[0]:
            result.damage.append(Damage(result.base, order[0], f"the segment holding position {result.base} "
                                        f"is missing (journal starts at {order[0]})"))
        first = order[0] if result.base < order[0] else order[-1]
        pos = max(result.base, first)
    else:
        pos = result.base
    datas: dict[int, bytes] = {}

    def data_of(start: int) -> bytes:
        if start not in datas:
            with open(paths[start], "rb") as f:
                f.seek(HEADER_BYTES)
                datas[start] = f.read(result.segments[start].capacity)
        return datas[start]

    index = order.index(first)
    while index < len(order):
        seg = result.segments[order[index]]
        data = data_of(seg.start)
        pos = max(pos, seg.start)
        next_segment = None
        while True:
            offset = pos - seg.start
            try:
                rec = decode_record(data, offset, pos)
            except JournalError as exc:
                failure = str(exc)
                break
            result.durable = max(result.durable, rec.durable)
            if rec.kind is Kind.SWITCH:
                result.records.append(rec)
                next_segment = rec.next_start
                pos = rec.end
                failure = None
                break
            result.records.append(rec)
            pos = rec.end
        if next_segment is not None:
            if next_segment not in result.segments:
                # The SWITCH was written, the next segment is gone: nothing after it can be read.
                result.damage.append(Damage(next_segment, next_segment, f"segment "
                                            f"{segment_name(next_segment)} named by a SWITCH is missing"))
                pos = rec.end
                break
            pos = next_segment
            index = order.index(next_segment)
            continue
        # The first record that fails: the tail, unless a later record says it was durable.
        later = _durable_evidence(result, order, index, pos, data_of)
        if later is None:
            break
        resume, seg_start = later[0], later[2]
        if seg_start == seg.start:
            # Go on at the first whole record after the damage: only the damaged bytes are lost.
            resume = _first_valid(data, seg.start, pos + ALIGN, later[0])
        result.damage.append(Damage(pos, resume, f"{failure} at position {pos}, but a later record "
                                    f"({later[0]}) says the journal was durable up to {later[1]}"))
        pos = resume
        index = order.index(seg_start)
    result.end = max(pos, result.base)
    return result


def _durable_evidence(result: Scan, order: list[int], index: int, pos: int,
                      data_of: object) -> tuple[int, int, int] | None:
    """The first valid record past ``pos`` (this segment or later ones) whose durable claim
    goes beyond ``pos``: (its position, its claim, its segment start), or None."""
    for seg_start in order[index:]:
        seg = result.segments[seg_start]
        data = data_of(seg_start)  # type: ignore[operator]
        offset = max(0, pos + ALIGN - seg.start) if seg_start <= pos else 0
        offset += -offset % ALIGN
        mv = memoryview(data)
        while offset + RECORD_HEADER_SIZE <= len(data):
            # Skip zeros fast: a preallocated segment's unused tail is all zeros.
            nz = _next_nonzero(data, offset)
            if nz < 0:
                break
            offset = nz - nz % ALIGN
            lsn = seg.start + offset
            (at,) = _LSN.unpack_from(mv, offset + 8) if offset + 16 <= len(data) else (None,)
            if at == lsn:
                try:
                    rec = decode_record(data, offset, lsn)
                except JournalError:
                    rec = None
                if rec is not None and rec.durable > pos:
                    return lsn, rec.durable, seg_start
            offset += ALIGN
    return None


def _first_valid(data: bytes, seg_start: int, start: int, limit: int) -> int:
    """The position of the first valid record in ``[start, limit)`` of a segment, else ``limit``."""
    lsn = start + (-start % ALIGN)
    while lsn < limit:
        try:
            decode_record(data, lsn - seg_start, lsn)
            return lsn
        except JournalError:
            lsn += ALIGN
    return limit


def _next_nonzero(data: bytes, offset: int) -> int:
    """Index of the first non-zero byte at or after ``offset``, or -1."""
    n = len(data)
    step = 65536
    zero = bytes(step)
    while offset < n:
        end = min(n, offset + step)
        chunk = data[offset:end]
        if chunk != zero[: end - offset]:
            stripped = len(chunk) - len(chunk.lstrip(b"\0"))
            return offset + stripped
        offset = end
    return -1


# --- writing -------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Segment:
    start: int
    path: Path
    fd: int
    capacity: int = CAPACITY
    #: The base its header records.
    base: int = 0

    @property
    def end(self) -> int:
        return self.start + self.capacity


class Journal:
    """The appending side, used by three of the daemon's threads:

    * the request loop **appends** (``append``: a ``pwrite`` into the page cache) and asks
      :meth:`short_of_room` before serving a request that writes; it never waits for the disk,
      so it never syncs and never makes a segment. Two threads take turns at the loop, never
      both at once;
    * the serving thread whose turn ended with FLUSHes waiting **syncs** (``sync``, one call at a
      time), outside the loop, while the other serves;
    * the store worker makes the **next segment** ahead of need (``prepare``) and **cuts**.

    ``open`` and ``close`` run before and after the others (``open`` syncs and makes a segment:
    the daemon is not serving yet)."""

    def __init__(self, directory: Path, segment_bytes: int = SEGMENT_BYTES):
        self.directory = Path(directory)
        self.capacity = segment_bytes - HEADER_BYTES
        #: Record bytes kept free at the end of a segment whose successor is not ready: while
        #: less is left (and the store worker has not failed to make the successor),
        #: :meth:`short_of_room` tells the daemon to hold back the requests that write. The
        #: daemon asks before each request, and a request writes one record: from the kernel
        #: at most 520 bytes (332 bytes of data: 41 regions), so a quarter of a segment (1 MiB;
        #: 15 KiB for the smallest segments the daemon accepts) leaves it room to spare.
        self.reserve = self.capacity // 4
        self.journal_id = b""
        #: Segments still on disk, oldest first; the last is the one appended to.
        self.segments: list[_Segment] = []
        #: The next segment, made by :meth:`prepare`, which the next SWITCH names.
        self.spare: _Segment | None = None
        #: Why the last :meth:`prepare` failed (None once one succeeds).
        self.prepare_error: OSError | None = None
        self.position = 0
        self.durable = 0
        #: Bytes appended since ``durable`` (kept until a sync covers them), and where they start.
        self._unsynced = bytearray()
        self._unsynced_start = 0
        self._rewrite = False
        #: Segments appended to since the last sync, oldest first: what the next sync syncs.
        self._dirty: list[_Segment] = []
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        #: Every record below this was in the stores (what a new segment's header records).
        self.base = 0
        self.closed = False

    # --- opening -----------------------------------------------------------------------------

    def open(self, found: Scan, base: int, floor: int = 0, journal_id: bytes | None = None) -> None:
        """Continue the journal ``found`` (or start one, named ``journal_id``) in a new segment.

        Every start makes a new segment, after every existing one and at or past ``floor`` (a
        store may already follow the journal up to there), whose header records ``base``: what
        this start's restore still needs. A SWITCH record at the old end leads a reader there;
        whatever follows the old end in its segment (a torn tail, records never synced) is never
        read. The old segments are synced first, so every record before the end is durable, and
        they are removed by :meth:`cut` once the stores hold their records. On a full disk, where
        no segment can be made, it goes on in the newest one instead, after zeroing its tail."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.journal_id = found.journal_id or journal_id or secrets.token_bytes(16)
        self.base = base
        old: list[_Segment] = []
        for start in sorted(found.segments):
            path = self.directory / segment_name(start)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            header = found.segments[start]
            old.append(_Segment(start, path, fd, header.capacity, header.base))
        self.segments = old
        self._dirty = []
        self._unsynced.clear()
        end = found.end
        new_start = _padded(max([s.end for s in old] + [floor, 0]))
        last = next((s for s in old if s.start <= end < s.end), None)
        self._sync_segments(old)
        self.base = min(base, new_start)
        # The new segment first, then the SWITCH to it: a SWITCH never names a missing segment.
        try:
            segment = self._create(new_start, self.base)
        except OSError as exc:
            if last is None or last is not old[-1] or end + SWITCH_BYTES > last.end:
                raise
            # No room for a new segment (a full disk): go on in the newest one, after zeroing
            # its tail (its blocks are allocated: that needs no new space).
            log.warning("journal: no new segment (%s); going on in %s", exc, last.path.name)
            self._zero(last, end)
            self.position = self.durable = self._unsynced_start = end
            return
        if last is not None and end + SWITCH_BYTES <= last.end:
            self.position = self.durable = self._unsynced_start = end
            self._write_record(last, Kind.SWITCH, b"", 0, _SWITCH.pack(new_start))
            self._sync_segments([last])
        self.segments.append(segment)
        self.position = self.durable = self._unsynced_start = new_start
        self._unsynced.clear()
        self._dirty = []

    def _zero(self, segment: _Segment, position: int) -> None:
        offset = HEADER_BYTES + position - segment.start
        total = HEADER_BYTES + segment.capacity
        zero = bytes(1 << 20)
        while offset < total:
            offset += os.pwrite(segment.fd, zero[: min(len(zero), total - offset)], offset)
        os.fdatasync(segment.fd)

    def _create(self, start: int, base: int) -> _Segment:
        """A new segment file, zero-filled, durable, under its final name."""
        path = self.directory / segment_name(start)
        tmp = path.with_name(path.name + ".new")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            header = encode_segment_header(self.journal_id, start, base, time.time(), self.capacity)
            os.pwrite(fd, header.ljust(HEADER_BYTES, b"\0"), 0)
            zero = bytes(1 << 20)
            offset = HEADER_BYTES
            total = HEADER_BYTES + self.capacity
            while offset < total:
                n = os.pwrite(fd, zero[: min(len(zero), total - offset)], offset)
                if n <= 0:
                    raise OSError(errno.ENOSPC, "short write preallocating a journal segment")
                offset += n
            os.fsync(fd)
            os.rename(tmp, path)
            fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return _Segment(start, path, fd, self.capacity, base)

    def prepare(self) -> None:
        """Make the next segment ahead of need (store worker, off the request path). A failure
        (a full disk) is kept in :attr:`prepare_error` and raised; the next call tries again."""
        with self._lock:
            if self.spare is not None or self.closed or not self.segments:
                return
            start, base = self.segments[-1].end, self.base
        try:
            spare = self._create(start, base)
        except OSError as exc:
            with self._lock:
                self.prepare_error = exc
            raise
        with self._lock:
            # Only the loop's switch changes the newest segment, and only to a spare: while none
            # is ready the newest segment is still the one this spare follows.
            if self.spare is None and not self.closed and self.segments[-1].end == start:
                self.spare = spare
                self.prepare_error = None
                return
        os.close(spare.fd)

    # --- appending -----------------------------------------------------------------------------

    def append(self, kind: int, uuid: bytes, luid: int, body: bytes, count: int = 0) -> int:
        """Append one record; returns the position after it (what a sync must reach).

        Raises :class:`OSError` without writing anything when the record does not fit in the
        segment and no next one is ready (see :meth:`_switch`)."""
        with self._lock:
            segment = self.segments[-1]
            need = _padded(RECORD_HEADER_SIZE + len(uuid) + len(body))
            if need + SWITCH_BYTES > self.capacity:
                # Written anyway it would run past the end of any segment, where no reader looks.
                raise OSError(errno.EMSGSIZE, f"a journal record of {need} bytes does not fit in a "
                                              f"segment of {self.capacity}")
            if self.position + need + SWITCH_BYTES > segment.end:
                segment = self._switch(segment)
            self._write_record(segment, kind, uuid, luid, body, count)
            return self.position

    def _write_record(self, segment: _Segment, kind: int, uuid: bytes, luid: int, body: bytes,
                      count: int = 0) -> None:
        data = encode_record(kind, self.position, self.durable, uuid, luid, body, count)
        offset = HEADER_BYTES + self.position - segment.start
        written = os.pwrite(segment.fd, data, offset)
        if written != len(data):
            raise OSError(errno.EIO, f"short journal write ({written} of {len(data)} bytes)")
        self._unsynced += data
        if not self._dirty or self._dirty[-1] is not segment:
            self._dirty.append(segment)
        self.position += len(data)

    def _switch(self, segment: _Segment) -> _Segment:
        """Go on in the segment :meth:`prepare` made: a SWITCH record naming it ends this one.

        Never makes the segment itself: that is a 4 MiB write, an fsync, a rename and a
        directory fsync, which the request loop must not wait for (a stalled disk would stop
        every mirror's reads with it). Without a spare the append fails with nothing written:
        ``BlockingIOError`` when nobody has failed to make one (the caller did not wait while
        :meth:`short_of_room` said so, or one record was larger than the reserve), else the
        error that making it failed with (a full disk: the write fails as any write there does)."""
        nxt = self.spare
        if nxt is None:
            if self.prepare_error is not None:
                err = self.prepare_error
                raise OSError(err.errno, f"no next journal segment: making it failed ({err})")
            raise BlockingIOError(errno.EAGAIN, "no next journal segment is ready (the store worker "
                                  "makes it: Journal.prepare)")
        self.spare = None
        self._write_record(segment, Kind.SWITCH, b"", 0, _SWITCH.pack(nxt.start))
        self._unsynced += bytes(nxt.start - self.position)  # keep offsets: the skipped tail
        self.position = nxt.start
        self.segments.append(nxt)
        return nxt

    # --- durability ------------------------------------------------------------------------------

    def sync(self) -> int:
        """Make every record appended so far durable; returns the position now durable."""
        with self._sync_lock:
            with self._lock:
                target = self.position
                if target <= self.durable and not self._rewrite:
                    return self.durable
                dirty = list(self._dirty)
                self._dirty = []
                rewrite = self._rewrite
                if rewrite:
                    pending = bytes(self._unsynced[: target - self._unsynced_start])
                    pending_start = self._unsynced_start
            try:
                if rewrite:
                    dirty += [seg for seg in self._rewrite_from(pending, pending_start) if seg not in dirty]
                self._sync_segments(dirty)
            except OSError:
                with self._lock:
                    # The kernel may have dropped the pages that failed: write them again first.
                    self._rewrite = True
                    for seg in reversed(dirty):
                        if seg not in self._dirty:
                            self._dirty.insert(0, seg)
                raise
            with self._lock:
                self._rewrite = False
                drop = target - self._unsynced_start
                del self._unsynced[:drop]
                self._unsynced_start = target
                self.durable = max(self.durable, target)
                return self.durable

    def _rewrite_from(self, data: bytes, start: int) -> list[_Segment]:
        """Write ``data`` again at journal position ``start``; the segments it touched."""
        touched = []
        for segment in list(self.segments):
            lo, hi = max(start, segment.start), min(start + len(data), segment.end)
            if lo < hi:
                piece = data[lo - start : hi - start]
                if os.pwrite(segment.fd, piece, HEADER_BYTES + lo - segment.start) != len(piece):
                    raise OSError(errno.EIO, "short journal rewrite")
                touched.append(segment)
        return touched

    @staticmethod
    def _sync_segments(segments: list[_Segment]) -> None:
        for segment in segments:
            os.fdatasync(segment.fd)

    # --- cutting ---------------------------------------------------------------------------------

    def cut(self, needed: int) -> list[Path]:
        """Every record below ``needed`` is in the stores: remove the segments that hold nothing
        else. A segment goes only when the newest segment's header (written when it was made)
        also says its records are in the stores, so a reader, which starts at that base, never
        finds the start of what it needs missing."""
        removed = []
        with self._lock:
            self.base = max(self.base, min(needed, self.position))
            limit = min(needed, self.segments[-1].base)
            drop = [seg for seg in self.segments[:-1] if seg.end <= limit]
            self.segments = [seg for seg in self.segments if seg not in drop]
            self._dirty = [s for s in self._dirty if s not in drop]
        for seg in drop:
            os.close(seg.fd)
            try:
                seg.path.unlink()
                removed.append(seg.path)
            except FileNotFoundError:
                pass
        return removed

    def wants_spare(self) -> bool:
        """The segment appended to is half full and no next one is ready: time for
        :meth:`prepare` (asked on the loop; the store worker runs it)."""
        with self._lock:
            seg = self.segments[-1] if self.segments else None
            return (seg is not None and self.spare is None and not self.closed
                    and self.position - seg.start > seg.capacity // 2)

    def short_of_room(self) -> bool:
        """Whether requests that write must wait for the next segment (asked on the loop before
        each one; no I/O): less than :attr:`reserve` is left in the segment appended to, no next
        one is ready, and the last attempt to make one did not fail. After a failure they go
        on: the append that needs the next segment then fails with the error (see
        :meth:`_switch`), rather than every write waiting for space that may never come."""
        with self._lock:
            seg = self.segments[-1] if self.segments else None
            return (seg is not None and self.spare is None and self.prepare_error is None
                    and not self.closed and seg.end - SWITCH_BYTES - self.position < self.reserve)

    def descriptors(self) -> int:
        return len(self.segments) + (1 if self.spare else 0)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            segments = self.segments + ([self.spare] if self.spare else [])
            self.segments, self.spare = [], None
        for seg in segments:
            os.close(seg.fd)
