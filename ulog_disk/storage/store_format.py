"""The on-disk layout of the LMDB store, defined once (``formats/store.md`` says the same in prose).

Everything that knows a byte offset of the store lives here, written as construct definitions:
the backend (:mod:`ulog_disk.storage.lmdb_store`), its reader (:mod:`ulog_disk.storage.lmdb_reader`,
which the dump/recovery tools use too) read and write the store only through these functions, so
one version number covers all of them.

Layout version 3 (the version of the format record):

* one LMDB environment per uuid, in a directory named by :func:`encode_dir_name`;
* in its main database, the key ``format`` → :data:`FormatRecordV3`, and the named sub-databases
  ``meta.<luid>`` (``record`` → :data:`MetaRecordV1`, ``checkpoint`` → :data:`CheckpointRecordV1`),
  ``clean.<luid>`` and ``sync.<luid>`` (chunk index as a big-endian u32 → bitmap bytes),
  ``<luid>`` being 16 lowercase hex digits; the uuid's retained state in ``retained.meta``
  (``record`` → :data:`RetainedRecordV1`), ``retained.clean`` and ``retained.sync``;
* every value (records and chunks) sealed with :data:`ValueChecksum`;
* the journal is the daemon's, beside the environments (:mod:`ulog_disk.storage.journal`).

Layouts 1 and 2 are read only to be migrated, never written. Layout 2 had no checkpoint record
and, beside the LMDB files, one journal file ``journal.<luid>`` per instance
(:data:`JournalHeaderV1` followed by :data:`JournalRecordV1` records); layout 1 differs from 2
only in that its values carry no checksum (``sealed=False``).

Records start with a 4-byte magic and a u16 version. A record whose version is not one this code
knows raises :class:`UnknownVersionError`, never a guess: a newer daemon's store is refused rather
than misread. All integers are little-endian except chunk keys, which are big-endian so LMDB's
byte-wise key order is the chunk order.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

import construct as c

from ..log.lifecycle import State
from ..log.records import OP_CLEAR, OP_MARK, OP_SET_NOSYNC, OP_SET_SYNC, InstanceRecord
from ..log.regionlog import chunk_count
from ..protocol.fastpath import const, flat_struct
from ..protocol.geometry import MAX_REGION_COUNT

#: The store layout this code writes: the format record's version. It says how everything in
#: the environment is laid out; layout 2 seals every value with a checksum.
LAYOUT_VERSION = 3
#: Layouts this code reads: 1 and 2 only to migrate them to 3 when the daemon opens the store.
LAYOUT_VERSIONS_READ = (1, 2, 3)
#: The version of the meta, retained and journal records (unchanged since layout 1).
RECORD_VERSION = 1

#: Longest uuid the kernel sends (DM_UUID_LEN - 1).
MAX_UUID_BYTES = 128


class StoreFormatError(ValueError):
    """Bytes that are not a valid record of the layout (damage, or not ours)."""


class UnknownVersionError(StoreFormatError):
    """A record of a layout version this code does not know (a newer ulog-disk wrote it)."""


# --- directory names -----------------------------------------------------------------------------

#: Characters a uuid may keep as they are in its directory name ("u." form). No '.', so a
#: directory renamed aside (``<name>.damaged-<time>``) or any stray name with a dot can never
#: be mistaken for an environment; no '/', NUL, space or control bytes.
_PLAIN = re.compile(r"[A-Za-z0-9_:+@=-]+")
_BASE32 = re.compile(r"[A-Z2-7]+")
PLAIN_PREFIX = "u."
ENCODED_PREFIX = "x."
DAMAGED_INFIX = ".damaged-"


def encode_dir_name(uuid: str) -> str:
    """The environment directory name of a uuid (a latin-1 string of 1..128 characters).

    ``u.<uuid>`` when every character is in ``[A-Za-z0-9_:+@=-]`` (LVM's ``LVM-<64 chars>``
    stays readable), otherwise ``x.<RFC 4648 base32 of the latin-1 bytes, no padding>``.
    Both forms are one path component of at most 2 + 205 bytes, never ``.`` or ``..``.
    """
    raw = uuid.encode("latin-1")  # UnicodeEncodeError (a ValueError) for a non-latin-1 str
    if not 1 <= len(raw) <= MAX_UUID_BYTES:
        raise ValueError(f"uuid of {len(raw)} bytes (must be 1..{MAX_UUID_BYTES})")
    if _PLAIN.fullmatch(uuid):
        return PLAIN_PREFIX + uuid
    return ENCODED_PREFIX + base64.b32encode(raw).decode("ascii").rstrip("=")


def decode_dir_name(name: str) -> str | None:
    """The uuid of an environment directory name, or None for any other name.

    Only canonical names decode (``encode_dir_name(decode_dir_name(n)) == n``), so each uuid
    has exactly one directory and names moved aside are not environments.
    """
    if name.startswith(PLAIN_PREFIX):
        rest = name[len(PLAIN_PREFIX):]
        if _PLAIN.fullmatch(rest) and len(rest) <= MAX_UUID_BYTES:
            return rest
        return None
    if name.startswith(ENCODED_PREFIX):
        rest = name[len(ENCODED_PREFIX):]
        if not _BASE32.fullmatch(rest):
            return None
        try:
            uuid = base64.b32decode(rest + "=" * (-len(rest) % 8)).decode("latin-1")
        except (binascii.Error, ValueError):
            return None
        try:
            canonical = encode_dir_name(uuid)
        except ValueError:
            return None
        return uuid if canonical == name else None
    return None


def damaged_dir_name(name: str, when: int, attempt: int = 0) -> str:
    """Where a damaged environment is moved aside (``attempt`` > 0 if that name is taken)."""
    suffix = f"{DAMAGED_INFIX}{when}" + (f".{attempt}" if attempt else "")
    return name + suffix


def parse_damaged_dir_name(name: str) -> tuple[str | None, int | None] | None:
    """(uuid, unix time) of a name :func:`damaged_dir_name` made (either None when that part
    does not read), or None for any other name."""
    base, sep, rest = name.partition(DAMAGED_INFIX)
    if not sep:
        return None
    stamp = rest.split(".", 1)[0]
    return decode_dir_name(base), int(stamp) if stamp.isdigit() else None


# --- names inside an environment -----------------------------------------------------------------

FORMAT_KEY = b"format"
#: The one key of a ``meta.<luid>`` / ``retained.meta`` sub-database.
RECORD_KEY = b"record"
RETAINED_META = b"retained.meta"
RETAINED_CLEAN = b"retained.clean"
RETAINED_SYNC = b"retained.sync"
INSTANCE_KINDS = ("meta", "clean", "sync")
_INSTANCE_DB = re.compile(rb"(meta|clean|sync)\.([0-9a-f]{16})")


def instance_db_name(kind: str, luid: int) -> bytes:
    """``meta.<luid>``, ``clean.<luid>`` or ``sync.<luid>``: the luid as 16 lowercase hex digits."""
    if kind not in INSTANCE_KINDS:
        raise ValueError(f"unknown instance sub-database kind {kind!r}")
    return f"{kind}.{luid:016x}".encode("ascii")


def parse_instance_db_name(name: bytes) -> tuple[str, int] | None:
    m = _INSTANCE_DB.fullmatch(name)
    if m is None:
        return None
    return m.group(1).decode("ascii"), int(m.group(2), 16)


def journal_file_name(luid: int) -> str:
    return f"journal.{luid:016x}"


# --- records -------------------------------------------------------------------------------------

_Prefix = c.Struct("magic" / c.Bytes(4), "version" / c.Int16ul)


def _format_record(layout: int) -> c.Construct:
    return c.Struct(
        "magic" / c.Const(b"ULGS"),          # 0
        "version" / c.Const(layout, c.Int16ul),  # 4: the layout version of the environment
        "reserved" / c.Const(0, c.Int16ul),  # 6
        "chunk_bytes" / c.Int32ul,           # 8: bitmap bytes per chunk (the checksum not counted)
        "reserved2" / c.Const(0, c.Int32ul),  # 12
        "created_at" / c.Float64l,           # 16: unix time
        "uuid" / c.PascalString(c.Int8ul, "latin-1"),  # 24
        c.Terminated,
    )


#: ``format`` key of the main database: the environment's layout version, its chunk size and
#: whose it is (the directory name is checked against ``uuid``). Layouts 1 and 2 have the same
#: fields; the version says whether chunks are sealed.
FormatRecordV1 = _format_record(1)
FormatRecordV2 = _format_record(2)
#: Layout 3: as layout 2, plus a ``checkpoint`` record per instance; the per-instance journal
#: files are gone (the daemon-wide journal of :mod:`ulog_disk.storage.journal` replaced them).
FormatRecordV3 = _format_record(3)
_FORMAT_RECORDS = {1: FormatRecordV1, 2: FormatRecordV2, 3: FormatRecordV3}
_FORMAT_MAGIC = const(FormatRecordV3, "magic")

#: The stored code of each lifecycle state (:class:`~ulog_disk.log.lifecycle.State` names them), in
#: the meta record here and in the journal's EVENT records. Keyed by the state, which is its
#: name as a string too: ``STATES["live"]`` works.
STATES: dict[str, int] = {State.CONSTRUCTED: 1, State.LIVE: 2, State.PRESUSPENDED: 3, State.SUSPENDED: 4,
                          State.DESTROYED: 5}
assert set(STATES) == set(State), "every lifecycle state has a stored code"
FLAG_RESUMED = 0x0001
#: Another instance adopted this one's state: it must never become the uuid's newest again.
FLAG_SUPERSEDED = 0x0002
_KNOWN_FLAGS = FLAG_RESUMED | FLAG_SUPERSEDED

#: ``record`` of ``meta.<luid>``: an instance's identity, constructor, geometry and lifecycle.
MetaRecordV1 = c.Struct(
    "magic" / c.Const(b"ULGM"),          # 0
    "version" / c.Const(RECORD_VERSION, c.Int16ul),   # 4
    "flags" / c.Int16ul,                 # 6: bit 0 resumed, bit 1 superseded; others 0
    "luid" / c.Int64ul,                  # 8
    "region_size" / c.Int64ul,           # 16: sectors
    "region_count" / c.Int64ul,          # 24
    "generation" / c.Int64ul,            # 32: per-uuid generation of the last resumed commit
    "cursor" / c.Int64ul,                # 40: recovery cursor
    "commit_seq" / c.Int64ul,            # 48: bumped by every write of this record (journal rule)
    "committed_at" / c.Float64l,         # 56: unix time of the last commit, 0.0 before
    "state" / c.Enum(c.Int8ul, **{str(name): code for name, code in STATES.items()}),  # 64
    "reserved" / c.Const(bytes(7)),      # 65
    "uuid" / c.PascalString(c.Int8ul, "latin-1"),   # 72
    "log_type" / c.PascalString(c.Int8ul, "utf-8"),
    "boot_id" / c.PascalString(c.Int8ul, "utf-8"),
    "ctr" / c.PascalString(c.Int16ul, "utf-8"),
    c.Terminated,
)

#: ``record`` of ``retained.meta``: the state a uuid's last instance left behind at DTR.
RetainedRecordV1 = c.Struct(
    "magic" / c.Const(b"ULGR"),          # 0
    "version" / c.Const(RECORD_VERSION, c.Int16ul),   # 4
    "reserved" / c.Const(0, c.Int16ul),  # 6
    "generation" / c.Int64ul,            # 8
    "region_count" / c.Int64ul,          # 16
    "source_luid" / c.Int64ul,           # 24
    "committed_at" / c.Float64l,         # 32
    "uuid" / c.PascalString(c.Int8ul, "latin-1"),  # 40
    c.Terminated,
)

#: Key of ``clean.*`` / ``sync.*``: the chunk index, big-endian so keys sort by index.
ChunkKey = c.Int32ub

#: Layout 2: what follows every value of the environment (a record's bytes, a chunk's bitmap
#: bytes). CRC-32 (zlib's, the IEEE polynomial) of the sub-database name (empty for the main
#: database), the key and the bytes, in that order, so a value that is damaged, or whole but
#: under another name or key (another instance's, the other bitmap's, another index's), fails it.
ValueChecksum = c.Int32ul
CHECKSUM_SIZE = ValueChecksum.sizeof()

#: Layout 3: ``checkpoint`` of ``meta.<luid>``: which journal the instance's stored state follows
#: and up to where: every record of the instance in that journal before ``position`` is in its
#: sub-databases, every record at or after it is not.
CheckpointRecordV1 = c.Struct(
    "magic" / c.Const(b"ULGC"),          # 0
    "version" / c.Const(RECORD_VERSION, c.Int16ul),   # 4
    "reserved" / c.Const(0, c.Int16ul),  # 6
    "journal_id" / c.Bytes(16),          # 8: the journal's id (every segment header carries it)
    "position" / c.Int64ul,              # 24
    c.Terminated,
)
CHECKPOINT_KEY = b"checkpoint"
_CHECKPOINT = flat_struct(CheckpointRecordV1)
_CHECKPOINT_MAGIC = const(CheckpointRecordV1, "magic")

#: Layout 2 only (read to be migrated): first bytes of ``journal.<luid>``: the commit it follows.
JournalHeaderV1 = c.Struct(
    "magic" / c.Const(b"ULGJ"),          # 0
    "version" / c.Const(RECORD_VERSION, c.Int16ul),   # 4
    "record_size" / c.Const(16, c.Int16ul),  # 6
    "luid" / c.Int64ul,                  # 8
    "commit_seq" / c.Int64ul,            # 16: the meta's commit_seq these ops follow
)
JOURNAL_HEADER_SIZE = JournalHeaderV1.sizeof()

#: One journal record: an op code (``OP_*`` of :mod:`ulog_disk.storage.base`) and its region.
JournalRecordV1 = c.Struct(
    "op" / c.Int8ul,                     # 0: 1 mark, 2 clear, 3 set in sync, 4 set out of sync
    "reserved" / c.Const(bytes(7)),      # 1
    "region" / c.Int64ul,                # 8
)
JOURNAL_RECORD_SIZE = JournalRecordV1.sizeof()
JOURNAL_OPS = frozenset({OP_MARK, OP_CLEAR, OP_SET_SYNC, OP_SET_NOSYNC})

assert JOURNAL_HEADER_SIZE == 24 and JOURNAL_RECORD_SIZE == 16

_JOURNAL_RECORD = flat_struct(JournalRecordV1)
_NO_RESERVED = bytes(7)
_JournalHeaderC = JournalHeaderV1.compile()
# Compiled forms of the records (same definitions, generated code) for encoding: a commit
# encodes a meta record, and that should cost microseconds, not a tenth of a millisecond.
# Decoding keeps the interpreted forms: construct 2.10's compiled strings accept a record cut
# short, and decoding happens at start-up only.
_COMPILED = {id(s): s.compile() for s in (FormatRecordV3, MetaRecordV1, RetainedRecordV1)}


_PREFIX = flat_struct(_Prefix)
#: The magic of each record layout (``_parse`` checks it first).
_MAGICS: dict[int, bytes] = {}


def _check_prefix(data: bytes, magic: bytes, what: str, known: tuple[int, ...]) -> int:
    """Refuse bytes that are not ``what`` or are of a version this code does not know."""
    if len(data) < _PREFIX.size:
        raise StoreFormatError(f"{what} of {len(data)} bytes is too short")
    found, version = _PREFIX.unpack_from(data)
    if found != magic:
        raise StoreFormatError(f"{what} has magic {found!r}, expected {magic!r}")
    if version not in known:
        raise UnknownVersionError(
            f"{what} is of version {version}; this ulog-disk reads only version "
            f"{' and '.join(map(str, known))}: refusing to read it"
        )
    return int(version)


def _parse(layout: c.Struct, data: bytes, what: str,
           known: tuple[int, ...] = (RECORD_VERSION,)) -> c.Container:
    magic = _MAGICS.get(id(layout))
    if magic is None:
        magic = _MAGICS[id(layout)] = const(layout, "magic")
    _check_prefix(data, magic, what, known)
    try:
        return layout.parse(data)
    except (c.ConstructError, ValueError, struct.error) as exc:  # ValueError: bad UTF-8/latin-1
        raise StoreFormatError(f"undecodable {what}: {exc}") from exc


def _build(layout: c.Construct, what: str, **fields: object) -> bytes:
    try:
        return _COMPILED[id(layout)].build(fields)
    except (c.ConstructError, ValueError, struct.error) as exc:
        raise StoreFormatError(f"cannot encode {what}: {exc}") from exc


@dataclass(slots=True)
class FormatRecord:
    chunk_bytes: int
    uuid: str
    created_at: float = 0.0
    #: The layout version: what this code writes is always :data:`LAYOUT_VERSION`.
    version: int = LAYOUT_VERSION

    @property
    def sealed(self) -> bool:
        """Whether the environment's values carry a checksum (layout 2 on)."""
        return self.version >= 2

    def encode(self) -> bytes:
        if self.version != LAYOUT_VERSION:
            raise StoreFormatError(f"layout version {self.version} is read, never written")
        return _build(FormatRecordV3, "format record", chunk_bytes=self.chunk_bytes, uuid=self.uuid,
                      created_at=self.created_at)

    @classmethod
    def decode(cls, data: bytes) -> FormatRecord:
        version = _check_prefix(data, _FORMAT_MAGIC, "format record", LAYOUT_VERSIONS_READ)
        p = _decode_format_fast(data) or _parse(_FORMAT_RECORDS[version], data, "format record",
                                                LAYOUT_VERSIONS_READ)
        if p.chunk_bytes <= 0:
            raise StoreFormatError(f"format record has chunk size {p.chunk_bytes}")
        return cls(chunk_bytes=p.chunk_bytes, uuid=p.uuid, created_at=p.created_at, version=p.version)


_INSTANCE_FIELDS = fields(InstanceRecord)


@dataclass(slots=True)
class MetaRecord(InstanceRecord):
    """An :class:`InstanceRecord` as stored, plus the commit sequence of the journal rule."""

    commit_seq: int = 0
    version: int = RECORD_VERSION

    @classmethod
    def from_instance(cls, rec: InstanceRecord, commit_seq: int) -> MetaRecord:
        return cls(**{f.name: getattr(rec, f.name) for f in _INSTANCE_FIELDS}, commit_seq=commit_seq)

    def instance(self) -> InstanceRecord:
        return InstanceRecord(**{f.name: getattr(self, f.name) for f in _INSTANCE_FIELDS})

    def encode(self) -> bytes:
        if self.state not in STATES:
            raise StoreFormatError(f"unknown lifecycle state {self.state!r}")
        if not 0 < self.region_count <= MAX_REGION_COUNT:
            raise StoreFormatError(f"region count {self.region_count} out of range")
        try:
            return _META_FIXED.pack(
                _META_MAGIC, RECORD_VERSION,
                (FLAG_RESUMED if self.resumed else 0) | (FLAG_SUPERSEDED if self.superseded else 0),
                self.luid, self.region_size, self.region_count, self.generation, self.cursor,
                self.commit_seq, self.committed_at, STATES[self.state], _META_RESERVED,
            ) + _meta_strings(self.uuid, self.log_type, self.boot_id, self.ctr)
        except (struct.error, ValueError, OverflowError):
            pass  # the construct definition says what is wrong, below
        return _build(
            MetaRecordV1, "meta record",
            flags=(FLAG_RESUMED if self.resumed else 0) | (FLAG_SUPERSEDED if self.superseded else 0),
            luid=self.luid, region_size=self.region_size,
            region_count=self.region_count, generation=self.generation, cursor=self.cursor,
            commit_seq=self.commit_seq, committed_at=self.committed_at, state=self.state,
            uuid=self.uuid, log_type=self.log_type, boot_id=self.boot_id, ctr=self.ctr,
        )

    @classmethod
    def decode(cls, data: bytes) -> MetaRecord:
        p = _decode_meta_fast(data) or _parse(MetaRecordV1, data, "meta record")
        if p.flags & ~_KNOWN_FLAGS:
            raise StoreFormatError(f"meta record has unknown flags {p.flags:#x}")
        if not isinstance(p.state, str) or p.state not in STATES:
            raise StoreFormatError(f"meta record has unknown lifecycle state {int(p.state)}")
        if not 0 < p.region_count <= MAX_REGION_COUNT:
            raise StoreFormatError(f"meta record has region count {p.region_count}")
        return cls(
            uuid=p.uuid, luid=p.luid, ctr=p.ctr, log_type=p.log_type, region_size=p.region_size,
            region_count=p.region_count, state=str(p.state), generation=p.generation,
            cursor=p.cursor, boot_id=p.boot_id, resumed=bool(p.flags & FLAG_RESUMED),
            superseded=bool(p.flags & FLAG_SUPERSEDED),
            committed_at=p.committed_at, commit_seq=p.commit_seq, version=p.version,
        )


# Every commit writes a meta record: its fixed part is packed with the struct generated from
# MetaRecordV1 and its strings (which do not change between commits) are encoded once, by the
# length prefixes and encodings MetaRecordV1 gives them (tests/test_store_format.py checks the
# bytes against construct for any record, and the golden vectors).
_META_FIXED = flat_struct(MetaRecordV1, prefix=True)
_META_MAGIC = const(MetaRecordV1, "magic")
_META_RESERVED = const(MetaRecordV1, "reserved")
#: (length prefix bytes, byte order, encoding) of the strings after the fixed part, in order.
_META_STRINGS = tuple(
    (sub.subcon.subcon.lengthfield.sizeof(), "little" if sub.subcon.subcon.lengthfield.fmtstr[0] == "<"
     else "big", sub.subcon.encoding)
    for sub in MetaRecordV1.subcons if isinstance(getattr(sub, "subcon", None), c.StringEncoded)
)
assert len(_META_STRINGS) == 4


_STATE_NAMES = {code: name for name, code in STATES.items()}


class _Fields:
    """A record's fields by name, as construct's Container gives them (the fast decoder's)."""

    def __init__(self, **fields: object):
        self.__dict__.update(fields)


def _decode_meta_fast(data: bytes) -> _Fields | None:
    """A meta record decoded by the struct and string forms generated from MetaRecordV1 (a
    restart decodes one per instance; construct takes ~0.3 ms), or None when anything is not
    exactly as the definition says: construct then decodes it, and says what is wrong."""
    fixed = _META_FIXED.size
    if len(data) < fixed:
        return None
    (magic, version, flags, luid, region_size, region_count, generation, cursor, commit_seq, committed_at,
     state, reserved) = _META_FIXED.unpack_from(data)
    name = _STATE_NAMES.get(state)
    if magic != _META_MAGIC or version != RECORD_VERSION or reserved != _META_RESERVED or name is None:
        return None
    strings = []
    at = fixed
    try:
        for prefix, order, encoding in _META_STRINGS:
            n = int.from_bytes(data[at : at + prefix], order)
            at += prefix
            if len(data) < at + n:
                return None
            strings.append(bytes(data[at : at + n]).decode(encoding))
            at += n
    except UnicodeDecodeError:
        return None
    if at != len(data):  # c.Terminated
        return None
    uuid, log_type, boot_id, ctr = strings
    return _Fields(version=version, flags=flags, luid=luid, region_size=region_size,
                   region_count=region_count, generation=generation, cursor=cursor, commit_seq=commit_seq,
                   committed_at=committed_at, state=name, uuid=uuid, log_type=log_type, boot_id=boot_id,
                   ctr=ctr)


# The format record's fixed part and its uuid's length prefix, from its definition (the same in
# every layout but for the version; tests/test_store_format.py checks against construct).
_FORMAT_FIXED = flat_struct(FormatRecordV3, prefix=True)
_FORMAT_RESERVED = (const(FormatRecordV3, "reserved"), const(FormatRecordV3, "reserved2"))
_FORMAT_UUID = next(sub.subcon for sub in FormatRecordV3.subcons if sub.name == "uuid")
assert _FORMAT_UUID.subcon.lengthfield.sizeof() == 1 and _FORMAT_UUID.encoding == "latin-1"


def _decode_format_fast(data: bytes) -> _Fields | None:
    """A format record decoded by the struct generated from its definition (a restart reads one
    per store, twice: construct takes ~50 µs each), or None when anything is not exactly as the
    definition says: construct then decodes it, and says what is wrong."""
    fixed = _FORMAT_FIXED.size
    if len(data) <= fixed or len(data) != fixed + 1 + data[fixed]:  # one length byte; c.Terminated
        return None
    magic, version, reserved, chunk_bytes, reserved2, created_at = _FORMAT_FIXED.unpack_from(data)
    if magic != _FORMAT_MAGIC or version not in _FORMAT_RECORDS or (reserved, reserved2) != _FORMAT_RESERVED:
        return None
    return _Fields(version=version, chunk_bytes=chunk_bytes, created_at=created_at,
                   uuid=bytes(data[fixed + 1:]).decode("latin-1"))


@functools.lru_cache(maxsize=1024)
def _meta_strings(uuid: str, log_type: str, boot_id: str, ctr: str) -> bytes:
    parts = []
    for text, (prefix, order, encoding) in zip((uuid, log_type, boot_id, ctr), _META_STRINGS, strict=True):
        raw = text.encode(encoding)
        parts.append(len(raw).to_bytes(prefix, order) + raw)  # OverflowError: too long
    return b"".join(parts)


@dataclass(slots=True)
class RetainedRecord:
    uuid: str
    generation: int
    region_count: int
    source_luid: int
    committed_at: float = 0.0
    version: int = RECORD_VERSION

    def encode(self) -> bytes:
        if not 0 < self.region_count <= MAX_REGION_COUNT:
            raise StoreFormatError(f"region count {self.region_count} out of range")
        return _build(
            RetainedRecordV1, "retained record", generation=self.generation,
            region_count=self.region_count, source_luid=self.source_luid,
            committed_at=self.committed_at, uuid=self.uuid,
        )

    @classmethod
    def decode(cls, data: bytes) -> RetainedRecord:
        p = _parse(RetainedRecordV1, data, "retained record")
        if not 0 < p.region_count <= MAX_REGION_COUNT:
            raise StoreFormatError(f"retained record has region count {p.region_count}")
        return cls(uuid=p.uuid, generation=p.generation, region_count=p.region_count,
                   source_luid=p.source_luid, committed_at=p.committed_at, version=p.version)


@dataclass(slots=True, frozen=True)
class CheckpointRecord:
    journal_id: bytes
    position: int
    version: int = RECORD_VERSION

    def encode(self) -> bytes:
        if len(self.journal_id) != 16:
            raise StoreFormatError(f"journal id of {len(self.journal_id)} bytes (must be 16)")
        return _CHECKPOINT.pack(_CHECKPOINT_MAGIC, RECORD_VERSION, 0, self.journal_id, self.position)

    @classmethod
    def decode(cls, data: bytes) -> CheckpointRecord:
        if len(data) == _CHECKPOINT.size:
            magic, version, reserved, journal_id, position = _CHECKPOINT.unpack(data)
            if magic == _CHECKPOINT_MAGIC and version == RECORD_VERSION and reserved == 0:
                return cls(journal_id=journal_id, position=position, version=version)
        p = _parse(CheckpointRecordV1, data, "checkpoint record")  # says what is wrong
        return cls(journal_id=p.journal_id, position=p.position, version=p.version)


def checkpoint_value(db_name: bytes, rec: CheckpointRecord) -> bytes:
    """The stored value of a ``checkpoint`` key of ``meta.<luid>`` (sealed)."""
    return seal(db_name, CHECKPOINT_KEY, rec.encode())


def read_checkpoint_value(db_name: bytes, value: bytes) -> CheckpointRecord:
    return CheckpointRecord.decode(unseal(db_name, CHECKPOINT_KEY, value, what="checkpoint record"))


@dataclass(slots=True)
class JournalHeader:
    luid: int
    commit_seq: int
    version: int = RECORD_VERSION

    def encode(self) -> bytes:
        return _JournalHeaderC.build(dict(luid=self.luid, commit_seq=self.commit_seq))

    @classmethod
    def decode(cls, data: bytes) -> JournalHeader:
        if len(data) < JOURNAL_HEADER_SIZE:
            raise StoreFormatError(f"journal header of {len(data)} bytes is too short")
        p = _parse(JournalHeaderV1, data[:JOURNAL_HEADER_SIZE], "journal header")
        return cls(luid=p.luid, commit_seq=p.commit_seq, version=p.version)


#: ChunkKey as struct: a restore reads two keys per instance at least, a commit writes them.
_CHUNK_KEY = flat_struct(ChunkKey)


def encode_chunk_key(index: int) -> bytes:
    return _CHUNK_KEY.pack(index)


_CHECKSUM = flat_struct(ValueChecksum)
#: The main database's name in a checksum.
MAIN_DB = b""


def value_checksum(db_name: bytes, key: bytes, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(key, zlib.crc32(db_name)))


def seal(db_name: bytes, key: bytes, data: bytes) -> bytes:
    """The stored value (layout 2) of ``data`` under ``db_name``/``key``: the bytes, then their
    :data:`ValueChecksum`."""
    return data + _CHECKSUM.pack(value_checksum(db_name, key, data))


def unseal(db_name: bytes, key: bytes, value: bytes, sealed: bool = True, what: str | None = None) -> bytes:
    """The bytes of a stored value; :class:`StoreFormatError` if its checksum fails.

    ``sealed=False`` reads a layout-1 value (the bytes only, nothing to verify).
    """
    if not sealed:
        return bytes(value)
    where = db_name.decode("latin-1") or "the main database"
    what = what or f"value {key.decode('latin-1')!r}"
    if len(value) < CHECKSUM_SIZE:
        raise StoreFormatError(f"{what} of {where} ({len(value)} bytes) has no room for its checksum")
    data = bytes(value[:-CHECKSUM_SIZE])
    (stored,) = _CHECKSUM.unpack_from(value, len(value) - CHECKSUM_SIZE)
    if stored != value_checksum(db_name, key, data):
        raise StoreFormatError(f"{what} of {where} fails its checksum (damaged, or not this "
                               f"sub-database's {what})")
    return data


def unseal_chunk(db_name: bytes, key: bytes, value: bytes, sealed: bool = True) -> bytes:
    """The bitmap bytes of a stored chunk value; :class:`StoreFormatError` if its checksum fails."""
    if sealed and len(value) >= CHECKSUM_SIZE:
        data = bytes(value[:-CHECKSUM_SIZE])
        if _CHECKSUM.unpack_from(value, len(value) - CHECKSUM_SIZE)[0] == value_checksum(db_name, key, data):
            return data
    index = _CHUNK_KEY.unpack(key)[0] if len(key) == _CHUNK_KEY.size else key.hex()
    return unseal(db_name, key, value, sealed, what=f"chunk {index}")


def format_value(rec: FormatRecord) -> bytes:
    """The stored value of the main database's ``format`` key (always the current layout, sealed)."""
    return seal(MAIN_DB, FORMAT_KEY, rec.encode())


def read_format_value(value: bytes) -> FormatRecord:
    """The format record of a stored ``format`` value: its own version says whether it is
    sealed (layout 2) or not (layout 1), and so whether the rest of the environment is."""
    version = _check_prefix(value, _FORMAT_MAGIC, "format record", LAYOUT_VERSIONS_READ)
    return FormatRecord.decode(unseal(MAIN_DB, FORMAT_KEY, value, version >= 2, what="format record"))


def record_value(db_name: bytes, record: bytes) -> bytes:
    """The stored value of a ``record`` key (meta or retained record, layout 2)."""
    return seal(db_name, RECORD_KEY, record)


def record_bytes(db_name: bytes, value: bytes, sealed: bool = True) -> bytes:
    """The record bytes of a stored ``record`` value, checksum verified."""
    return unseal(db_name, RECORD_KEY, value, sealed, what="record")


def decode_chunk_key(key: bytes) -> int:
    if len(key) != _CHUNK_KEY.size:
        raise StoreFormatError(f"chunk key of {len(key)} bytes (expected 4)")
    return _CHUNK_KEY.unpack(key)[0]


def encode_journal_ops(ops: Iterable[tuple[int, int]]) -> bytes:
    pack = _JOURNAL_RECORD.pack
    return b"".join([pack(op, _NO_RESERVED, region) for op, region in ops])


def decode_journal_ops(data: bytes) -> tuple[list[tuple[int, int]], int, str | None]:
    """The ops of a journal body, the length of its valid prefix, and why it stops early.

    Reading stops at a partial last record (a write cut short by ENOSPC) or at a record that is
    not a valid op (the zero-filled tail a host crash can leave; the journal does not matter
    after a host crash, see formats/store.md).
    """
    ops: list[tuple[int, int]] = []
    size = JOURNAL_RECORD_SIZE
    whole = len(data) - len(data) % size
    for offset in range(0, whole, size):
        op, reserved, region = _JOURNAL_RECORD.unpack_from(data, offset)
        if reserved != _NO_RESERVED:
            return ops, offset, f"invalid journal record at body offset {offset}"
        if op not in JOURNAL_OPS:
            return ops, offset, f"unknown journal op {op} at body offset {offset}"
        ops.append((op, region))
    if whole != len(data):
        return ops, whole, f"partial journal record of {len(data) - whole} bytes at the end"
    return ops, whole, None


# --- bitmaps in chunks ---------------------------------------------------------------------------


def bitmap_bytes(region_count: int) -> int:
    return (region_count + 7) // 8


def chunk_length(index: int, region_count: int, chunk_bytes: int) -> int:
    """The exact value length of chunk ``index``: whole chunks, the last one the remainder."""
    total = bitmap_bytes(region_count)
    return max(0, min(chunk_bytes, total - index * chunk_bytes))


def split_chunks(bitmap: bytes, region_count: int, chunk_bytes: int) -> dict[int, bytes]:
    """A whole bitmap (padded to ``bitmap_bytes(region_count)``) as chunk index → bytes."""
    total = bitmap_bytes(region_count)
    data = bytes(bitmap[:total]).ljust(total, b"\0")
    return {i: data[i * chunk_bytes : (i + 1) * chunk_bytes]
            for i in range(chunk_count(region_count, chunk_bytes))}


def assemble_chunks(chunks: Mapping[int, bytes], region_count: int, chunk_bytes: int) -> bytes:
    """Chunks → the whole bitmap; a missing chunk reads as zeros (dirty / out of sync).

    Raises :class:`StoreFormatError` when a chunk lies past the geometry or has the wrong
    length: chunks that do not match the meta's region count are damage, not data.
    """
    total = bitmap_bytes(region_count)
    count = chunk_count(region_count, chunk_bytes)
    out = bytearray(total)
    for index, value in chunks.items():
        if index >= count:
            raise StoreFormatError(
                f"chunk {index} lies past the {count} chunk(s) of {region_count} regions")
        want = chunk_length(index, region_count, chunk_bytes)
        if len(value) != want:
            raise StoreFormatError(
                f"chunk {index} holds {len(value)} bytes, {want} expected for {region_count} regions")
        out[index * chunk_bytes : index * chunk_bytes + want] = value
    return bytes(out)


def read_bitmap(db_name: bytes, values: Mapping[bytes, bytes], region_count: int, chunk_bytes: int,
                sealed: bool = True) -> bytes:
    """A whole bitmap from the raw key → value pairs of its sub-database ``db_name``: every
    checksum verified, then :func:`assemble_chunks`."""
    return assemble_chunks({decode_chunk_key(key): unseal_chunk(db_name, key, value, sealed)
                            for key, value in values.items()}, region_count, chunk_bytes)
