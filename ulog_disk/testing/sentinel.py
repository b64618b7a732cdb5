"""The fuzz tests' sentinel: a log set up before the hostile frames that must keep working after
each of them. The engine's fuzz test reaches it in-process, the transport's through a daemon: the
same state, set up and checked by the same requests."""

from __future__ import annotations

from collections.abc import Callable

from ..protocol import wire
from ..protocol.wire import RequestType

T = RequestType

SENTINEL_UUID = "LVM-sentinel"
SENTINEL_LUID = 0xFFFF8D8142769400

#: How a test sends the sentinel one request: (type, payload) -> the decoded reply.
SentinelCall = Callable[[RequestType, bytes], wire.DecodedReply]


def set_up_sentinel(call: SentinelCall, ctr: bytes) -> None:
    """Construct and resume the sentinel (``ctr``: regions of 1024 sectors), with region 0 in sync
    and region 1 marked and flushed: the state :func:`check_sentinel` expects."""
    for rtype, data in ((T.CTR, ctr), (T.RESUME, b""), (T.SET_REGION_SYNC, wire.build_set_region_sync(0, 1)),
                        (T.MARK_REGION, wire.build_regions([1])), (T.FLUSH, b"")):
        reply = call(rtype, data)
        assert reply.error == 0, f"{rtype.name}: {reply.error}"


def check_sentinel(call: SentinelCall, status: bytes) -> None:
    """The sentinel still answers as :func:`set_up_sentinel` left it; ``status``: its STATUS_INFO."""
    for rtype, data, parse, want in ((T.GET_REGION_SIZE, b"", wire.parse_u64, 1024),
                                     (T.IN_SYNC, wire.build_u64(0), wire.parse_s64, 1),
                                     (T.IS_CLEAN, wire.build_u64(1), wire.parse_s64, 0),
                                     (T.GET_SYNC_COUNT, b"", wire.parse_u64, 1)):
        reply = call(rtype, data)
        assert (reply.error, parse(reply.data)) == (0, want), rtype.name
    reply = call(T.STATUS_INFO, b"")
    assert (reply.error, reply.data) == (0, status)
