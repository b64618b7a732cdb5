"""The kernel in-process: requests as dm-log-userspace sends them, straight into an engine.

Every request goes through the wire both ways (``encode_request`` → ``decode_frame`` →
``Applier.handle_now`` → ``encode_reply`` → ``decode_reply``), so what a test checks is what the
kernel would read; the engine's backend work runs inline (``handle_now``). No daemon, no socket,
no threads: for the engine's rules and a backend's behaviour under them.
"""

from __future__ import annotations

from ..daemon.applier import Applier
from ..log.regionlog import RegionLog
from ..protocol import wire
from ..protocol.wire import Request, RequestType

T = RequestType


class Kernel:
    """One global seq, as the kernel has; every call names its log by ``luid``/``uuid``, or uses
    the driver's defaults (and ``ctr`` as the default constructor string)."""

    def __init__(self, engine: Applier, uuid: str = "LVM-testing", luid: int = 1,
                 ctr: str | bytes = "32768 clustered-core 1024", seq: int = 1000):
        self.engine = engine
        self.uuid = uuid
        self.luid = luid
        self.default_ctr = ctr
        self.seq = seq

    def send(self, type_: int, data: bytes = b"", luid: int | None = None,
             uuid: str | None = None) -> wire.DecodedReply:
        """The decoded reply, checked for what the kernel relies on (seq, identity, sign)."""
        luid = self.luid if luid is None else luid
        uuid = self.uuid if uuid is None else uuid
        self.seq += 1
        req = Request(luid=luid, uuid=uuid, version=wire.DM_ULOG_REQUEST_VERSION, seq=self.seq,
                      request_type=type_, data=data, cn_seq=self.seq)
        out = wire.encode_reply(self.engine.handle_now(wire.decode_frame(wire.encode_request(req))))
        rep = wire.decode_reply(out)
        assert rep.seq == self.seq
        if not rep.ack_form:
            assert (rep.luid, rep.uuid, rep.request_type) == (luid, uuid, type_ & 0xFF)
            assert rep.error <= 0
            if rep.error:
                assert rep.data == b""
        return rep

    def ok(self, type_: int, data: bytes = b"", luid: int | None = None, uuid: str | None = None) -> bytes:
        rep = self.send(type_, data, luid, uuid)
        assert rep.error == 0, (T(type_).name, rep)
        return rep.data

    def err(self, type_: int, data: bytes = b"", luid: int | None = None, uuid: str | None = None) -> int:
        return self.send(type_, data, luid, uuid).error

    # --- one request each, as dm-log-userspace-base.c sends them ------------------------------

    def ctr(self, text: str | bytes | None = None, luid: int | None = None, uuid: str | None = None,
            reconnect: bool = False) -> bytes:
        """CTR; ``reconnect``: the kernel's reconnect form (the string with its NUL)."""
        text = self.default_ctr if text is None else text
        raw = text.encode() if isinstance(text, str) else text
        return self.ok(T.CTR, raw + (b"\0" if reconnect else b""), luid, uuid)

    def up(self, text: str | bytes | None = None, luid: int | None = None, uuid: str | None = None) -> None:
        """CTR, GET_REGION_SIZE, RESUME: a mirror coming up."""
        self.ctr(text, luid, uuid)
        assert wire.parse_u64(self.ok(T.GET_REGION_SIZE, luid=luid, uuid=uuid)) > 0
        self.resume(luid, uuid)

    def resume(self, luid: int | None = None, uuid: str | None = None) -> None:
        self.ok(T.RESUME, luid=luid, uuid=uuid)

    def suspend(self, luid: int | None = None, uuid: str | None = None) -> None:
        self.ok(T.PRESUSPEND, luid=luid, uuid=uuid)
        self.ok(T.POSTSUSPEND, luid=luid, uuid=uuid)

    def dtr(self, luid: int | None = None, uuid: str | None = None) -> None:
        self.ok(T.DTR, luid=luid, uuid=uuid)

    def in_sync(self, r: int, luid: int | None = None, uuid: str | None = None) -> int:
        return wire.parse_s64(self.ok(T.IN_SYNC, wire.build_u64(r), luid, uuid))

    def is_clean(self, r: int, luid: int | None = None, uuid: str | None = None) -> int:
        return wire.parse_s64(self.ok(T.IS_CLEAN, wire.build_u64(r), luid, uuid))

    def sync_count(self, luid: int | None = None, uuid: str | None = None) -> int:
        return wire.parse_u64(self.ok(T.GET_SYNC_COUNT, luid=luid, uuid=uuid))

    def work(self, luid: int | None = None, uuid: str | None = None) -> tuple[int, int]:
        """GET_RESYNC_WORK: (have work, region)."""
        return wire.parse_resync_work(self.ok(T.GET_RESYNC_WORK, luid=luid, uuid=uuid))

    def set_sync(self, r: int, value: int = 1, luid: int | None = None, uuid: str | None = None) -> None:
        self.ok(T.SET_REGION_SYNC, wire.build_set_region_sync(r, value), luid, uuid)

    def mark(self, regions: list[int], luid: int | None = None, uuid: str | None = None) -> None:
        self.ok(T.MARK_REGION, wire.build_regions(regions), luid, uuid)

    def clear(self, regions: list[int], luid: int | None = None, uuid: str | None = None) -> None:
        self.ok(T.CLEAR_REGION, wire.build_regions(regions), luid, uuid)

    def flush(self, regions: list[int] | None = None, luid: int | None = None,
              uuid: str | None = None) -> None:
        """FLUSH, carrying ``regions`` as integrated marks."""
        self.ok(T.FLUSH, wire.build_regions(regions or []), luid, uuid)

    def remote(self, r: int, luid: int | None = None, uuid: str | None = None) -> tuple[int, int]:
        return wire.parse_remote_recovering(self.ok(T.IS_REMOTE_RECOVERING, wire.build_u64(r), luid, uuid))

    def status(self, luid: int | None = None, uuid: str | None = None) -> bytes:
        return self.ok(T.STATUS_INFO, luid=luid, uuid=uuid)

    def health(self, luid: int | None = None, uuid: str | None = None) -> str:
        """The last word of STATUS_INFO: the log's health letter."""
        return self.status(luid, uuid).rstrip(b"\0").decode().split()[-1]

    # --- sequences -----------------------------------------------------------------------------

    def resync_all(self, luid: int | None = None, uuid: str | None = None) -> None:
        """Recover every region the log asks for, as the mirror's recovery does."""
        while True:
            have, r = self.work(luid, uuid)
            if not have:
                return
            self.set_sync(r, 1, luid, uuid)

    def bits(self, regions: int, luid: int | None = None,
             uuid: str | None = None) -> tuple[list[int], list[int]]:
        """(IS_CLEAN, IN_SYNC) of the first ``regions`` regions."""
        return ([self.is_clean(r, luid, uuid) for r in range(regions)],
                [self.in_sync(r, luid, uuid) for r in range(regions)])


# --- the oracle of crash tests ------------------------------------------------------------------


def acknowledged(log: RegionLog, rtype: int, data: bytes) -> None:
    """Apply to ``log`` what an acknowledged request did to the bits, by the engine's documented
    semantics: a crash test keeps such a log beside the daemon and checks the restarted daemon
    against it (the requests that change nothing here change no bit)."""
    if rtype in (T.MARK_REGION, T.FLUSH) and data:
        log.mark(wire.parse_regions(data))
    elif rtype == T.CLEAR_REGION:
        log.clear(wire.parse_regions(data))
    elif rtype == T.SET_REGION_SYNC:
        region, in_sync = wire.parse_set_region_sync(data)
        log.set_region_sync(region, bool(in_sync))


def bits_of(log: RegionLog) -> tuple[list[int], list[int]]:
    """(clean, in sync) of every region, as :meth:`Kernel.bits` and ``Client.bits`` read them."""
    n = log.region_count
    return [int(log.clean[r]) for r in range(n)], [int(log.sync[r]) for r in range(n)]


def log_of(clean: list[int], in_sync: list[int]) -> RegionLog:
    """The log whose :func:`bits_of` are these (one bit a region, as read from a daemon)."""
    return RegionLog.from_bitmaps(len(clean), _bitmap(clean), _bitmap(in_sync))


def _bitmap(bits: list[int]) -> bytes:
    out = bytearray((len(bits) + 7) // 8)
    for r, b in enumerate(bits):
        if b:
            out[r // 8] |= 1 << (r % 8)
    return bytes(out)


#: Reply payload sizes the kernel reads for the requests that return a fixed-size value.
VALUE_REPLY_SIZES = {
    RequestType.GET_REGION_SIZE: 8, RequestType.IS_CLEAN: 8, RequestType.IN_SYNC: 8,
    RequestType.GET_SYNC_COUNT: 8, RequestType.GET_RESYNC_WORK: 16, RequestType.IS_REMOTE_RECOVERING: 16,
}


def check_success(request: Request, reply: wire.DecodedReply) -> None:
    """A successful reply has the size and form the kernel reads (protocol ref §3.1)."""
    kind = request.kind
    assert kind is not None, "a request of an unknown type succeeded"
    if kind in VALUE_REPLY_SIZES:
        assert len(reply.data) == VALUE_REPLY_SIZES[kind]
    elif kind is RequestType.CTR:
        if request.data.endswith(b"\0"):
            assert reply.data == b""
        else:
            assert len(reply.data) <= 128 and (reply.data == b"" or reply.data.endswith(b"\0"))
    elif kind in (RequestType.STATUS_INFO, RequestType.STATUS_TABLE):
        assert reply.data.endswith(b"\0") and len(reply.data) > 1
    else:
        assert reply.data == b""
    if kind in (RequestType.IS_CLEAN, RequestType.IN_SYNC):
        assert wire.parse_s64(reply.data) in (0, 1)
