"""The dm-log-userspace wire format, defined once.

Everything that knows a byte offset lives here, written as construct definitions (see
``formats/wire.md`` for the same layout in prose, with the kernel sources it comes from).
The rest of the package sees only :class:`Request`, :class:`Reply` and the payload helpers.

Frame, as the transports hand it over (the netlink transport strips the ``nlmsghdr``)::

    cn_msg (20 bytes) | dm_ulog_request header (160 bytes) | data (data_size bytes)

All integers are in host byte order: the frames never leave the machine.

Decoding is sans-I/O and never raises anything but :class:`FrameError`, whose
``answerable`` tells whether the frame carried enough of a header to address an error
reply to the waiting kernel caller.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import construct as c

from .fastpath import concat_structs, flat_struct

CN_IDX_DM = 7
CN_VAL_DM_USERSPACE_LOG = 1
NETLINK_CONNECTOR = 11
NLMSG_DONE = 3

DM_ULOG_REQUEST_VERSION = 3
DM_ULOG_REQUEST_MASK = 0xFF
DM_UUID_LEN = 129
#: The kernel builds every request in one 512-byte buffer holding cn_msg + header + data.
DM_ULOG_PREALLOCED_SIZE = 512
HEADER_SIZE = 160
CN_MSG_SIZE = 20
NLMSGHDR_SIZE = 16
MAX_REQUEST_DATA = DM_ULOG_PREALLOCED_SIZE - CN_MSG_SIZE - HEADER_SIZE  # 332
#: Reply payload limit imposed by the connector (cn_msg.len is a u16, nlmsg payload <= 16384).
CONNECTOR_MAX_MSG_SIZE = 16384
MAX_REGIONS_PER_GROUP = 32


class RequestType(enum.IntEnum):
    CTR = 1
    DTR = 2
    PRESUSPEND = 3
    POSTSUSPEND = 4
    RESUME = 5
    GET_REGION_SIZE = 6
    IS_CLEAN = 7
    IN_SYNC = 8
    FLUSH = 9
    MARK_REGION = 10
    CLEAR_REGION = 11
    GET_RESYNC_WORK = 12
    SET_REGION_SYNC = 13
    GET_SYNC_COUNT = 14
    STATUS_INFO = 15
    STATUS_TABLE = 16
    IS_REMOTE_RECOVERING = 17


# --- layouts ---------------------------------------------------------------------------------

NlMsgHdr = c.Struct(
    "len" / c.Int32un,
    "type" / c.Int16un,
    "flags" / c.Int16un,
    "seq" / c.Int32un,
    "pid" / c.Int32un,
)

CnMsg = c.Struct(
    "idx" / c.Int32un,
    "val" / c.Int32un,
    "seq" / c.Int32un,
    "ack" / c.Int32un,
    "len" / c.Int16un,
    "flags" / c.Int16un,
)

UlogHeader = c.Struct(
    "luid" / c.Int64un,
    "uuid" / c.Bytes(DM_UUID_LEN),
    "padding" / c.Bytes(3),
    "version" / c.Int32un,
    "error" / c.Int32sn,
    "seq" / c.Int32un,
    "request_type" / c.Int32un,
    "data_size" / c.Int32un,
)

assert CnMsg.sizeof() == CN_MSG_SIZE
assert UlogHeader.sizeof() == HEADER_SIZE
assert NlMsgHdr.sizeof() == NLMSGHDR_SIZE


_CN = flat_struct(CnMsg)
_HDR = flat_struct(UlogHeader)
_NLH = flat_struct(NlMsgHdr)
#: cn_msg and the request header as one ``struct`` (both in host order, no padding between).
_CN_HDR = concat_structs(_CN, _HDR)
_CN_HDR_unpack_from = _CN_HDR.unpack_from
_CN_HDR_pack = _CN_HDR.pack
_FRAME_HEAD = CN_MSG_SIZE + HEADER_SIZE
_KINDS: dict[int, RequestType] = {int(k): k for k in RequestType}


class FrameError(ValueError):
    """A frame that is not a well-formed request.

    ``answerable`` is set when the frame carried a complete header, so an error reply can
    be matched by the kernel (``request`` then holds what was decoded).
    """

    def __init__(self, reason: str, request: Request | None = None):
        super().__init__(reason)
        self.reason = reason
        self.request = request

    @property
    def answerable(self) -> bool:
        return self.request is not None


@dataclass(slots=True)
class Request:
    """One decoded kernel request. ``uuid`` is latin-1 decoded so every byte round-trips."""

    luid: int
    uuid: str
    version: int
    seq: int
    request_type: int
    data: bytes
    cn_seq: int = 0
    raw_type: int = 0
    #: Bytes 137..139 of the header and a possibly non-zero error field are kept only so that
    #: a decoded frame re-encodes byte for byte (golden vectors).
    padding: bytes = b"\0\0\0"
    error: int = 0

    @property
    def kind(self) -> RequestType | None:
        return _KINDS.get(self.request_type)

    @property
    def key(self) -> tuple[str, int]:
        return (self.uuid, self.luid)


@dataclass(slots=True)
class Reply:
    """What goes back to the kernel for one request.

    ``ack`` selects the connector ACK form (``cn_msg.len == 0``, positive errno in
    ``cn_msg.ack``, matched on ``cn_msg.seq``); otherwise the full header is echoed with
    ``error`` and ``data``.
    """

    request: Request
    error: int = 0
    data: bytes = b""
    ack: bool = False


def uuid_to_bytes(uuid: str) -> bytes:
    return uuid.encode("latin-1")


def decode_frame(frame: bytes | bytearray | memoryview) -> Request:
    """Connector payload (cn_msg + header + data) → :class:`Request`.

    Raises :class:`FrameError`; it is answerable when the 160-byte header is complete.
    """
    if type(frame) is not bytes:
        frame = bytes(frame)
    size = len(frame)
    if size >= _FRAME_HEAD:
        # Every request's path: cn_msg and header in one unpack, the checks inline.
        (idx, val, cn_seq, _ack, cn_len, _flags, luid, uuid_field, padding, version, error, seq,
         raw_type, data_size) = _CN_HDR_unpack_from(frame)
        if idx == CN_IDX_DM and val == CN_VAL_DM_USERSPACE_LOG and cn_len == HEADER_SIZE + data_size \
                and data_size <= size - _FRAME_HEAD:
            nul = uuid_field.find(0)
            if nul >= 0 and uuid_field.count(0) == DM_UUID_LEN - nul:
                return Request(luid, uuid_field[:nul].decode("latin-1"), version, seq,
                               raw_type & DM_ULOG_REQUEST_MASK,
                               frame[_FRAME_HEAD:_FRAME_HEAD + data_size],
                               cn_seq, raw_type, padding, error)
    return _decode_slowly(frame)


_HDR_unpack_from = _HDR.unpack_from


def peek_frame(frame: bytes | bytearray | memoryview) -> tuple[tuple[str, int], int] | None:
    """A frame's ((uuid, luid), request type), read as :func:`decode_frame` reads them, from the
    request header alone and unchecked; None when the frame has no whole header. For telling
    whose a frame is before deciding who decodes it (cluster mode takes its logs' frames)."""
    if len(frame) < _FRAME_HEAD:
        return None
    luid, uuid_field, _, _, _, _, raw_type, _ = _HDR_unpack_from(frame, CN_MSG_SIZE)
    nul = uuid_field.find(0)
    return ((uuid_field if nul < 0 else uuid_field[:nul]).decode("latin-1"), luid), \
        raw_type & DM_ULOG_REQUEST_MASK


def _decode_slowly(frame: bytes) -> Request:
    """:func:`decode_frame` for a frame that fails one of its checks: which one, in order."""
    if len(frame) < CN_MSG_SIZE:
        raise FrameError(f"frame of {len(frame)} bytes is shorter than a cn_msg")
    idx, val, cn_seq, _ack, cn_len, _flags = _CN.unpack_from(frame, 0)
    if (idx, val) != (CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG):
        raise FrameError(f"connector id ({idx},{val}) is not dm-log-userspace (7,1)")
    if len(frame) < CN_MSG_SIZE + HEADER_SIZE:
        raise FrameError(
            f"request of {len(frame) - CN_MSG_SIZE} bytes is shorter than the 160-byte header"
        )
    luid, uuid_field, padding, version, error, seq, raw_type, data_size = _HDR.unpack_from(
        frame, CN_MSG_SIZE
    )
    nul = uuid_field.find(b"\0")
    uuid_raw = uuid_field if nul < 0 else uuid_field[:nul]
    start = CN_MSG_SIZE + HEADER_SIZE
    request = Request(
        luid=luid,
        uuid=uuid_raw.decode("latin-1"),
        version=version,
        seq=seq,
        request_type=raw_type & DM_ULOG_REQUEST_MASK,
        data=b"",
        cn_seq=cn_seq,
        raw_type=raw_type,
        padding=padding,
        error=error,
    )
    available = len(frame) - start
    if data_size > available:
        raise FrameError(
            f"data_size {data_size} runs past the end of the frame ({available} bytes follow)",
            request,
        )
    if cn_len != HEADER_SIZE + data_size:
        raise FrameError(f"cn_msg.len {cn_len} does not match 160 + data_size {data_size}", request)
    request.data = frame[start : start + data_size]
    if nul < 0:
        raise FrameError("uuid is not NUL-terminated", request)
    if uuid_field.count(0) != DM_UUID_LEN - nul:
        raise FrameError("uuid has bytes after its terminating NUL", request)
    # Every check passed here yet failed in decode_frame: the two disagree (a bug).
    raise AssertionError("decode_frame refused a well-formed frame")


def encode_request(request: Request) -> bytes:
    """Build a kernel-style request frame (kernel model, tests, golden vectors)."""
    uuid = uuid_to_bytes(request.uuid)
    if len(uuid) >= DM_UUID_LEN:
        raise ValueError("uuid longer than 128 bytes")
    if len(request.padding) != 3:
        raise ValueError("header padding is 3 bytes")
    return (
        _CN.pack(CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG, request.cn_seq, 0, HEADER_SIZE + len(request.data), 0)
        + _HDR.pack(request.luid, uuid, request.padding, request.version, request.error, request.seq,
                    request.raw_type or request.request_type, len(request.data))
        + request.data
    )


def encode_reply(reply: Reply) -> bytes:
    """:class:`Reply` → connector payload. One reply per datagram (the kernel reads one)."""
    req = reply.request
    if reply.ack:
        return _CN.pack(CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG, req.seq, -reply.error, 0, 0)
    if reply.error > 0:
        raise ValueError("reply error must be 0 or a negative errno")
    data = reply.data
    size = len(data)
    seq = req.seq
    return _CN_HDR_pack(CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG, seq, 0, HEADER_SIZE + size, 0,
                        req.luid, req.uuid.encode("latin-1")[: DM_UUID_LEN - 1], b"\0\0\0",
                        req.version, reply.error, seq, req.raw_type or req.request_type, size) + data


@dataclass(slots=True)
class DecodedReply:
    """A reply as the kernel reads it (kernel model, dump tool)."""

    seq: int
    error: int
    data: bytes
    ack_form: bool
    request_type: int = 0
    luid: int = 0
    uuid: str = ""


def decode_reply(frame: bytes) -> DecodedReply:
    """Read a daemon→kernel frame the way ``cn_ulog_callback``/``fill_pkg`` do."""
    if len(frame) < CN_MSG_SIZE:
        raise FrameError("reply shorter than a cn_msg")
    idx, val, cn_seq, ack, cn_len, _flags = _CN.unpack_from(frame, 0)
    if (idx, val) != (CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG):
        raise FrameError("reply connector id is not (7,1)")
    if cn_len == 0:
        return DecodedReply(seq=cn_seq, error=-ack, data=b"", ack_form=True)
    if cn_len < HEADER_SIZE or len(frame) < CN_MSG_SIZE + HEADER_SIZE:
        raise FrameError("incomplete reply")
    luid, uuid_field, _pad, _version, error, seq, raw_type, data_size = _HDR.unpack_from(frame, CN_MSG_SIZE)
    data = frame[CN_MSG_SIZE + HEADER_SIZE : CN_MSG_SIZE + HEADER_SIZE + data_size]
    if len(data) != data_size:
        raise FrameError("reply data_size runs past the end of the frame")
    nul = uuid_field.find(b"\0")
    return DecodedReply(
        seq=seq, error=error, data=data, ack_form=False,
        request_type=raw_type & DM_ULOG_REQUEST_MASK, luid=luid,
        uuid=(uuid_field if nul < 0 else uuid_field[:nul]).decode("latin-1"),
    )


# --- netlink framing -------------------------------------------------------------------------


def strip_nlmsghdr(datagram: bytes) -> tuple[int, bytes]:
    """Netlink datagram → (nlmsg_type, connector payload). Raises FrameError."""
    if len(datagram) < NLMSGHDR_SIZE:
        raise FrameError("datagram shorter than a netlink header")
    length, nl_type, _flags, _seq, _pid = _NLH.unpack_from(datagram, 0)
    if length < NLMSGHDR_SIZE or length > len(datagram):
        raise FrameError(f"nlmsg_len {length} does not fit the {len(datagram)}-byte datagram")
    return nl_type, datagram[NLMSGHDR_SIZE:length]


def add_nlmsghdr(payload: bytes, seq: int = 0, pid: int = 0) -> bytes:
    """Connector payload → one netlink message (type NLMSG_DONE), as cmirrord sends it."""
    hdr = _NLH.pack(NLMSGHDR_SIZE + len(payload), NLMSG_DONE, 0, seq, pid)
    pad = (-len(payload)) % 4
    return hdr + payload + b"\0" * pad


# --- payloads: one table ---------------------------------------------------------------------
#
# Every request type's request and reply payload is defined once, below, as a construct
# definition whose field names are the names the golden vectors and ``ulog-dump wire`` show
# (``formats/wire.md`` §4 and §10). The engine reads and writes payloads through the ``struct``
# fast path generated from the same definitions (``parse_region``, ``build_s64``, ...; a test
# checks both agree on random bytes); the tools go through :func:`parse_payload` and
# :func:`build_payload`, which read the table.


class _CtrString(c.Adapter):
    """The constructor string (``formats/wire.md`` §5): ASCII, no NUL inside; the reconnect
    CTR counts a trailing NUL in ``data_size``, the initial one does not. Decided here only:
    the engine (through :func:`parse_ctr_string`) and the tools read it the same way."""

    def _decode(self, obj: bytes, context: object, path: object) -> c.Container:
        text, nul_counted = parse_ctr_string(obj)
        return c.Container(ctr=text, nul_counted=nul_counted)

    def _encode(self, obj: Mapping[str, Any], context: object, path: object) -> bytes:
        return obj["ctr"].encode("ascii") + (b"\0" if obj["nul_counted"] else b"")


class _CString(c.Adapter):
    """ASCII text the kernel reads as a C string, its NUL counted in ``data_size`` (STATUS_*
    text, the initial CTR's device name)."""

    def __init__(self, name: str):
        super().__init__(c.GreedyBytes)
        self.key = name

    def _decode(self, obj: bytes, context: object, path: object) -> c.Container:
        if not obj.endswith(b"\0") or b"\0" in obj[:-1]:
            raise ValueError(f"{self.key} of {len(obj)} bytes is not one NUL-terminated string")
        return c.Container({self.key: obj[:-1].decode("ascii"), "nul_counted": True})

    def _encode(self, obj: Mapping[str, Any], context: object, path: object) -> bytes:
        return obj[self.key].encode("ascii") + b"\0"


#: IS_CLEAN, IN_SYNC, IS_REMOTE_RECOVERING request.
Region = c.Struct("region" / c.Int64un)
#: MARK_REGION, CLEAR_REGION and integrated FLUSH request: u64[1..32] in reverse queueing order.
RegionList = c.Struct("regions" / c.GreedyRange(c.Int64un))
SetRegionSync = c.Struct("region" / c.Int64un, "in_sync" / c.Int64sn)
#: GET_REGION_SIZE (sectors) and GET_SYNC_COUNT reply; named by type, as the kernel's header does.
U64 = c.Struct("u64" / c.Int64un)
#: IS_CLEAN / IN_SYNC reply: 1 or 0.
S64 = c.Struct("s64" / c.Int64sn)
ResyncWork = c.Struct("have_work" / c.Int64sn, "region" / c.Int64un)
RemoteRecovering = c.Struct("is_recovering" / c.Int64sn, "in_sync_hint" / c.Int64un)
CtrString = _CtrString(c.GreedyBytes)
StatusText = _CString("text")
DeviceName = _CString("device")


def _check_size(data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(data)}")


class Payload:
    """One payload definition and the parse/build generated from it.

    A fixed-size Struct of numbers goes through :func:`flat_struct`, a region list through the
    struct of its item; anything else (the strings) through construct itself. Errors are
    ``ValueError`` (the engine answers them -EINVAL).
    """

    def __init__(self, what: str, definition: c.Construct):
        self.what = what
        self.definition = definition
        self.names: tuple[str, ...] = ()
        self.packed: struct.Struct | None = None
        self.item: struct.Struct | None = None
        if isinstance(definition, c.Struct):
            self.names = tuple(sub.name for sub in definition.subcons)
            fields = [sub.subcon for sub in definition.subcons]
            if len(fields) == 1 and isinstance(fields[0], c.GreedyRange):
                self.item = flat_struct(fields[0].subcon)
            else:
                self.packed = flat_struct(definition)

    def parse(self, data: bytes) -> dict[str, object]:
        if self.packed is not None:
            _check_size(data, self.packed.size, self.what)
            return dict(zip(self.names, self.packed.unpack(data), strict=True))
        if self.item is not None:
            return {self.names[0]: self.items(data)}
        try:
            return {k: v for k, v in self.definition.parse(data).items() if not k.startswith("_")}
        except c.ConstructError as exc:  # pragma: no cover - the adapters raise ValueError
            raise ValueError(f"undecodable {self.what}: {exc}") from exc

    def unpack(self, data: bytes) -> tuple[Any, ...]:
        """The values of a fixed-size payload, in field order (the fast path's form)."""
        if self.packed is None:
            raise TypeError(f"{self.what} is not of a fixed size")
        if len(data) != self.packed.size:
            _check_size(data, self.packed.size, self.what)
        return self.packed.unpack(data)

    def build(self, fields: Mapping[str, Any]) -> bytes:
        if self.packed is not None:
            return self.packed.pack(*(fields[name] for name in self.names))
        if self.item is not None:
            return b"".join(map(self.item.pack, fields[self.names[0]]))
        return self.definition.build(fields)

    def items(self, data: bytes) -> list[int]:
        if self.item is None:
            raise TypeError(f"{self.what} is not a list")
        if len(data) % self.item.size:
            raise ValueError(f"{self.what} of {len(data)} bytes is not a multiple of {self.item.size}")
        return [r for (r,) in self.item.iter_unpack(data)]


#: The payload layouts the request table (:mod:`ulog_disk.protocol.requests`) names, and the engine's
#: fast path below reads and builds.
REGION = Payload("u64 region", Region)
REGIONS = Payload("region list", RegionList)
SET_REGION_SYNC = Payload("SET_REGION_SYNC payload", SetRegionSync)
U64_VALUE = Payload("u64 value", U64)
S64_VALUE = Payload("s64 value", S64)
RESYNC_WORK = Payload("GET_RESYNC_WORK reply", ResyncWork)
REMOTE_RECOVERING = Payload("IS_REMOTE_RECOVERING reply", RemoteRecovering)


def request_kind(request_type: int) -> RequestType | None:
    """The type a request's type field names (its flag bits ignored), or None."""
    return _KINDS.get(request_type & DM_ULOG_REQUEST_MASK)


def parse_ctr_string(data: bytes) -> tuple[str, bool]:
    """A CTR request's data → (constructor string, whether a trailing NUL was counted: the
    reconnect form). Raises ValueError."""
    nul_counted = data.endswith(b"\0")
    raw = data[:-1] if nul_counted else data
    if b"\0" in raw:
        raise ValueError("constructor string contains a NUL byte")
    try:
        return raw.decode("ascii"), nul_counted
    except UnicodeDecodeError as exc:
        raise ValueError("constructor string is not ASCII") from exc


# The engine's fast path: the structs generated from the same definitions, used as they are (no
# dict per request; a build is the struct's own bound ``pack``); sizes are tested inline where a
# request is read, since a function call would be a third of parse_region's cost.
_REGION_S = flat_struct(Region)
_REGION_ITEM = flat_struct(RegionList.subcons[0].subcon.subcon)
_U64_S = flat_struct(U64)
_S64_S = flat_struct(S64)

build_u64 = _U64_S.pack
build_s64 = _S64_S.pack
#: (region, in_sync) ↔ 16 bytes.
build_set_region_sync = flat_struct(SetRegionSync).pack
parse_set_region_sync = SET_REGION_SYNC.unpack
#: (have_work, region) ↔ 16 bytes.
build_resync_work = flat_struct(ResyncWork).pack
parse_resync_work = RESYNC_WORK.unpack
#: (is_recovering, in_sync_hint) ↔ 16 bytes.
build_remote_recovering = flat_struct(RemoteRecovering).pack
parse_remote_recovering = REMOTE_RECOVERING.unpack


def parse_region(data: bytes) -> int:
    if len(data) != 8:
        _check_size(data, 8, REGION.what)
    return _REGION_S.unpack(data)[0]


def parse_regions(data: bytes) -> list[int]:
    return REGIONS.items(data)


def parse_region_group(request_type: int, data: bytes) -> list[int]:
    """The regions of a MARK_REGION or CLEAR_REGION request: at least one (the kernel sends
    groups of 1..32; an integrated FLUSH may carry none)."""
    regions = REGIONS.items(data)
    if not regions:
        raise ValueError(f"{RequestType(request_type).name} without regions")
    return regions


def build_regions(regions: list[int]) -> bytes:
    return b"".join(map(_REGION_ITEM.pack, regions))


def parse_u64(data: bytes) -> int:
    return U64_VALUE.unpack(data)[0]


def parse_s64(data: bytes) -> int:
    return S64_VALUE.unpack(data)[0]
