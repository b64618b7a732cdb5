"""What the daemons of a cluster multicast to each other, and the snapshot of a cluster state
(sent to a joining node, and kept on disk beside the cluster journal): the one definition, with
construct. ``formats/cluster.md`` describes the same bytes in prose beside golden vectors.

Every message starts with a 4-byte header (magic ``UC``, version, kind). The sender's node id is
not in the message: corosync delivers it with every message, and a message can only claim to be
from the node that sent it.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import construct as c
from bitarray import bitarray

from ..log.regionlog import bitmap_from_bytes
from ..protocol.geometry import MAX_REGION_COUNT
from .shared import (
    Close,
    ClusterState,
    Departed,
    Fenced,
    Flush,
    Input,
    NodeOpen,
    Open,
    Rebooted,
    ResyncWork,
    SetRegionSync,
    SharedLog,
)

#: 2: HELLO says whether its sender was left behind and which nodes its state names, RESYNC_WORK
#: which regions its sender prefers and its table's region count (version 1 had none of these).
MESSAGE_VERSION = 2
SNAPSHOT_VERSION = 1


class MessageError(ValueError):
    """Bytes that are not a message (or snapshot) of this version."""


class Kind(IntEnum):
    FLUSH = 1
    RESYNC_WORK = 2
    SET_REGION_SYNC = 3
    OPEN = 4
    CLOSE = 5
    DEPARTED = 6
    FENCED = 7
    REBOOTED = 8
    #: Not state: a member's view at a membership change (the state exchange's first step).
    HELLO = 16
    #: Not state: one piece of a snapshot being sent to the members that need it.
    STATE = 17
    #: Not state: the sender's cluster journal is durable up to an epoch.
    DURABLE = 18


#: Kinds that change the cluster state (applied, counted in the epoch, journaled).
STATE_KINDS = frozenset({Kind.FLUSH, Kind.RESYNC_WORK, Kind.SET_REGION_SYNC, Kind.OPEN, Kind.CLOSE,
                         Kind.DEPARTED, Kind.FENCED, Kind.REBOOTED})

Uuid = c.PascalString(c.Int8ul, "latin-1")
BootId = c.PascalString(c.Int8ul, "ascii")
Regions = c.PrefixedArray(c.Int16ul, c.Int64ul)

Header = c.Struct(
    "magic" / c.Const(b"UC"),
    "version" / c.Const(MESSAGE_VERSION, c.Int8ul),
    "kind" / c.Enum(c.Int8ul, Kind),
)

#: The bodies. ``token`` is the origin's number for the request it answers, so that it can tell
#: its own messages' results apart (0 for messages that answer no request).
Bodies = {
    Kind.FLUSH: c.Struct("token" / c.Int64ul, "uuid" / Uuid, "marks" / Regions, "clears" / Regions),
    Kind.RESYNC_WORK: c.Struct("token" / c.Int64ul, "uuid" / Uuid, "prefer" / Regions,
                               "limit" / c.Int64ul),
    Kind.SET_REGION_SYNC: c.Struct("token" / c.Int64ul, "uuid" / Uuid, "region" / c.Int64ul,
                                   "in_sync" / c.Flag),
    Kind.OPEN: c.Struct("token" / c.Int64ul, "uuid" / Uuid, "luid" / c.Int64ul, "boot_id" / BootId,
                        "region_count" / c.Int64ul, "in_sync" / c.Flag),
    Kind.CLOSE: c.Struct("token" / c.Int64ul, "uuid" / Uuid, "destroy" / c.Flag),
    Kind.DEPARTED: c.Struct("token" / c.Int64ul, "nodes" / c.PrefixedArray(c.Int16ul, c.Int32ul)),
    Kind.FENCED: c.Struct("token" / c.Int64ul, "node" / c.Int32ul),
    Kind.REBOOTED: c.Struct("token" / c.Int64ul, "boot_id" / BootId),
    Kind.HELLO: c.Struct(
        "round" / c.Int32ul,        # CRC-32 of the membership it answers (see round_of)
        "epoch" / c.Int64ul,
        "digest" / c.Int32ul,       # CRC-32 of the sender's snapshot: equal states need no transfer
        "current" / c.Flag,         # the sender's state was agreed in the membership before
        "boot_id" / BootId,
        "left_behind" / c.Flag,     # the sender stopped while other members went on
        "known" / c.PrefixedArray(c.Int16ul, c.Int32ul),  # the nodes the sender's state names
    ),
    Kind.STATE: c.Struct("round" / c.Int32ul, "piece" / c.GreedyBytes),
    Kind.DURABLE: c.Struct("epoch" / c.Int64ul),
}

Message = c.Struct(
    "header" / Header,
    "body" / c.Switch(lambda this: int(this.header.kind), {int(k): v for k, v in Bodies.items()}),
    c.Terminated,
)


@dataclass(frozen=True, slots=True)
class Decoded:
    kind: Kind
    fields: c.Container


# --- the hot kinds by hand, checked against the definition above (tests/test_cluster_messages.py):
# every FLUSH is encoded once and decoded by every member, every member's DURABLE by every other;
# construct takes 100-180 µs for each, struct a few.

_HEAD = struct.Struct("<2sBB")
_KINDS = frozenset(int(k) for k in Kind)
_MAGIC = b"UC"
#: What a message of this version starts with, kind aside.
_PREFIX = _MAGIC + bytes([MESSAGE_VERSION])
_V1_PREFIX = _MAGIC + b"\x01"
#: What version 2 added to RESYNC_WORK, as version 1 meant it: no preferred region, no limit.
_V1_RESYNC_WORK_TAIL = b"\0\0" + b"\xff" * 8
_STATE_KIND_CODES = frozenset(int(k) for k in STATE_KINDS)
_U64 = struct.Struct("<Q")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")


def _encode_flush(token: int, uuid: str, marks: Sequence[int], clears: Sequence[int]) -> bytes:
    raw = uuid.encode("latin-1")
    if len(raw) > 255 or len(marks) > 0xFFFF or len(clears) > 0xFFFF:
        raise MessageError("a FLUSH message's uuid or region lists are too long")
    head = _HEAD.pack(_MAGIC, MESSAGE_VERSION, Kind.FLUSH)
    return b"".join((head, _U64.pack(token), _U8.pack(len(raw)), raw,
                     struct.pack(f"<H{len(marks)}Q", len(marks), *marks),
                     struct.pack(f"<H{len(clears)}Q", len(clears), *clears)))


def _decode_flush(data: bytes) -> c.Container:
    try:
        (token,) = _U64.unpack_from(data, 4)
        n = data[12]
        pos = 13 + n
        if len(data) < pos:
            raise MessageError("a FLUSH message ends inside its uuid")
        uuid = data[13:pos].decode("latin-1")
        lists = []
        for _ in range(2):
            (count,) = _U16.unpack_from(data, pos)
            lists.append(list(struct.unpack_from(f"<{count}Q", data, pos + 2)))
            pos += 2 + 8 * count
    except (struct.error, IndexError):
        raise MessageError("a FLUSH message ends early") from None
    if pos != len(data):
        raise MessageError(f"a FLUSH message has {len(data) - pos} bytes after its end")
    return c.Container(token=token, uuid=uuid, marks=lists[0], clears=lists[1])


def _decode_durable(data: bytes) -> c.Container:
    if len(data) != 12:
        raise MessageError(f"a DURABLE message of {len(data)} bytes")
    return c.Container(epoch=_U64.unpack_from(data, 4)[0])


def encode(kind: Kind, **fields: object) -> bytes:
    if kind is Kind.FLUSH:
        return _encode_flush(fields["token"], fields["uuid"], fields["marks"], fields["clears"])  # type: ignore[arg-type]
    if kind is Kind.DURABLE:
        return _HEAD.pack(_MAGIC, MESSAGE_VERSION, Kind.DURABLE) + _U64.pack(fields["epoch"])  # type: ignore[arg-type]
    return Message.build({"header": {"kind": kind}, "body": fields})


def decode_stored(data: bytes) -> Decoded:
    """A state message as a cluster journal holds it: of this version, or of version 1 (journals
    written before version 2). A version-1 state message says what its version-2 form says:
    the layouts are the same but RESYNC_WORK's, which gained ``prefer`` (none, then) and
    ``limit`` (none: the largest u64)."""
    if len(data) >= 4 and data[:3] == _V1_PREFIX and data[3] in _STATE_KIND_CODES:
        body = data[4:] + (_V1_RESYNC_WORK_TAIL if data[3] == Kind.RESYNC_WORK else b"")
        data = _PREFIX + data[3:4] + body
    return decode(data)


def decode(data: bytes) -> Decoded:
    if len(data) >= 4 and data[:3] == _PREFIX:
        if data[3] == Kind.FLUSH:
            return Decoded(Kind.FLUSH, _decode_flush(data))
        if data[3] == Kind.DURABLE:
            return Decoded(Kind.DURABLE, _decode_durable(data))
    if len(data) >= 4 and data[:3] == _PREFIX and data[3] not in _KINDS:
        raise MessageError(f"cluster message of unknown kind {data[3]}")
    try:
        parsed = Message.parse(data)
    except (c.ConstructError, UnicodeDecodeError) as exc:
        raise MessageError(f"not a cluster message of version {MESSAGE_VERSION}: {exc}") from None
    if parsed.body is None:
        raise MessageError(f"cluster message of unknown kind {int(parsed.header.kind)}")
    return Decoded(Kind(int(parsed.header.kind)), parsed.body)


def as_input(sender: int, message: Decoded) -> Input:
    """The state input a state message stands for (its sender being ``sender``)."""
    f = message.fields
    kind = message.kind
    if kind is Kind.FLUSH:
        return Flush(sender, f.uuid, tuple(f.marks), tuple(f.clears))
    if kind is Kind.RESYNC_WORK:
        return ResyncWork(sender, f.uuid, tuple(f.prefer), f.limit)
    if kind is Kind.SET_REGION_SYNC:
        return SetRegionSync(sender, f.uuid, f.region, bool(f.in_sync))
    if kind is Kind.OPEN:
        return Open(sender, f.uuid, f.luid, f.boot_id, f.region_count, bool(f.in_sync))
    if kind is Kind.CLOSE:
        return Close(sender, f.uuid, bool(f.destroy))
    if kind is Kind.DEPARTED:
        return Departed(tuple(f.nodes))
    if kind is Kind.FENCED:
        return Fenced(f.node)
    if kind is Kind.REBOOTED:
        return Rebooted(sender, f.boot_id)
    raise MessageError(f"a {kind.name} message is not a state input")


def round_of(members: list[tuple[int, int]]) -> int:
    """The state exchange's name for a membership: CRC-32 of its (node id, pid) pairs, sorted."""
    data = b"".join(n.to_bytes(4, "little") + p.to_bytes(4, "little") for n, p in sorted(members))
    return zlib.crc32(data)


# --- the snapshot ---------------------------------------------------------------------------------

_Bitmap = c.Prefixed(c.Int32ul, c.GreedyBytes)

LogV1 = c.Struct(
    "uuid" / Uuid,
    "region_count" / c.Int64ul,
    "sync" / _Bitmap,
    "released" / _Bitmap,
    "marks" / c.PrefixedArray(c.Int32ul, c.Struct("node" / c.Int32ul, "bits" / _Bitmap)),
    "held" / c.PrefixedArray(c.Int32ul, c.Struct("node" / c.Int32ul, "bits" / _Bitmap)),
    "recovering" / c.PrefixedArray(c.Int32ul, c.Struct("region" / c.Int64ul, "node" / c.Int32ul)),
    "cursor" / c.PrefixedArray(c.Int32ul, c.Struct("node" / c.Int32ul, "cursor" / c.Int64ul)),
    "opened" / c.PrefixedArray(c.Int32ul, c.Struct("node" / c.Int32ul, "luid" / c.Int64ul,
                                                   "boot_id" / BootId)),
)

SnapshotBodyV1 = c.Struct(
    "magic" / c.Const(b"ULCS"),
    "version" / c.Const(SNAPSHOT_VERSION, c.Int16ul),
    "reserved" / c.Const(0, c.Int16ul),
    "epoch" / c.Int64ul,
    "unfenced" / c.PrefixedArray(c.Int32ul, c.Int32ul),
    "logs" / c.PrefixedArray(c.Int32ul, LogV1),
)

#: The snapshot and a CRC-32 of everything before it.
SnapshotV1 = c.Struct(
    "body" / c.RawCopy(SnapshotBodyV1),
    "crc" / c.Checksum(c.Int32ul, lambda data: zlib.crc32(data), c.this.body.data),
)


def snapshot_fields(state: ClusterState, bitmap: Callable[[bitarray], Any] = bitarray.tobytes,
                    bitmap_key: str = "bits") -> dict[str, Any]:
    """The snapshot's fields in its own order (logs by uuid, nodes and regions ascending).

    ``bitmap`` renders each bitmap: its bytes for the snapshot itself; the format's vectors give
    the regions whose bit is 1 (under ``bitmap_key``), which a reader can check by eye."""
    logs = []
    for uuid in sorted(state.logs):
        shared = state.logs[uuid]
        logs.append({
            "uuid": uuid,
            "region_count": shared.region_count,
            "sync": bitmap(shared.sync),
            "released": bitmap(shared.released),
            "marks": [{"node": n, bitmap_key: bitmap(b)} for n, b in sorted(shared.marks.items())],
            "held": [{"node": n, bitmap_key: bitmap(b)} for n, b in sorted(shared.held.items())],
            "recovering": [{"region": r, "node": n} for r, n in sorted(shared.recovering.items())],
            "cursor": [{"node": n, "cursor": v} for n, v in sorted(shared.cursor.items())],
            "opened": [{"node": n, "luid": o.luid, "boot_id": o.boot_id}
                       for n, o in sorted(shared.opened.items())],
        })
    return {"epoch": state.epoch, "unfenced": list(state.unfenced), "logs": logs}


def encode_snapshot(state: ClusterState) -> bytes:
    return SnapshotV1.build({"body": {"value": snapshot_fields(state)}})


def digest(snapshot: bytes) -> int:
    """What tells two states apart in a HELLO: the snapshot's own CRC-32 of its body (a CRC over
    the whole snapshot, its CRC included, would be the same constant for every snapshot)."""
    return int.from_bytes(snapshot[-4:], "little")


def decode_snapshot(data: bytes) -> ClusterState:
    try:
        parsed = SnapshotV1.parse(data)
    except (c.ConstructError, UnicodeDecodeError) as exc:
        raise MessageError(f"not a cluster snapshot of version {SNAPSHOT_VERSION}: {exc}") from None
    body = parsed.body.value
    state = ClusterState(epoch=body.epoch, unfenced=list(body.unfenced))
    for entry in body.logs:
        count = entry.region_count
        if not 0 < count <= MAX_REGION_COUNT:
            raise MessageError(f"cluster snapshot: log {entry.uuid!r} of {count} regions")
        if entry.uuid in state.logs:
            raise MessageError(f"cluster snapshot: log {entry.uuid!r} twice")
        size = (count + 7) // 8
        maps = [entry.sync, entry.released, *(m.bits for m in entry.marks), *(m.bits for m in entry.held)]
        if any(len(bitmap) != size for bitmap in maps):
            raise MessageError(f"cluster snapshot: log {entry.uuid!r}: a bitmap not of {size} bytes")
        if any(not 0 <= r.region < count for r in entry.recovering):
            raise MessageError(f"cluster snapshot: log {entry.uuid!r}: a recovery past its end")

        def bits(data: bytes, count: int = count) -> bitarray:
            return bitmap_from_bytes(bytes(data), count)

        sync = bits(entry.sync)
        shared = SharedLog(
            uuid=entry.uuid, region_count=count, sync=sync, sync_count=sync.count(1),
            marks={m.node: bits(m.bits) for m in entry.marks},
            held={m.node: bits(m.bits) for m in entry.held},
            released=bits(entry.released),
            recovering={r.region: r.node for r in entry.recovering},
            cursor={x.node: x.cursor for x in entry.cursor},
            opened={o.node: NodeOpen(o.luid, o.boot_id) for o in entry.opened},
        )
        problems = shared.check()
        if problems:
            raise MessageError(f"inconsistent cluster snapshot: {'; '.join(problems)}")
        state.logs[entry.uuid] = shared
    return state
